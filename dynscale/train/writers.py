"""Metric writers (JSONL and TensorBoard) and a progress logger."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from absl import logging

from dynscale.io import write_bytes_atomic


def _scalars(metrics: Mapping) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or hasattr(v, "item")}


class MetricWriter:
  """Appends ``{"step": s, **metrics}`` lines to ``metrics.jsonl`` and TensorBoard.

  TensorBoard events go to ``<workdir>/tensorboard`` through tensorboardX
  (no TensorFlow needed). Only process 0 of a multi-host run should write.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping) -> None:
    scalars = _scalars(metrics)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}, sort_keys=True) + "\n")
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))
      self._tb.flush()

  def forget_after(self, step: int, stage: str) -> None:
    """Drops from ``metrics.jsonl`` the lines after ``step`` that hold a metric
    of ``stage`` (``<stage>/...``), and a line cut short: what a stage logged
    after its last checkpoint before a kill, which its rerun logs again.
    TensorBoard's events are left as they are."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = [line for line in lines if not _logged_after(line, step, f"{stage}/")]
    if len(kept) != len(lines):
      write_bytes_atomic(self.path, "".join(kept).encode())

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _logged_after(line: str, step: int, prefix: str) -> bool:
  """Whether a ``metrics.jsonl`` line is cut short, or past ``step`` with a
  metric named ``prefix...``."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return True
  return record["step"] > step and any(name.startswith(prefix) for name in record)


class Progress:
  """Logs step, epoch, images/s and ETA for a run of ``total_steps`` steps."""

  def __init__(self, total_steps: int, batch_size: int, *, start_step: int = 0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int, epoch: int, metrics: Mapping) -> dict[str, float]:
    """Logs one line and returns throughput figures for the steps since the last call."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    images_per_s = steps * self.batch_size / seconds
    eta = (self.total_steps - step) * seconds / steps
    self._last_step, self._last_time = step, now
    shown = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(_scalars(metrics).items()))
    logging.info("step %d/%d epoch %d | %s | %.0f img/s | ETA %s", step, self.total_steps,
                 epoch, shown, images_per_s, _format_seconds(eta))
    return {"images_per_s": images_per_s}


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h:d}:{m:02d}:{s:02d}"
