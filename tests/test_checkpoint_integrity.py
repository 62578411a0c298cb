"""Damaged checkpoints: detected by their manifest, moved aside, never lost; the run goes on
from the newest intact one (real `python -m ftjax.main` processes on a tiny BERT).

A run is stopped at step 6 (checkpoints 2, 4, 6); step 6 is then damaged as a
user's disk or copy might damage it, and the same command finishes the run:
it must resume from step 4 with one log line, keep the damaged folder aside,
and end bitwise equal to a run that was never interrupted.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ftjax import checkpoint as checkpoint_lib
from ftjax import evaluate
from tests import tiny
from tests.conftest import REPO

OVERRIDES = {"training.num_steps": 8, "training.batch_size": 16, "training.log_every_steps": 2,
             "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 3, "eval.every_steps": 8,
             "eval.splits": ("test",), "eval.metric": "test/accuracy", "data.num_buckets": 1,
             "strategy.name": "full", "checkpoint.keep_best": False}
ONE_DEVICE = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _run(assets, workdir, *extra) -> subprocess.CompletedProcess:
  model, data = assets
  flags = [f"--config.model.name_or_path={model}", f"--config.data.path={data}"]
  for key, value in OVERRIDES.items():
    value = ",".join(value) if isinstance(value, tuple) else value
    flags.append(f"--config.{key}={value}")
  return subprocess.run([sys.executable, "-m", "ftjax.main", "--config=configs/sentiment_minilm.py",
                         f"--workdir={workdir}", *flags, *extra], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=ONE_DEVICE, check=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("integrity")
  return (tiny.make_model(root / "model", minilm_dir, num_layers=2),
          tiny.make_data(root / "data", data_dir, sizes=(("train", 128), ("validation", 32),
                                                         ("test", 32))))


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("whole")
  result = _run(assets, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return checkpoint_lib.read_trainable(workdir, 8)


@pytest.fixture(scope="module")
def stopped(assets, tmp_path_factory):
  """A run stopped at step 6: checkpoints 2, 4 and 6, each with its manifest."""
  workdir = tmp_path_factory.mktemp("stopped")
  result = _run(assets, workdir, "--stop_at_step=6")
  assert result.returncode == 0, result.stderr[-3000:]
  for step in (2, 4, 6):
    manifest = json.loads((workdir / "checkpoints" / str(step) / checkpoint_lib.MANIFEST)
                          .read_text())
    assert manifest["files"] and checkpoint_lib.verify(workdir / "checkpoints" / str(step)) is None
  return workdir


def _copy(workdir, tmp_path) -> pathlib.Path:
  target = tmp_path / "run"
  subprocess.run(["cp", "-a", str(workdir), str(target)], check=True)
  return target


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  size = path.stat().st_size
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _flip_byte(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "flipped_byte"])
def test_damaged_latest_checkpoint_falls_back_and_matches_an_uninterrupted_run(
    assets, stopped, uninterrupted, tmp_path, damage):
  workdir = _copy(stopped, tmp_path)
  damage(workdir / "checkpoints" / "6")
  result = _run(assets, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if "is damaged" in l]
  assert len(lines) == 1 and "checkpoints/6 is damaged (file state/" in lines[0], lines
  assert "Resumed from" in result.stderr and "checkpoints/4 at step 4" in result.stderr
  aside = list((workdir / "checkpoints").glob("6.corrupt-*"))
  assert len(aside) == 1 and (aside[0] / "state").is_dir()  # kept, not deleted
  final = checkpoint_lib.read_trainable(workdir, 8)
  assert final.keys() == uninterrupted.keys()
  for path, value in uninterrupted.items():
    np.testing.assert_array_equal(final[path], value, err_msg=path)


def test_only_checkpoint_damaged_stops_with_one_line(assets, stopped, tmp_path):
  workdir = _copy(stopped, tmp_path)
  for step in (2, 4):
    subprocess.run(["rm", "-r", str(workdir / "checkpoints" / str(step))], check=True)
  _flip_byte(workdir / "checkpoints" / "6")
  result = _run(assets, workdir)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ftjax: error: no intact checkpoint in ") and "6.corrupt-" in last, last
  assert list((workdir / "checkpoints").glob("6.corrupt-*"))
  assert not (workdir / "results.json").exists()


def test_checkpoint_without_manifest_restores_with_a_log_line(assets, stopped, uninterrupted,
                                                              tmp_path):
  workdir = _copy(stopped, tmp_path)
  (workdir / "checkpoints" / "6" / checkpoint_lib.MANIFEST).unlink()
  result = _run(assets, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoints/6 has no integrity manifest" in result.stderr
  assert "checkpoints/6 at step 6" in result.stderr
  final = checkpoint_lib.read_trainable(workdir, 8)
  for path, value in uninterrupted.items():
    np.testing.assert_array_equal(final[path], value, err_msg=path)


def test_evaluator_reports_the_damaged_checkpoint_and_evaluates_the_rest(stopped, tmp_path,
                                                                         capsys):
  import jax  # pylint: disable=import-outside-toplevel
  workdir = _copy(stopped, tmp_path)
  _truncate(workdir / "checkpoints" / "4")
  rows = evaluate.run_evaluator(str(workdir), checkpoints="all", split="test",
                                devices=jax.devices()[:1])
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert "damaged" in rows[1] and "file state/" in rows[1]["damaged"]
  assert "test/accuracy" in rows[0] and "test/accuracy" in rows[2]
  assert "| 4 | damaged: file state/" in capsys.readouterr().out
  assert (workdir / "checkpoints" / "4").is_dir()  # the evaluator moves nothing
  # --watch skips it and goes on (the run's results.json is there: one pass).
  (workdir / "results.json").write_text("{}")
  (workdir / "eval_test.jsonl").unlink()
  watched = evaluate.run_evaluator(str(workdir), split="test", watch=True, poll_seconds=0.1,
                                   devices=jax.devices()[:1])
  assert [("damaged" in r) for r in watched] == [False, True, False]


def test_export_of_a_damaged_checkpoint_is_one_line(stopped, tmp_path):
  workdir = _copy(stopped, tmp_path)
  _flip_byte(workdir / "checkpoints" / "6")
  result = subprocess.run([sys.executable, "-m", "ftjax.export", f"--workdir={workdir}",
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=ONE_DEVICE, check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert "checkpoints/6 is damaged (file state/" in last and "pick another step" in last, last
  assert not (tmp_path / "out").exists()


def test_max_to_keep_never_deletes_the_newest_verified_checkpoint(tmp_path):
  """max_to_keep=1: until the newest checkpoint has its manifest, the previous one stays."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ftjax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.default_config()
  config.checkpoint.max_to_keep = 1
  config.checkpoint.keep_best = False
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, config)
  state = {"w": jnp.arange(4.0)}
  on_disk = lambda: sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()  # pylint: disable=unnecessary-lambda-assignment
                           if p.name.isdigit())
  checkpointer.save(1, state, {"note": 1})
  checkpointer.wait()  # step 1 finalised and verified (manifest)
  checkpointer.save(2, state, {"note": 2})
  checkpointer.manager.wait_until_finished()  # step 2 finalised, no manifest yet
  assert on_disk() == [1, 2]
  assert not (tmp_path / "checkpoints" / "2" / checkpoint_lib.MANIFEST).exists()
  checkpointer.save(3, state, {"note": 3})  # writes 2's manifest first
  checkpointer.manager.wait_until_finished()
  assert on_disk() == [2, 3]
  checkpointer.wait()
  checkpointer.save(4, state, {"note": 4})
  checkpointer.wait()
  checkpointer.close()
  assert on_disk() == [3, 4]  # 3 was the newest verified when 4 was finalised
  assert checkpoint_lib.verify(tmp_path / "checkpoints" / "4") is None
