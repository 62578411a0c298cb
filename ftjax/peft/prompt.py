"""Prompt tuning and prefix tuning: adapters (`ftjax.peft.adapter.Adapter`) of virtual tokens.

Both train a few "virtual tokens" in front of every sequence and leave every
weight of the model as it is (PEFT's prompt learning):

  prompt tuning (Lester et al., 2021)   `num_virtual_tokens` trained input
      embeddings, put in front of the token embeddings; the layers run over
      them like over tokens (positions 0.., token type 0).
  prefix tuning (Li & Liang, 2021)      trained keys and values of
      `num_virtual_tokens` positions in every layer, in front of the tokens'
      own; every query attends to them. Optionally reparameterised while
      training (`projection=True`, PEFT's `prefix_projection`):
      keys/values = tanh(E W1 + b1) W2 + b2 from a shared embedding E, folded
      into plain keys and values for export (`fold_projection`).

The model families hold the hooks (`BertBackbone`, `decoder.DecoderBackbone`):
masks, positions (virtual tokens come first, and the tokens' positions follow
them, as PEFT and transformers number them), the pooling position and the KV
cache account for them there. This module adds the parameters:

  prompt/embedding                                   (virtual, embed)
  {encoder|decoder}/layers/{i}/attention/prefix/key  (virtual, heads, kv)   also value
                                 (a grouped-query decoder's: kv_heads, as its keys)
  with projection=True, instead:
  prefix/embedding                                   (virtual, embed)
  prefix/dense/{kernel,bias}                         (embed, prefix_mlp)    W1, b1
  {encoder|decoder}/layers/{i}/attention/prefix/key/{kernel,bias}
                                                     (prefix_mlp, heads, kv)  W2, b2 of
                                                     layer i's keys; also value

so partition rules, sharding (the new logical axes `virtual` and
`prefix_mlp` stay replicated unless a rule names them) and checkpoints need
nothing specific. Neither method can be merged into the base weights: export
the adapter in PEFT's format (`ftjax.peft.hf_adapter.save_adapter`, or
`python -m ftjax.export --format=peft`), which `peft.PeftModel.from_pretrained`
loads onto the transformers model.

Where ftjax computes what PEFT + transformers do not (tests compare the rest):
a decoder's sequence classifier reads the last real token (transformers, fed
inputs_embeds, reads the last slot, which is padding in a right-padded row),
and left-padded rows number their tokens from the virtual ones on (PEFT drops
position_ids for prompt tuning, and transformers' forward then counts
padding). PEFT's SEQ_CLS forward refuses prefix tuning on BERT-family models
with transformers 5 (it looks for a `past_key_values` argument); the exported
folder is PEFT's layout, and its prefix on the encoder with PEFT's cache
gives ftjax's logits.

Typical use:

  model, params = ftjax.models.from_pretrained(name, task="classification")
  spec = PromptSpec(num_virtual_tokens=20, init_text="Classify the sentiment:").bind(tokenizer)
  model, params = adapter.add_adapters(model, params, (spec,), rng)
  ... train prompt/embedding and the head ...
  hf_adapter.save_adapter(model, params, out_dir, modules_to_save=head_paths)

Registered as "prompt" (`strategy.prompt`, PEFT's PROMPT_TUNING) and "prefix"
(`strategy.prefix`, PREFIX_TUNING).
"""

import dataclasses
import math
import re
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
from ftjax.peft.partition import TRAINABLE

# Logical axis names of the new dimensions (replicated unless a mesh rule names them).
VIRTUAL_AXIS = "virtual"
PREFIX_MLP_AXIS = "prefix_mlp"
PROMPT_PATH = "prompt/embedding"
# The tensor PEFT saves for every prompt-learning method.
PEFT_TENSOR = "prompt_embeddings"
_PREFIX_PATH = re.compile(r"(encoder|decoder)/layers/(\d+)/attention/prefix/(key|value)(/.*)?")
_WORD_EMBEDDING = "embeddings/word/embedding"


# --- The modules the families' hooks call ------------------------------------

class PromptEmbedding(nnx.Module):
  """Prompt tuning's virtual tokens: `()` -> (num_virtual_tokens, embed) embeddings."""

  def __init__(self, num_virtual_tokens: int, features: int, *, dtype, rngs: nnx.Rngs):
    self.num_virtual_tokens = num_virtual_tokens
    # PEFT's "RANDOM" init (a torch.nn.Embedding: N(0, 1)); `PromptSpec.convert`
    # puts a text's token embeddings here instead when init_text is set.
    self.embedding = nnx.Param(
        jax.random.normal(rngs.params(), (num_virtual_tokens, features), jnp.float32),
        logical_axes=(VIRTUAL_AXIS, "embed"))
    self.dtype = jnp.dtype(dtype)

  def __call__(self) -> jax.Array:
    return self.embedding[...].astype(self.dtype)


def _torch_linear(in_features: int, out_features, *, axes, dtype, rngs: nnx.Rngs) -> layers.Dense:
  """A `layers.Dense` initialised as PyTorch's nn.Linear (PEFT's MLP): U(+-1/sqrt(fan_in))."""
  dense = layers.Dense(in_features, out_features, axes=axes, init_std=0.0, dtype=dtype, rngs=rngs)
  bound = 1.0 / math.sqrt(in_features)
  for param in (dense.kernel, dense.bias):
    param.value = jax.random.uniform(rngs.params(), param.value.shape, jnp.float32, -bound, bound)
  return dense


class PrefixEncoder(nnx.Module):
  """Prefix tuning's shared part, at the backbone's `prefix`.

  `()` -> what every layer's `PrefixKV` reads: with the projection, the hidden
  state tanh(E W1 + b1) (num_virtual_tokens, projection_size); without, None
  (and no parameters: the keys and values are the layers' own).
  """

  def __init__(self, num_virtual_tokens: int, features: int, projection_size: int | None, *,
               dtype, rngs: nnx.Rngs):
    self.num_virtual_tokens = num_virtual_tokens
    self.projected = projection_size is not None
    self.dtype = jnp.dtype(dtype)
    if self.projected:
      self.embedding = nnx.Param(
          jax.random.normal(rngs.params(), (num_virtual_tokens, features), jnp.float32),
          logical_axes=(VIRTUAL_AXIS, "embed"))
      self.dense = _torch_linear(features, projection_size, axes=("embed", PREFIX_MLP_AXIS),
                                 dtype=self.dtype, rngs=rngs)

  def __call__(self) -> jax.Array | None:
    if not self.projected:
      return None
    return jnp.tanh(self.dense(self.embedding[...].astype(self.dtype)))


class PrefixKV(nnx.Module):
  """One layer's prefix: `(hidden)` -> (keys, values), each (num_virtual_tokens, heads, head_dim).

  Plain: `key` and `value` are the trained tensors (PEFT's init: N(0, 1)).
  Projected: they are the layer's slice of the reparameterisation's output
  layer, applied to the shared hidden state (`PrefixEncoder`).
  """

  def __init__(self, num_virtual_tokens: int, kv_shape: tuple[int, int], kv_axes: tuple[str, str],
               projection_size: int | None, *, dtype, rngs: nnx.Rngs):
    self.projected = projection_size is not None
    self.dtype = jnp.dtype(dtype)
    if self.projected:
      self.key, self.value = (
          _torch_linear(projection_size, kv_shape, axes=(PREFIX_MLP_AXIS, *kv_axes),
                        dtype=self.dtype, rngs=rngs) for _ in range(2))
    else:
      self.key, self.value = (
          nnx.Param(jax.random.normal(rngs.params(), (num_virtual_tokens, *kv_shape),
                                      jnp.float32), logical_axes=(VIRTUAL_AXIS, *kv_axes))
          for _ in range(2))

  def __call__(self, hidden: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    if self.projected:
      return self.key(hidden), self.value(hidden)
    return self.key[...].astype(self.dtype), self.value[...].astype(self.dtype)


def _check_family(module: nnx.Module, what: str) -> None:
  if not hasattr(type(module), "KV_AXES") or not hasattr(module, "num_virtual_tokens"):
    raise ConfigError(f"{what} needs a model family with virtual-token hooks (bert, roberta, "
                      f"distilbert, llama, mistral, qwen2, qwen3, gpt2); "
                      f"{module.config.model_type} has none")


def _check_count(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"config key 'strategy.{name}.num_virtual_tokens' is {value!r}; expected "
                      f"at least 1 virtual token")


def _refuse_merge(name: str) -> ConfigError:
  return ConfigError(f"{name} tuning adds virtual tokens, which cannot be merged into the base "
                     f"weights; export it as a PEFT adapter instead (hf_adapter.save_adapter, or "
                     f"python -m ftjax.export --format=peft)")


def _peft_common(model: models.Model, name: str, num_virtual_tokens: int) -> dict:
  cfg = model.config
  return {"num_virtual_tokens": num_virtual_tokens, "num_transformer_submodules": 1,
          "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "token_dim": cfg.hidden_size, "peft_type": name}


def _check_peft_common(config: dict, where: str) -> None:
  if config.get("num_transformer_submodules") not in (None, 1):
    raise CheckpointError(f"{where} has num_transformer_submodules="
                          f"{config['num_transformer_submodules']}; expected 1 (a decoder-only "
                          f"or encoder-only model)")


# --- Prompt tuning ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """Prompt tuning: `num_virtual_tokens` trained embeddings in front of the tokens.

  `init_text`: start from the token embeddings of this text (PEFT's
  `prompt_tuning_init="TEXT"`): the tokenizer's ids of it (special tokens
  included, as `tokenizer(text)` gives them), repeated and cut to
  `num_virtual_tokens`. `bind(tokenizer)` tokenises it; empty: random N(0, 1).
  """

  name: ClassVar[str] = "prompt"

  num_virtual_tokens: int = 20
  init_text: str = ""
  # The text's token ids, repeated and cut to num_virtual_tokens (`bind`).
  init_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))
    _check_count(self.name, self.num_virtual_tokens)
    if not isinstance(self.init_text, str):
      raise ConfigError(f"config key 'strategy.prompt.init_text' is {self.init_text!r}; "
                        f"expected a string (\"\": random virtual tokens)")

  def bind(self, tokenizer) -> "PromptSpec":
    """This spec with `init_text` tokenised as PEFT does (a no-op without a text)."""
    if not self.init_text:
      return self
    if tokenizer is None:
      raise ConfigError(f"strategy.prompt.init_text={self.init_text!r} needs the model's "
                        f"tokenizer, and this model has none; expected init_text=''")
    ids = list(tokenizer(self.init_text)["input_ids"])
    if not ids:
      raise ConfigError(f"strategy.prompt.init_text={self.init_text!r} has no tokens; expected "
                        f"a text the tokenizer turns into at least one token")
    ids = (ids * math.ceil(self.num_virtual_tokens / len(ids)))[:self.num_virtual_tokens]
    return dataclasses.replace(self, init_token_ids=tuple(ids))

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Adds the virtual tokens' embeddings at the backbone's `prompt`."""
    _check_family(module, "prompt tuning")
    cfg = module.config
    module.prompt = PromptEmbedding(self.num_virtual_tokens, cfg.hidden_size, dtype=cfg.dtype,
                                    rngs=rngs)

  def rules(self) -> list[tuple[str, str]]:
    return [(re.escape(PROMPT_PATH), TRAINABLE)]

  def convert(self, params: keymap.FlatParams) -> keymap.FlatParams:
    """The virtual tokens start as the init text's token embeddings (if there is one)."""
    if not self.init_text:
      return params
    if not self.init_token_ids:
      raise ConfigError(f"strategy.prompt.init_text={self.init_text!r} is not tokenised yet; "
                        f"expected PromptSpec.bind(tokenizer) before adding the adapter")
    flat = dict(params)
    word = flat[_WORD_EMBEDDING]
    bad = [i for i in self.init_token_ids if not 0 <= i < word.shape[0]]
    if bad:
      raise ConfigError(f"strategy.prompt.init_text token id {bad[0]} is outside the model's "
                        f"{word.shape[0]}-token vocabulary; expected the model's own tokenizer")
    old = flat[PROMPT_PATH]
    value = jnp.asarray(word)[jnp.asarray(self.init_token_ids)].astype(old.dtype)
    flat[PROMPT_PATH] = jax.device_put(value, getattr(old, "sharding", None))
    return flat

  def merge(self, params: keymap.FlatParams) -> keymap.FlatParams:
    raise _refuse_merge(self.name)

  def to_peft(self, model: models.Model, params: keymap.FlatParams) -> tuple[dict, dict]:
    """PEFT's PROMPT_TUNING: `prompt_embeddings` (num_virtual_tokens, hidden)."""
    config = {**_peft_common(model, "PROMPT_TUNING", self.num_virtual_tokens),
              # The trained values are saved, so the init does not matter when PEFT
              # loads them ("TEXT" would make PEFT ask for a tokenizer path).
              "prompt_tuning_init": "RANDOM",
              "prompt_tuning_init_text": self.init_text or None,
              "tokenizer_name_or_path": None}
    return config, {PEFT_TENSOR: np.asarray(params[PROMPT_PATH], np.float32)}


def prompt_from_peft(model: models.Model, config: dict, tensors: dict[str, np.ndarray],
                     where: str) -> tuple[PromptSpec, keymap.FlatParams, dict[str, np.ndarray]]:
  """(spec, prompt values, other tensors) of a PEFT PROMPT_TUNING adapter for `model`."""
  _check_peft_common(config, where)
  if PEFT_TENSOR not in tensors:
    raise CheckpointError(f"{where} holds no {PEFT_TENSOR!r} tensor")
  rest = dict(tensors)
  value = np.asarray(rest.pop(PEFT_TENSOR), np.float32)
  hidden = model.config.hidden_size
  if value.ndim != 2 or value.shape[1] != hidden:
    raise CheckpointError(f"{where}: {PEFT_TENSOR} has shape {value.shape}; the model needs "
                          f"(num_virtual_tokens, {hidden})")
  spec = PromptSpec(num_virtual_tokens=value.shape[0])
  return spec, {PROMPT_PATH: value}, rest


# --- Prefix tuning ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrefixSpec:
  """Prefix tuning: `num_virtual_tokens` trained keys and values in front of every layer's.

  `projection`: train them through PEFT's reparameterisation MLP (hidden size
  `projection_size`, PEFT's `encoder_hidden_size`), folded away for export.
  """

  name: ClassVar[str] = "prefix"

  num_virtual_tokens: int = 20
  projection: bool = False
  projection_size: int = 512

  def __post_init__(self):
    _check_count(self.name, self.num_virtual_tokens)
    if isinstance(self.projection_size, bool) or not isinstance(self.projection_size, int) \
        or self.projection_size < 1:
      raise ConfigError(f"config key 'strategy.prefix.projection_size' is "
                        f"{self.projection_size!r}; expected a hidden size >= 1 for the prefix "
                        f"projection")

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Adds the shared `prefix` to the backbone and a `prefix` to every layer's attention."""
    _check_family(module, "prefix tuning")
    cfg = module.config
    size = self.projection_size if self.projection else None
    module.prefix = PrefixEncoder(self.num_virtual_tokens, cfg.hidden_size, size,
                                  dtype=cfg.dtype, rngs=rngs)
    kv_shape = (getattr(cfg, "num_kv_heads", cfg.num_heads), cfg.head_dim)
    for attention in module.attention_modules():
      attention.prefix = PrefixKV(self.num_virtual_tokens, kv_shape, type(module).KV_AXES, size,
                                  dtype=cfg.dtype, rngs=rngs)

  def rules(self) -> list[tuple[str, str]]:
    return [(r"prefix/.*", TRAINABLE), (r"(encoder|decoder)/layers/\d+/attention/prefix/.*",
                                        TRAINABLE)]

  def merge(self, params: keymap.FlatParams) -> keymap.FlatParams:
    raise _refuse_merge(self.name)

  def key_values(self, params: keymap.FlatParams) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Layer -> (keys, values), each (num_virtual_tokens, heads, head_dim) float32: the
    trained ones, or (projection) computed from the reparameterisation."""
    found: dict[int, dict[str, str]] = {}
    for path in params:
      m = _PREFIX_PATH.fullmatch(path)
      if m:
        found.setdefault(int(m[2]), {})[m[3]] = path[:m.end(3)]
    if not found:
      raise CheckpointError("the parameters hold no prefix-tuning keys and values")
    hidden = None
    if self.projection:
      dense = {k: np.asarray(params[f"prefix/dense/{k}"], np.float64) for k in ("kernel", "bias")}
      hidden = np.tanh(np.asarray(params["prefix/embedding"], np.float64) @ dense["kernel"]
                       + dense["bias"])
    out = {}
    for layer, paths in sorted(found.items()):
      kv = []
      for kind in ("key", "value"):
        if self.projection:
          kernel = np.asarray(params[paths[kind] + "/kernel"], np.float64)
          bias = np.asarray(params[paths[kind] + "/bias"], np.float64)
          kv.append((np.tensordot(hidden, kernel, axes=1) + bias).astype(np.float32))
        else:
          kv.append(np.asarray(params[paths[kind]], np.float32))
      out[layer] = tuple(kv)
    return out

  def to_peft(self, model: models.Model, params: keymap.FlatParams) -> tuple[dict, dict]:
    """PEFT's PREFIX_TUNING: `prompt_embeddings` (num_virtual_tokens, layers * 2 * heads *
    head_dim), layer i's keys then values, as plain prefixes (a projection is folded)."""
    cfg = model.config
    if cfg.model_type == "distilbert":
      raise CheckpointError("transformers' DistilBERT takes no past_key_values, so PEFT cannot "
                            "load a prefix-tuning adapter for it; expected another family")
    kv = self.key_values(params)
    heads, head_dim = kv[0][0].shape[1:]
    stacked = np.stack([np.stack(kv[i], axis=1) for i in range(cfg.num_layers)], axis=1)
    config = {**_peft_common(model, "PREFIX_TUNING", self.num_virtual_tokens),
              # PEFT's layout: a grouped-query model's prefix has its kv heads.
              "num_attention_heads": heads, "token_dim": heads * head_dim,
              "encoder_hidden_size": heads * head_dim, "prefix_projection": False}
    return config, {PEFT_TENSOR: stacked.reshape(self.num_virtual_tokens, -1)}


def fold_projection(model: models.Model, params) -> tuple[models.Model, dict]:
  """(model, params) with a projected prefix replaced by the plain keys and values it computes."""
  specs = [a for a in model.adapters if isinstance(a, PrefixSpec)]
  if not specs or not specs[0].projection:
    raise ConfigError("fold_projection needs a model with prefix tuning through a projection "
                      "(PrefixSpec(projection=True)); this one has none")
  spec = specs[0]
  flat = dict(keymap.flatten(params))
  kv = spec.key_values(flat)
  plain = dataclasses.replace(spec, projection=False)
  adapters = tuple(plain if a is spec else a for a in model.adapters)
  folded = models.Model.build(model.config, adapters=adapters)
  stack = "encoder" if "encoder" in folded.abstract_params else "decoder"
  flat = {p: x for p, x in flat.items()
          if not (p.startswith("prefix/") or _PREFIX_PATH.fullmatch(p))}
  for layer, (keys, values) in kv.items():
    for kind, value in (("key", keys), ("value", values)):
      flat[f"{stack}/layers/{layer}/attention/prefix/{kind}"] = jnp.asarray(value)
  return folded, keymap.unflatten(flat, folded.abstract_params)


def prefix_from_peft(model: models.Model, config: dict, tensors: dict[str, np.ndarray],
                     where: str) -> tuple[PrefixSpec, keymap.FlatParams, dict[str, np.ndarray]]:
  """(spec, plain prefix values, other tensors) of a PEFT PREFIX_TUNING adapter for `model`.

  PEFT saves the keys and values a projection computes, so every import is a
  plain prefix.
  """
  _check_peft_common(config, where)
  if PEFT_TENSOR not in tensors:
    raise CheckpointError(f"{where} holds no {PEFT_TENSOR!r} tensor")
  rest = dict(tensors)
  value = np.asarray(rest.pop(PEFT_TENSOR), np.float32)
  spec = PrefixSpec(num_virtual_tokens=value.shape[0])
  shapes = keymap.flatten(models.Model.build(model.config, adapters=(spec,)).abstract_params)
  paths = sorted((p for p in shapes if _PREFIX_PATH.fullmatch(p)),
                 key=lambda p: (int(_PREFIX_PATH.fullmatch(p)[2]), p.endswith("value")))
  kv_shape = tuple(shapes[paths[0]].shape)
  if value.ndim != 2 or value.shape[1] != len(paths) * math.prod(kv_shape[1:]):
    raise CheckpointError(f"{where}: {PEFT_TENSOR} has shape {value.shape}; the model needs "
                          f"(num_virtual_tokens, {len(paths) // 2} layers x 2 x "
                          f"{kv_shape[1]} heads x {kv_shape[2]})")
  per_path = value.reshape(value.shape[0], len(paths), *kv_shape[1:])
  return spec, {p: per_path[:, i] for i, p in enumerate(paths)}, rest


def _prompt_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_virtual_tokens = 20
  # A text whose token embeddings start the virtual tokens ("": random).
  c.init_text = ""
  return c


def _prefix_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_virtual_tokens = 20
  # Train the keys and values through an MLP of this hidden size (PEFT's
  # prefix_projection / encoder_hidden_size), folded away for export.
  c.projection = False
  c.projection_size = 512
  return c


def _prompt_from_strategy(strategy: ml_collections.ConfigDict) -> PromptSpec:
  s = strategy.prompt
  return PromptSpec(num_virtual_tokens=s.num_virtual_tokens, init_text=s.init_text)


def _prefix_from_strategy(strategy: ml_collections.ConfigDict) -> PrefixSpec:
  s = strategy.prefix
  return PrefixSpec(num_virtual_tokens=s.num_virtual_tokens, projection=s.projection,
                    projection_size=s.projection_size)


adapter_lib.register("prompt", _prompt_from_strategy, peft_type="PROMPT_TUNING",
                     from_peft=prompt_from_peft, config=_prompt_config, strategy=True)
adapter_lib.register("prefix", _prefix_from_strategy, peft_type="PREFIX_TUNING",
                     from_peft=prefix_from_peft, config=_prefix_config, strategy=True)
