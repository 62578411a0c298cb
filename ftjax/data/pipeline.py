"""Tokenised splits and the batches the train and eval steps see.

Padding every sentence to `max_length` wastes most of the compute on short
text (rotten_tomatoes averages ~27 tokens). Instead each example goes to the
smallest of a few *bucket lengths* that holds it, and every batch is padded to
its bucket's length: XLA compiles one program per bucket, and the mean padded
length drops close to the mean real length.

The training order is a pure function of (seed, epoch, example lengths), laid
out as a *plan* of global batches:

1. permute the examples with (seed, epoch);
2. in that order, put each example in the smallest bucket that holds it, cut
   each bucket into full global batches, and carry a bucket's leftover (fewer
   than a batch) into the next larger bucket; the largest bucket's final
   leftover is dropped;
3. shuffle the epoch's batches with (seed, epoch).

The number of batches per epoch depends only on the lengths, so
`steps_per_epoch` is exact. Every process computes the same plan and
materialises only its own rows of each global batch, so hosts need no
coordination. The plan is indexed by the global step (a `grain.MapDataset`
over `epoch * steps_per_epoch + j`), so the iterator's state is one integer
and resuming is exact, even on a different number of processes.
"""

import dataclasses
import functools
import threading
from collections.abc import Iterator, Sequence

import datasets
import grain
import ml_collections
import numpy as np
from absl import logging

from ftjax.errors import ConfigError

# Batches are cheap numpy copies: one worker thread and a short buffer keep the
# host free for the train step (the project's machines have 2 cores).
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
_TOKENIZE_CHUNK = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedSplit:
  """Token ids of one split, unpadded.

  Attributes:
    input_ids: per example, int32, variable length (at most max_length).
    token_type_ids: per example like `input_ids`; only for sentence pairs.
    labels: int32 (num_examples,).
  """
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray] | None
  labels: np.ndarray

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """int32 (num_examples,): tokens per example."""
    return np.fromiter((len(ids) for ids in self.input_ids), np.int32, len(self.input_ids))

  def __len__(self) -> int:
    return len(self.labels)


def tokenize_split(dataset: datasets.Dataset, data_config: ml_collections.ConfigDict,
                   tokenizer, *, num_labels: int) -> TokenizedSplit:
  """Tokenises `dataset` (no padding) and checks its labels.

  Args:
    dataset: a split from `sources.load_split`.
    data_config: `config.data` (columns and max_length).
    tokenizer: a Hugging Face fast tokenizer.
    num_labels: labels must lie in [0, num_labels).

  Returns:
    The token ids, truncated to `data_config.max_length`, and the labels.
  """
  labels = _labels(list(dataset[data_config.label_column]), data_config.label_column,
                   num_labels)
  texts = _texts(dataset, data_config.text_column)
  pairs = _texts(dataset, data_config.text_pair_column) if data_config.text_pair_column else None
  input_ids = []
  token_type_ids = [] if pairs else None
  num_truncated = 0
  for start in range(0, len(texts), _TOKENIZE_CHUNK):
    chunk = slice(start, start + _TOKENIZE_CHUNK)
    pairs_chunk = pairs[chunk] if pairs else None
    ids, types, truncated = _tokenize_chunk(tokenizer, texts[chunk], pairs_chunk,
                                            data_config.max_length)
    input_ids += ids
    if pairs:
      token_type_ids += types
    num_truncated += truncated
  logging.info("tokenised %d examples; %d (%.1f%%) truncated to max_length=%d", len(texts),
               num_truncated, 100 * num_truncated / max(len(texts), 1), data_config.max_length)
  return TokenizedSplit(input_ids, token_type_ids, labels)


def _texts(dataset: datasets.Dataset, column: str) -> list[str]:
  texts = list(dataset[column])
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ConfigError(f"text column {column!r} holds {text!r} ({type(text).__name__}) at "
                        f"example {i}; expected a string in every example")
  return texts


def _labels(values: Sequence, column: str, num_labels: int) -> np.ndarray:
  labels = np.asarray(values)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    # Name the first value that is not a class id (a column of ints with one
    # "pos" in it becomes a column of strings).
    i = next((i for i, v in enumerate(values)
              if not isinstance(v, (int, np.integer)) or isinstance(v, bool)), 0)
    raise ConfigError(f"label column {column!r} holds {values[i]!r} ({type(values[i]).__name__}) "
                      f"at example {i}; expected integer class ids in [0, {num_labels})")
  bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
  if bad.size:
    i = int(bad[0])
    raise ConfigError(f"label {int(labels[i])} of example {i} (column {column!r}) is outside "
                      f"[0, {num_labels}); expected class ids below model.num_labels="
                      f"{num_labels} ({bad.size} of {labels.size} examples out of range)")
  return labels.astype(np.int32)


def _tokenize_chunk(tokenizer, texts: list[str], pairs: list[str] | None,
                    max_length: int) -> tuple[list[np.ndarray], list[np.ndarray] | None, int]:
  """Token ids of one chunk, and how many examples were truncated.

  Tokenises without truncation first, so the count is exact, then re-tokenises
  only the long examples with the tokenizer's own truncation rule (which, for
  pairs, trims the longer sentence first).
  """
  kwargs = dict(return_attention_mask=False, return_token_type_ids=pairs is not None,
                verbose=False)
  full = tokenizer(texts, pairs, truncation=False, **kwargs)
  ids = full["input_ids"]
  types = full.get("token_type_ids")
  long = [i for i, row in enumerate(ids) if len(row) > max_length]
  if long:
    cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                    truncation=True, max_length=max_length, **kwargs)
    for k, i in enumerate(long):
      ids[i] = cut["input_ids"][k]
      if types is not None:
        types[i] = cut["token_type_ids"][k]
  as_int32 = lambda rows: [np.asarray(row, np.int32) for row in rows]
  return as_int32(ids), as_int32(types) if pairs is not None else None, len(long)


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


def _bucket_of(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
  """Index of the smallest bucket holding each example."""
  if not buckets or list(buckets) != sorted(set(buckets)):
    raise ConfigError(f"bucket lengths {buckets} must be distinct and ascending")
  if len(lengths) and lengths.max() > buckets[-1]:
    raise ConfigError(f"an example has {lengths.max()} tokens, more than the largest bucket "
                      f"{buckets[-1]}; tokenise with the same data.max_length as the buckets")
  return np.searchsorted(np.asarray(buckets), lengths, side="left")


def steps_per_epoch(split: TokenizedSplit, *, global_batch_size: int,
                    buckets: tuple[int, ...]) -> int:
  """Training batches per epoch: a function of the lengths alone."""
  counts = np.bincount(_bucket_of(split.lengths, buckets), minlength=len(buckets))
  num_batches, carry = 0, 0
  for count in counts:
    num_batches += (count + carry) // global_batch_size
    carry = (count + carry) % global_batch_size
  return num_batches


def _bucket_plan(order: np.ndarray, bucket_of: np.ndarray, num_buckets: int,
                 global_batch_size: int) -> list[tuple[int, np.ndarray]]:
  """Examples in `order` cut into global batches per bucket (step 2 above)."""
  plan = []
  carry = np.empty(0, np.int64)
  for bucket in range(num_buckets):
    pool = np.concatenate([carry, order[bucket_of[order] == bucket]])
    num_full = len(pool) // global_batch_size
    for k in range(num_full):
      plan.append((bucket, pool[k * global_batch_size:(k + 1) * global_batch_size]))
    carry = pool[num_full * global_batch_size:]
  return plan


def _epoch_plan(bucket_of: np.ndarray, num_buckets: int, global_batch_size: int, seed: int,
                epoch: int) -> list[tuple[int, np.ndarray]]:
  """The epoch's global batches as (bucket index, example indices), in order."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(bucket_of))
  plan = _bucket_plan(order, bucket_of, num_buckets, global_batch_size)
  return [plan[j] for j in rng.permutation(len(plan))]


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows [p*B/P, (p+1)*B/P) of every global batch."""
  if global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes; expected a multiple of {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _make_batch(split: TokenizedSplit, rows: np.ndarray, length: int, pad_id: int,
                weights: np.ndarray) -> dict[str, np.ndarray]:
  """Pads the examples `rows` to `length` (right padding)."""
  input_ids_bl = np.full((len(rows), length), pad_id, np.int32)
  attention_mask_bl = np.zeros((len(rows), length), np.int32)
  token_type_ids_bl = None if split.token_type_ids is None else np.zeros_like(input_ids_bl)
  for r, i in enumerate(rows):
    ids = split.input_ids[i]
    input_ids_bl[r, :len(ids)] = ids
    attention_mask_bl[r, :len(ids)] = 1
    if token_type_ids_bl is not None:
      token_type_ids_bl[r, :len(ids)] = split.token_type_ids[i]
  batch = {"input_ids": input_ids_bl, "attention_mask": attention_mask_bl,
           "labels": split.labels[rows], "weights": weights.astype(np.float32),
           "index": np.asarray(rows, np.int32)}
  if token_type_ids_bl is not None:
    batch["token_type_ids"] = token_type_ids_bl
  return batch


def token_types(batch) -> dict:
  """`token_type_ids=` for a sentence-pair batch (encoders take it); nothing otherwise."""
  return {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}


class _TrainPlan:
  """Global step -> this process's batch; caches the current epoch's plan."""

  def __init__(self, split: TokenizedSplit, global_batch_size: int, buckets: tuple[int, ...],
               seed: int, rows: slice, pad_id: int):
    self._split = split
    self._bucket_of = _bucket_of(split.lengths, buckets)
    self._buckets = buckets
    self._global_batch_size = global_batch_size
    self._seed = seed
    self._rows = rows
    self._pad_id = pad_id
    self.steps_per_epoch = steps_per_epoch(split, global_batch_size=global_batch_size,
                                           buckets=buckets)
    self._cache: tuple[int, list] | None = None
    self._lock = threading.Lock()

  def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    with self._lock:
      if self._cache is None or self._cache[0] != epoch:
        self._cache = (epoch, _epoch_plan(self._bucket_of, len(self._buckets),
                                          self._global_batch_size, self._seed, epoch))
      return self._cache[1]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, j = divmod(int(step), self.steps_per_epoch)
    bucket, examples = self._plan(epoch)[j]
    rows = examples[self._rows]
    return _make_batch(self._split, rows, self._buckets[bucket], self._pad_id,
                       np.ones(len(rows), np.float32))


class TrainIterator:
  """Training batches with a JSON-serialisable, checked state.

  The state is the next global step plus the plan's identity (seed, batch
  size, buckets, number of examples): restoring it into an iterator built
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


def train_iterator(split: TokenizedSplit, *, global_batch_size: int, buckets: tuple[int, ...],
                   seed: int, num_epochs: int, process_index: int = 0, process_count: int = 1,
                   pad_id: int = 0) -> TrainIterator:
  """Deterministic, resumable training batches for this process.

  Yields dicts of numpy arrays for the local batch (b = B / process_count
  rows, L = the batch's bucket length): `input_ids` (b, L) int32 padded with
  `pad_id`, `attention_mask` (b, L) int32, `labels` (b,) int32, `weights` (b,)
  float32 (all 1), `index` (b,) int32 (the examples' positions in `split`, for
  per-example caches) and `token_type_ids` (b, L) for sentence pairs. Stops after
  `num_epochs` epochs.
  """
  rows = _local_rows(global_batch_size, process_index, process_count)
  if seed < 0:
    raise ConfigError(f"seed is {seed}; expected a non-negative integer")
  plan = _TrainPlan(split, global_batch_size, tuple(buckets), seed, rows, pad_id)
  if plan.steps_per_epoch == 0:
    raise ConfigError(f"the training split has {len(split)} examples, fewer than one global "
                      f"batch of {global_batch_size}; expected a smaller batch_size")
  dataset = grain.MapDataset.range(num_epochs * plan.steps_per_epoch).map(plan)
  identity = {"seed": seed, "global_batch_size": global_batch_size,
              "buckets": list(buckets), "num_examples": len(split)}
  return TrainIterator(dataset, identity, plan.steps_per_epoch)


def eval_batches(split: TokenizedSplit, *, global_batch_size: int, buckets: tuple[int, ...],
                 process_index: int = 0, process_count: int = 1,
                 pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, grouped by bucket, in a fixed order.

  The last batch of each bucket is filled up to `global_batch_size` with rows
  of weight 0, so there are only len(buckets) shapes and metrics weighted by
  `weights` count each real example once. A filler row repeats a real example
  of its batch rather than being all padding: a row with no attended token
  can turn a softmax into NaN, and NaN * 0 is still NaN.
  """
  rows = _local_rows(global_batch_size, process_index, process_count)
  for length, examples, weights in eval_plan(split.lengths, global_batch_size, buckets):
    yield _make_batch(split, examples[rows], length, pad_id, weights[rows])


def eval_plan(lengths: np.ndarray, global_batch_size: int,
              buckets: Sequence[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(padded length, example ids, weights) of every global eval batch, filler rows weighing 0."""
  bucket_of = _bucket_of(lengths, tuple(buckets))
  for bucket, length in enumerate(buckets):
    members = np.flatnonzero(bucket_of == bucket)
    for start in range(0, len(members), global_batch_size):
      examples = members[start:start + global_batch_size]
      weights = np.zeros(global_batch_size, np.float32)
      weights[:len(examples)] = 1
      filler = np.full(global_batch_size - len(examples), examples[0])
      yield length, np.concatenate([examples, filler]), weights
