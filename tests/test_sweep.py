"""experiments/sweep.py and `ftjax.sweeps`: a grid over config keys, skipped and resumed runs."""

import csv
import json
import os
import subprocess
import sys

import pytest

from ftjax import sweeps
from ftjax.errors import FtjaxError

REPO = sweeps.pathlib.Path(__file__).resolve().parents[1]


def test_grid_crosses_axes_in_order_and_names_points():
  points = sweeps.grid([sweeps.parse_axis("strategy.name=full,lora"),
                        sweeps.parse_axis("--config.optimizer.learning_rate=1e-4, 5e-4")])
  assert [p.name for p in points] == [
      "name=full__learning_rate=1e-4", "name=full__learning_rate=5e-4",
      "name=lora__learning_rate=1e-4", "name=lora__learning_rate=5e-4"]
  assert points[1].overrides == ("--config.strategy.name=full",
                                 "--config.optimizer.learning_rate=5e-4")
  # Named bases (a method each) crossed with an axis: what the PEFT comparison does.
  base = [sweeps.Point("ia3", ("--config.strategy.name=ia3",))]
  (point,) = sweeps.grid([("optimizer.learning_rate", ["3e-3"])], base)
  assert point == sweeps.Point("ia3__learning_rate=3e-3", (
      "--config.strategy.name=ia3", "--config.optimizer.learning_rate=3e-3"))


def test_tuple_values_keep_their_commas():
  key, values = sweeps.parse_axis("strategy.lora.targets=('.*/query', '.*/value'),('all-linear',)")
  assert key == "strategy.lora.targets"
  assert values == ["('.*/query', '.*/value')", "('all-linear',)"]


@pytest.mark.parametrize("text", ["optimizer.learning_rate", "=1,2", "a.b="])
def test_bad_axes_are_one_line(text):
  with pytest.raises(FtjaxError, match=r"^--grid=.*expected <config key>=<value>") as e:
    sweeps.parse_axis(text)
  assert "\n" not in str(e.value)


def test_duplicate_point_names_are_refused():
  with pytest.raises(FtjaxError, match="share a name"):
    sweeps.grid([("a.x", ["1", "1"])])


def test_rows_markdown_and_plot(tmp_path):
  for name, lr, acc in (("p1", 1e-4, 0.5), ("p2", 1e-3, 0.75)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(
        {"optimizer": {"learning_rate": lr}, "strategy": {"name": "lora"}}))
    (tmp_path / name / "results.json").write_text(json.dumps(
        {"test/accuracy": acc, "step": 3, "best": {"metric": "accuracy", "value": acc}}))
  table = sweeps.rows(tmp_path, ["p1", "p2"], ["optimizer.learning_rate", "strategy.name"])
  assert table[1] == {"run": "p2", "optimizer.learning_rate": 1e-3, "strategy.name": "lora",
                      "test/accuracy": 0.75, "step": 3, "best/metric": "accuracy",
                      "best/value": 0.75}
  text = sweeps.markdown(table, ["run", "optimizer.learning_rate", "test/accuracy"])
  assert text.splitlines()[1] == "|---|---:|---:|"
  assert "| p2 | 0.001 | 0.75 |" in text
  sweeps.plot(table, "optimizer.learning_rate", "test/accuracy", tmp_path / "p.png",
              group="strategy.name", log_x=True)
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sweep_runs_a_grid_then_skips_and_resumes(minilm_dir, data_dir, tmp_path):
  """A 2 x 2 grid on a tiny model; a rerun skips all; a deleted result reruns (resumes)."""
  from tests import tiny  # pylint: disable=g-import-not-at-top
  model = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=1)
  data = tiny.make_data(tmp_path / "data", data_dir)
  sweep_dir = tmp_path / "sweep"
  command = [sys.executable, "experiments/sweep.py", f"--sweep_dir={sweep_dir}",
             "--grid=strategy.name=full,lora", "--grid=optimizer.learning_rate=1e-4,1e-3",
             f"--set=model.name_or_path={model}", f"--set=data.path={data}",
             "--set=training.num_steps=2", "--set=training.batch_size=16",
             "--set=data.max_length=32", "--set=data.num_buckets=1", "--set=eval.batch_size=64",
             "--set=training.log_every_steps=1",
             "--plot=optimizer.learning_rate:test/accuracy:strategy.name"]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  names = ["name=full__learning_rate=1e-4", "name=full__learning_rate=1e-3",
           "name=lora__learning_rate=1e-4", "name=lora__learning_rate=1e-3"]
  with open(sweep_dir / "results.csv", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [r["run"] for r in table] == names
  assert [(r["strategy.name"], float(r["optimizer.learning_rate"])) for r in table] == [
      ("full", 1e-4), ("full", 1e-3), ("lora", 1e-4), ("lora", 1e-3)]
  for row in table:
    final = json.loads((sweep_dir / row["run"] / "results.json").read_text())
    assert int(row["step"]) == final["step"] == 2
    assert float(row["params/bytes"]) > 0 and float(row["memory/peak_host_bytes"]) > 0
  assert int(table[2]["params/trainable"]) < int(table[0]["params/trainable"])
  assert (sweep_dir / "test_accuracy_vs_optimizer.learning_rate.png").is_file()

  (sweep_dir / names[3] / "results.json").unlink()
  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert [l for l in rerun.stdout.splitlines() if l.startswith(("skip ", "run "))] == [
      *(f"skip {n}: finished" for n in names[:3]),
      f"run {names[3]}: log in {sweep_dir / names[3] / 'log.txt'}"]
  # The rerun resumed from the run's final checkpoint instead of training again.
  assert "Resum" in (sweep_dir / names[3] / "log.txt").read_text()
