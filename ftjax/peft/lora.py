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

  def __post_init__(self):
    # Configs hand over lists; a tuple keeps the spec hashable (it is part of
    # the model's static description).
    object.__setattr__(self, "targets", tuple(self.targets))
    # Checked here, not in `inject`, so a bad value fails where the spec is
    # written rather than inside `nnx.eval_shape` (JAX would add its notes).
    _validate(self)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Replaces every targeted `layers.Dense` in `module` with a `LoraDense`, in place."""
    for path, name, dense in adapter_lib.dense_targets(module, self.targets, "LoRA"):
      if isinstance(dense, LoraDense):
        raise ConfigError(f"{name} already has a LoRA adapter; merge_lora first")
      if type(dense) is not layers.Dense:
        # LoraDense.from_dense keeps only kernel and bias: another adapter's
        # layer would silently lose its parameters.
        raise ConfigError(f"{name} is already adapted ({type(dense).__name__}); LoRA adapts "
                          f"plain dense layers only")
      adapter_lib.replace_module(module, path, LoraDense.from_dense(
          dense, rank=self.rank, alpha=self.alpha, dropout=self.dropout, rngs=rngs))

  def rules(self) -> list[tuple[str, str]]:
    return [(r".*/lora_[ab]", TRAINABLE)]

  def merge(self, params: keymap.FlatParams) -> keymap.FlatParams:
    """Folds each of this spec's adapters into its kernel: W + (alpha/rank) A B."""
    flat = dict(params)
    for prefix in self._adapted(flat):
      lora_a, lora_b = flat.pop(prefix + "lora_a"), flat.pop(prefix + "lora_b")
      kernel = flat[prefix + "kernel"]
      # (in..., rank) x (rank, out...) -> (in..., out...), in full float32 even
      # where matmuls default to bfloat16 passes (TPU).
      delta = jnp.tensordot(lora_a, lora_b, axes=1, precision=jax.lax.Precision.HIGHEST)
      flat[prefix + "kernel"] = (kernel + self.scale * delta).astype(kernel.dtype)
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
      modules.append(module)
    config = {
        "peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha,
        "lora_dropout": self.dropout, "target_modules": hf_adapter.target_modules(model, modules),
        "bias": "none", "fan_in_fan_out": model.config.model_type == "gpt2",
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
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


class LoraDense(layers.Dense):
  """A `layers.Dense` plus a low-rank update: `W x + b + (alpha/rank) B(A(dropout(x)))`.

  Holds `kernel` and `bias` at the same paths and shapes as the Dense it
  replaces (so base weights load unchanged), plus `lora_a` (in..., rank) with
  axes `kernel's input axes + ("lora",)` and `lora_b` (rank, out...) with axes
  `("lora",) + kernel's output axes`.

  Dropout needs `deterministic` and `rngs` at call time: the models pass
  them to every projection (`dense(x, deterministic=..., rngs=...)`), and a
  plain `Dense` ignores them. Storing an RNG stream in the layer instead
  (nnx.Dropout(rngs=...)) would put non-Param state into the parameter tree,
  which `Model` forbids, and would freeze the key at trace time under jit.
  """

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int], *,
               axes: Sequence[str], init_std: float, rank: int, alpha: float,
               dropout: float = 0.0, dtype, param_dtype=jnp.float32, use_bias: bool = True,
               rngs: nnx.Rngs):
    super().__init__(in_features, out_features, axes=axes, init_std=init_std, dtype=dtype,
                     param_dtype=param_dtype, use_bias=use_bias, rngs=rngs)
    n_in = len(self.in_features)
    self.rank = rank
    self.alpha = alpha
    self.scale = alpha / rank
    self.lora_a = nnx.Param(
        _lora_a_init(rngs.params(), (*self.in_features, rank), param_dtype,
                     math.prod(self.in_features)),
        logical_axes=(*self.axes[:n_in], LORA_AXIS))
    self.lora_b = nnx.Param(jnp.zeros((rank, *self.out_features), param_dtype),
                            logical_axes=(LORA_AXIS, *self.axes[n_in:]))
    self.lora_dropout = nnx.Dropout(dropout)

  @classmethod
  def from_dense(cls, dense: layers.Dense, *, rank: int, alpha: float, dropout: float,
                 rngs: nnx.Rngs) -> "LoraDense":
    """An adapted copy of `dense` that keeps its kernel and bias variables."""
    lora = cls(dense.in_features, dense.out_features, axes=dense.axes, init_std=dense.init_std,
               rank=rank, alpha=alpha, dropout=dropout, dtype=dense.dtype,
               param_dtype=dense.param_dtype, use_bias=dense.use_bias, rngs=rngs)
    # The base weights stay the ones the model built (same init, same
    # metadata), so a LoRA model's `init(key)` has the base model's weights.
    lora.kernel = dense.kernel
    lora.bias = dense.bias
    return lora

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    out = super().__call__(inputs)
    x = self.lora_dropout(inputs, deterministic=deterministic, rngs=rngs)
    x, lora_a, lora_b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]),
                                           dtype=self.dtype)
    n_in = len(self.in_features)
    # Contract the trailing input axes with A, then the rank axis with B.
    h = jnp.tensordot(x, lora_a, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                      precision=self.precision)
    delta = jnp.tensordot(h, lora_b, axes=1, precision=self.precision)
    return out + jnp.asarray(self.scale, delta.dtype) * delta


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
  compute (rsLoRA, DoRA, per-module ranks or alphas, trained biases).
  """
  for key in ("use_rslora", "use_dora"):
    if config.get(key, False):
      raise CheckpointError(f"{where} sets {key}={config[key]}; ftjax's LoRA supports plain "
                            f"LoRA only")
  for key in ("rank_pattern", "alpha_pattern"):
    if config.get(key):
      raise CheckpointError(f"{where} sets {key}; expected one rank and alpha for every module")
  if config.get("bias", "none") != "none":
    raise CheckpointError(f"{where} sets bias={config['bias']!r}; expected 'none'")
  pairs: dict[str, dict[str, np.ndarray]] = {}
  rest = {}
  for name, value in tensors.items():
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
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
                  targets=tuple(re.escape(p.rstrip("/")) for p in sorted(pairs)))
  shapes = keymap.flatten(models.Model.build(model.config, adapters=(spec,)).abstract_params)
  values = {}
  for prefix, pair in pairs.items():
    if set(pair) != {"A", "B"}:
      raise CheckpointError(f"adapter of {prefix.rstrip('/')!r} lacks lora_{'AB'[len(pair) % 2]}")
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
  return LoraSpec(rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=tuple(s.targets))


adapter_lib.register("lora", _from_strategy, peft_type="LORA", from_peft=from_peft)
