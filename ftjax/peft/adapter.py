"""PEFT methods as adapters: one protocol, a registry, and adding/merging them.

An adapter is a frozen dataclass (hashable: it is part of a `Model`'s static
description) that changes a model's NNX graph when the graph is built:

  model = Model.build(config, adapters=(LoraSpec(rank=8, alpha=16.0), my_ia3))

`Model` calls `adapter.inject(module, rngs=...)` on each, in order, right
after the family builds its module, so the abstract shapes and `Model.init`
include the adapters' parameters. An adapter's parameters live in the one
plain parameter tree beside the weights they adapt
(`encoder/layers/3/attention/query/lora_a`), so sharding, checkpoints and the
optimizer need nothing adapter-specific; `rules()` says which of them train.

Stacking order is the order of `adapters`: the first is injected first, so
where two adapt the same layer the later one wraps the earlier. Merging runs
in the same order (innermost first): each adapter folds itself into the
weights that the next one then wraps.

A run names its adapters in the config (`from_config`): `strategy.name="lora"`
is LoRA from `strategy.lora`; `strategy.adapters` lists registered names in
stacking order ("lora" listed there sets LoRA's place in the stack).
"""

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import ml_collections
import numpy as np
from flax import nnx

from ftjax import models
from ftjax.errors import ConfigError
from ftjax.models import keymap, layers

FlatParams = keymap.FlatParams  # "encoder/layers/3/attention/query/kernel" -> array
# PEFT's name for "every projection inside the layers" (not the embeddings or heads).
ALL_LINEAR = "all-linear"
_ALL_LINEAR_REGEX = r"(encoder|decoder)/layers/\d+/.*"


@runtime_checkable
class Adapter(Protocol):
  """A PEFT method, as `Model`, the partition, export and merging see it."""

  # The registry name ("lora"), also used in error messages.
  name: str

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Adds this adapter to `module` in place (runs under `nnx.eval_shape` and inside
    a jitted init: it must not read parameter values)."""

  def rules(self) -> list[tuple[str, str]]:
    """Partition rules `[(regex, "trainable"|"frozen")]` for this adapter's own parameters."""

  def merge(self, params: FlatParams) -> FlatParams:
    """Flat params with this adapter folded into the weights it wraps and its own
    parameters dropped; raises `ConfigError` if the method cannot be merged."""

  def to_peft(self, model: Any, params: FlatParams) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json entries, tensors by Hugging Face name without PEFT's
    `base_model.model.` prefix) for `model`'s parameters `params`; raises
    `CheckpointError` if the method has no PEFT format."""


# factory(strategy config) -> Adapter.
Factory = Callable[[ml_collections.ConfigDict], Adapter]
# from_peft(base model, adapter_config.json dict, tensors without the PEFT prefix,
#           where (the folder, for messages))
#   -> (adapter, its parameter values by flat path, the tensors it did not use)
PeftImporter = Callable[[Any, dict, dict[str, np.ndarray], str],
                        tuple[Adapter, FlatParams, dict[str, np.ndarray]]]
_FACTORIES: dict[str, Factory] = {}
_PEFT_IMPORTERS: dict[str, PeftImporter] = {}


def register(name: str, factory: Factory, *, peft_type: str | None = None,
             from_peft: PeftImporter | None = None) -> None:
  """Makes `name` usable in `strategy.adapters`; `peft_type` ("LORA") with
  `from_peft` lets `ftjax.peft.hf_adapter.load_adapter` import PEFT folders of that type."""
  if _FACTORIES.get(name, factory) is not factory:
    raise ValueError(f"adapter {name!r} is already registered (by {_FACTORIES[name]!r})")
  _FACTORIES[name] = factory
  if peft_type is not None:
    if from_peft is None:
      raise ValueError(f"adapter {name!r}: peft_type {peft_type!r} needs a from_peft importer")
    _PEFT_IMPORTERS[peft_type] = from_peft


def registered() -> tuple[str, ...]:
  return tuple(sorted(_FACTORIES))


def peft_importer(peft_type: str) -> PeftImporter | None:
  return _PEFT_IMPORTERS.get(peft_type)


def peft_types() -> tuple[str, ...]:
  return tuple(sorted(_PEFT_IMPORTERS))


def adapter_names(strategy: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The registered names a strategy config stacks, in order."""
  names = tuple(strategy.get("adapters", ()))
  # strategy.name="lora" is LoRA first, unless strategy.adapters places it
  # (a quantised base must be injected before the LoRA that wraps it).
  if strategy.name == "lora" and "lora" not in names:
    names = ("lora",) + names
  return names


def from_config(strategy: ml_collections.ConfigDict) -> tuple[Adapter, ...]:
  """The adapters of a strategy config, in stacking order."""
  names = adapter_names(strategy)
  for i, name in enumerate(names):
    if name not in _FACTORIES:
      raise ConfigError(f"strategy.adapters: {name!r} is not a registered adapter; expected "
                        f"one of {', '.join(registered())}")
    if name in names[:i]:
      raise ConfigError(f"strategy.adapters lists {name!r} twice; expected each adapter once")
  return tuple(_FACTORIES[name](strategy) for name in names)


def add_adapters(model: models.Model, params: dict,
                 adapters: Sequence[Adapter], rng: jax.Array) -> tuple[models.Model, dict]:
  """(model, params) with `adapters` stacked on top of the model's own.

  The base weights are kept as they are; only the new adapter leaves are
  initialised (XLA drops the rest of the init), so this is cheap even for a
  large model.
  """
  adapters = tuple(adapters)
  for adapter in adapters:
    if not isinstance(adapter, Adapter):
      raise TypeError(f"{adapter!r} is not an ftjax.peft.adapter.Adapter")
  stacked = model.adapters + adapters
  names = [a.name for a in stacked]
  for name in set(names):
    if names.count(name) > 1:
      raise ConfigError(f"the model would have {names.count(name)} {name!r} adapters; "
                        f"expected one (merge the first before adding another)")
  adapted = models.Model.build(model.config, adapters=stacked)
  flat = dict(keymap.flatten(params))
  base_paths = set(keymap.flatten(model.abstract_params))
  if set(flat) != base_paths:
    odd = sorted(set(flat) ^ base_paths)
    raise ValueError(f"params do not fit the model {model.config.model_type}: {odd[:3]}")
  adapted_paths = keymap.flatten(adapted.abstract_params)
  replaced = sorted(base_paths - set(adapted_paths))
  if replaced:
    raise ConfigError(f"adapters {', '.join(a.name for a in adapters)} replace parameter "
                      f"{replaced[0]!r}; add_adapters only adds parameters")
  flat.update(adapted.init(rng, only=[p for p in adapted_paths if p not in base_paths]))
  return adapted, keymap.unflatten(flat, adapted.abstract_params)


def merge_adapters(model: models.Model, params: dict) -> tuple[models.Model, dict]:
  """Folds every adapter into the base weights; returns (the model without adapters, params).

  The result has exactly the base model's parameter tree, so it can be
  exported with `ftjax.models.save_pretrained` and loaded by transformers.
  """
  if not model.adapters:
    raise ConfigError("merge_adapters needs a model with adapters; this one has none")
  flat = dict(keymap.flatten(params))
  for adapter in model.adapters:  # innermost first (see the module docstring)
    flat = adapter.merge(flat)
  base = models.Model.build(model.config)
  expected = set(keymap.flatten(base.abstract_params))
  if set(flat) != expected:
    odd = sorted(set(flat) ^ expected)
    raise ValueError(f"merging {', '.join(a.name for a in model.adapters)} left parameters "
                     f"that are not the base model's: {odd[:3]}")
  return base, keymap.unflatten(flat, base.abstract_params)


def adapter_paths(model: models.Model) -> list[str]:
  """Flat paths of the parameters the model's adapters add (not in the base model)."""
  base = set(keymap.flatten(models.Model.build(model.config).abstract_params))
  return [p for p in keymap.flatten(model.abstract_params) if p not in base]


def target_regex(target: str) -> str:
  """The module-path regex a target stands for ("all-linear" or a regex)."""
  return _ALL_LINEAR_REGEX if target == ALL_LINEAR else target


def check_targets(targets: Iterable[str], what: str) -> None:
  """Raises a one-line ConfigError for an empty target list or a target that is no regex."""
  targets = tuple(targets)
  if not targets:
    raise ConfigError(f"{what} targets are empty; expected at least one module-path regex")
  for target in targets:
    try:
      re.compile(target_regex(target))
    except re.error as e:
      raise ConfigError(f"{what} target {target!r} is not a valid regex: {e}") from None


def dense_targets(module: nnx.Module, targets: Sequence[str],
                  what: str) -> list[tuple[tuple, str, layers.Dense]]:
  """(NNX path, "a/b/0/c" name, layer) of every `layers.Dense` whose module path
  `re.fullmatch`es a target; every target must match one, so a typo fails loudly
  instead of training nothing."""
  patterns = [re.compile(target_regex(t)) for t in targets]
  found = [(path, "/".join(map(str, path)), m) for path, m in nnx.iter_modules(module)
           if isinstance(m, layers.Dense)]
  for target, pattern in zip(targets, patterns):
    if not any(pattern.fullmatch(name) for _, name, _ in found):
      examples = ", ".join(repr(name) for _, name, _ in found[:3])
      raise ConfigError(f"{what} target {target!r} matches no dense layer (targets are "
                        f"re.fullmatch'ed against module paths such as {examples})")
  return [(path, name, m) for path, name, m in found
          if any(p.fullmatch(name) for p in patterns)]


def replace_module(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Puts `new` at `path` (from `nnx.iter_modules`) inside `root`."""
  parent = root
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)
