"""GPT-2 in Flax NNX: a pre-LayerNorm decoder with learned positions.

It shares the forward loop, masks and KV cache with the Llama family
(`ftjax.models.decoder.DecoderBackbone`) and its heads too (`ftjax.models.heads`,
style "decoder"); what differs is GPT-2's own: learned
position embeddings, LayerNorm with biases, a fused q/k/v projection, a plain
GELU MLP, and dropout after the embeddings, in attention and on each residual
branch (GPT-2 was pre-trained with 0.1 everywhere).

Parameter tree:

  embeddings/{word,position}/embedding               (vocab|positions, embed)
  decoder/layers/{i}/attention_norm/{scale,bias}
  decoder/layers/{i}/attention/qkv/{kernel,bias}     (embed, qkv, heads, kv)
  decoder/layers/{i}/attention/output/{kernel,bias}  (heads, kv, embed)
  decoder/layers/{i}/mlp_norm/{scale,bias}
  decoder/layers/{i}/mlp/up/{kernel,bias}            (embed, mlp)
  decoder/layers/{i}/mlp/down/{kernel,bias}          (mlp, embed)
  final_norm/{scale,bias}
  lm_head/kernel                                     (embed, vocab)   head: untied causal_lm
  classifier/out/kernel                              (embed, labels)  head: classification

Prompt and prefix tuning (`ftjax.peft.prompt`) add `prompt/embedding` and
`decoder/layers/{i}/attention/prefix/...` (see `decoder.DecoderBackbone`);
virtual tokens take the first positions.

The fused q/k/v kernel keeps GPT-2's `c_attn` as one tensor (the key table
stays one rule per tensor); its `qkv` axis (size 3) is never sharded. LoRA
on `.*/attention/qkv` adapts all three, as PEFT's `c_attn` target does.
"""

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ftjax.errors import ConfigError
from ftjax.models import decoder, headed, heads, hf_config, layers


@dataclasses.dataclass(frozen=True)
class Gpt2Config:
  """Architecture of a GPT-2 decoder (config.json names in comments)."""

  vocab_size: int
  hidden_size: int               # n_embd
  num_layers: int                # n_layer
  num_heads: int                 # n_head
  intermediate_size: int         # n_inner, or 4 * n_embd when null
  max_position_embeddings: int   # n_positions
  hidden_act: str = "gelu_new"   # activation_function
  layer_norm_eps: float = 1e-5   # layer_norm_epsilon
  hidden_dropout: float = 0.1    # resid_pdrop
  embedding_dropout: float = 0.1  # embd_pdrop
  attention_dropout: float = 0.1  # attn_pdrop
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  pad_token_id: int | None = None
  initializer_range: float = 0.02
  # "decoder", "causal_lm" or "classification" (as the Llama family).
  task: str = "causal_lm"
  num_labels: int = 2
  pooling: str = "pooler"
  dtype: str = "float32"
  hf_extra: tuple[tuple[str, Any], ...] = ()
  # How the layer stack runs (remat, scan, activation sharding); not exported.
  execution: layers.Execution = layers.Execution()

  model_type = "gpt2"  # A class constant, not a field: one model type.

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def window(self, layer: int) -> None:
    del layer  # GPT-2 attends over the whole causal prefix in every layer.
    return None

  def attention_scale(self, layer: int) -> float:
    """What transformers multiplies q.k by in layer `layer`."""
    scale = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
    return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale

  @classmethod
  def from_hf(cls, hf: dict, *, task: str, num_labels: int | None, dtype: str,
              pooling: str = "pooler") -> "Gpt2Config":
    if hf["model_type"] != "gpt2":
      raise ConfigError(f"model_type {hf['model_type']!r} is not GPT-2")
    pooling = heads.SequenceClassifier.check_pooling("decoder", pooling)
    if hf.get("add_cross_attention"):
      raise ConfigError("add_cross_attention=True (GPT-2 as an encoder-decoder's decoder) is "
                        "not supported; expected false")
    hidden = hf.get("n_embd", 768)
    return cls(
        vocab_size=hf.get("vocab_size", 50257), hidden_size=hidden,
        num_layers=hf.get("n_layer", 12), num_heads=hf.get("n_head", 12),
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf.get("n_positions", 1024),
        hidden_act=hf.get("activation_function", "gelu_new"),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_dropout=hf.get("resid_pdrop", 0.1), embedding_dropout=hf.get("embd_pdrop", 0.1),
        attention_dropout=hf.get("attn_pdrop", 0.1),
        scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        task=task, num_labels=heads.num_labels(hf, num_labels), pooling=pooling, dtype=dtype,
        hf_extra=hf_config.extra_fields(hf, _HF_FIELDS))

  def to_hf(self) -> dict:
    """The Hugging Face config.json contents for this architecture."""
    hf = hf_config.restore(self.hf_extra)
    hf.update(
        model_type="gpt2", vocab_size=self.vocab_size, n_embd=self.hidden_size,
        n_layer=self.num_layers, n_head=self.num_heads,
        n_inner=None if self.intermediate_size == 4 * self.hidden_size else self.intermediate_size,
        n_positions=self.max_position_embeddings, activation_function=self.hidden_act,
        layer_norm_epsilon=self.layer_norm_eps, resid_pdrop=self.hidden_dropout,
        embd_pdrop=self.embedding_dropout, attn_pdrop=self.attention_dropout,
        scale_attn_weights=self.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=self.tie_word_embeddings, pad_token_id=self.pad_token_id,
        initializer_range=self.initializer_range)
    hf.update(heads.hf_config(self.task, hf, self.num_labels))
    return hf


_HF_FIELDS = {
    "model_type", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
    "activation_function", "layer_norm_epsilon", "resid_pdrop", "embd_pdrop", "attn_pdrop",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings",
    "pad_token_id", "initializer_range", "architectures", "transformers_version", "dtype",
    "torch_dtype", "label2id", "num_labels"}


def _residual_std(cfg: Gpt2Config) -> float:
  # GPT-2 scales the init of projections into the residual stream by
  # 1/sqrt(2 * n_layer) (transformers' GPT2PreTrainedModel._init_weights).
  return cfg.initializer_range / math.sqrt(2 * cfg.num_layers)


class Attention(nnx.Module):

  def __init__(self, cfg: Gpt2Config, layer: int, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    self.qkv = layers.Dense(cfg.hidden_size, (3, cfg.num_heads, cfg.head_dim),
                            axes=("embed", "qkv", "heads", "kv"), init_std=std, dtype=dtype,
                            rngs=rngs)
    self.output = layers.Dense((cfg.num_heads, cfg.head_dim), cfg.hidden_size,
                               axes=("heads", "kv", "embed"), init_std=_residual_std(cfg),
                               dtype=dtype, rngs=rngs)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)
    self.scale = cfg.attention_scale(layer)

  def __call__(self, x_bte, mask, cache_kv, ctx: decoder.Context, *, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    qkv_bt3hd = self.qkv(x_bte, **kw)
    q_bthd, k_bthd, v_bthd = (qkv_bt3hd[:, :, i] for i in range(3))
    k_bshd, v_bshd = ctx.attend_over(cache_kv, k_bthd, v_bthd, getattr(self, "prefix", None))
    out_bthd = decoder.attention(q_bthd, k_bshd, v_bshd, mask, scale=self.scale,
                                 dropout=self.attention_dropout, **kw)
    return self.dropout(self.output(out_bthd, **kw), **kw), (k_bshd, v_bshd)


class Mlp(nnx.Module):

  def __init__(self, cfg: Gpt2Config, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    self.up = layers.Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"),
                           init_std=std, dtype=dtype, rngs=rngs)
    self.down = layers.Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"),
                             init_std=_residual_std(cfg), dtype=dtype, rngs=rngs)
    self.activation = layers.activation(cfg.hidden_act)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  def __call__(self, x_bte, *, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    return self.dropout(self.down(self.activation(self.up(x_bte, **kw)), **kw), **kw)


class DecoderLayer(nnx.Module):
  """Pre-LayerNorm layer: x += attention(ln_1(x)); x += mlp(ln_2(x))."""

  def __init__(self, cfg: Gpt2Config, layer: int, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.attention_norm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                            dtype=dtype, rngs=rngs)
    self.attention = Attention(cfg, layer, rngs=rngs)
    self.mlp_norm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype,
                                      rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_bte, mask, extra, cache_kv, ctx, *, deterministic, rngs):
    del extra  # No RoPE: positions entered with the embeddings.
    h_bte, kv = self.attention(self.attention_norm(x_bte), mask, cache_kv, ctx,
                               deterministic=deterministic, rngs=rngs)
    x_bte = x_bte + h_bte
    x_bte = x_bte + self.mlp(self.mlp_norm(x_bte), deterministic=deterministic, rngs=rngs)
    return x_bte, kv


class Embeddings(nnx.Module):

  def __init__(self, cfg: Gpt2Config, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    self.word = layers.embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                             init_std=std, dtype=dtype, rngs=rngs)
    self.position = layers.embed(cfg.max_position_embeddings, cfg.hidden_size,
                                 axes=("positions", "embed"), init_std=std, dtype=dtype,
                                 rngs=rngs)
    self.dropout = nnx.Dropout(cfg.embedding_dropout)

  def __call__(self, words_bte, positions_bt, *, deterministic, rngs):
    """Token embeddings (`word`, or prompt tuning's virtual ones) + positions, dropped out."""
    x_bte = words_bte + self.position(positions_bt)
    return self.dropout(x_bte, deterministic=deterministic, rngs=rngs)


class Decoder(nnx.Module):

  def __init__(self, cfg: Gpt2Config, *, rngs: nnx.Rngs):
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])


class Gpt2Backbone(decoder.DecoderBackbone):
  """Token + position embeddings, decoder, final LayerNorm: hidden states."""

  def __init__(self, cfg: Gpt2Config, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.final_norm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                        dtype=jnp.dtype(cfg.dtype), rngs=rngs)

  KV_AXES = ("heads", "kv")

  def embed(self, words_bte, positions_bt, *, deterministic, rngs):
    return self.embeddings(words_bte, positions_bt, deterministic=deterministic, rngs=rngs)

  def layer_inputs(self, positions_bt):
    del positions_bt
    return None


class Gpt2Model(Gpt2Backbone, headed.HeadedModel):
  """The backbone with the head the config's task selects (`ftjax.models.heads`)."""

  def __init__(self, cfg: Gpt2Config, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.attach_head(cfg, "decoder", word_embedding=self.embeddings.word, rngs=rngs)
