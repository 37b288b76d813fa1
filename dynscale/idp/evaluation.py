"""Test-time evaluation across DP levels, naming the batch-norm mode used.

``eval.bn_mode``:

* ``shared``: the trained running statistics at every DP (the papers'
  behaviour);
* ``recalibrated``: before evaluating at a DP, the statistics of the channels
  computed there are re-estimated exactly over ``eval.recalibration_batches``
  training batches (no augmentation) at that DP
  (:func:`dynscale.nn.batchnorm.recalibrate`). Never uses the split it reports on.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from absl import logging

from dynscale import plots
from dynscale.nn import batchnorm, sliced
from dynscale.train import loop
from dynscale.train.state import TrainState, merge_model


def dp_key(dp: float) -> str:
  """The results-file key of a DP: its percentage as an integer string ("10")."""
  return str(int(round(float(dp) * 100)))


def recalibrated_state(trainer: loop.Trainer, state: TrainState, dp: float,
                       num_batches: int) -> TrainState:
  """``state`` with batch-norm statistics recalibrated at ``dp`` on training batches."""
  model = merge_model(trainer.graphdef, state.params, state.model_state)
  stats = batchnorm.recalibrate(model, dp, trainer.training_batches(num_batches),
                                dtype=model.dtype)
  return state.replace(model_state=sliced.merge_variables(state.model_state, stats))


def accuracy_by_dp(run, trainer: loop.Trainer, state: TrainState, split: str,
                   dps=None) -> dict[str, float]:
  """Accuracy on ``split`` at each DP of ``run.config.eval.dps`` (or ``dps``)."""
  config = run.config.eval
  dps = config.dps if dps is None else dps
  by_dp = {}
  for dp in dps:
    at_dp = (recalibrated_state(trainer, state, dp, config.recalibration_batches)
             if config.bn_mode == "recalibrated" else state)
    by_dp[dp_key(dp)] = trainer.evaluate(at_dp, split, jnp.float32(dp))["accuracy"]
  return by_dp


def test_report(run, trainer: loop.Trainer, state: TrainState, label: str) -> dict:
  """Test accuracy at every DP of ``eval.dps``, logged as a table and plotted.

  Writes ``accuracy_by_dp.png`` (process 0) with one curve named ``label``
  and the batch-norm mode, and returns the results-file fields
  ``test_accuracy_by_dp``, ``mean_test_accuracy`` and ``bn_mode``.
  """
  bn_mode = run.config.eval.bn_mode
  by_dp = accuracy_by_dp(run, trainer, state, "test")
  curves = {f"{label} ({bn_mode} BN)": by_dp}
  logging.info("Test accuracy by DP:\n%s", plots.format_accuracy_table(curves))
  if run.is_main_process:
    plots.plot_accuracy_by_dp(curves, os.path.join(run.workdir, "accuracy_by_dp.png"),
                              title=f"{run.config.model.name} on {run.dataset.name}")
  return {"test_accuracy_by_dp": by_dp, "mean_test_accuracy": sum(by_dp.values()) / len(by_dp),
          "bn_mode": bn_mode}
