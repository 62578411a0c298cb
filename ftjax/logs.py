"""Metrics to `workdir/metrics.jsonl` and TensorBoard, from process 0 only."""

import json
import pathlib

import jax
import numpy as np
from absl import logging

from ftjax import files


class MetricWriter:
  """One JSON line per write (`{"step": ..., "train/loss": ...}`) + TensorBoard scalars."""

  def __init__(self, workdir: str | pathlib.Path, resume_step: int | None = None):
    """On resume, rows past `resume_step` (written before a crash, replayed now) are dropped."""
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      if resume_step is not None:
        kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
        # Rewritten beside and renamed over: a kill here never loses the history.
        files.atomic_write_text(workdir / "metrics.jsonl",
                                "".join(json.dumps(r) + "\n" for r in kept))
      self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # pylint: disable=consider-using-with
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          str(workdir / "tensorboard"),
          purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _plain(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, int(step))
    self._tb.flush()
    logging.info("step %d: %s", step, ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
        if k != "step"))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  return value


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  lines = path.read_text(encoding="utf-8").splitlines()
  for i, line in enumerate(lines):
    if not line:
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
      # A process killed mid-write can leave a torn last line; its step is
      # replayed after the resume anyway.
      logging.warning("ignoring an incomplete last line of %s", path)
  return rows
