"""Objectives: what a run optimises, one file each (see `ftjax.objectives.base`).

`register(cls)` makes an `Objective` subclass available as
`config.objective.name = cls.name`; `get(name)` finds it. An empty
`objective.name` means the objective of `model.task` (classification or
causal_lm), so configs written before objectives existed run unchanged.
"""

from ftjax.errors import ConfigError
from ftjax.objectives.base import Data, Objective
from ftjax.objectives.causal_lm import CausalLM
from ftjax.objectives.classification import Classification
from ftjax.objectives.distill import Distill
from ftjax.objectives.preference import Preference

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
  """Adds an objective class under `cls.name` (usable as a class decorator)."""
  existing = _REGISTRY.get(cls.name)
  if existing is not None and existing is not cls and (
      existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
    raise ValueError(f"objective name {cls.name!r} is taken by {existing.__module__}."
                     f"{existing.__qualname__}")
  _REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def name_of(config) -> str:
  """The run's objective: `objective.name`, or by default the one of `model.task`."""
  return config.objective.name or config.model.task


def get(name: str) -> type[Objective]:
  if name not in _REGISTRY:
    raise ConfigError(f"config key 'objective.name' is {name!r}; expected one of {names()} "
                      f"(a new objective is registered with ftjax.objectives.register)")
  return _REGISTRY[name]


register(Classification)
register(CausalLM)
register(Distill)
register(Preference)

__all__ = ["CausalLM", "Classification", "Data", "Distill", "Objective", "Preference", "get",
           "name_of", "names", "register"]
