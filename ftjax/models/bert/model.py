"""BERT-family encoders in Flax NNX: BERT, RoBERTa and DistilBERT.

The three share one post-LayerNorm transformer encoder and one parameter tree;
they differ only in how positions are numbered, whether token types exist, and
the shape of their classification head, which lives with the other heads in
`ftjax.models.heads` (style = model_type). `BertBackbone` returns hidden
states and, where it has one, BERT's pooler output tanh(dense(h[:, 0]));
`BertFamilyModel` adds the head the config's task selects.

Parameter tree (the names partition rules, LoRA targets and sharding use):

  embeddings/{word,position,token_type}/embedding, embeddings/norm/{scale,bias}
  encoder/layers/{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layers/{i}/attention_norm/{scale,bias}
  encoder/layers/{i}/mlp/{up,down}/{kernel,bias}
  encoder/layers/{i}/mlp_norm/{scale,bias}
  pooler/{kernel,bias}                       (BERT; RoBERTa's base model)
  classifier/dense/{kernel,bias}             (head: RoBERTa, DistilBERT)
  classifier/out/{kernel,bias}               (head)
  prompt/embedding                           (prompt tuning, `ftjax.peft.prompt`)
  encoder/layers/{i}/attention/prefix/...    (prefix tuning)

Virtual tokens, as PEFT puts them on transformers' encoders: prompt tuning's
(`prompt`: `num_virtual_tokens`, `prompt()` -> (virtual, embed)) go in front of
the word embeddings, so they get positions 0.. and token type 0 and the
tokens' positions follow them; prefix tuning's keys and values (`prefix`
with `num_virtual_tokens` and `prefix()` -> the hidden state its layers read;
each attention's `prefix(hidden)` -> keys, values (virtual, heads, head_dim))
go in front of every layer's, and the tokens' positions start after them (as
transformers numbers tokens after past_key_values). Every token sees them.
The pooler (and a "cls" head) read slot 0: the first virtual token under
prompt tuning, as transformers' heads do under PEFT.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ftjax.models import headed, heads, hf_config, layers
from ftjax.models.outputs import BackboneOutput

MODEL_TYPES = ("bert", "roberta", "distilbert")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a BERT-family encoder, in one vocabulary for all three."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int  # 0: no token-type embeddings (DistilBERT).
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.1
  pad_token_id: int = 0
  initializer_range: float = 0.02
  # What the model computes: "encoder" (the bare backbone) or a task whose
  # head `ftjax.models.heads` defines ("classification").
  task: str = "encoder"
  num_labels: int = 2
  # What the classifier reads: "pooler" (the HF head as pre-trained), "cls"
  # (h[:, 0]) or "mean" (mean over non-padding tokens).
  pooling: str = "pooler"
  # Compute dtype; parameters are always float32.
  dtype: str = "float32"
  # Does the model carry BERT's pretrained pooler (dense + tanh over h[:, 0])?
  has_pooler: bool = True
  # Fields of the Hugging Face config that ftjax does not use (id2label,
  # bos/eos ids, ...), kept so an exported config.json round-trips. Hashable.
  hf_extra: tuple[tuple[str, Any], ...] = ()
  # How the layer stack runs (remat, scan, activation sharding); not exported.
  execution: layers.Execution = layers.Execution()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, hf: dict, *, task: str, num_labels: int | None, dtype: str,
              pooling: str = "pooler") -> "EncoderConfig":
    model_type = hf["model_type"]
    pooling = heads.SequenceClassifier.check_pooling(model_type, pooling)
    if model_type == "distilbert":
      fields = dict(
          vocab_size=hf["vocab_size"], hidden_size=hf["dim"], num_layers=hf["n_layers"],
          num_heads=hf["n_heads"], intermediate_size=hf["hidden_dim"],
          max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=0,
          hidden_act=hf.get("activation", "gelu"), layer_norm_eps=1e-12,
          hidden_dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.1),
          classifier_dropout=hf.get("seq_classif_dropout", 0.2),
          pad_token_id=hf.get("pad_token_id", 0) or 0, has_pooler=False)
    else:
      classifier_dropout = hf.get("classifier_dropout")
      fields = dict(
          vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
          num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
          intermediate_size=hf["intermediate_size"],
          max_position_embeddings=hf["max_position_embeddings"],
          type_vocab_size=hf.get("type_vocab_size", 2), hidden_act=hf.get("hidden_act", "gelu"),
          layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
          hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
          attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
          classifier_dropout=(classifier_dropout if classifier_dropout is not None
                              else hf.get("hidden_dropout_prob", 0.1)),
          pad_token_id=hf.get("pad_token_id", 0) or 0,
          # A classifier reads the pooler only as BERT's HF head does;
          # RoBERTa's head replaces the pooler with its own dense layer.
          has_pooler=heads.keeps_pooler(task, model_type, pooling))
    return cls(model_type=model_type, initializer_range=hf.get("initializer_range", 0.02),
               task=task, num_labels=heads.num_labels(hf, num_labels), dtype=dtype,
               pooling=pooling, hf_extra=hf_config.extra_fields(hf, _HF_FIELDS[model_type]),
               **fields)

  def to_hf(self) -> dict:
    """The Hugging Face config.json contents for this architecture."""
    hf = hf_config.restore(self.hf_extra)
    if self.model_type == "distilbert":
      hf.update(dim=self.hidden_size, n_layers=self.num_layers, n_heads=self.num_heads,
                hidden_dim=self.intermediate_size, activation=self.hidden_act,
                dropout=self.hidden_dropout, attention_dropout=self.attention_dropout,
                seq_classif_dropout=self.classifier_dropout)
    else:
      hf.update(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
                type_vocab_size=self.type_vocab_size, hidden_act=self.hidden_act,
                layer_norm_eps=self.layer_norm_eps, hidden_dropout_prob=self.hidden_dropout,
                attention_probs_dropout_prob=self.attention_dropout,
                classifier_dropout=self.classifier_dropout)
    hf.update(model_type=self.model_type, vocab_size=self.vocab_size,
              max_position_embeddings=self.max_position_embeddings,
              pad_token_id=self.pad_token_id, initializer_range=self.initializer_range)
    hf.update(heads.hf_config(self.task, hf, self.num_labels))
    return hf


_COMMON_HF_FIELDS = {"model_type", "vocab_size", "max_position_embeddings", "pad_token_id",
                     "initializer_range", "architectures", "transformers_version", "dtype",
                     "torch_dtype", "label2id", "num_labels"}
_HF_FIELDS = {
    "distilbert": _COMMON_HF_FIELDS | {"dim", "n_layers", "n_heads", "hidden_dim", "activation",
                                       "dropout", "attention_dropout", "seq_classif_dropout"},
    "bert": _COMMON_HF_FIELDS | {"hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size", "type_vocab_size", "hidden_act",
                                 "layer_norm_eps", "hidden_dropout_prob",
                                 "attention_probs_dropout_prob", "classifier_dropout"},
}
_HF_FIELDS["roberta"] = _HF_FIELDS["bert"]


class Embeddings(nnx.Module):

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    self.word = layers.embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                             init_std=std, dtype=dtype, rngs=rngs)
    self.position = layers.embed(cfg.max_position_embeddings, cfg.hidden_size,
                                 axes=("positions", "embed"), init_std=std, dtype=dtype, rngs=rngs)
    if cfg.type_vocab_size:
      self.token_type = layers.embed(cfg.type_vocab_size, cfg.hidden_size,
                                     axes=("token_types", "embed"), init_std=std, dtype=dtype,
                                     rngs=rngs)
    self.norm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)
    self.model_type = cfg.model_type
    self.pad_token_id = cfg.pad_token_id

  def __call__(self, input_ids_bs, token_type_ids_bs, *, prompt_bve=None, offset: int = 0,
               deterministic, rngs):
    """Embedded tokens, after `prompt_bve` (prompt tuning's virtual tokens) if given;
    positions start at `offset` (prefix tuning's virtual tokens before them)."""
    words_bse = self.word(input_ids_bs)
    is_token_bs = (input_ids_bs != self.pad_token_id).astype(jnp.int32)
    if prompt_bve is not None:
      virtual = prompt_bve.shape[1]
      words_bse = jnp.concatenate([prompt_bve.astype(words_bse.dtype), words_bse], axis=1)
      is_token_bs = jnp.pad(is_token_bs, ((0, 0), (virtual, 0)), constant_values=1)
      if token_type_ids_bs is not None:
        token_type_ids_bs = jnp.pad(token_type_ids_bs, ((0, 0), (virtual, 0)))
    shape_bs = words_bse.shape[:2]
    if self.model_type == "roberta":
      # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding
      # the padding index (fairseq's make_positions).
      positions_bs = (jnp.cumsum(is_token_bs, axis=1) + offset) * is_token_bs + self.pad_token_id
    else:
      positions_bs = jnp.broadcast_to(jnp.arange(shape_bs[1]) + offset, shape_bs)
    x_bse = words_bse + self.position(positions_bs)
    if hasattr(self, "token_type"):
      if token_type_ids_bs is None:
        token_type_ids_bs = jnp.zeros(shape_bs, jnp.int32)
      x_bse = x_bse + self.token_type(token_type_ids_bs)
    return self.dropout(self.norm(x_bse), deterministic=deterministic, rngs=rngs)


class SelfAttention(nnx.Module):

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    heads = (cfg.num_heads, cfg.head_dim)
    self.query, self.key, self.value = (
        layers.Dense(cfg.hidden_size, heads, axes=("embed", "heads", "kv"), init_std=std,
                     dtype=dtype, rngs=rngs) for _ in range(3))
    self.output = layers.Dense(heads, cfg.hidden_size, axes=("heads", "kv", "embed"),
                               init_std=std, dtype=dtype, rngs=rngs)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  def __call__(self, x_bse, mask, *, prefix_hidden=None, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    q_bthd, k_bshd, v_bshd = self.query(x_bse, **kw), self.key(x_bse, **kw), self.value(x_bse, **kw)
    if hasattr(self, "prefix"):  # Prefix tuning: its keys and values first.
      k_bshd, v_bshd = (
          jnp.concatenate([jnp.broadcast_to(p_vhd.astype(x.dtype), (x.shape[0], *p_vhd.shape)),
                           x], axis=1)
          for p_vhd, x in zip(self.prefix(prefix_hidden), (k_bshd, v_bshd)))
    out_bthd = layers.attention(q_bthd, k_bshd, v_bshd, mask, dropout=self.attention_dropout,
                                **kw)
    return self.dropout(self.output(out_bthd, **kw), **kw)


class Mlp(nnx.Module):

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    dtype, std = jnp.dtype(cfg.dtype), cfg.initializer_range
    self.up = layers.Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"),
                           init_std=std, dtype=dtype, rngs=rngs)
    self.down = layers.Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"),
                             init_std=std, dtype=dtype, rngs=rngs)
    self.activation = layers.activation(cfg.hidden_act)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)

  def __call__(self, x_bse, *, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    h_bsm = self.activation(self.up(x_bse, **kw))
    return self.dropout(self.down(h_bsm, **kw), **kw)


class EncoderLayer(nnx.Module):
  """Post-LayerNorm transformer layer: x = norm(x + sublayer(x))."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.attention_norm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                            dtype=dtype, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.mlp_norm = layers.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype,
                                      rngs=rngs)

  def __call__(self, x_bse, mask, *, prefix_hidden=None, deterministic, rngs):
    x_bse = self.attention_norm(
        x_bse + self.attention(x_bse, mask, prefix_hidden=prefix_hidden,
                               deterministic=deterministic, rngs=rngs))
    return self.mlp_norm(x_bse + self.mlp(x_bse, deterministic=deterministic, rngs=rngs))


class Encoder(nnx.Module):

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


class BertBackbone(nnx.Module):
  """Embeddings + encoder (+ BERT's pooler where the config keeps it): hidden states.

  `KV_AXES` names prefix tuning's (heads, head_dim) axes (see the module docstring).
  """

  KV_AXES = ("heads", "kv")

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    if cfg.has_pooler:
      self.pooler = layers.Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "embed_out"),
                                 init_std=cfg.initializer_range, dtype=jnp.dtype(cfg.dtype),
                                 rngs=rngs)

  def backbone(self, input_ids, attention_mask=None, token_type_ids=None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None) -> BackboneOutput:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    prompt, prefix = self.num_virtual_tokens()
    prompt_bve = None
    if prompt:
      prompt_ve = self.prompt()
      prompt_bve = jnp.broadcast_to(prompt_ve, (input_ids.shape[0], *prompt_ve.shape))
    prefix_hidden = self.prefix() if prefix else None
    # Every token sees the virtual ones.
    mask = layers.padding_mask(jnp.pad(attention_mask, ((0, 0), (prefix + prompt, 0)),
                                       constant_values=1))
    x_bse = self.embeddings(input_ids, token_type_ids, prompt_bve=prompt_bve, offset=prefix,
                            deterministic=deterministic, rngs=rngs)
    embedded_bse = x_bse

    def run_layer(layer, x_bse, layer_rngs, _):
      x_bse = layer(x_bse, mask, prefix_hidden=prefix_hidden, deterministic=deterministic,
                    rngs=layer_rngs)
      return x_bse, x_bse

    x_bse, outputs = layers.run_layers(self.encoder.layers, x_bse, run_layer,
                                       execution=self.config.execution, rngs=rngs)
    pooled_be = jnp.tanh(self.pooler(x_bse[:, 0])) if hasattr(self, "pooler") else None
    return BackboneOutput(x_bse[:, prompt:], tuple(h[:, prompt:] for h in (embedded_bse, *outputs)),
                          pooled_be, None, x_bse[:, :prompt] if prompt else None)

  def attention_modules(self) -> list[nnx.Module]:
    """Every layer's attention module, in order (where prefix tuning adds its keys)."""
    return [layer.attention for layer in self.encoder.layers]

  def num_virtual_tokens(self) -> tuple[int, int]:
    """(prompt tuning's, prefix tuning's) virtual tokens; 0 without the adapter."""
    return tuple(getattr(self, name).num_virtual_tokens if hasattr(self, name) else 0
                 for name in ("prompt", "prefix"))


class BertFamilyModel(BertBackbone, headed.HeadedModel):
  """The backbone with the head the config's task selects (`ftjax.models.heads`)."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.attach_head(cfg, cfg.model_type, word_embedding=self.embeddings.word, rngs=rngs)
