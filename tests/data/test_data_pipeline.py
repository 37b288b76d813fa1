"""Device-resident batching and jnp augmentation, against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynscale.data import (
    DATASETS,
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
from augmentation import distinct_images, numpy_crop_flip


@pytest.mark.parametrize("pad", [0, 1, 4])
def test_crop_flip_matches_numpy(pad):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (6, 8, 7, 3), dtype=np.uint8)
  offsets = rng.integers(0, 2 * pad + 1, (6, 2)).astype(np.int32)
  flips = np.array([True, False, True, True, False, False])
  out = np.asarray(crop_flip(jnp.asarray(x), jnp.asarray(offsets), jnp.asarray(flips), pad))
  assert out.dtype == np.uint8 and out.shape == x.shape
  for i in range(6):
    expected = numpy_crop_flip(x[i], offsets[i, 0], offsets[i, 1], flips[i], pad)
    np.testing.assert_array_equal(out[i], expected)


def test_crop_flip_params_ranges():
  offsets, flips = crop_flip_params(jax.random.key(0), 512, pad=4)
  offsets, flips = np.asarray(offsets), np.asarray(flips)
  assert offsets.shape == (512, 2) and flips.shape == (512,) and flips.dtype == bool
  assert offsets.min() == 0 and offsets.max() == 8  # all of [0, 2 pad] is reachable
  assert len(np.unique(offsets[:, 0])) == 9 and len(np.unique(offsets[:, 1])) == 9
  assert 0.4 < flips.mean() < 0.6


def test_random_crop_flip_outputs_are_windows():
  """Every output is some window of the zero-padded input, or its mirror."""
  pad = 2
  x = distinct_images(32, 6, 5, 2)
  out = np.asarray(
      jax.jit(random_crop_flip, static_argnums=2)(jax.random.key(1), jnp.asarray(x), pad))
  seen = set()
  for i in range(len(x)):
    matches = [(top, left, flip)
               for top in range(2 * pad + 1)
               for left in range(2 * pad + 1)
               for flip in (False, True)
               if np.array_equal(out[i], numpy_crop_flip(x[i], top, left, flip, pad))]
    assert len(matches) >= 1, f"example {i} is not a padded window"
    seen.update(matches)
  assert {m[2] for m in seen} == {False, True}  # both flip states occur
  assert len({m[:2] for m in seen}) > 5  # offsets vary across the batch


def test_random_crop_flip_key_dependence():
  x = jnp.asarray(distinct_images(16, 8, 8, 1))
  a = random_crop_flip(jax.random.key(0), x)
  b = random_crop_flip(jax.random.key(0), x)
  c = random_crop_flip(jax.random.key(1), x)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("n,batch_size", [(10, 3), (12, 4), (5, 5), (7, 1)])
def test_epoch_permutation(n, batch_size):
  idx = np.asarray(epoch_permutation(jax.random.key(0), n, batch_size))
  assert idx.dtype == np.int32 and idx.shape == (n // batch_size, batch_size)
  flat = idx.ravel()
  assert len(set(flat.tolist())) == len(flat)  # each index at most once
  assert flat.min() >= 0 and flat.max() < n


def test_epoch_permutation_shuffles_and_is_jittable():
  f = jax.jit(epoch_permutation, static_argnums=(1, 2))
  a = np.asarray(f(jax.random.key(0), 100, 10))
  b = np.asarray(f(jax.random.key(1), 100, 10))
  assert sorted(a.ravel()) == list(range(100))
  assert not np.array_equal(a, b) and not np.array_equal(a.ravel(), np.arange(100))


@pytest.mark.parametrize("batch_size", [0, 11])
def test_epoch_permutation_bad_batch_size(batch_size):
  with pytest.raises(ValueError, match=rf"batch_size must be in \[1, 10\].*got {batch_size}"):
    epoch_permutation(jax.random.key(0), 10, batch_size)


@pytest.mark.parametrize("n,batch_size", [(10, 4), (8, 4), (3, 5), (1, 1)])
def test_eval_batches_cover_each_example_once(n, batch_size):
  idx, mask = map(np.asarray, eval_batches(n, batch_size))
  steps = -(-n // batch_size)
  assert idx.shape == mask.shape == (steps, batch_size) and idx.dtype == np.int32
  counts = np.zeros(n, int)
  for i, m in zip(idx.ravel(), mask.ravel()):
    if m:
      counts[i] += 1
  np.testing.assert_array_equal(counts, np.ones(n, int))
  assert mask.sum() == n and idx.min() >= 0 and idx.max() < n


def test_eval_batches_bad_args():
  with pytest.raises(ValueError, match="n and batch_size must be >= 1"):
    eval_batches(0, 4)


def test_normalize_matches_formula():
  x = np.random.default_rng(0).integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  out = np.asarray(normalize(jnp.asarray(x), mean, std))
  expected = np.empty(x.shape, np.float64)
  for ch in range(3):
    expected[..., ch] = (x[..., ch] / 255.0 - mean[ch]) / std[ch]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_normalize_channel_mismatch():
  with pytest.raises(ValueError, match=r"mean and std must have shape \(3,\)"):
    normalize(jnp.zeros((1, 2, 2, 3), jnp.uint8), (0.5,), (0.5,))


def test_to_device_keeps_uint8():
  x, y = to_device(np.zeros((4, 2, 2, 1), np.uint8), np.arange(4, dtype=np.int64))
  assert isinstance(x, jax.Array) and x.dtype == jnp.uint8 and y.dtype == jnp.int32
  with pytest.raises(ValueError, match="x must be uint8"):
    to_device(np.zeros((4, 2, 2, 1), np.float32), np.arange(4))


def test_make_batch_without_augmentation():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)
  y = rng.integers(0, 10, 10).astype(np.int32)
  idx = np.array([7, 0, 3, 3])
  step = jax.jit(functools.partial(make_batch, augment=False, mean=(0.5,), std=(0.25,)))
  images, labels = step(*to_device(x, y), jnp.asarray(idx))
  np.testing.assert_allclose(np.asarray(images), (x[idx] / 255.0 - 0.5) / 0.25,
                             rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(labels, y[idx])


def test_make_batch_with_augmentation():
  x = distinct_images(6, 5, 5, 3)
  y = np.arange(6, dtype=np.int32)
  idx = np.array([5, 1, 2])
  step = jax.jit(functools.partial(make_batch, augment=True, mean=(0.0,) * 3, std=(1.0,) * 3,
                                   pad=1))
  images, labels = step(*to_device(x, y), jnp.asarray(idx), key=jax.random.key(0))
  np.testing.assert_array_equal(labels, [5, 1, 2])
  pixels = np.rint(np.asarray(images) * 255).astype(np.uint8)
  for out, i in zip(pixels, idx):
    assert any(
        np.array_equal(out, numpy_crop_flip(x[i], t, l, f, 1))
        for t in range(3)
        for l in range(3)
        for f in (False, True))


def test_make_batch_augments_with_the_crops_and_flips_its_key_draws():
  """Catches a batch that is not augmented (or with draws of another key):
  the images equal ``crop_flip`` at ``crop_flip_params(key)``, and are not
  the gathered images untouched."""
  x = distinct_images(8, 5, 5, 3)
  y = np.arange(8, dtype=np.int32)
  idx = jnp.asarray([7, 0, 3, 3, 5, 1])
  key = jax.random.key(3)
  images, _ = make_batch(*to_device(x, y), idx, key=key, augment=True, mean=(0.0,) * 3,
                         std=(1.0,) * 3, pad=2)
  pixels = np.rint(np.asarray(images) * 255).astype(np.uint8)
  offsets, flips = crop_flip_params(key, len(idx), 2)
  np.testing.assert_array_equal(pixels, np.asarray(crop_flip(jnp.asarray(x[np.asarray(idx)]),
                                                             offsets, flips, 2)))
  assert not np.array_equal(pixels, x[np.asarray(idx)])


def test_make_batch_augment_needs_key():
  x, y = to_device(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2))
  with pytest.raises(ValueError, match="key must be given"):
    make_batch(x, y, jnp.array([0]), augment=True, mean=(0.0,), std=(1.0,))


def test_registries_cover_datasets():
  for name in DATASETS:
    mean, std = normalization_stats(name)
    assert len(mean) == len(std) and len(mean) in (1, 3)
  assert normalization_stats("mnist_sample") == normalization_stats("mnist") == ((0.1307,),
                                                                                 (0.3081,))
  assert uses_augmentation("cifar10") and uses_augmentation("cifar100")
  assert not uses_augmentation("mnist") and not uses_augmentation("mnist_sample")
  for f in (normalization_stats, uses_augmentation):
    with pytest.raises(ValueError, match="dataset must be one of"):
      f("svhn")
