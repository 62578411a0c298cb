"""DPO, SimPO and ORPO on a tiny random Llama: the reference (adapters off vs a frozen
copy), log 2 at the start, and training that raises the reward margin."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax.core import compiled, loop, run as run_lib
from ftjax.errors import ConfigError
from ftjax.models import keymap
from tests import tiny


@pytest.fixture(scope="module")
def root(tmp_path_factory, data_dir) -> pathlib.Path:
  root = tmp_path_factory.mktemp("pref")
  tiny.make_tokenizer(root / "tok", data_dir)
  tiny.make_decoder(root / "llama", root / "tok")
  lines = (data_dir / "preference" / "train.jsonl").read_text(encoding="utf-8").splitlines()
  (root / "data").mkdir()
  (root / "data" / "train.jsonl").write_text("\n".join(lines[:32]) + "\n", encoding="utf-8")
  (root / "data" / "test.jsonl").write_text("\n".join(lines[32:40]) + "\n", encoding="utf-8")
  return root


def _config(root, **overrides):
  c = tiny.lm_config(root / "llama", root / "data")
  config_lib.set_objective(c, "preference")
  c.data.template = "raw"
  c.data.max_length = 96
  c.data.min_prompt_tokens = 16
  c.eval.metric = "test/reward_accuracy"
  c.eval.mode = "max"
  c.strategy.name = "lora"
  c.strategy.lora.targets = ("all-linear",)
  c.training.batch_size = 8
  c.eval.batch_size = 8
  return config_lib.validate(config_lib.override(c, overrides))


def _logps(run, params, model, batch):
  return run.objective._logps(model, params, run.device_batch("test", batch), rng=None,
                              deterministic=True)[0]


def test_adapters_off_reference_equals_a_frozen_copy(root):
  run = run_lib.setup(_config(root))
  assert run.objective.reference_mode() == "adapters_off" and run.refs == {}
  state = run.initial_state
  params = run.model_params(state)
  # Move the policy away from the base: random LoRA B matrices.
  flat = keymap.flatten(params)
  key = jax.random.key(1)
  for i, path in enumerate(p for p in flat if p.endswith("lora_b")):
    flat[path] = 0.5 * jax.random.normal(jax.random.fold_in(key, i), flat[path].shape)
  params = keymap.unflatten(flat, run.model.abstract_params)
  copy = run_lib.setup(_config(root, **{"objective.reference": "copy"}))
  assert set(copy.refs) == {"reference"}
  batch = next(iter(run.data.eval_batches("test")))
  off = _logps(run, run.objective.reference_params(params, {}), run.objective.reference_model,
               batch)
  frozen = _logps(copy, copy.refs["reference"], copy.objective.reference_model, batch)
  policy = _logps(run, params, run.model, batch)
  np.testing.assert_allclose(off, frozen, rtol=1e-6, atol=1e-5)
  assert np.abs(np.asarray(policy) - np.asarray(off)).max() > 1e-2


def test_dpo_starts_at_log2_and_training_raises_the_margin(root, tmp_path):
  config = _config(root, **{"training.num_steps": 12, "optimizer.learning_rate": 1e-2,
                            "eval.every_steps": 12, "eval.at_start": True,
                            "objective.beta": 0.5})
  results = loop.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  start = next(r for r in rows if r["step"] == 0 and "test/loss" in r)
  assert start["test/loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert start["test/reward_margin"] == pytest.approx(0.0, abs=1e-5)
  train = [r for r in rows if "train/loss" in r]
  assert train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
  # The training pairs' margin grows (the test pairs are too few to promise it).
  assert train[-1]["train/reward_margin"] > 0.05 and train[-1]["train/loss"] < math.log(2)
  assert "test/kl" in rows[-1] or "test/kl" in results


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_train(root, tmp_path, loss):
  config = _config(root, **{"objective.loss": loss, "objective.beta": 2.0 if loss == "simpo"
                            else 0.1, "training.num_steps": 8, "optimizer.learning_rate": 1e-2,
                            "eval.every_steps": 8})
  run = run_lib.setup(config)
  assert run.objective.reference_mode() == "none" and run.refs == {}
  loop.train_and_evaluate(config, str(tmp_path / loss))
  rows = [json.loads(l) for l in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "train/loss" in r]
  assert train[-1]["train/loss"] < train[0]["train/loss"]


@pytest.mark.parametrize("overrides, message", [
    ({"objective.beta": 0.0}, "'objective.beta' is 0.0; expected a number > 0"),
    ({"objective.beta": -1.0}, "'objective.beta' is -1.0"),
    ({"objective.loss": "kto"}, "'objective.loss' is 'kto'"),
    ({"objective.dpo_loss": "exo"}, "'objective.dpo_loss' is 'exo'"),
    ({"strategy.name": "full", "objective.reference": "adapters_off"},
     "needs an adapter strategy"),
])
def test_bad_preference_config_is_one_line(root, overrides, message):
  with pytest.raises(ConfigError, match=message):
    _config(root, **overrides)
