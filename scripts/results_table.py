"""A markdown table of finished runs: one row per workdir (its results.json).

  python scripts/results_table.py /tmp/runs/full /tmp/runs/freeze /tmp/runs/lora
"""

import json
import pathlib
import sys


def row(workdir: pathlib.Path) -> str:
  try:
    results = json.loads((workdir / "results.json").read_text(encoding="utf-8"))
    config = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    sys.exit(f"results_table: error: {workdir} has no readable results.json and config.json "
             f"({type(e).__name__}); expected the workdir of a finished run")
  strategy = config["strategy"]["name"]
  if strategy == "freeze":
    strategy += f" K={config['strategy']['freeze_layers']}"
  elif strategy == "lora":
    strategy += f" r={config['strategy']['lora']['rank']}"
  return (f"| {strategy} | {config['optimizer']['learning_rate']:g} | "
          f"{results['test/accuracy']:.4f} | {results['test/f1']:.4f} | "
          f"{results['validation/accuracy']:.4f} | {results['params/trainable']:,} "
          f"({results['params/trainable_fraction']:.2%}) | "
          f"{results['train/median_seconds_per_step'] * 1000:.0f} | "
          f"{results['wall_seconds'] / 60:.1f} |")


def main(workdirs: list[str]) -> None:
  if not workdirs:
    sys.exit(__doc__)
  print("| strategy | lr | test accuracy | test macro-F1 | validation accuracy | "
        "trainable params | step (ms, median) | wall (min) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for workdir in workdirs:
    print(row(pathlib.Path(workdir)))


if __name__ == "__main__":
  main(sys.argv[1:])
