"""Adapters as Hugging Face PEFT adapter folders: export and import.

A PEFT adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base,
folder)` puts on top of the transformers base model. Its tensors are named
after the base model's modules, under `base_model.model.`:

  base_model.model.<module>.lora_A.weight   a LoRA factor (`ftjax.peft.lora`)
  base_model.model.<name>                   a full tensor of `modules_to_save`

Prompt-learning methods (prompt and prefix tuning, `ftjax.peft.prompt`) change
no module, and PEFT saves them in another layout: the method's tensor at the
top level (`prompt_embeddings`) and `modules_to_save` under `base_model.`
(`base_model.classifier.weight`).

This module writes and reads the folder, the `modules_to_save` tensors and
the keys every PEFT type shares; the method's own tensors and config entries
come from the adapter (`Adapter.to_peft`, and the `from_peft` importer
registered for its `peft_type`). An adapter's tensors belong to the HF
module whose weight the family's key table maps the adapted kernel to
(`hf_module`), so export and import go through the same table as the base
weights, and need nothing per family.
"""

import json
import os
import pathlib

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from ftjax.errors import CheckpointError
from ftjax.models import keymap
from ftjax import files
from ftjax.models.pretrained import Model, Params
from ftjax.models.registry import BASE_TASKS
from ftjax.peft import adapter as adapter_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT types whose folders hold the method's tensors unprefixed and the
# modules_to_save under `base_model.` (PEFT's `is_prompt_learning`).
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING",
                   "CPT", "CARTRIDGE")
_PROMPT_LEARNING_PREFIX = "base_model."
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS",
               "encoder": "FEATURE_EXTRACTION", "decoder": "FEATURE_EXTRACTION"}


def _match_flax(model: Model, path: str):
  return model.family.table.match_flax(path, task_model=model.config.task not in BASE_TASKS)


def hf_module(model: Model, kernel_path: str) -> tuple[str, keymap.Rule]:
  """The HF module name (no `.weight`) and key-table rule of a Flax kernel."""
  target = _match_flax(model, kernel_path)
  if target is None:
    raise CheckpointError(f"parameter {kernel_path!r} has no Hugging Face name in the "
                          f"{model.config.model_type} key table")
  name, rule = target
  return name.removesuffix(".weight"), rule


def target_modules(model: Model, modules: list[str]) -> list[str]:
  """PEFT's `target_modules` for the adapted HF `modules`.

  Leaf names ("q_proj") when they pick exactly the adapted modules, else the
  full module names: PEFT matches a list entry by equality or "." suffix.
  """
  leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
  all_kernels = [hf_module(model, p)[0] for p in keymap.flatten(model.abstract_params)
                 if p.endswith("/kernel") and _match_flax(model, p) is not None]
  same_leaf = [m for m in all_kernels if m.rsplit(".", 1)[-1] in leaves]
  return leaves if sorted(same_leaf) == sorted(modules) else sorted(modules)


def save_adapter(model: Model, params: Params, out_dir: str | os.PathLike, *,
                 base_model_name_or_path: str = "",
                 modules_to_save: tuple[str, ...] = ()) -> pathlib.Path:
  """Writes `model`'s adapter (and the `modules_to_save` paths) as a PEFT adapter.

  Args:
    model, params: a model with one adapter that has a PEFT format (LoRA:
      `ftjax.peft.adapter.add_adapters`).
    out_dir: the adapter folder.
    base_model_name_or_path: recorded in adapter_config.json for PEFT.
    modules_to_save: flat parameter paths trained in full besides the
      adapters (a new classification head); saved whole. A prompt-learning
      adapter of a classifier always saves the classifier, as PEFT does.
  """
  if not model.adapters:
    raise CheckpointError("save_adapter needs a model with LoRA adapters (or another adapter "
                          "with a PEFT format); this one has none")
  base = [a for a in model.adapters if getattr(a, "transforms_base", False)]
  if base:
    # The adapters were trained on the quantised kernels: PEFT would put them on
    # the float base (or on bitsandbytes' own blocks) and compute other logits.
    raise CheckpointError(f"this model's base is quantised ({base[0].name}: "
                          f"{getattr(base[0], 'method', '')}), which a PEFT adapter folder "
                          f"cannot hold; export the merged model (--format=merged), which "
                          f"gives this model's own logits")
  if len(model.adapters) > 1:
    raise CheckpointError(f"a PEFT adapter folder holds one method; this model stacks "
                          f"{', '.join(a.name for a in model.adapters)} (merge all but one)")
  flat = {p: np.asarray(jax.device_get(x), np.float32) for p, x in keymap.flatten(params).items()}
  config, method_tensors = model.adapters[0].to_peft(model, flat)
  if config["peft_type"] in PROMPT_LEARNING:
    prefix, tensors = _PROMPT_LEARNING_PREFIX, dict(method_tensors)
    if model.config.task == "classification":
      # PEFT's sequence classifiers always save (and on loading require) the
      # classifier with a prompt-learning method.
      modules_to_save = tuple(modules_to_save) + tuple(
          p for p in flat if p.startswith("classifier/") and p not in modules_to_save)
  else:
    prefix, tensors = _PREFIX, {_PREFIX + name: value for name, value in method_tensors.items()}
  saved_modules = set()
  for path in modules_to_save:
    target = _match_flax(model, path)
    if target is None:
      raise CheckpointError(f"parameter {path!r} has no Hugging Face name to save it under")
    name, rule = target
    tensors[prefix + name] = rule.transform.to_hf(flat[path])
    saved_modules.add(name.split(".")[0])
  config = {**config, "task_type": _TASK_TYPES[model.config.task],
            "base_model_name_or_path": base_model_name_or_path,
            "modules_to_save": sorted(saved_modules) or None, "inference_mode": True}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out / WEIGHTS_FILE,
                     lambda path: save_file(tensors, path, metadata={"format": "pt"}))
  files.atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
  return out


def load_adapter(model: Model, params: Params, adapter_dir: str | os.PathLike,
                 rng: jax.Array | None = None) -> tuple[Model, Params]:
  """(model with the adapter, params) from a base model and a PEFT adapter folder.

  The folder's `peft_type` picks the adapter's importer (LORA: `ftjax.peft.lora`;
  PROMPT_TUNING, PREFIX_TUNING: `ftjax.peft.prompt`); `modules_to_save` tensors
  replace the base model's.
  """
  folder = pathlib.Path(adapter_dir)
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (folder / name).is_file():
      raise CheckpointError(f"{folder} has no {name}; expected a PEFT adapter folder")
  config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
  importer = adapter_lib.peft_importer(config.get("peft_type"))
  if importer is None:
    raise CheckpointError(f"{folder / CONFIG_FILE} has peft_type {config.get('peft_type')!r}; "
                          f"expected one of {', '.join(map(repr, adapter_lib.peft_types()))}")
  tensors = {}
  prompt_learning = config["peft_type"] in PROMPT_LEARNING
  prefix = _PROMPT_LEARNING_PREFIX if prompt_learning else _PREFIX
  for key, value in load_file(str(folder / WEIGHTS_FILE)).items():
    if key.startswith(prefix):
      key = key[len(prefix):]
    elif not prompt_learning:  # A prompt-learning method's own tensors are unprefixed.
      raise CheckpointError(f"adapter tensor {key!r} does not start with {_PREFIX!r}")
    tensors[key] = value
  adapter, values, rest = importer(model, config, tensors, str(folder))
  shapes = keymap.flatten(model.abstract_params)
  for name, value in rest.items():
    target = model.family.table.match_hf(name)
    if target is None:
      raise CheckpointError(f"adapter tensor {prefix + name!r} matches no parameter of the "
                            f"{model.config.model_type} model")
    values[target[0]] = target[1].transform.to_flax(value, tuple(shapes[target[0]].shape))
  adapted_model, adapted_params = adapter_lib.add_adapters(
      model, params, (adapter,), rng if rng is not None else jax.random.key(0))
  flat = dict(keymap.flatten(adapted_params))
  for path, value in values.items():
    flat[path] = jax.device_put(np.asarray(value, np.float32), flat[path].sharding)
  return adapted_model, keymap.unflatten(flat, adapted_model.abstract_params)
