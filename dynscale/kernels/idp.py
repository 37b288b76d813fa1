"""Incomplete dot products (IDP): pure JAX kernels, no Flax.

McDanel, Teerapittayanon & Kung, *Incomplete Dot Products for Dynamic
Computation Scaling in Neural Network Inference* (paper 001), and Eq. 1-2 of
TESLA (paper 000). A layer with N input channels and a monotone
non-increasing *profile* gamma computes, at DP ``p``, only the first
``k = num_kept(N, p)`` terms of every dot product:

    y_j = sum_{i <= k} gamma_i w_ji x_i                     (001, §II-C)

Two execution paths are offered for every layer, and they are equal:

* **masked** (``dense``, ``conv``, ``depthwise_conv``, ``separable_conv``):
  the unused coefficients are set to zero. Shapes do not depend on ``dp``,
  which may be a traced value, so these serve training and ``vmap`` over DP
  levels. They save no compute.
* **sliced** (``dense_sliced``, ``conv_sliced``, ...): ``k`` is a static
  Python int and only the kept prefix of the weights and input takes part.
  Optionally only the first ``n_out`` outputs are computed, which is how a
  whole network slices: a layer computes just the channels the next layer
  keeps, and the cost of a middle layer falls to about ``p**2``.

Layouts: dense inputs ``(..., N)`` with weights ``(N, M)``; convolutions are
NHWC with HWIO filters; depthwise filters are ``(kh, kw, 1, C)``.
Every kernel returns the dtype of its input ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynscale.kernels.conv import Padding, conv2d

Array = jax.Array

PROFILES = ("all-one", "harmonic", "linear", "half-exp")

# dp * n is compared to an integer with this slack, so that e.g. 0.3 * 10
# (= 3.0000000000000004 in float64, or 3.0000001 in float32) keeps 3 channels.
_KEEP_TOLERANCE = 1e-3


# --------------------------------------------------------------------------
# Profiles (001 §II-B)
# --------------------------------------------------------------------------


def profile(name: str, n: int) -> Array:
  """Returns the profile ``gamma`` of length ``n`` named ``name`` (001 §II-B).

  With 1-based channel index ``i``:

  * ``all-one``:  gamma_i = 1 (a standard layer);
  * ``harmonic``: gamma_i = 1 / i;
  * ``linear``:   gamma_i = 1 - i / N. As written in the paper this gives
    gamma_N = 0: the last channel never contributes. We keep the formula.
  * ``half-exp``: gamma_i = 1 if i < N/2, else exp(N/2 - i - 1).

  Returns a float32 array of shape ``(n,)``.
  """
  if name not in PROFILES:
    raise ValueError(f"profile must be one of {PROFILES}, got {name!r}")
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"profile length n must be a positive int, got {n!r}")
  i = np.arange(1, n + 1, dtype=np.float64)
  if name == "all-one":
    gamma = np.ones_like(i)
  elif name == "harmonic":
    gamma = 1.0 / i
  elif name == "linear":
    gamma = 1.0 - i / n
  else:  # half-exp
    gamma = np.where(i < n / 2, 1.0, np.exp(n / 2 - i - 1))
  return jnp.asarray(gamma, jnp.float32)


def check_profile(gamma, name: str = "profile") -> np.ndarray:
  """Validates a user-supplied profile and returns it as a float32 array.

  A profile must be 1-D, have a positive first coefficient, and be
  non-increasing (001 §II-A: "monotonically non-increasing coefficients").
  Works on concrete values only (call it before any jit).
  """
  values = np.asarray(gamma, dtype=np.float32)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {values.shape}")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} must be finite")
  if values[0] <= 0:
    raise ValueError(f"{name}[0] (gamma_1) must be > 0, got {values[0]}")
  rises = np.nonzero(np.diff(values) > 0)[0]
  if rises.size:
    i = int(rises[0])
    raise ValueError(
        f"{name} must be non-increasing; gamma[{i + 1}]={values[i + 1]} > "
        f"gamma[{i}]={values[i]}")
  return values


def resolve_profile(spec, n: int) -> Array:
  """A profile from a name in ``PROFILES`` or from explicit values (checked)."""
  if isinstance(spec, str):
    return profile(spec, n)
  values = check_profile(spec)
  if values.size != n:
    raise ValueError(f"profile has {values.size} coefficients, layer has {n} channels")
  return jnp.asarray(values)


# --------------------------------------------------------------------------
# DP -> number of channels kept
# --------------------------------------------------------------------------


def check_dp(dp: float, name: str = "dp") -> float:
  """Validates a concrete DP (fraction of channels kept), returns it as float."""
  value = float(dp)
  if not 0.0 < value <= 1.0:
    raise ValueError(f"{name} must be in (0, 1], got {dp}")
  return value


def matching_dp(dp: float, dps) -> float | None:
  """The DP of ``dps`` that ``dp`` names, within float32 rounding (``np.float32(0.3)``
  names 0.3), or None: the lookup of statistics kept per DP."""
  dp = check_dp(dp)
  return next((key for key in dps if abs(key - dp) <= 1e-6), None)


def _kept_thresholds(n: int) -> np.ndarray:
  """``j + slack`` in float32 for channels ``j < n``: channel ``j`` is kept where
  ``dp * n`` (one float32 product) exceeds it, i.e. ``j < ceil(dp * n - slack)``."""
  return (np.arange(n) + _KEEP_TOLERANCE).astype(np.float32)


def num_kept(n: int, dp: float) -> int:
  """Number of the first channels of ``n`` kept at DP ``dp`` (a static int).

  ``k = max(1, ceil(dp * n))``: the first channels are accumulated until the
  target fraction is reached (001 §II-A), so 25% of 10 channels keeps 3. A
  slack of 1e-3 absorbs floating-point error in ``dp * n``. At least one
  channel always survives. The same float32 comparisons as
  :func:`kept_width` for a traced ``dp``, so the sliced and masked paths keep
  the same channels even where ``dp * n`` lies at the slack's edge.
  """
  dp = check_dp(dp)
  if n < 1:
    raise ValueError(f"n must be a positive number of channels, got {n}")
  product = np.float32(dp) * np.float32(n)
  return max(1, int(np.count_nonzero(_kept_thresholds(n) < product)))


def kept_width(n: int, dp) -> Array:
  """:func:`num_kept` as an int32 scalar for a ``dp`` that may be traced.

  The product ``dp * n`` is compared with constant thresholds rather than
  shifted by the slack: XLA fuses a product and a subtraction into one
  rounding, which moved the result by one channel from :func:`num_kept` for
  some ``dp * n`` within float32 rounding of an integer plus the slack."""
  product = jnp.asarray(dp, jnp.float32) * np.float32(n)
  return jnp.maximum(1, jnp.sum(jnp.asarray(_kept_thresholds(n)) < product)).astype(jnp.int32)


def channel_mask(n: int, dp) -> Array:
  """Float mask ``(n,)`` with ones on the first ``num_kept(n, dp)`` channels.

  ``dp`` may be traced (the masked path); a concrete ``dp`` is checked to lie
  in (0, 1]. Either way the mask agrees with ``num_kept`` (:func:`kept_width`).
  """
  if not isinstance(dp, jax.core.Tracer):
    check_dp(dp)
  return (jnp.arange(n) < kept_width(n, dp)).astype(jnp.float32)


def masked_profile(gamma: Array, dp) -> Array:
  """``gamma`` with the coefficients beyond ``num_kept`` set to zero."""
  return gamma * channel_mask(gamma.shape[-1], dp).astype(gamma.dtype)


# --------------------------------------------------------------------------
# Binarized weights (001 §II-D, B-FC / B-Conv)
# --------------------------------------------------------------------------


def binarize(w: Array) -> Array:
  """sign(w) in {-1, +1} with the straight-through estimator.

  Forward: +1 where w >= 0, else -1. Backward: the gradient passes through
  where |w| <= 1 and is zero elsewhere (the hard-tanh estimator of
  BinaryConnect / BinaryNet).
  """
  # Not jnp.clip: its gradient is 1/2 at exactly |w| = 1 (tied max/min).
  clipped = jnp.where(jnp.abs(w) <= 1, w, jax.lax.stop_gradient(jnp.clip(w, -1.0, 1.0)))
  signs = jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)
  # signs + (c - c) is exactly signs even where XLA keeps excess precision
  # (bf16/f16); c + (signs - c) was not (e.g. 1.0009766 for bf16 w = 0.243).
  return signs + (clipped - jax.lax.stop_gradient(clipped))


# --------------------------------------------------------------------------
# Masked kernels (DP may be traced)
# --------------------------------------------------------------------------


def _scale_channels(x: Array, coefficients: Array) -> Array:
  """x * coefficients over the last (channel) axis, in x's dtype."""
  return x * coefficients.astype(x.dtype)


def _conv(x: Array, f: Array, strides, padding: Padding, groups: int = 1) -> Array:
  """The convolution itself, by the fastest implementation for the shape and backend."""
  return conv2d(x, f, strides, padding, groups)


def dense(x: Array, w: Array, gamma: Array, dp) -> Array:
  """Incomplete dense layer, masked: y_j = sum_{i<=k} gamma_i w_ji x_i (001 §II-C).

  x: ``(..., N)``; w: ``(N, M)``; gamma: ``(N,)``. Returns ``(..., M)``.
  """
  return _scale_channels(x, masked_profile(gamma, dp)) @ w.astype(x.dtype)


def conv(x: Array, f: Array, gamma: Array, dp, *, strides=1,
         padding: Padding = "SAME") -> Array:
  """Incomplete convolution, masked: y_j = sum_{i<=k} gamma_i (f_ji * x_i) (001 §II-C).

  x: ``(B, H, W, N)``; f: ``(kh, kw, N, M)``; gamma: ``(N,)``.
  """
  return _conv(_scale_channels(x, masked_profile(gamma, dp)), f, strides, padding)


def depthwise_conv(x: Array, f: Array, gamma: Array, dp, *, strides=1,
                   padding: Padding = "SAME") -> Array:
  """Incomplete depthwise convolution, masked: y_i = gamma_i (f_i * x_i), i <= k.

  x: ``(B, H, W, C)``; f: ``(kh, kw, 1, C)``. Channels beyond ``k`` are zero.
  """
  c = x.shape[-1]
  return _scale_channels(_conv(x, f, strides, padding, groups=c), masked_profile(gamma, dp))


def separable_conv(x: Array, f_depthwise: Array, g_pointwise: Array, gamma: Array, dp,
                   *, depthwise_gamma: Array | None = None, strides=1,
                   padding: Padding = "SAME") -> Array:
  """Incomplete depthwise-separable convolution, masked (001 §II-C, Fig. 4).

  y_j = sum_{i<=k} gamma_i (g_ji * (f_i * x_i)): IDP on the pointwise part.
  With ``depthwise_gamma`` the depthwise part is incomplete too (its own
  profile, the same ``k``).

  x: ``(B, H, W, N)``; f_depthwise: ``(kh, kw, 1, N)``;
  g_pointwise: ``(1, 1, N, M)``; gamma, depthwise_gamma: ``(N,)``.
  """
  c = x.shape[-1]
  hidden = _conv(x, f_depthwise, strides, padding, groups=c)
  if depthwise_gamma is not None:
    hidden = _scale_channels(hidden, masked_profile(depthwise_gamma, dp))
  return conv(hidden, g_pointwise, gamma, dp)


# --------------------------------------------------------------------------
# Sliced kernels (k static; only the kept prefix is computed)
# --------------------------------------------------------------------------


def _check_k(k: int, n: int, name: str = "k") -> None:
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"{name} must be a static int in [1, {n}], got {k!r}")


def _check_n_out(n_out: int | None, m: int) -> None:
  if n_out is not None:
    _check_k(n_out, m, "n_out")


def _prefix(x: Array, k: int) -> Array:
  """The first ``k`` channels of x (a no-op when x already has k)."""
  return x[..., :k]


def dense_sliced(x: Array, w: Array, gamma: Array, k: int,
                 n_out: int | None = None) -> Array:
  """Incomplete dense layer computing only the first ``k`` terms.

  Equals ``dense(x, w, gamma, dp)`` for ``k = num_kept(N, dp)``. ``x`` may
  carry N channels or already only k. With ``n_out``, only the first
  ``n_out`` outputs are computed. Returns ``(..., n_out or M)``.
  """
  _check_k(k, w.shape[0])
  _check_n_out(n_out, w.shape[1])
  w = w[:k, :n_out]
  return _scale_channels(_prefix(x, k), gamma[:k]) @ w.astype(x.dtype)


def conv_sliced(x: Array, f: Array, gamma: Array, k: int, n_out: int | None = None,
                *, strides=1, padding: Padding = "SAME") -> Array:
  """Incomplete convolution over the first ``k`` input channels only."""
  _check_k(k, f.shape[2])
  _check_n_out(n_out, f.shape[3])
  return _conv(_scale_channels(_prefix(x, k), gamma[:k]), f[:, :, :k, :n_out],
               strides, padding)


def depthwise_conv_sliced(x: Array, f: Array, gamma: Array, k: int, *, strides=1,
                          padding: Padding = "SAME") -> Array:
  """Incomplete depthwise convolution computing only the first ``k`` channels."""
  _check_k(k, f.shape[3])
  out = _conv(_prefix(x, k), f[..., :k], strides, padding, groups=k)
  return _scale_channels(out, gamma[:k])


def separable_conv_sliced(x: Array, f_depthwise: Array, g_pointwise: Array, gamma: Array,
                          k: int, n_out: int | None = None, *,
                          depthwise_gamma: Array | None = None, strides=1,
                          padding: Padding = "SAME") -> Array:
  """Incomplete depthwise-separable convolution over the first ``k`` channels."""
  _check_k(k, f_depthwise.shape[3])
  hidden = _conv(_prefix(x, k), f_depthwise[..., :k], strides, padding, groups=k)
  if depthwise_gamma is not None:
    hidden = _scale_channels(hidden, depthwise_gamma[:k])
  return conv_sliced(hidden, g_pointwise, gamma, k, n_out)
