"""Batching shared by every objective's data: length buckets, batch plans, per-host rows.

Padding every example to `max_length` wastes most of the compute on short
text (rotten_tomatoes averages ~27 tokens). Instead each example goes to the
smallest of a few *bucket lengths* that holds it, and every batch is padded to
its bucket's length: XLA compiles one program per bucket, and the mean padded
length drops close to the mean real length.

A *plan* lays examples out as global batches of (padded length, example ids).
`EpochPlan`, the plan of classification, is a pure function of (seed, epoch,
example lengths):

1. permute the examples with (seed, epoch);
2. in that order, put each example in the smallest bucket that holds it, cut
   each bucket into full global batches, and carry a bucket's leftover (fewer
   than a batch) into the next larger bucket; the largest bucket's final
   leftover is dropped (`bucket_plan`);
3. shuffle the epoch's batches with (seed, epoch).

The number of batches per epoch depends only on the lengths, so
`steps_per_epoch` is exact. Every process computes the same plan and
materialises only its own rows of each global batch (`local_rows`), so hosts
need no coordination. A `TrainIterator` indexes the plan by the global step (a
`grain.MapDataset` over the steps), so its state is one integer and resuming
is exact, even on a different number of processes.

What a batch holds is the objective's business: the formatting modules
(`pipeline` for text classification, `instruct` for instruction tuning) turn
a plan's example ids into arrays.
"""

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from ftjax.errors import ConfigError

# Batches are cheap numpy copies: one worker thread and a short buffer keep the
# host free for the train step (the project's machines have 2 cores).
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)

# One global batch: (index of its bucket, example ids in batch order).
Batch = tuple[int, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Sequences:
  """Examples that are token sequences of different lengths: what bucketing measures.

  Attributes:
    input_ids: per example, int32, variable length.
  """
  input_ids: list[np.ndarray]

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """int32 (num_examples,): tokens per example."""
    return np.fromiter((len(ids) for ids in self.input_ids), np.int32, len(self.input_ids))

  def __len__(self) -> int:
    return len(self.input_ids)


def bucket_lengths(train_lengths: np.ndarray,
                   data_config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The padded lengths XLA will see, ascending, the last one `max_length`.

  `data.bucket_lengths`, when set, wins (clipped to max_length). Otherwise
  `data.num_buckets` boundaries sit at quantiles of the training lengths, so
  buckets hold similar numbers of examples; they are rounded up to a multiple
  of 8 for friendlier matmul tiles. `num_buckets=1` pads everything to
  max_length (the no-bucketing baseline).
  """
  max_length = data_config.max_length
  if data_config.bucket_lengths:
    chosen = [int(b) for b in data_config.bucket_lengths]
    if min(chosen) < 1:
      raise ConfigError(f"data.bucket_lengths is {tuple(data_config.bucket_lengths)}; "
                        f"expected positive lengths")
  else:
    num_buckets = data_config.num_buckets
    if num_buckets < 1:
      raise ConfigError(f"data.num_buckets is {num_buckets}; expected at least 1")
    quantiles = np.quantile(np.asarray(train_lengths), np.arange(1, num_buckets) / num_buckets)
    chosen = [int(np.ceil(q / 8) * 8) for q in quantiles]
  return tuple(sorted({min(b, max_length) for b in chosen} | {max_length}))


def bucket_of(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """Index of the smallest bucket holding each example."""
  buckets = tuple(buckets)
  if not buckets or list(buckets) != sorted(set(buckets)):
    raise ConfigError(f"bucket lengths {buckets} must be distinct and ascending")
  if len(lengths) and lengths.max() > buckets[-1]:
    raise ConfigError(f"an example has {lengths.max()} tokens, more than the largest bucket "
                      f"{buckets[-1]}; tokenise with the same data.max_length as the buckets")
  return np.searchsorted(np.asarray(buckets), lengths, side="left")


def steps_per_epoch(lengths: np.ndarray, *, global_batch_size: int,
                    buckets: Sequence[int]) -> int:
  """Global batches per epoch of `EpochPlan`: a function of the lengths alone."""
  counts = np.bincount(bucket_of(lengths, buckets), minlength=len(buckets))
  num_batches, carry = 0, 0
  for count in counts:
    num_batches += (count + carry) // global_batch_size
    carry = (count + carry) % global_batch_size
  return num_batches


def bucket_plan(order: np.ndarray, buckets_of: np.ndarray, *, num_buckets: int,
                global_batch_size: int, rng: np.random.Generator | None = None) -> list[Batch]:
  """Examples in `order` cut into global batches per bucket (step 2 above).

  Args:
    order: example ids, in the order they are drawn.
    buckets_of: `bucket_of` of every example.
    num_buckets: how many buckets there are.
    global_batch_size: examples per batch.
    rng: when given, the batches are shuffled with it (step 3), so a plan
      does not run through the buckets shortest first.

  Returns:
    (bucket index, example ids) of every full batch.
  """
  plan = []
  carry = np.empty(0, np.int64)
  for bucket in range(num_buckets):
    pool = np.concatenate([carry, order[buckets_of[order] == bucket]])
    num_full = len(pool) // global_batch_size
    for k in range(num_full):
      plan.append((bucket, pool[k * global_batch_size:(k + 1) * global_batch_size]))
    carry = pool[num_full * global_batch_size:]
  if rng is not None:
    plan = [plan[j] for j in rng.permutation(len(plan))]
  return plan


def pack(order: np.ndarray, lengths: np.ndarray, row_length: int,
         open_rows: int = 8) -> list[list[int]]:
  """Examples (in `order`) packed into rows of at most `row_length` tokens.

  First fit over the `open_rows` most recent rows: an example goes to the
  first open row with room, else opens a row (closing the oldest when there
  are `open_rows`). Rows come out in the order they were opened.
  """
  rows: list[list[int]] = []
  room: list[int] = []
  first_open = 0
  for i in order:
    n = int(lengths[i])
    for r in range(first_open, len(rows)):
      if room[r] >= n:
        rows[r].append(int(i))
        room[r] -= n
        break
    else:
      rows.append([int(i)])
      room.append(row_length - n)
      first_open = max(first_open, len(rows) - open_rows)
  return rows


def check_seed(seed: int) -> None:
  """Plans seed numpy generators, which refuse negative seeds with a less helpful message."""
  if seed < 0:
    raise ConfigError(f"seed is {seed}; expected a non-negative integer")


def local_rows(global_batch_size: int, process_index: int = 0, process_count: int = 1) -> slice:
  """This process's rows [p*B/P, (p+1)*B/P) of every global batch."""
  if global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes; expected a multiple of {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class EpochPlan:
  """Global step -> (padded length, example ids) of that global batch; reshuffled every epoch.

  Builds each epoch's plan (steps 1-3 of the module docstring) when a step of
  it is first asked for, and keeps only the current epoch's.
  """

  def __init__(self, lengths: np.ndarray, *, global_batch_size: int, buckets: Sequence[int],
               seed: int):
    check_seed(seed)
    self.buckets = tuple(buckets)
    self.global_batch_size = global_batch_size
    self.seed = seed
    self._buckets_of = bucket_of(lengths, self.buckets)
    self.steps_per_epoch = steps_per_epoch(lengths, global_batch_size=global_batch_size,
                                           buckets=self.buckets)
    if self.steps_per_epoch == 0:
      raise ConfigError(f"the training split has {len(lengths)} examples, fewer than one "
                        f"global batch of {global_batch_size}; expected a smaller batch_size")
    self._cache: tuple[int, list[Batch]] | None = None
    self._lock = threading.Lock()

  def epoch(self, epoch: int) -> list[Batch]:
    """The epoch's global batches as (bucket index, example ids), in order."""
    with self._lock:
      if self._cache is None or self._cache[0] != epoch:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._buckets_of))
        self._cache = (epoch, bucket_plan(order, self._buckets_of,
                                          num_buckets=len(self.buckets),
                                          global_batch_size=self.global_batch_size, rng=rng))
      return self._cache[1]

  def __call__(self, step: int) -> tuple[int, np.ndarray]:
    epoch, j = divmod(int(step), self.steps_per_epoch)
    bucket, examples = self.epoch(epoch)[j]
    return self.buckets[bucket], examples


def eval_plan(lengths: np.ndarray, *, global_batch_size: int, buckets: Sequence[int],
              process_index: int = 0,
              process_count: int = 1) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Every example exactly once, grouped by bucket, in a fixed order: this process's rows.

  Yields (padded length, example ids, weights) of this process's rows of each
  global batch. The last batch of each bucket is filled up to
  `global_batch_size` with rows of weight 0, so there are only len(buckets)
  shapes and metrics weighted by `weights` count each real example once. A
  filler row repeats a real example of its batch rather than being all
  padding: a row with no attended token can turn a softmax into NaN, and
  NaN * 0 is still NaN.
  """
  rows = local_rows(global_batch_size, process_index, process_count)
  buckets_of = bucket_of(lengths, buckets)
  for bucket, length in enumerate(buckets):
    members = np.flatnonzero(buckets_of == bucket)
    for start in range(0, len(members), global_batch_size):
      examples = members[start:start + global_batch_size]
      weights = np.zeros(global_batch_size, np.float32)
      weights[:len(examples)] = 1
      filler = np.full(global_batch_size - len(examples), examples[0])
      yield length, np.concatenate([examples, filler])[rows], weights[rows]


class TrainIterator:
  """Training batches with a JSON-serialisable, checked state.

  The state is the next global step plus the plan's identity (seed, batch
  size, buckets, number of examples, ...): restoring it into an iterator built
  differently would silently replay other batches, so `set_state` refuses.
  Process index and count are not part of it: the global plan does not depend
  on them, so a run may resume on a different number of hosts.
  """

  def __init__(self, dataset: grain.MapDataset, plan_identity: dict, steps_per_epoch_: int):
    self._dataset = dataset
    self._iterator = dataset.to_iter_dataset(_READ_OPTIONS).__iter__()
    self._identity = plan_identity
    self.steps_per_epoch = steps_per_epoch_
    self.num_steps = len(dataset)

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    return {"next_step": int(self._iterator.get_state()["next_index"]), **self._identity}

  def set_state(self, state: dict) -> None:
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ConfigError(f"data iterator state was saved with {key}={state.get(key)!r}, "
                          f"this run has {key}={value!r}; expected the same data config to "
                          f"resume")
    if not 0 <= state["next_step"] <= self.num_steps:
      raise ConfigError(f"data iterator state is at step {state['next_step']}, past this "
                        f"run's {self.num_steps} steps; expected num_epochs to cover it")
    self._iterator.set_state({"next_index": state["next_step"]})


def train_iterator(batch_at: Callable[[int], dict[str, np.ndarray]], *, num_steps: int,
                   identity: dict, steps_per_epoch: int) -> TrainIterator:
  """Batches `batch_at(0), ..., batch_at(num_steps - 1)`, prefetched, resumable at any step.

  Args:
    batch_at: global step -> this process's batch; a pure function of the
      step, so that resuming is exact.
    num_steps: steps the iterator yields.
    identity: JSON values that fix the plan (seed, batch size, ...);
      `set_state` refuses a state saved with other values.
    steps_per_epoch: recorded on the iterator for the loop's epoch counter.
  """
  dataset = grain.MapDataset.range(num_steps).map(batch_at)
  return TrainIterator(dataset, identity, steps_per_epoch)
