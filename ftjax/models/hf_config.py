"""The config.json fields a family's config does not model, kept so an export round-trips.

Every family's frozen config keeps the Hugging Face fields it does not use
(bos/eos ids, id2label, ...) in `hf_extra`, a hashable tuple: the config is
part of the model's static description (`jax.jit` hashes it).
"""

from collections.abc import Iterable
from typing import Any


def freeze(value):
  """A JSON value as a hashable one (dicts and lists tagged, so `thaw` inverts it)."""
  if isinstance(value, dict):
    return ("__dict__", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
  if isinstance(value, list):
    return ("__list__", tuple(freeze(v) for v in value))
  return value


def thaw(value):
  if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dict__":
    return {k: thaw(v) for k, v in value[1]}
  if isinstance(value, tuple) and len(value) == 2 and value[0] == "__list__":
    return [thaw(v) for v in value[1]]
  return value


def extra_fields(hf: dict, used: Iterable[str]) -> tuple[tuple[str, Any], ...]:
  """The fields of `hf` not in `used`, frozen and sorted: a config's `hf_extra`."""
  used = set(used)
  return tuple(sorted((k, freeze(v)) for k, v in hf.items() if k not in used))


def restore(extra: tuple[tuple[str, Any], ...]) -> dict:
  """`hf_extra` back as config.json fields."""
  return {k: thaw(v) for k, v in extra}
