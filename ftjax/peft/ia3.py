"""IA3: an adapter (`ftjax.peft.adapter.Adapter`) that rescales activations of some dense layers.

(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning") learns one vector per adapted
layer and multiplies an activation by it, element-wise:

  attention key / value (and other non-feedforward targets):
      y = l * (W x + b)       the layer's output, bias included
  feed-forward down-projection (`feedforward` targets):
      y = W (l * x) + b       the layer's input

exactly as PEFT's `IA3Config` computes it (`peft.tuners.ia3.layer.Linear`).
`l` starts at one, so a freshly adapted model computes exactly what its base
model does. The vector lives beside the weights it scales:

  encoder/layers/3/attention/key/ia3_scale      (heads, kv): the output axes
  encoder/layers/3/mlp/down/ia3_scale           (mlp,): the input axes

with the kernel's own logical axes, so it is sharded like the activation it
scales. IA3 merges exactly: an output scale multiplies the kernel's output
columns and the bias, an input scale the kernel's input rows.

Default targets are the paper's (and PEFT's for Llama): key, value and the
MLP's down-projection of every layer. GPT-2 projects queries, keys and
values with one fused layer (`attention/qkv`, HF's `c_attn`); as PEFT's
default for gpt2 (`["c_attn", "mlp.c_proj"]`) the whole fused output is
scaled, queries included. For BERT, PEFT's default (`"output.dense"`) also
scales the input of the attention output projection, which the PEFT names
make hard to tell from the MLP's; ftjax's default keeps to the paper.

Registered as "ia3" (built from `strategy.ia3`; `strategy.name="ia3"` trains
the scales and the head), with PEFT's "IA3" format for
`ftjax.peft.hf_adapter`: `<module>.ia3_l` of shape (out, 1), or (1, in) for
a feedforward module.
"""

import dataclasses
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax import models
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap, layers
from ftjax.peft import adapter as adapter_lib
from ftjax.peft import hf_adapter
from ftjax.peft.partition import TRAINABLE

SCALE_LEAF = "ia3_scale"
# Key, value (GPT-2: the fused qkv) and the MLP's down-projection, in every family.
DEFAULT_TARGETS = (r".*/attention/(key|value|qkv)", r".*/mlp/down")
DEFAULT_FEEDFORWARD = (r".*/mlp/down",)


@dataclasses.dataclass(frozen=True)
class IA3Spec:
  """IA3 as an adapter: which dense layers are scaled, and which of them on the input.

  `targets` and `feedforward` are regexes `re.fullmatch`ed against module
  paths such as `decoder/layers/3/mlp/down`. Every target must match a dense
  layer; every `feedforward` regex must match at least one targeted layer and
  no other dense layer (PEFT: `feedforward_modules` is a subset of
  `target_modules`).
  """

  name: ClassVar[str] = "ia3"

  targets: tuple[str, ...] = DEFAULT_TARGETS
  # The targets whose input (not output) is scaled.
  feedforward: tuple[str, ...] = DEFAULT_FEEDFORWARD

  def __post_init__(self):
    # Tuples, so the spec stays hashable whatever sequence the caller passed.
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "feedforward", tuple(self.feedforward))
    adapter_lib.check_targets(self.targets, "IA3")
    for target in self.feedforward:
      try:
        re.compile(target)
      except re.error as e:
        raise ConfigError(f"IA3 feedforward target {target!r} is not a valid regex: {e}") from None

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Makes every targeted `layers.Dense` in `module` an IA3 layer, in place."""
    del rngs  # The scales start at one.
    found = adapter_lib.dense_targets(module, self.targets, "IA3")
    targeted = {name for _, name, _ in found}
    dense_names = ["/".join(map(str, path)) for path, m in nnx.iter_modules(module)
                   if isinstance(m, layers.Dense)]
    feedforward = [re.compile(t) for t in self.feedforward]
    for target, pattern in zip(self.feedforward, feedforward):
      # A feedforward regex picks target layers only, and at least one of them.
      outside = [name for name in dense_names if name not in targeted and pattern.fullmatch(name)]
      if outside:
        raise ConfigError(f"IA3 feedforward target {target!r} matches {outside[0]!r}, which no "
                          f"IA3 target matches; expected feedforward targets to be a subset of "
                          f"the targets (add it to the targets or drop it from feedforward)")
      if not any(pattern.fullmatch(name) for name in targeted):
        raise ConfigError(f"IA3 feedforward target {target!r} matches none of the targeted "
                          f"layers; expected a subset of the targets (such as "
                          f"{sorted(targeted)[0]!r}), or feedforward=()")
    for path, name, dense in found:
      if isinstance(dense, IA3Mixin):
        raise ConfigError(f"{name} already has an IA3 adapter; merge it first")
      layer = adapter_lib.extend(dense, IA3Mixin)
      layer.add_ia3(feedforward=any(p.fullmatch(name) for p in feedforward))
      adapter_lib.replace_module(module, path, layer)

  def rules(self) -> list[tuple[str, str]]:
    return [(rf".*/{SCALE_LEAF}", TRAINABLE)]

  def merge(self, params: keymap.FlatParams) -> keymap.FlatParams:
    """Folds each scale into its layer: an output scale into the kernel's output
    columns and the bias, an input scale into the kernel's input rows."""
    flat = dict(params)
    for prefix, feedforward in self._adapted(flat):
      scale = flat.pop(prefix + SCALE_LEAF)
      kernel = adapter_lib.kernel_value(flat, prefix)
      if feedforward:  # (in...) against the kernel's leading axes
        flat[prefix + "kernel"] = (kernel * scale.reshape(
            scale.shape + (1,) * (kernel.ndim - scale.ndim))).astype(jnp.float32)
      else:  # (out...) against its trailing axes, and the bias
        flat[prefix + "kernel"] = (kernel * scale).astype(jnp.float32)
        if prefix + "bias" in flat:
          flat[prefix + "bias"] = (flat[prefix + "bias"] * scale).astype(jnp.float32)
    return flat

  def to_peft(self, model, params: keymap.FlatParams) -> tuple[dict, dict[str, np.ndarray]]:
    """PEFT's IA3: `<module>.ia3_l` of shape (out, 1), or (1, in) for a feedforward module.

    A kernel's output (input) axes flatten to PEFT's `out` (`in`) in the order
    the key table flattens the kernel, as LoRA's factors do.
    """
    tensors, modules, ff_modules = {}, [], []
    for prefix, feedforward in self._adapted(params):
      module, _ = hf_adapter.hf_module(model, prefix + "kernel")
      scale = np.asarray(params[prefix + SCALE_LEAF], np.float32).reshape(-1)
      tensors[f"{module}.ia3_l"] = np.ascontiguousarray(
          scale[None, :] if feedforward else scale[:, None])
      modules.append(module)
      if feedforward:
        ff_modules.append(module)
    written = hf_adapter.target_modules(model, modules)
    ff_written = hf_adapter.target_modules(model, ff_modules) if ff_modules else []
    if not set(ff_written) <= set(written):
      # PEFT requires feedforward_modules to be a subset of target_modules, as strings.
      written, ff_written = sorted(modules), sorted(ff_modules)
    config = {
        "peft_type": "IA3", "target_modules": written, "feedforward_modules": ff_written,
        "fan_in_fan_out": model.config.model_type == "gpt2", "init_ia3_weights": True,
    }
    return config, tensors

  def _adapted(self, params: keymap.FlatParams) -> list[tuple[str, bool]]:
    """(path prefix "decoder/layers/0/mlp/down/", scales the input?) of this spec's layers."""
    targets = [re.compile(adapter_lib.target_regex(t)) for t in self.targets]
    feedforward = [re.compile(t) for t in self.feedforward]
    out = []
    for path in params:
      if not path.endswith("/" + SCALE_LEAF):
        continue
      name = path[:-len("/" + SCALE_LEAF)]
      if any(p.fullmatch(name) for p in targets):
        out.append((name + "/", any(p.fullmatch(name) for p in feedforward)))
    return out


class IA3Mixin:
  """A dense layer with a learned scale on its output (`l * (W x + b)`) or, for a
  feed-forward layer, on its input (`W (l * x) + b`).

  Extends whatever dense layer it adapts (`adapter.extend`: a plain
  `layers.Dense`, a quantised one, one with LoRA), keeping its variables at
  the same paths, plus `ia3_scale` with the shape and logical axes of the
  kernel's output axes (or input axes).
  """

  def add_ia3(self, *, feedforward: bool) -> None:
    n_in = len(self.in_features)
    self.ia3_feedforward = feedforward
    shape, axes = ((self.in_features, self.axes[:n_in]) if feedforward
                   else (self.out_features, self.axes[n_in:]))
    setattr(self, SCALE_LEAF, nnx.Param(jnp.ones(shape, self.param_dtype), logical_axes=axes))

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    (scale,) = self.promote_dtype((getattr(self, SCALE_LEAF)[...],), dtype=self.dtype)
    if self.ia3_feedforward:
      # The input's trailing axes are the kernel's input axes: the scale broadcasts.
      return super().__call__(inputs * scale.astype(inputs.dtype), deterministic=deterministic,
                              rngs=rngs)
    out = super().__call__(inputs, deterministic=deterministic, rngs=rngs)
    return out * scale.astype(out.dtype)


def from_peft(model: models.Model, config: dict, tensors: dict[str, np.ndarray],
              where: str) -> tuple[IA3Spec, keymap.FlatParams, dict[str, np.ndarray]]:
  """(spec, scales, other tensors) of a PEFT IA3 adapter for the base `model`.

  The adapter's modules become exact targets; a module is feedforward as PEFT
  decides it (`feedforward_modules`: a regex `re.fullmatch`ed, or names any
  module name ends with), and its `ia3_l` must have the shape that implies.
  """
  feedforward_modules = config.get("feedforward_modules") or []

  def is_feedforward(module: str) -> bool:
    # As peft.tuners.ia3.IA3Model._check_target_module_feedforward decides.
    if isinstance(feedforward_modules, str):
      return bool(re.fullmatch(feedforward_modules, module))
    return any(module.endswith(name) for name in feedforward_modules)

  scales: dict[str, tuple[np.ndarray, bool]] = {}
  rest = {}
  for name, value in tensors.items():
    m = re.fullmatch(r"(.+)\.ia3_l(?:\.[^.]+)?", name)
    if not m:
      rest[name] = value
      continue
    target = model.family.table.match_hf(m.group(1) + ".weight")
    if target is None or not target[0].endswith("/kernel"):
      raise CheckpointError(f"adapter tensor {name!r}: no {model.config.model_type} projection "
                            f"is named {m.group(1)!r}")
    scales[target[0][:-len("kernel")]] = (value, is_feedforward(m.group(1)))
  if not scales:
    raise CheckpointError(f"{where} holds no ia3_l tensors")
  spec = IA3Spec(targets=tuple(re.escape(p.rstrip("/")) for p in sorted(scales)),
                 feedforward=tuple(re.escape(p.rstrip("/")) for p in sorted(scales)
                                   if scales[p][1]))
  shapes = keymap.flatten(models.Model.build(model.config, adapters=(spec,)).abstract_params)
  values = {}
  for prefix, (value, feedforward) in scales.items():
    shape = tuple(shapes[prefix + SCALE_LEAF].shape)
    size = int(np.prod(shape))
    expected = (1, size) if feedforward else (size, 1)
    if tuple(value.shape) != expected:
      raise CheckpointError(f"adapter of {prefix.rstrip('/')!r} has ia3_l {tuple(value.shape)}; "
                            f"the model needs {expected} (a "
                            f"{'feedforward' if feedforward else 'non-feedforward'} module)")
    values[prefix + SCALE_LEAF] = np.asarray(value, np.float32).reshape(shape)
  return spec, values, rest


def _from_strategy(strategy: ml_collections.ConfigDict) -> IA3Spec:
  s = strategy.ia3
  return IA3Spec(targets=tuple(s.targets), feedforward=tuple(s.feedforward))


def _config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Regexes over module paths whose output is scaled ("decoder/layers/3/attention/key");
  # "all-linear": every projection of every layer.
  c.targets = DEFAULT_TARGETS
  # The subset of the targets whose input is scaled instead (the MLP's down-projection).
  c.feedforward = DEFAULT_FEEDFORWARD
  return c


adapter_lib.register("ia3", _from_strategy, peft_type="IA3", from_peft=from_peft,
                     config=_config, strategy=True)
