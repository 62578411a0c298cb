"""experiments/peft_comparison.py: its points, the learning-rate selection, and a tiny run."""

import csv
import os
import subprocess
import sys

import pytest

from ftjax.errors import FtjaxError
from tests.conftest import REPO, load_script

comparison = load_script("experiments/peft_comparison.py")


def test_every_method_of_the_issue_is_in_the_minilm_table():
  assert list(comparison.MINILM_METHODS) == [
      "full", "freeze_k3", "head_only", "lora", "rslora", "dora", "qlora_nf4", "qlora_int8",
      "ia3", "prompt", "prefix", "houlsby", "pfeiffer"]
  assert set(comparison.LEARNING_RATES) == set(comparison.MINILM_METHODS)
  assert list(comparison.SMOLLM2_METHODS) == ["lora", "dora", "qlora_nf4", "ia3", "prompt"]


def test_points_run_the_usual_learning_rate_first():
  points = comparison.points("minilm", ["ia3", "lora"], 2)
  assert [p.name for p in points] == ["ia3__learning_rate=0.003", "ia3__learning_rate=0.001",
                                      "lora__learning_rate=0.0005", "lora__learning_rate=0.0002"]
  assert points[0].overrides == ("--config.strategy.name=ia3",
                                 "--config.optimizer.learning_rate=0.003")
  with pytest.raises(FtjaxError, match=r"^--methods has lorra; expected some of full,"):
    comparison.points("minilm", ["lorra"], 1)


def test_selection_by_validation_then_test_from_the_same_run():
  rows = [{"run": "lora__learning_rate=0.0005", "validation/accuracy": 0.7, "test/accuracy": 0.9,
           "train/median_seconds_per_step": 0.1, "memory/peak_host_bytes": 2**20},
          {"run": "lora__learning_rate=0.001", "validation/accuracy": 0.8, "test/accuracy": 0.6,
           "train/median_seconds_per_step": 0.2, "memory/peak_host_bytes": 2**21}]
  (chosen,) = comparison.select("minilm", rows)
  # The best validation accuracy chooses; its test accuracy is reported, not the best test.
  assert (chosen["method"], chosen["test"], chosen["step_ms"], chosen["peak_memory_mb"]) == (
      "lora", 0.6, 200.0, 2.0)


@pytest.mark.slow
def test_comparison_on_a_tiny_model(minilm_dir, data_dir, tmp_path):
  from tests import tiny  # pylint: disable=g-import-not-at-top
  model = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=1)
  data = tiny.make_data(tmp_path / "data", data_dir)
  sweep_dir = tmp_path / "sweep"
  command = [sys.executable, "experiments/peft_comparison.py", f"--sweep_dir={sweep_dir}",
             f"--model={model}", "--methods=qlora_int8,prompt", "--lrs=2", "--log_every_steps=1",
             f"--extra=--config.data.path={data}", "--extra=--config.training.num_steps=2",
             "--extra=--config.training.batch_size=16", "--extra=--config.data.max_length=32",
             "--extra=--config.data.num_buckets=1", "--extra=--config.eval.batch_size=64",
             "--extra=--config.strategy.prompt.num_virtual_tokens=4"]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  with open(sweep_dir / "results.csv", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4 and all(int(r["step"]) == 2 for r in table)
  md = (sweep_dir / "results.md").read_text().splitlines()
  assert md[0].startswith("| method | optimizer.learning_rate | selected_by | test |")
  assert [line.split(" | ")[0] for line in md[2:]] == ["| qlora_int8", "| prompt"]
  # The quantised base's parameter bytes are below the float model's (prompt tuning keeps it).
  by_method = {line.split(" | ")[0][2:]: line.split(" | ") for line in md[2:]}
  columns = md[0].split(" | ")
  bytes_at = columns.index("params/bytes")
  assert int(by_method["qlora_int8"][bytes_at].replace(",", "")) < int(
      by_method["prompt"][bytes_at].replace(",", ""))
  assert (sweep_dir / "accuracy_vs_params.png").is_file()
  assert (sweep_dir / "accuracy_vs_step_time.png").is_file()
