"""Layers shared by the model families.

Every parameter carries `logical_axes` metadata (t5x-style names such as
`embed`, `mlp`, `heads`, `kv`, `vocab`); `ftjax.sharding` maps those names to
mesh axes through rules in the config, so model code never mentions a mesh.
Weights are kept in `param_dtype` (float32 master weights); `dtype` is the
compute dtype.
"""

from collections.abc import Sequence

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


  def __call__(self, inputs: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del deterministic, rngs  # Used by LoRA adapters (ftjax.peft.lora) on their input.
    return super().__call__(inputs)


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
