"""Build a run: model(s), adapters, partition, data, mesh, shardings, state.

Order (`setup`):
  1. Validate the config; build the mesh; check batch sizes against it.
  2. Load the pretrained model with the head the objective needs, straight
     into its shardings (`ftjax.core.sources`: a checkpoint or a finished run,
     optionally cut to `model.layers`); stack the PEFT adapters (`strategy`);
     the objective loads its frozen reference models (a teacher).
  3. Label every parameter trainable/frozen (`ftjax.peft.partition`): new
     parameters (a head the checkpoint lacks) are trainable.
  4. The objective turns the splits into batches; durations become steps.
  5. The optimizer over the trainable side only; the state at step 0.
The loop (`ftjax.core.loop`) resumes from a checkpoint on top of this.
"""

import dataclasses
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from ftjax import config as config_lib
from ftjax import models, objectives, optim, sharding
from ftjax.core import sources as model_sources
from ftjax.core import state as state_lib
from ftjax.core.transfer import init_from
from ftjax.data import instruct, sources
from ftjax.errors import FtjaxError
from ftjax.models import keymap, layers
from ftjax.objectives.base import Data, Objective
from ftjax.peft import adapter as adapter_lib
from ftjax.peft import partition


@dataclasses.dataclass
class Run:
  """Everything built once for a run (see the module docstring for the order)."""

  config: ml_collections.ConfigDict
  model: models.Model
  objective: Objective
  data: Data
  steps: config_lib.Steps
  mesh: jax.sharding.Mesh
  # The state before the first step (the first train step donates its buffers).
  initial_state: state_lib.TrainState
  optimizer: optax.GradientTransformation
  learning_rate: optax.Schedule
  # Flat parameter path -> "trainable" | "frozen".
  path_labels: dict[str, str]
  tokenizer: Any = None
  # Frozen reference models' parameters by name (a teacher, a DPO reference): the
  # steps' `refs` argument; their graphs belong to the objective.
  refs: dict = dataclasses.field(default_factory=dict)
  # What a checkpoint must also agree on beyond the config (a run's step the model or
  # a reference was loaded from, a reference's identity); see `loop.run_identity`.
  identity: dict = dataclasses.field(default_factory=dict)
  workdir: pathlib.Path | None = None
  feature_cache_dir: pathlib.Path | None = None

  # The objective's data, by the names the rest of ftjax uses.
  @property
  def train_split(self):
    return self.data.train_split

  @property
  def eval_splits(self) -> dict:
    return self.data.eval_splits

  @property
  def buckets(self) -> tuple[int, ...]:
    return self.data.buckets

  @property
  def pad_id(self) -> int:
    return self.data.pad_id

  def model_params(self, state: state_lib.TrainState) -> dict:
    """The model's whole parameter tree (trainable and frozen) of `state`."""
    model_trainable, _ = state_lib.split_objective(state.trainable)
    return partition.merge(model_trainable, state.frozen)

  def device_batch(self, split_name: str, batch: Mapping[str, np.ndarray]) -> dict:
    """A host batch of `split_name` -> global arrays on the mesh, as the steps take them."""
    return sharding.put_batch(self.objective.host_batch(split_name, batch),
                              sharding.batch_sharding(self.config, self.mesh))


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
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
  """The pretrained model of `config.model` with the run's adapters stacked on it.

  `model.name_or_path` is anything `ftjax.core.sources` loads (a checkpoint or
  a finished run), cut to `model.layers` when set. Parameters are created
  straight into their shardings on `mesh`. Returns (model, params, paths the
  checkpoint lacked, tokenizer).
  """
  return _load_model(config, mesh)[:4]


def _load_model(config, mesh):
  """`load_model`, plus what identifies the weights beyond the config (`Source.identity`)."""
  m = config.model

  def shardings(model):
    return sharding.param_shardings(config, mesh, model.abstract_params, model.param_axes)

  adapters = adapter_lib.from_config(config.strategy)
  # A quantised base is quantised on the host as the checkpoint is read: its
  # float kernels never reach the devices. The other adapters stack on it.
  on_base = model_sources.base_adapters(adapters)
  source = model_sources.load(
      m.name_or_path, task=m.task, num_labels=m.num_labels, dtype=m.dtype, pooling=m.pooling,
      allow_pickle=m.allow_pickle, seed=config.seed, shardings=shardings,
      layers=tuple(m.layers), adapters=on_base)
  model, params = source.model, source.params
  if config_lib.objective_class(config) is None:
    raise FtjaxError(f"model.task={m.task!r}: training needs a head; set "
                     f"--config.model.task=classification (or causal_lm for a decoder)")
  # Adapters that need the tokenizer (prompt tuning initialised from a text) bind it.
  adapters = tuple(a.bind(source.tokenizer) if hasattr(a, "bind") else a
                   for a in adapters if a not in on_base)
  if adapters:
    model, params = adapter_lib.add_adapters(model, params, adapters,
                                             jax.random.key(config.seed + 1))
    # The new adapters onto the mesh too (the base weights are there already).
    params = jax.device_put(params, shardings(model))
  return model, params, source.new_paths, source.tokenizer, source.identity


def execution(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              path_labels: Mapping[str, str]) -> layers.Execution:
  """How the model runs its layers in this run: `config.model.remat`/`scan_layers`, and
  the activation sharding of the mesh's rules at every layer boundary."""
  return layers.Execution(
      remat=config.model.remat,
      scan_groups=partition.layer_groups(path_labels) if config.model.scan_layers else (),
      activation_sharding=sharding.activation_sharding(config, mesh))


def _check_data_files(config: ml_collections.ConfigDict) -> None:
  """Fails on a missing data file before any model is loaded."""
  if config.data.source != "files":
    return
  paths = ([path for _, path, _ in instruct.tasks(config.data)] if config.data.mixture
           else [config.data.path])
  for path in paths:
    for split_name in (config.data.train_split, *config.eval.splits):
      sources.split_file(path, split_name)


def setup(config: ml_collections.ConfigDict, devices=None,
          feature_cache_dir: pathlib.Path | None = None,
          workdir: pathlib.Path | None = None) -> Run:
  """Steps 1-5 of a run (see the module docstring)."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config, devices)
  check_batch_sizes(config, mesh)
  _check_data_files(config)
  model, params, new_paths, tokenizer, model_identity = _load_model(config, mesh)
  config = _fit_to_positions(config, model)
  objective = config_lib.objective_class(config)(config)
  references = objective.load_references(
      model, tokenizer, lambda m: sharding.param_shardings(config, mesh, m.abstract_params,
                                                           m.param_axes))
  identity = {"model.source": model_identity} if model_identity else {}
  identity.update({f"references.{name}": ref.identity for name, ref in references.items()})
  new_paths = set(new_paths)
  if config.init_from:
    params, restored, reinitialised = init_from(config.init_from, model, params)
    new_paths = (new_paths - set(restored)) | set(reinitialised)
  # Parameters the checkpoint lacked (a pooler as well as the classifier, say)
  # are random: every strategy trains them.
  rules = [(re.escape(p), partition.TRAINABLE) for p in sorted(new_paths)]
  rules += partition.strategy_rules(config.strategy, num_layers=model.config.num_layers)
  path_labels = partition.labels(list(model.param_axes), rules)
  shapes = keymap.flatten(model.abstract_params)
  codes = [p for p, label in path_labels.items() if label == partition.TRAINABLE
           and not jax.numpy.issubdtype(shapes[p].dtype, jax.numpy.floating)]
  if codes:
    raise FtjaxError(f"parameter {codes[0]!r} ({shapes[codes[0]].dtype}, a quantised base's "
                     f"codes) is trainable by the partition rules; expected integer codes frozen "
                     f"(check strategy.rules)")
  model = model.with_execution(execution(config, mesh, path_labels))

  data = objective.build_data(model, tokenizer)
  steps = config_lib.resolve_steps(config, data.steps_per_epoch)
  trainable, frozen = partition.split(params, path_labels)
  objective_params = objective.init_params(model, jax.random.key(config.seed + 2))
  if objective_params:
    trainable[state_lib.OBJECTIVE] = jax.device_put(objective_params,
                                                    sharding.replicated(mesh))
  if not jax.tree.leaves(trainable):
    raise FtjaxError(f"strategy.name={config.strategy.name!r} leaves no parameter of this "
                     f"{model.config.model_type} {model.config.task} model trainable (e.g. a "
                     f"causal LM has no classifier head); choose full, freeze or lora")
  learning_rate = optim.schedule(config, total_steps=steps.total, warmup_steps=steps.warmup)
  optimizer = optim.build(config, trainable, learning_rate)
  state = state_lib.init_state(trainable, frozen, optimizer, mesh)
  run = Run(config=config, model=model, objective=objective, data=data, steps=steps, mesh=mesh,
            initial_state=state, optimizer=optimizer, learning_rate=learning_rate,
            path_labels=path_labels, tokenizer=tokenizer,
            refs={name: ref.params for name, ref in references.items()}, identity=identity,
            workdir=workdir, feature_cache_dir=feature_cache_dir)
  objective.prepare(run)
  return run


def _fit_to_positions(config: ml_collections.ConfigDict,
                      model: models.Model) -> ml_collections.ConfigDict:
  """`config` with data.max_length cut to the model's learned positions, if it has a table.

  A longer row would gather past the table (NaN embeddings); its sequences are
  truncated instead, as any sequence over data.max_length is, and counted in
  the log. Rotary models (no table) are left alone. Prompt and prefix
  tuning's virtual tokens take the first positions: data.max_length plus them
  must fit, else a one-line error (cutting would hide that the adapter
  shortens every sequence).
  """
  from ftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  table = model.abstract_params.get("embeddings", {}).get("position")
  if table is None:
    return config
  limit = table["embedding"].shape[0]
  if model.config.model_type == "roberta":  # Positions start at pad_token_id + 1 (fairseq).
    limit -= model.config.pad_token_id + 1
  virtual = {a.name: a.num_virtual_tokens for a in model.adapters
             if hasattr(a, "num_virtual_tokens")}
  if virtual and config.data.max_length + sum(virtual.values()) > limit:
    names = " + ".join(f"strategy.{name}.num_virtual_tokens={n}" for name, n in virtual.items())
    raise ConfigError(f"data.max_length={config.data.max_length} + {names} exceed the {limit} "
                      f"positions of {config.model.name_or_path}; expected data.max_length <= "
                      f"{limit - sum(virtual.values())} (or fewer virtual tokens)")
  if config.data.max_length <= limit:
    return config
  logging.warning("data.max_length=%d is more than the %d positions of %s; sequences are "
                  "truncated to %d tokens", config.data.max_length, limit,
                  config.model.name_or_path, limit)
  config = config.copy_and_resolve_references()
  config.data.max_length = limit
  return config


def partition_summary(run: Run) -> dict:
  state = run.initial_state
  trainable, frozen = partition.count(state.trainable), partition.count(state.frozen)
  total = trainable + frozen
  logging.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
               100 * trainable / total)
  return {"params/trainable": trainable, "params/total": total,
          "params/trainable_fraction": trainable / total,
          # What the parameters occupy on the devices (a quantised base's codes
          # included), over all shards.
          "params/bytes": optim.state_bytes((state.trainable, state.frozen)),
          "optimizer/state_bytes": optim.state_bytes(state.opt_state)}
