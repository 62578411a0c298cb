"""What the multi-run studies in `experiments/` share: runs as logged subprocesses, sweeps.

A sweep is a list of `Point`s (a workdir name and `--config` overrides),
usually a `grid` over config keys; `run_points` runs the unfinished ones and
`rows` reads what each finished run recorded (its config.json and
results.json), for `write_csv`, `markdown` and `plot`. `experiments/sweep.py`
is the command line; the freeze ablation and the PEFT comparison are uses.
"""

import csv
import json
import pathlib
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ftjax.errors import FtjaxError


def run_logged(name: str, run_dir: pathlib.Path, command: list[str], *, cwd: pathlib.Path) -> None:
  """Runs `command` (a `python -m ftjax.main ...`), its output appended to `run_dir/log.txt`.

  Appended, not overwritten: a resumed run keeps the log of its first part.
  A failure is one `FtjaxError` line quoting the log's last line.
  """
  run_dir.mkdir(parents=True, exist_ok=True)
  log_path = run_dir / "log.txt"
  print(f"run {name}: log in {log_path}", flush=True)
  started = time.perf_counter()
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    returncode = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
  if returncode:
    lines = [l.strip() for l in log_path.read_text(encoding="utf-8").splitlines() if l.strip()]
    raise FtjaxError(f"run {name} failed (exit {returncode}): "
                     f"{lines[-1] if lines else 'no output'}; log: {log_path}")
  print(f"done {name} in {time.perf_counter() - started:.0f}s", flush=True)


# --- A sweep: named points, each a set of --config overrides, one workdir each --

class Point(NamedTuple):
  """One run of a sweep: its workdir name and its `--config.<key>=<value>` overrides."""

  name: str
  overrides: tuple[str, ...]


def parse_axis(text: str) -> tuple[str, list[str]]:
  """"optimizer.learning_rate=1e-4,5e-4" -> ("optimizer.learning_rate", ["1e-4", "5e-4"])."""
  key, sep, values = text.partition("=")
  key = key.strip().removeprefix("--config.").removeprefix("config.")
  if not sep or not key or not values.strip():
    raise FtjaxError(f"--grid={text!r}; expected <config key>=<value>,<value>,... such as "
                     f"optimizer.learning_rate=1e-4,5e-4")
  return key, [v.strip() for v in _split_values(values)]


def _split_values(values: str) -> list[str]:
  """Commas split values, except inside brackets or quotes (a tuple value "(1, 2)")."""
  out, depth, quote, current = [], 0, None, ""
  for ch in values:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(current)
      current = ""
      continue
    current += ch
  return out + [current]


def _slug(value: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") or "_"


def grid(axes: Sequence[tuple[str, Sequence[str]]],
         base: Sequence[Point] = (Point("", ()),)) -> list[Point]:
  """Every combination of `axes` values crossed with each `base` point, in order.

  A point's name joins `key=value` of the axes (last key part only:
  `learning_rate=5e-4`), so workdirs say what they ran.
  """
  points = list(base)
  for key, values in axes:
    short = key.rsplit(".", 1)[-1]
    points = [Point("__".join(filter(None, (p.name, f"{short}={_slug(v)}"))),
                    p.overrides + (f"--config.{key}={v}",))
              for p in points for v in values]
  names = [p.name for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise FtjaxError(f"sweep points {dupes[:3]} share a name; give the axes distinct values")
  return points


def run_points(points: Sequence[Point], sweep_dir: pathlib.Path, command: Sequence[str], *,
               cwd: pathlib.Path) -> list[str]:
  """Runs each point not finished yet (`python -m ftjax.main` in `sweep_dir/<name>`).

  `command` is the common part (`python -m ftjax.main --config=...`); each
  point adds `--workdir` and its overrides, last, so they win. A finished
  point (its results.json exists) is skipped; an interrupted one is started
  again with the same command, which resumes from its latest checkpoint.
  Returns the names of the finished points, also when a later one fails.
  """
  sweep_dir = pathlib.Path(sweep_dir)
  if sweep_dir.exists() and not sweep_dir.is_dir():
    raise FtjaxError(f"--sweep_dir={sweep_dir} is a file; expected a folder for the runs")
  sweep_dir.mkdir(parents=True, exist_ok=True)
  finished = []
  for point in points:
    run_dir = sweep_dir / point.name
    if (run_dir / "results.json").exists():
      print(f"skip {point.name}: finished", flush=True)
    else:
      try:
        run_logged(point.name, run_dir, [*command, f"--workdir={run_dir}", *point.overrides],
                   cwd=cwd)
      except FtjaxError:
        if finished:
          print(f"{len(finished)} finished before the failure: {', '.join(finished)}",
                flush=True)
        raise
    finished.append(point.name)
  return finished


def config_value(config: Mapping, key: str):
  """`config["a"]["b"]` for key "a.b" (a run's config.json), or "" where absent."""
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return ""
    node = node[part]
  return node


def rows(sweep_dir: pathlib.Path, names: Sequence[str], keys: Sequence[str]) -> list[dict]:
  """One row per finished run: its name, the config `keys` as it ran (config.json), and
  every scalar of its results.json (nested ones as "best/value")."""
  out = []
  for name in names:
    run_dir = pathlib.Path(sweep_dir) / name
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    row = {"run": name, **{key: config_value(config, key) for key in keys}}
    for k, v in results.items():
      if isinstance(v, Mapping):
        row.update({f"{k}/{kk}": vv for kk, vv in v.items() if _scalar(vv)})
      elif _scalar(v):
        row[k] = v
    out.append(row)
  return out


def _scalar(value) -> bool:
  return isinstance(value, (int, float, str, bool)) or value is None


def write_csv(path: pathlib.Path, table: Sequence[dict]) -> None:
  columns = list(dict.fromkeys(k for row in table for k in row))
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(table)


def markdown(table: Sequence[dict], columns: Sequence[str]) -> str:
  """A markdown table of `columns` (numbers right-aligned, floats to 4 significant places)."""
  def cell(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return str(value)
    if isinstance(value, int):
      return f"{value:,}"
    return f"{value:.4g}"

  numeric = [any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                 for r in table) for c in columns]
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in table]
  return "\n".join(lines) + "\n"


def plot(table: Sequence[dict], x: str, y: str, out: pathlib.Path, *, group: str | None = None,
         log_x: bool = False, title: str = "", label: str = "run") -> None:
  """`y` against `x`, one line per value of `group` (or labelled points without one)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
  usable = [r for r in table if _number(r.get(x)) is not None and _number(r.get(y)) is not None]
  if group:
    for i, value in enumerate(dict.fromkeys(str(r.get(group, "")) for r in usable)):
      line = sorted((r for r in usable if str(r.get(group, "")) == value),
                    key=lambda r: _number(r[x]))
      ax.plot([_number(r[x]) for r in line], [_number(r[y]) for r in line], "-o",
              color=f"C{i % 10}", label=f"{group}={value}")
    ax.legend(fontsize=8)
  else:
    for i, r in enumerate(usable):
      ax.plot(_number(r[x]), _number(r[y]), "o", color=f"C{i % 10}")
      ax.annotate(str(r.get(label, "")), (_number(r[x]), _number(r[y])),
                  textcoords="offset points", xytext=(4, 4), fontsize=7)
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(title or f"{y} vs {x}")
  ax.grid(alpha=0.3)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def _number(value) -> float | None:
  if isinstance(value, bool):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None
