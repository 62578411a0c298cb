"""What backbones and models return (a decoder's cache is `ftjax.models.decoder.Cache`)."""

from typing import Any, NamedTuple

import jax


class BackboneOutput(NamedTuple):
  last_hidden_state: jax.Array          # (batch, seq, embed); a decoder's is after the final norm
  # Embeddings output + each layer's output; a decoder's last entry is after
  # the final norm (it equals last_hidden_state), as transformers returns them.
  hidden_states: tuple[jax.Array, ...]
  pooled: jax.Array | None = None       # BERT's pooler output (batch, embed), where it has one
  cache: Any = None                     # a decoder's updated KV cache, when one was passed
  # Prompt tuning's virtual tokens, which the backbone ran in front of the
  # tokens: their final states (batch, num_virtual_tokens, embed), else None.
  # The states above hold the real tokens only (they line up with input_ids);
  # slot 0 of what the layers saw, which a "cls" head reads, is virtual_states[:, 0].
  virtual_states: jax.Array | None = None


class ModelOutput(NamedTuple):
  # The head's output: (batch, num_labels) for classification, (batch, seq,
  # vocab) for causal_lm; None for a bare backbone.
  logits: jax.Array | None
  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]
  pooled: jax.Array | None
  cache: Any
