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
import functools
import json
import math
import pathlib
import re
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
from ftjax import feature_cache
from ftjax import logs, metrics, models, optim, sharding
from ftjax.data import pipeline, sources
from ftjax.models import keymap
from ftjax.errors import CheckpointError, FtjaxError
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
                     deterministic: bool, normalizer=None, frozen_encoder: bool = False):
  """Weighted mean cross-entropy (sum / `normalizer`) and (correct, weight) sums.

  A batch holds token ids, or, with cached features, the head's input. With
  `frozen_encoder` (head-only) the encoder runs in inference mode and only the
  head sees dropout: the function cached features compute, so caching them
  is an exact speed-up.
  """
  params = partition.merge(trainable, frozen)
  rngs = None if rng is None else nnx.Rngs(dropout=rng)
  if "features" in batch or frozen_encoder:
    features = batch["features"] if "features" in batch else model.apply(
        params, batch["input_ids"], batch["attention_mask"], method="features",
        **pipeline.token_types(batch))
    logits = model.apply(params, features, method="classify", deterministic=deterministic,
                         rngs=rngs)
  else:
    logits = model.apply(params, batch["input_ids"], batch["attention_mask"],
                         deterministic=deterministic, rngs=rngs,
                         **pipeline.token_types(batch)).logits
  logits = logits.astype(jnp.float32)
  weights = batch["weights"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  normalizer = weights.sum() if normalizer is None else normalizer
  loss = (ce * weights).sum() / jnp.maximum(normalizer, 1.0)
  correct = ((logits.argmax(-1) == batch["labels"]) * weights).sum()
  return loss, (correct, weights.sum(), logits)


def make_train_step(model: models.Model, optimizer: optax.GradientTransformation,
                    learning_rate: optax.Schedule, accumulation_steps: int, *,
                    frozen_encoder: bool = False) -> Callable:
  """The pure step `train_step(state, batch, rng) -> (state, metrics)`.

  Only `state.trainable` is differentiated: JAX does no backward work for a
  frozen prefix and forms no gradients for frozen weights. With accumulation,
  the global batch is scanned as micro-batches inside the step.
  """

  def grads_and_metrics(trainable, frozen, batch, rng):
    grad_fn = jax.value_and_grad(
        lambda t, b, r, n: loss_and_metrics(model, t, frozen, b, rng=r, deterministic=False,
                                            normalizer=n, frozen_encoder=frozen_encoder),
        has_aux=True)
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
    # No in-step NaN guard (a select over every parameter and moment costs a
    # full pass over the state each step): the host checks every step's loss
    # before anything is evaluated or saved, so a non-finite step never
    # reaches a checkpoint.
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
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
    return {"loss_sum": loss_sum, "predictions": logits.argmax(-1), "labels": batch["labels"],
            "weights": batch["weights"]}

  return eval_step


@dataclasses.dataclass
class Run:
  """Everything built once for a run (see the module docstring for the order)."""

  config: ml_collections.ConfigDict
  model: models.Model
  train_split: pipeline.TokenizedSplit
  eval_splits: dict[str, pipeline.TokenizedSplit]
  buckets: tuple[int, ...]
  steps: config_lib.Steps
  mesh: jax.sharding.Mesh
  # The state before the first step (the first train step donates its buffers).
  initial_state: TrainState
  optimizer: optax.GradientTransformation
  learning_rate: optax.Schedule
  pad_id: int
  # Split name -> (examples, embed) head inputs, when features are cached.
  features: dict[str, np.ndarray] | None = None

  def device_batch(self, split_name: str, batch: Mapping[str, np.ndarray]) -> dict:
    """A host batch of `split_name` -> global arrays on the mesh, as the steps take them."""
    if self.features is not None:
      batch = {"features": self.features[split_name][batch["index"]],
               "labels": batch["labels"], "weights": batch["weights"]}
    else:
      batch = {k: v for k, v in batch.items() if k != "index"}
    return sharding.put_batch(batch, sharding.batch_sharding(self.config, self.mesh))


def _load_split(config, split_name, tokenizer, num_labels):
  dataset = sources.load_split(config.data, split_name)
  return pipeline.tokenize_split(dataset, config.data, tokenizer, num_labels=num_labels)


def _check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  dp = sharding.data_parallel_size(config, mesh)
  multiple = dp * config.optimizer.accumulation_steps
  if config.training.batch_size % multiple:
    raise FtjaxError(
        f"training.batch_size={config.training.batch_size} is not a multiple of {multiple} "
        f"(data-parallel size {dp} of mesh {dict(mesh.shape)} x "
        f"optimizer.accumulation_steps={config.optimizer.accumulation_steps})")
  if config.eval.batch_size % dp:
    raise FtjaxError(f"eval.batch_size={config.eval.batch_size} is not a multiple of the "
                     f"data-parallel size {dp} of mesh {dict(mesh.shape)}")


def setup(config: ml_collections.ConfigDict, devices=None,
          feature_cache_dir: pathlib.Path | None = None) -> Run:
  """Steps 1-4 of a run: mesh, model (loaded sharded), partition, data, state.

  With `strategy.cache_features`, also the head's input features of every
  split (read from `feature_cache_dir` when there, else computed and saved).
  """
  config_lib.validate(config)
  mesh = sharding.make_mesh(config, devices)
  _check_batch_sizes(config, mesh)
  if config.data.source == "files":  # Fail on a missing file before loading any model.
    for split_name in (config.data.train_split, *config.eval.splits):
      sources.split_file(config.data.path, split_name)
  m = config.model
  loaded = models.load_pretrained(
      m.name_or_path, task=m.task, num_labels=m.num_labels, dtype=m.dtype, pooling=m.pooling,
      allow_pickle=m.allow_pickle, seed=config.seed,
      shardings=lambda model: sharding.param_shardings(config, mesh, model.abstract_params,
                                                       model.param_axes))
  model, params = loaded.model, loaded.params
  if model.config.task != "classification":
    raise FtjaxError(f"model.task={m.task!r}: training needs a classification head; "
                     f"set --config.model.task=classification")
  tokenizer = models.load_tokenizer(m.name_or_path)
  if config.strategy.name == "lora":
    s = config.strategy.lora
    spec = lora_lib.LoraSpec(rank=s.rank, alpha=s.alpha, dropout=s.dropout,
                             targets=tuple(s.targets))
    model, params = lora_lib.add_lora(model, params, spec, jax.random.key(config.seed + 1))

  new_paths = set(loaded.new_paths)
  if config.init_from:
    params, restored, reinitialised = init_from(config.init_from, model, params)
    new_paths = (new_paths - set(restored)) | set(reinitialised)
  # Parameters the checkpoint lacked (a pooler as well as the classifier, say)
  # are random: every strategy trains them.
  new_rules = [(re.escape(p), partition.TRAINABLE) for p in sorted(new_paths)]
  rules = new_rules + partition.strategy_rules(config.strategy,
                                               num_layers=model.config.num_layers)
  path_labels = partition.labels(list(model.param_axes), rules)

  num_labels = model.config.num_labels
  train_split = _load_split(config, config.data.train_split, tokenizer, num_labels)
  eval_splits = {name: _load_split(config, name, tokenizer, num_labels)
                 for name in config.eval.splits}
  buckets = pipeline.bucket_lengths(train_split.lengths, config.data)
  steps = config_lib.resolve_steps(config, int(pipeline.steps_per_epoch(
      train_split, global_batch_size=config.training.batch_size, buckets=buckets)))

  param_shardings = sharding.param_shardings(config, mesh, model.abstract_params,
                                             model.param_axes)
  params = jax.device_put(params, param_shardings)  # a no-op but for LoRA's adapters
  trainable, frozen = partition.split(params, path_labels)
  learning_rate = optim.schedule(config, total_steps=steps.total, warmup_steps=steps.warmup)
  optimizer = optim.build(config, trainable, learning_rate)
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
  run = Run(config=config, model=model, train_split=train_split, eval_splits=eval_splits,
            buckets=buckets, steps=steps, mesh=mesh, initial_state=state, optimizer=optimizer,
            learning_rate=learning_rate, pad_id=pad_id)
  if config.strategy.cache_features:
    run.features = _cached_features(run, path_labels, feature_cache_dir)
  return run


def _cached_features(run: Run, path_labels: Mapping[str, str],
                     cache_dir: pathlib.Path | None) -> dict[str, np.ndarray]:
  """Every split's head inputs (see `ftjax.feature_cache`)."""
  outside_head = [p for p, label in path_labels.items()
                  if label == partition.TRAINABLE and not p.startswith(partition.HEAD_PREFIXES)]
  if outside_head:
    raise FtjaxError(
        f"strategy.cache_features=True needs every parameter before the head frozen, but "
        f"{outside_head[0]!r} is trainable (new in the checkpoint, or by strategy.rules); "
        f"set --config.strategy.cache_features=False")
  state, out, hits = run.initial_state, {}, []
  splits = {run.config.data.train_split: run.train_split, **run.eval_splits}
  step = feature_cache.feature_step(run.model, state.trainable, state.frozen, config=run.config,
                                    mesh=run.mesh)
  for name, split in splits.items():
    key = feature_cache.cache_key(run.config, name, split)
    compute = functools.partial(
        feature_cache.features, step, state.trainable, state.frozen, split,
        config=run.config, mesh=run.mesh, buckets=run.buckets, pad_id=run.pad_id)
    out[name], hit = feature_cache.load_or_compute(cache_dir, key, compute)
    hits.append(f"{name} {'cached' if hit else 'computed'}")
  logging.info("head-only on cached features (%s); cache: %s", "; ".join(hits),
               cache_dir or "memory only")
  return out


def init_from(source: str, model: models.Model,
              params) -> tuple[dict, list[str], list[str]]:
  """Copies another run's fine-tuned (trainable) weights over `params`.

  The source is a workdir (its latest checkpoint) or a checkpoint folder.
  Leaves it does not hold (its frozen base, when it was a LoRA or freeze run)
  keep this run's base-model values; a head of another shape (another number
  of labels) keeps its fresh initialisation. Returns the params, the paths
  restored and the paths re-initialised; logs one line saying what came from
  where.
  """
  try:
    workdir, step = checkpoint_lib.find(source)
  except FileNotFoundError as e:
    raise FtjaxError(f"init_from={source!r}: no checkpoint at {e}; expected a training "
                     f"workdir or <workdir>/checkpoints/<step>") from None
  saved = checkpoint_lib.read_trainable(workdir, step)
  flat = keymap.flatten(params)
  restored, reinitialised, skipped = [], [], []
  for path, value in saved.items():
    if path not in flat:
      skipped.append(path)
    elif tuple(value.shape) == tuple(flat[path].shape):
      flat[path] = jax.device_put(value.astype(flat[path].dtype), flat[path].sharding)
      restored.append(path)
    elif path.startswith(partition.HEAD_PREFIXES):
      reinitialised.append(f"{path} {tuple(value.shape)}->{tuple(flat[path].shape)}")
    else:
      raise CheckpointError(
          f"init_from={source!r}: parameter {path!r} has shape {tuple(value.shape)} there but "
          f"{tuple(flat[path].shape)} in this model; is it another architecture?")
  if not restored:
    raise CheckpointError(f"init_from={source!r}: none of its {len(saved)} parameters fit this "
                          f"model; is it another architecture?")
  logging.info("init_from %s (step %d): restored %d parameters; re-initialised: %s; not in "
               "this model: %s", workdir, step, len(restored), ", ".join(reinitialised) or "none",
               ", ".join(skipped) or "none")
  return (keymap.unflatten(flat, model.abstract_params), restored,
          [r.split(" ")[0] for r in reinitialised])


def compile_steps(run: Run) -> tuple[Callable, Callable]:
  """The jitted train and eval steps, with explicit shardings; state is donated."""
  state_sharding = jax.tree.map(lambda x: x.sharding, run.initial_state)
  batch_sharding = sharding.batch_sharding(run.config, run.mesh)
  replicated = sharding.replicated(run.mesh)
  train_step = jax.jit(
      make_train_step(run.model, run.optimizer, run.learning_rate,
                      run.config.optimizer.accumulation_steps,
                      frozen_encoder=run.config.strategy.name == "head_only"),
      in_shardings=(state_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(run.model),
                      in_shardings=(state_sharding.trainable, state_sharding.frozen,
                                    batch_sharding), out_shardings=replicated)
  return train_step, eval_step


def partition_summary(run: Run) -> dict:
  state = run.initial_state
  trainable, frozen = partition.count(state.trainable), partition.count(state.frozen)
  total = trainable + frozen
  logging.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
               100 * trainable / total)
  return {"params/trainable": trainable, "params/total": total,
          "params/trainable_fraction": trainable / total,
          "optimizer/state_bytes": optim.state_bytes(state.opt_state)}


def evaluate(run: Run, state: TrainState, eval_step, split_name: str) -> dict[str, float]:
  """Metrics on a whole split: every example once (padding rows weigh 0).

  Batches are dispatched back to back; results come to the host once, at
  the end (replicated outputs, so this is multi-host safe).
  """
  outputs = []
  for batch in pipeline.eval_batches(run.eval_splits[split_name],
                                     global_batch_size=run.config.eval.batch_size,
                                     buckets=run.buckets, process_index=jax.process_index(),
                                     process_count=jax.process_count(), pad_id=run.pad_id):
    outputs.append(eval_step(state.trainable, state.frozen, run.device_batch(split_name, batch)))
  outputs = jax.device_get(outputs)
  real = np.concatenate([o["weights"] for o in outputs]) > 0
  predictions = np.concatenate([o["predictions"] for o in outputs])[real]
  labels = np.concatenate([o["labels"] for o in outputs])[real]
  loss_sum = float(sum(o["loss_sum"] for o in outputs))
  return metrics.classification(predictions, labels, loss_sum, run.model.config.num_labels)


def _fingerprint(batch: Mapping[str, np.ndarray]) -> int:
  """A checksum of the token ids this process fed, to compare data order across runs."""
  return zlib.crc32(np.ascontiguousarray(batch["input_ids"]).tobytes())


class _Tracker:
  """Best value of `eval.metric`, its step and metrics, and evaluations since."""

  def __init__(self, config, saved: dict | None = None):
    self.metric, self.mode = config.eval.metric, config.eval.mode
    self.patience = config.eval.early_stopping_patience
    saved = saved or {}
    self.best, self.best_step = saved.get("best"), saved.get("best_step")
    self.best_results, self.stale = saved.get("best_results", {}), saved.get("stale", 0)

  def update(self, step: int, results: Mapping[str, float]) -> bool:
    """Records an evaluation; True if it is the best so far."""
    value = results[self.metric]
    better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
    if better:
      self.best, self.best_step, self.best_results, self.stale = value, step, dict(results), 0
    else:
      self.stale += 1
    return better

  @property
  def should_stop(self) -> bool:
    return bool(self.patience) and self.stale >= self.patience

  def state(self) -> dict:
    return {"best": self.best, "best_step": self.best_step, "best_results": self.best_results,
            "stale": self.stale}


def _run_identity(config: ml_collections.ConfigDict) -> dict:
  """What a checkpoint must agree on to be resumed by this config."""
  return {"model.name_or_path": config.model.name_or_path, "model.task": config.model.task,
          "model.num_labels": config.model.num_labels, "model.pooling": config.model.pooling,
          "strategy": json.loads(config.strategy.to_json_best_effort()),
          "training.batch_size": config.training.batch_size, "seed": config.seed,
          "init_from": config.init_from}


def _check_identity(saved: dict, config: ml_collections.ConfigDict, where) -> None:
  for key, value in _run_identity(config).items():
    if saved.get(key) != value:
      raise CheckpointError(
          f"{where} holds a checkpoint of another run ({key} was {saved.get(key)!r}, the config "
          f"says {value!r}); use a new --workdir, or the old config to resume")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, stop_at_step: int | None = None, devices=None) -> dict[str, Any]:
  """Fine-tunes as the config says; returns the final evaluation metrics.

  `stop_at_step` ends this invocation (with a checkpoint) once that step is
  reached; running the same command again continues the run. A finished run
  is not trained again.
  """
  started = time.perf_counter()
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  run = setup(config, devices, feature_cache_dir=workdir_path / "feature_cache")
  summary = partition_summary(run)
  steps = run.steps
  logging.info("steps: %s; buckets: %s; mesh: %s", steps, run.buckets, dict(run.mesh.shape))

  # The run's key: folded with the step inside train_step, never advanced, so
  # the seed alone reproduces it on resume.
  rng = jax.random.key(config.seed)
  state = run.initial_state
  checkpointer = checkpoint_lib.Checkpointer(workdir_path, config)
  tracker, last_eval = _Tracker(config), {}
  start = checkpointer.latest_step()
  iterator = pipeline.train_iterator(
      run.train_split, global_batch_size=config.training.batch_size, buckets=run.buckets,
      seed=config.seed, num_epochs=math.ceil(steps.total / steps.steps_per_epoch),
      process_index=jax.process_index(), process_count=jax.process_count(), pad_id=run.pad_id)
  if start is not None:
    # Resume order: (1) check the checkpoint belongs to this config; (2) the
    # trainable params, optimizer state and step from the latest complete
    # checkpoint; (3) frozen params from the base model (already loaded);
    # (4) the data iterator's position; (5) evaluation bookkeeping.
    _check_identity(checkpointer.read_meta(start)["run"], config,
                    checkpointer.directory / str(start))
    saved, meta = checkpointer.restore(start, checkpoint_lib.abstract(
        {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}))
    state = state.replace(**saved)
    iterator.set_state(meta["data_iterator"])
    tracker, last_eval = _Tracker(config, meta["tracker"]), meta["last_eval"]
    logging.info("Resumed from %s at step %d", checkpointer.directory / str(start), start)
  elif is_chief:
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  step = int(state.step)
  if step >= steps.total or tracker.should_stop or (stop_at_step or math.inf) <= step:
    logging.info("Nothing to train: the checkpoint is at step %d of %d%s", step, steps.total,
                 " (early-stopped)" if tracker.should_stop else "")
    checkpointer.close()
    return last_eval

  writer = logs.MetricWriter(workdir_path, resume_step=start)
  if start is None:
    writer.write(0, summary)
  train_step, eval_step = compile_steps(run)

  def save(step: int, eval_results: dict | None) -> None:
    meta = {"data_iterator": iterator.get_state(), "run": _run_identity(config),
            "base_model": config.model.name_or_path, "strategy": config.strategy.name,
            "tracker": tracker.state(), "last_eval": last_eval}
    checkpointer.save(step, {"step": state.step, "trainable": state.trainable,
                             "opt_state": state.opt_state}, meta, metrics=eval_results)

  def run_evals(step: int) -> dict:
    results = {f"{name}/{key}": value for name in config.eval.splits
               for key, value in evaluate(run, state, eval_step, name).items()}
    writer.write(step, results)
    return results

  window: list[dict] = []
  pending = None  # (step, metrics) of the step in flight: read one step late
  progress = tqdm.tqdm(total=steps.total, initial=step, desc="train", unit="step",
                       disable=not is_chief, dynamic_ncols=True)
  window_start, window_examples = time.perf_counter(), 0
  try:
    while step < steps.total:
      batch = next(iterator)
      state, step_metrics = train_step(state, run.device_batch(config.data.train_split, batch),
                                       rng)
      step += 1
      window_examples += config.training.batch_size
      progress.update(1)
      if pending is not None:
        window.append(_host_metrics(*pending))
      pending = (step, step_metrics)

      at_end = step == steps.total
      stop_now = stop_at_step is not None and step >= stop_at_step
      log_now = step % config.training.log_every_steps == 0 or at_end
      eval_now = bool(config.eval.splits) and (step % steps.eval_every == 0 or at_end)
      save_now = step % steps.checkpoint_every == 0 or at_end or stop_now
      if not (log_now or eval_now or save_now):
        continue
      # Sync with this step before anything is logged, evaluated or saved: a
      # non-finite step stops the run here, before it reaches a checkpoint.
      window.append(_host_metrics(*pending))
      pending = None
      if log_now:
        elapsed = time.perf_counter() - window_start
        row = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]}
        row["train/data_fingerprint"] = _fingerprint(batch)
        row["train/examples_per_second"] = window_examples / elapsed
        row["train/seconds_per_step"] = elapsed / len(window)
        row["train/epoch"] = step / steps.steps_per_epoch
        writer.write(step, row)
        progress.set_postfix(loss=f"{row['train/loss']:.4f}",
                             ex_per_s=f"{row['train/examples_per_second']:.0f}")
        window, window_examples, window_start = [], 0, time.perf_counter()
      eval_results = None
      if eval_now:
        eval_results = last_eval = run_evals(step)
        if tracker.update(step, eval_results) and config.checkpoint.keep_best:
          save_now = True
      if save_now or tracker.should_stop:
        save(step, eval_results)
      if tracker.should_stop:
        logging.info("Early stopping at step %d: %s has not improved for %d evaluations "
                     "(best %.4f at step %d)", step, tracker.metric, tracker.stale,
                     tracker.best, tracker.best_step)
        break
      if stop_now:
        logging.info("Stopping at step %d as asked; run the same command to continue", step)
        break
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  if is_chief and (step == steps.total or tracker.should_stop):
    seconds_per_step = [r["train/seconds_per_step"] for r in logs.read_metrics(workdir_path)
                        if "train/seconds_per_step" in r]
    (workdir_path / "results.json").write_text(json.dumps(
        {"step": step, **summary, **last_eval,
         "best": {"metric": tracker.metric, "value": tracker.best, "step": tracker.best_step,
                  **tracker.best_results},
         # Median over log windows: compiles and evaluations fall in a few of them.
         "train/median_seconds_per_step": float(np.median(seconds_per_step)),
         "wall_seconds": time.perf_counter() - started}, indent=2) + "\n")
  return last_eval


def _host_metrics(step: int, step_metrics: dict) -> dict:
  """One device->host transfer of a step's metrics; stops on a non-finite loss."""
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  if not math.isfinite(values["loss"]) or not math.isfinite(values["grad_norm"]):
    raise FtjaxError(
        f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}; training "
        f"stopped and the latest checkpoint is from before it. Lower "
        f"optimizer.learning_rate or check the data")
  return values
