"""Fine-tuning: `train_and_evaluate(config, workdir)`.

Order of a run:
  1. Load the pretrained model and tokenizer; add LoRA adapters if asked.
  2. Label every parameter trainable/frozen (`ftjax.peft.partition`).
  3. Tokenise the splits; fix the bucket lengths; resolve durations to steps.
  4. Build the mesh; place parameters straight into their shardings; build
     the optimizer for the trainable side only.
  5. Resume: if `workdir/checkpoints` has a complete checkpoint, restore the
     trainable parameters, optimizer state, step, RNG and data-iterator state
     from the latest one (frozen parameters come from the base model).
  6. Loop: one jitted `train_step` per global batch; log, evaluate,
     checkpoint and early-stop on the cadences of the config.
"""

import dataclasses
import json
import math
import pathlib
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax import nnx

from ftjax import checkpoint as checkpoint_lib
from ftjax import config as config_lib
from ftjax import logs, metrics, models, optim, sharding
from ftjax.data import pipeline, sources
from ftjax.errors import FtjaxError
from ftjax.peft import lora as lora_lib
from ftjax.peft import partition

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any


def loss_and_metrics(model: models.Model, trainable, frozen, batch: Batch, *, rng=None,
                     deterministic: bool, normalizer=None):
  """Weighted mean cross-entropy (sum / `normalizer`) and (correct, weight) sums."""
  params = partition.merge(trainable, frozen)
  out = model.apply(params, batch["input_ids"], batch["attention_mask"],
                    batch.get("token_type_ids"), deterministic=deterministic,
                    rngs=None if rng is None else nnx.Rngs(dropout=rng))
  logits = out.logits.astype(jnp.float32)
  weights = batch["weights"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  normalizer = weights.sum() if normalizer is None else normalizer
  loss = (ce * weights).sum() / jnp.maximum(normalizer, 1.0)
  correct = ((logits.argmax(-1) == batch["labels"]) * weights).sum()
  return loss, (correct, weights.sum(), logits)


def make_train_step(model: models.Model, optimizer: optax.GradientTransformation,
                    learning_rate: optax.Schedule, accumulation_steps: int) -> Callable:
  """The pure step `train_step(state, batch, rng) -> (state, metrics)`.

  Only `state.trainable` is differentiated: JAX does no backward work for a
  frozen prefix and forms no gradients for frozen weights. With accumulation,
  the global batch is scanned as micro-batches inside the step.
  """

  def grads_and_metrics(trainable, frozen, batch, rng):
    grad_fn = jax.value_and_grad(
        lambda t, b, r, n: loss_and_metrics(model, t, frozen, b, rng=r, deterministic=False,
                                            normalizer=n), has_aux=True)
    total_weight = batch["weights"].sum()
    if accumulation_steps == 1:
      (loss, (correct, weight, _)), grads = grad_fn(trainable, batch, rng, total_weight)
      return loss, correct, weight, grads

    # (B, ...) -> (accum, B / accum, ...) keeping each device's rows together.
    def to_micro(x):
      return x.reshape(x.shape[0] // accumulation_steps, accumulation_steps,
                       *x.shape[1:]).swapaxes(0, 1)

    micro_batches = jax.tree.map(to_micro, batch)

    def body(carry, inputs):
      micro_batch, index = inputs
      (loss, (correct, weight, _)), grads = grad_fn(
          trainable, micro_batch, jax.random.fold_in(rng, index), total_weight)
      acc_grads, acc_loss, acc_correct, acc_weight = carry
      return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss, acc_correct + correct,
              acc_weight + weight), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
    (grads, loss, correct, weight), _ = jax.lax.scan(
        body, init, (micro_batches, jnp.arange(accumulation_steps)))
    return loss, correct, weight, grads

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    loss, correct, weight, grads = grads_and_metrics(state.trainable, state.frozen, batch,
                                                     step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.global_norm(grads)
    # A non-finite step changes nothing, so the state (and any checkpoint
    # written from it) stays the last good one; the host stops the run.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = state.replace(
        step=state.step + 1,
        trainable=jax.tree.map(keep, trainable, state.trainable),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state))
    step_metrics = {
        "loss": loss,
        "accuracy": correct / jnp.maximum(weight, 1.0),
        "learning_rate": learning_rate(state.step),
        "grad_norm": grad_norm,
        "update_norm": optax.global_norm(updates),
    }
    return new_state, step_metrics

  return train_step


def make_eval_step(model: models.Model) -> Callable:

  def eval_step(trainable, frozen, batch: Batch):
    loss_sum, (_, _, logits) = loss_and_metrics(model, trainable, frozen, batch,
                                                deterministic=True, normalizer=1.0)
    return {"loss_sum": loss_sum, "predictions": logits.argmax(-1)}

  return eval_step


@dataclasses.dataclass
class Run:
  """Everything built once for a run (see the module docstring for the order)."""

  config: ml_collections.ConfigDict
  model: models.Model
  path_labels: dict[str, str]
  train_split: pipeline.TokenizedSplit
  eval_splits: dict[str, pipeline.TokenizedSplit]
  buckets: tuple[int, ...]
  steps: config_lib.Steps
  mesh: jax.sharding.Mesh
  state: TrainState
  optimizer: optax.GradientTransformation
  learning_rate: optax.Schedule
  pad_id: int


def _load_split(config, split_name, tokenizer, num_labels):
  dataset = sources.load_split(config.data, split_name)
  return pipeline.tokenize_split(dataset, config.data, tokenizer, num_labels=num_labels)


def setup(config: ml_collections.ConfigDict, devices=None) -> Run:
  """Steps 1-4 of a run: model, partition, data, mesh, sharded state."""
  m = config.model
  model, params = models.from_pretrained(
      m.name_or_path, task=m.task, num_labels=m.num_labels, dtype=m.dtype, pooling=m.pooling,
      allow_pickle=m.allow_pickle, seed=config.seed)
  if model.config.task != "classification":
    raise FtjaxError(f"model.task={m.task!r}: training needs a classification head; "
                     f"set --config.model.task=classification")
  tokenizer = models.load_tokenizer(m.name_or_path)
  if config.strategy.name == "lora":
    s = config.strategy.lora
    spec = lora_lib.LoraSpec(rank=s.rank, alpha=s.alpha, dropout=s.dropout,
                             targets=tuple(s.targets))
    model, params = lora_lib.add_lora(model, params, spec, jax.random.key(config.seed + 1))

  rules = partition.strategy_rules(config.strategy, num_layers=model.config.num_layers)
  path_labels = partition.labels(list(model.param_axes), rules)

  num_labels = model.config.num_labels
  train_split = _load_split(config, config.data.train_split, tokenizer, num_labels)
  eval_splits = {name: _load_split(config, name, tokenizer, num_labels)
                 for name in config.eval.splits}
  buckets = pipeline.bucket_lengths(train_split.lengths, config.data)
  steps = config_lib.resolve_steps(config, int(pipeline.steps_per_epoch(
      train_split, global_batch_size=config.training.batch_size, buckets=buckets)))

  mesh = sharding.make_mesh(config, devices)
  dp = sharding.data_parallel_size(config, mesh)
  for key in ("training.batch_size", "eval.batch_size"):
    size = config.training.batch_size if key.startswith("training") else config.eval.batch_size
    per_micro = size // config.optimizer.accumulation_steps if key.startswith("training") else size
    if per_micro % dp:
      raise FtjaxError(f"{key}={size} is not divisible by the data-parallel size {dp} "
                       f"(mesh {dict(mesh.shape)}); expected a multiple of {dp}")
  param_shardings = sharding.param_shardings(config, mesh, model.abstract_params,
                                             model.param_axes)
  params = jax.device_put(params, param_shardings)
  trainable, frozen = partition.split(params, path_labels)
  learning_rate = optim.schedule(config, total_steps=steps.total, warmup_steps=steps.warmup)
  optimizer = optim.build(config, trainable, total_steps=steps.total, warmup_steps=steps.warmup)
  # Moments take their parameter's sharding; counters are replicated.
  opt_sharding = optax.tree_map_params(
      optimizer, lambda _, param_sharding: param_sharding,
      jax.eval_shape(optimizer.init, trainable),
      jax.tree.map(lambda x: x.sharding, trainable),
      transform_non_params=lambda _: sharding.replicated(mesh))
  opt_state = jax.jit(optimizer.init, out_shardings=opt_sharding)(trainable)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  state = TrainState(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return Run(config=config, model=model, path_labels=path_labels, train_split=train_split,
             eval_splits=eval_splits, buckets=buckets, steps=steps, mesh=mesh, state=state,
             optimizer=optimizer, learning_rate=learning_rate, pad_id=pad_id)


def compile_steps(run: Run) -> tuple[Callable, Callable]:
  """The jitted train and eval steps, with explicit shardings; state is donated."""
  state_sharding = jax.tree.map(lambda x: x.sharding, run.state)
  batch_sharding = sharding.batch_sharding(run.config, run.mesh)
  replicated = sharding.replicated(run.mesh)
  train_step = jax.jit(
      make_train_step(run.model, run.optimizer, run.learning_rate,
                      run.config.optimizer.accumulation_steps),
      in_shardings=(state_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(run.model),
                      in_shardings=(state_sharding.trainable, state_sharding.frozen,
                                    batch_sharding), out_shardings=replicated)
  return train_step, eval_step


def log_partition(run: Run) -> dict:
  trainable, frozen = partition.count(run.state.trainable), partition.count(run.state.frozen)
  total = trainable + frozen
  summary = {"params/trainable": trainable, "params/total": total,
             "params/trainable_fraction": trainable / total,
             "optimizer/state_bytes": optim.state_bytes(run.state.opt_state)}
  logging.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
               100 * trainable / total)
  return summary


def evaluate(run: Run, state: TrainState, eval_step, split_name: str) -> dict[str, float]:
  """Metrics on a whole split: every example once (padding rows weigh 0)."""
  split = run.eval_splits[split_name]
  batch_sharding = sharding.batch_sharding(run.config, run.mesh)
  predictions, labels, loss_sum = [], [], 0.0
  for batch in pipeline.eval_batches(split, global_batch_size=run.config.eval.batch_size,
                                     buckets=run.buckets, process_index=jax.process_index(),
                                     process_count=jax.process_count(), pad_id=run.pad_id):
    global_batch = sharding.put_batch(batch, batch_sharding)
    out = eval_step(state.trainable, state.frozen, global_batch)
    real = _gather(global_batch["weights"]) > 0
    predictions.append(np.asarray(out["predictions"])[real])
    labels.append(_gather(global_batch["labels"])[real])
    loss_sum += float(out["loss_sum"])
  return metrics.classification(np.concatenate(predictions), np.concatenate(labels), loss_sum,
                                run.model.config.num_labels)


def _gather(x: jax.Array) -> np.ndarray:
  """A global array's full value on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _fingerprint(batch: Mapping[str, np.ndarray]) -> int:
  """A checksum of the token ids this process fed, to compare data order across runs."""
  return zlib.crc32(np.ascontiguousarray(batch["input_ids"]).tobytes())


class _Tracker:
  """Best value of `eval.metric` and evaluations since it improved."""

  def __init__(self, config, best=None, stale=0):
    self.metric, self.mode = config.eval.metric, config.eval.mode
    self.patience = config.eval.early_stopping_patience
    self.best, self.stale = best, stale

  def update(self, results: Mapping[str, float]) -> None:
    if self.metric not in results:
      raise FtjaxError(f"eval.metric={self.metric!r} is not computed; expected one of "
                       f"{sorted(results)}")
    value = results[self.metric]
    better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
    self.best, self.stale = (value, 0) if better else (self.best, self.stale + 1)

  @property
  def should_stop(self) -> bool:
    return bool(self.patience) and self.stale >= self.patience


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, stop_at_step: int | None = None, devices=None) -> dict[str, Any]:
  """Fine-tunes as the config says; returns the final evaluation metrics.

  `stop_at_step` ends this invocation (with a checkpoint) once that step is
  reached; running the same command again continues the run.
  """
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  run = setup(config, devices)
  summary = log_partition(run)
  steps = run.steps
  logging.info("steps: %s; buckets: %s; mesh: %s", steps, run.buckets, dict(run.mesh.shape))

  rng = jax.random.key(config.seed)
  state = run.state
  checkpointer = checkpoint_lib.Checkpointer(workdir_path, config)
  data_state, tracker = None, _Tracker(config)
  start = checkpointer.latest_step()
  if start is not None:
    # Resume order: (1) trainable params, optimizer state, step and RNG from
    # the latest complete checkpoint; (2) frozen params from the base model;
    # (3) the data iterator's position; (4) early-stopping bookkeeping.
    saved, meta = checkpointer.restore(start, checkpoint_lib.abstract(
        {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
         "rng": jax.random.key_data(rng)}))
    state = state.replace(step=saved["step"], trainable=saved["trainable"],
                          opt_state=saved["opt_state"])
    rng = jax.random.wrap_key_data(saved["rng"])
    data_state = meta["data_iterator"]
    tracker = _Tracker(config, meta["tracker"]["best"], meta["tracker"]["stale"])
    logging.info("Resumed from %s at step %d", checkpointer.directory / str(start), start)
  else:
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  writer = logs.MetricWriter(workdir_path)
  if start is None:
    writer.write(0, summary)
  train_step, eval_step = compile_steps(run)
  batch_sharding = sharding.batch_sharding(config, run.mesh)

  num_epochs = math.ceil(steps.total / steps.steps_per_epoch)
  iterator = pipeline.train_iterator(
      run.train_split, global_batch_size=config.training.batch_size, buckets=run.buckets,
      seed=config.seed, num_epochs=num_epochs, process_index=jax.process_index(),
      process_count=jax.process_count(), pad_id=run.pad_id)
  if data_state is not None:
    iterator.set_state(data_state)

  def save(step: int, eval_results: dict | None) -> None:
    meta = {"data_iterator": iterator.get_state(), "base_model": config.model.name_or_path,
            "strategy": config.strategy.name,
            "tracker": {"best": tracker.best, "stale": tracker.stale}}
    checkpointer.save(step, {"step": state.step, "trainable": state.trainable,
                             "opt_state": state.opt_state, "rng": jax.random.key_data(rng)},
                      meta, metrics=eval_results)

  def run_evals(step: int) -> dict:
    results = {}
    for name in config.eval.splits:
      for key, value in evaluate(run, state, eval_step, name).items():
        results[f"{name}/{key}"] = value
    writer.write(step, results)
    return results

  step = int(state.step)
  last_eval: dict = {}
  window: list[dict] = []
  pending = None  # (step, metrics) of the step in flight: read one step late
  progress = tqdm.tqdm(total=steps.total, initial=step, desc="train", unit="step",
                       disable=jax.process_index() != 0, dynamic_ncols=True)
  window_start = time.perf_counter()
  window_examples = 0
  try:
    while step < steps.total:
      batch = next(iterator)
      fingerprint = _fingerprint(batch)
      state, step_metrics = train_step(state, sharding.put_batch(batch, batch_sharding), rng)
      step += 1
      window_examples += config.training.batch_size
      if pending is not None:
        window.append(_check_finite(*pending))
      pending = (step, {**step_metrics, "data/fingerprint": fingerprint})
      progress.update(1)

      if step % config.training.log_every_steps == 0 or step == steps.total:
        window.append(_check_finite(*pending))
        pending = None
        elapsed = time.perf_counter() - window_start
        row = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]
               if k != "data/fingerprint"}
        row["train/data_fingerprint"] = window[-1]["data/fingerprint"]
        row["train/examples_per_second"] = window_examples / elapsed
        row["train/seconds_per_step"] = elapsed / len(window)
        row["train/epoch"] = step / steps.steps_per_epoch
        writer.write(step, row)
        progress.set_postfix(loss=f"{row['train/loss']:.4f}",
                             ex_per_s=f"{row['train/examples_per_second']:.0f}")
        window, window_examples, window_start = [], 0, time.perf_counter()

      at_end = step == steps.total
      eval_results = None
      if step % steps.eval_every == 0 or at_end:
        eval_results = last_eval = run_evals(step)
        tracker.update(eval_results)
      stopping = tracker.should_stop or (stop_at_step is not None and step >= stop_at_step)
      if step % steps.checkpoint_every == 0 or at_end or stopping:
        save(step, eval_results)
      if tracker.should_stop:
        logging.info("Early stopping at step %d: %s has not improved for %d evaluations "
                     "(best %.4f)", step, tracker.metric, tracker.stale, tracker.best)
        break
      if stopping:
        logging.info("Stopping at step %d as asked; run the same command to continue", step)
        break
    if pending is not None:
      _check_finite(*pending)
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  if step == steps.total or tracker.should_stop:
    (workdir_path / "results.json").write_text(json.dumps(
        {"step": step, **summary, **last_eval, "best": {tracker.metric: tracker.best}},
        indent=2) + "\n")
  return last_eval


def _check_finite(step: int, step_metrics: dict) -> dict:
  values = {k: v if isinstance(v, int) else float(v) for k, v in step_metrics.items()}
  if not math.isfinite(values["loss"]) or not math.isfinite(values["grad_norm"]):
    raise FtjaxError(
        f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}; training "
        f"stopped with the last good state. Lower optimizer.learning_rate or check the data")
  return values
