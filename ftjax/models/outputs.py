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


class ModelOutput(NamedTuple):
  # The head's output: (batch, num_labels) for classification, (batch, seq,
  # vocab) for causal_lm; None for a bare backbone.
  logits: jax.Array | None
  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]
  pooled: jax.Array | None
  cache: Any
