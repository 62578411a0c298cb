"""Declarative Hugging Face <-> Flax weight maps, read in both directions.

A family's `KeyTable` is a list of `Rule`s, each a pair of name templates
with one transform between them:

  Rule("encoder.layer.{i}.attention.self.query.weight",
       "encoder/layers/{i}/attention/query/kernel", LINEAR)

`{i}` matches a layer number. Import and export use the same table, so a
transform is written once and inverted, never re-derived by hand (tunix
#971: a merged-LoRA saver that transposed every tensor blindly).

Import asserts that every checkpoint tensor is used (or named as ignorable,
like a pre-training head) and reports which Flax parameters it filled; the
caller decides which unfilled ones may be newly initialised.
"""

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from ftjax.errors import CheckpointError

# A parameter tree flattened to "a/b/0/kernel" -> leaf.
FlatParams = dict[str, object]


@dataclasses.dataclass(frozen=True)
class Transform:
  """How an HF tensor becomes a Flax parameter and back.

  kind "identity": same array. kind "flatten": HF keeps a flat vector that
  Flax splits by head, e.g. a (heads*kv,) bias as (heads, kv). kind "linear":
  a PyTorch Linear weight, stored (out, in), becomes a Flax kernel
  (in..., out...); `in_dims` says how many leading Flax axes form the input,
  e.g. 1 for a query kernel (embed, heads, kv), 2 for the attention output
  kernel (heads, kv, embed). kind "conv1d": GPT-2's Conv1D weight, already
  stored (in, out), only reshaped to the Flax kernel (in..., out...), e.g.
  c_attn (embed, 3*heads*kv) as a fused (embed, 3, heads, kv) kernel.
  """

  kind: str = "identity"
  in_dims: int = 1

  def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.kind == "identity":
      return tuple(flax_shape)
    if self.kind == "flatten":
      return (math.prod(flax_shape),)
    if self.kind == "conv1d":
      return (math.prod(flax_shape[:self.in_dims]), math.prod(flax_shape[self.in_dims:]))
    return (math.prod(flax_shape[self.in_dims:]), math.prod(flax_shape[:self.in_dims]))

  def to_flax(self, x: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    return (x.T if self.kind == "linear" else x).reshape(flax_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return np.ascontiguousarray(x.reshape(math.prod(x.shape[:self.in_dims]), -1).T)
    return x.reshape(self.hf_shape(x.shape))


IDENTITY = Transform()
FLATTEN = Transform("flatten")
LINEAR = Transform("linear", in_dims=1)      # (out, in) <-> (in, out...)
LINEAR_IN2 = Transform("linear", in_dims=2)  # (out, in) <-> (heads, kv, out)
CONV1D = Transform("conv1d", in_dims=1)      # (in, out) <-> (in, out...)
CONV1D_IN2 = Transform("conv1d", in_dims=2)  # (in, out) <-> (heads, kv, out)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  flax: str
  transform: Transform = IDENTITY
  # Part of the base model: written under the task model's prefix on export
  # ("bert." for BertForSequenceClassification), found with or without it.
  base: bool = True
  # A task-specific parameter (pooler, classifier): a checkpoint may lack it
  # (it is then newly initialised) and a model may lack it (the tensor is then
  # skipped), as when a bare encoder checkpoint is loaded for classification.
  optional: bool = False

  def _regex(self, template: str) -> re.Pattern:
    parts = re.split(r"(\{i\})", template)
    body = "".join(r"(?P<i>\d+)" if p == "{i}" else re.escape(p) for p in parts)
    return re.compile(body + r"\Z")

  @property
  def hf_regex(self) -> re.Pattern:
    return self._regex(self.hf)

  @property
  def flax_regex(self) -> re.Pattern:
    return self._regex(self.flax)


@dataclasses.dataclass(frozen=True)
class KeyTable:
  """All HF names of one family: `rules`, plus regexes of tensors to ignore.

  `prefix` is how the task models nest the base model ("bert.", "roberta.",
  "distilbert."): a checkpoint of the bare model has no prefix.
  """

  rules: tuple[Rule, ...]
  prefix: str
  ignore: tuple[str, ...] = ()

  def match_hf(self, name: str) -> tuple[str, Rule] | None:
    """The Flax path and rule for an HF tensor name, or None."""
    for rule in self.rules:
      candidates = [name]
      if rule.base and name.startswith(self.prefix):
        candidates.append(name[len(self.prefix):])
      for candidate in candidates:
        m = rule.hf_regex.match(candidate)
        if m:
          return _fill(rule.flax, m), rule
    return None

  def is_ignored(self, name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in self.ignore)

  def match_flax(self, path: str, *, task_model: bool) -> tuple[str, Rule] | None:
    """The HF tensor name and rule for a Flax path (prefixed inside a task model)."""
    for rule in self.rules:
      m = rule.flax_regex.match(path)
      if m:
        name = _fill(rule.hf, m)
        return (self.prefix + name if rule.base and task_model else name), rule
    return None


def dense_rules(hf: str, flax: str, *, in_dims: int = 1, split_bias: bool = False,
                bias: bool = True, base: bool = True, optional: bool = False) -> tuple[Rule, ...]:
  """A PyTorch Linear `hf.{weight,bias}` <-> Flax `flax/{kernel,bias}`.

  `in_dims` 2: the kernel's input is (heads, kv) (an attention output);
  `split_bias`: Flax keeps the bias per head (a query's (heads, kv) bias).
  """
  rules = (Rule(f"{hf}.weight", f"{flax}/kernel", LINEAR_IN2 if in_dims == 2 else LINEAR,
                base=base, optional=optional),)
  if bias:
    rules += (Rule(f"{hf}.bias", f"{flax}/bias", FLATTEN if split_bias else IDENTITY,
                   base=base, optional=optional),)
  return rules


def norm_rules(hf: str, flax: str, *, bias: bool = True) -> tuple[Rule, ...]:
  """A LayerNorm `hf.{weight,bias}` <-> Flax `flax/{scale,bias}` (RMSNorm: no bias)."""
  rules = (Rule(f"{hf}.weight", f"{flax}/scale"),)
  return rules + ((Rule(f"{hf}.bias", f"{flax}/bias"),) if bias else ())


def _fill(template: str, match: re.Match) -> str:
  return template.replace("{i}", match.group("i")) if "{i}" in template else template


class TensorSource(Mapping):
  """Read-only mapping of checkpoint tensor names to arrays, loaded lazily."""

  def shape(self, name: str) -> tuple[int, ...]:
    raise NotImplementedError


def import_params(table: KeyTable, tensors: TensorSource, flax_shapes: Mapping[str, tuple],
                  source: str) -> tuple[FlatParams, list[str]]:
  """Maps checkpoint tensors onto Flax paths.

  Returns (filled parameters, names of skipped tensors: ignorable ones, task
  heads the model lacks or needs in another size). Raises if a tensor is
  neither mapped nor ignorable, maps to a non-optional path the model does not
  have, or has the wrong shape.
  """
  filled: FlatParams = {}
  ignored, unused = [], []
  for name in tensors:
    target = table.match_hf(name)
    if target is None:
      (ignored if table.is_ignored(name) else unused).append(name)
      continue
    path, rule = target
    if path not in flax_shapes:
      (ignored if rule.optional else unused).append(name)
      continue
    transform = rule.transform
    want = transform.hf_shape(flax_shapes[path])
    have = tuple(tensors.shape(name))
    if have != want and rule.optional and not rule.base:
      # A task head of another size (a 3-class checkpoint fine-tuned for 2
      # classes): skipped here, so the caller initialises a new head.
      ignored.append(f"{name} (shape {have}, the model needs {want})")
      continue
    if have != want:
      raise CheckpointError(
          f"tensor {name!r} in {source} has shape {have}, but the model expects {want} for "
          f"{path!r}; the checkpoint does not match its config.json")
    filled[path] = transform.to_flax(np.asarray(tensors[name]), flax_shapes[path])
  if unused:
    more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
    raise CheckpointError(
        f"{len(unused)} tensor(s) in {source} match no parameter of the model: "
        f"{', '.join(map(repr, unused[:3]))}{more}; is config.json's model_type right?")
  return filled, ignored


def export_params(table: KeyTable, flat_params: Mapping[str, np.ndarray], *,
                  task_model: bool) -> dict[str, np.ndarray]:
  """Flax parameters -> HF tensors; every parameter must have a rule."""
  tensors = {}
  for path, value in flat_params.items():
    target = table.match_flax(path, task_model=task_model)
    if target is None:
      raise CheckpointError(f"parameter {path!r} has no Hugging Face name in the key table")
    name, rule = target
    tensors[name] = rule.transform.to_hf(np.asarray(value))
  return tensors


def flatten(tree: Mapping, prefix: str = "") -> FlatParams:
  """{"a": {"b": {0: x}}} -> {"a/b/0": x}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, object], like: Mapping) -> dict:
  """Inverse of `flatten`, taking key types (int layer indices) from `like`."""
  def build(node, prefix):
    out = {}
    for key, value in node.items():
      path = f"{prefix}{key}"
      out[key] = build(value, path + "/") if isinstance(value, Mapping) else flat[path]
    return out
  return build(like, "")

