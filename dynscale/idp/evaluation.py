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

from typing import Callable

import jax.numpy as jnp

from dynscale.nn import batchnorm, sliced
from dynscale.train import loop, runs
from dynscale.train.state import TrainState, merge_model

CURVE = "test_accuracy_by_dp"


def recalibrated_state(trainer: loop.Trainer, state: TrainState, dp: float,
                       num_batches: int) -> TrainState:
  """``state`` with batch-norm statistics recalibrated at ``dp`` on training batches."""
  model = merge_model(trainer.graphdef, state.params, state.model_state)
  stats = batchnorm.recalibrate(model, dp, trainer.training_batches(num_batches),
                                dtype=model.dtype)
  return state.replace(model_state=sliced.merge_variables(state.model_state, stats))


def state_at(eval_config, trainer: loop.Trainer, state: TrainState, dp: float) -> TrainState:
  """``state`` with the batch-norm statistics ``eval.bn_mode`` names at ``dp``:
  recalibrated there on training batches, or the running ones."""
  if eval_config.bn_mode == "recalibrated":
    return recalibrated_state(trainer, state, dp, eval_config.recalibration_batches)
  return state


def evaluate_at(eval_config, trainer: loop.Trainer, state: TrainState, split: str,
                dp: float) -> dict[str, float]:
  """``trainer.evaluate`` of ``state`` on ``split`` at ``dp``, with the batch-norm
  statistics of :func:`state_at`. Validation that selects what the test report
  reads must read the same statistics."""
  return trainer.evaluate(state_at(eval_config, trainer, state, dp), split, jnp.float32(dp))


def validation_at(eval_config, trainer: loop.Trainer, dp: float
                  ) -> Callable[[TrainState], dict[str, float]]:
  """What early stopping and the kept state read when a stage trains at one
  ``dp``: :func:`evaluate_at` on the validation split, so that with
  ``recalibrated`` statistics the state kept is the best one as reported."""
  return lambda state: evaluate_at(eval_config, trainer, state, "val", dp)


def accuracy_by_dp(eval_config, trainer: loop.Trainer, state: TrainState,
                   split: str) -> list[list[float]]:
  """``[[dp, accuracy], ...]`` on ``split`` at each DP of ``eval_config.dps``."""
  return [[float(dp), evaluate_at(eval_config, trainer, state, split, dp)["accuracy"]]
          for dp in eval_config.dps]


def test_report(eval_config, trainer: loop.Trainer, state: TrainState) -> dict:
  """Test accuracy at every DP of ``eval.dps``: the results-file fields.

  ``curves`` holds the curve ``test_accuracy_by_dp`` (x ``dp``, y
  ``test_accuracy``), next to ``mean_test_accuracy`` and the ``bn_mode``.
  """
  points = accuracy_by_dp(eval_config, trainer, state, "test")
  return {"curves": {CURVE: runs.curve("dp", "test_accuracy", points)},
          "mean_test_accuracy": sum(y for _, y in points) / len(points),
          "bn_mode": eval_config.bn_mode}
