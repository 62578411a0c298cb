"""Pieces every decoder family shares: the forward loop, KV cache, masks, positions.

A decoder forward pass works in *slots*: the positions of a row in the
(padded) array, or in the cache. Three things decide what a query slot sees:

  causal     key slot <= query slot
  real       the key slot holds a token (attention mask / cache mask)
  segment    key and query belong to the same packed segment (no cache)

plus, for some layers, a sliding window over slots (Mistral; Qwen2/3 when
configured), exactly as Hugging Face's masks index cache positions.

Token *positions* (what RoPE or a position embedding sees) are separate from
slots: by default `cumsum(attention_mask) - 1`, so a left-padded prompt's
first real token is at position 0, as `transformers`' `generate` numbers it.

The KV cache holds every layer's keys and values in fixed-size arrays, so
prefill (t = prompt length) and decode (t = 1) are one code path and one
compiled shape per t. All rows write at the same slot; prompts are
LEFT-padded so their last real tokens line up at the end of the prefill.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import layers
from ftjax.models.outputs import BackboneOutput


class Cache(NamedTuple):
  """Keys and values of everything a decoder has seen, in fixed-size arrays."""

  k: tuple[jax.Array, ...]  # per layer: (batch, max_len, kv_heads, head_dim)
  v: tuple[jax.Array, ...]  # per layer: (batch, max_len, kv_heads, head_dim)
  mask: jax.Array           # (batch, max_len) bool: the slot holds a real token
  index: jax.Array          # () int32: the next slot to write, the same for every row


def init_cache(*, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype) -> Cache:
  """An empty cache: no slot holds a token and writing starts at slot 0."""
  shape = (batch, max_len, kv_heads, head_dim)
  return Cache(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
  """`cumsum(mask) - 1`, clipped at 0: real tokens count from 0 after any left padding."""
  return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=1) - 1, 0)


def positions_from_segments(segment_ids_bt: jax.Array) -> jax.Array:
  """Positions restarting at 0 wherever the segment id changes (packed rows)."""
  t = segment_ids_bt.shape[1]
  slots_t = jnp.arange(t, dtype=jnp.int32)
  starts_bt = jnp.concatenate(
      [jnp.ones_like(segment_ids_bt[:, :1], bool),
       segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
  first_bt = jax.lax.cummax(jnp.where(starts_bt, slots_t, 0), axis=1)
  return slots_t - first_bt


class Context(NamedTuple):
  """What every layer of one forward pass needs besides its input: who sees whom."""

  positions_bt: jax.Array
  key_real_bs: jax.Array          # (batch, keys) bool; with a cache, the updated cache mask
  query_slots_t: jax.Array        # (t,) slot of each query
  key_slots_s: jax.Array          # (keys,) slot of each key
  segment_ids_bt: jax.Array | None
  index: jax.Array | None         # where the new tokens go in the cache

  def mask(self, window: int | None = None) -> jax.Array:
    """(batch, 1, t, keys) bool, True where a query may attend to a key."""
    q_1t1 = self.query_slots_t[None, :, None]
    k_11s = self.key_slots_s[None, None, :]
    mask_bts = (k_11s <= q_1t1) & self.key_real_bs[:, None, :]
    if self.segment_ids_bt is not None:
      mask_bts &= self.segment_ids_bt[:, :, None] == self.segment_ids_bt[:, None, :]
    if window is not None:
      # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window.
      mask_bts &= k_11s > q_1t1 - window
    return mask_bts[:, None]

  def attend_over(self, cache_kv: tuple[jax.Array, jax.Array] | None, k_btkd: jax.Array,
                  v_btkd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys and values to attend over: the new ones, or the cache with them written in."""
    if cache_kv is None:
      return k_btkd, v_btkd
    return tuple(write(c, x, self.index) for c, x in zip(cache_kv, (k_btkd, v_btkd)))

  def updated_cache(self, k: list[jax.Array], v: list[jax.Array]) -> Cache:
    return Cache(k=tuple(k), v=tuple(v), mask=self.key_real_bs,
                 index=self.index + self.query_slots_t.shape[0])


def write(cache_bskd: jax.Array, new_btkd: jax.Array, index: jax.Array) -> jax.Array:
  """`new` written into slots [index, index + t) of every row of `cache`.

  `index + t` must not exceed the cache length: `dynamic_update_slice` would
  clamp the start and silently overwrite earlier slots.
  """
  return jax.lax.dynamic_update_slice(cache_bskd, new_btkd.astype(cache_bskd.dtype),
                                      (0, index, 0, 0))


def context(input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None,
            positions_bt: jax.Array | None, segment_ids_bt: jax.Array | None,
            cache: Cache | None) -> Context:
  """Positions and masking for one forward pass (see the module docstring)."""
  batch, t = input_ids_bt.shape
  if segment_ids_bt is not None and cache is not None:
    raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache; "
                     "decode one sequence per row")
  if attention_mask_bt is None:
    attention_mask_bt = (jnp.ones((batch, t), jnp.int32) if segment_ids_bt is None
                         else (segment_ids_bt != 0).astype(jnp.int32))
  real_bt = attention_mask_bt.astype(bool)
  if segment_ids_bt is not None:
    real_bt &= segment_ids_bt != 0  # Segment 0 is padding.
  query_slots_t = jnp.arange(t, dtype=jnp.int32)
  if cache is None:
    index, key_slots_s, key_real_bs = None, query_slots_t, real_bt
    offset_b1 = 0
  else:
    index = jnp.asarray(cache.index, jnp.int32)
    query_slots_t = query_slots_t + index
    key_slots_s = jnp.arange(cache.mask.shape[1], dtype=jnp.int32)
    key_real_bs = jax.lax.dynamic_update_slice(cache.mask, real_bt, (0, index))
    # Real tokens already in the cache: the new tokens' positions continue from there.
    offset_b1 = cache.mask.sum(axis=1, dtype=jnp.int32)[:, None]
  if positions_bt is None:
    positions_bt = (positions_from_segments(segment_ids_bt) if segment_ids_bt is not None
                    else positions_from_mask(attention_mask_bt) + offset_b1)
  return Context(positions_bt=jnp.asarray(positions_bt, jnp.int32), key_real_bs=key_real_bs,
                 query_slots_t=query_slots_t, key_slots_s=key_slots_s,
                 segment_ids_bt=segment_ids_bt, index=index)


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask: jax.Array, *,
              scale: float | None = None, dropout: nnx.Dropout, deterministic: bool,
              rngs: nnx.Rngs | None) -> jax.Array:
  """Scaled dot-product attention with grouped keys/values (k heads divide q heads).

  Query head n reads key/value head n // (heads / kv_heads), as transformers'
  `repeat_kv` arranges them. Without dropout on the probabilities this is
  `jax.nn.dot_product_attention` (GQA without copying keys). A query row with
  no visible key (left padding) gets finite, meaningless values, never NaN:
  masked logits are a large finite negative, not -inf.
  """
  k_bskd, v_bskd = k_bskd.astype(q_bthd.dtype), v_bskd.astype(q_bthd.dtype)
  if deterministic or dropout.rate == 0.0:
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask, scale=scale)
  groups = q_bthd.shape[2] // k_bskd.shape[2]
  k_bshd, v_bshd = jnp.repeat(k_bskd, groups, axis=2), jnp.repeat(v_bskd, groups, axis=2)
  scale = q_bthd.shape[-1] ** -0.5 if scale is None else scale
  logits_bhts = jnp.einsum("bthd,bshd->bhts", q_bthd, k_bshd).astype(jnp.float32) * scale
  logits_bhts = jnp.where(mask, logits_bhts, jnp.finfo(jnp.float32).min)
  probs_bhts = jax.nn.softmax(logits_bhts, axis=-1).astype(q_bthd.dtype)
  probs_bhts = dropout(probs_bhts, deterministic=False, rngs=rngs)
  return jnp.einsum("bhts,bshd->bthd", probs_bhts, v_bshd)


class DecoderBackbone(nnx.Module):
  """What every decoder family's backbone shares: the forward loop and the KV cache.

  A family sets `config`, `embeddings` (with `word`), `decoder.layers` and
  `final_norm`, and implements `embed` (token ids and positions -> the first
  hidden state) and `layer_inputs` (what every layer needs from the
  positions: RoPE's cos/sin, or None). Each layer is called as
  `layer(x, mask, layer_inputs, cache_kv, context, deterministic=, rngs=)`
  and returns `(x, (keys, values))`, the keys and values it attended over.
  The heads (`ftjax.models.heads`) read what `backbone` returns.

  The config provides num_layers, num_kv_heads, head_dim, dtype, execution
  and `window(layer)`.
  """

  def embed(self, input_ids_bt, positions_bt, *, deterministic, rngs) -> jax.Array:
    raise NotImplementedError

  def layer_inputs(self, positions_bt):
    raise NotImplementedError

  def backbone(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None,
               segment_ids_bt=None, cache: Cache | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> BackboneOutput:
    """Runs the decoder over `input_ids_bt` (batch, t).

    `attention_mask_bt` marks real tokens (1) and padding (0); positions
    default to `cumsum(attention_mask) - 1`, continued from the cache's real
    tokens. `segment_ids_bt` packs several sequences in a row (0 = padding);
    positions then restart per segment unless given. With `cache`, the t new
    tokens are written at the cache's index and attend to everything before
    them; the output carries the updated cache.
    """
    cfg = self.config
    ctx = context(input_ids_bt, attention_mask_bt, positions_bt, segment_ids_bt, cache)
    kw = dict(deterministic=deterministic, rngs=rngs)
    x_bte = self.embed(input_ids_bt, ctx.positions_bt, **kw)
    extra = self.layer_inputs(ctx.positions_bt)
    masks = {}

    def mask(window):
      if window not in masks:
        masks[window] = ctx.mask(window)
      return masks[window]

    embedded_bte = x_bte
    if cache is None:
      def run_layer(layer, x_bte, layer_rngs, window):
        x_bte, _ = layer(x_bte, mask(window), extra, None, ctx, deterministic=deterministic,
                         rngs=layer_rngs)
        return x_bte, x_bte

      x_bte, outputs = layers.run_layers(self.decoder.layers, x_bte, run_layer,
                                         execution=cfg.execution, rngs=rngs,
                                         static_key=cfg.window)
      keys = values = None
    else:
      # Decoding: a plain loop (nothing to differentiate; each layer updates its cache).
      outputs, keys, values = [], [], []
      for i, layer in enumerate(self.decoder.layers):
        x_bte, (k, v) = layer(x_bte, mask(cfg.window(i)), extra, (cache.k[i], cache.v[i]), ctx,
                              **kw)
        outputs.append(x_bte)
        keys.append(k)
        values.append(v)
    hidden_states = [embedded_bte, *outputs]
    x_bte = self.final_norm(x_bte)
    hidden_states[-1] = x_bte
    new_cache = None if cache is None else ctx.updated_cache(keys, values)
    return BackboneOutput(x_bte, tuple(hidden_states), None, new_cache)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + new)."""
    cfg = self.config
    return init_cache(num_layers=cfg.num_layers, batch=batch, max_len=max_len,
                      kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                      dtype=jnp.dtype(dtype or cfg.dtype))
