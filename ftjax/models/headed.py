"""A family's top module: its backbone plus the head its config's task selects.

`ftjax.models.Model` runs this module: `model.apply(params, input_ids,
attention_mask, ...)` returns a `ModelOutput` whose `.logits` is the head's
output; `method="hidden_states"` the backbone's final hidden states (what
objectives build on); `method="features"` and `method="classify"` the two
halves of the head (feature caching, head-only training).
"""

import jax
from flax import nnx

from ftjax.errors import ConfigError
from ftjax.models import heads
from ftjax.models.outputs import ModelOutput


class HeadedModel(nnx.Module):
  """A backbone with the head its config's task selects: every family's top module.

  A family's top module subclasses its backbone and this class, builds the
  backbone, then calls `attach_head`. The backbone provides `config` and
  `backbone(input_ids, attention_mask=None, ..., deterministic=, rngs=) ->
  BackboneOutput`; other inputs (BERT's token_type_ids; a decoder's
  positions_bt, segment_ids_bt and cache) pass through every entry point.
  """

  def attach_head(self, cfg, style: str, *, word_embedding: nnx.Embed,
                  rngs: nnx.Rngs) -> None:
    head = heads.head_for(cfg.task)
    # Static: where the head sits and what it reads (None: a bare backbone).
    self.head_attr = self.head_reads = None
    if head is None:
      return
    if head.rows(style) is None:
      raise ConfigError(f"task {cfg.task!r} has no head in a {cfg.model_type} model; expected "
                        f"one of {tuple(heads.heads_of(style))}")
    setattr(self, head.ATTR, head.create(cfg, style, word_embedding=word_embedding, rngs=rngs))
    self.head_attr, self.head_reads = head.ATTR, head.reads(style, cfg.pooling)

  def __call__(self, input_ids, attention_mask=None, *args, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, **inputs) -> ModelOutput:
    """The backbone, then the head: `.logits` is the head's output (None without one)."""
    out = self.backbone(input_ids, attention_mask, *args, deterministic=deterministic,
                        rngs=rngs, **inputs)
    logits = None
    if self.head_attr is not None:
      features = heads.pool(self.head_reads, out, input_ids, attention_mask,
                            self.config.pad_token_id)
      logits = self.classify(features, deterministic=deterministic, rngs=rngs)
    return ModelOutput(logits, out.last_hidden_state, out.hidden_states, out.pooled, out.cache)

  def hidden_states(self, input_ids, attention_mask=None, *args, deterministic: bool = True,
                    rngs: nnx.Rngs | None = None, **inputs) -> jax.Array:
    """(batch, seq, embed): the backbone's final hidden states (what objectives build on)."""
    return self.backbone(input_ids, attention_mask, *args, deterministic=deterministic,
                         rngs=rngs, **inputs).last_hidden_state

  def features(self, input_ids, attention_mask=None, *args, **inputs) -> jax.Array:
    """What the head reads, in inference mode: (batch, embed) for a classifier.

    With a frozen backbone these are fixed per example, so head-only training
    can compute them once and train `classify` on them (feature caching).
    """
    if self.head_attr is None:
      raise ConfigError(f"method 'features' needs a task head; this is a bare "
                        f"{self.config.task} model")
    out = self.backbone(input_ids, attention_mask, *args, deterministic=True, rngs=None,
                        **inputs)
    return heads.pool(self.head_reads, out, input_ids, attention_mask,
                      self.config.pad_token_id)

  def classify(self, features, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """The head alone: features -> logits."""
    return getattr(self, self.head_attr)(features, deterministic=deterministic, rngs=rngs)
