"""What verifying a checkpoint costs: seconds per GB of `ftjax.checkpoint.verify`.

  python scripts/verify_cost.py runs/full/checkpoints/532 runs/lora/checkpoints/532

Each checkpoint folder is copied to a temporary folder (the run is left
alone), its manifest written there (`write_manifest`: sizes + blake2b of
every file, what a save adds), then verified --repeats times (what a resume,
the evaluator and export add). Files are read from the page cache after the
copy, so this is the hashing cost, not the disk's. Prints a markdown table.
"""

import pathlib
import shutil
import sys
import tempfile
import time

from absl import app, flags

from ftjax import checkpoint as checkpoint_lib

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed verifications per checkpoint (median).")


def measure(step_dir: pathlib.Path, repeats: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    copy = pathlib.Path(tmp) / step_dir.name
    shutil.copytree(step_dir, copy)
    (copy / checkpoint_lib.MANIFEST).unlink(missing_ok=True)
    size = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file())
    started = time.perf_counter()
    checkpoint_lib.write_manifest(copy)
    write_s = time.perf_counter() - started
    times = []
    for _ in range(repeats):
      started = time.perf_counter()
      assert checkpoint_lib.verify(copy) is None
      times.append(time.perf_counter() - started)
  verify_s = sorted(times)[len(times) // 2]
  return {"checkpoint": str(step_dir), "mb": size / 1e6, "write_s": write_s,
          "verify_s": verify_s, "s_per_gb": verify_s / (size / 1e9)}


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("expected checkpoint folders (<workdir>/checkpoints/<step>)")
  rows = []
  for arg in argv[1:]:
    path = pathlib.Path(arg)
    if not path.is_dir():
      sys.exit(f"verify_cost: error: {path} is not a checkpoint folder; expected "
               f"<workdir>/checkpoints/<step>")
    rows.append(measure(path, _REPEATS.value))
  print("| checkpoint | size (MB) | manifest written (s) | verified (s, median) | s per GB |")
  print("|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['checkpoint']} | {r['mb']:.1f} | {r['write_s']:.3f} | {r['verify_s']:.3f} | "
          f"{r['s_per_gb']:.2f} |")


if __name__ == "__main__":
  app.run(main)
