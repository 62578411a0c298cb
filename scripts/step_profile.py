"""Where a compiled step's time goes: a jax.profiler trace, its ops grouped by kind and phase.

`profile(compiled, args, trace_dir)` runs `compiled(*args)` under
`jax.profiler.trace` and sums the duration of every XLA op in the trace
(the names of the trace's op events are the HLO instruction names of the
executable) into

  kind   matmul (the op's computation holds a dot or convolution), rng (the
         threefry bits behind dropout), reduce, copy/transpose/broadcast,
         scatter/gather, elementwise (other fusions), other
  phase  forward (`jvp` in the op's JAX name), backward (`transpose(jvp`),
         update (the rest: optimizer, gradient norm, metrics)

Times are summed over threads: with XLA:CPU's threads running ops side by side
they add up to more than the step's wall time (their ratio is `concurrency`).
The trace is kept in `trace_dir` (open perfetto_trace.json.gz in ui.perfetto.dev).
"""

import collections
import glob
import gzip
import json
import os
import re
import time

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def op_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (kind, phase), for the instructions of a module's entry computation.

  Only the entry's: a while loop (threefry's rounds) or a call is one op
  whose trace event encloses those of its body, which would count twice.
  """
  computations: dict[str, list[str]] = {}
  current, entry = None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = computations.setdefault(match.group(1), [])
      entry = match.group(1) if line.startswith("ENTRY") else entry
    elif current is not None:
      current.append(line)

  def body(name: str, seen: set) -> str:
    if name in seen or name not in computations:
      return ""
    seen.add(name)
    text = "\n".join(computations[name])
    return text + "".join(body(callee, seen) for callee in _CALLEES.findall(text))

  kinds = {}
  for line in computations.get(entry, []):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    callees = _CALLEES.findall(line)
    text = line + "".join(body(c, set()) for c in callees)
    op_name = (_OP_NAME.search(line) or _OP_NAME.search(text))
    op_name = op_name.group(1) if op_name else ""
    if " dot(" in text or " convolution(" in text:
      kind = "matmul"
    elif "threefry" in op_name or " xor(" in text:
      kind = "rng"
    elif " scatter(" in text or " gather(" in text or opcode in ("scatter", "gather"):
      kind = "scatter/gather"
    elif " reduce(" in text or opcode == "reduce":
      kind = "reduce"
    elif (opcode in ("copy", "transpose", "broadcast")
          or name.startswith(("copy", "transpose", "wrapped_broadcast", "wrapped_transpose"))):
      kind = "copy/transpose/broadcast"
    elif opcode == "fusion":
      kind = "elementwise"
    else:
      kind = "other"
    phase = ("backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name
             else "update" if op_name else "unattributed")
    kinds[name] = (kind, phase)
  return kinds


def profile(compiled, args, trace_dir: str, calls: int = 2) -> dict:
  """Seconds per call by kind and by phase of `compiled(*args)` (donated args are re-fed).

  Returns {"kind": {...}, "phase": {...}, "busy_seconds", "wall_seconds",
  "concurrency", "trace"} per call, and the last call's outputs under "outputs".
  """
  import jax  # pylint: disable=g-import-not-at-top
  kinds = op_kinds(compiled.as_text())
  outputs = None
  started = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      outputs = compiled(*args)
      jax.block_until_ready(outputs)
      args = (outputs[0],) + tuple(args[1:])  # A train step's new state is the next input.
  wall = (time.perf_counter() - started) / calls
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  with gzip.open(paths[-1], "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  by_kind, by_phase = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event["name"] in kinds:
      kind, phase = kinds[event["name"]]
      by_kind[kind] += event["dur"] / 1e6 / calls
      by_phase[phase] += event["dur"] / 1e6 / calls
  busy = sum(by_kind.values())
  return {"kind": dict(by_kind), "phase": dict(by_phase), "busy_seconds": busy,
          "wall_seconds": wall, "concurrency": busy / wall, "trace": paths[-1],
          "outputs": outputs}


def dense_matmul_seconds(layer_matmuls: list[list[tuple[int, int]]], tokens: int,
                         dtype: str = "float32", repeats: int = 3) -> tuple[float, float]:
  """(seconds, FLOPs) of the dense matmuls alone of a training step over `tokens` rows.

  `layer_matmuls[l]` lists layer l's weights as (in, out); the matmuls of a
  layer that share an input dimension share their input (q/k/v, gate/up), as
  in the model. Forward, activation gradients and weight gradients (3 x 2
  tokens in out FLOPs per weight): what the step's matmuls would cost with no
  other work around them. The median of `repeats` timed calls, after one.
  """
  import statistics  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  keys = iter(jax.random.split(jax.random.key(0), 4 * sum(map(len, layer_matmuls)) + 1))
  weights = [[jax.random.normal(next(keys), shape, dtype) / shape[0]**0.5 for shape in layer]
             for layer in layer_matmuls]
  inputs = [{n_in: jax.random.normal(next(keys), (tokens, n_in), dtype) for n_in, _ in layer}
            for layer in layer_matmuls]

  def loss(weights, inputs):
    # sum(y^2) / 2, so the output gradient is y itself: a plain sum would
    # make it a broadcast of ones, which XLA may fold into a reduction.
    total = 0.0
    for layer_weights, layer_inputs in zip(weights, inputs):
      for w in layer_weights:
        y = (layer_inputs[w.shape[0]] @ w).astype(jnp.float32)
        total += 0.5 * (y * y).sum()
    return total

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(weights, inputs))
  seconds = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(step(weights, inputs))
    seconds.append(time.perf_counter() - started)
  flops = sum(3 * 2 * tokens * n_in * n_out for layer in layer_matmuls for n_in, n_out in layer)
  return statistics.median(seconds), flops
