"""LoRA: an adapter (`ftjax.peft.adapter.Adapter`) that adds a low-rank update to dense layers.

A LoRA layer computes `y = W x + b + (alpha / rank) * B(A(dropout(x)))`
(Hu et al., 2021) with `A` of shape (in..., rank) and `B` of shape
(rank, out...). `B` starts at zero, so a freshly adapted model computes
exactly what its base model does, and training moves it away from there.

Adapters live in the same plain parameter tree as everything else, next to
the kernel they adapt:

  encoder/layers/3/attention/query/{kernel,bias}   the base weights, same paths
  encoder/layers/3/attention/query/lora_a          (embed, lora)
  encoder/layers/3/attention/query/lora_b          (lora, heads, kv)

so partition rules (`.*/lora_[ab]` -> trainable), sharding rules (the new
logical axis is `lora`) and checkpoints need no LoRA-specific code. Targets
are regexes over module paths (`encoder/layers/3/attention/query`), the same
paths the parameter tree uses without the final `kernel`.

Typical use:

  model, params = ftjax.models.from_pretrained(name, task="classification")
  model, params = adapter.add_adapters(model, params, (LoraSpec(rank=8, alpha=16.0),), rng)
  ... train the leaves at lora_paths(params) ...
  base_model, base_params = adapter.merge_adapters(model, params)
  ftjax.models.save_pretrained(base_params, base_model.config, out_dir)

Registered as "lora" (built from `strategy.lora`), with PEFT's "LORA" format
for `ftjax.peft.hf_adapter`.
"""

import dataclasses
import math
import re
from collections.abc import Sequence
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

# The logical axis name of the rank dimension; sharding rules leave it
# replicated unless told otherwise (it is tiny).
LORA_AXIS = "lora"
_ADAPTER_LEAVES = ("lora_a", "lora_b")
ALL_LINEAR = adapter_lib.ALL_LINEAR


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """LoRA as an adapter: which dense layers get one, and its shape.

  `targets` are regexes matched with `re.fullmatch` against module paths
  such as `encoder/layers/3/attention/query` (or "all-linear": every
  projection in the layers); every regex must match at least one dense
  layer, so a typo fails loudly instead of training nothing.
  """

  name: ClassVar[str] = "lora"

  rank: int
  alpha: float
  # Dropout on the adapter's input only (the base path is never dropped here).
  dropout: float = 0.0
  targets: tuple[str, ...] = (r".*/attention/(query|value)",)
  # rsLoRA: scale alpha / sqrt(rank) instead of alpha / rank.
  rslora: bool = False
  # DoRA: a trained magnitude per output column times the normalised direction.
  dora: bool = False

  def __post_init__(self):
    # Configs hand over lists; a tuple keeps the spec hashable (it is part of
    # the model's static description).
    object.__setattr__(self, "targets", tuple(self.targets))
    # Checked here, not in `inject`, so a bad value fails where the spec is
    # written rather than inside `nnx.eval_shape` (JAX would add its notes).
    _validate(self)

  @property
  def scale(self) -> float:
    return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Replaces every targeted `layers.Dense` in `module` with a `LoraDense`, in place."""
    for path, name, dense in adapter_lib.dense_targets(module, self.targets, "LoRA"):
      if isinstance(dense, LoraMixin):
        raise ConfigError(f"{name} already has a LoRA adapter; merge_lora first")
      layer = adapter_lib.extend(dense, LoraMixin)
      layer.add_lora(rank=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
                     dora=self.dora, rngs=rngs)
      adapter_lib.replace_module(module, path, layer)

  def rules(self) -> list[tuple[str, str]]:
    return [(r".*/lora_(a|b|magnitude)", TRAINABLE)]

  def convert(self, params: keymap.FlatParams) -> keymap.FlatParams:
    """DoRA's magnitudes start at the base kernel's column norms (B = 0), so the
    adapted model computes what the base model does."""
    if not self.dora:
      return params
    flat = dict(params)
    for prefix in self._adapted(flat):
      kernel = adapter_lib.kernel_value(flat, prefix)
      n_in = flat[prefix + "lora_a"].ndim - 1
      norm = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(kernel, jnp.float32)),
                              axis=tuple(range(n_in))))
      old = flat[prefix + "lora_magnitude"]
      flat[prefix + "lora_magnitude"] = jax.device_put(
          norm.astype(old.dtype), getattr(old, "sharding", None))
    return flat

  def merge(self, params: keymap.FlatParams) -> keymap.FlatParams:
    """Folds each of this spec's adapters into its kernel: W + scale A B (DoRA:
    m * (W + scale A B) / ||W + scale A B||)."""
    flat = dict(params)
    for prefix in self._adapted(flat):
      lora_a, lora_b = flat.pop(prefix + "lora_a"), flat.pop(prefix + "lora_b")
      kernel = adapter_lib.kernel_value(flat, prefix)
      # (in..., rank) x (rank, out...) -> (in..., out...), in full float32 even
      # where matmuls default to bfloat16 passes (TPU).
      delta = jnp.tensordot(lora_a, lora_b, axes=1, precision=jax.lax.Precision.HIGHEST)
      merged = kernel + self.scale * delta
      if self.dora:
        magnitude = flat.pop(prefix + "lora_magnitude")
        norm = column_norm(kernel, lora_a, lora_b, self.scale, lora_a.ndim - 1)
        merged = merged * (magnitude / norm)
      flat[prefix + "kernel"] = merged.astype(jnp.float32)
    return flat

  def to_peft(self, model, params: keymap.FlatParams) -> tuple[dict, dict[str, np.ndarray]]:
    """PEFT's LORA: `<module>.lora_A.weight` (rank, in), `<module>.lora_B.weight` (out, rank).

    PEFT's update `(lora_alpha / r) * B A x` is this one's `(alpha / rank) * x A B`.
    GPT-2's fused c_attn is one kernel, hence one adapter, as in PEFT.
    """
    tensors, modules = {}, []
    for prefix in self._adapted(params):
      module, _ = hf_adapter.hf_module(model, prefix + "kernel")
      lora_a = np.asarray(params[prefix + "lora_a"], np.float32)
      lora_b = np.asarray(params[prefix + "lora_b"], np.float32)
      rank = lora_a.shape[-1]
      # The kernel's input axes flatten to PEFT's `in`, its output axes to `out`.
      tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(lora_a.reshape(-1, rank).T)
      tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_b.reshape(rank, -1).T)
      if self.dora:
        tensors[f"{module}.lora_magnitude_vector"] = np.ascontiguousarray(
            np.asarray(params[prefix + "lora_magnitude"], np.float32).reshape(-1))
      modules.append(module)
    config = {
        "peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha,
        "lora_dropout": self.dropout, "target_modules": hf_adapter.target_modules(model, modules),
        "bias": "none", "fan_in_fan_out": model.config.model_type == "gpt2",
        "use_rslora": self.rslora, "use_dora": self.dora, "init_lora_weights": True,
    }
    return config, tensors

  def _adapted(self, params: keymap.FlatParams) -> list[str]:
    """Path prefixes ("encoder/layers/0/attention/query/") of this spec's adapters."""
    patterns = [re.compile(adapter_lib.target_regex(t)) for t in self.targets]
    return [p[:-len("lora_a")] for p in params if p.endswith("/lora_a")
            and any(pattern.fullmatch(p[:-len("/lora_a")]) for pattern in patterns)]


def _validate(spec: LoraSpec) -> None:
  """Raises a one-line ConfigError naming the first bad value of `spec`."""
  if spec.rank < 1:
    raise ConfigError(f"LoRA rank {spec.rank}; expected >= 1")
  if not spec.alpha > 0:
    raise ConfigError(f"LoRA alpha {spec.alpha}; expected > 0")
  if not 0.0 <= spec.dropout < 1.0:
    raise ConfigError(f"LoRA dropout {spec.dropout}; expected 0 <= dropout < 1")
  adapter_lib.check_targets(spec.targets, "LoRA")


def _lora_a_init(key: jax.Array, shape: tuple[int, ...], dtype, fan_in: int) -> jax.Array:
  # PEFT's default: kaiming_uniform_(a=sqrt(5)) on a (rank, in) weight, which
  # is U(-1/sqrt(fan_in), 1/sqrt(fan_in)). fan_in is the product of all input
  # axes, as if the multi-axis kernel were flattened to a PyTorch Linear.
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


class LoraMixin:
  """A dense layer plus a low-rank update: `W x + b + scale * B(A(dropout(x)))`.

  Extends whatever dense layer it adapts (`adapter.extend`: a plain
  `layers.Dense`, or a quantised one, `ftjax.peft.quant`), keeping its
  variables at the same paths, plus `lora_a` (in..., rank) with axes
  `kernel's input axes + ("lora",)` and `lora_b` (rank, out...) with axes
  `("lora",) + kernel's output axes`. scale is alpha/rank, or alpha/sqrt(rank)
  with rsLoRA (Kalajdzievski, 2023).

  DoRA (Liu et al., 2024; PEFT's `use_dora`) adds `lora_magnitude` (out...):
  the layer computes `m * (W + scale A B) / ||W + scale A B||` (the norm of each
  output column, over the input axes) times x, plus b. As in PEFT (and the
  paper's section 4.3) the norm is treated as a constant in the backward pass.

  Dropout needs `deterministic` and `rngs` at call time: the models pass
  them to every projection (`dense(x, deterministic=..., rngs=...)`).
  """

  def add_lora(self, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs,
               rslora: bool = False, dora: bool = False) -> None:
    n_in = len(self.in_features)
    # The keys a fresh Dense would draw for its kernel and bias, drawn and
    # dropped: LoRA layers were once built as new Dense layers, and runs and
    # fixtures from then initialise A the same way.
    for _ in range(1 + bool(self.use_bias)):
      rngs.params()
    self.rank = rank
    self.alpha = alpha
    self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    self.use_dora = dora
    self.lora_a = nnx.Param(
        _lora_a_init(rngs.params(), (*self.in_features, rank), self.param_dtype,
                     math.prod(self.in_features)),
        logical_axes=(*self.axes[:n_in], LORA_AXIS))
    self.lora_b = nnx.Param(jnp.zeros((rank, *self.out_features), self.param_dtype),
                            logical_axes=(LORA_AXIS, *self.axes[n_in:]))
    if dora:
      # Set from the base kernel's column norms by `LoraSpec.convert`.
      self.lora_magnitude = nnx.Param(jnp.ones(self.out_features, self.param_dtype),
                                      logical_axes=self.axes[n_in:])
    self.lora_dropout = nnx.Dropout(dropout)

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    out = super().__call__(inputs, deterministic=deterministic, rngs=rngs)
    x = self.lora_dropout(inputs, deterministic=deterministic, rngs=rngs)
    lora_a, lora_b = self.promote_dtype((self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    h = self.contract(x, lora_a)
    delta = jnp.tensordot(h, lora_b, axes=1, precision=self.precision)
    scale = jnp.asarray(self.scale, delta.dtype)
    if not self.use_dora:
      return out + scale * delta
    kernel = self.kernel_value()
    if deterministic or self.lora_dropout.rate == 0.0:
      base = out
      if self.bias is not None:
        base = base - self.promote_dtype((self.bias[...],), dtype=self.dtype)[0]
    else:  # PEFT: with dropout, the base term of DoRA sees the dropped input too.
      base = self.contract(x, kernel)
    norm = jax.lax.stop_gradient(column_norm(
        kernel, self.lora_a[...], self.lora_b[...], self.scale, len(self.in_features)))
    mag_scale = (self.lora_magnitude[...] / norm).astype(out.dtype)
    return out + (mag_scale - 1) * base + mag_scale * scale * delta


def column_norm(kernel, lora_a, lora_b, scale: float, n_in: int) -> jax.Array:
  """||W + scale A B|| over the input axes, in float32: DoRA's per-output-column norm."""
  delta = jnp.tensordot(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), axes=1,
                        precision=jax.lax.Precision.HIGHEST)
  merged = kernel.astype(jnp.float32) + scale * delta
  return jnp.sqrt(jnp.sum(jnp.square(merged), axis=tuple(range(n_in))))


def LoraDense(in_features, out_features, *, axes, init_std: float, rank: int, alpha: float,
              dropout: float = 0.0, dtype, param_dtype=jnp.float32, use_bias: bool = True,
              rslora: bool = False, dora: bool = False, rngs: nnx.Rngs):  # pylint: disable=invalid-name
  """A new `layers.Dense` with a LoRA adapter (tests and small examples)."""
  dense = layers.Dense(in_features, out_features, axes=axes, init_std=init_std, dtype=dtype,
                       param_dtype=param_dtype, use_bias=use_bias, rngs=rngs)
  layer = adapter_lib.extend(dense, LoraMixin)
  layer.add_lora(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora, rngs=rngs)
  return layer


def lora_paths(params) -> list[str]:
  """Flat paths ("a/b/0/lora_a") of the adapter leaves in `params`."""
  return [p for p in keymap.flatten(params) if p.rsplit("/", 1)[-1] in _ADAPTER_LEAVES]


def add_lora(model: models.Model, params, spec: LoraSpec,
             rng: jax.Array) -> tuple[models.Model, dict]:
  """`adapter.add_adapters(model, params, (spec,), rng)`: base weights kept, A random, B zero."""
  if any(isinstance(a, LoraSpec) for a in model.adapters):
    raise ConfigError(f"the model already has LoRA adapters ({model.adapters}); merge_lora first")
  return adapter_lib.add_adapters(model, params, (spec,), rng)


def merge_lora(model: models.Model, params) -> tuple[models.Model, dict]:
  """`adapter.merge_adapters` for a LoRA model: the base model and its merged params."""
  if not any(isinstance(a, LoraSpec) for a in model.adapters):
    raise ConfigError("merge_lora needs a model with LoRA adapters; this one has none")
  return adapter_lib.merge_adapters(model, params)


def from_peft(model: models.Model, config: dict, tensors: dict[str, np.ndarray],
              where: str) -> tuple[LoraSpec, keymap.FlatParams, dict[str, np.ndarray]]:
  """(spec, adapter values, other tensors) of a PEFT LORA adapter for the base `model`.

  The adapter's modules become exact targets. Refuses what this LoRA does not
  compute (per-module ranks or alphas, trained biases).
  """
  for key in ("rank_pattern", "alpha_pattern"):
    if config.get(key):
      raise CheckpointError(f"{where} sets {key}; expected one rank and alpha for every module")
  if config.get("bias", "none") != "none":
    raise CheckpointError(f"{where} sets bias={config['bias']!r}; expected 'none'")
  pairs: dict[str, dict[str, np.ndarray]] = {}
  rest = {}
  for name, value in tensors.items():
    m = (re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
         or re.fullmatch(r"(.+)\.lora_magnitude_(vector)(?:\.[^.]+)?(?:\.weight)?", name))
    if not m:
      rest[name] = value
      continue
    target = model.family.table.match_hf(m.group(1) + ".weight")
    if target is None or not target[0].endswith("/kernel"):
      raise CheckpointError(f"adapter tensor {name!r}: no {model.config.model_type} projection "
                            f"is named {m.group(1)!r}")
    pairs.setdefault(target[0][:-len("kernel")], {})[m.group(2)] = value
  if not pairs:
    raise CheckpointError(f"{where} holds no lora_A/lora_B tensors")
  spec = LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                  dropout=float(config.get("lora_dropout", 0.0)),
                  targets=tuple(re.escape(p.rstrip("/")) for p in sorted(pairs)),
                  rslora=bool(config.get("use_rslora", False)),
                  dora=bool(config.get("use_dora", False)))
  shapes = keymap.flatten(models.Model.build(model.config, adapters=(spec,)).abstract_params)
  values = {}
  for prefix, pair in pairs.items():
    if not {"A", "B"} <= set(pair):
      raise CheckpointError(f"adapter of {prefix.rstrip('/')!r} lacks lora_"
                            f"{'B' if 'A' in pair else 'A'}")
    if spec.dora != ("vector" in pair):
      raise CheckpointError(f"adapter of {prefix.rstrip('/')!r}: use_dora={spec.dora} but "
                            f"lora_magnitude_vector is {'missing' if spec.dora else 'present'}")
    if spec.dora:
      m_shape = shapes[prefix + "lora_magnitude"].shape
      values[prefix + "lora_magnitude"] = pair["vector"].reshape(m_shape).astype(np.float32)
    a_shape, b_shape = shapes[prefix + "lora_a"].shape, shapes[prefix + "lora_b"].shape
    lora_a, lora_b = pair["A"].T, pair["B"].T
    if lora_a.shape != (math.prod(a_shape[:-1]), a_shape[-1]) or \
        lora_b.shape != (b_shape[0], math.prod(b_shape[1:])):
      raise CheckpointError(f"adapter of {prefix.rstrip('/')!r} has lora_A {pair['A'].shape}, "
                            f"lora_B {pair['B'].shape}; the model needs rank {spec.rank} "
                            f"adapters of a {a_shape[:-1]} -> {b_shape[1:]} projection")
    values[prefix + "lora_a"] = lora_a.reshape(a_shape).astype(np.float32)
    values[prefix + "lora_b"] = lora_b.reshape(b_shape).astype(np.float32)
  return spec, values, rest


def _from_strategy(strategy: ml_collections.ConfigDict) -> LoraSpec:
  s = strategy.lora
  return LoraSpec(rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=tuple(s.targets),
                  rslora=s.rslora, dora=s.dora)


adapter_lib.register("lora", _from_strategy, peft_type="LORA", from_peft=from_peft,
                     strategy=True)
