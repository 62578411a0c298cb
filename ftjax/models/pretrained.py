"""`Model`, and loading/saving Hugging Face checkpoints.

A `Model` is a Flax NNX module split once into its static graph and a plain
parameter pytree (nested dicts of arrays, keys like
`encoder/layers/3/attention/query/kernel`). Everything downstream (optax
partitions, orbax, sharding, LoRA) works on that plain pytree;
`model.apply(params, ...)` merges them back for a forward pass, which costs
nothing at run time inside `jax.jit`.

A checkpoint is a Hugging Face folder (or hub id), or a llama.cpp GGUF file,
which `ftjax.models.gguf` reads as the Hugging Face checkpoint it was
converted from: a config.json dict and tensors under Hugging Face names. From
there both load through the same family key table.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from safetensors.numpy import save_file

from ftjax import files
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import gguf, heads, hub, keymap
from ftjax.models.registry import BASE_TASKS, FAMILIES, Family

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A model's architecture: config, NNX graph and parameter shapes (no weights)."""

  config: Any
  family: Family
  graphdef: Any
  # Pure-dict tree of jax.ShapeDtypeStruct, the shape of `params`.
  abstract_params: Params
  # Flat "path" -> logical axis names of each parameter.
  param_axes: dict[str, tuple[str, ...]]
  # PEFT adapters injected into the family's module, in stacking order: frozen
  # dataclasses implementing `ftjax.peft.adapter.Adapter` (models never import
  # ftjax.peft; they only call `adapter.inject`).
  adapters: tuple = ()

  @classmethod
  def build(cls, config, adapters: Iterable = ()) -> "Model":
    family = FAMILIES[config.model_type]
    adapters = tuple(adapters)
    module = nnx.eval_shape(lambda: _construct(family, config, adapters, nnx.Rngs(0)))
    graphdef, state = nnx.split(module)
    flat_state = keymap.flatten(nnx.to_pure_dict(state))
    axes = {}
    for path, variable in state.flat_state():
      if not isinstance(variable, nnx.Param):
        raise TypeError(f"{'/'.join(map(str, path))} is a {type(variable).__name__}; "
                        f"ftjax models hold only nnx.Param")
      axes["/".join(map(str, path))] = variable.get_metadata()["logical_axes"]
    assert set(axes) == set(flat_state)
    return cls(config=config, family=family, graphdef=graphdef,
               abstract_params=nnx.to_pure_dict(state), param_axes=axes, adapters=adapters)

  def init(self, rng: jax.Array, only: Iterable[str] | None = None,
           shardings: Any = None) -> Params:
    """Random parameters; with `only`, just those flat paths (XLA drops the rest).

    `shardings` (shaped like the result) creates them already sharded.
    """
    keep = None if only is None else set(only)

    def init_fn(key):
      module = _construct(self.family, self.config, self.adapters, nnx.Rngs(key))
      params = nnx.to_pure_dict(nnx.state(module))
      if keep is None:
        return params
      return {p: v for p, v in keymap.flatten(params).items() if p in keep}

    return jax.jit(init_fn, out_shardings=shardings)(rng)

  def with_execution(self, execution) -> "Model":
    """This model run as `execution` says (a `ftjax.models.layers.Execution`).

    Remat, scanning and activation sharding change how the layers run, not
    what they compute: the parameter tree is the same.
    """
    return Model.build(dataclasses.replace(self.config, execution=execution),
                       adapters=self.adapters)

  def apply(self, params: Params, *args, method: str | None = None, **kwargs):
    """Runs the model: `model.apply(params, input_ids, attention_mask, ...)`.

    `method` names another entry point of the family's module, e.g.
    `model.apply(params, features, method="classify")`.
    """
    module = nnx.merge(self.graphdef, params)
    return (module if method is None else getattr(module, method))(*args, **kwargs)

  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))


def _construct(family: Family, config, adapters: tuple, rngs: nnx.Rngs) -> nnx.Module:
  module = family.module(config, rngs=rngs)
  # In order, from the same Rngs: the first adapter's new parameters draw
  # their keys first, so a model with one adapter initialises as it always did.
  for adapter in adapters:
    adapter.inject(module, rngs=rngs)
  return module


def _family(model_type: str | None, where: str) -> Family:
  if model_type not in FAMILIES:
    raise CheckpointError(
        f"model_type {model_type!r} in {where} is not supported; supported model types: "
        f"{', '.join(sorted(FAMILIES))}")
  return FAMILIES[model_type]


def config_from_pretrained(name_or_path: str, *, task: str = "encoder",
                           num_labels: int | None = None, dtype: str = "float32",
                           pooling: str = "pooler"):
  """The ftjax config of a checkpoint, read from its config.json (or GGUF metadata) only."""
  checkpoint = _open_checkpoint(name_or_path)
  return _config(checkpoint, task, num_labels, dtype, pooling)


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
  """Where a checkpoint lives, its config.json contents and how to read its tensors."""

  where: pathlib.Path  # the folder, or the GGUF file
  config_source: str   # what the config was read from, for error messages
  hf_config: dict
  # Opens the tensors lazily: reading a config must not need the weights.
  open_tensors: Callable[[], keymap.TensorSource]


def _is_gguf_path(name_or_path: str) -> bool:
  """A GGUF file, or a path that names one (so a missing file says so, not "no folder")."""
  path = pathlib.Path(name_or_path).expanduser()
  return gguf.is_gguf(path) or (path.suffix.lower() == ".gguf" and not path.is_dir())


def _open_checkpoint(name_or_path: str, *, allow_pickle: bool = False) -> _Checkpoint:
  if _is_gguf_path(name_or_path):
    # The file's metadata is the config and its tensors, dequantised when read,
    # carry Hugging Face names; the memory map is parsed once, here.
    hf_config, tensors = gguf.read_gguf(name_or_path)
    return _Checkpoint(tensors.path, str(tensors.path), hf_config, lambda: tensors)
  folder = hub.resolve(name_or_path)
  return _Checkpoint(folder, str(folder / hub.CONFIG), hub.read_config(folder),
                     lambda: hub.open_weights(folder, allow_pickle=allow_pickle))


def _config(checkpoint: _Checkpoint, task, num_labels, dtype, pooling):
  hf_config = checkpoint.hf_config
  family = _family(hf_config.get("model_type"), checkpoint.config_source)
  if task not in family.architectures:
    raise ConfigError(f"task {task!r} is not supported for {hf_config['model_type']}; "
                      f"expected one of {sorted(family.architectures)}")
  if num_labels is not None and num_labels < 1:
    raise ConfigError(f"num_labels={num_labels}; expected a positive number of classes")
  return family.config_from_hf(hf_config, task=task, num_labels=num_labels, dtype=dtype,
                               pooling=pooling)


@dataclasses.dataclass(frozen=True)
class Loaded:
  model: Model
  params: Params
  # Flat paths initialised here because the checkpoint lacks them (task heads).
  new_paths: tuple[str, ...]


def load_pretrained(name_or_path: str, *, task: str = "encoder", num_labels: int | None = None,
                    dtype: str = "float32", pooling: str = "pooler",
                    allow_pickle: bool = False, seed: int = 0,
                    shardings: Callable[[Model], Params] | None = None,
                    adapters: Iterable = ()) -> Loaded:
  """`from_pretrained`, also saying which parameters are new.

  `shardings(model)` gives a tree of `jax.sharding.Sharding`s shaped like the
  params: checkpoint tensors then go straight from host memory into their
  shards and new heads are initialised already sharded, so no device ever
  holds the whole model.

  `adapters` transform the base weights as they are read (a quantised kernel,
  `ftjax.peft.quant`): the model is `Model.build(config, adapters)`, and each
  adapter's `convert(flat)` runs in order on the host's numpy arrays, before
  anything is put on a device, with the leaves the adapters add present as
  their shapes (`jax.ShapeDtypeStruct`s); leaves no `convert` set are
  initialised. So a quantised base never has its float kernels on a device.
  (Models import no adapter: any object with `inject`, and optionally
  `convert`, will do.)
  """
  checkpoint = _open_checkpoint(name_or_path, allow_pickle=allow_pickle)
  folder = checkpoint.where
  config = _config(checkpoint, task, num_labels, dtype, pooling)
  adapters = tuple(adapters)
  base = Model.build(config)
  # Built before any tensor is read: an adapter that cannot fit the model fails first.
  model = Model.build(config, adapters=adapters) if adapters else base
  table = model.family.table
  flat_shapes = {p: tuple(x.shape) for p, x in keymap.flatten(base.abstract_params).items()}
  tensors = checkpoint.open_tensors()
  filled, skipped = keymap.import_params(table, tensors, flat_shapes, source=str(folder))

  missing = [p for p in flat_shapes if p not in filled]
  required = [p for p in missing if not table.match_flax(p, task_model=False)[1].optional]
  if required:
    prefixed = any(name.startswith(table.prefix) for name in tensors)
    names = [table.match_flax(p, task_model=prefixed)[0] for p in required]
    more = f" (and {len(required) - 1} more)" if len(required) > 1 else ""
    raise CheckpointError(f"{folder} is missing tensor {names[0]!r} for parameter "
                          f"{required[0]!r}{more}")
  if skipped:
    logging.info("Not used by this model (task=%s): %s", task, ", ".join(skipped))
  flat_shardings = keymap.flatten(shardings(model)) if shardings else {}
  base_shardings = keymap.flatten(shardings(base)) if shardings and adapters else flat_shardings
  flat = {p: np.asarray(x, np.float32) for p, x in filled.items()}
  if missing:
    logging.warning("Newly initialized (not in the checkpoint; train them before use): %s",
                    ", ".join(missing))
    flat.update(base.init(jax.random.key(seed), only=missing,
                          shardings={p: base_shardings[p] for p in missing}
                          if base_shardings else None))
  if adapters:
    flat = _convert(model, flat, adapters, seed,
                    {p: s for p, s in flat_shardings.items() if p not in flat_shapes})
  flat = {p: jax.device_put(x, flat_shardings.get(p)) for p, x in flat.items()}
  return Loaded(model, keymap.unflatten(flat, model.abstract_params), tuple(missing))


def _convert(model: Model, flat: dict, adapters: tuple, seed: int, shardings: dict) -> dict:
  """`flat` (the base model's parameters) with `adapters`' `convert`s applied on the
  host, and the adapters' leaves none of them set initialised (see `load_pretrained`)."""
  abstract = keymap.flatten(model.abstract_params)
  flat = {**{p: x for p, x in abstract.items() if p not in flat}, **flat}
  for adapter in adapters:
    if hasattr(adapter, "convert"):
      flat = adapter.convert(flat)
  unset = [p for p, x in flat.items() if isinstance(x, jax.ShapeDtypeStruct)]
  flat = {p: x for p, x in flat.items() if p not in unset}
  if unset:
    flat.update(model.init(jax.random.key(seed), only=unset,
                           shardings={p: shardings[p] for p in unset} if shardings else None))
  if set(flat) != set(abstract):
    odd = sorted(set(flat) ^ set(abstract))
    raise ValueError(f"adapters {', '.join(a.name for a in adapters)} leave parameters that "
                     f"the adapted model does not have (or lack ones it has): {odd[:3]}")
  return flat


def from_pretrained(name_or_path: str, *, task: str = "encoder", num_labels: int | None = None,
                    dtype: str = "float32", pooling: str = "pooler",
                    allow_pickle: bool = False, seed: int = 0) -> tuple[Model, Params]:
  """Loads a Hugging Face checkpoint as (Model, params).

  `name_or_path` is a local folder, a hub id or a GGUF file (a Llama-family
  model, dequantised to float32 as it is read). Every checkpoint tensor must
  map to a parameter (or be a known unused one, such as a pre-training head),
  and every parameter must be filled, except task heads the checkpoint lacks,
  which are initialised from `seed` and reported in one log line.
  """
  loaded = load_pretrained(name_or_path, task=task, num_labels=num_labels, dtype=dtype,
                           pooling=pooling, allow_pickle=allow_pickle, seed=seed)
  return loaded.model, loaded.params


def save_pretrained(params: Params, config, out_dir: str | os.PathLike) -> pathlib.Path:
  """Writes `config.json` + `model.safetensors` that transformers (PyTorch) loads.

  Both files are written to temporary names and renamed into place, so an
  interrupted export never leaves a half-written checkpoint behind.
  """
  family = _family(config.model_type, "the config")
  heads.check_export(config)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  flat = {p: np.asarray(jax.device_get(x), dtype=np.float32)
          for p, x in keymap.flatten(params).items()}
  tensors = keymap.export_params(family.table, flat, task_model=config.task not in BASE_TASKS)
  hf_config = config.to_hf()
  hf_config["architectures"] = [family.architectures[config.task]]
  hf_config["dtype"] = "float32"
  files.atomic_write(out / hub.SAFETENSORS,
                     lambda path: save_file(tensors, path, metadata={"format": "pt"}))
  files.atomic_write_text(out / hub.CONFIG,
                          json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return out


def load_tokenizer(name_or_path: str):
  """The checkpoint's tokenizer, via `transformers.AutoTokenizer` (no remote code).

  A GGUF file carries its own tokenizer, which transformers rebuilds from the
  file's metadata.
  """
  if _is_gguf_path(name_or_path):
    return gguf.load_gguf_tokenizer(name_or_path)
  import transformers  # pylint: disable=g-import-not-at-top
  folder = hub.resolve(name_or_path)
  try:
    return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"no usable tokenizer in {folder}: {str(e).splitlines()[0]}") from None


_LAYER_PATH = re.compile(r"(?P<stack>(?:.*/)?layers)/(?P<index>\d+)/(?P<rest>.*)")


def keep_layers(model: Model, params: Params, layers: Iterable[int], *,
                where: str = "the checkpoint") -> tuple[Model, Params]:
  """The model cut to `layers` of its layer stack (renumbered 0, 1, ...), other weights kept.

  DistilBERT's initialisation of a student from its teacher ("one layer of
  two": `layers=(0, 2, 4)` of a 6-layer model). Per-layer config entries
  (a decoder's `layer_types`) are cut the same way.
  """
  layers = tuple(layers)
  n = model.config.num_layers
  if (not layers or len(set(layers)) != len(layers) or list(layers) != sorted(layers)
      or layers[0] < 0 or layers[-1] >= n):
    raise ConfigError(f"config key 'model.layers' is {layers!r}; expected increasing layer "
                      f"indices in [0, {n}) of {where} ({n} layers)")
  updates = {"num_layers": len(layers)}
  if getattr(model.config, "layer_types", ()):
    updates["layer_types"] = tuple(model.config.layer_types[i] for i in layers)
  # Adapters (a quantised base loaded with the checkpoint) are built again on
  # the cut model; their parameters must then be the kept layers' own.
  cut = Model.build(dataclasses.replace(model.config, **updates), adapters=model.adapters)
  new_index = {old: new for new, old in enumerate(layers)}
  flat = {}
  for path, value in keymap.flatten(params).items():
    match = _LAYER_PATH.fullmatch(path)
    if match is None:
      flat[path] = value
    elif int(match["index"]) in new_index:
      flat[f"{match['stack']}/{new_index[int(match['index'])]}/{match['rest']}"] = value
  expected = set(keymap.flatten(cut.abstract_params))
  if set(flat) != expected:
    odd = sorted(set(flat) ^ expected)
    raise ValueError(f"keep_layers: the adapters {', '.join(a.name for a in model.adapters)} "
                     f"do not fit the cut model the same way ({odd[:3]}); cut it before "
                     f"adding them")
  return cut, keymap.unflatten(flat, cut.abstract_params)
