"""A grid over any config keys, one run per point, in one command.

  .venv/bin/python experiments/sweep.py --config=configs/sentiment_minilm.py \
      --sweep_dir=runs/lr_sweep \
      --grid=strategy.name=full,lora --grid=optimizer.learning_rate=1e-4,5e-4,1e-3 \
      --set=training.num_epochs=1 \
      --columns=test/accuracy,params/trainable,train/median_seconds_per_step \
      --plot=optimizer.learning_rate:test/accuracy:strategy.name

Every combination of the --grid values is a `python -m ftjax.main` run in
its own workdir under --sweep_dir, named after its values
(`name=lora__learning_rate=5e-4`). Restarting the same command skips the
finished runs (those with a results.json) and resumes an interrupted one from
its latest checkpoint. Then it writes, beside the runs:

  results.csv   every grid key as the run recorded it (config.json) and every
                scalar of its results.json
  results.md    the grid keys and --columns
  <y>_vs_<x>.png for each --plot=x:y[:group] (a config key or a metric on
                either axis; one line per value of `group`)
"""

import pathlib
import sys

from absl import app, flags

from ftjax import sweeps
from ftjax.errors import FtjaxError

REPO = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = flags.DEFINE_string("config", str(REPO / "configs" / "sentiment_minilm.py"),
                              "Base config file; every run starts from it.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Folder of the runs and the summary.")
_GRID = flags.DEFINE_multi_string(
    "grid", [], "An axis of the grid, <config key>=<value>,<value>,... (repeatable).")
_SET = flags.DEFINE_multi_string(
    "set", [], "A <config key>=<value> for every run (repeatable), before the grid's values.")
_COLUMNS = flags.DEFINE_list(
    "columns", ["test/accuracy", "params/trainable", "train/median_seconds_per_step"],
    "results.json keys shown in results.md (results.csv has all of them).")
_PLOT = flags.DEFINE_multi_string(
    "plot", [], "x:y[:group] plots, each axis a config key or a results.json key (repeatable).")
flags.mark_flags_as_required(["sweep_dir"])


def points_from_flags(grid_flags: list[str]) -> tuple[list[sweeps.Point], list[str]]:
  axes = [sweeps.parse_axis(text) for text in grid_flags]
  if not axes:
    raise FtjaxError("no --grid given; expected at least one <config key>=<value>,... axis")
  return sweeps.grid(axes), [key for key, _ in axes]


def summarize(sweep_dir: pathlib.Path, names: list[str], keys: list[str],
              columns: list[str], plots: list[str]) -> str:
  table = sweeps.rows(sweep_dir, names, keys)
  sweeps.write_csv(sweep_dir / "results.csv", table)
  text = sweeps.markdown(table, ["run", *keys, *columns])
  (sweep_dir / "results.md").write_text(text, encoding="utf-8")
  for spec in plots:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
      raise FtjaxError(f"--plot={spec!r}; expected x:y or x:y:group")
    x, y, group = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    name = f"{y}_vs_{x}".replace("/", "_") + ".png"
    if table:
      sweeps.plot(table, x, y, sweep_dir / name, group=group)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config_path = pathlib.Path(_CONFIG.value).resolve()
    if not config_path.is_file():
      raise FtjaxError(f"--config={config_path} is not a file; expected a configs/<exp>.py")
    points, keys = points_from_flags(_GRID.value)
    common = []
    for text in _SET.value:
      key, values = sweeps.parse_axis(text)
      if len(values) != 1:
        raise FtjaxError(f"--set={text!r} has {len(values)} values; expected one (use --grid)")
      common.append(f"--config.{key}={values[0]}")
    sweep_dir = pathlib.Path(_SWEEP_DIR.value).resolve()
    finished = []
    try:
      finished = sweeps.run_points(
          points, sweep_dir,
          [sys.executable, "-m", "ftjax.main", f"--config={config_path}", *common], cwd=REPO)
    finally:
      done = [p.name for p in points if (sweep_dir / p.name / "results.json").exists()]
      if done or finished:
        print(summarize(sweep_dir, done, keys, _COLUMNS.value, _PLOT.value), end="")
  except FtjaxError as e:
    sys.exit(f"sweep: error: {e}")


if __name__ == "__main__":
  app.run(main)
