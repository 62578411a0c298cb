"""Orbax checkpoints of a run: what cannot be re-derived, and nothing else.

A checkpoint holds the trainable parameters (the model's and the
objective's), the optimizer state, the step and the data iterator's state,
plus (as JSON) the base model it was trained from, the partition and the
run's identity. The dropout key is not saved: it is derived from the seed and
folded with the step inside the train step, so the seed reproduces it. Frozen parameters are not
saved: they are the base model's, re-read from `base_model` on restore, so a
LoRA checkpoint is megabytes, not the whole model.

Which checkpoints stay (an orbax preservation policy): the latest
`checkpoint.max_to_keep`, plus the best by `eval.metric` when
`checkpoint.keep_best`, plus always the newest verified one (so a newer
checkpoint without its manifest yet never costs the last good one). Saves are
asynchronous; orbax writes each step to a temporary folder and renames it when
complete, so a crash mid-save never leaves a checkpoint that looks finished.

Integrity: once orbax has finalised a step, `<step>/ftjax_manifest.json`
records every file's size and blake2b digest (written atomically). Before a
checkpoint is restored it is verified against its manifest (`verify`):
a file truncated, changed or missing since it was written makes it damaged.
A checkpoint without a manifest (written before ftjax recorded them, or by a
process killed between orbax's rename and the manifest) restores with a log
line saying it could not be verified. `checkpoint.verify=False` skips the
check (for very large checkpoints) and logs that it did.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from absl import logging

from ftjax import files
from ftjax.errors import CheckpointError, ConfigError

MANIFEST = "ftjax_manifest.json"
_CHUNK = 1 << 22


def _digest(path: pathlib.Path) -> str:
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: pathlib.Path) -> None:
  """`<step_dir>/ftjax_manifest.json`: every file's size and blake2b digest."""
  step_dir = pathlib.Path(step_dir)
  entries = {p.relative_to(step_dir).as_posix(): {"bytes": p.stat().st_size, "blake2b": _digest(p)}
             for p in _files(step_dir)}
  files.atomic_write_text(step_dir / MANIFEST, json.dumps(
      {"format": 1, "algorithm": "blake2b-128", "files": entries}, indent=1, sort_keys=True) + "\n")


def verify(step_dir: pathlib.Path) -> str | None:
  """Why the checkpoint at `step_dir` is damaged, or None if every file matches its manifest.

  Raises `FileNotFoundError` when there is no manifest (an unverifiable checkpoint).
  """
  step_dir = pathlib.Path(step_dir)
  try:
    manifest = json.loads((step_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
  except FileNotFoundError:
    raise
  except (ValueError, KeyError, OSError) as e:
    return f"its manifest {MANIFEST} is unreadable ({type(e).__name__})"
  for name, entry in sorted(manifest.items()):
    path = step_dir / name
    if not path.is_file():
      return f"file {name} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
      return f"file {name} has {size} bytes, {entry['bytes']} when written"
    if _digest(path) != entry["blake2b"]:
      return f"file {name} has changed since it was written (blake2b differs)"
  return None


class LatestVerified:
  """An orbax preservation policy: keep the newest checkpoint that has a manifest."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    verified = [c.step for c in checkpoints
                if (self.directory / str(c.step) / MANIFEST).is_file()]
    newest = max(verified, default=None)
    return [c.step == newest for c in checkpoints]


class Checkpointer:
  """`workdir/checkpoints/<step>/{state,meta}`."""

  def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict,
               read_only: bool = False):
    """`read_only` for readers beside a training job (an evaluator): they never
    create, clean up or delete anything."""
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.verify_enabled = config.checkpoint.get("verify", True)
    self.read_only = read_only
    self._pending: list[int] = []  # saved steps whose manifest is not written yet
    policies = [pp.LatestN(config.checkpoint.max_to_keep), LatestVerified(self.directory)]
    if config.checkpoint.keep_best:
      metric = config.eval.metric
      policies.append(pp.BestN(get_metric_fn=lambda metrics: metrics[metric],
                               reverse=config.eval.mode == "min", n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True, create=not read_only,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Starts an async save of `state` (a pytree of arrays) and `meta` (JSON).

    A failed write (a full disk), of this save or of the previous one still
    finishing in the background, raises a one-line `CheckpointError`.
    """
    with self._write_errors():
      self._finish_pending()
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)),
                        metrics=metrics)
    self._pending.append(step)

  def _finish_pending(self) -> None:
    """Waits for the saves in flight, then writes their manifests (process 0)."""
    self.manager.wait_until_finished()
    if not self._pending:
      return
    if jax.process_index() == 0:
      for step in self._pending:
        step_dir = self.directory / str(step)
        if step_dir.is_dir():
          write_manifest(step_dir)
    self._pending = []

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def check(self, step: int) -> str | None:
    """Why checkpoint `step` is damaged, or None when it verifies (or cannot: logged)."""
    step_dir = self.directory / str(step)
    if not self.verify_enabled:
      logging.info("checkpoint.verify=False: %s restored without verifying it", step_dir)
      return None
    started = time.perf_counter()
    try:
      problem = verify(step_dir)
    except FileNotFoundError:
      logging.warning("%s has no integrity manifest (written before ftjax recorded them, or "
                      "interrupted before it was written): restoring it unverified", step_dir)
      return None
    if problem is None:
      logging.info("verified %s in %.2f s", step_dir, time.perf_counter() - started)
    return problem

  def move_aside(self, step: int) -> pathlib.Path:
    """Renames a damaged checkpoint to `<step>.corrupt-<time>` (never deleted); returns it."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"ftjax_move_aside_{step}")
    self.manager.reload()
    return target

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto `abstract_state`'s shapes and shardings (any mesh)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    with self._write_errors():
      self._finish_pending()

  @contextlib.contextmanager
  def _write_errors(self):
    """OS errors of a save -> one line. Orbax renames a checkpoint into place only
    once complete, so the ones already saved are intact."""
    try:
      yield
    except (OSError, ValueError) as e:
      reason = _os_error(e)
      if reason is None:
        raise
      raise CheckpointError(
          f"could not write a checkpoint under {self.directory} ({reason}); expected a "
          f"writable folder with free space. The saved checkpoints "
          f"{sorted(self.manager.all_steps())} are intact: free space and rerun the same "
          f"command to resume") from None

  def close(self) -> None:
    self.manager.close()


def _os_error(error: Exception) -> str | None:
  """What the OS said ("No space left on device"), or None for errors that are bugs."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  # TensorStore reports a failed write as ValueError("... [os_error_code='28']").
  match = re.search(r"os_error_code='?(\d+)", str(error))
  return os.strerror(int(match.group(1))) if match else None


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings, the restore target for `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def find(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """A run's workdir (its latest checkpoint) or `<workdir>/checkpoints/<step>` -> (workdir, step)."""
  path = pathlib.Path(path).absolute()
  if path.name.isdigit() and path.parent.name == "checkpoints":
    workdir, step = path.parent.parent, int(path.name)
  elif (path / "checkpoints").is_dir():
    workdir, step = path, ocp.CheckpointManager(
        path / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)).latest_step()
  else:
    raise FileNotFoundError(path)
  if step is None or not (workdir / "checkpoints" / str(step)).is_dir():
    raise FileNotFoundError(workdir / "checkpoints" / str(step))
  return workdir, step


def read_trainable(workdir: pathlib.Path, step: int) -> dict:
  """The saved trainable leaves as a flat {path: np.ndarray}, whatever mesh wrote them.

  The checkpoint is verified first: a damaged one is a one-line `CheckpointError`.
  """
  from ftjax.models import keymap  # pylint: disable=g-import-not-at-top
  step_dir = pathlib.Path(workdir) / "checkpoints" / str(step)
  try:
    problem = verify(step_dir)
  except FileNotFoundError:
    logging.warning("%s has no integrity manifest: read unverified", step_dir)
    problem = None
  if problem is not None:
    raise CheckpointError(f"checkpoint {step_dir} is damaged ({problem}); expected an intact "
                          f"checkpoint: pick another step of that run")
  manager = ocp.CheckpointManager(workdir / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  metadata = manager.item_metadata(step)["state"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return {path: np.asarray(value)
          for path, value in keymap.flatten(restored["state"]["trainable"]).items()}


def select_steps(checkpointer: Checkpointer, which: str) -> list[int]:
  """Saved steps picked by `which`: all | latest | best | comma-separated steps."""
  steps = sorted(checkpointer.manager.all_steps())
  if which == "all":
    return steps
  if which == "latest":
    return steps[-1:]
  if which == "best":
    best = checkpointer.manager.best_step()
    return [] if best is None else [best]
  try:
    wanted = [int(s) for s in which.split(",")]
  except ValueError:
    raise ConfigError(f"checkpoints {which!r}; expected all, latest, best or steps such as "
                      f"300,600") from None
  missing = [s for s in wanted if s not in steps]
  if missing:
    raise ConfigError(f"checkpoints {which!r}: no checkpoint at step {missing[0]}; the "
                      f"workdir has steps {steps}")
  return wanted
