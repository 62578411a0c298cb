"""Instruction data for causal-LM fine-tuning: templates, loss masks, packing, mixing.

A record `{"instruction", "input", "output"}` (or `{"input", "output"}`) is
rendered as a *prompt* (the template around instruction and input) and a
*response* (the output, then EOS). The model reads prompt + response; the
loss is on the response tokens only, so the model is never trained to write
prompts. Prompt and response are tokenised separately and concatenated, so
the boundary is exact and is what generation sees at evaluation time.

A training batch row is either one example padded to its bucket length (the
length buckets of `ftjax.data.batching`, as for classification) or, with
`data.packing`, several examples packed into one `max_length` row
(`batching.pack`). Every batch has the same keys:

  input_ids       (b, L) int32   tokens, 0-padded
  segment_ids     (b, L) int32   1, 2, ... per example in the row; 0 = padding
  positions       (b, L) int32   restart at 0 in every segment
  targets         (b, L) int32   the next token (input_ids shifted left)
  target_weights  (b, L) float32 1 where the target is a response token of
                                 the same segment (the loss mask), else 0
  task_ids        (b, L) int32   the task of each token's example
  weights         (b,)   float32 1, or 0 for eval filler rows
  example_ids     (b, L) int32   the split index of each token's example, -1 =
                                 padding (host bookkeeping: a teacher cache
                                 looks rows up by it; the step never sees it)

With segment ids, attention never crosses examples (`ftjax.models.decoder`),
so a packed row computes exactly the per-example losses of the unpacked rows.

Multi-task mixing: the tasks' examples are drawn in proportion to their
weights by `grain.MapDataset.mix` over per-task streams that reshuffle every
pass. As for classification, the plan of global batches is a pure function of
(seed, lengths), so every host computes it and materialises only its rows
(`batching.local_rows`), and the iterator's state is the next step
(`batching.TrainIterator`).
"""

import dataclasses
import re
import threading
from collections.abc import Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from ftjax.data import batching, sources
from ftjax.errors import ConfigError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# Passes a task stream can index (see `MixturePlan`): more than any run reaches.
_MAX_PASSES = 1 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class InstructSplit(batching.Sequences):
  """Tokenised instruction examples of one split, over one or more tasks.

  Attributes:
    input_ids: per example, int32: prompt tokens then response tokens (+EOS).
    prompt_lengths: int32 (n,): the first prompt_lengths[i] tokens are the prompt.
    task_ids: int32 (n,): index into task_names; examples are grouped by task.
    task_names: the tasks, in data.mixture order.
    prompts: the rendered prompt texts (for generation and samples).
    references: the outputs as written in the data.
  """
  prompt_lengths: np.ndarray
  task_ids: np.ndarray
  task_names: tuple[str, ...]
  prompts: list[str]
  references: list[str]

  def task_members(self, task: int) -> np.ndarray:
    return np.flatnonzero(self.task_ids == task)


def tasks(data_config: ml_collections.ConfigDict) -> list[tuple[str, str, float]]:
  """(name, path, weight) of every task: data.mixture, or data.path as one task."""
  if data_config.mixture:
    return [(str(n), str(p), float(w)) for n, p, w in data_config.mixture]
  name = re.sub(r"\W+", "_", data_config.path.rstrip("/").rsplit("/", 1)[-1]) or "data"
  return [(name, data_config.path, 1.0)]


def render(record: dict, data_config: ml_collections.ConfigDict, tokenizer) -> str:
  """The prompt text of one record under `data.template`."""
  instruction = record.get(data_config.instruction_column) or ""
  extra = record.get(data_config.input_column) or ""
  if not instruction:  # {"input", "output"} records: the input is the instruction.
    instruction, extra = extra, ""
  if data_config.template == "chat":
    if not getattr(tokenizer, "chat_template", None):
      raise ConfigError("data.template='chat' but the tokenizer has no chat template; "
                        "use --config.data.template=alpaca")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
  if data_config.template == "raw":
    return f"{instruction}\n\n{extra}" if extra else instruction
  if extra:
    return ALPACA_PROMPT.format(instruction=instruction, input=extra)
  return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _eos_id(tokenizer) -> int:
  if tokenizer.eos_token_id is None:
    raise ConfigError("the tokenizer has no EOS token; instruction tuning appends EOS to "
                      "every response so the model learns to stop")
  return int(tokenizer.eos_token_id)


def load_split(data_config: ml_collections.ConfigDict, split: str, tokenizer, *,
               max_examples: int = 0) -> InstructSplit:
  """Reads, renders and tokenises `split` of every task.

  Examples longer than `data.max_length` keep their prompt and lose the end
  of their response; an example whose prompt leaves no room for a response
  token is dropped. Both counts are logged.
  """
  eos = _eos_id(tokenizer)
  max_length = data_config.max_length
  # The chat template writes its own special tokens; the Alpaca prompt gets
  # the tokenizer's usual ones (a BOS for Llama tokenizers).
  special = data_config.template != "chat"
  ids, prompt_lengths, task_ids, prompts, references = [], [], [], [], []
  for task, (name, path, _) in enumerate(tasks(data_config)):
    records = sources.load_records(path, split, data_config, max_examples=max_examples).to_list()
    texts = [render(r, data_config, tokenizer) for r in records]
    outputs = sources.check_strings([r[data_config.output_column] for r in records],
                                    f"output column {data_config.output_column!r} of task "
                                    f"{name!r}")
    prompt_ids = tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]
    response_ids = tokenizer(outputs, add_special_tokens=False, verbose=False)["input_ids"]
    truncated = dropped = 0
    for text, out, p, r in zip(texts, outputs, prompt_ids, response_ids):
      full = list(p) + list(r) + [eos]
      if len(p) >= max_length:
        dropped += 1
        continue
      if len(full) > max_length:
        truncated += 1
        full = full[:max_length]
      ids.append(np.asarray(full, np.int32))
      prompt_lengths.append(len(p))
      task_ids.append(task)
      prompts.append(text)
      references.append(out)
    kept = len(records) - dropped
    logging.info("task %s split %s: %d examples; %d responses truncated to max_length=%d, "
                 "%d dropped (prompt alone fills max_length)", name, split, kept, truncated,
                 max_length, dropped)
    if kept == 0:
      raise ConfigError(f"every example of task {name!r} split {split!r} has a prompt of at "
                        f"least data.max_length={max_length} tokens; expected a larger "
                        f"data.max_length")
  names = tuple(name for name, _, _ in tasks(data_config))
  return InstructSplit(ids, np.asarray(prompt_lengths, np.int32), np.asarray(task_ids, np.int32),
                       names, prompts, references)


def make_batch(split: InstructSplit, rows: Sequence[Sequence[int]], length: int,
               weights: np.ndarray) -> dict[str, np.ndarray]:
  """Rows of one or more examples each, right-padded to `length` (see the module docstring)."""
  b = len(rows)
  input_ids = np.zeros((b, length), np.int32)
  segment_ids = np.zeros((b, length), np.int32)
  positions = np.zeros((b, length), np.int32)
  targets = np.zeros((b, length), np.int32)
  target_weights = np.zeros((b, length), np.float32)
  task_ids = np.zeros((b, length), np.int32)
  example_ids = np.full((b, length), -1, np.int32)
  for r, examples in enumerate(rows):
    start = 0
    for segment, i in enumerate(examples, start=1):
      ids = split.input_ids[i]
      n, end = len(ids), start + len(ids)
      input_ids[r, start:end] = ids
      segment_ids[r, start:end] = segment
      positions[r, start:end] = np.arange(n)
      targets[r, start:end - 1] = ids[1:]
      # Slot t predicts token t+1: a loss where token t+1 is in the response.
      target_weights[r, start + split.prompt_lengths[i] - 1:end - 1] = 1.0
      task_ids[r, start:end] = split.task_ids[i]
      example_ids[r, start:end] = i
      start = end
  target_weights *= weights[:, None]
  return {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions,
          "targets": targets, "target_weights": target_weights, "task_ids": task_ids,
          "weights": weights.astype(np.float32), "example_ids": example_ids}


class _Stream:
  """Task t's examples, reshuffled on every pass over them: index k -> example id.

  Each stream keeps its own current permutation: the mixture reads every
  stream in increasing k (passes are built in order), so each (task, epoch)
  permutation is computed once. (A cache shared by all streams, bounded below
  the number of tasks, would recompute one on almost every draw.)
  """

  def __init__(self, members: np.ndarray, seed: int, task: int):
    self._members, self._seed, self._task = members, seed, task
    self._current: tuple[int, np.ndarray] | None = None

  def _permutation(self, epoch: int) -> np.ndarray:
    current = self._current
    if current is None or current[0] != epoch:
      rng = np.random.default_rng([self._seed, self._task, epoch])
      current = self._current = (epoch, self._members[rng.permutation(len(self._members))])
    return current[1]

  def __call__(self, k: int) -> int:
    epoch, j = divmod(int(k), len(self._members))
    return int(self._permutation(epoch)[j])


class MixturePlan:
  """Global step -> this process's LM batch.

  The mixed stream of example ids (`grain.MapDataset.mix` of per-task
  streams) is cut into *passes* of `len(split)` examples; each pass is laid
  out as global batches (`batching.pack`ed rows, or `batching.bucket_plan`),
  and a pass's leftover rows (less than a batch) are dropped. Passes are built
  on demand and cached.
  """

  def __init__(self, split: InstructSplit, data_config: ml_collections.ConfigDict, *,
               global_batch_size: int, buckets: tuple[int, ...], seed: int, rows: slice):
    self._split = split
    self._packing = data_config.packing
    self._max_length = data_config.max_length
    self._buckets = buckets
    self._bucket_of = batching.bucket_of(split.lengths, buckets)
    self._batch = global_batch_size
    self._seed = seed
    self._rows = rows
    # What fixes the plan: a resumed iterator must see the same (see `batching.TrainIterator`).
    self.identity = {"seed": seed, "global_batch_size": global_batch_size,
                     "buckets": list(buckets), "num_examples": len(split),
                     "packing": bool(data_config.packing),
                     "mixture": [[n, w] for n, _, w in tasks(data_config)]}
    weights = [w for _, _, w in tasks(data_config)]
    streams = [grain.MapDataset.range(_MAX_PASSES * len(split)).map(
        _Stream(split.task_members(t), seed, t)) for t in range(len(split.task_names))]
    self._mixed = grain.MapDataset.mix(streams, weights) if len(streams) > 1 else streams[0]
    self._passes: list[list[tuple[int, list[list[int]]]]] = []
    self._starts = [0]  # First global step of each built pass.
    self._lock = threading.Lock()

  def _build_pass(self, p: int) -> list[tuple[int, list[list[int]]]]:
    n = len(self._split)
    order = np.fromiter((self._mixed[k] for k in range(p * n, (p + 1) * n)), np.int64, n)
    if self._packing:
      rows = batching.pack(order, self._split.lengths, self._max_length)
      num = len(rows) // self._batch
      return [(self._max_length, rows[k * self._batch:(k + 1) * self._batch])
              for k in range(num)]
    plan = batching.bucket_plan(order, self._bucket_of, num_buckets=len(self._buckets),
                                global_batch_size=self._batch,
                                rng=np.random.default_rng([self._seed, p]))
    return [(self._buckets[b], [[int(i)] for i in examples]) for b, examples in plan]

  def pass_of(self, step: int) -> tuple[int, int]:
    """(pass, index in the pass) of a global step, building passes as needed."""
    with self._lock:
      while self._starts[-1] <= step:
        plan = self._build_pass(len(self._passes))
        if not plan:
          raise ConfigError(f"the training data packs into fewer rows than one global batch "
                            f"of {self._batch}; expected a smaller training.batch_size")
        self._passes.append(plan)
        self._starts.append(self._starts[-1] + len(plan))
      p = int(np.searchsorted(self._starts, step, side="right")) - 1
      return p, step - self._starts[p]

  @property
  def steps_per_epoch(self) -> int:
    """Batches in the first pass (later passes differ by a few when packing)."""
    self.pass_of(0)
    return len(self._passes[0])

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    p, j = self.pass_of(int(step))
    length, rows = self._passes[p][j]
    local = rows[self._rows]
    return make_batch(self._split, local, length, np.ones(len(local), np.float32))


def train_plan(split: InstructSplit, data_config: ml_collections.ConfigDict, *,
               global_batch_size: int, buckets: tuple[int, ...], seed: int,
               process_index: int = 0, process_count: int = 1) -> MixturePlan:
  """The mixture's plan of global batches; materialises this process's rows."""
  batching.check_seed(seed)
  rows = batching.local_rows(global_batch_size, process_index, process_count)
  return MixturePlan(split, data_config, global_batch_size=global_batch_size, buckets=buckets,
                      seed=seed, rows=rows)


def train_iterator(plan: MixturePlan, *, num_steps: int,
                   data_config: ml_collections.ConfigDict) -> batching.TrainIterator:
  """Resumable training batches for `num_steps` steps (see `batching.TrainIterator`)."""
  del data_config  # The one `plan` was built from; the plan records what the state needs.
  return batching.train_iterator(plan, num_steps=num_steps, identity=plan.identity,
                                 steps_per_epoch=plan.steps_per_epoch)


def eval_batches(split: InstructSplit, *, global_batch_size: int, buckets: tuple[int, ...],
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, unpacked, bucketed; filler rows weigh 0 (`batching.eval_plan`)."""
  for length, examples, weights in batching.eval_plan(
      split.lengths, global_batch_size=global_batch_size, buckets=buckets,
      process_index=process_index, process_count=process_count):
    yield make_batch(split, [[int(i)] for i in examples], length, weights)


def extract_answer(text: str, answer_regex: str) -> str:
  """The final answer in `text`: group 1 (or the match) of the regex, else the text.

  Normalised for comparison: surrounding space, thousands separators and a
  trailing period removed.
  """
  m = re.search(answer_regex, text)
  answer = (m.group(1) if m.groups() else m.group(0)) if m else text
  return answer.strip().replace(",", "").rstrip(".").strip()
