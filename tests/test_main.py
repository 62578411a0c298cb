"""`python -m ftjax.main` end to end: the real checkpoint on a batch of real text."""

import json
import os
import subprocess
import sys

import pytest

from ftjax import logs, models
from tests.conftest import REPO


def test_probe_runs_minilm_on_rotten_tomatoes(minilm_dir, data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "ftjax.main", "--config=configs/sentiment_minilm.py",
       f"--workdir={tmp_path}", f"--config.model.name_or_path={minilm_dir}",
       f"--config.data.path={data_dir / 'rotten_tomatoes'}", "--config.training.batch_size=8", "--mode=probe"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "HF_HUB_OFFLINE": "1"})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  config = models.config_from_pretrained(str(minilm_dir), task="classification", num_labels=2)
  assert report["num_params"] == models.Model.build(config).num_params() == 22_713_986
  batch, seq = report["input_ids"]
  assert batch == 8 and 2 < seq <= 64
  assert report["last_hidden_state"] == [8, seq, 384]
  assert report["logits"] == [8, 2]
  # The head is new and said so once; the encoder came from the checkpoint.
  assert result.stderr.count("Newly initialized") == 1
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["name_or_path"] == str(minilm_dir)


@pytest.mark.slow
def test_train_command_end_to_end_and_rerun_is_a_no_op(minilm_dir, data_dir, tmp_path):
  """The CLI trains a shrunken run, writes its outputs, and a rerun trains nothing."""
  from tests import tiny  # pylint: disable=g-import-not-at-top
  model = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=2)
  data = tiny.make_data(tmp_path / "data", data_dir)
  command = [sys.executable, "-m", "ftjax.main", "--config=configs/sentiment_minilm.py",
             f"--workdir={tmp_path / 'run'}", f"--config.model.name_or_path={model}",
             f"--config.data.path={data}", "--config.training.num_steps=4",
             "--config.training.batch_size=16", "--config.eval.every_steps=2",
             "--config.strategy.name=lora", "--config.data.num_buckets=1"]
  # One CPU device, as a laptop user runs it (conftest's 8 fake ones slow every compile).
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["step"] == 4 and results["test/num_examples"] == 64
  # The final metrics are the last evaluation's, over all 64 test examples.
  final_eval = [r for r in logs.read_metrics(tmp_path / "run") if "test/accuracy" in r][-1]
  assert final_eval["step"] == 4 and results["test/accuracy"] == final_eval["test/accuracy"]
  assert (results["test/accuracy"] * 64) == pytest.approx(round(results["test/accuracy"] * 64))
  assert results["params/trainable_fraction"] < 0.1
  assert "trainable params:" in result.stderr
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  assert list((tmp_path / "run" / "tensorboard").iterdir())

  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Nothing to train: the checkpoint is at step 4 of 4" in rerun.stderr
  assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
