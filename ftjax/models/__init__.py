"""Flax NNX models loaded from (and saved to) Hugging Face checkpoints."""

from ftjax.models.pretrained import (Loaded, Model, config_from_pretrained, from_pretrained,
                                     keep_layers, load_pretrained, load_tokenizer,
                                     save_pretrained)
from ftjax.models.registry import FAMILIES

__all__ = ["FAMILIES", "Loaded", "Model", "config_from_pretrained", "from_pretrained",
           "keep_layers", "load_pretrained", "load_tokenizer", "save_pretrained"]
