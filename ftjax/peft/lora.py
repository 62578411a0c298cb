"""LoRA adapters: inject into a model, add to loaded weights, merge back.

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
  model, params = add_lora(model, params, LoraSpec(rank=8, alpha=16.0), rng)
  ... train the leaves at lora_paths(params) ...
  base_model, base_params = merge_lora(model, params)
  ftjax.models.save_pretrained(base_params, base_model.config, out_dir)
"""

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.errors import ConfigError
from ftjax.models import keymap, layers
from ftjax.models.pretrained import Model, Params

# The logical axis name of the rank dimension; sharding rules leave it
# replicated unless told otherwise (it is tiny).
LORA_AXIS = "lora"
_ADAPTER_LEAVES = ("lora_a", "lora_b")
# The target "all-linear" (PEFT's name): every projection inside the layers,
# not the embeddings or task heads.
ALL_LINEAR = "all-linear"
_ALL_LINEAR_REGEX = r"(encoder|decoder)/layers/\d+/.*"


def target_regex(target: str) -> str:
  """The module-path regex a LoRA target stands for."""
  return _ALL_LINEAR_REGEX if target == ALL_LINEAR else target


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which dense layers get adapters, and their shape.

  `targets` are regexes matched with `re.fullmatch` against module paths
  such as `encoder/layers/3/attention/query` (or "all-linear": every
  projection in the layers); every regex must match at least one dense
  layer, so a typo fails loudly instead of training nothing.
  """

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


def _validate(spec: LoraSpec) -> None:
  """Raises a one-line ConfigError naming the first bad value of `spec`."""
  if spec.rank < 1:
    raise ConfigError(f"LoRA rank {spec.rank}; expected >= 1")
  if not spec.alpha > 0:
    raise ConfigError(f"LoRA alpha {spec.alpha}; expected > 0")
  if not 0.0 <= spec.dropout < 1.0:
    raise ConfigError(f"LoRA dropout {spec.dropout}; expected 0 <= dropout < 1")
  if not spec.targets:
    raise ConfigError("LoRA targets are empty; expected at least one module-path regex")
  for target in spec.targets:
    try:
      re.compile(target_regex(target))
    except re.error as e:
      raise ConfigError(f"LoRA target {target!r} is not a valid regex: {e}") from None


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


def inject(module: nnx.Module, spec: LoraSpec, *, rngs: nnx.Rngs) -> None:
  """Replaces every targeted `layers.Dense` in `module` with a `LoraDense`, in place.

  Called by `Model.build(config, lora=spec)` right after the family's module
  is built (under `nnx.eval_shape`, or inside a jitted init), so it must not
  look at parameter values.
  """
  patterns = [re.compile(target_regex(t)) for t in spec.targets]  # Validated by LoraSpec.
  dense_paths = [(path, m) for path, m in nnx.iter_modules(module)
                 if isinstance(m, layers.Dense)]
  names = {path: "/".join(map(str, path)) for path, _ in dense_paths}
  for target, pattern in zip(spec.targets, patterns):
    if not any(pattern.fullmatch(name) for name in names.values()):
      examples = ", ".join(repr(n) for n in list(names.values())[:3])
      raise ConfigError(f"LoRA target {target!r} matches no dense layer (targets are "
                        f"re.fullmatch'ed against module paths such as {examples})")
  for path, dense in dense_paths:
    if not any(p.fullmatch(names[path]) for p in patterns):
      continue
    if isinstance(dense, LoraDense):
      raise ConfigError(f"{names[path]} already has a LoRA adapter; merge_lora first")
    lora = LoraDense.from_dense(dense, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                                rngs=rngs)
    parent = module
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
      parent[path[-1]] = lora
    else:
      setattr(parent, path[-1], lora)


def lora_paths(params: Params) -> list[str]:
  """Flat paths ("a/b/0/lora_a") of the adapter leaves in `params`."""
  return [p for p in keymap.flatten(params) if p.rsplit("/", 1)[-1] in _ADAPTER_LEAVES]


def add_lora(model: Model, params: Params, spec: LoraSpec,
             rng: jax.Array) -> tuple[Model, Params]:
  """(model, params) with adapters added: base weights kept, A random, B zero.

  Only the adapter leaves are initialised (XLA drops the rest of the init),
  so this is cheap even for a large model.
  """
  if model.lora is not None:
    raise ConfigError(f"the model already has LoRA adapters ({model.lora}); merge_lora first")
  lora_model = Model.build(model.config, lora=spec)
  adapters = lora_paths(lora_model.abstract_params)
  flat = dict(keymap.flatten(params))
  expected = set(keymap.flatten(lora_model.abstract_params)) - set(adapters)
  if set(flat) != expected:
    odd = sorted(set(flat) ^ expected)
    raise ValueError(f"params do not fit the model {model.config.model_type}: {odd[:3]}")
  flat.update(lora_model.init(rng, only=adapters))
  return lora_model, keymap.unflatten(flat, lora_model.abstract_params)


def merge_lora(model: Model, params: Params) -> tuple[Model, Params]:
  """Folds each adapter into its kernel: W + (alpha/rank) A B; returns the base model.

  The result has exactly the base model's parameter tree, so it can be
  exported with `ftjax.models.save_pretrained` and loaded by transformers.
  """
  if model.lora is None:
    raise ConfigError("merge_lora needs a model with LoRA adapters; this one has none")
  scale = model.lora.scale
  flat = dict(keymap.flatten(params))
  for path in lora_paths(params):
    if not path.endswith("/lora_a"):
      continue
    prefix = path[:-len("lora_a")]
    lora_a, lora_b = flat.pop(prefix + "lora_a"), flat.pop(prefix + "lora_b")
    kernel = flat[prefix + "kernel"]
    # (in..., rank) x (rank, out...) -> (in..., out...), in full float32 even
    # where matmuls default to bfloat16 passes (TPU).
    delta = jnp.tensordot(lora_a, lora_b, axes=1, precision=jax.lax.Precision.HIGHEST)
    flat[prefix + "kernel"] = (kernel + scale * delta).astype(kernel.dtype)
  base = Model.build(model.config)
  return base, keymap.unflatten(flat, base.abstract_params)
