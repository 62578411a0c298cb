"""ftjax: fine-tune pretrained Hugging Face transformers in JAX (Flax NNX)."""

from ftjax.errors import CheckpointError, ConfigError, FtjaxError

__version__ = "0.1.0"
