"""Patience-based early stopping on a validation metric.

A small immutable record updated by a pure function, so it checkpoints as
JSON next to the train state and a resumed run makes the same decisions.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """State of early stopping on a metric that should go up (``mode='max'``) or down.

  ``patience``: how many evaluations without improvement are tolerated;
  ``min_delta``: the smallest change that counts as an improvement.
  """

  patience: int
  mode: str = "max"
  min_delta: float = 0.0
  best: float | None = None
  best_epoch: int | None = None
  bad_epochs: int = 0

  def __post_init__(self):
    if self.mode not in ("max", "min"):
      raise ValueError(f"early stopping mode must be 'max' or 'min', got {self.mode!r}")
    if self.patience < 1:
      raise ValueError(f"patience must be >= 1, got {self.patience}")

  @property
  def should_stop(self) -> bool:
    return self.bad_epochs >= self.patience

  def improved(self, value: float) -> bool:
    if self.best is None:
      return True
    sign = 1.0 if self.mode == "max" else -1.0
    return sign * (value - self.best) > self.min_delta

  def update(self, value: float, epoch: int) -> "EarlyStopping":
    """Records one validation value; returns the new state."""
    if math.isnan(value):
      return dataclasses.replace(self, bad_epochs=self.bad_epochs + 1)
    if self.improved(value):
      return dataclasses.replace(self, best=float(value), best_epoch=epoch, bad_epochs=0)
    return dataclasses.replace(self, bad_epochs=self.bad_epochs + 1)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "EarlyStopping":
    return cls(**d)
