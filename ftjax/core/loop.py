"""The training loop: `train_and_evaluate(config, workdir)` and the `Loop` it runs.

Order of a run:
  1. Take the workdir's lock (one run per workdir; `ftjax.workdir_lock`).
  2. Build the run (`ftjax.core.run.setup`): model, adapters, partition,
     data, state; the objective comes from the config.
  3. Resume, in this order: (a) check the latest complete checkpoint belongs
     to this config; (b) restore the trainable parameters (the model's and
     the objective's), optimizer state and step; (c) frozen parameters are
     the base model's, already loaded; (d) the data iterator's position;
     (e) evaluation bookkeeping. The dropout key is not saved: it is the
     seed's, folded with the step inside the train step.
  4. Step: one jitted `train_step` per global batch; the hooks
     (`ftjax.core.hooks`) log, evaluate, checkpoint, early-stop, stop on
     pre-emption and show progress.
"""

import json
import pathlib
import resource
import signal
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ftjax import checkpoint as checkpoint_lib
from ftjax import config as config_lib
from ftjax import files, logs
from ftjax import workdir_lock as lock
from ftjax.core import compile_cache, compiled, hooks as hooks_lib, run as run_lib
from ftjax.core import state as state_lib
from ftjax.errors import CheckpointError


def run_identity(config: ml_collections.ConfigDict, sources: Mapping | None = None) -> dict:
  """What a checkpoint must agree on to be resumed by this config.

  `sources` (`Run.identity`) adds what identifies loaded weights beyond the
  config: the step of a run a model or teacher came from, a teacher's source.
  """
  identity = {"model.name_or_path": config.model.name_or_path, "model.task": config.model.task,
              "model.num_labels": config.model.num_labels, "model.pooling": config.model.pooling,
              "strategy": json.loads(config.strategy.to_json_best_effort()),
              "training.batch_size": config.training.batch_size, "seed": config.seed,
              "init_from": config.init_from}
  if config.objective.name:  # Runs from before objectives existed did not record one.
    identity["objective"] = json.loads(config.objective.to_json_best_effort())
  if config.model.layers:  # Keys of newer options only when used: older checkpoints resume.
    identity["model.layers"] = list(config.model.layers)
  identity.update(json.loads(json.dumps(dict(sources or {}))))
  return identity


def check_identity(saved: dict, config: ml_collections.ConfigDict, where,
                   sources: Mapping | None = None) -> None:
  for key, value in run_identity(config, sources).items():
    if key == "strategy" and isinstance(saved.get(key), dict):
      # Keys added to the strategy group since the checkpoint was written
      # (e.g. `adapters`) count as their defaults.
      saved = {**saved, key: {**{k: value[k] for k in value if k not in saved[key]},
                              **saved[key]}}
    if saved.get(key) != value:
      raise CheckpointError(
          f"{where} holds a checkpoint of another run ({key} was {saved.get(key)!r}, the config "
          f"says {value!r}); use a new --workdir, or the old config to resume")


class Loop:
  """One invocation of a run's training loop (see the module docstring)."""

  def __init__(self, run: run_lib.Run, workdir: pathlib.Path, hooks: Sequence[hooks_lib.Hook],
               rng: jax.Array):
    self.run, self.config, self.workdir, self.hooks = run, run.config, workdir, list(hooks)
    self.rng, self.state = rng, run.initial_state
    self.checkpointer = checkpoint_lib.Checkpointer(workdir, run.config)
    self.tracker, self.last_eval = hooks_lib.Tracker(run.config), {}
    self.iterator = run.data.train_iterator(run.steps.total)
    self.window: list[dict] = []  # host metrics of the steps since the last log row
    self.window_start = 0.0  # when the window's first step started (time.perf_counter)
    self.metrics: dict = {}  # this step's host metrics, while the hooks run
    self.stop_reason: str | None = None  # "preempted" | "asked" | "early"
    self.save_requested = False
    self.eval_results: dict | None = None
    self.batch = None
    self.writer = self.progress = self.train_step = self.eval_step = None
    self.start_step = self._resume()
    self.step = int(self.state.step)

  def _resume(self) -> int | None:
    """Restores the newest intact checkpoint; returns its step (None: a fresh run).

    A checkpoint that fails verification, or fails to restore, is moved
    aside (`<step>.corrupt-<time>`, never deleted) with one log line, and the
    previous one is tried. A workdir whose checkpoints are all damaged stops
    the run: it never silently starts again from scratch.
    """
    moved = []
    for step in reversed(self.checkpointer.steps()):
      where = self.checkpointer.directory / str(step)
      problem = self.checkpointer.check(step)
      if problem is None:
        try:
          meta = self.checkpointer.read_meta(step)
        except Exception as e:  # pylint: disable=broad-except
          problem = f"its metadata does not read ({_first_line(e)})"
      if problem is None:
        # Another run's checkpoint is the user's mistake, not damage: stop.
        check_identity(meta["run"], self.config, where, self.run.identity)
        try:
          saved, meta = self.checkpointer.restore(
              step, checkpoint_lib.abstract(state_lib.checkpointed(self.state)))
        except Exception as e:  # pylint: disable=broad-except
          problem = f"it does not restore ({_first_line(e)})"
      if problem is not None:
        target = self.checkpointer.move_aside(step)
        moved.append(target.name)
        logging.warning("checkpoint %s is damaged (%s): moved aside to %s; trying the previous "
                        "one", where, problem, target)
        continue
      self.state = self.state.replace(**saved)
      self.iterator.set_state(meta["data_iterator"])
      self.tracker = hooks_lib.Tracker(self.config, meta["tracker"])
      self.last_eval = meta["last_eval"]
      logging.info("Resumed from %s at step %d", where, step)
      return step
    if moved:
      raise CheckpointError(
          f"no intact checkpoint in {self.checkpointer.directory}: damaged ones moved aside "
          f"({', '.join(moved)}); expected one to resume from. Move a copy back, or use a new "
          f"--workdir to start again")
    return None

  @property
  def finished(self) -> bool:
    return self.step >= self.run.steps.total or self.tracker.should_stop

  def preemption_signal(self) -> int:
    """The signal that stopped the run (SIGTERM or SIGINT)."""
    watch = next((h.watch for h in self.hooks if isinstance(h, hooks_lib.StopRequests)), None)
    return watch.signum if watch is not None and watch.signum else signal.SIGTERM

  def stop(self, reason: str) -> None:
    if self.stop_reason is None:
      self.stop_reason = reason

  def fingerprint(self) -> int:
    """A checksum of the token ids this process fed last, to compare data order across runs."""
    batch = self.batch
    arrays = [batch["input_ids"]] if "input_ids" in batch else [batch[k] for k in sorted(batch)]
    value = 0
    for array in arrays:
      value = zlib.crc32(np.ascontiguousarray(array).tobytes(), value)
    return value

  def save(self, step: int) -> None:
    meta = {"data_iterator": self.iterator.get_state(),
            "run": run_identity(self.config, self.run.identity),
            "base_model": self.config.model.name_or_path, "strategy": self.config.strategy.name,
            "tracker": self.tracker.state(), "last_eval": self.last_eval}
    self.checkpointer.save(step, state_lib.checkpointed(self.state), meta,
                           metrics=self.eval_results)

  def fit(self, summary: dict) -> None:
    """Steps to the end (or a stop), with the hooks; then closes everything."""
    self.writer = logs.MetricWriter(self.workdir, resume_step=self.start_step)
    try:
      if self.start_step is None:
        self.writer.write(0, summary)
      self.train_step, self.eval_step = compiled.compile_steps(self.run)
      for hook in self.hooks:
        hook.on_start(self)
      pending = None  # (step, metrics) of the step in flight: read one step late
      self.window_start = time.perf_counter()
      while self.step < self.run.steps.total:
        self.batch = next(self.iterator)
        self.state, step_metrics = self.train_step(
            self.state, self.run.device_batch(self.config.data.train_split, self.batch),
            self.rng)
        self.step += 1
        if pending is not None:
          self.window.append(hooks_lib.host_metrics(*pending))
        pending = (self.step, step_metrics)
        due = [hook.due(self, self.step) for hook in self.hooks]
        if not any(due):
          continue
        # Sync with this step before anything is logged, evaluated or saved: a
        # non-finite step stops the run here, before it reaches a checkpoint.
        self.metrics = hooks_lib.host_metrics(*pending)
        self.window.append(self.metrics)
        pending, self.eval_results, self.save_requested = None, None, False
        for hook, hook_due in zip(self.hooks, due):
          hook.on_step(self, self.step, hook_due)
        if self.stop_reason is not None:
          self._log_stop()
          break
    finally:
      try:
        for hook in reversed(self.hooks):
          hook.on_end(self)
      finally:
        self.checkpointer.wait()
        self.checkpointer.close()
        self.writer.close()

  def _log_stop(self) -> None:
    if self.tracker.should_stop:
      t = self.tracker
      logging.info("Early stopping at step %d: %s has not improved for %d evaluations "
                   "(best %.4f at step %d)", self.step, t.metric, t.stale, t.best, t.best_step)
    else:
      logging.info("Stopping at step %d %s; run the same command to continue", self.step,
                   "on SIGTERM or Ctrl-C, with a checkpoint"
                   if self.stop_reason == "preempted" else "as asked")


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None, devices=None,
                       hooks: Sequence[hooks_lib.Hook] | None = None) -> dict[str, Any]:
  """Fine-tunes as the config says; returns the final evaluation metrics.

  `stop_at_step` ends this invocation (with a checkpoint) once that step is
  reached; running the same command again continues the run. A finished run
  is not trained again.
  """
  workdir_path = pathlib.Path(workdir)
  with lock.hold(workdir_path), compile_cache.CompileStats() as compile_stats:
    return _train(config, workdir_path, stop_at_step=stop_at_step, devices=devices,
                  hooks=hooks, compile_stats=compile_stats)


def _train(config, workdir: pathlib.Path, *, stop_at_step, devices, hooks,
           compile_stats: compile_cache.CompileStats) -> dict[str, Any]:
  started = time.perf_counter()
  is_chief = jax.process_index() == 0
  run = run_lib.setup(config, devices, feature_cache_dir=workdir / "feature_cache",
                      workdir=workdir)
  config = run.config
  summary = run_lib.partition_summary(run)
  steps = run.steps
  logging.info("steps: %s; buckets: %s; mesh: %s", steps, run.buckets, dict(run.mesh.shape))
  loop = Loop(run, workdir, hooks_lib.default_hooks(stop_at_step) if hooks is None else hooks,
              rng=jax.random.key(config.seed))
  if loop.start_step is None and is_chief:
    config_lib.save_run_config(workdir, config)
  if loop.finished or (stop_at_step or float("inf")) <= loop.step:
    logging.info("Nothing to train: the checkpoint is at step %d of %d%s", loop.step,
                 steps.total, " (early-stopped)" if loop.tracker.should_stop else "")
    loop.checkpointer.close()
    return loop.last_eval
  loop.fit(summary)
  logging.info("XLA compilation: %.1f s; %d programs loaded from the persistent cache, %d "
               "compiled", compile_stats.backend_seconds, compile_stats.cache_hits,
               compile_stats.cache_misses)
  if is_chief and loop.finished:
    write_results(workdir, loop, {**summary, **compile_stats.summary()},
                  wall_seconds=time.perf_counter() - started)
  if loop.stop_reason == "preempted":
    signum = loop.preemption_signal()
    raise hooks_lib.Preempted(
        f"{'interrupted (Ctrl-C)' if signum == signal.SIGINT else 'pre-empted (SIGTERM)'} at "
        f"step {loop.step} of {steps.total}; checkpoint "
        f"{loop.checkpointer.directory / str(loop.step)} is saved; run the same command to "
        f"continue", signum)
  return loop.last_eval


def write_results(workdir: pathlib.Path, loop: Loop, summary: Mapping,
                  wall_seconds: float) -> None:
  """`results.json`: the final metrics, the best evaluation and the run's speed."""
  seconds_per_step = [r["train/seconds_per_step"] for r in logs.read_metrics(workdir)
                      if "train/seconds_per_step" in r]
  t = loop.tracker
  files.atomic_write_text(workdir / "results.json", json.dumps(
      {"step": loop.step, **summary, **loop.last_eval,
       "best": {"metric": t.metric, "value": t.best, "step": t.best_step, **t.best_results},
       # Median over log windows: compiles and evaluations fall in a few of them.
       "train/median_seconds_per_step": float(np.median(seconds_per_step)),
       **peak_memory(), "wall_seconds": wall_seconds}, indent=2) + "\n")


def peak_memory() -> dict:
  """The process's peak resident memory, and the devices' peak bytes where they report it
  (GPU/TPU; a CPU device does not)."""
  out = {"memory/peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  if all("peak_bytes_in_use" in s for s in stats):
    out["memory/peak_device_bytes"] = max(s["peak_bytes_in_use"] for s in stats)
  return out
