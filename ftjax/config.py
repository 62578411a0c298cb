"""The config schema: every key ftjax reads, its default, and its checks.

An experiment file `configs/<exp>.py` starts from `default_config()` and
changes what it needs. `validate` then rejects, before any model is loaded,
keys the schema does not have (a typo such as `model.nmae`) and values of the
wrong type or outside their range, naming the key.
"""

import os

import ml_collections
from ml_collections import config_dict

from ftjax.errors import ConfigError

TASKS = ("encoder", "classification")
DTYPES = ("float32", "bfloat16", "float16")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  # A Hugging Face hub id or a local folder with config.json + model.safetensors.
  c.model.name_or_path = ""
  # "classification" adds the family's sequence-classification head;
  # "encoder" is the bare model (hidden states).
  c.model.task = "classification"
  # Classes of the classification head; None: from the checkpoint's id2label.
  c.model.num_labels = config_dict.placeholder(int)
  # Compute dtype; parameters stay float32.
  c.model.dtype = "float32"
  # pytorch_model.bin is a pickle (it can run code when loaded): refused unless True.
  c.model.allow_pickle = False

  c.data = ml_collections.ConfigDict()
  # A local folder of <split>.jsonl/.json/.csv/.parquet files, or a single file.
  c.data.path = ""
  c.data.text_column = "text"
  c.data.label_column = "label"
  c.data.train_split = "train"
  # Longest tokenised sequence; longer ones are truncated.
  c.data.max_length = 128

  c.batch_size = 32
  c.seed = 0
  return c


def shared_data_dir() -> str:
  """Folder of the shared datasets: $FTJAX_DATA_DIR, or `../shared/data` beside the repo."""
  env = os.environ.get("FTJAX_DATA_DIR")
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(repo), "shared", "data")


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                prefix: str = "") -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"unknown config key {name!r}; expected one of "
                        f"{', '.join(prefix + k for k in sorted(schema.keys()))}")
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key {name!r} must be a group of keys, got {value!r}")
      _check_keys(value, default, name + ".")
      continue
    expected = schema.get_type(key)
    if value is None:
      if not _is_placeholder(schema, key):
        raise ConfigError(f"config key {name!r} must be set (a {expected.__name__})")
      continue
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
      raise ConfigError(f"config key {name!r} is {value!r} ({type(value).__name__}); "
                        f"expected a {expected.__name__}")


def _is_placeholder(schema: ml_collections.ConfigDict, key: str) -> bool:
  """Was the schema's default `config_dict.placeholder(type)` (None allowed)?"""
  return schema[key] is None


def _check_values(c: ml_collections.ConfigDict) -> None:
  def require(ok: bool, key: str, value, expected: str):
    if not ok:
      raise ConfigError(f"config key {key!r} is {value!r}; expected {expected}")

  require(c.model.task in TASKS, "model.task", c.model.task, f"one of {TASKS}")
  require(c.model.dtype in DTYPES, "model.dtype", c.model.dtype, f"one of {DTYPES}")
  require(c.model.num_labels is None or c.model.num_labels >= 1, "model.num_labels",
          c.model.num_labels, "a positive number of classes")
  require(c.data.max_length >= 2, "data.max_length", c.data.max_length, "at least 2 tokens")
  require(c.batch_size >= 1, "batch_size", c.batch_size, "a positive number of examples")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks keys, types and values against the schema; returns the config."""
  _check_keys(config, default_config())
  _check_values(config)
  return config
