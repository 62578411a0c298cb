"""Per-device memory of one train step, ahead of time: compiled, never allocated.

  python scripts/memory_report.py                       # Llama-3.2-1B, full vs LoRA, fsdp=8
  python scripts/memory_report.py --mesh_fsdp=4 --mesh_tensor=2 --batch_size=16 --seq_len=2048

For each strategy it builds the run's state as it would be on the mesh, but
abstract (`jax.ShapeDtypeStruct`s carrying the `NamedSharding`s of
`ftjax.sharding.param_shardings`): parameters split trainable/frozen by the
strategy's partition rules (`ftjax.peft.partition`), the optimizer state
(`jax.eval_shape` of `ftjax.optim.build(...).init`, moments sharded like
their parameters), and a causal-LM batch. The train step is the library's
(`ftjax.core.step.make_train_step`), jitted with the shardings and donation of
`ftjax.core.compiled.compile_steps`, then lowered and compiled; XLA's
`memory_analysis()` gives each device's bytes:

  arguments   state + batch held when the step starts (params, moments, batch)
  outputs     the new state + metrics
  aliased     outputs written in place of donated arguments (not counted twice)
  temp        activations kept for the backward pass, gradients, workspace
  code        the compiled program
  peak        arguments + outputs - aliased + temp + code: what must fit

By default it runs on 8 fake CPU devices (`--fake_cpu_devices`), so a laptop
answers "does this fit on 8 accelerators?" (Llama-3.2-1B: about 25 s of
compiling per strategy on 2 CPU cores, and no model in memory). XLA:CPU and XLA:GPU/TPU schedule (and so
size temporaries) differently: the numbers are estimates for an accelerator;
`--fake_cpu_devices=0` compiles for the real devices instead.

The model is a Hugging Face config.json dict written here (Llama-3.2-1B by
default), so no weights or hub access are needed; `--hidden_size` etc.
shrink it (the test does).
"""

import json
import os

from absl import app, flags

_STRATEGIES = flags.DEFINE_list("strategies", ["full", "lora"],
                                "Strategies to compare: full, freeze, lora.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "LoRA rank.")
_LORA_TARGETS = flags.DEFINE_list("lora_targets", [r".*/attention/(query|value)"],
                                  "LoRA target regexes (default: q_proj and v_proj).")
_FREEZE_LAYERS = flags.DEFINE_integer("freeze_layers", 8, "Layers the freeze strategy freezes.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Global batch size (rows).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_ACCUMULATION = flags.DEFINE_integer("accumulation_steps", 1,
                                     "Micro-batches per step (optimizer.accumulation_steps).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "Compute dtype (parameters and moments stay float32).")
_MESH_DATA = flags.DEFINE_integer("mesh_data", 1, "Devices along the data axis (-1: the rest).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "Devices along the fsdp axis (-1: the rest).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Devices along the tensor axis.")
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_cpu_devices", 8, "Compile for this many fake CPU devices; 0: the machine's devices.")
_JSON = flags.DEFINE_string("json", "", "Also write the numbers as JSON here.")
# The architecture: Llama-3.2-1B unless overridden.
_HIDDEN = flags.DEFINE_integer("hidden_size", 2048, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 16, "Decoder layers.")
_HEADS = flags.DEFINE_integer("num_heads", 32, "Attention heads.")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 8, "Key/value heads (GQA).")
_INTERMEDIATE = flags.DEFINE_integer("intermediate_size", 8192, "MLP width.")
_VOCAB = flags.DEFINE_integer("vocab_size", 128256, "Vocabulary.")

COLUMNS = ("arguments", "outputs", "aliased", "temp", "code", "peak")


def hf_config() -> dict:
  """Llama-3.2-1B's config.json (tied embeddings, llama3 RoPE scaling), sized by the flags."""
  return {
      "model_type": "llama", "vocab_size": _VOCAB.value, "hidden_size": _HIDDEN.value,
      "intermediate_size": _INTERMEDIATE.value, "num_hidden_layers": _LAYERS.value,
      "num_attention_heads": _HEADS.value, "num_key_value_heads": _KV_HEADS.value,
      "head_dim": _HIDDEN.value // _HEADS.value, "max_position_embeddings": 131072,
      "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
      "bos_token_id": 128000, "eos_token_id": 128001,
      "rope_theta": 500000.0,
      "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
  }


def run_config(strategy: str):
  """The ftjax config of the run being sized (only what the step and the mesh read)."""
  from ftjax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.validate(config_lib.override(config_lib.default_config(), {
      "model.task": "causal_lm", "model.dtype": _DTYPE.value,
      "strategy.name": strategy, "strategy.lora.rank": _LORA_RANK.value,
      "strategy.lora.alpha": 2.0 * _LORA_RANK.value,
      "strategy.lora.targets": tuple(_LORA_TARGETS.value),
      "strategy.freeze_layers": _FREEZE_LAYERS.value,
      "training.batch_size": _BATCH_SIZE.value,
      "optimizer.accumulation_steps": _ACCUMULATION.value,
      "eval.splits": (), "eval.metric": "validation/loss", "eval.mode": "min",
      "mesh.data": _MESH_DATA.value, "mesh.fsdp": _MESH_FSDP.value,
      "mesh.tensor": _MESH_TENSOR.value,
  }))


def measure(strategy: str) -> dict:
  """Compiles the train step of `strategy` on abstract inputs; returns per-device bytes."""
  # pylint: disable=g-import-not-at-top
  import time

  import jax
  import jax.numpy as jnp

  from ftjax import models, objectives, optim, sharding
  from ftjax.core import state as state_lib
  from ftjax.core import step as step_lib
  from ftjax.peft import adapter, partition
  # pylint: enable=g-import-not-at-top

  config = run_config(strategy)
  mesh = sharding.make_mesh(config)
  model_config = models.FAMILIES["llama"].config_from_hf(
      hf_config(), task="causal_lm", num_labels=None, dtype=config.model.dtype)
  # shapes only (nnx.eval_shape)
  model = models.Model.build(model_config, adapters=adapter.from_config(config.strategy))

  def with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)

  params = with_sharding(model.abstract_params, sharding.param_shardings(
      config, mesh, model.abstract_params, model.param_axes))
  rules = partition.strategy_rules(config.strategy, num_layers=model_config.num_layers)
  trainable, frozen = partition.split(params, partition.labels(list(model.param_axes), rules))
  learning_rate = optim.schedule(config, total_steps=1000, warmup_steps=0)
  optimizer = optim.build(config, trainable, learning_rate)
  # As ftjax.core.run.setup places them: moments like their parameters, counters replicated.
  opt_shape = jax.eval_shape(optimizer.init, trainable)
  opt_sharding = state_lib.opt_state_shardings(optimizer, trainable, mesh)
  replicated = sharding.replicated(mesh)
  state = state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), trainable=trainable,
      frozen=frozen, opt_state=with_sharding(opt_shape, opt_sharding))

  batch_sharding = sharding.batch_sharding(config, mesh)
  # The objective's typed batch (the same arrays its data pipeline produces).
  objective = objectives.CausalLM(config)
  objective.task_names = ("data",)
  batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding)
           for name, x in objective.batch_spec(_BATCH_SIZE.value, _SEQ_LEN.value).items()}
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)

  # The jit of ftjax.core.compiled.compile_steps: same step, shardings and donation.
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(step_lib.make_train_step(objective, model, optimizer, learning_rate,
                                          accumulation_steps=_ACCUMULATION.value),
                 in_shardings=(state_sharding, {}, batch_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)
  started = time.perf_counter()
  compiled = step.lower(state, {}, batch, rng).compile()
  seconds = time.perf_counter() - started
  analysis = compiled.memory_analysis()
  row = {
      "strategy": strategy if strategy != "lora" else f"lora r={_LORA_RANK.value}",
      "arguments": analysis.argument_size_in_bytes,
      "outputs": analysis.output_size_in_bytes,
      "aliased": analysis.alias_size_in_bytes,
      "temp": analysis.temp_size_in_bytes,
      "code": analysis.generated_code_size_in_bytes,
      "trainable_params": partition.count(trainable),
      "total_params": model.num_params(),
      # What the state alone needs per device, from the shardings (a check on `arguments`).
      "state_bytes_from_shardings": sum(
          x.dtype.itemsize * _prod(x.sharding.shard_shape(x.shape))
          for x in jax.tree.leaves(state)),
      "compile_seconds": seconds,
      "mesh": dict(mesh.shape),
      "devices": f"{len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind}",
  }
  row["peak"] = row["arguments"] + row["outputs"] - row["aliased"] + row["temp"] + row["code"]
  return row


def _prod(shape) -> int:
  out = 1
  for n in shape:
    out *= n
  return out


def _mib(n: int) -> str:
  return f"{n / 2**20:,.2f}"


def table(rows: list[dict]) -> str:
  """A markdown table, MiB per device."""
  lines = ["| strategy | trainable params | " + " | ".join(f"{c} (MiB)" for c in COLUMNS)
           + " | compile (s) |",
           "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
  for r in rows:
    lines.append(f"| {r['strategy']} | {r['trainable_params']:,} | "
                 + " | ".join(_mib(r[c]) for c in COLUMNS) + f" | {r['compile_seconds']:.0f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _FAKE_DEVICES.value:
    # Before JAX starts: the fake devices exist only if the flag precedes the backend.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={_FAKE_DEVICES.value}").strip()
  unknown = [s for s in _STRATEGIES.value if s not in ("full", "freeze", "lora")]
  if unknown:
    raise app.UsageError(f"--strategies: {unknown[0]!r}; expected full, freeze or lora")
  rows = [measure(strategy) for strategy in _STRATEGIES.value]
  first = rows[0]
  print(f"Per-device memory of one train step: {first['total_params']:,} parameters "
        f"(hidden {_HIDDEN.value}, {_LAYERS.value} layers), batch {_BATCH_SIZE.value} x "
        f"{_SEQ_LEN.value} tokens, {_DTYPE.value} compute, mesh {first['mesh']} on "
        f"{first['devices']}")
  print(table(rows))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
