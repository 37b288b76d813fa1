"""Model selection that must not see the test split: a check shared by the trainers' tests."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def poisoned_test_split(dataset):
  """``dataset`` with its test images replaced by noise and every test label wrong."""
  rng = np.random.default_rng(0)
  return dataclasses.replace(
      dataset, test_x=rng.integers(0, 256, dataset.test_x.shape, dtype=np.uint8),
      test_y=((dataset.test_y + 1) % 10).astype(dataset.test_y.dtype))


def assert_fit_never_reads_the_test_split(base, fit):
  """``fit(dataset) -> (trainer, FitResult)`` on ``base`` and on its poisoned copy:
  the same early-stopping record and kept state, while the test metric of the
  kept state differs (the poison reaches what the test split is read for)."""
  runs = []
  for dataset in (base, poisoned_test_split(base)):
    trainer, result = fit(dataset)
    runs.append((result.early_stopping, jax.tree.map(np.asarray, result.best_state.params),
                 trainer.evaluate(result.best_state, "test", jnp.float32(1.0))["accuracy"]))
  (stopping_a, params_a, test_a), (stopping_b, params_b, test_b) = runs
  assert stopping_a == stopping_b
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert test_a != test_b, "the poisoned test split must change the test metric itself"
