"""Objectives as the core sees them: the registry, their config groups, and their pieces."""

import ml_collections
import pytest

from ftjax import config as config_lib
from ftjax import objectives
from ftjax.errors import ConfigError
from ftjax.objectives import base
from ftjax.objectives.causal_lm import round_robin


def test_samples_are_shown_task_by_task_grouped_by_the_exact_task_name():
  # Tasks `math` and `math_hard` share a prefix: they must stay two tasks.
  records = [{"task": t, "i": i} for i, t in enumerate(
      ["math", "math", "math_hard", "code", "math", "math_hard"])]
  order = [(r["task"], r["i"]) for r in round_robin(records)]
  assert order == [("math", 0), ("math_hard", 2), ("code", 3), ("math", 1), ("math_hard", 5),
                   ("math", 4)]


def test_the_default_objective_is_the_one_of_model_task():
  c = config_lib.validate(config_lib.default_config())
  assert c.objective.module == ""  # ftjax's own objectives need no import
  assert objectives.name_of(c) == "classification"
  assert config_lib.objective_class(c) is objectives.Classification
  c.model.task, c.eval.metric, c.eval.mode = "causal_lm", "test/perplexity", "min"
  assert config_lib.objective_class(config_lib.validate(c)) is objectives.CausalLM
  c.model.task, c.eval.metric = "encoder", "test/loss"  # a bare model (probe runs): no objective, nothing to train
  assert config_lib.objective_class(config_lib.validate(c)) is None


class _Scaled(base.Objective):
  name = "test_scaled"
  head = "classification"
  metrics = ("loss",)

  @classmethod
  def config(cls):
    return ml_collections.ConfigDict({"scale": 1.0, "mode": "sum"})

  @classmethod
  def check_config(cls, config):
    if config.objective.mode not in ("sum", "mean"):
      raise ConfigError(f"config key 'objective.mode' is {config.objective.mode!r}; expected "
                        f"'sum' or 'mean'")

  batch_spec = build_data = loss = eval_outputs = eval_metrics = None


def test_an_objective_brings_its_config_group_and_its_checks():
  objectives.register(_Scaled)
  c = config_lib.default_config()
  c.objective.name, c.eval.metric = "test_scaled", "validation/loss"
  config_lib.validate(c)
  assert c.objective.to_dict() == {"name": "test_scaled", "module": "tests.test_objectives",
                                   "scale": 1.0, "mode": "sum"}
  c.objective.scale = 2  # an int where a float is expected is fine, as elsewhere
  config_lib.validate(c)
  c.objective.mode = "max"
  with pytest.raises(ConfigError, match=r"'objective.mode' is 'max'; expected 'sum' or 'mean'"):
    config_lib.validate(c)
  c.objective.mode = "sum"
  with c.unlocked():
    c.objective.scael = 1.0
  with pytest.raises(ConfigError, match=r"unknown config key 'objective.scael'"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.objective.name, c.eval.metric = "test_scaled", "validation/accuracy"
  with pytest.raises(ConfigError, match=r"'eval.metric' is 'validation/accuracy'.*\('loss',\)"):
    config_lib.validate(c)


def test_unknown_objective_names_the_registered_ones():
  c = config_lib.default_config()
  c.objective.name = "regresion"
  with pytest.raises(ConfigError, match=r"'objective.name' is 'regresion'; expected one of "
                     r"\(.*'causal_lm', 'classification'"):
    config_lib.validate(c)


def test_a_taken_objective_name_cannot_be_registered_again():
  class Other(_Scaled):
    pass

  Other.name = "classification"
  with pytest.raises(ValueError, match="objective name 'classification' is taken"):
    objectives.register(Other)


def test_the_objective_must_get_the_head_it_trains():
  c = config_lib.default_config()
  c.objective.name, c.model.task = "classification", "encoder"
  with pytest.raises(ConfigError, match=r"'model.task' is 'encoder'; expected 'classification', "
                     r"the head objective 'classification' trains"):
    config_lib.validate(c)


def test_an_objective_module_that_does_not_import_is_one_line():
  c = config_lib.default_config()
  c.objective.name, c.objective.module = "regression", "no_such_module_xyz"
  with pytest.raises(ConfigError, match=r"'objective.module' is 'no_such_module_xyz', which does "
                     r"not import"):
    config_lib.validate(c)


def test_a_bare_model_config_validates_for_probing():
  c = config_lib.default_config()
  c.model.task = "encoder"  # eval.metric stays validation/accuracy: nothing is trained
  assert config_lib.objective_class(config_lib.validate(c)) is None
