"""Text generation with a decoder's KV cache: greedy, or sampled as transformers samples.

  model, params = models.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", task="causal_lm")
  out = generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=32)
  out.tokens  # per row: the new tokens, up to and including the first EOS

Prompts are LEFT-padded so that every row's last prompt token sits in the
same slot: one prefill pass fills the cache and yields every row's first
next-token logits, and from then on every row writes its next token into the
same cache slot (`ftjax.models.decoder.Cache`). The decode loop is a
`jax.lax.while_loop` inside the one jitted function, so a call costs one
compilation per (batch, prompt length, max_new_tokens, cache length, sampling
switches) and no Python work per token. A row that produced an EOS token emits
`pad_token_id` from then on (as transformers' `generate` does), and the loop
stops as soon as every row has finished.

Sampling follows transformers' logits processors, in their order: greedy
(argmax) when temperature == 0; otherwise logits / temperature, then top-k
(keep the k largest), then top-p (keep the smallest set of most likely tokens
whose probability exceeds top_p), then a draw from the softmax.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ConfigError
from ftjax.models import heads


class Generation(NamedTuple):
  """What `generate` returns."""

  # Per row: the new tokens, up to and including the first EOS token (if any).
  tokens: list[list[int]]
  # (batch, prompt length + max_new_tokens) int32: the left-padded prompts
  # followed by the new tokens, `pad_token_id` after a row's EOS and in
  # steps the loop did not run (every row had finished).
  sequences_bt: np.ndarray
  # (batch, prompt length + max_new_tokens) int32: 1 for prompt and new
  # tokens, 0 for padding (left of the prompt, after EOS).
  attention_mask_bt: np.ndarray
  # (batch,) bool: the row produced an EOS token (else it ran out of tokens).
  finished_b: np.ndarray
  # Tokens generated per row before the loop stopped (<= max_new_tokens).
  steps: int


@dataclasses.dataclass(frozen=True)
class _Sampling:
  """The sampling switches that change the compiled program (static under jit)."""

  greedy: bool
  top_k: int       # 0: no top-k filtering
  use_top_p: bool  # top_p < 1


def _eos_ids(model, eos_token_id) -> tuple[int, ...]:
  """The ids that end a row: the argument's, checked, or the config's as they are."""
  if eos_token_id is None:
    # Like transformers: the config's eos_token_id (an int, a list or none).
    # An id outside the vocabulary (tiny test configs have some) never matches.
    eos_token_id = dict(getattr(model.config, "hf_extra", ())).get("eos_token_id")
    return () if eos_token_id is None else tuple(int(i) for i in np.atleast_1d(eos_token_id))
  ids = tuple(int(i) for i in np.atleast_1d(np.asarray(eos_token_id, np.int64)))
  vocab = model.config.vocab_size
  for i in ids:
    if not 0 <= i < vocab:
      raise ConfigError(f"eos_token_id {i} is outside the vocabulary [0, {vocab})")
  return ids


def _eos_array(eos_ids: tuple[int, ...]) -> jax.Array:
  """The ids padded with -1 (no token) to a multiple of 8, so changing EOS does not recompile."""
  size = max(8, -(-len(eos_ids) // 8) * 8)
  return jnp.asarray(list(eos_ids) + [-1] * (size - len(eos_ids)), jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, attention_mask), both (batch, longest prompt) int32, padded on the left."""
  if not prompts:
    raise ConfigError("prompts is empty; expected at least one prompt")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ConfigError(f"prompt {i} has no tokens; expected at least one")
  length = max(len(p) for p in prompts)
  input_ids_bt = np.full((len(prompts), length), pad_token_id, np.int32)
  attention_mask_bt = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    input_ids_bt[row, length - len(prompt):] = prompt
    attention_mask_bt[row, length - len(prompt):] = 1
  return input_ids_bt, attention_mask_bt


def _check_left_padded(attention_mask_bt: np.ndarray) -> None:
  for row, mask_t in enumerate(attention_mask_bt):
    first = int(np.argmax(mask_t))
    if not mask_t.any() or not mask_t[first:].all():
      raise ConfigError(f"prompt row {row} has attention_mask {mask_t.tolist()}; generate needs "
                        f"LEFT-padded prompts with at least one real token (padding, then "
                        f"tokens)")


def filter_logits(logits_bv: jax.Array, *, temperature, top_k: int, top_p) -> jax.Array:
  """Temperature, top-k, then top-p, as transformers' logits warpers; removed tokens -> -inf.

  top-k keeps every token whose logit is at least the k-th largest (ties
  included), as `TopKLogitsWarper`. top-p sorts ascending and removes the
  least likely tokens while their cumulative probability stays <= 1 - top_p,
  always keeping the most likely one, as `TopPLogitsWarper`; since what it
  removes is a prefix of that order, it is a threshold on the logit.
  `top_p=None` skips top-p.
  """
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  if top_k:
    kth_b1 = jax.lax.top_k(logits_bv, min(top_k, logits_bv.shape[-1]))[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
  if top_p is not None:
    sorted_bv = jnp.sort(logits_bv, axis=-1)
    cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    removed_b1 = jnp.sum(cumulative_bv <= 1 - top_p, axis=-1, keepdims=True)
    removed_b1 = jnp.minimum(removed_b1, logits_bv.shape[-1] - 1)  # keep the most likely
    threshold_b1 = jnp.take_along_axis(sorted_bv, removed_b1, axis=-1)
    logits_bv = jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)
  return logits_bv


def _next_token(logits_bv, key, temperature, top_p, sampling: _Sampling) -> jax.Array:
  if sampling.greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  filtered_bv = filter_logits(logits_bv, temperature=temperature, top_k=sampling.top_k,
                              top_p=top_p if sampling.use_top_p else None)
  return jax.random.categorical(key, filtered_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "max_len", "sampling"))
def _generate(params, input_ids_bt, attention_mask_bt, eos_ids_e, pad_id, temperature, top_p,
              rng, *, model, max_new_tokens: int, max_len: int, sampling: _Sampling):
  """Prefill, then a while loop of one-token decode steps; returns (tokens_bn, done_b, steps).

  `model` is static (hashed by identity): the same Model object reuses the
  compiled program.
  """
  batch = input_ids_bt.shape[0]
  cache = model.apply(params, batch, max_len, method="init_cache")
  prefill = model.apply(params, input_ids_bt, attention_mask_bt, cache=cache)

  def emit(step, logits_bv, key, tokens_bn, done_b):
    """Picks each row's next token; a finished row emits padding."""
    token_b = _next_token(logits_bv, key, temperature, top_p, sampling)
    token_b = jnp.where(done_b, pad_id, token_b)
    tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, token_b[:, None], (0, step))
    return token_b, tokens_bn, done_b | jnp.isin(token_b, eos_ids_e)

  rng, key = jax.random.split(rng)
  tokens_bn = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  # The prompts are left-padded: the last slot holds every row's last real token.
  token_b, tokens_bn, done_b = emit(0, prefill.logits[:, -1], key, tokens_bn,
                                    jnp.zeros((batch,), bool))

  def cond(state):
    step, _, _, _, done_b, _ = state
    return (step < max_new_tokens) & ~jnp.all(done_b)

  def body(state):
    step, token_b, cache, tokens_bn, done_b, rng = state
    out = model.apply(params, token_b[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
    rng, key = jax.random.split(rng)
    token_b, tokens_bn, done_b = emit(step, out.logits[:, -1], key, tokens_bn, done_b)
    return step + 1, token_b, out.cache, tokens_bn, done_b, rng

  state = (jnp.int32(1), token_b, prefill.cache, tokens_bn, done_b, rng)
  steps, _, _, tokens_bn, done_b, _ = jax.lax.while_loop(cond, body, state)
  return tokens_bn, done_b, steps


def generate(model, params, prompts, *, max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             attention_mask=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, rng: jax.Array | None = None,
             max_len: int | None = None) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model, params: a causal_lm `ftjax.models.Model` and its parameters.
    prompts: token ids, one list per row (of any lengths), or a LEFT-padded
      (batch, length) array with `attention_mask` (all ones if omitted).
    max_new_tokens: the most tokens to generate per row.
    eos_token_id: an id or ids that end a row (the EOS is kept in the row's
      tokens). None: the model config's eos_token_id, as transformers does;
      () never stops early.
    pad_token_id: fills the prompts' left padding and finished rows. None: the
      config's pad_token_id, else the first EOS id, else 0.
    temperature: 0 is greedy decoding (top_k and top_p are then ignored).
    top_k: with sampling, keep only the k most likely tokens (0: all).
    top_p: with sampling, keep the most likely tokens up to this cumulative
      probability (1.0: all).
    rng: a `jax.random.key`, needed when temperature > 0. The same key gives
      the same tokens.
    max_len: the KV cache's length in slots; default (and minimum) the
      padded prompt length + max_new_tokens. More only costs memory and
      attention over empty slots. Prompt and prefix tuning's virtual tokens
      take slots of their own on top (`DecoderBackbone.init_cache`).

  Returns:
    A `Generation`: the new tokens per row as lists, and the padded arrays.
  """
  cfg = model.config
  if heads.head_for(cfg.task) is not heads.LMHead:
    raise ConfigError(f"generate needs a causal_lm model; this one has task={cfg.task!r}")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}; expected at least 1")
  if temperature < 0:
    raise ConfigError(f"temperature={temperature}; expected >= 0 (0 is greedy)")
  if top_k < 0:
    raise ConfigError(f"top_k={top_k}; expected >= 0 (0 keeps every token)")
  if not 0 < top_p <= 1:
    raise ConfigError(f"top_p={top_p}; expected 0 < top_p <= 1")
  if temperature > 0 and rng is None:
    raise ConfigError(f"temperature={temperature} samples and needs rng=jax.random.key(seed); "
                      f"pass temperature=0 for greedy decoding")
  eos_ids = _eos_ids(model, eos_token_id)
  if pad_token_id is None:
    pad_token_id = (cfg.pad_token_id if cfg.pad_token_id is not None
                    else eos_ids[0] if eos_ids else 0)

  if isinstance(prompts, (list, tuple)) and (not prompts or not np.isscalar(prompts[0])):
    if attention_mask is not None:
      raise ConfigError("attention_mask is for a padded prompt array; prompts given as lists "
                        "are padded here")
    input_ids_bt, attention_mask_bt = left_pad(prompts, pad_token_id)
  else:
    input_ids_bt = np.asarray(prompts, np.int32)
    if input_ids_bt.ndim != 2:
      raise ConfigError(f"prompts has shape {input_ids_bt.shape}; expected (batch, length) "
                        f"token ids or a list of token-id lists")
    attention_mask_bt = (np.ones_like(input_ids_bt) if attention_mask is None
                         else np.asarray(attention_mask, np.int32))
    if attention_mask_bt.shape != input_ids_bt.shape:
      raise ConfigError(f"attention_mask has shape {attention_mask_bt.shape}; expected the "
                        f"prompts' {input_ids_bt.shape}")
    _check_left_padded(attention_mask_bt)
  batch, prompt_len = input_ids_bt.shape
  needed = prompt_len + max_new_tokens
  max_len = needed if max_len is None else max_len
  if max_len < needed:
    raise ConfigError(f"max_len={max_len} cannot hold the {prompt_len}-token prompts and "
                      f"{max_new_tokens} new tokens; expected at least {needed}")
  positions = model.abstract_params.get("embeddings", {}).get("position")
  # Prompt and prefix tuning's virtual tokens take the first positions (and
  # cache slots of their own, which init_cache adds).
  virtual = sum(getattr(a, "num_virtual_tokens", 0) for a in model.adapters)
  if positions is not None and needed + virtual > positions["embedding"].shape[0]:
    in_front = f" after {virtual} virtual tokens" if virtual else ""
    raise ConfigError(f"{prompt_len} prompt + {max_new_tokens} new tokens{in_front} exceed the "
                      f"model's {positions['embedding'].shape[0]} learned positions")

  sampling = _Sampling(greedy=temperature == 0, top_k=int(top_k) if temperature else 0,
                       use_top_p=bool(temperature) and top_p < 1)
  tokens_bn, done_b, steps = _generate(
      params, jnp.asarray(input_ids_bt), jnp.asarray(attention_mask_bt),
      _eos_array(eos_ids), jnp.int32(pad_token_id),
      jnp.float32(temperature or 1.0), jnp.float32(top_p),
      jax.random.key(0) if rng is None else rng,
      model=model, max_new_tokens=int(max_new_tokens), max_len=int(max_len), sampling=sampling)
  tokens_bn, done_b, steps = np.asarray(tokens_bn), np.asarray(done_b), int(steps)

  tokens = []
  new_mask_bn = np.zeros_like(tokens_bn)
  for row, row_tokens in enumerate(tokens_bn[:, :steps].tolist()):
    ends = [i for i, t in enumerate(row_tokens) if t in eos_ids]
    row_tokens = row_tokens[:ends[0] + 1] if ends else row_tokens
    tokens.append(row_tokens)
    new_mask_bn[row, :len(row_tokens)] = 1
  return Generation(tokens=tokens,
                    sequences_bt=np.concatenate([input_ids_bt, tokens_bn], axis=1),
                    attention_mask_bt=np.concatenate([attention_mask_bt, new_mask_bn], axis=1),
                    finished_b=done_b, steps=steps)


def generate_text(model, params, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
                  chat_template: bool = False, system_prompt: str | None = None,
                  skip_special_tokens: bool = True, **kwargs) -> list[str]:
  """Tokenizes `texts`, continues them with `generate` and decodes the new tokens.

  The prompts are tokenized with the tokenizer's defaults (its own special
  tokens, e.g. a BOS, exactly as `tokenizer(text)` adds them). With
  `chat_template=True` each text becomes one user message (after an optional
  system message) rendered by the tokenizer's chat template with the
  assistant's turn opened; the template writes its special tokens itself, so
  none are added on top. EOS defaults to the model config's, else the
  tokenizer's; padding to the tokenizer's pad token. `kwargs` go to
  `generate` (temperature, top_k, top_p, rng, eos_token_id, ...).
  """
  if isinstance(texts, str):
    raise ConfigError("texts is one string; expected a list of strings")
  if chat_template:
    prompts = []
    for text in texts:
      messages = [{"role": "user", "content": text}]
      if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
      rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
      prompts.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
  else:
    if system_prompt is not None:
      raise ConfigError("system_prompt needs chat_template=True")
    prompts = [tokenizer(text)["input_ids"] for text in texts]
  if kwargs.get("eos_token_id") is None and not _eos_ids(model, None):
    kwargs["eos_token_id"] = tokenizer.eos_token_id
  if kwargs.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
    kwargs["pad_token_id"] = tokenizer.pad_token_id
  out = generate(model, params, prompts, max_new_tokens=max_new_tokens, **kwargs)
  return [tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
          for tokens in out.tokens]
