"""Every config in configs/ loads and validates; the schema catches typos and bad types."""

import pathlib

import ml_collections
import pytest
from ml_collections import config_flags

from ftjax import config as config_lib
from ftjax.errors import ConfigError
from tests.conftest import REPO

CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def test_there_are_configs():
  assert {p.name for p in CONFIG_FILES} >= {"sentiment_minilm.py", "forkme.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_loads_and_validates(path: pathlib.Path):
  config = config_flags.config_flags._LoadConfigModule(path.stem, str(path)).get_config()  # pylint: disable=protected-access
  assert isinstance(config, ml_collections.ConfigDict)
  config_lib.validate(config)
  assert config.model.task in config_lib.TASKS
  # The docstring gives the command to run it.
  assert "python -m ftjax.main --config=configs/" + path.name in path.read_text()


def _config(**overrides):
  dotted = {key.replace("__", "."): value for key, value in overrides.items()}
  return config_lib.override(config_lib.default_config(), dotted)


@pytest.mark.parametrize("overrides, message", [
    ({"model__nmae": "x"}, "unknown config key 'model.nmae'"),
    ({"batchsize": 3}, "unknown config key 'batchsize'"),
    ({"model__task": "regression"}, "'model.task' is 'regression'"),
    ({"model__dtype": "int8"}, "'model.dtype' is 'int8'"),
    ({"model__num_labels": 0}, "'model.num_labels' is 0"),
    ({"data__max_length": 1}, "'data.max_length' is 1"),
    ({"training__batch_size": 0}, "'training.batch_size' is 0"),
    ({"optimizer__learning_rate": -1e-3}, "'optimizer.learning_rate' is -0.001"),
    ({"strategy__lora__rank": 0}, "'strategy.lora.rank' is 0"),
    ({"strategy__name": "adalora"}, "'strategy.name' is 'adalora'"),
    ({"optimizer__warmup_steps": 10, "optimizer__warmup_fraction": 0.1},
     "'optimizer.warmup_steps' is 10"),
    ({"training__num_epochs": 0.0}, "'training.num_epochs' is 0.0"),
    ({"training__num_steps": 0}, "'training.num_steps' is 0"),
    ({"mesh__tensor": 0}, "'mesh.tensor' is 0"),
])
def test_validate_names_the_bad_key(overrides, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(_config(**overrides))


@pytest.mark.parametrize("value, message", [
    ("32", "'training.batch_size' is '32' \\(str\\); expected a int"),
    (True, "'training.batch_size' is True \\(bool\\)"),
    (None, "'training.batch_size' must be set"),
])
def test_validate_checks_types(value, message):
  # A config file may build its ConfigDict from scratch, bypassing type safety.
  raw = config_lib.default_config().to_dict()
  raw["training"]["batch_size"] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(ml_collections.ConfigDict(raw))
