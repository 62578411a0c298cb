"""Preference pairs as batches: `{prompt, chosen, rejected}` records, two rows a pair.

A record is `{"prompt": str, "chosen": str, "rejected": str}` (columns
`data.prompt_column`, `data.chosen_column`, `data.rejected_column`), or the
chat-messages form: `chosen` and `rejected` are lists of `{"role",
"content"}` messages sharing every message but the last (the prompt is then
the shared messages, rendered with the tokenizer's chat template).

`data.template` renders the prompt: "raw" (the prompt text as it is, e.g.
HH-RLHF's "\\n\\nHuman: ... \\n\\nAssistant:"), "chat" (the tokenizer's chat
template, a user turn and the generation prompt) or "alpaca". Each response is
tokenised after its prompt and ends with EOS; the loss mask covers the response
and EOS only. A pair longer than `data.max_length` first loses the start of
its prompt (down to `data.min_prompt_tokens`, the end of the dialogue is what
the responses answer), then the end of its longer response; a pair whose
prompt alone leaves no room is dropped; both counts are logged.

A batch of P pairs is pair-major, (P, 2, length): `[i, 0]` the chosen row and
`[i, 1]` the rejected row of pair i, padded together to the pair's bucket
length (length-bucketed by the longer row, `ftjax.data.batching`), so
sharding and gradient accumulation, which cut the leading axis, never split
a pair: `input_ids`, `positions`, `segment_ids` (1 on real tokens, 0 on
padding), `targets`, `target_weights` (the response mask); `weights` (P,), a
pair's weight (0 for eval filler pairs); `pair_ids` (P,), which pair it is
(precomputed reference log-probabilities are looked up by it).
"""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
from absl import logging

from ftjax.data import batching, instruct, sources
from ftjax.errors import ConfigError

TEMPLATES = ("raw", "chat", "alpaca")


@dataclasses.dataclass(frozen=True, eq=False)
class PreferenceSplit(batching.Sequences):
  """Tokenised pairs: `input_ids` are the chosen rows, `rejected_ids` the rejected rows,
  both prompt + response + EOS; `prompt_lengths` the shared prompt's tokens."""

  rejected_ids: list[np.ndarray]
  prompt_lengths: np.ndarray
  prompts: list[str]

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """int32 (pairs,): the longer row of each pair (what the pair is padded to)."""
    return np.fromiter((max(len(c), len(r)) for c, r in zip(self.input_ids, self.rejected_ids)),
                       np.int32, len(self.input_ids))


def _messages_prompt(chosen: list, rejected: list, i: int) -> tuple[list, str, str]:
  """(shared messages, chosen reply, rejected reply) of a chat-messages record."""
  if (not chosen or not rejected or chosen[:-1] != rejected[:-1]
      or chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant"):
    raise ConfigError(f"preference record {i}: chosen and rejected messages must share every "
                      f"message but the last, which must be the assistant's")
  return list(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def render_prompt(prompt, data_config: ml_collections.ConfigDict, tokenizer) -> str:
  """The prompt text of a record: a string under `data.template`, or chat messages."""
  if isinstance(prompt, list):
    if not getattr(tokenizer, "chat_template", None):
      raise ConfigError("chat-messages preference records need a tokenizer with a chat "
                        "template; this one has none")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
  if data_config.template == "raw":
    return prompt
  return instruct.render({data_config.instruction_column: prompt}, data_config, tokenizer)


def fit_pair(prompt: list, chosen: list, rejected: list, max_length: int,
             min_prompt_tokens: int) -> tuple[list, list, list, bool, bool]:
  """(prompt, chosen, rejected, prompt cut, response cut) fitting max_length tokens.

  The prompt loses its first tokens (keeping at least `min_prompt_tokens`),
  then the responses lose their last tokens. Returns an empty prompt when the
  pair cannot fit (a prompt of `min_prompt_tokens` leaves no response token).
  """
  longest = max(len(chosen), len(rejected))
  prompt_cut = response_cut = False
  if len(prompt) + longest > max_length:
    keep = max(max_length - longest, min(min_prompt_tokens, len(prompt)))
    if keep < len(prompt):
      prompt, prompt_cut = prompt[len(prompt) - keep:], True
  room = max_length - len(prompt)
  if room < 1:
    return [], [], [], prompt_cut, response_cut
  if longest > room:
    chosen, rejected, response_cut = chosen[:room], rejected[:room], True
  return prompt, chosen, rejected, prompt_cut, response_cut


def load_split(data_config: ml_collections.ConfigDict, split: str, tokenizer, *,
               max_examples: int = 0) -> PreferenceSplit:
  """Reads and tokenises the pairs of `split` (see the module docstring)."""
  if data_config.template not in TEMPLATES:
    raise ConfigError(f"config key 'data.template' is {data_config.template!r}; preference "
                      f"data expects one of {TEMPLATES}")
  dataset, where = sources.load_table(data_config.path, split, data_config,
                                      what="preference data")
  columns = (data_config.prompt_column, data_config.chosen_column, data_config.rejected_column)
  missing = [c for c in columns[1:] if c not in dataset.column_names]
  if missing:
    raise ConfigError(f"preference data needs columns {columns[1:]} (data.chosen_column, "
                      f"data.rejected_column); the {where} lacks {missing}; available "
                      f"columns: {', '.join(dataset.column_names)}")
  if max_examples:
    dataset = dataset.select(range(min(max_examples, len(dataset))))
  eos = instruct._eos_id(tokenizer)  # pylint: disable=protected-access
  special = data_config.template == "alpaca"
  chosen_rows, rejected_rows, prompt_lengths, prompts = [], [], [], []
  prompt_cuts = response_cuts = dropped = 0
  for i, record in enumerate(dataset):
    chosen, rejected = record[columns[1]], record[columns[2]]
    if isinstance(chosen, list):
      prompt, chosen, rejected = _messages_prompt(chosen, rejected, i)
    else:
      if columns[0] not in record:
        raise ConfigError(f"preference data column data.prompt_column {columns[0]!r} is not "
                          f"in the {where}; available columns: {', '.join(dataset.column_names)}")
      prompt = record[columns[0]]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
      if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"preference record {i} of the {where} has an empty {name} response "
                          f"({text!r}); expected text in both responses")
    text = render_prompt(prompt, data_config, tokenizer)
    prompt_ids = tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]
    chosen_ids = tokenizer(chosen, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
    rejected_ids = tokenizer(rejected, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
    p, c, r, prompt_cut, response_cut = fit_pair(list(prompt_ids), chosen_ids, rejected_ids,
                                                 data_config.max_length,
                                                 data_config.min_prompt_tokens)
    if not p:
      dropped += 1
      continue
    prompt_cuts += prompt_cut
    response_cuts += response_cut
    chosen_rows.append(np.asarray(p + c, np.int32))
    rejected_rows.append(np.asarray(p + r, np.int32))
    prompt_lengths.append(len(p))
    prompts.append(text)
  logging.info("preference split %s: %d pairs; %d prompts lost their start and %d responses "
               "their end to fit max_length=%d, %d pairs dropped", split, len(chosen_rows),
               prompt_cuts, response_cuts, data_config.max_length, dropped)
  if not chosen_rows:
    raise ConfigError(f"no pair of the {where} fits data.max_length={data_config.max_length}; "
                      f"expected a larger data.max_length")
  return PreferenceSplit(chosen_rows, rejected_rows, np.asarray(prompt_lengths, np.int32),
                         prompts)


def make_batch(split: PreferenceSplit, pairs: np.ndarray, length: int,
               weights: np.ndarray) -> dict[str, np.ndarray]:
  """The (P, 2, length) batch of `pairs` (see the module docstring)."""
  shape = (len(pairs), 2, length)
  input_ids = np.zeros(shape, np.int32)
  segment_ids = np.zeros(shape, np.int32)
  positions = np.zeros(shape, np.int32)
  targets = np.zeros(shape, np.int32)
  target_weights = np.zeros(shape, np.float32)
  for k, i in enumerate(pairs):
    for row, ids in (((k, 0), split.input_ids[i]), ((k, 1), split.rejected_ids[i])):
      n = len(ids)
      input_ids[row][:n] = ids
      segment_ids[row][:n] = 1
      positions[row][:n] = np.arange(n)
      targets[row][:n - 1] = ids[1:]
      # Slot t predicts token t + 1: a loss where token t + 1 is in the response.
      target_weights[row][split.prompt_lengths[i] - 1:n - 1] = 1.0
  return {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions,
          "targets": targets, "target_weights": target_weights,
          "weights": np.asarray(weights, np.float32), "pair_ids": np.asarray(pairs, np.int32)}


def train_iterator(split: PreferenceSplit, *, global_batch_size: int, buckets: tuple[int, ...],
                   seed: int, num_steps: int) -> batching.TrainIterator:
  """Batches of `global_batch_size` pairs, bucketed by pair length, reshuffled per epoch;
  this process's pairs of each global batch."""
  plan = batching.EpochPlan(split.lengths, global_batch_size=global_batch_size,
                            buckets=buckets, seed=seed)
  rows = batching.local_rows(global_batch_size, jax.process_index(), jax.process_count())

  def batch_at(step):
    length, pairs = plan(step)
    pairs = pairs[rows]
    return make_batch(split, pairs, length, np.ones(len(pairs), np.float32))

  identity = {"seed": seed, "global_batch_size": global_batch_size, "buckets": list(buckets),
              "num_pairs": len(split)}
  return batching.train_iterator(batch_at, num_steps=num_steps, identity=identity,
                                 steps_per_epoch=plan.steps_per_epoch)


def eval_batches(split: PreferenceSplit, *, global_batch_size: int, buckets: tuple[int, ...]):
  """Every pair once (filler pairs weigh 0): this process's pairs of each global batch."""
  for length, pairs, weights in batching.eval_plan(
      split.lengths, global_batch_size=global_batch_size, buckets=buckets,
      process_index=jax.process_index(), process_count=jax.process_count()):
    yield make_batch(split, pairs, length, weights)
