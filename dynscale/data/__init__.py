"""Datasets and the device-resident input pipeline.

`load` returns a named dataset (MNIST, Fashion-MNIST, CIFAR-10/100 from local
files or tensorflow-datasets, or the packaged real MNIST sample) as numpy
uint8 NHWC arrays with a validation split; `pipeline` batches and augments it
on the device in jnp.
"""

from dynscale.data.datasets import DATA_DIR_ENV, DATASETS, Dataset, load, split_indices
from dynscale.data.pipeline import (
    NORMALIZATION,
    crop_flip,
    crop_flip_params,
    epoch_permutation,
    eval_batches,
    make_batch,
    normalization_stats,
    normalize,
    random_crop_flip,
    to_device,
    uses_augmentation,
)

__all__ = [
    "DATA_DIR_ENV",
    "DATASETS",
    "NORMALIZATION",
    "Dataset",
    "crop_flip",
    "crop_flip_params",
    "epoch_permutation",
    "eval_batches",
    "load",
    "make_batch",
    "normalization_stats",
    "normalize",
    "random_crop_flip",
    "split_indices",
    "to_device",
    "uses_augmentation",
]
