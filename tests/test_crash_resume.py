"""Crash safety: a run killed at random moments resumes to the bitwise-same parameters.

The real entry point (`python -m ftjax.main`) trains a tiny BERT with a
checkpoint every step (orbax writes asynchronously). It is killed with
SIGKILL five times — at random steps, and at least once while a checkpoint
is being written — pre-empted once with SIGTERM, interrupted once with Ctrl-C
(SIGINT) and once with two Ctrl-Cs; each time the same
command is started again. The final parameters must equal, bit for bit, those
of a run that was never interrupted: same data order, same RNG, nothing
replayed twice or skipped. After every kill the newest complete checkpoint
must be at least as new as before it (a kept checkpoint is never lost, a
half-written one is never picked up), and SIGTERM must leave a checkpoint at
the step it stopped on.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ftjax import checkpoint as checkpoint_lib
from tests import tiny
from tests.conftest import REPO

NUM_STEPS = 30
OVERRIDES = {"training.num_steps": NUM_STEPS, "training.batch_size": 16,
             "training.log_every_steps": 1, "checkpoint.every_steps": 1,
             "checkpoint.max_to_keep": 2, "eval.every_steps": 20, "eval.splits": ("test",),
             "data.num_buckets": 1,
             "eval.metric": "test/accuracy", "strategy.name": "full"}


# Every run of the command on one CPU device (conftest's 8 fake devices would
# slow every restart).
ONE_DEVICE = {**os.environ, "XLA_FLAGS": ""}


def _command(model, data, workdir) -> list[str]:
  flags = [f"--config.model.name_or_path={model}", f"--config.data.path={data}"]
  for key, value in OVERRIDES.items():
    value = ",".join(value) if isinstance(value, tuple) else value
    flags.append(f"--config.{key}={value}")
  return [sys.executable, "-m", "ftjax.main", "--config=configs/sentiment_minilm.py",
          f"--workdir={workdir}", *flags]


def _logged_step(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
           if line.strip().endswith("}") and "train/loss" in line]
  return max(steps, default=0)


def _complete_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
      if folder.exists() else []


def _writing(workdir: pathlib.Path) -> bool:
  """A checkpoint is being written: orbax's temporary folder exists."""
  folder = workdir / "checkpoints"
  return folder.exists() and any("tmp" in p.name for p in folder.iterdir())


def _interrupt(command, workdir, *, after_step: int, during_write: bool, sig: int,
               twice: bool = False):
  """Starts the run, waits for `after_step` (and a checkpoint write), sends `sig`.

  Returns (finished output, whether a write was in progress when signalled).
  """
  # Output goes to a file: an unread pipe would fill up and block the child.
  log = workdir.parent / f"{workdir.name}.log"
  with open(log, "w", encoding="utf-8") as stream:
    process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=stream, text=True,
                               env=ONE_DEVICE)
    deadline = time.monotonic() + 300
    writing = False
    try:
      while time.monotonic() < deadline and process.poll() is None:
        if _logged_step(workdir) >= after_step and (not during_write or _writing(workdir)):
          writing = _writing(workdir)
          process.send_signal(sig)
          if twice:  # a second Ctrl-C while the first one's checkpoint is pending
            time.sleep(0.05)
            process.send_signal(sig)
          break
        time.sleep(0.002)
      process.wait(timeout=300)
    finally:
      if process.poll() is None:
        process.kill()
  return process.returncode, "", log.read_text(encoding="utf-8"), writing


@pytest.mark.slow
def test_killed_runs_resume_to_bitwise_equal_parameters(minilm_dir, data_dir, tmp_path):
  model = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=2)
  data = tiny.make_data(tmp_path / "data", data_dir)
  # The uninterrupted run: the same command in the same kind of process (one
  # CPU device; XLA:CPU may sum in another order on a client with 8 devices).
  reference = tmp_path / "reference"
  straight = subprocess.run(_command(model, data, reference), cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=ONE_DEVICE)
  assert straight.returncode == 0, straight.stderr[-3000:]

  workdir = tmp_path / "killed"
  command = _command(model, data, workdir)
  rng = np.random.default_rng(0)
  kills_during_write, newest = 0, 0
  for k in range(5):
    target = _logged_step(workdir) + int(rng.integers(1, 5))
    code, _, err, writing = _interrupt(command, workdir, after_step=target,
                                       during_write=k in (1, 3), sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, err[-2000:]
    kills_during_write += writing
    steps = _complete_steps(workdir)
    assert steps and steps[-1] >= newest, (steps, newest)  # nothing kept was lost
    newest = steps[-1]
  assert kills_during_write >= 1

  # Pre-emption: SIGTERM checkpoints the step it stops on, then exits 143.
  code, _, err, _ = _interrupt(command, workdir, after_step=_logged_step(workdir) + 3,
                               during_write=False, sig=signal.SIGTERM)
  assert code == 128 + signal.SIGTERM, err[-2000:]
  stopped = _logged_step(workdir)
  assert _complete_steps(workdir)[-1] == stopped < NUM_STEPS
  assert f"pre-empted (SIGTERM) at step {stopped} of {NUM_STEPS}" in err.strip().splitlines()[-1]

  # Ctrl-C behaves as SIGTERM: a checkpoint at the current step, then exit 130.
  code, _, err, _ = _interrupt(command, workdir, after_step=stopped + 2, during_write=False,
                               sig=signal.SIGINT)
  assert code == 128 + signal.SIGINT, err[-2000:]
  stopped = _logged_step(workdir)
  assert _complete_steps(workdir)[-1] == stopped < NUM_STEPS
  assert "Ctrl-C: saving a checkpoint at the end of this step" in err
  assert f"interrupted (Ctrl-C) at step {stopped} of {NUM_STEPS}" in err.strip().splitlines()[-1]

  # A second Ctrl-C stops at once: one line, exit 130, no traceback, and the newest
  # complete checkpoint is intact (the final run resumes from it).
  code, _, err, _ = _interrupt(command, workdir, after_step=stopped + 2, during_write=False,
                               sig=signal.SIGINT, twice=True)
  assert code == 128 + signal.SIGINT, err[-2000:]
  assert "Traceback" not in err
  assert "without a new checkpoint; the last complete one is kept" in err.strip().splitlines()[-1]
  stopped = _complete_steps(workdir)[-1]
  checkpoint_lib.read_trainable(workdir, stopped)

  final = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=ONE_DEVICE)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"Resumed from {workdir / 'checkpoints' / str(stopped)} at step {stopped}" in \
      final.stderr
  ours = checkpoint_lib.read_trainable(workdir, NUM_STEPS)
  theirs = checkpoint_lib.read_trainable(reference, NUM_STEPS)
  assert ours.keys() == theirs.keys()
  for path in theirs:
    np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)
  # The loss curve is the uninterrupted one too (replayed steps are logged once).
  curve = lambda w: {json.loads(l)["step"]: json.loads(l)["train/loss"]
                     for l in (w / "metrics.jsonl").read_text().splitlines() if "train/loss" in l}
  assert curve(workdir) == curve(reference)
