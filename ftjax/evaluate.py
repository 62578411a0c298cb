"""Evaluate a run's orbax checkpoints: `python -m ftjax.evaluate --workdir=DIR`.

  python -m ftjax.evaluate --workdir=/tmp/run --checkpoints=all --split=test
  python -m ftjax.evaluate --workdir=/tmp/run --watch          # beside a training job
  python -m ftjax.evaluate --workdir=/tmp/run --set data.path=/data/other_reviews

The run's resolved `config.json` is read from the workdir; `--set key=value`
changes it (another dataset, another mesh: `--set mesh.data=1`). Checkpoints
restore onto this process's devices whatever mesh wrote them; a LoRA or
frozen run's checkpoint (trainable leaves only) is joined with its base model,
which `ftjax.core.run.setup` loads as for training; the run's objective says
which metrics a split has (classification: accuracy, macro precision/recall/F1;
causal LM: loss, perplexity, token accuracy, per task for a mixture). Each evaluation is appended to
`workdir/eval_<split>.jsonl` and printed as a table; a damaged checkpoint (it
fails verification against its manifest, or does not restore) is a row saying
so, and the others are still evaluated. `--watch` polls for new
checkpoints and exits once training has written `results.json` (its final
marker) and every checkpoint has been evaluated: the t5x-style evaluator job
that runs beside a pod run.
"""

import json
import pathlib
import sys
import time

import jax
import ml_collections
from absl import app, flags, logging

from ftjax import checkpoint as checkpoint_lib
from ftjax import config as config_lib
from ftjax.core import compile_cache, compiled
from ftjax.core import run as run_lib
from ftjax.core import state as state_lib
from ftjax.errors import FtjaxError

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", "latest", "all | latest | best | comma-separated steps (e.g. 300,600).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_WATCH = flags.DEFINE_bool("watch", False, "Poll for new checkpoints until training finishes.")
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 30.0, "Seconds between polls with --watch.")
_SET = flags.DEFINE_multi_string("set", [], "key=value changes to the run's config.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Folder of JAX's persistent compilation cache ('none' disables "
    "it); default $FTJAX_COMPILATION_CACHE, else ~/.cache/ftjax/xla.")
flags.mark_flag_as_required("workdir")

FINAL_MARKER = "results.json"


class Evaluator:
  """Restores checkpoints of one run onto this process's devices and evaluates them."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, split: str,
               devices=None):
    # Only `split` is read: it also stands in for the training split, whose
    # lengths would otherwise set the padded lengths (and which another
    # dataset may not have). Metrics do not depend on the padded length.
    config.eval.splits = (split,)
    # Any metric of the objective will do: the evaluator tracks no best.
    config.eval.metric = f"{split}/{config_lib.objective_class(config).metrics_for(config)[0]}"
    config.data.train_split = split
    if config.objective.get("cache_teacher"):  # A distillation run: nothing here trains.
      config.objective.cache_teacher = False
    self.config, self.workdir, self.split = config, workdir, split
    # A head-only run on cached features is evaluated on them too (computed
    # for a split the run did not cache), so its metrics are the logged ones.
    self.run = run_lib.setup(config, devices, feature_cache_dir=workdir / "feature_cache")
    _, self.eval_step = compiled.compile_steps(self.run)
    self.checkpointer = checkpoint_lib.Checkpointer(workdir, config, read_only=True)
    self.out = workdir / f"eval_{split}.jsonl"

  def evaluate(self, step: int) -> dict:
    """The checkpoint's metrics; a damaged checkpoint is a row `{"step", "damaged": why}`."""
    state = self.run.initial_state
    problem = self.checkpointer.check(step)
    if problem is None:
      try:
        saved, _ = self.checkpointer.restore(
            step, checkpoint_lib.abstract(state_lib.checkpointed(state)))
      except Exception as e:  # pylint: disable=broad-except
        lines = str(e).strip().splitlines()
        problem = f"it does not restore ({type(e).__name__}: {lines[0][:200] if lines else ''})"
    if problem is not None:
      logging.warning("checkpoint %d of %s is damaged (%s); not evaluated", step, self.workdir,
                      problem)
      row = {"step": step, "damaged": problem}
    else:
      restored = state.replace(step=saved["step"], trainable=saved["trainable"])
      row = {"step": step, **{f"{self.split}/{k}": v for k, v in compiled.evaluate(
          self.run, restored, self.eval_step, self.split).items()}}
    if jax.process_index() == 0:
      with open(self.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row

  def evaluated_steps(self) -> set[int]:
    if not self.out.exists():
      return set()
    return {json.loads(line)["step"] for line in self.out.read_text().splitlines() if line}


def print_table(rows: list[dict], split: str, metrics: tuple[str, ...]) -> None:
  """One row per checkpoint: the objective's metrics this split has, in the objective's order."""
  if not rows:
    return
  keys = [k for k in metrics if any(f"{split}/{k}" in row for row in rows)]
  print(f"| step | {' | '.join(keys)} |")
  print("|---:|" + "---:|" * len(keys))
  for row in rows:
    if "damaged" in row:
      print(f"| {row['step']} | damaged: {row['damaged']} |")
      continue
    print(f"| {row['step']} | " + " | ".join(f"{row[f'{split}/{k}']:.4f}" for k in keys) + " |")


def run_evaluator(workdir: str, *, checkpoints: str = "latest", split: str = "test",
                  watch: bool = False, poll_seconds: float = 30.0,
                  overrides: list[str] = (), devices=None,
                  compilation_cache: str | None = None) -> list[dict]:
  workdir_path = pathlib.Path(workdir)
  compile_cache.enable(compilation_cache)
  evaluator = Evaluator(config_lib.load_run_config(workdir_path, list(overrides)), workdir_path, split,
                        devices)
  rows = []
  if not watch:
    for step in checkpoint_lib.select_steps(evaluator.checkpointer, checkpoints):
      rows.append(evaluator.evaluate(step))
    print_table(rows, split, evaluator.run.objective.metrics)
    return rows
  # --watch: every checkpoint not yet evaluated, until the final marker.
  while True:
    finished = (workdir_path / FINAL_MARKER).exists()  # read before listing: no race
    evaluator.checkpointer.manager.reload()
    done = evaluator.evaluated_steps()
    for step in sorted(evaluator.checkpointer.manager.all_steps()):
      if step not in done:
        logging.info("Evaluating new checkpoint %d", step)
        rows.append(evaluator.evaluate(step))
        print_table(rows[-1:], split, evaluator.run.objective.metrics)
    if finished:
      return rows
    time.sleep(poll_seconds)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run_evaluator(_WORKDIR.value, checkpoints=_CHECKPOINTS.value, split=_SPLIT.value,
                  watch=_WATCH.value, poll_seconds=_POLL_SECONDS.value, overrides=_SET.value,
                  compilation_cache=_COMPILATION_CACHE.value)
  except FtjaxError as e:
    sys.exit(f"ftjax: error: {e}")


if __name__ == "__main__":
  app.run(main)
