"""Layers shared by the model families.

Every parameter carries `logical_axes` metadata (t5x-style names such as
`embed`, `mlp`, `heads`, `kv`, `vocab`); `ftjax.sharding` maps those names to
mesh axes through rules in the config, so model code never mentions a mesh.
Weights are kept in `param_dtype` (float32 master weights); `dtype` is the
compute dtype.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
  """The activation function Hugging Face calls `name`."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _axes(names: Sequence[str]) -> dict:
  return {"logical_axes": tuple(names)}


class Dense(nnx.LinearGeneral):
  """A (general) dense layer whose kernel and bias carry logical axis names.

  `in_features`/`out_features` may be tuples: attention projections keep the
  head axis explicit, e.g. a query kernel is `(embed, heads, kv)`, so tensor
  parallelism can shard heads without reshaping anything.
  """

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int], *,
               axes: Sequence[str], init_std: float, dtype, param_dtype=jnp.float32,
               use_bias: bool = True, rngs: nnx.Rngs):
    in_tuple = tuple(in_features) if isinstance(in_features, Sequence) else (in_features,)
    out_tuple = tuple(out_features) if isinstance(out_features, Sequence) else (out_features,)
    if len(axes) != len(in_tuple) + len(out_tuple):
      raise ValueError(f"axes {axes} do not match kernel shape {in_tuple + out_tuple}")
    # Kept so ftjax.peft.lora can build an adapter of matching shape.
    self.axes = tuple(axes)
    self.init_std = init_std
    super().__init__(
        in_tuple, out_tuple,
        axis=tuple(range(-len(in_tuple), 0)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=jax.nn.initializers.normal(init_std),
        bias_init=jax.nn.initializers.zeros,
        kernel_metadata=_axes(axes),
        bias_metadata=_axes(axes[len(in_tuple):]),
        rngs=rngs,
    )


  def kernel_value(self) -> jax.Array:
    """The kernel as the forward pass uses it; a quantised base (`ftjax.peft.quant`)
    dequantises here, so adapters stacked on it see a float kernel."""
    return self.kernel[...]

  def contract(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x`'s trailing input axes contracted with `kernel`'s leading ones, in `self.dtype`."""
    n_in = len(self.in_features)
    x, kernel = self.promote_dtype((x, kernel), dtype=self.dtype)
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims, precision=self.precision)

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    # deterministic/rngs: used by adapters (LoRA's dropout, `ftjax.peft`) that
    # extend this layer; every model passes them to every projection.
    del deterministic, rngs
    out = self.contract(inputs, self.kernel_value())
    if self.bias is not None:
      (bias,) = self.promote_dtype((self.bias[...],), dtype=self.dtype)
      out = out + bias
    return out


def embed(num_embeddings: int, features: int, *, axes: Sequence[str], init_std: float,
          dtype, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                   embedding_init=jax.nn.initializers.normal(init_std),
                   embedding_metadata=_axes(axes), rngs=rngs)


def layer_norm(features: int, *, eps: float, dtype, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2], as PyTorch computes it.
  return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                       use_fast_variance=False, scale_metadata=_axes(("embed",)),
                       bias_metadata=_axes(("embed",)), rngs=rngs)


class RMSNorm(nnx.Module):
  """Root-mean-square norm as Llama-family checkpoints define it (no mean, no bias).

  Hugging Face's LlamaRMSNorm (and Qwen2/Qwen3/Mistral's copies) computes
  `x * rsqrt(mean(x^2) + eps)` in float32, casts back to the input dtype and
  only then multiplies by the weight; doing the same here keeps bfloat16
  runs close to PyTorch's, not just float32 ones.
  """

  def __init__(self, features: int, *, eps: float, dtype, param_dtype=jnp.float32,
               axes: Sequence[str] = ("embed",)):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), **_axes(axes))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * normed.astype(x.dtype).astype(self.dtype)


def rms_norm(features: int, *, eps: float, dtype, param_dtype=jnp.float32,
             axes: Sequence[str] = ("embed",), rngs: nnx.Rngs | None = None) -> RMSNorm:
  """An `RMSNorm` whose `scale` has logical axes `axes` (("kv",) for per-head norms)."""
  del rngs  # The scale starts at one; taken for the same signature as `layer_norm`.
  return RMSNorm(features, eps=eps, dtype=dtype, param_dtype=param_dtype, axes=axes)


def padding_mask(attention_mask_bs: jax.Array) -> jax.Array:
  """(batch, seq) 1/0 mask -> boolean (batch, 1, 1, seq) mask for `attention`."""
  return attention_mask_bs.astype(bool)[:, None, None, :]


def attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, mask: jax.Array, *,
              dropout: nnx.Dropout, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """Scaled dot-product attention; `mask` is boolean, True where a key is visible.

  Without dropout on the probabilities (evaluation, or a rate of 0) this is
  `jax.nn.dot_product_attention`, which picks a fused kernel where one exists.
  Training with attention dropout (as BERT-style models were pre-trained)
  needs the probabilities explicitly.
  """
  if deterministic or dropout.rate == 0.0:
    return jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, mask=mask)
  depth = q_bthd.shape[-1]
  logits_bhts = jnp.einsum("bthd,bshd->bhts", q_bthd, k_bshd) / jnp.sqrt(depth).astype(q_bthd.dtype)
  logits_bhts = jnp.where(mask, logits_bhts, jnp.finfo(logits_bhts.dtype).min)
  probs_bhts = jax.nn.softmax(logits_bhts.astype(jnp.float32), axis=-1).astype(q_bthd.dtype)
  probs_bhts = dropout(probs_bhts, deterministic=False, rngs=rngs)
  return jnp.einsum("bhts,bshd->bthd", probs_bhts, v_bshd)


# --- Running the layer stack -------------------------------------------------

# jax.checkpoint policies by config name: what the backward pass may keep from
# the forward pass instead of recomputing it ("full" keeps nothing but each
# layer's input).
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class Execution:
  """How a model runs its stack of layers; nothing here changes what it computes.

  remat: "none", or a `REMAT_POLICIES` name: each layer is a
    `jax.checkpoint`, so its backward pass recomputes what the policy does
    not save (less activation memory, more FLOPs).
  scan_groups: ((start, stop), ...) ranges of layers that each run as one
    `jax.lax.scan` over their weights stacked inside the step (one layer body
    traced per range instead of one per layer); empty: a Python
    loop. The parameter tree stays per layer, so checkpoints, key tables,
    partition rules and LoRA targets are the same either way. Ranges come from
    the partition (`ftjax.peft.partition.layer_groups`): frozen and trainable
    layers scan separately, so a frozen prefix still gets no backward pass.
  activation_sharding: the sharding of the (batch, length, embed) hidden
    state at every layer boundary (`jax.lax.with_sharding_constraint`), or
    None. A dimension its mesh axes do not divide (a generation batch of 3 on
    a data axis of 2) is left to the compiler.
  """

  remat: str = "none"
  scan_groups: tuple[tuple[int, int], ...] = ()
  activation_sharding: jax.sharding.NamedSharding | None = None


def constrain(x_bte: jax.Array, execution: Execution) -> jax.Array:
  """`x_bte` constrained to `execution.activation_sharding` where the mesh divides its shape."""
  sharding = execution.activation_sharding
  if sharding is None:
    return x_bte
  spec = []
  for size, axes in zip(x_bte.shape, tuple(sharding.spec) + (None,) * x_bte.ndim):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(sharding.mesh.shape[a] for a in names)
    spec.append(axes if size % ways == 0 else None)
  return jax.lax.with_sharding_constraint(
      x_bte, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))


def run_layers(layer_list: Sequence[nnx.Module], x: jax.Array, fn: Callable, *,
               execution: Execution, rngs: nnx.Rngs | None,
               static_key: Callable[[int], Hashable] = lambda i: None) -> tuple[jax.Array, list]:
  """`x` through every layer in order, as `execution` says; returns (x, per-layer outputs).

  Layer i runs `x, out_i = fn(layer_i, x, rngs_i, static_key(i))`. `rngs_i`
  draws dropout keys from `fold_in(key, i)`, with `key` drawn from `rngs` once,
  so every layer has its own stream and a scanned stack draws exactly what
  the loop draws. Layers scan together only when their graphs (structure and
  static attributes) and `static_key`s are equal; `fn` may branch on the
  static key (a decoder's sliding window) but not on the layer's index.
  """
  key = None if rngs is None else rngs.dropout()
  policy = REMAT_POLICIES.get(execution.remat)

  def body(graphdef, static, state, x, index):
    layer = nnx.merge(graphdef, state)
    layer_rngs = None if key is None else nnx.Rngs(dropout=jax.random.fold_in(key, index))
    x, out = fn(layer, x, layer_rngs, static)
    return constrain(x, execution), out

  def checkpointed(graphdef, static, *, in_scan: bool):
    call = functools.partial(body, graphdef, static)
    if execution.remat == "none":
      return call
    # Inside a scan, CSE cannot merge the recomputation into the forward pass.
    return jax.checkpoint(call, policy=policy, prevent_cse=not in_scan)

  x = constrain(x, execution)
  n = len(layer_list)
  ranges = execution.scan_groups or tuple((i, i + 1) for i in range(n))
  if sorted(i for a, b in ranges for i in range(a, b)) != list(range(n)):
    raise ValueError(f"scan_groups {ranges} do not cover the {n} layers once each")
  graphs = [nnx.split(layer) for layer in layer_list]
  outs = [None] * n
  for start, stop in ranges:
    # Split further where a layer cannot share the scanned body.
    for a, b in _runs(start, stop, lambda i: (graphs[i][0], static_key(i))):
      if b - a == 1:
        x, outs[a] = checkpointed(graphs[a][0], static_key(a), in_scan=False)(graphs[a][1], x, a)
        continue
      step = checkpointed(graphs[a][0], static_key(a), in_scan=True)
      stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(s for _, s in graphs[a:b]))
      x, ys = jax.lax.scan(lambda x, xs: step(xs[0], x, xs[1]), x,
                           (stacked, jnp.arange(a, b)))
      for i in range(a, b):
        outs[i] = jax.tree.map(lambda y, j=i - a: y[j], ys)
  return x, outs


def _runs(start: int, stop: int, key: Callable[[int], Hashable]) -> list[tuple[int, int]]:
  """[start, stop) cut into maximal runs of consecutive indices with equal `key`."""
  runs = [list(run) for _, run in itertools.groupby(range(start, stop), key)]
  return [(run[0], run[-1] + 1) for run in runs]
