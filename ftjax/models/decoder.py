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

Virtual tokens (PEFT's prompt learning, `ftjax.peft.prompt`) take the first
slots, in front of every row's tokens (and its left padding):

  prefix slots   [0, prefix)               keys and values only: prefix tuning's
                                           trained `attention.prefix` of each layer
  prompt slots   [prefix, prefix + prompt) prompt tuning's trained embeddings
                                           (`backbone.prompt`), run through the layers
  token slots    after them

Every query sees them (whatever its segment), and positions count them: they
are 0.. in slot order and a row's tokens start after them, as PEFT and
transformers number them (past_key_values for a prefix, inputs_embeds for
a prompt). The outputs hold the tokens' states only. With a cache,
`init_cache` writes the virtual slots once (the prefix, and the prompt run
through the layers), and later calls see them as cached tokens.
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

  positions_bt: jax.Array         # (batch, t): of every query, virtual ones included
  key_real_bs: jax.Array          # (batch, keys) bool; with a cache, the updated cache mask
  query_slots_t: jax.Array        # (t,) slot of each query
  key_slots_s: jax.Array          # (keys,) slot of each key
  segment_ids_bt: jax.Array | None  # (batch, tokens): of the real tokens only
  index: jax.Array | None         # where the new tokens go in the cache
  # Virtual slots in front of the tokens (prefix + prompt; 0 with a cache,
  # which holds them as cached tokens), and what prefix tuning's
  # `attention.prefix` modules read (its reparameterisation's hidden state).
  num_virtual: int = 0
  prefix_hidden: jax.Array | None = None

  def mask(self, window: int | None = None) -> jax.Array:
    """(batch, 1, t, keys) bool, True where a query may attend to a key."""
    q_1t1 = self.query_slots_t[None, :, None]
    k_11s = self.key_slots_s[None, None, :]
    mask_bts = (k_11s <= q_1t1) & self.key_real_bs[:, None, :]
    if self.segment_ids_bt is not None:
      # Segments of every query and key; virtual slots are seen by all.
      n_q = self.query_slots_t.shape[0] - self.segment_ids_bt.shape[1]
      seg_q_bt, seg_k_bs = (
          jnp.pad(self.segment_ids_bt, ((0, 0), (n, 0)), constant_values=-1)
          for n in (n_q, self.num_virtual))
      mask_bts &= ((seg_q_bt[:, :, None] == seg_k_bs[:, None, :])
                   | (k_11s < self.num_virtual))
    if window is not None:
      # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window.
      mask_bts &= k_11s > q_1t1 - window
    return mask_bts[:, None]

  def attend_over(self, cache_kv: tuple[jax.Array, jax.Array] | None, k_btkd: jax.Array,
                  v_btkd: jax.Array, prefix=None) -> tuple[jax.Array, jax.Array]:
    """The keys and values to attend over: the new ones, or the cache with them written in.

    `prefix` is the layer's prefix-tuning module (or None): without a cache,
    its keys and values go in front of the new ones; a cache holds them already
    (`DecoderBackbone.init_cache`).
    """
    if cache_kv is None:
      if prefix is None:
        return k_btkd, v_btkd
      return tuple(jnp.concatenate([jnp.broadcast_to(p_vkd.astype(x.dtype),
                                                     (x.shape[0], *p_vkd.shape)), x], axis=1)
                   for p_vkd, x in zip(prefix(self.prefix_hidden), (k_btkd, v_btkd)))
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
            cache: Cache | None, *, prompt: int = 0, prefix: int = 0) -> Context:
  """Positions and masking for one forward pass (see the module docstring).

  Without a cache, `prefix` key-only slots and `prompt` query slots go in front
  of the tokens; given positions are the tokens' own and shift by both (as
  PEFT shifts a prefix's position_ids). A cache already holds them.
  """
  if cache is not None and (prompt or prefix):
    raise ValueError("with a cache, the virtual tokens are in the cache (init_cache)")
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
  virtual = prefix + prompt
  query_slots_t = jnp.arange(prefix, virtual + t, dtype=jnp.int32)
  if cache is None:
    index, key_slots_s = None, jnp.arange(virtual + t, dtype=jnp.int32)
    key_real_bs = jnp.concatenate([jnp.ones((batch, virtual), bool), real_bt], axis=1)
    offset_b1 = virtual
  else:
    index = jnp.asarray(cache.index, jnp.int32)
    query_slots_t = query_slots_t + index
    key_slots_s = jnp.arange(cache.mask.shape[1], dtype=jnp.int32)
    key_real_bs = jax.lax.dynamic_update_slice(cache.mask, real_bt, (0, index))
    # Real tokens already in the cache: the new tokens' positions continue from there.
    offset_b1 = cache.mask.sum(axis=1, dtype=jnp.int32)[:, None]
  if positions_bt is None:
    positions_bt = (positions_from_segments(segment_ids_bt) + offset_b1
                    if segment_ids_bt is not None
                    else positions_from_mask(attention_mask_bt) + offset_b1)
  else:
    positions_bt = jnp.asarray(positions_bt, jnp.int32) + virtual
  if prompt:
    positions_bt = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(prefix, virtual, dtype=jnp.int32), (batch, prompt)),
         positions_bt], axis=1)
  return Context(positions_bt=jnp.asarray(positions_bt, jnp.int32), key_real_bs=key_real_bs,
                 query_slots_t=query_slots_t, key_slots_s=key_slots_s,
                 segment_ids_bt=segment_ids_bt, index=index, num_virtual=virtual)


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
  `final_norm`, and implements `embed` (token embeddings and positions -> the
  first hidden state: GPT-2 adds its position embeddings) and `layer_inputs`
  (what every layer needs from the positions: RoPE's cos/sin, or None). Each
  layer is called as `layer(x, mask, layer_inputs, cache_kv, context,
  deterministic=, rngs=)` and returns `(x, (keys, values))`, the keys and
  values it attended over; its attention passes its `prefix` module, if it
  has one, to `context.attend_over`.
  The heads (`ftjax.models.heads`) read what `backbone` returns.

  Virtual tokens (the hooks `ftjax.peft.prompt` fills): a `prompt` attribute
  (`num_virtual_tokens`; `prompt()` -> (virtual, embed) embeddings) puts
  prompt tuning's tokens in front of the token embeddings; a `prefix`
  attribute (`num_virtual_tokens`; `prefix()` -> the hidden state its layers'
  modules read, or None) and a `prefix` module on every layer's attention
  (`prefix(hidden)` -> keys, values, each (virtual, kv_heads, head_dim)) add
  prefix tuning's keys and values. `KV_AXES` names a prefix's (kv_heads,
  head_dim) axes.

  The config provides num_layers, num_kv_heads, head_dim, dtype, execution
  and `window(layer)`.
  """

  KV_AXES = ("kv_heads", "kv")

  def embed(self, words_bte, positions_bt, *, deterministic, rngs) -> jax.Array:
    raise NotImplementedError

  def layer_inputs(self, positions_bt):
    raise NotImplementedError

  def attention_modules(self) -> list[nnx.Module]:
    """Every layer's attention module, in order (where prefix tuning adds its keys)."""
    return [layer.attention for layer in self.decoder.layers]

  def num_virtual_tokens(self) -> tuple[int, int]:
    """(prompt tuning's, prefix tuning's) virtual tokens; 0 without the adapter."""
    return tuple(getattr(self, name).num_virtual_tokens if hasattr(self, name) else 0
                 for name in ("prompt", "prefix"))

  def backbone(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None,
               segment_ids_bt=None, cache: Cache | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> BackboneOutput:
    """Runs the decoder over `input_ids_bt` (batch, t).

    `attention_mask_bt` marks real tokens (1) and padding (0); positions
    default to `cumsum(attention_mask) - 1`, continued from the cache's real
    tokens. `segment_ids_bt` packs several sequences in a row (0 = padding);
    positions then restart per segment unless given. With `cache`, the t new
    tokens are written at the cache's index and attend to everything before
    them; the output carries the updated cache. Virtual tokens (prompt and
    prefix tuning) come first, and shift the positions (module docstring).
    """
    prompt, prefix = self.num_virtual_tokens() if cache is None else (0, 0)
    ctx = context(input_ids_bt, attention_mask_bt, positions_bt, segment_ids_bt, cache,
                  prompt=prompt, prefix=prefix)
    words_bte = self.embeddings.word(input_ids_bt)
    if prompt:
      words_bte = jnp.concatenate([self._prompt_embeddings(words_bte.shape[0]).astype(
          words_bte.dtype), words_bte], axis=1)
    if prefix:
      ctx = ctx._replace(prefix_hidden=self.prefix())
    x_bte, hidden_states, new_cache = self._layers(words_bte, ctx, cache,
                                                   deterministic=deterministic, rngs=rngs)
    return BackboneOutput(x_bte[:, prompt:], tuple(h[:, prompt:] for h in hidden_states), None,
                          new_cache, x_bte[:, :prompt] if prompt else None)

  def _prompt_embeddings(self, batch: int) -> jax.Array:
    prompt_ve = self.prompt()
    return jnp.broadcast_to(prompt_ve, (batch, *prompt_ve.shape))

  def _layers(self, words_bte, ctx: Context, cache: Cache | None, *, deterministic,
              rngs) -> tuple[jax.Array, list[jax.Array], Cache | None]:
    """(final hidden state, hidden states, updated cache) of `words_bte` through the stack."""
    cfg = self.config
    kw = dict(deterministic=deterministic, rngs=rngs)
    x_bte = self.embed(words_bte, ctx.positions_bt, **kw)
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
    return x_bte, hidden_states, new_cache

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """A KV cache for `batch` rows of up to `max_len` tokens (prompt + new).

    Virtual tokens take slots of their own in front: prefix tuning's keys and
    values are written there, and prompt tuning's tokens run through the
    layers once to write theirs, so every later call sees them as cached
    tokens.
    """
    cfg = self.config
    prompt, prefix = self.num_virtual_tokens()
    cache = init_cache(num_layers=cfg.num_layers, batch=batch, max_len=prefix + prompt + max_len,
                       kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       dtype=jnp.dtype(dtype or cfg.dtype))
    if prefix:
      hidden = self.prefix()
      kv = [attention.prefix(hidden) for attention in self.attention_modules()]
      k, v = ([write(c, jnp.broadcast_to(p[j], (batch, *p[j].shape)), jnp.int32(0))
               for c, p in zip(cached, kv)] for j, cached in enumerate((cache.k, cache.v)))
      cache = Cache(k=tuple(k), v=tuple(v), mask=cache.mask.at[:, :prefix].set(True),
                    index=jnp.asarray(prefix, jnp.int32))
    if prompt:
      ones_bt = jnp.ones((batch, prompt), jnp.int32)
      ctx = context(ones_bt, ones_bt, None, None, cache)
      _, _, cache = self._layers(self._prompt_embeddings(batch).astype(jnp.dtype(cfg.dtype)),
                                 ctx, cache, deterministic=True, rngs=None)
    return cache
