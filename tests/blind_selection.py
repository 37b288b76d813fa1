"""Model selection in the trainers' tests: it must not see the test split, and the
state it kept is checked on the validation split by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dynscale import data
from dynscale.nn import sliced


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


def val_accuracy_by_hand(export_dir, dps, val_size, seed=0):
  """Validation accuracy of an exported ``mnist_sample`` network at each DP, in NumPy
  (the run's validation split: ``val_size`` images drawn with the run's ``seed``)."""
  network = sliced.load(export_dir)
  dataset = data.load("mnist_sample", val_size=val_size, seed=seed)
  images = data.normalize(dataset.val_x, *data.normalization_stats(dataset.name))
  return {dp: float(np.mean(np.argmax(network(images, dp), -1) == dataset.val_y))
          for dp in dps}
