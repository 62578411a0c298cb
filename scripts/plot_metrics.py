"""Training and validation curves from one or several runs' metrics.jsonl, as a PNG.

  python scripts/plot_metrics.py --out=curves.png /tmp/runs/full /tmp/runs/lora

Two panels (loss, accuracy); per run, the training curve (solid, averaged over
each log window) and the validation curve (dashed, markers at evaluations).
"""

import pathlib
import sys

from absl import app, flags

from ftjax import logs

_OUT = flags.DEFINE_string("out", "curves.png", "PNG to write.")
_SPLIT = flags.DEFINE_string("split", "validation", "Evaluation split to plot.")


def _series(rows, key):
  points = [(r["step"], r[key]) for r in rows if key in r]
  return [s for s, _ in points], [v for _, v in points]


def plot(workdirs: list[pathlib.Path], out: pathlib.Path, split: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
  for index, workdir in enumerate(workdirs):
    rows = logs.read_metrics(workdir)
    if not rows:
      raise SystemExit(f"plot_metrics: no metrics.jsonl rows in {workdir}")
    color = f"C{index}"
    for ax, metric in zip(axes, ("loss", "accuracy")):
      ax.plot(*_series(rows, f"train/{metric}"), color=color, alpha=0.8,
              label=f"{workdir.name} train")
      ax.plot(*_series(rows, f"{split}/{metric}"), color=color, linestyle="--", marker="o",
              label=f"{workdir.name} {split}")
  for ax, metric in zip(axes, ("loss", "accuracy")):
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.savefig(out, dpi=110)
  print(out)


def main(argv):
  if len(argv) < 2:
    sys.exit("plot_metrics: pass one or more workdirs")
  plot([pathlib.Path(a) for a in argv[1:]], pathlib.Path(_OUT.value), _SPLIT.value)


if __name__ == "__main__":
  app.run(main)
