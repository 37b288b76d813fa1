"""Device-resident batching and augmentation, all in jnp (DESIGN.md,
"Performance levers": data resident on the device, augmentation in jnp).

The whole split lives on the device as uint8 (`to_device`); a batch is a
gather by an index array (`make_batch`), optionally augmented with the
standard CIFAR pad-4 random crop + horizontal flip, then normalised to
float32. Every function here is jittable: sizes (`n`, `batch_size`, `pad`)
and the `augment` flag are static (Python values), everything else is an
array; there is no per-example Python work.

Typical epoch::

    x, y = to_device(ds.train_x, ds.train_y)
    idx = epoch_permutation(key, len(ds.train_x), 128)        # (steps, 128)
    mean, std = normalization_stats(ds.name)
    for i in range(idx.shape[0]):
        images, labels = make_batch(x, y, idx[i], key=jax.random.fold_in(key, i),
                                    augment=uses_augmentation(ds.name), mean=mean, std=std)

    eval_idx, mask = eval_batches(len(ds.test_x), 500)        # mask out the padding
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynscale.data.datasets import DATASETS

MNIST_STATS = ((0.1307,), (0.3081,))

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": MNIST_STATS,
    "mnist_sample": MNIST_STATS,
    # The commonly published Fashion-MNIST training-set statistics.
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
"""Per-channel (mean, std) of the training images scaled to [0, 1], by dataset name."""

AUGMENT_BY_DEFAULT: dict[str, bool] = {
    "mnist": False,
    "mnist_sample": False,
    "fashion_mnist": False,
    "cifar10": True,
    "cifar100": True,
}
"""Whether the standard recipe augments a dataset (pad-4 crop + flip for CIFAR)."""


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def normalization_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel for dataset `name` (one of `DATASETS`)."""
  _check_name(name)
  return NORMALIZATION[name]


def uses_augmentation(name: str) -> bool:
  """True when dataset `name` is augmented by default (CIFAR), False otherwise."""
  _check_name(name)
  return AUGMENT_BY_DEFAULT[name]


def to_device(x: np.ndarray,
              y: np.ndarray,
              device: jax.Device | None = None) -> tuple[jax.Array, jax.Array]:
  """Puts images (N, H, W, C) uint8 and labels (N,) on `device` (default: jax's).

    Images stay uint8 (4x less memory than float32); labels become int32.
    """
  if x.dtype != np.uint8 or x.ndim != 4:
    raise ValueError(f"x must be uint8 (N, H, W, C), got {x.dtype} of shape {x.shape}")
  if y.shape != (x.shape[0],):
    raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")
  return jax.device_put(x, device), jax.device_put(np.asarray(y, np.int32), device)


def normalize(x: jax.Array, mean: Sequence[float] | jax.Array,
              std: Sequence[float] | jax.Array) -> jax.Array:
  """uint8 (..., C) -> float32 ``(x / 255 - mean) / std``, mean/std of shape (C,)."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if mean.shape != (x.shape[-1],) or std.shape != (x.shape[-1],):
    raise ValueError(f"mean and std must have shape ({x.shape[-1]},) for {x.shape[-1]} channels, "
                     f"got {mean.shape} and {std.shape}")
  return (x.astype(jnp.float32) / 255.0 - mean) / std


def crop_flip_params(key: jax.Array, batch: int, pad: int = 4) -> tuple[jax.Array, jax.Array]:
  """Draws per-example crop offsets (batch, 2) int32 in [0, 2 pad] (row, col)
    and flips (batch,) bool with probability 1/2."""
  k_offset, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_offset, (batch, 2), 0, 2 * pad + 1, dtype=jnp.int32)
  return offsets, jax.random.bernoulli(k_flip, 0.5, (batch,))


def crop_flip(x: jax.Array, offsets: jax.Array, flips: jax.Array, pad: int = 4) -> jax.Array:
  """Zero-pads each (H, W, C) image by `pad` on both spatial sides, takes the
    H x W window whose top-left corner is ``offsets[i]`` in the padded image,
    then mirrors it left-right where ``flips[i]``.

    x: (B, H, W, C); offsets: (B, 2) int; flips: (B,) bool. Returns (B, H, W, C), x's dtype.
    """
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  _, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
    window = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, window[:, ::-1], window)

  return jax.vmap(one)(padded, offsets, flips)


def random_crop_flip(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
  """Standard CIFAR augmentation: pad-`pad` random crop + random horizontal
    flip, independently per example. x: (B, H, W, C) -> (B, H, W, C)."""
  offsets, flips = crop_flip_params(key, x.shape[0], pad)
  return crop_flip(x, offsets, flips, pad)


def epoch_permutation(key: jax.Array, n: int, batch_size: int) -> jax.Array:
  """A shuffled epoch as an int32 (n // batch_size, batch_size) index array.

    The last ``n % batch_size`` examples of the permutation are dropped, so
    every batch is full (one compiled step shape); a different key drops
    different examples.
    """
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}] (n = {n}), got {batch_size}")
  steps = n // batch_size
  return jax.random.permutation(key, n)[:steps * batch_size].reshape(steps,
                                                                     batch_size).astype(jnp.int32)


def eval_batches(n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Every index in range(n) exactly once, in order, in full batches.

    Returns (idx, mask), both (ceil(n / batch_size), batch_size): idx int32,
    padded with index 0 past the end; mask bool, False on the padding. Weight
    per-example results by `mask` so each example counts exactly once.
    """
  if n < 1 or batch_size < 1:
    raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
  steps = -(-n // batch_size)
  flat = jnp.arange(steps * batch_size, dtype=jnp.int32)
  mask = flat < n
  return jnp.where(mask, flat, 0).reshape(steps, batch_size), mask.reshape(steps, batch_size)


def make_batch(
    x: jax.Array,
    y: jax.Array,
    idx: jax.Array,
    *,
    key: jax.Array | None = None,
    augment: bool,
    mean: Sequence[float] | jax.Array,
    std: Sequence[float] | jax.Array,
    pad: int = 4,
) -> tuple[jax.Array, jax.Array]:
  """Gathers examples `idx` (B,) from device arrays x (N, H, W, C) uint8 and
    y (N,), augments them with `random_crop_flip` when `augment` (needs
    `key`), and normalises. Returns (images (B, H, W, C) float32, labels (B,)).
    Under jit, `augment` and `pad` are static."""
  if augment and key is None:
    raise ValueError("key must be given when augment=True")
  images = jnp.take(x, idx, axis=0)
  if augment:
    images = random_crop_flip(key, images, pad)
  return normalize(images, mean, std), jnp.take(y, idx, axis=0)
