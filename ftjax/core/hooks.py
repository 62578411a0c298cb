"""What the loop does besides stepping, one hook each: stop requests, logging, evaluation
with keep-best and early stopping, checkpoints, progress.

A hook is asked once per step whether it acts (`due`); if any is, the loop
first brings that step's metrics to the host (and stops on a non-finite
loss, before anything is logged, evaluated or saved), then calls every hook's
`on_step(loop, step, due)` in order. Order matters and is fixed by
`default_hooks`: stop requests first (so the checkpoint hook sees them),
then logging, evaluation (which may ask for a keep-best checkpoint or an
early stop), then the checkpoint.
"""

import math
import os
import signal
import threading
import time
from collections.abc import Mapping

import jax
import numpy as np
import tqdm
from absl import logging

from ftjax.core import compiled


class Hook:
  """Base hook: does nothing."""

  def on_start(self, loop) -> None:
    """After resume, before the first step of this invocation."""

  def due(self, loop, step: int) -> bool:
    """Whether this hook acts after `step` (called exactly once per step)."""
    del loop, step
    return False

  def on_step(self, loop, step: int, due: bool) -> None:
    """After `step`, when some hook is due (its metrics are on the host)."""

  def on_end(self, loop) -> None:
    """Always, when the loop ends (normally, on a stop, or on an error)."""


class Preempted(Exception):
  """The run stopped on SIGTERM or Ctrl-C after saving a checkpoint at the current step."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.signum = signum


class PreemptionWatch:
  """Turns SIGTERM, or Ctrl-C (SIGINT), into "checkpoint at the end of this step, then stop".

  The handler only sets a flag (a signal may arrive anywhere, e.g. inside an
  XLA call or an orbax write); the loop reads it after every step. A second
  Ctrl-C exits at once, as a kill would (the last complete checkpoint stays as
  it is). Hosts must agree on the step they stop at: with several
  processes, JAX's preemption sync point (the distributed runtime's SIGTERM
  notice) decides, or else the flags are all-gathered at checkpoint steps.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, every: int):
    self._flag = threading.Event()
    self._every = every
    self._previous = {}
    self.signum: int | None = None  # the first signal received
    # Multi-host: whether the runtime has a preemption service (known after the first step).
    self._sync_point: bool | None = None
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self._flag.is_set():
      _exit_now()
    if self.signum is None:
      self.signum = signum
    self._flag.set()
    if signum == signal.SIGINT:  # os.write: logging is not safe inside a signal handler
      os.write(2, b"ftjax: Ctrl-C: saving a checkpoint at the end of this step, then "
                  b"stopping (Ctrl-C again to stop at once)\n")

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if self._sync_point is not False:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
        self._sync_point = True
      except RuntimeError:  # No preemption service in this runtime: asked once.
        self._sync_point = False
    # Flags the runtime does not see (Ctrl-C; SIGTERM without its service) at
    # checkpoint steps, where every process asks at the same step.
    if step % self._every:
      return False
    return bool(multihost_utils.process_allgather(np.asarray(self._flag.is_set())).any())

  def close(self) -> None:
    for sig, previous in self._previous.items():
      # Stopping on a signal: a Ctrl-C during the rest of the teardown still exits at once.
      stopping = sig == signal.SIGINT and self._flag.is_set()
      signal.signal(sig, (lambda *_: _exit_now()) if stopping else previous)
    self._previous = {}


def _exit_now() -> None:
  """The second Ctrl-C: exit without unwinding (as a kill would; checkpoints are written
  to temporary folders and renamed when complete, so the last complete one stays)."""
  os.write(2, b"ftjax: interrupted (Ctrl-C) without a new checkpoint; the last complete one "
              b"is kept; run the same command to continue from it\n")
  os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access


class StopRequests(Hook):
  """SIGTERM (pre-emption) and `--stop_at_step`: checkpoint this step, then stop."""

  def __init__(self, stop_at_step: int | None):
    self.stop_at_step = stop_at_step
    self.watch = None

  def on_start(self, loop) -> None:
    self.watch = PreemptionWatch(loop.run.steps.checkpoint_every)

  def due(self, loop, step):
    if self.watch.reached(step):
      loop.stop("preempted")
    elif self.stop_at_step is not None and step >= self.stop_at_step:
      loop.stop("asked")
    return loop.stop_reason is not None

  def on_end(self, loop) -> None:
    if self.watch is not None:
      self.watch.close()


class Logging(Hook):
  """Every `training.log_every_steps` and at the end: the mean of the window's metrics.

  The window (its steps' host metrics and its clock) is the loop's: it starts
  when the first step of this invocation does and restarts after each row.
  """

  def due(self, loop, step):
    return step % loop.config.training.log_every_steps == 0 or step == loop.run.steps.total

  def on_step(self, loop, step, due):
    if not due:
      return
    window, elapsed = loop.window, time.perf_counter() - loop.window_start
    row = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]
           if np.ndim(window[0][k]) == 0}
    row.update({f"train/{k}": v for k, v in loop.run.objective.log_metrics(window).items()})
    row["train/data_fingerprint"] = loop.fingerprint()
    row["train/examples_per_second"] = len(window) * loop.config.training.batch_size / elapsed
    row["train/seconds_per_step"] = elapsed / len(window)
    row["train/epoch"] = step / loop.run.steps.steps_per_epoch
    loop.writer.write(step, row)
    if loop.progress is not None:
      loop.progress.set_postfix(loss=f"{row['train/loss']:.4f}",
                                ex_per_s=f"{row['train/examples_per_second']:.0f}")
    loop.window.clear()
    loop.window_start = time.perf_counter()


class Tracker:
  """Best value of `eval.metric`, its step and metrics, and evaluations since."""

  def __init__(self, config, saved: dict | None = None):
    self.metric, self.mode = config.eval.metric, config.eval.mode
    self.patience = config.eval.early_stopping_patience
    saved = saved or {}
    self.best, self.best_step = saved.get("best"), saved.get("best_step")
    self.best_results, self.stale = saved.get("best_results", {}), saved.get("stale", 0)

  def update(self, step: int, results: Mapping[str, float]) -> bool:
    """Records an evaluation; True if it is the best so far."""
    value = results[self.metric]
    better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
    if better:
      self.best, self.best_step, self.best_results, self.stale = value, step, dict(results), 0
    else:
      self.stale += 1
    return better

  @property
  def should_stop(self) -> bool:
    return bool(self.patience) and self.stale >= self.patience

  def state(self) -> dict:
    return {"best": self.best, "best_step": self.best_step, "best_results": self.best_results,
            "stale": self.stale}


def run_evals(loop, step: int) -> dict:
  """Every eval split's metrics (and the objective's extra evaluations), logged."""
  results = {}
  for name in loop.config.eval.splits:
    split_results = compiled.evaluate(loop.run, loop.state, loop.eval_step, name)
    split_results.update(loop.run.objective.extra_eval(loop.run, loop.state, name, step))
    results.update({f"{name}/{key}": value for key, value in split_results.items()})
  loop.writer.write(step, results)
  return results


class Evaluation(Hook):
  """Every `eval.every_steps` (default: each epoch) and at the end; keep-best and early stop."""

  def on_start(self, loop) -> None:
    if loop.start_step is None and loop.config.eval.at_start and loop.config.eval.splits:
      loop.last_eval = run_evals(loop, 0)
      logging.info("Before training: %s", brief(loop.last_eval))

  def due(self, loop, step):
    return bool(loop.config.eval.splits) and (step % loop.run.steps.eval_every == 0
                                              or step == loop.run.steps.total)

  def on_step(self, loop, step, due):
    if not due:
      return
    loop.eval_results = loop.last_eval = run_evals(loop, step)
    if loop.tracker.update(step, loop.eval_results) and loop.config.checkpoint.keep_best:
      loop.save_requested = True
    if loop.tracker.should_stop:
      loop.stop("early")


class Checkpointing(Hook):
  """Every `checkpoint.every_steps`, at the end, on a stop, and on a new best."""

  def due(self, loop, step):
    return step % loop.run.steps.checkpoint_every == 0 or step == loop.run.steps.total

  def on_step(self, loop, step, due):
    if due or loop.save_requested or loop.stop_reason is not None:
      loop.save(step)


class Progress(Hook):
  """A tqdm bar on process 0."""

  def on_start(self, loop) -> None:
    loop.progress = tqdm.tqdm(total=loop.run.steps.total, initial=loop.step, desc="train",
                              unit="step", disable=jax.process_index() != 0,
                              dynamic_ncols=True)

  def due(self, loop, step):
    loop.progress.update(1)
    return False

  def on_end(self, loop) -> None:
    if loop.progress is not None:
      loop.progress.close()


def default_hooks(stop_at_step: int | None = None) -> list[Hook]:
  return [Progress(), StopRequests(stop_at_step), Logging(), Evaluation(), Checkpointing()]


def brief(results: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float))


def host_metrics(step: int, step_metrics: dict) -> dict:
  """One device->host transfer of a step's metrics; stops on a non-finite loss."""
  from ftjax.errors import FtjaxError  # pylint: disable=g-import-not-at-top
  values = {k: float(v) if np.ndim(v) == 0 else np.asarray(v)
            for k, v in jax.device_get(step_metrics).items()}
  if not math.isfinite(values["loss"]) or not math.isfinite(values["grad_norm"]):
    raise FtjaxError(
        f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}; training "
        f"stopped and the latest checkpoint is from before it. Lower "
        f"optimizer.learning_rate or check the data")
  return values
