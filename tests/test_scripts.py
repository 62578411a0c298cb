"""scripts/: the curve plotter and the results table read what runs write."""

import json
import subprocess
import sys

from ftjax import config as config_lib
from tests.conftest import REPO


def _fake_run(workdir, accuracy):
  workdir.mkdir()
  rows = [{"step": s, "train/loss": 1 / s, "train/accuracy": 0.5 + s / 100} for s in (1, 2, 3, 4)]
  rows += [{"step": 4, "validation/loss": 0.4, "validation/accuracy": accuracy}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = config_lib.default_config()
  config.strategy.name = "freeze"
  config.strategy.freeze_layers = 3
  (workdir / "config.json").write_text(config.to_json_best_effort())
  (workdir / "results.json").write_text(json.dumps({
      "test/accuracy": accuracy, "test/f1": accuracy - 0.01, "validation/accuracy": 0.8,
      "params/trainable": 1234567, "params/trainable_fraction": 0.5,
      "train/median_seconds_per_step": 0.25, "wall_seconds": 90.0}))


def test_plot_metrics_writes_a_png(tmp_path):
  _fake_run(tmp_path / "a", 0.8)
  _fake_run(tmp_path / "b", 0.7)
  out = tmp_path / "curves.png"
  result = subprocess.run([sys.executable, "scripts/plot_metrics.py", f"--out={out}",
                           str(tmp_path / "a"), str(tmp_path / "b")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(out) as image:
    assert image.format == "PNG" and image.size[0] > 600


def test_results_table_row(tmp_path):
  _fake_run(tmp_path / "a", 0.8312)
  result = subprocess.run([sys.executable, "scripts/results_table.py", str(tmp_path / "a")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  row = result.stdout.strip().splitlines()[-1]
  assert row == ("| freeze K=3 | 5e-05 | 0.8312 | 0.8212 | 0.8000 | 1,234,567 (50.00%) | 250 "
                 "| 1.5 |")
