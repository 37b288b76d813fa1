"""Builds ``mnist_sample.npz``, the small real MNIST sample shipped in the package.

Usage (from the repository root)::

    python -m dynscale.data.make_mnist_sample /path/to/mnist_dir [--out dynscale/data/mnist_sample.npz]

``/path/to/mnist_dir`` holds the four original MNIST distribution files
(``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``).

How the sample is drawn: class-balanced and deterministic. With
``numpy.random.default_rng(SEED)``, for each digit 0..9 in turn, 400 of that
digit's training images are chosen without replacement from the original
training file, and 100 of its test images from the original t10k file. The
chosen indices are sorted, so the sample keeps the original file order. The
arrays are written with ``numpy.savez_compressed``:

* ``train_x`` uint8 (4000, 28, 28, 1), ``train_y`` uint8 (4000,),
  ``train_index`` int32 (4000,): index of each image in the original train file;
* ``test_x`` uint8 (1000, 28, 28, 1), ``test_y`` uint8 (1000,),
  ``test_index`` int32 (1000,): index in the original t10k file.

Rerunning it on the original files gives identical arrays (the zip container's
timestamps differ). MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0 (see
``MNIST_SAMPLE_LICENSE.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dynscale.data.formats import read_mnist_dir

SEED = 0
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
  """Sorted int32 indices: `per_class` drawn without replacement from each class 0..9."""
  chosen = [
      rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(10)
  ]
  return np.sort(np.concatenate(chosen)).astype(np.int32)


def make_sample(mnist_dir: str | Path, out: str | Path) -> None:
  """Draws the sample from the original files in `mnist_dir` and writes `out`."""
  splits = read_mnist_dir(mnist_dir)
  rng = np.random.default_rng(SEED)
  train_index = balanced_indices(splits.train_y, TRAIN_PER_CLASS, rng)
  test_index = balanced_indices(splits.test_y, TEST_PER_CLASS, rng)
  np.savez_compressed(
      out,
      train_x=splits.train_x[train_index],
      train_y=splits.train_y[train_index].astype(np.uint8),
      train_index=train_index,
      test_x=splits.test_x[test_index],
      test_y=splits.test_y[test_index].astype(np.uint8),
      test_index=test_index,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mnist_dir", help="directory holding the four original MNIST .gz files")
  parser.add_argument("--out", default=str(Path(__file__).with_name("mnist_sample.npz")))
  args = parser.parse_args()
  make_sample(args.mnist_dir, args.out)


if __name__ == "__main__":
  main()
