"""Test-time evaluation across DP levels, naming the batch-norm mode used."""

from __future__ import annotations

import jax.numpy as jnp

from dynscale.train import loop
from dynscale.train.state import TrainState


def dp_key(dp: float) -> str:
  """The results-file key of a DP: its percentage as an integer string ("10")."""
  return str(int(round(float(dp) * 100)))


def accuracy_by_dp(run, trainer: loop.Trainer, state: TrainState, split: str,
                   dps=None) -> dict[str, float]:
  """Accuracy on ``split`` at each DP of ``run.config.eval.dps`` (or ``dps``).

  ``eval.bn_mode`` 'shared' uses the trained running statistics at every DP
  (the papers' behaviour).
  """
  dps = run.config.eval.dps if dps is None else dps
  return {dp_key(dp): trainer.evaluate(state, split, jnp.float32(dp))["accuracy"]
          for dp in dps}
