"""LoRA adapters as Hugging Face PEFT adapters: export and import.

A PEFT LoRA adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base,
folder)` puts on top of the transformers base model. Its tensors are named
after the base model's modules:

  base_model.model.<module>.lora_A.weight   (rank, in)
  base_model.model.<module>.lora_B.weight   (out, rank)
  base_model.model.<name>                   a full tensor of `modules_to_save`

with the update `(lora_alpha / r) * B A x`, the same as ftjax's
`(alpha / rank) * x A B` (`ftjax.peft.lora`). ftjax's adapter of a kernel at
`<module path>/kernel` belongs to the HF module whose weight the family's key
table maps that kernel to, so export and import go through the same table as
the base weights, and need nothing per family. The kernel's input axes
flatten to PEFT's `in` and its output axes to `out`, in the order the key
table's Linear/Conv1D transform uses for the kernel itself. GPT-2's fused
c_attn is one kernel, hence one adapter, as in PEFT.
"""

import json
import math
import os
import pathlib
import re

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from ftjax.errors import CheckpointError
from ftjax.models import keymap
from ftjax.models.pretrained import Model, Params, _atomic_write
from ftjax.models.registry import BASE_TASKS
from ftjax.peft import lora as lora_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS",
               "encoder": "FEATURE_EXTRACTION", "decoder": "FEATURE_EXTRACTION"}


def _hf_module(model: Model, kernel_path: str) -> tuple[str, keymap.Rule]:
  """The HF module name (no `.weight`) and rule of a Flax kernel."""
  target = model.family.table.match_flax(kernel_path,
                                         task_model=model.config.task not in BASE_TASKS)
  if target is None:
    raise CheckpointError(f"parameter {kernel_path!r} has no Hugging Face name in the "
                          f"{model.config.model_type} key table")
  name, rule = target
  return name.removesuffix(".weight"), rule


def save_adapter(model: Model, params: Params, out_dir: str | os.PathLike, *,
                 base_model_name_or_path: str = "",
                 modules_to_save: tuple[str, ...] = ()) -> pathlib.Path:
  """Writes `model`'s LoRA adapters (and the `modules_to_save` paths) as a PEFT adapter.

  Args:
    model, params: a model with LoRA adapters (`ftjax.peft.lora.add_lora`).
    out_dir: the adapter folder.
    base_model_name_or_path: recorded in adapter_config.json for PEFT.
    modules_to_save: flat parameter paths trained in full besides the
      adapters (a new classification head); saved whole.
  """
  spec = model.lora
  if spec is None:
    raise CheckpointError("save_adapter needs a model with LoRA adapters; this one has none")
  flat = {p: np.asarray(jax.device_get(x), np.float32) for p, x in keymap.flatten(params).items()}
  tensors, modules = {}, []
  for path in lora_lib.lora_paths(params):
    if not path.endswith("/lora_a"):
      continue
    prefix = path[:-len("lora_a")]
    module, rule = _hf_module(model, prefix + "kernel")
    lora_a, lora_b = flat[prefix + "lora_a"], flat[prefix + "lora_b"]
    rank = lora_a.shape[-1]
    tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(
        lora_a.reshape(-1, rank).T)
    tensors[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
        lora_b.reshape(rank, -1).T)
    modules.append(module)
  saved_modules = set()
  for path in modules_to_save:
    target = model.family.table.match_flax(path, task_model=model.config.task not in BASE_TASKS)
    if target is None:
      raise CheckpointError(f"parameter {path!r} has no Hugging Face name to save it under")
    name, rule = target
    tensors[_PREFIX + name] = rule.transform.to_hf(flat[path])
    saved_modules.add(name.split(".")[0])
  # Leaf names ("q_proj") when they pick exactly the adapted modules, else the
  # full module names: PEFT matches a list entry by equality or "." suffix.
  leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
  all_kernels = [_hf_module(model, p)[0] for p in keymap.flatten(model.abstract_params)
                 if p.endswith("/kernel") and _has_name(model, p)]
  same_leaf = [m for m in all_kernels if m.rsplit(".", 1)[-1] in leaves]
  targets = leaves if sorted(same_leaf) == sorted(modules) else sorted(modules)
  config = {
      "peft_type": "LORA", "task_type": _TASK_TYPES[model.config.task],
      "base_model_name_or_path": base_model_name_or_path, "r": spec.rank,
      "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": targets,
      "bias": "none", "fan_in_fan_out": model.config.model_type == "gpt2",
      "modules_to_save": sorted(saved_modules) or None, "use_rslora": False,
      "use_dora": False, "inference_mode": True, "init_lora_weights": True,
  }
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _atomic_write(out / WEIGHTS_FILE,
                lambda path: save_file(tensors, path, metadata={"format": "pt"}))
  _atomic_write(out / CONFIG_FILE, lambda path: pathlib.Path(path).write_text(
      json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"))
  return out


def _has_name(model: Model, path: str) -> bool:
  return model.family.table.match_flax(path, task_model=model.config.task not in BASE_TASKS) \
      is not None


def load_adapter(model: Model, params: Params, adapter_dir: str | os.PathLike,
                 rng: jax.Array | None = None) -> tuple[Model, Params]:
  """(model with LoRA, params) from a base model and a PEFT LoRA adapter folder.

  The adapter's modules become exact LoRA targets; `modules_to_save` tensors
  replace the base model's. Refuses what ftjax's LoRA does not compute
  (rsLoRA, DoRA, per-module ranks or alphas, trained biases).
  """
  folder = pathlib.Path(adapter_dir)
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (folder / name).is_file():
      raise CheckpointError(f"{folder} has no {name}; expected a PEFT LoRA adapter folder")
  config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
  if config.get("peft_type") != "LORA":
    raise CheckpointError(f"{folder / CONFIG_FILE} has peft_type {config.get('peft_type')!r}; "
                          f"expected 'LORA'")
  for key, ok in (("use_rslora", False), ("use_dora", False)):
    if config.get(key, ok) != ok:
      raise CheckpointError(f"{folder / CONFIG_FILE} sets {key}={config[key]}; ftjax's LoRA "
                            f"supports plain LoRA only")
  for key in ("rank_pattern", "alpha_pattern"):
    if config.get(key):
      raise CheckpointError(f"{folder / CONFIG_FILE} sets {key}; expected one rank and alpha "
                            f"for every module")
  if config.get("bias", "none") != "none":
    raise CheckpointError(f"{folder / CONFIG_FILE} sets bias={config['bias']!r}; expected "
                          f"'none'")
  tensors = load_file(str(folder / WEIGHTS_FILE))
  table = model.family.table
  adapters: dict[str, dict[str, np.ndarray]] = {}
  extra: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    if not key.startswith(_PREFIX):
      raise CheckpointError(f"adapter tensor {key!r} does not start with {_PREFIX!r}")
    name = key[len(_PREFIX):]
    m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
    if m:
      target = table.match_hf(m.group(1) + ".weight")
      if target is None or not target[0].endswith("/kernel"):
        raise CheckpointError(f"adapter tensor {key!r}: no {model.config.model_type} projection "
                              f"is named {m.group(1)!r}")
      adapters.setdefault(target[0][:-len("kernel")], {})[m.group(2)] = value
    else:
      target = table.match_hf(name)
      if target is None:
        raise CheckpointError(f"adapter tensor {key!r} matches no parameter of the "
                              f"{model.config.model_type} model")
      extra[target[0]] = target[1].transform.to_flax(
          value, tuple(keymap.flatten(model.abstract_params)[target[0]].shape))
  if not adapters:
    raise CheckpointError(f"{folder / WEIGHTS_FILE} holds no lora_A/lora_B tensors")
  spec = lora_lib.LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                           dropout=float(config.get("lora_dropout", 0.0)),
                           targets=tuple(re.escape(p.rstrip("/")) for p in sorted(adapters)))
  lora_model, lora_params = lora_lib.add_lora(model, params, spec,
                                              rng if rng is not None else jax.random.key(0))
  flat = dict(keymap.flatten(lora_params))
  for prefix, pair in adapters.items():
    if set(pair) != {"A", "B"}:
      raise CheckpointError(f"adapter of {prefix.rstrip('/')!r} lacks lora_{'AB'[len(pair) % 2]}")
    a_shape, b_shape = flat[prefix + "lora_a"].shape, flat[prefix + "lora_b"].shape
    lora_a, lora_b = pair["A"].T, pair["B"].T
    if lora_a.shape != (math.prod(a_shape[:-1]), a_shape[-1]) or \
        lora_b.shape != (b_shape[0], math.prod(b_shape[1:])):
      raise CheckpointError(f"adapter of {prefix.rstrip('/')!r} has lora_A {pair['A'].shape}, "
                            f"lora_B {pair['B'].shape}; the model needs rank {spec.rank} "
                            f"adapters of a {a_shape[:-1]} -> {b_shape[1:]} projection")
    for leaf, value, shape in (("lora_a", lora_a, a_shape), ("lora_b", lora_b, b_shape)):
      flat[prefix + leaf] = jax.device_put(value.reshape(shape).astype(np.float32),
                                           flat[prefix + leaf].sharding)
  for path, value in extra.items():
    flat[path] = jax.device_put(value.astype(np.float32), flat[path].sharding)
  return lora_model, keymap.unflatten(flat, lora_model.abstract_params)
