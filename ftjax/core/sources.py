"""Where a model comes from: a checkpoint ftjax loads, or a finished ftjax run.

`load(name_or_path, ...)` takes
  * a Hugging Face folder or hub id, or a GGUF file (`ftjax.models`);
  * a training workdir of ftjax (or `<workdir>/checkpoints/<step>`): the run's
    own base model, with its adapters and its trained weights from that
    checkpoint, adapters merged into the base, so the result is a plain
    model of the run's family and head;
and, with `layers`, cuts the loaded model to those layers of its stack
(`ftjax.models.keep_layers`: a student initialised from its teacher).

The student (`config.model`) and reference models (a distillation teacher)
load through here, so a teacher can be any of these and a student can be
cut from a fine-tuned run's layers.
"""

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from ftjax import checkpoint as checkpoint_lib
from ftjax import models
from ftjax.errors import ConfigError
from ftjax.models import keymap


@dataclasses.dataclass(frozen=True)
class Source:
  model: models.Model
  params: Any
  # Flat paths the checkpoint lacked (initialised here; a new head).
  new_paths: tuple[str, ...]
  tokenizer: Any
  # What identifies the weights beyond the config (the run's checkpoint step).
  identity: dict


def is_run(name_or_path: str) -> bool:
  """A training workdir of ftjax (config.json + checkpoints/), or one of its checkpoints."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.name.isdigit() and path.parent.name == "checkpoints":
    path = path.parent.parent
  return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def base_adapters(adapters) -> tuple:
  """The adapters that transform the base weights (`transforms_base`: a quantised
  kernel, `ftjax.peft.quant`), which `load` applies as the checkpoint is read."""
  return tuple(a for a in adapters if getattr(a, "transforms_base", False))


def load(name_or_path: str, *, task: str, num_labels: int | None = None,
         dtype: str = "float32", pooling: str = "pooler", allow_pickle: bool = False,
         seed: int = 0, shardings: Callable[[models.Model], Any] | None = None,
         layers: tuple[int, ...] = (), adapters: tuple = ()) -> Source:
  """The model at `name_or_path` (see the module docstring), sharded by `shardings(model)`.

  `adapters` (`base_adapters`: a quantised base) are part of the loaded model:
  a checkpoint's tensors are converted on the host as they are read
  (`ftjax.models.load_pretrained`); a run's merged weights are converted on
  the devices.
  """
  if is_run(name_or_path):
    source = _load_run(name_or_path, task=task, num_labels=num_labels, dtype=dtype,
                       pooling=pooling, shardings=shardings)
    if adapters:
      # Imported here, as in `_load_run`: adapters are a core-level concept.
      from ftjax.peft import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
      model, params = adapter_lib.add_adapters(source.model, source.params, adapters,
                                               jax.random.key(seed))
      if shardings:
        params = jax.device_put(params, shardings(model))
      source = dataclasses.replace(source, model=model, params=params)
  else:
    loaded = models.load_pretrained(
        name_or_path, task=task, num_labels=num_labels, dtype=dtype, pooling=pooling,
        allow_pickle=allow_pickle, seed=seed, shardings=shardings, adapters=adapters)
    source = Source(loaded.model, loaded.params, loaded.new_paths,
                    models.load_tokenizer(name_or_path), {})
  if not layers:
    return source
  model, params = models.keep_layers(source.model, source.params, layers, where=name_or_path)
  logging.info("%s cut to layers %s of %d", name_or_path, list(layers),
               source.model.config.num_layers)
  new_paths = tuple(p for p in source.new_paths if p in keymap.flatten(params))
  return dataclasses.replace(source, model=model, params=params, new_paths=new_paths,
                             identity={**source.identity, "layers": list(layers)})


def _load_run(name_or_path: str, *, task, num_labels, dtype, pooling, shardings) -> Source:
  # Imported here: the run's config and adapters are core-level concepts.
  from ftjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ftjax.core import state as state_lib  # pylint: disable=g-import-not-at-top
  from ftjax.peft import adapter as adapter_lib  # pylint: disable=g-import-not-at-top

  workdir, step = checkpoint_lib.find(pathlib.Path(name_or_path).expanduser())
  run_config = config_lib.load_run_config(workdir, [])
  m = run_config.model
  for key, wanted, have in (("task", task, m.task), ("pooling", pooling, m.pooling)):
    if wanted != have:
      raise ConfigError(f"{name_or_path!r} is a run with model.{key}={have!r}; expected "
                        f"{wanted!r} (set model.{key}={have!r} to load it)")
  adapters = adapter_lib.from_config(run_config.strategy)
  # The run's quantised base (if any) is loaded as the run loaded it.
  on_base = base_adapters(adapters)
  base = load(m.name_or_path, task=m.task, num_labels=m.num_labels, dtype=dtype,
              pooling=m.pooling, allow_pickle=m.allow_pickle, seed=run_config.seed,
              shardings=shardings, layers=tuple(m.layers), adapters=on_base)
  model, params = base.model, base.params
  if num_labels is not None and model.config.num_labels != num_labels:
    raise ConfigError(f"{name_or_path!r} is a run with {model.config.num_labels} labels; "
                      f"expected model.num_labels={num_labels}")
  stacked = tuple(a for a in adapters if a not in on_base)
  if stacked:
    model, params = adapter_lib.add_adapters(model, params, stacked,
                                             jax.random.key(run_config.seed + 1))
  flat = dict(keymap.flatten(params))
  saved = {p: v for p, v in checkpoint_lib.read_trainable(workdir, step).items()
           if not p.startswith(state_lib.OBJECTIVE + "/")}
  targets = keymap.flatten(shardings(model)) if shardings else {}
  for path, value in saved.items():
    if path not in flat or tuple(value.shape) != tuple(flat[path].shape):
      raise ConfigError(f"{workdir}/checkpoints/{step} has {path!r} {tuple(value.shape)}, "
                        f"which the run's model does not; was its config.json edited?")
    flat[path] = jax.device_put(np.asarray(value, np.float32), targets.get(path))
  params = keymap.unflatten(flat, model.abstract_params)
  if model.adapters:
    model, params = adapter_lib.merge_adapters(model, params)
  logging.info("loaded run %s at step %d (%d trained parameters over %s)", workdir, step,
               len(saved), m.name_or_path)
  return Source(model, params, (), base.tokenizer,
                {"run": str(workdir), "step": int(step), "base": base.identity or m.name_or_path})
