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

import functools
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

  # Optional:
  #   convert(self, flat: FlatParams) -> FlatParams
  #     values derived from the base weights once the adapter's leaves exist:
  #     DoRA's magnitudes (column norms of the kernel), a quantised kernel's
  #     codes (`ftjax.peft.quant`, which replaces `kernel`), prompt embeddings
  #     from a text. `add_adapters` calls it, in stacking order, on the flat
  #     params (host numpy or device arrays alike).
  #   transforms_base: bool (class attribute)
  #     the adapter replaces base weights (a quantised kernel): it is stacked
  #     innermost and applied as the checkpoint is read (`ftjax.core.sources`).
  #   bind(self, tokenizer) -> Adapter
  #     the adapter with what it needs from the run's tokenizer (prompt tuning
  #     initialised from a text); `ftjax.core.run` calls it before stacking.


# factory(strategy config) -> Adapter.
Factory = Callable[[ml_collections.ConfigDict], Adapter]
# from_peft(base model, adapter_config.json dict, tensors without the PEFT prefix,
#           where (the folder, for messages))
#   -> (adapter, its parameter values by flat path, the tensors it did not use)
PeftImporter = Callable[[Any, dict, dict[str, np.ndarray], str],
                        tuple[Adapter, FlatParams, dict[str, np.ndarray]]]
_FACTORIES: dict[str, Factory] = {}
_PEFT_IMPORTERS: dict[str, PeftImporter] = {}
# name -> defaults of its config group `strategy.<name>` (`ftjax.config` adds them).
_CONFIG_GROUPS: dict[str, Callable[[], ml_collections.ConfigDict]] = {}
# Adapters that are also a `strategy.name` (the adapters + the head train).
_STRATEGIES: list[str] = []
# name -> predicate on the strategy config: the adapter is stacked, innermost,
# whenever it holds (a quantised base: `strategy.quant.method != "none"`).
_BASES: dict[str, Callable[[ml_collections.ConfigDict], bool]] = {}


def register(name: str, factory: Factory, *, peft_type: str | None = None,
             from_peft: PeftImporter | None = None,
             config: Callable[[], ml_collections.ConfigDict] | None = None,
             strategy: bool = False,
             base_when: Callable[[ml_collections.ConfigDict], bool] | None = None) -> None:
  """Makes `name` usable in `strategy.adapters`.

  peft_type ("LORA") with `from_peft`: `ftjax.peft.hf_adapter.load_adapter`
    imports PEFT folders of that type.
  config: the defaults of the adapter's config group, `strategy.<name>`.
  strategy: `strategy.name=<name>` trains this adapter and the head only.
  base_when: the adapter transforms the base model (a quantised kernel) and is
    stacked first whenever `base_when(strategy)` holds.
  """
  if _FACTORIES.get(name, factory) is not factory:
    raise ValueError(f"adapter {name!r} is already registered (by {_FACTORIES[name]!r})")
  _FACTORIES[name] = factory
  if peft_type is not None:
    if from_peft is None:
      raise ValueError(f"adapter {name!r}: peft_type {peft_type!r} needs a from_peft importer")
    _PEFT_IMPORTERS[peft_type] = from_peft
  if config is not None:
    _CONFIG_GROUPS[name] = config
  if strategy and name not in _STRATEGIES:
    _STRATEGIES.append(name)
  if base_when is not None:
    _BASES[name] = base_when


def config_groups() -> dict[str, Callable[[], ml_collections.ConfigDict]]:
  return dict(_CONFIG_GROUPS)


def strategy_names() -> tuple[str, ...]:
  """Adapters that are a `strategy.name` of their own ("lora", "ia3", ...)."""
  return tuple(_STRATEGIES)


def registered() -> tuple[str, ...]:
  return tuple(sorted(_FACTORIES))


def peft_importer(peft_type: str) -> PeftImporter | None:
  return _PEFT_IMPORTERS.get(peft_type)


def peft_types() -> tuple[str, ...]:
  return tuple(sorted(_PEFT_IMPORTERS))


def adapter_names(strategy: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The registered names a strategy config stacks, in order."""
  names = tuple(strategy.get("adapters", ()))
  # strategy.name="lora" is LoRA first, unless strategy.adapters places it.
  if strategy.name in _STRATEGIES and strategy.name not in names:
    names = (strategy.name,) + names
  # A transformed base (a quantised kernel) is innermost: the others wrap it.
  bases = tuple(name for name, when in _BASES.items()
                if name not in names and name in strategy and when(strategy))
  return bases + names


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
  flat.update(adapted.init(rng, only=[p for p in adapted_paths if p not in base_paths]))
  for adapter in adapters:
    if hasattr(adapter, "convert"):
      flat = adapter.convert(flat)
  if set(flat) != set(adapted_paths):
    odd = sorted(set(flat) ^ set(adapted_paths))
    raise ConfigError(f"adapters {', '.join(a.name for a in adapters)} leave parameter "
                      f"{odd[0]!r} that the adapted model does not have (or lack one it has)")
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


# Functions (flat params, layer prefix "a/b/query/") -> the layer's float
# kernel, or None where they do not apply: how a quantised base
# (`ftjax.peft.quant`) shows its kernel to adapters stacked on it.
_KERNEL_READERS: list[Callable[[FlatParams, str], Any]] = []


def register_kernel_reader(reader: Callable[[FlatParams, str], Any]) -> None:
  if reader not in _KERNEL_READERS:
    _KERNEL_READERS.append(reader)


def kernel_value(flat: FlatParams, prefix: str):
  """The float kernel of the dense layer at `prefix` ("encoder/layers/0/attention/query/"),
  whether stored as `kernel` or in another form (a quantised base)."""
  if prefix + "kernel" in flat:
    return flat[prefix + "kernel"]
  for reader in _KERNEL_READERS:
    kernel = reader(flat, prefix)
    if kernel is not None:
      return kernel
  raise KeyError(f"no kernel for the dense layer {prefix.rstrip('/')!r}")


@functools.cache
def _extended_class(mixin: type, base: type) -> type:
  # Cached: two builds of the same model must give equal graph definitions.
  return type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})


def extend(module: nnx.Module, mixin: type) -> nnx.Module:
  """`module` as an instance of `mixin` over its own class: same variables, same paths.

  How adapters stack on one dense layer: LoRA over a quantised kernel is
  `extend(extend(dense, QuantMixin), LoraMixin)`; each mixin's `__call__`
  calls `super().__call__` (the layer it extends) and reads the kernel through
  `kernel_value()`. The caller adds the mixin's own parameters to the result
  and puts it in place with `replace_module`.
  """
  extended = object.__new__(_extended_class(mixin, type(module)))
  extended.__dict__.update(module.__dict__)
  return extended


def mixins(module: nnx.Module) -> tuple[type, ...]:
  """The adapter mixins `extend` stacked on `module`, innermost first."""
  found = []
  cls = type(module)
  while cls.__dict__.get("__module__") and len(cls.__bases__) == 2:
    found.append(cls.__bases__[0])
    cls = cls.__bases__[1]
  return tuple(reversed(found))


def replace_module(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Puts `new` at `path` (from `nnx.iter_modules`) inside `root`."""
  parent = root
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)
