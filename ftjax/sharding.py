"""Device mesh and shardings from the config.

The mesh has axes `data`, `fsdp` and `tensor` (`config.mesh`). Models name
their parameters' axes logically (`embed`, `heads`, `mlp`, ...);
`config.mesh.rules` maps those names to mesh axes (t5x-style), so data
parallel, FSDP and tensor parallel are config changes, not model changes.

A dimension whose size the mesh axes do not divide (a 2-class classifier on a
4-way tensor axis) stays replicated, and that is logged once per parameter:
a rule never silently does nothing.
"""

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax.config import MESH_AXES
from ftjax.errors import ConfigError
from ftjax.models import keymap


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = [config.mesh[axis] for axis in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if -1 in sizes:
    if len(devices) % fixed:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the "
                        f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                      f"but there are {len(devices)}")
  device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES)


def _rules(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  rules = {}
  for logical, mesh_axes in config.mesh.rules:
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ConfigError(f"mesh rule ({logical!r}, {mesh_axes!r}) names mesh axis {unknown[0]!r}; "
                        f"expected axes from {MESH_AXES}")
    rules[logical] = axes
  return rules


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]], *, name: str = "") -> PartitionSpec:
  """Logical axis names of one array -> its PartitionSpec on `mesh`.

  A mesh axis shards at most one dimension (the first that asks for it); a
  dimension takes the longest prefix of its rule's mesh axes that divides its
  size. What a rule asked for but could not get is logged.
  """
  spec, used = [], set()
  for logical, size in zip(axes, shape, strict=True):
    wanted = tuple(a for a in rules.get(logical, ()) if mesh.shape[a] > 1)
    free = tuple(a for a in wanted if a not in used)
    mesh_axes = free
    while mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
      mesh_axes = mesh_axes[:-1]
    if mesh_axes != wanted:
      logging.info("%s: dim %r (size %d) sharded over %s instead of %s (axis already used or "
                   "size not divisible)", name, logical, size, mesh_axes or "nothing", wanted)
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return PartitionSpec(*spec)


def param_shardings(config: ml_collections.ConfigDict, mesh: Mesh, abstract_params: Mapping,
                    param_axes: Mapping[str, tuple[str, ...]]) -> dict:
  """A NamedSharding for every parameter, as a tree shaped like `abstract_params`."""
  rules = _rules(config)
  flat = keymap.flatten(abstract_params)
  shardings = {path: NamedSharding(mesh, logical_to_spec(param_axes[path], x.shape, mesh, rules,
                                                         name=path))
               for path, x in flat.items()}
  return keymap.unflatten(shardings, abstract_params)


def batch_sharding(config: ml_collections.ConfigDict, mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the mesh axes the `batch` rule names."""
  axes = tuple(a for a in _rules(config).get("batch", ()) if mesh.shape[a] > 1)
  return NamedSharding(mesh, PartitionSpec(axes or None))


ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


def activation_sharding(config: ml_collections.ConfigDict, mesh: Mesh) -> NamedSharding:
  """The (batch, length, embed) hidden state's sharding at layer boundaries, from the rules.

  The default rules split the batch like the input batch and replicate the
  rest (the layout data parallel, FSDP and Megatron-style tensor parallelism
  all want between layers); a rule for `activation_length` gives sequence
  parallelism.
  """
  rules = _rules(config)
  spec, used = [], set()
  for logical in ACTIVATION_AXES:
    axes = tuple(a for a in rules.get(logical, ()) if mesh.shape[a] > 1 and a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return NamedSharding(mesh, PartitionSpec(*spec))


def data_parallel_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in _rules(config).get("batch", ()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's rows of a global batch -> global jax.Arrays (multi-host safe).

  Process p reads rows [p*b, (p+1)*b) of every global batch of P*b rows
  (`ftjax.data.pipeline`); the batch sharding must give p's devices exactly
  those rows (`check_process_rows`). The global shape is passed explicitly:
  inferred, a batch replicated over processes would silently become a
  different b-row batch on each process.
  """
  out = {}
  for key, local in batch.items():
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    check_process_rows(sharding, global_shape[0])
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


@functools.lru_cache(maxsize=64)
def check_process_rows(sharding: NamedSharding, num_rows: int,
                       process_of: Callable[[jax.Device], int] | None = None) -> None:
  """Raises unless each process's devices hold exactly its own rows of a batch.

  True when the mesh's batch axes split the processes in order (the default
  meshes, over `jax.devices()`, do); false when, say, a tensor axis spans
  the processes and the batch is replicated over them, as each process would
  need the rows another one reads. `process_of` (device -> process index)
  lets a test pretend a single process is many.
  """
  process_of = process_of or (lambda device: device.process_index)
  processes = sorted({process_of(d) for d in sharding.device_set})
  if len(processes) == 1:
    return
  local = num_rows // len(processes)
  needed: dict[int, set[int]] = {p: set() for p in processes}
  for device, index in sharding.devices_indices_map((num_rows,)).items():
    needed[process_of(device)].update(range(num_rows)[index[0]])
  for p in processes:
    own = set(range(p * local, (p + 1) * local))
    if needed[p] != own:
      rows = sorted(needed[p])
      raise ConfigError(
          f"mesh {dict(sharding.mesh.shape)} with batch spec {sharding.spec} gives process {p} "
          f"{len(rows)} rows ({rows[0]}..{rows[-1]}) of each {num_rows}-row batch, but it reads "
          f"rows {p * local}..{(p + 1) * local - 1}; split the batch over the processes (put the "
          f"devices of different processes along mesh.data or mesh.fsdp)")
