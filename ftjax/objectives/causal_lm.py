"""Instruction tuning of a decoder: next-token loss on response tokens only.

Batches (`ftjax.data.instruct`): `input_ids`, `segment_ids` and `positions`
(packing keeps examples apart), `targets`, `target_weights` (the loss mask:
response tokens and EOS), `task_ids` (the mixture's task of each token). The
loss is averaged over response tokens; sums are kept per task, so a mixture
logs and evaluates each task's loss and perplexity. With
`eval.generate_examples`, each evaluation also generates greedy answers for
exact match of the final answer (`eval.answer_regex`).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ftjax import generate as generate_lib
from ftjax import metrics
from ftjax.data import instruct, pipeline
from ftjax.objectives import base
from ftjax.objectives.classification import cross_entropy


class CausalLM(base.Objective):
  name = "causal_lm"
  head = "causal_lm"
  metrics = ("loss", "accuracy", "perplexity", "exact_match")

  @staticmethod
  def batch_spec(batch_size: int, length: int) -> dict:
    """The arrays of a (packed or bucketed) instruction batch: all (batch, length)."""
    dtypes = {"input_ids": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
              "targets": jnp.int32, "target_weights": jnp.float32, "task_ids": jnp.int32}
    return {k: jax.ShapeDtypeStruct((batch_size, length), d) for k, d in dtypes.items()}

  def build_data(self, model, tokenizer) -> base.Data:
    c = self.config
    train_split = instruct.load_split(c.data, c.data.train_split, tokenizer)
    eval_splits = {name: instruct.load_split(c.data, name, tokenizer,
                                             max_examples=c.eval.max_examples)
                   for name in c.eval.splits}
    buckets = ((c.data.max_length,) if c.data.packing
               else pipeline.bucket_lengths(train_split.lengths, c.data))
    plan = instruct.train_plan(train_split, c.data, global_batch_size=c.training.batch_size,
                               buckets=buckets, seed=c.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
    self.task_names = train_split.task_names
    self.tokenizer = tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def eval_batches(split_name):
      return instruct.eval_batches(
          eval_splits[split_name], global_batch_size=c.eval.batch_size, buckets=buckets,
          process_index=jax.process_index(), process_count=jax.process_count())

    return base.Data(
        train_split=train_split, eval_splits=eval_splits, buckets=buckets,
        steps_per_epoch=int(plan.steps_per_epoch), pad_id=pad_id,
        train_iterator=lambda num_steps: instruct.train_iterator(plan, num_steps=num_steps,
                                                                 data_config=c.data),
        eval_batches=eval_batches, extras={"plan": plan})

  @property
  def num_tasks(self) -> int:
    return max(len(self.task_names), 1)

  def normalizer(self, batch):
    return batch["target_weights"].sum()

  def forward(self, model, params, batch, *, rng, deterministic):
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    return model.apply(params, batch["input_ids"], segment_ids_bt=batch["segment_ids"],
                       positions_bt=batch["positions"], deterministic=deterministic, rngs=rngs)

  def logit_weights(self, batch):
    return batch["target_weights"]

  def token_weights(self, batch):
    return batch["target_weights"]

  def _loss_sums(self, model, params, batch, *, rng, deterministic, normalizer):
    logits = self.forward(model, params, batch, rng=rng, deterministic=deterministic).logits
    return self.hard_loss(logits, batch, normalizer)

  def hard_loss(self, logits, batch, normalizer):
    weights = batch["target_weights"]
    loss, sums, ce = cross_entropy(logits, batch["targets"], weights, normalizer)
    task_bt = jax.nn.one_hot(batch["task_ids"], self.num_tasks, dtype=jnp.float32)
    sums["task_loss_sum"] = jnp.einsum("bl,blt->t", ce, task_bt)
    sums["task_tokens"] = jnp.einsum("bl,blt->t", weights, task_bt)
    return loss, sums

  def loss(self, model, params, objective_params, refs, batch, *, rng, deterministic,
           normalizer):
    del objective_params, refs
    return self._loss_sums(model, params, batch, rng=rng, deterministic=deterministic,
                           normalizer=normalizer)

  def step_metrics(self, sums):
    return {**super().step_metrics(sums), "task_loss_sum": sums["task_loss_sum"],
            "task_tokens": sums["task_tokens"]}

  def log_metrics(self, window):
    if len(self.task_names) < 2:
      return {}
    row = {}
    loss_sums = np.sum([m["task_loss_sum"] for m in window], axis=0)
    tokens = np.sum([m["task_tokens"] for m in window], axis=0)
    for task, loss_sum, count in zip(self.task_names, loss_sums, tokens):
      row[f"{task}/tokens"] = float(count)
      if count:
        row[f"{task}/loss"] = float(loss_sum / count)
    return row

  def eval_outputs(self, model, params, objective_params, refs, batch):
    del objective_params, refs
    loss_sum, sums = self._loss_sums(model, params, batch, rng=None, deterministic=True,
                                     normalizer=1.0)
    return {"loss_sum": loss_sum, **sums}

  def eval_metrics(self, outputs):
    sums = {key: np.sum([o[key] for o in outputs], axis=0) for key in outputs[0]}
    return metrics.language_model(sums, self.task_names)

  def extra_eval(self, run, state, split_name, step):
    if not self.config.eval.generate_examples:
      return {}
    if jax.process_count() > 1:
      logging.warning("eval.generate_examples: generation-based evaluation runs in "
                      "single-process runs only; skipped")
      return {}
    results, records = generation_eval(run, state, split_name, step)
    shown = round_robin(records)[:self.config.eval.num_samples]
    for record in shown:
      logging.info("sample (step %d, %s, %s): %r -> %r (reference %r)", step, split_name,
                   record["task"], record["prompt"][-200:], record["prediction"][:300],
                   record["reference"][:300])
    if run.workdir is not None and jax.process_index() == 0:
      with open(run.workdir / "samples.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in shown)
    return results


def round_robin(records: list[dict]) -> list[dict]:
  """Records reordered task by task in turn (the first of each task, then the second, ...).

  Grouped by the exact task name, so tasks named `math` and `math_hard` stay apart.
  """
  rank: dict[str, int] = {}
  keyed = []
  for i, record in enumerate(records):
    k = rank.get(record["task"], 0)
    rank[record["task"]] = k + 1
    keyed.append((k, i))
  return [records[i] for _, i in sorted(keyed)]


def generation_eval(run, state, split_name: str,
                    step: int) -> tuple[dict[str, float], list[dict]]:
  """Greedy answers to the first `eval.generate_examples` prompts of each task.

  Exact match compares the final answers (`eval.answer_regex`, e.g. GSM8K's
  "#### 72") of prediction and reference. Prompts are left-padded to one
  length and batched by `eval.batch_size`, so every evaluation reuses one
  compiled generation program. Returns the metrics and one record per
  generated example (prompt, reference, prediction, match).
  """
  c = run.config.eval
  split = run.eval_splits[split_name]
  params = run.model_params(state)
  tokenizer = run.objective.tokenizer
  chosen = [i for t in range(len(split.task_names))
            for i in split.task_members(t)[:c.generate_examples]]
  prompts = [split.input_ids[i][:split.prompt_lengths[i]] for i in chosen]
  width = max(len(p) for p in prompts)
  ids_bt = np.full((len(prompts), width), run.pad_id, np.int32)
  mask_bt = np.zeros((len(prompts), width), np.int32)
  for r, prompt in enumerate(prompts):
    ids_bt[r, width - len(prompt):], mask_bt[r, width - len(prompt):] = prompt, 1
  predictions = []
  for start in range(0, len(prompts), c.batch_size):
    rows = np.arange(start, start + c.batch_size) % len(prompts)  # fill the last batch
    out = generate_lib.generate(run.model, params, ids_bt[rows], attention_mask=mask_bt[rows],
                                max_new_tokens=c.max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=run.pad_id)
    predictions += [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
  records, per_task = [], {name: [] for name in split.task_names}
  for i, prediction in zip(chosen, predictions):
    task = split.task_names[split.task_ids[i]]
    match = (instruct.extract_answer(prediction, c.answer_regex)
             == instruct.extract_answer(split.references[i], c.answer_regex))
    per_task[task].append(match)
    records.append({"step": step, "split": split_name, "task": task,
                    "prompt": split.prompts[i], "reference": split.references[i],
                    "prediction": prediction, "exact_match": bool(match)})
  results = {"exact_match": float(np.mean([r["exact_match"] for r in records]))}
  if len(split.task_names) > 1:
    results.update({f"{task}/exact_match": float(np.mean(v)) for task, v in per_task.items()})
  return results, records
