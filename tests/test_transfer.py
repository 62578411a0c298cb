"""Intermediate-task fine-tuning: `config.init_from` starts from another run's weights."""

import jax
import numpy as np
import pytest

from ftjax import checkpoint, train
from ftjax.errors import CheckpointError, FtjaxError
from ftjax.models import keymap
from ftjax.peft import partition
from tests import tiny


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory, minilm_dir, data_dir):
  """A tiny full fine-tune on SST-2 (the intermediate task)."""
  root = tmp_path_factory.mktemp("transfer")
  model = tiny.make_model(root / "model", minilm_dir)
  sst2 = tiny.make_data(root / "sst2", data_dir, dataset="sst2",
                        sizes=(("train", 256), ("validation", 64)))
  config = tiny.config(model, sst2, **{"training.num_steps": 4, "eval.every_steps": 4,
                                       "eval.splits": ("validation",)})
  train.train_and_evaluate(config, str(root / "sst2_run"), devices=jax.devices()[:1])
  return root, model, root / "sst2_run"


def _target(root, model, data_dir, **overrides):
  data = root / "rt"
  if not data.exists():
    tiny.make_data(data, data_dir)
  return tiny.config(model, data, **{"eval.splits": ("validation",), **overrides})


def test_sst2_to_rotten_tomatoes_restores_every_weight(sst2_run, data_dir, caplog):
  root, model, source = sst2_run
  saved = checkpoint.read_trainable(*checkpoint.find(source))
  with caplog.at_level("INFO"):
    run = train.setup(_target(root, model, data_dir, init_from=str(source)), jax.devices()[:1])
  params = keymap.flatten(partition.merge(run.initial_state.trainable, run.initial_state.frozen))
  assert set(saved) == set(params)
  for path, value in saved.items():
    np.testing.assert_array_equal(np.asarray(params[path]), value, err_msg=path)
  assert any("init_from" in r.getMessage() and f"restored {len(saved)} parameters" in
             r.getMessage() for r in caplog.records)


def test_other_number_of_labels_replaces_only_the_head(sst2_run, data_dir, caplog, tmp_path):
  root, model, source = sst2_run
  saved = checkpoint.read_trainable(*checkpoint.find(source / "checkpoints" / "4"))
  config = _target(root, model, data_dir, init_from=str(source), **{
      "model.num_labels": 3, "strategy.name": "freeze", "strategy.freeze_layers": 4})
  with caplog.at_level("INFO"):
    run = train.setup(config, jax.devices()[:1])
  message = next(r.getMessage() for r in caplog.records if "init_from" in r.getMessage())
  assert "re-initialised: classifier/out/bias (2,)->(3,), classifier/out/kernel (32, 2)->(32, 3)" \
      in message
  trainable = keymap.flatten(run.initial_state.trainable)
  frozen = keymap.flatten(run.initial_state.frozen)
  # The encoder is the SST-2 run's (frozen here); the new head trains.
  for path in frozen:
    np.testing.assert_array_equal(np.asarray(frozen[path]), saved[path], err_msg=path)
  assert set(trainable) == {"classifier/out/kernel", "classifier/out/bias", "pooler/kernel",
                            "pooler/bias"}
  # And it trains end to end.
  results = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert results["validation/num_examples"] == 64


def test_init_from_errors(sst2_run, data_dir, minilm_dir, tmp_path):
  root, model, source = sst2_run
  with pytest.raises(FtjaxError, match="init_from='/nope': no checkpoint"):
    train.setup(_target(root, model, data_dir, init_from="/nope"), jax.devices()[:1])
  other = tiny.make_model(tmp_path / "wide", minilm_dir, hidden_size=48)
  with pytest.raises(CheckpointError, match="another architecture"):
    train.setup(_target(root, other, data_dir, init_from=str(source),
                        **{"model.name_or_path": str(other)}), jax.devices()[:1])
