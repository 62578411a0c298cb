"""experiments/freeze_ablation.py: the runs it builds, its summary, and a tiny sweep end to end."""

import csv
import json
import os
import subprocess
import sys

import pytest

from ftjax import config as config_lib
from tests.conftest import REPO, load_script

ablation = load_script("experiments/freeze_ablation.py")


def _fake_run(workdir, strategy, *, freeze_layers=0, trainable, accuracy, step_seconds):
  workdir.mkdir(parents=True)
  config = config_lib.default_config()
  config.strategy.name = strategy
  config.strategy.freeze_layers = freeze_layers
  (workdir / "config.json").write_text(config.to_json_best_effort())
  (workdir / "results.json").write_text(json.dumps({
      "step": 267, "test/accuracy": accuracy, "test/f1": accuracy - 0.01,
      "validation/accuracy": accuracy + 0.01, "params/trainable": trainable,
      "params/total": 22_713_986, "params/trainable_fraction": trainable / 22_713_986,
      "train/median_seconds_per_step": step_seconds, "wall_seconds": 123.44}))


def _read_csv(path):
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def test_build_runs_maps_variants_to_overrides():
  runs = ablation.build_runs([0, 2], list(ablation.VARIANTS), head_lr=1e-3, lora_lr=5e-4,
                             lora_rank=4)
  assert dict(runs) == {
      "freeze_k0": ("--config.strategy.name=full",),
      "freeze_k2": ("--config.strategy.name=freeze", "--config.strategy.freeze_layers=2"),
      "head_only": ("--config.strategy.name=head_only", "--config.optimizer.learning_rate=0.001"),
      "head_only_cached": ("--config.strategy.name=head_only",
                           "--config.optimizer.learning_rate=0.001",
                           "--config.strategy.cache_features=True"),
      "lora_r4": ("--config.strategy.name=lora", "--config.strategy.lora.rank=4",
                  "--config.optimizer.learning_rate=0.0005"),
  }
  assert [r.name for r in ablation.build_runs([3], ["lora", "freeze"], head_lr=1, lora_lr=1,
                                              lora_rank=8)] == ["freeze_k3", "lora_r8"]


def test_summarize_writes_csv_markdown_and_png(tmp_path):
  _fake_run(tmp_path / "freeze_k0", "full", trainable=22_713_986, accuracy=0.83,
            step_seconds=0.4)
  _fake_run(tmp_path / "freeze_k3", "freeze", freeze_layers=3, trainable=10_000_000,
            accuracy=0.81, step_seconds=0.25)
  _fake_run(tmp_path / "head_only", "head_only", trainable=770, accuracy=0.7,
            step_seconds=0.1)
  _fake_run(tmp_path / "lora_r8", "lora", trainable=74_498, accuracy=0.79, step_seconds=0.3)
  names = ["freeze_k0", "freeze_k3", "head_only", "lora_r8"]

  table = ablation.summarize(tmp_path, names)

  rows = _read_csv(tmp_path / "results.csv")
  assert list(rows[0]) == list(ablation.CSV_COLUMNS)
  assert [(r["run"], r["strategy"], r["frozen_layers"]) for r in rows] == [
      ("freeze_k0", "full", "0"), ("freeze_k3", "freeze", "3"), ("head_only", "head_only", ""),
      ("lora_r8", "lora", "")]
  k3 = rows[1]
  assert int(k3["trainable_params"]) == 10_000_000
  assert float(k3["trainable_fraction"]) == 10_000_000 / 22_713_986
  assert float(k3["test_accuracy"]) == 0.81 and float(k3["test_f1"]) == 0.81 - 0.01
  assert float(k3["validation_accuracy"]) == 0.81 + 0.01
  assert float(k3["step_ms"]) == 250.0 and float(k3["wall_s"]) == 123.4
  assert int(k3["steps"]) == 267

  assert (tmp_path / "results.md").read_text() == table
  lines = table.splitlines()
  assert len(lines) == 2 + len(names)
  assert lines[3] == ("| freeze_k3 | freeze | 3 | 10,000,000 (44.03%) | 0.8100 | 0.8000 | "
                      "0.8200 | 250 | 123 | 267 |")
  assert lines[4].startswith("| head_only | head_only |  | 770 (0.00%) | 0.7000 |")

  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(tmp_path / "ablation.png") as image:
    assert image.format == "PNG" and image.size[0] > 1000


def _sweep_command(sweep_dir, model, data, *more):
  return [sys.executable, "experiments/freeze_ablation.py", f"--sweep_dir={sweep_dir}",
          f"--model={model}", "--log_every_steps=1",
          # Seconds a run: two steps, one padded length (one compile), one eval batch.
          f"--extra=--config.data.path={data}", "--extra=--config.training.num_steps=2",
          "--extra=--config.training.batch_size=16", "--extra=--config.data.max_length=32",
          "--extra=--config.data.num_buckets=1", "--extra=--config.eval.batch_size=64", *more]


@pytest.mark.slow
def test_sweep_on_a_tiny_model_then_rerun_skips(minilm_dir, data_dir, tmp_path):
  """Every variant of a 1-layer model (K=0..1 read from its config), then a no-op rerun."""
  from tests import tiny  # pylint: disable=g-import-not-at-top
  model = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=1)
  data = tiny.make_data(tmp_path / "data", data_dir)
  sweep_dir = tmp_path / "sweep"
  command = _sweep_command(sweep_dir, model, data)
  # One CPU device a run: this tests the sweep, not sharding (conftest's 8 slow each compile).
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

  names = ["freeze_k0", "freeze_k1", "head_only", "head_only_cached", "lora_r8"]
  assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(names)
  for name in names:
    assert (sweep_dir / name / "results.json").is_file(), (sweep_dir / name / "log.txt").read_text()
  rows = {r["run"]: r for r in _read_csv(sweep_dir / "results.csv")}
  assert list(rows) == names
  assert [(r["strategy"], r["frozen_layers"]) for r in rows.values()] == [
      ("full", "0"), ("freeze", "1"), ("head_only", ""), ("head_only", ""), ("lora", "")]
  for name, row in rows.items():  # each row is its run's own final result
    final = json.loads((sweep_dir / name / "results.json").read_text())
    assert int(row["steps"]) == final["step"] == 2
    assert float(row["test_accuracy"]) == pytest.approx(final["test/accuracy"], abs=1e-4)
  trainable = {name: int(r["trainable_params"]) for name, r in rows.items()}
  assert float(rows["freeze_k0"]["trainable_fraction"]) == 1.0
  assert trainable["head_only"] == trainable["head_only_cached"] < trainable["lora_r8"]
  assert trainable["freeze_k1"] < trainable["freeze_k0"]
  assert "| freeze_k1 | freeze | 1 |" in result.stdout
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(sweep_dir / "ablation.png") as image:
    assert image.format == "PNG"

  mtimes = {n: (sweep_dir / n / "results.json").stat().st_mtime_ns for n in names}
  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert [l for l in rerun.stdout.splitlines() if l.startswith(("skip ", "run "))] == [
      f"skip {n}: finished" for n in names]
  assert {n: (sweep_dir / n / "results.json").stat().st_mtime_ns for n in names} == mtimes
  assert list(_read_csv(sweep_dir / "results.csv")) == list(rows.values())


def test_failed_run_stops_the_sweep_in_one_line(minilm_dir, tmp_path):
  """A failing run: exit 1, one line naming it and its log; finished runs still summarized."""
  from tests import tiny  # pylint: disable=g-import-not-at-top
  model = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=1)
  sweep_dir = tmp_path / "sweep"
  _fake_run(sweep_dir / "freeze_k0", "full", trainable=100, accuracy=0.6, step_seconds=0.1)
  result = subprocess.run(
      [sys.executable, "experiments/freeze_ablation.py", f"--sweep_dir={sweep_dir}",
       f"--model={model}", "--layers=0", "--variants=freeze,lora",
       "--extra=--config.training.no_such_key=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "HF_HUB_OFFLINE": "1"})
  assert result.returncode == 1
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("freeze_ablation: error: run lora_r8 failed (exit 1): ")
  assert "no_such_key" in error and error.endswith(f"log: {sweep_dir / 'lora_r8' / 'log.txt'}")
  assert "skip freeze_k0: finished" in result.stdout
  assert [r["run"] for r in _read_csv(sweep_dir / "results.csv")] == ["freeze_k0"]
