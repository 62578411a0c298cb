"""Llama-family decoders in Flax NNX: Llama, Mistral, Qwen2 and Qwen3.

All four are one pre-RMSNorm transformer decoder with rotary positions,
grouped-query attention and a gated (SwiGLU) MLP; they differ only in
switches the config carries:

  Llama    attention_bias / mlp_bias (usually off), llama3 RoPE scaling
  Mistral  sliding-window attention (when config.json sets sliding_window)
  Qwen2    q/k/v biases (no output bias), sliding window if use_sliding_window
  Qwen3    per-head RMSNorm on queries and keys; head_dim set independently

Parameter tree (the names partition rules, LoRA targets and sharding use):

  embeddings/word/embedding                          (vocab, embed)
  decoder/layers/{i}/attention_norm/scale            (embed,)
  decoder/layers/{i}/attention/query/{kernel,bias}   (embed, heads, kv)
  decoder/layers/{i}/attention/{key,value}/{kernel,bias}  (embed, kv_heads, kv)
  decoder/layers/{i}/attention/output/{kernel,bias}  (heads, kv, embed)
  decoder/layers/{i}/attention/{query,key}_norm/scale  (kv,)      Qwen3
  decoder/layers/{i}/mlp_norm/scale
  decoder/layers/{i}/mlp/{gate,up}/kernel            (embed, mlp)
  decoder/layers/{i}/mlp/down/kernel                 (mlp, embed)
  final_norm/scale
  lm_head/kernel                                     (embed, vocab)   head: untied causal_lm
  classifier/out/kernel                              (embed, labels)  head: classification

Prompt and prefix tuning (`ftjax.peft.prompt`) add `prompt/embedding` and
`decoder/layers/{i}/attention/prefix/...` (see `decoder.DecoderBackbone`).

`LlamaBackbone` returns hidden states; `LlamaFamilyModel` adds the head the
config's task selects (`ftjax.models.heads`, style "decoder").
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import ConfigError
from ftjax.models import decoder, headed, heads, hf_config, layers

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TASKS = ("decoder", "causal_lm", "classification")
FULL, SLIDING = "full_attention", "sliding_attention"
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a Llama-family decoder, in one vocabulary for all four."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # "default" or "llama3", with the llama3 parameters in `rope_scaling`
  # as sorted (name, value) pairs (hashable).
  rope_type: str = "default"
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  qkv_bias: bool = False
  output_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3's per-head RMSNorm on queries and keys.
  # Window of the layers whose layer_types entry is "sliding_attention".
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  tie_word_embeddings: bool = False
  attention_dropout: float = 0.0
  pad_token_id: int | None = None
  initializer_range: float = 0.02
  # "decoder" (hidden states), "causal_lm" (next-token logits) or
  # "classification" (logits at the last non-padding token).
  task: str = "causal_lm"
  num_labels: int = 2
  # Decoders classify from the last non-padding token, as the HF head does;
  # "last" is accepted as a synonym and stored as "pooler".
  pooling: str = "pooler"
  # Compute dtype; parameters are always float32.
  dtype: str = "float32"
  # Fields of the Hugging Face config that ftjax does not use, kept so an
  # exported config.json round-trips. Hashable.
  hf_extra: tuple[tuple[str, Any], ...] = ()
  # How the layer stack runs (remat, scan, activation sharding); not exported.
  execution: layers.Execution = layers.Execution()

  def window(self, layer: int) -> int | None:
    """The sliding window of layer `layer`, or None for full causal attention."""
    return self.sliding_window if self.layer_types[layer] == SLIDING else None

  @classmethod
  def from_hf(cls, hf: dict, *, task: str, num_labels: int | None, dtype: str,
              pooling: str = "pooler") -> "DecoderConfig":
    model_type = hf["model_type"]
    if model_type not in MODEL_TYPES:
      raise ConfigError(f"model_type {model_type!r} is not a Llama-family decoder; expected one "
                        f"of {MODEL_TYPES}")
    pooling = heads.SequenceClassifier.check_pooling("decoder", pooling)
    used = set(_COMMON_HF_FIELDS)
    num_heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or num_heads
    if num_heads % kv_heads:
      raise ConfigError(f"num_key_value_heads={kv_heads} does not divide "
                        f"num_attention_heads={num_heads}")
    head_dim = hf.get("head_dim") or (128 if model_type == "qwen3"
                                      else hf["hidden_size"] // num_heads)
    bias = bool(hf.get("attention_bias", False))
    switches = dict(
        llama=dict(qkv_bias=bias, output_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False))),
        mistral={},
        qwen2=dict(qkv_bias=True),
        qwen3=dict(qkv_bias=bias, output_bias=bias, qk_norm=True),
    )[model_type]
    used |= {"attention_bias", "mlp_bias"} if model_type in ("llama", "qwen3") else set()
    window, layer_types = _sliding_window(hf, model_type)
    if model_type != "llama":
      used |= {"sliding_window", "layer_types"}
    return cls(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=num_heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        hidden_act=hf.get("hidden_act", "silu"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        **_rope(hf), sliding_window=window, layer_types=layer_types,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_dropout=hf.get("attention_dropout", 0.0) or 0.0,
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02), task=task,
        num_labels=heads.num_labels(hf, num_labels), pooling=pooling, dtype=dtype,
        hf_extra=hf_config.extra_fields(hf, used), **switches)

  def to_hf(self) -> dict:
    """The Hugging Face config.json contents for this architecture."""
    hf = hf_config.restore(self.hf_extra)
    hf.update(
        model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        hidden_act=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
        rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
        attention_dropout=self.attention_dropout, pad_token_id=self.pad_token_id,
        initializer_range=self.initializer_range)
    if self.model_type != "qwen2" or self.head_dim != self.hidden_size // self.num_heads:
      hf["head_dim"] = self.head_dim
    scaling = dict(self.rope_scaling)
    # transformers >= 5 reads rope_parameters; older versions rope_theta and
    # rope_scaling (newer ones fold those into rope_parameters).
    hf["rope_parameters"] = dict(rope_type=self.rope_type, rope_theta=self.rope_theta, **scaling)
    hf["rope_theta"] = self.rope_theta
    hf["rope_scaling"] = (None if self.rope_type == "default"
                          else dict(rope_type=self.rope_type, **scaling))
    if self.model_type == "llama":
      hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    elif self.model_type == "qwen3":
      hf["attention_bias"] = self.qkv_bias
    if self.model_type != "llama":
      hf["sliding_window"] = self.sliding_window
    if self.model_type in ("qwen2", "qwen3"):
      hf["layer_types"] = list(self.layer_types)
    hf.update(heads.hf_config(self.task, hf, self.num_labels))
    return hf


_COMMON_HF_FIELDS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "attention_dropout", "pad_token_id", "initializer_range",
    "architectures", "transformers_version", "dtype", "torch_dtype", "label2id", "num_labels"}


def _rope(hf: dict) -> dict:
  """RoPE fields from `rope_parameters` (transformers >= 5) or rope_theta/rope_scaling."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
  rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
  params.pop("type", None)
  if rope_type not in _ROPE_TYPES:
    raise ConfigError(f"rope_type {rope_type!r} is not supported; expected one of {_ROPE_TYPES}")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} is not "
                      f"supported; expected 1.0")
  scaling = {}
  if rope_type == "llama3":
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
    if missing:
      raise ConfigError(f"llama3 rope scaling lacks {missing[0]!r}; expected {_LLAMA3_KEYS}")
    scaling = {k: params[k] for k in _LLAMA3_KEYS}
  return dict(rope_theta=float(theta), rope_type=rope_type,
              rope_scaling=tuple(sorted(scaling.items())))


def _sliding_window(hf: dict, model_type: str) -> tuple[int | None, tuple[str, ...]]:
  """(window, per-layer attention type) as transformers derives them."""
  n = hf["num_hidden_layers"]
  window = None
  if model_type == "mistral":
    # MistralConfig's default when config.json does not say.
    window = hf.get("sliding_window", 4096)
    return window, ((SLIDING if window else FULL),) * n
  if model_type in ("qwen2", "qwen3"):
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types") or [
        SLIDING if window is not None and i >= hf.get("max_window_layers", 28) else FULL
        for i in range(n)]
    if len(layer_types) != n or set(layer_types) - {FULL, SLIDING}:
      raise ConfigError(f"layer_types={layer_types}; expected {n} of {FULL!r}/{SLIDING!r}")
    return window, tuple(layer_types)
  return None, (FULL,) * n


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
  """(head_dim // 2,) float32 inverse frequencies, as transformers' modeling_rope_utils."""
  dim = cfg.head_dim
  inv_freq = (1.0 / (np.float32(cfg.rope_theta)
                     ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  inv_freq = inv_freq.astype(np.float32)
  if cfg.rope_type == "llama3":
    p = dict(cfg.rope_scaling)
    factor, low, high = (np.float32(p[k]) for k in _LLAMA3_KEYS[:3])
    old_context = np.float32(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope_cos_sin(cfg: DecoderConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(batch, t, head_dim // 2) cos and sin of position * frequency, in float32."""
  freqs_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  return jnp.cos(freqs_btf), jnp.sin(freqs_btf)


def apply_rope(x_bthd: jax.Array, cos_btf: jax.Array, sin_btf: jax.Array) -> jax.Array:
  """Rotates (first half, second half) pairs: transformers' `rotate_half` convention."""
  cos, sin = (c[:, :, None, :].astype(x_bthd.dtype) for c in (cos_btf, sin_btf))
  x1, x2 = jnp.split(x_bthd, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    self.query = layers.Dense(cfg.hidden_size, (cfg.num_heads, cfg.head_dim),
                              axes=("embed", "heads", "kv"), init_std=std, dtype=dtype,
                              use_bias=cfg.qkv_bias, rngs=rngs)
    self.key, self.value = (
        layers.Dense(cfg.hidden_size, (cfg.num_kv_heads, cfg.head_dim),
                     axes=("embed", "kv_heads", "kv"), init_std=std, dtype=dtype,
                     use_bias=cfg.qkv_bias, rngs=rngs) for _ in range(2))
    self.output = layers.Dense((cfg.num_heads, cfg.head_dim), cfg.hidden_size,
                               axes=("heads", "kv", "embed"), init_std=std, dtype=dtype,
                               use_bias=cfg.output_bias, rngs=rngs)
    if cfg.qk_norm:
      self.query_norm, self.key_norm = (
          layers.rms_norm(cfg.head_dim, eps=cfg.rms_norm_eps, dtype=dtype, axes=("kv",))
          for _ in range(2))
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout)

  def __call__(self, x_bte, mask, rope, cache_kv, ctx: decoder.Context, *, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    q_bthd, k_btkd, v_btkd = self.query(x_bte, **kw), self.key(x_bte, **kw), self.value(x_bte, **kw)
    if hasattr(self, "query_norm"):
      q_bthd, k_btkd = self.query_norm(q_bthd), self.key_norm(k_btkd)
    q_bthd, k_btkd = apply_rope(q_bthd, *rope), apply_rope(k_btkd, *rope)
    # Prefix tuning's keys are used as trained: not rotated, not normed (as in PEFT).
    k_bskd, v_bskd = ctx.attend_over(cache_kv, k_btkd, v_btkd, getattr(self, "prefix", None))
    out_bthd = decoder.attention(q_bthd, k_bskd, v_bskd, mask, dropout=self.attention_dropout,
                                 **kw)
    return self.output(out_bthd, **kw), (k_bskd, v_bskd)


class Mlp(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x))."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    self.gate, self.up = (
        layers.Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"),
                     init_std=std, dtype=dtype, use_bias=cfg.mlp_bias, rngs=rngs)
        for _ in range(2))
    self.down = layers.Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"),
                             init_std=std, dtype=dtype, use_bias=cfg.mlp_bias, rngs=rngs)
    self.activation = layers.activation(cfg.hidden_act)

  def __call__(self, x_bte, *, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    return self.down(self.activation(self.gate(x_bte, **kw)) * self.up(x_bte, **kw), **kw)


class DecoderLayer(nnx.Module):
  """Pre-RMSNorm layer: x += attention(norm(x)); x += mlp(norm(x))."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.attention_norm = layers.rms_norm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.rms_norm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_bte, mask, rope, cache_kv, ctx, *, deterministic, rngs):
    h_bte, kv = self.attention(self.attention_norm(x_bte), mask, rope, cache_kv, ctx,
                               deterministic=deterministic, rngs=rngs)
    x_bte = x_bte + h_bte
    x_bte = x_bte + self.mlp(self.mlp_norm(x_bte), deterministic=deterministic, rngs=rngs)
    return x_bte, kv


class Embeddings(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.word = layers.embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                             init_std=cfg.initializer_range, dtype=jnp.dtype(cfg.dtype),
                             rngs=rngs)


class Decoder(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


class LlamaBackbone(decoder.DecoderBackbone):
  """Token embeddings + decoder + final RMSNorm: hidden states."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.final_norm = layers.rms_norm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                      dtype=jnp.dtype(cfg.dtype))

  def embed(self, words_bte, positions_bt, *, deterministic, rngs):
    del positions_bt, deterministic, rngs  # Positions enter through RoPE; no dropout here.
    return words_bte

  def layer_inputs(self, positions_bt):
    return rope_cos_sin(self.config, positions_bt)


class LlamaFamilyModel(LlamaBackbone, headed.HeadedModel):
  """The backbone with the head the config's task selects (`ftjax.models.heads`)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.attach_head(cfg, "decoder", word_embedding=self.embeddings.word, rngs=rngs)
