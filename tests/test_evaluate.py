"""`python -m ftjax.evaluate`: checkpoints re-evaluated equal what training logged."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ftjax import evaluate, logs, train
from ftjax.errors import ConfigError
from tests import tiny
from tests.conftest import REPO

OVERRIDES = {"training.num_steps": 6, "eval.every_steps": 2, "checkpoint.every_steps": 2,
             "eval.splits": ("test",), "eval.metric": "test/accuracy",
             "data.num_buckets": 1}  # One padded length: one compile per step function.


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("tiny_eval")
  return tiny.make_model(root / "model", minilm_dir), tiny.make_data(root / "data", data_dir)


def _logged(workdir):
  return {r["step"]: r for r in logs.read_metrics(workdir) if "test/accuracy" in r}


def _assert_rows_match(rows, logged):
  for row in rows:
    for key in ("test/loss", "test/accuracy", "test/f1", "test/precision", "test/recall"):
      np.testing.assert_allclose(row[key], logged[row["step"]][key], atol=1e-6, err_msg=key)


def test_all_checkpoints_reproduce_training_metrics(tiny_dirs, tmp_path):
  config = tiny.config(*tiny_dirs, **OVERRIDES)
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  rows = evaluate.run_evaluator(str(tmp_path), checkpoints="all", split="test",
                                devices=jax.devices()[:1])
  assert [r["step"] for r in rows] == [2, 4, 6]
  _assert_rows_match(rows, _logged(tmp_path))
  assert len((tmp_path / "eval_test.jsonl").read_text().splitlines()) == 3
  # Bad selections say what exists.
  with pytest.raises(ConfigError, match=r"no checkpoint at step 5; .* \[2, 4, 6\]"):
    evaluate.run_evaluator(str(tmp_path), checkpoints="2,5", devices=jax.devices()[:1])


@pytest.mark.parametrize("train_devices, eval_devices", [(8, 1), (1, 8)])
def test_restore_onto_another_device_count(tiny_dirs, tmp_path, train_devices, eval_devices):
  config = tiny.config(*tiny_dirs, **OVERRIDES, **{"mesh.data": train_devices})
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:train_devices])
  rows = evaluate.run_evaluator(str(tmp_path), checkpoints="latest",
                                overrides=[f"mesh.data={eval_devices}"],
                                devices=jax.devices()[:eval_devices])
  assert [r["step"] for r in rows] == [6]
  _assert_rows_match(rows, _logged(tmp_path))


@pytest.mark.slow
def test_watch_evaluates_new_checkpoints_and_exits_on_the_final_marker(tiny_dirs, tmp_path):
  config = tiny.config(*tiny_dirs, **OVERRIDES)
  train.train_and_evaluate(config, str(tmp_path), stop_at_step=2, devices=jax.devices()[:1])
  watcher = subprocess.Popen(
      [sys.executable, "-m", "ftjax.evaluate", f"--workdir={tmp_path}", "--watch",
       "--poll_seconds=1", "--split=test", "--set", "mesh.data=1"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  try:
    deadline = time.time() + 240
    while not (tmp_path / "eval_test.jsonl").exists():  # it has started and seen step 2
      assert watcher.poll() is None and time.time() < deadline, watcher.communicate()[1][-3000:]
      time.sleep(1)
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    watcher.wait(timeout=240)
  finally:
    if watcher.poll() is None:
      watcher.kill()
  _, stderr = watcher.communicate()
  assert watcher.returncode == 0, stderr[-3000:]
  rows = [json.loads(line)
          for line in (tmp_path / "eval_test.jsonl").read_text().splitlines()]
  assert sorted(r["step"] for r in rows) == [2, 4, 6]
  _assert_rows_match(rows, _logged(tmp_path))


def test_causal_lm_run_is_evaluated_with_its_own_metrics(tmp_path, data_dir, capsys):
  """The evaluator on an instruction-tuning run: loss, perplexity and token accuracy (per task),
  equal to what training logged; no classification metrics are asked for."""
  tiny.make_tokenizer(tmp_path / "tok", data_dir)
  tiny.make_decoder(tmp_path / "llama", tmp_path / "tok")
  tiny.make_instruct_data(tmp_path / "code", data_dir, "instruction")
  tiny.make_instruct_data(tmp_path / "math", data_dir, "multitask")
  config = tiny.lm_config(tmp_path / "llama", **{
      "data.mixture": (("code", str(tmp_path / "code"), 1.0),
                       ("math", str(tmp_path / "math"), 1.0)),
      "training.num_steps": 4, "eval.every_steps": 2, "checkpoint.every_steps": 2})
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  capsys.readouterr()
  rows = evaluate.run_evaluator(str(workdir), checkpoints="all", split="test",
                                devices=jax.devices()[:1])
  logged = {r["step"]: r for r in logs.read_metrics(workdir) if "test/loss" in r}
  assert [r["step"] for r in rows] == [2, 4]
  for row in rows:
    for key in ("test/loss", "test/perplexity", "test/accuracy", "test/code/loss",
                "test/math/perplexity"):
      # (The evaluator pads to the test split's own lengths: float rounding differs.)
      np.testing.assert_allclose(row[key], logged[row["step"]][key], rtol=1e-5, err_msg=key)
    assert "test/f1" not in row
  header = capsys.readouterr().out.splitlines()[0]
  assert header == "| step | loss | accuracy | perplexity |"
