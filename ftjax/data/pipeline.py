"""Text classification data: tokenised splits and the batches the train and eval steps see.

Examples are tokenised unpadded; `ftjax.data.batching` buckets them by length
and lays out the deterministic, resumable plan of global batches. This module
pads a plan's examples into classification batches (`input_ids`,
`attention_mask`, `labels`, ...).
"""

import dataclasses
from collections.abc import Iterator, Sequence

import datasets
import ml_collections
import numpy as np
from absl import logging

from ftjax.data import batching, sources
from ftjax.errors import ConfigError

_TOKENIZE_CHUNK = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedSplit(batching.Sequences):
  """Token ids of one split, unpadded.

  Attributes:
    input_ids: per example, int32, variable length (at most max_length).
    token_type_ids: per example like `input_ids`; only for sentence pairs.
    labels: int32 (num_examples,).
  """
  token_type_ids: list[np.ndarray] | None
  labels: np.ndarray


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
  return sources.check_strings(list(dataset[column]), f"text column {column!r}")


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


# Bucketing is shared by every objective's data; these names stay for callers of this module.
bucket_lengths = batching.bucket_lengths
TrainIterator = batching.TrainIterator


def steps_per_epoch(split: TokenizedSplit, *, global_batch_size: int,
                    buckets: tuple[int, ...]) -> int:
  """Training batches per epoch: a function of the lengths alone."""
  return batching.steps_per_epoch(split.lengths, global_batch_size=global_batch_size,
                                  buckets=buckets)


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
  rows = batching.local_rows(global_batch_size, process_index, process_count)
  plan = batching.EpochPlan(split.lengths, global_batch_size=global_batch_size, buckets=buckets,
                            seed=seed)

  def batch_at(step: int) -> dict[str, np.ndarray]:
    length, examples = plan(step)
    local = examples[rows]
    return _make_batch(split, local, length, pad_id, np.ones(len(local), np.float32))

  identity = {"seed": seed, "global_batch_size": global_batch_size,
              "buckets": list(buckets), "num_examples": len(split)}
  return batching.train_iterator(batch_at, num_steps=num_epochs * plan.steps_per_epoch,
                                 identity=identity, steps_per_epoch=plan.steps_per_epoch)


def eval_batches(split: TokenizedSplit, *, global_batch_size: int, buckets: tuple[int, ...],
                 process_index: int = 0, process_count: int = 1,
                 pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, grouped by bucket, in a fixed order (`batching.eval_plan`).

  Filler rows that complete a bucket's last batch weigh 0.
  """
  for length, examples, weights in batching.eval_plan(
      split.lengths, global_batch_size=global_batch_size, buckets=buckets,
      process_index=process_index, process_count=process_count):
    yield _make_batch(split, examples, length, pad_id, weights)
