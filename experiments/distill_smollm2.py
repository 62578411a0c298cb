"""Token-level distillation of SmolLM2-135M-Instruct into a 15-layer student, in one command.

  .venv/bin/python experiments/distill_smollm2.py --sweep_dir=runs/distill_smollm2

runs configs/distill_smollm2.py twice, each a `python -m ftjax.main` run in
its own workdir under --sweep_dir (same student, data, steps and seed):

  kd   the student (every other layer of the teacher's 30) trained with
       alpha * CE + (1 - alpha) * KL(teacher || student) on response tokens
  ce   the same student on the labels alone (objective.alpha = 1)

and evaluates the teacher itself on the same held-out examples (in this
process, through the same evaluation code), then writes results.csv and
results.md beside the runs: held-out response perplexity (all, code, math)
of the teacher, and of each student before (step 0: the cut model) and
after training. Restarting resumes: finished runs are skipped.
"""

import csv
import json
import pathlib
import sys
import time

from absl import app, flags

from ftjax import sweeps
from ftjax.errors import FtjaxError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "distill_smollm2.py"

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Folder of the runs and the summary.")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "A --config.<key>=<value> override of both student runs (repeatable).")
flags.mark_flags_as_required(["sweep_dir"])

KEYS = ("test/perplexity", "test/code/perplexity", "test/math/perplexity")


def _train(name: str, run_dir: pathlib.Path, command: list[str]) -> None:
  sweeps.run_logged(name, run_dir, command, cwd=REPO)


def teacher_metrics(sweep_dir: pathlib.Path) -> dict:
  """The teacher's held-out metrics: the config's evaluation of the whole, untrained model."""
  path = sweep_dir / "teacher.json"
  if path.exists():
    return json.loads(path.read_text(encoding="utf-8"))
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ftjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ftjax.core import compiled  # pylint: disable=g-import-not-at-top
  from ftjax.core import run as run_lib  # pylint: disable=g-import-not-at-top
  config = config_flags.config_flags._LoadConfigModule("c", str(CONFIG)).get_config()  # pylint: disable=protected-access
  # The teacher as the model, its own labels-only objective: evaluation at step 0.
  config.model.layers = ()
  config.objective.alpha = 1.0
  config = config_lib.validate(config)
  started = time.perf_counter()
  run = run_lib.setup(config)
  _, eval_step = compiled.compile_steps(run)
  metrics = {f"test/{k}": v for k, v in
             compiled.evaluate(run, run.initial_state, eval_step, "test").items()}
  metrics["wall_seconds"] = time.perf_counter() - started
  metrics["params/total"] = run.model.num_params()
  path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
  del jax
  return metrics


def _student(run_dir: pathlib.Path) -> dict:
  rows = [json.loads(line) for line in
          (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
  start = next(r for r in rows if r.get("step") == 0 and "test/perplexity" in r)
  results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
  return {"start": start, "end": results}


def sweep() -> None:
  sweep_dir = pathlib.Path(_SWEEP_DIR.value).resolve()
  if sweep_dir.exists() and not sweep_dir.is_dir():
    raise FtjaxError(f"--sweep_dir={sweep_dir} is a file; expected a folder for the runs")
  sweep_dir.mkdir(parents=True, exist_ok=True)
  for name, alpha in (("kd", None), ("ce", 1.0)):
    run_dir = sweep_dir / name
    if (run_dir / "results.json").exists():
      print(f"skip {name}: finished", flush=True)
      continue
    _train(name, run_dir, [sys.executable, "-m", "ftjax.main", f"--config={CONFIG}",
                           f"--workdir={run_dir}",
                           *([f"--config.objective.alpha={alpha}"] if alpha else []),
                           *_EXTRA.value])
  teacher = teacher_metrics(sweep_dir)
  rows = [{"model": "teacher (30 layers)", "steps": 0, "params": teacher["params/total"],
           **{k: teacher[k] for k in KEYS}}]
  for name, label in (("kd", "student (15 layers), distilled"),
                      ("ce", "student (15 layers), labels only")):
    s = _student(sweep_dir / name)
    rows.append({"model": f"{label}: step 0", "steps": 0, "params": s["end"]["params/total"],
                 **{k: s["start"][k] for k in KEYS}})
    rows.append({"model": f"{label}: trained", "steps": s["end"]["step"],
                 "params": s["end"]["params/total"], **{k: s["end"][k] for k in KEYS},
                 "wall_s": round(s["end"]["wall_seconds"], 1),
                 "step_s": round(s["end"]["train/median_seconds_per_step"], 2)})
  with open(sweep_dir / "results.csv", "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=("model", "steps", "params", *KEYS, "wall_s",
                                           "step_s"))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| model | steps | params | held-out perplexity | code | math | step (s) | wall (s) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['steps']} | {r['params']:,} | {r[KEYS[0]]:.3f} | "
                 f"{r[KEYS[1]]:.3f} | {r[KEYS[2]]:.3f} | {r.get('step_s', '')} | "
                 f"{r.get('wall_s', '')} |")
  table = "\n".join(lines) + "\n"
  (sweep_dir / "results.md").write_text(table, encoding="utf-8")
  print(table, end="", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sweep()
  except FtjaxError as e:
    sys.exit(f"distill_smollm2: error: {e}")


if __name__ == "__main__":
  app.run(main)
