"""Task heads, apart from the backbones: hidden states -> what an objective needs.

A backbone (`bert.model.BertBackbone`; `decoder.DecoderBackbone` with the
Llama and GPT-2 backbones on it) returns a `BackboneOutput` and never looks at
the task. A head reads that output in two steps,

  features = pool(head's pooling, backbone output)   fixed per example when the backbone is frozen
  logits = head(features)                             the head's own parameters

so head-only training can cache the features (`method="features"`) and train
the head alone (`method="classify"`).

A family's top module is its backbone plus `headed.HeadedModel`, which attaches
the head the config's task selects (`HEADS`) at the attribute the head names
(`classifier`, `lm_head`): head parameters keep the paths that checkpoints,
partition rules and LoRA targets use (`classifier/out/kernel`,
`lm_head/kernel`). Each head declares, per family *style* (how a family's
Hugging Face task models build and name their heads: "bert", "roberta",
"distilbert", "decoder"), its key-table rows and its transformers class
suffix; the registry appends them to the family's table. A new head (token
classification, extractive QA, images) is a new class here plus its entry in
`HEADS`: no family changes.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap, layers
from ftjax.models.outputs import BackboneOutput

# Tasks whose model is the bare backbone (no head). Their Hugging Face model is
# the base model, whose checkpoint names carry no task-model prefix ("bert.").
BASE_TASKS = ("encoder", "decoder")


# --- Pooling: what a head reads from the backbone's output ------------------

def last_token_index(input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None,
                     pad_token_id: int | None) -> jax.Array:
  """(batch,) slot of the token a decoder's sequence classifier reads.

  As transformers' *ForSequenceClassification: the rightmost token that is not
  `pad_token_id` (so left and right padding both work); without a pad id, the
  rightmost token with attention_mask == 1 (transformers then only allows a
  batch of one, where that is the last token).
  """
  if pad_token_id is not None:
    real_bt = input_ids_bt != pad_token_id
  elif attention_mask_bt is not None:
    real_bt = attention_mask_bt.astype(bool)
  else:
    real_bt = jnp.ones(input_ids_bt.shape, bool)
  slots_t = jnp.arange(input_ids_bt.shape[1], dtype=jnp.int32)
  return jnp.argmax(slots_t * real_bt, axis=-1)


def pool(pooling: str, out: BackboneOutput, input_ids_bs: jax.Array,
         attention_mask_bs: jax.Array | None, pad_token_id: int | None) -> jax.Array:
  """The features a head reads from `out`.

  "tokens": every token's state (batch, seq, embed); the others (batch, embed):
  "pooler" BERT's pooler output, "cls" the first token's state, "mean" the
  mean over non-padding tokens, "last" the last non-padding token's state.

  With prompt tuning's virtual tokens in front of the tokens (`out.virtual_states`),
  "cls" reads the first slot the layers saw, the first virtual token, as the
  pooler does and as transformers' heads do under PEFT; "tokens", "mean" and
  "last" read the real tokens only.
  """
  x_bse = out.last_hidden_state
  if pooling == "tokens":
    return x_bse
  if pooling == "pooler":
    if out.pooled is None:
      raise ConfigError("pooling 'pooler' reads the pooler, which this backbone does not have")
    return out.pooled
  if pooling == "cls":
    return (x_bse if out.virtual_states is None else out.virtual_states)[:, 0]
  if pooling == "mean":
    if attention_mask_bs is None:
      attention_mask_bs = jnp.ones_like(input_ids_bs)
    mask_bs1 = attention_mask_bs[..., None].astype(x_bse.dtype)
    return (x_bse * mask_bs1).sum(axis=1) / jnp.maximum(mask_bs1.sum(axis=1), 1)
  if pooling == "last":
    index_b = last_token_index(input_ids_bs, attention_mask_bs, pad_token_id)
    return jnp.take_along_axis(x_bse, index_b[:, None, None], axis=1)[:, 0]
  raise ConfigError(f"pooling {pooling!r}; expected one of tokens, pooler, cls, mean, last")


# --- Sequence classification -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClassifierLayout:
  """One style's Hugging Face sequence classifier, as pre-trained (pooling="pooler")."""

  out: str                      # HF name of the output projection
  reads: str                    # what it reads: "pooler", "cls" (first token) or "last"
  dense: str | None = None      # HF name of a dense layer before `out`
  activation: str | None = None  # applied after `dense`
  dropout_first: bool = False   # dropout before `dense` as well
  dropout: bool = True          # dropout before `out`
  bias: bool = True             # `out` has a bias
  # Config poolings that name this head ("last" for a decoder), and the
  # ones it may read instead (a plain dropout -> out head, not exportable).
  pooler_aliases: tuple[str, ...] = ()
  other_poolings: tuple[str, ...] = ("cls", "mean")


class SequenceClassifier(nnx.Module):
  """Sequence classification: features (batch, embed) -> logits (batch, num_labels).

    BERT        pooler output                    -> dropout -> out
    RoBERTa     h[:, 0] -> dropout -> tanh(dense) -> dropout -> out
    DistilBERT  h[:, 0] -> relu(dense)            -> dropout -> out
    decoders    h at the last non-padding token  -> out (no bias: transformers' `score`)

  With pooling "cls" or "mean" an encoder reads those features directly
  (dropout -> out); such a head has no Hugging Face class to export to.
  """

  TASK = "classification"
  ATTR = "classifier"
  HF_SUFFIX = "ForSequenceClassification"
  LAYOUTS = {
      "bert": ClassifierLayout(out="classifier", reads="pooler"),
      "roberta": ClassifierLayout(out="classifier.out_proj", reads="cls",
                                  dense="classifier.dense", activation="tanh",
                                  dropout_first=True),
      "distilbert": ClassifierLayout(out="classifier", reads="cls", dense="pre_classifier",
                                     activation="relu"),
      "decoder": ClassifierLayout(out="score", reads="last", dropout=False, bias=False,
                                  pooler_aliases=("last",), other_poolings=()),
  }

  def __init__(self, hidden_size: int, num_labels: int, *, layout: ClassifierLayout,
               with_dense: bool, dropout: float, init_std: float, dtype, rngs: nnx.Rngs):
    if with_dense:
      self.dense = layers.Dense(hidden_size, hidden_size, axes=("embed", "embed_out"),
                                init_std=init_std, dtype=dtype, rngs=rngs)
    self.out = layers.Dense(hidden_size, num_labels, axes=("embed", "labels"),
                            init_std=init_std, dtype=dtype, use_bias=layout.bias, rngs=rngs)
    if layout.dropout:
      self.dropout = nnx.Dropout(dropout)
    self.activation = layout.activation if with_dense else None
    self.dropout_first = layout.dropout_first and with_dense

  @classmethod
  def create(cls, cfg, style: str, *, word_embedding: nnx.Embed,
             rngs: nnx.Rngs) -> "SequenceClassifier":
    del word_embedding  # Only a tied LM head reads it.
    layout = cls.LAYOUTS[style]
    return cls(cfg.hidden_size, cfg.num_labels, layout=layout,
               with_dense=layout.dense is not None and cfg.pooling == "pooler",
               dropout=cfg.classifier_dropout if layout.dropout else 0.0,
               init_std=cfg.initializer_range, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

  @classmethod
  def reads(cls, style: str, pooling: str) -> str:
    """What the head pools for the config's `pooling` ("pooler": as the HF head does)."""
    return cls.LAYOUTS[style].reads if pooling == "pooler" else pooling

  @classmethod
  def check_pooling(cls, style: str, pooling: str) -> str:
    """The config's `pooling`, checked; stored as "pooler" where it names the HF head's."""
    layout = cls.LAYOUTS[style]
    if pooling in ("pooler",) + layout.pooler_aliases:
      return "pooler"
    if pooling not in layout.other_poolings:
      expected = ("pooler",) + layout.pooler_aliases + layout.other_poolings
      raise ConfigError(f"pooling={pooling!r} is not supported by {style} classifiers; "
                        f"expected one of {expected}")
    return pooling

  @classmethod
  def rows(cls, style: str) -> tuple[keymap.Rule, ...] | None:
    """The head's key-table rows in `style`, or None where the style has no such head."""
    layout = cls.LAYOUTS.get(style)
    if layout is None:
      return None
    rows = ()
    if layout.dense is not None:
      rows += keymap.dense_rules(layout.dense, f"{cls.ATTR}/dense", base=False, optional=True)
    return rows + keymap.dense_rules(layout.out, f"{cls.ATTR}/out", bias=layout.bias,
                                     base=False, optional=True)

  @classmethod
  def check_export(cls, cfg) -> None:
    """Raises unless transformers' class holds this head as `cfg` configures it."""
    if cfg.pooling != "pooler":
      raise CheckpointError(f"pooling={cfg.pooling!r} has no Hugging Face classification "
                            f"head to export to; only pooling='pooler' exports")

  @classmethod
  def hf_config(cls, hf: dict, num_labels: int) -> dict:
    """config.json's id2label/label2id: the checkpoint's names when their count fits."""
    id2label = hf.get("id2label") or {}
    if len(id2label) != num_labels:
      id2label = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    return {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}

  def __call__(self, features_be: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    x_be = features_be
    if self.dropout_first:
      x_be = self.dropout(x_be, **kw)
    if hasattr(self, "dense"):
      x_be = layers.activation(self.activation)(self.dense(x_be, **kw))
    if hasattr(self, "dropout"):
      x_be = self.dropout(x_be, **kw)
    return self.out(x_be, **kw)


# --- Language modelling -------------------------------------------------------

class LMHead(layers.Dense):
  """An untied LM head: a bias-free (embed, vocab) projection, transformers' `lm_head`.

  A plain `layers.Dense`, so LoRA can adapt it like any other projection.
  With tie_word_embeddings the head is a `TiedLMHead` instead.
  """

  TASK = "causal_lm"
  ATTR = "lm_head"
  HF_SUFFIX = "ForCausalLM"
  STYLES = ("decoder",)

  def __init__(self, hidden_size: int, vocab_size: int, *, init_std: float, dtype,
               rngs: nnx.Rngs):
    super().__init__(hidden_size, vocab_size, axes=("embed", "vocab"), init_std=init_std,
                     dtype=dtype, use_bias=False, rngs=rngs)

  @classmethod
  def create(cls, cfg, style: str, *, word_embedding: nnx.Embed,
             rngs: nnx.Rngs) -> nnx.Module:
    del style
    if cfg.tie_word_embeddings:
      return TiedLMHead(word_embedding)
    return cls(cfg.hidden_size, cfg.vocab_size, init_std=cfg.initializer_range,
               dtype=jnp.dtype(cfg.dtype), rngs=rngs)

  @classmethod
  def reads(cls, style: str, pooling: str) -> str:
    del style, pooling
    return "tokens"

  @classmethod
  def rows(cls, style: str) -> tuple[keymap.Rule, ...] | None:
    if style not in cls.STYLES:
      return None
    # A tied head has no parameter of its own: a checkpoint's lm_head.weight is
    # then skipped, and none is exported (transformers ties it).
    return (keymap.Rule("lm_head.weight", f"{cls.ATTR}/kernel", keymap.LINEAR, base=False,
                        optional=True),)

  @classmethod
  def check_export(cls, cfg) -> None:
    del cfg  # Tied or not, transformers' *ForCausalLM holds it.

  @classmethod
  def hf_config(cls, hf: dict, num_labels: int) -> dict:
    del hf, num_labels
    return {}


class TiedLMHead(nnx.Module):
  """A tied LM head: logits = h @ word_embeddings.T, with no parameter of its own.

  It holds the backbone's embedding module itself (an NNX shared reference).
  NNX names a shared variable by its first path in sorted attribute order, and
  `embeddings` sorts before `lm_head`, so the table keeps its one path,
  `embeddings/word/embedding`.
  """

  def __init__(self, embedding: nnx.Embed):
    self.embedding = embedding

  def __call__(self, x_bte: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del deterministic, rngs
    return self.embedding.attend(x_bte)


# task -> its head. Each declares TASK, ATTR (where it sits), HF_SUFFIX and
# the classmethods create, reads, rows, check_export and hf_config.
HEADS = {head.TASK: head for head in (SequenceClassifier, LMHead)}


def head_for(task: str):
  """The head class of `task`, or None for a bare backbone."""
  if task in BASE_TASKS:
    return None
  if task not in HEADS:
    raise ConfigError(f"task {task!r} has no head; expected one of {BASE_TASKS + tuple(HEADS)}")
  return HEADS[task]


def heads_of(style: str) -> dict[str, Any]:
  """task -> head class, for every head that `style` has."""
  return {task: head for task, head in HEADS.items() if head.rows(style) is not None}


def num_labels(hf: dict, requested: int | None) -> int:
  """The classifier's size: as requested, else the checkpoint's id2label, else 2."""
  return requested if requested is not None else len(hf.get("id2label") or {}) or 2


def hf_config(task: str, hf: dict, labels: int) -> dict:
  """The config.json fields `task`'s head writes (id2label/label2id for a classifier)."""
  head = head_for(task)
  return {} if head is None else head.hf_config(hf, labels)


def check_export(cfg) -> None:
  """Raises unless a transformers class can hold `cfg`'s head (a bare backbone always can)."""
  head = head_for(cfg.task)
  if head is not None:
    head.check_export(cfg)


def keeps_pooler(task: str, style: str, pooling: str) -> bool:
  """Does the backbone keep its pooler: as a bare model (the pooled output is
  one of its outputs), or because the task's head reads it?"""
  head = head_for(task)
  return head is None or head.reads(style, pooling) == "pooler"
