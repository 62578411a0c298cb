"""Metrics to `workdir/metrics.jsonl` and TensorBoard, from process 0 only."""

import json
import pathlib

import jax
import numpy as np
from absl import logging


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
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept),
                                               encoding="utf-8")
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
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
