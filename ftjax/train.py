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
import signal
import threading
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
from ftjax import generate as generate_lib
from ftjax import logs, metrics, models, optim, sharding
from ftjax.data import instruct, pipeline, sources
from ftjax.models import keymap, layers
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
                     deterministic: bool, normalizer=None, frozen_encoder: bool = False,
                     num_tasks: int = 1):
  """Weighted cross-entropy sum / `normalizer`, summable counts, and the logits.

  Returns `(loss, (sums, logits))`: `sums` holds `correct` and `weight` (and,
  for a causal LM, per-task `task_loss_sum` and `task_tokens`), which add up
  over micro-batches and eval batches. A classification batch is scored per
  example (`weights`), a causal-LM batch per response token
  (`target_weights`, the loss mask; see `ftjax.data.instruct`).

  A batch holds token ids, or, with cached features, the head's input. With
  `frozen_encoder` (head-only) the encoder runs in inference mode and only the
  head sees dropout: the function cached features compute, so caching them
  is an exact speed-up.
  """
  params = partition.merge(trainable, frozen)
  rngs = None if rng is None else nnx.Rngs(dropout=rng)
  if model.config.task == "causal_lm":
    logits = model.apply(params, batch["input_ids"], segment_ids_bt=batch["segment_ids"],
                         positions_bt=batch["positions"], deterministic=deterministic,
                         rngs=rngs).logits
    labels, weights = batch["targets"], batch["target_weights"]
  elif "features" in batch or frozen_encoder:
    features = batch["features"] if "features" in batch else model.apply(
        params, batch["input_ids"], batch["attention_mask"], method="features",
        **pipeline.token_types(batch))
    logits = model.apply(params, features, method="classify", deterministic=deterministic,
                         rngs=rngs)
    labels, weights = batch["labels"], batch["weights"]
  else:
    logits = model.apply(params, batch["input_ids"], batch["attention_mask"],
                         deterministic=deterministic, rngs=rngs,
                         **pipeline.token_types(batch)).logits
    labels, weights = batch["labels"], batch["weights"]
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights
  normalizer = weights.sum() if normalizer is None else normalizer
  loss = ce.sum() / jnp.maximum(normalizer, 1.0)
  sums = {"correct": ((logits.argmax(-1) == labels) * weights).sum(), "weight": weights.sum()}
  if model.config.task == "causal_lm":
    task_bt = jax.nn.one_hot(batch["task_ids"], num_tasks, dtype=jnp.float32)
    sums["task_loss_sum"] = jnp.einsum("bl,blt->t", ce, task_bt)
    sums["task_tokens"] = jnp.einsum("bl,blt->t", weights, task_bt)
  return loss, (sums, logits)


def _normalizer(batch: Batch) -> jax.Array:
  """What the loss is averaged over: response tokens (causal LM) or examples."""
  return (batch["target_weights"] if "target_weights" in batch else batch["weights"]).sum()


def make_train_step(model: models.Model, optimizer: optax.GradientTransformation,
                    learning_rate: optax.Schedule, accumulation_steps: int, *,
                    frozen_encoder: bool = False, num_tasks: int = 1) -> Callable:
  """The pure step `train_step(state, batch, rng) -> (state, metrics)`.

  Only `state.trainable` is differentiated: JAX does no backward work for a
  frozen prefix and forms no gradients for frozen weights. With accumulation,
  the global batch is scanned as micro-batches inside the step; the loss is
  normalised by the whole batch's weight, so accumulation changes nothing
  but memory.
  """

  def grads_and_sums(trainable, frozen, batch, rng):
    grad_fn = jax.value_and_grad(
        lambda t, b, r, n: loss_and_metrics(model, t, frozen, b, rng=r, deterministic=False,
                                            normalizer=n, frozen_encoder=frozen_encoder,
                                            num_tasks=num_tasks),
        has_aux=True)
    total_weight = _normalizer(batch)
    if accumulation_steps == 1:
      (loss, (sums, _)), grads = grad_fn(trainable, batch, rng, total_weight)
      return loss, sums, grads

    # (B, ...) -> (accum, B / accum, ...) keeping each device's rows together.
    def to_micro(x):
      return x.reshape(x.shape[0] // accumulation_steps, accumulation_steps,
                       *x.shape[1:]).swapaxes(0, 1)

    micro_batches = jax.tree.map(to_micro, batch)

    def body(carry, inputs):
      micro_batch, index = inputs
      (loss, (sums, _)), grads = grad_fn(
          trainable, micro_batch, jax.random.fold_in(rng, index), total_weight)
      return jax.tree.map(jnp.add, carry, (grads, loss, sums)), None

    zero_sums = {"correct": jnp.zeros(()), "weight": jnp.zeros(())}
    if model.config.task == "causal_lm":
      zero_sums.update(task_loss_sum=jnp.zeros(num_tasks), task_tokens=jnp.zeros(num_tasks))
    init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros(()), zero_sums)
    (grads, loss, sums), _ = jax.lax.scan(body, init,
                                          (micro_batches, jnp.arange(accumulation_steps)))
    return loss, sums, grads

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    loss, sums, grads = grads_and_sums(state.trainable, state.frozen, batch, step_rng)
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
        "accuracy": sums["correct"] / jnp.maximum(sums["weight"], 1.0),
        "learning_rate": learning_rate(state.step),
        "grad_norm": grad_norm,
        "update_norm": optax.global_norm(updates),
    }
    if "task_tokens" in sums:
      step_metrics.update(task_loss_sum=sums["task_loss_sum"], task_tokens=sums["task_tokens"])
    return new_state, step_metrics

  return train_step


def make_eval_step(model: models.Model, num_tasks: int = 1) -> Callable:

  def eval_step(trainable, frozen, batch: Batch):
    loss_sum, (sums, logits) = loss_and_metrics(model, trainable, frozen, batch,
                                                deterministic=True, normalizer=1.0,
                                                num_tasks=num_tasks)
    if model.config.task == "causal_lm":
      return {"loss_sum": loss_sum, **sums}
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
  tokenizer: Any = None
  # causal_lm: the mixture's batch plan (ftjax.data.instruct).
  plan: Any = None
  # Split name -> (examples, embed) head inputs, when features are cached.
  features: dict[str, np.ndarray] | None = None

  @property
  def is_lm(self) -> bool:
    return self.model.config.task == "causal_lm"

  @property
  def task_names(self) -> tuple[str, ...]:
    return self.train_split.task_names if self.is_lm else ()

  def device_batch(self, split_name: str, batch: Mapping[str, np.ndarray]) -> dict:
    """A host batch of `split_name` -> global arrays on the mesh, as the steps take them."""
    if self.features is not None:
      batch = {"features": self.features[split_name][batch["index"]],
               "labels": batch["labels"], "weights": batch["weights"]}
    else:
      batch = {k: v for k, v in batch.items() if k != "index"}
    return sharding.put_batch(batch, sharding.batch_sharding(self.config, self.mesh))


def _load_split(config, split_name, tokenizer, num_labels, max_examples: int = 0):
  dataset = sources.load_split(config.data, split_name)
  if max_examples:
    dataset = dataset.select(range(min(max_examples, len(dataset))))
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


def load_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The pretrained model of `config.model` (with LoRA adapters when the strategy asks).

  Parameters are created straight into their shardings on `mesh`. Returns
  (model, params, paths the checkpoint lacked, tokenizer).
  """
  m = config.model
  loaded = models.load_pretrained(
      m.name_or_path, task=m.task, num_labels=m.num_labels, dtype=m.dtype, pooling=m.pooling,
      allow_pickle=m.allow_pickle, seed=config.seed,
      shardings=lambda model: sharding.param_shardings(config, mesh, model.abstract_params,
                                                       model.param_axes))
  model, params = loaded.model, loaded.params
  if model.config.task not in ("classification", "causal_lm"):
    raise FtjaxError(f"model.task={m.task!r}: training needs a head; set "
                     f"--config.model.task=classification (or causal_lm for a decoder)")
  tokenizer = models.load_tokenizer(m.name_or_path)
  if config.strategy.name == "lora":
    s = config.strategy.lora
    spec = lora_lib.LoraSpec(rank=s.rank, alpha=s.alpha, dropout=s.dropout,
                             targets=tuple(s.targets))
    model, params = lora_lib.add_lora(model, params, spec, jax.random.key(config.seed + 1))
    # The new adapters onto the mesh too (the base weights are there already).
    params = jax.device_put(params, sharding.param_shardings(
        config, mesh, model.abstract_params, model.param_axes))
  return model, params, loaded.new_paths, tokenizer


def execution(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              path_labels: Mapping[str, str]) -> layers.Execution:
  """How the model runs its layers in this run: `config.model.remat`/`scan_layers`, and
  the activation sharding of the mesh's rules at every layer boundary."""
  return layers.Execution(
      remat=config.model.remat,
      scan_groups=partition.layer_groups(path_labels) if config.model.scan_layers else (),
      activation_sharding=sharding.activation_sharding(config, mesh))


def opt_state_shardings(optimizer: optax.GradientTransformation, trainable,
                        mesh: jax.sharding.Mesh):
  """Moments take their parameter's sharding; counters are replicated.

  `trainable` may hold arrays or `jax.ShapeDtypeStruct`s with shardings.
  """
  return optax.tree_map_params(
      optimizer, lambda _, param: param.sharding, jax.eval_shape(optimizer.init, trainable),
      trainable, transform_non_params=lambda _: sharding.replicated(mesh))


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
    paths = ([path for _, path, _ in instruct.tasks(config.data)] if config.data.mixture
             else [config.data.path])
    for path in paths:
      for split_name in (config.data.train_split, *config.eval.splits):
        sources.split_file(path, split_name)
  model, params, new_paths, tokenizer = load_model(config, mesh)
  config = _fit_to_positions(config, model)
  new_paths = set(new_paths)
  if config.init_from:
    params, restored, reinitialised = init_from(config.init_from, model, params)
    new_paths = (new_paths - set(restored)) | set(reinitialised)
  # Parameters the checkpoint lacked (a pooler as well as the classifier, say)
  # are random: every strategy trains them.
  new_rules = [(re.escape(p), partition.TRAINABLE) for p in sorted(new_paths)]
  rules = new_rules + partition.strategy_rules(config.strategy,
                                               num_layers=model.config.num_layers)
  path_labels = partition.labels(list(model.param_axes), rules)
  model = model.with_execution(execution(config, mesh, path_labels))

  plan = None
  if model.config.task == "causal_lm":
    train_split = instruct.load_split(config.data, config.data.train_split, tokenizer)
    eval_splits = {name: instruct.load_split(config.data, name, tokenizer,
                                             max_examples=config.eval.max_examples)
                   for name in config.eval.splits}
    buckets = ((config.data.max_length,) if config.data.packing
               else pipeline.bucket_lengths(train_split.lengths, config.data))
    plan = instruct.train_plan(train_split, config.data,
                               global_batch_size=config.training.batch_size, buckets=buckets,
                               seed=config.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
    steps_per_epoch = plan.steps_per_epoch
  else:
    num_labels = model.config.num_labels
    train_split = _load_split(config, config.data.train_split, tokenizer, num_labels)
    eval_splits = {name: _load_split(config, name, tokenizer, num_labels,
                                     config.eval.max_examples)
                   for name in config.eval.splits}
    buckets = pipeline.bucket_lengths(train_split.lengths, config.data)
    steps_per_epoch = pipeline.steps_per_epoch(
        train_split, global_batch_size=config.training.batch_size, buckets=buckets)
  steps = config_lib.resolve_steps(config, int(steps_per_epoch))

  trainable, frozen = partition.split(params, path_labels)
  if not jax.tree.leaves(trainable):
    raise FtjaxError(f"strategy.name={config.strategy.name!r} leaves no parameter of this "
                     f"{model.config.model_type} {model.config.task} model trainable (e.g. a "
                     f"causal LM has no classifier head); choose full, freeze or lora")
  learning_rate = optim.schedule(config, total_steps=steps.total, warmup_steps=steps.warmup)
  optimizer = optim.build(config, trainable, learning_rate)
  opt_sharding = opt_state_shardings(optimizer, trainable, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_sharding)(trainable)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  state = TrainState(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  run = Run(config=config, model=model, train_split=train_split, eval_splits=eval_splits,
            buckets=buckets, steps=steps, mesh=mesh, initial_state=state, optimizer=optimizer,
            learning_rate=learning_rate, pad_id=pad_id, tokenizer=tokenizer, plan=plan)
  if config.strategy.cache_features:
    run.features = _cached_features(run, path_labels, feature_cache_dir)
  return run


def _fit_to_positions(config: ml_collections.ConfigDict,
                      model: models.Model) -> ml_collections.ConfigDict:
  """`config` with data.max_length cut to the model's learned positions, if it has a table.

  A longer row would gather past the table (NaN embeddings); its sequences are
  truncated instead, as any sequence over data.max_length is, and counted in
  the log. Rotary models (no table) are left alone.
  """
  table = model.abstract_params.get("embeddings", {}).get("position")
  if table is None:
    return config
  limit = table["embedding"].shape[0]
  if model.config.model_type == "roberta":  # Positions start at pad_token_id + 1 (fairseq).
    limit -= model.config.pad_token_id + 1
  if config.data.max_length <= limit:
    return config
  logging.warning("data.max_length=%d is more than the %d positions of %s; sequences are "
                  "truncated to %d tokens", config.data.max_length, limit,
                  config.model.name_or_path, limit)
  config = config.copy_and_resolve_references()
  config.data.max_length = limit
  return config


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
                      frozen_encoder=run.config.strategy.name == "head_only",
                      num_tasks=max(len(run.task_names), 1)),
      in_shardings=(state_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(run.model, max(len(run.task_names), 1)),
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
  if run.is_lm:
    return _evaluate_lm(run, state, eval_step, split_name)
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


def _evaluate_lm(run: Run, state: TrainState, eval_step, split_name: str) -> dict[str, float]:
  """Response-token loss / perplexity / accuracy of a split, overall and per task."""
  outputs = [eval_step(state.trainable, state.frozen, run.device_batch(split_name, batch))
             for batch in instruct.eval_batches(
                 run.eval_splits[split_name], global_batch_size=run.config.eval.batch_size,
                 buckets=run.buckets, process_index=jax.process_index(),
                 process_count=jax.process_count())]
  outputs = jax.device_get(outputs)
  sums = {key: np.sum([o[key] for o in outputs], axis=0) for key in outputs[0]}
  return metrics.language_model(sums, run.task_names)


def generation_eval(run: Run, state: TrainState, split_name: str,
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
  params = partition.merge(state.trainable, state.frozen)
  eos = run.tokenizer.eos_token_id
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
                                max_new_tokens=c.max_new_tokens, eos_token_id=eos,
                                pad_token_id=run.pad_id)
    predictions += [run.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
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
  if run.is_lm:
    iterator = instruct.train_iterator(run.plan, num_steps=steps.total, data_config=config.data)
  else:
    iterator = pipeline.train_iterator(
        run.train_split, global_batch_size=config.training.batch_size, buckets=run.buckets,
        seed=config.seed, num_epochs=math.ceil(steps.total / steps.steps_per_epoch),
        process_index=jax.process_index(), process_count=jax.process_count(),
        pad_id=run.pad_id)
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
    results = {}
    for name in config.eval.splits:
      split_results = evaluate(run, state, eval_step, name)
      if config.eval.generate_examples:
        generated, records = _generate_and_record(run, state, name, step, workdir_path)
        split_results.update(generated)
      results.update({f"{name}/{key}": value for key, value in split_results.items()})
    writer.write(step, results)
    return results

  if start is None and config.eval.at_start and config.eval.splits:
    last_eval = run_evals(0)
    logging.info("Before training: %s", _brief(last_eval))

  preemption, preempted = _PreemptionWatch(steps.checkpoint_every), False
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
      preempted = preemption.reached(step)
      stop_now = (stop_at_step is not None and step >= stop_at_step) or preempted
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
        row = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]
               if np.ndim(window[0][k]) == 0}
        if run.is_lm and len(run.task_names) > 1:
          loss_sums = np.sum([m["task_loss_sum"] for m in window], axis=0)
          tokens = np.sum([m["task_tokens"] for m in window], axis=0)
          for task, loss_sum, count in zip(run.task_names, loss_sums, tokens):
            row[f"train/{task}/tokens"] = float(count)
            if count:
              row[f"train/{task}/loss"] = float(loss_sum / count)
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
        logging.info("Stopping at step %d %s; run the same command to continue", step,
                     "on SIGTERM (pre-emption), with a checkpoint" if preempted else "as asked")
        break
  finally:
    preemption.close()
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
  if preempted:
    raise Preempted(f"pre-empted (SIGTERM) at step {step} of {steps.total}; checkpoint "
                    f"{checkpointer.directory / str(step)} is saved; run the same command to "
                    f"continue")
  return last_eval


class Preempted(Exception):
  """The run stopped on SIGTERM after saving a checkpoint at the current step."""


class _PreemptionWatch:
  """Turns SIGTERM into "checkpoint at the end of this step, then stop".

  The handler only sets a flag (a signal may arrive anywhere, e.g. inside an
  XLA call or an orbax write); the loop reads it after every step. Hosts must
  agree on the step they stop at: with several processes, JAX's preemption
  sync point (the distributed runtime's SIGTERM notice) decides, or else the
  flags are all-gathered at checkpoint steps.
  """

  def __init__(self, every: int):
    self._flag = threading.Event()
    self._every = every
    self._previous = None
    # Multi-host: whether the runtime has a preemption service (known after the first step).
    self._sync_point: bool | None = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if self._sync_point is not False:
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
        self._sync_point = True
        return reached
      except RuntimeError:  # No preemption service in this runtime: asked once.
        self._sync_point = False
    if step % self._every:
      return False
    return bool(multihost_utils.process_allgather(np.asarray(self._flag.is_set())).any())

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _brief(results: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float))


def _generate_and_record(run: Run, state: TrainState, split_name: str, step: int,
                         workdir: pathlib.Path) -> tuple[dict[str, float], list[dict]]:
  """`generation_eval`, with samples in the log and appended to workdir/samples.jsonl."""
  if jax.process_count() > 1:
    logging.warning("eval.generate_examples: generation-based evaluation runs in "
                    "single-process runs only; skipped")
    return {}, []
  results, records = generation_eval(run, state, split_name, step)
  # Round-robin over tasks, so every task shows up among the first samples.
  seen: dict[str, int] = {}
  ranked = sorted(records, key=lambda r: (seen.setdefault(r["task"] + str(id(r)), len(
      [k for k in seen if k.startswith(r["task"])])), r["task"]))
  shown = ranked[:run.config.eval.num_samples]
  for record in shown:
    logging.info("sample (step %d, %s, %s): %r -> %r (reference %r)", step, split_name,
                 record["task"], record["prompt"][-200:], record["prediction"][:300],
                 record["reference"][:300])
  with open(workdir / "samples.jsonl", "a", encoding="utf-8") as f:
    f.writelines(json.dumps(record) + "\n" for record in shown)
  return results, records


def _host_metrics(step: int, step_metrics: dict) -> dict:
  """One device->host transfer of a step's metrics; stops on a non-finite loss."""
  values = {k: float(v) if np.ndim(v) == 0 else np.asarray(v)
            for k, v in jax.device_get(step_metrics).items()}
  if not math.isfinite(values["loss"]) or not math.isfinite(values["grad_norm"]):
    raise FtjaxError(
        f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}; training "
        f"stopped and the latest checkpoint is from before it. Lower "
        f"optimizer.learning_rate or check the data")
  return values
