"""NumPy references for the crop-and-flip augmentation, shared by the tests."""

import numpy as np


def numpy_crop_flip(image: np.ndarray, top: int, left: int, flip: bool, pad: int) -> np.ndarray:
  """Reference: zero-pad, take the window at (top, left), mirror columns."""
  h, w, c = image.shape
  padded = np.zeros((h + 2 * pad, w + 2 * pad, c), image.dtype)
  padded[pad:pad + h, pad:pad + w] = image
  window = padded[top:top + h, left:left + w]
  return window[:, ::-1] if flip else window


def distinct_images(batch: int, h: int, w: int, c: int) -> np.ndarray:
  """uint8 images whose pixel values 1..h*w*c (h*w*c <= 255) are distinct and
    nonzero, so a window of the zero-padded image identifies its offset."""
  assert h * w * c <= 255
  base = (np.arange(h * w * c) + 1).astype(np.uint8).reshape(h, w, c)
  return np.stack([np.roll(base, i, axis=1) for i in range(batch)])


def crop_flip_of(original: np.ndarray, seen: np.ndarray, pad: int):
  """The ``(top, left, flip)`` whose crop and flip of ``original`` is ``seen``
  (None when none is): an untouched image is ``(pad, pad, False)``."""
  for top in range(2 * pad + 1):
    for left in range(2 * pad + 1):
      for flip in (False, True):
        if np.array_equal(numpy_crop_flip(original, top, left, flip, pad), seen):
          return top, left, flip
  return None
