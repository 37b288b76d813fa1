"""Tests for dynscale.idp: the incomplete dot products of paper 001, §II-A..D.

Every kernel is checked against the truncated sum

    y_j = sum_{i <= k} gamma_i w_ji x_i        (001 §II-C, dense / conv / separable)

written out below in plain numpy loops (zero padding, strides and the XLA
SAME rule computed by hand), with ``k`` obtained by exact rational arithmetic
on the decimal DP. Nothing in the references calls ``dynscale.idp``.

Compiles dominate the runtime, so each test runs all its cases (output
widths, strides, paddings, every DP and every k) in one ``jax.jit``.
"""

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynscale import idp
from dynscale.nn import spec

DPS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1, 0.2, ..., 1.0
DPS_ARRAY = np.asarray(DPS, np.float32)
PROFILE_NAMES = ("all-one", "harmonic", "linear", "half-exp")  # 001 §II-B, in order
NS = (1, 3, 8, 17)  # input channels N
MS = (1, 4)  # output channels M
KERNELS = (1, 3)
GEOMETRIES = [(s, p) for s in (1, 2) for p in ("SAME", "VALID")]  # (stride, padding)
B, H, W = 2, 5, 6  # conv input: W even, so SAME with stride 2 pads unevenly
# Sliced kernels compile once per k, so they run every k on fewer geometries.
SLICED_CASES = [  # (n, kernel, stride, padding)
    (1, 3, 1, "SAME"), (3, 3, 2, "SAME"), (8, 1, 2, "SAME"), (8, 3, 1, "VALID"),
    (17, 3, 2, "SAME"), (17, 1, 2, "VALID"),
]


# --------------------------------------------------------------------------
# Hand-written references
# --------------------------------------------------------------------------


def hand_k(n, dp):
  """k = max(1, ceil(dp * n)) in exact arithmetic on the decimal written dp."""
  return max(1, math.ceil(Fraction(repr(dp)) * n))


def hand_profile(name, n):
  """001 §II-B, coefficient by coefficient with the 1-based index i."""
  gamma = []
  for i in range(1, n + 1):
    if name == "all-one":
      gamma.append(1.0)
    elif name == "harmonic":
      gamma.append(1.0 / i)
    elif name == "linear":
      gamma.append(1.0 - i / n)
    elif name == "half-exp":
      gamma.append(1.0 if i < n / 2 else math.exp(n / 2 - i - 1))
  return np.array(gamma)


def hand_pads(size, kernel, stride, padding):
  """(low, high) zero padding of one spatial axis: VALID none; SAME by XLA's rule."""
  if padding == "VALID":
    return 0, 0
  out = -(-size // stride)  # ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def hand_padded(x, kh, kw, stride, padding):
  """x ``(B, H, W, ...)`` zero padded by hand on H and W."""
  top, bottom = hand_pads(x.shape[1], kh, stride, padding)
  left, right = hand_pads(x.shape[2], kw, stride, padding)
  padded = np.zeros((x.shape[0], x.shape[1] + top + bottom, x.shape[2] + left + right)
                    + x.shape[3:])
  padded[:, top:top + x.shape[1], left:left + x.shape[2]] = x
  return padded


def hand_conv2d(x, kern, stride, padding):
  """One 2-D kernel over one channel: x ``(B, H, W)``, kern ``(kh, kw)`` -> ``(B, Ho, Wo)``.

  Cross-correlation as in CNN layers, one output position at a time.
  """
  kh, kw = kern.shape
  xp = hand_padded(x, kh, kw, stride, padding)
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo))
  for oy in range(ho):
    for ox in range(wo):
      for a in range(kh):
        for c in range(kw):
          out[:, oy, ox] += kern[a, c] * xp[:, oy * stride + a, ox * stride + c]
  return out


def dense_terms(x, w):
  """terms[..., i, j] = w_ji x_i for x ``(..., N)`` and w ``(N, M)`` (the layout of idp)."""
  terms = np.zeros(x.shape + (w.shape[1],))
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      terms[..., i, j] = w[i, j] * x[..., i]
  return terms


def conv_terms(x, f, stride, padding):
  """terms[..., i, j] = f_ji * x_i: x ``(B, H, W, N)``, f ``(kh, kw, N, M)``."""
  per_pair = [[hand_conv2d(x[..., i], f[:, :, i, j], stride, padding)
               for j in range(f.shape[3])] for i in range(f.shape[2])]
  return np.array(per_pair).transpose(2, 3, 4, 0, 1)


def depthwise_terms(x, f, stride, padding):
  """terms[..., i] = f_i * x_i: x ``(B, H, W, C)``, f ``(kh, kw, 1, C)``."""
  per_channel = [hand_conv2d(x[..., i], f[:, :, 0, i], stride, padding)
                 for i in range(x.shape[-1])]
  return np.array(per_channel).transpose(1, 2, 3, 0)


def separable_terms(x, f_dw, g_pw, stride, padding, depthwise_gamma=None):
  """terms[..., i, j] = g_ji (dgamma_i (f_i * x_i)) for a 1x1 pointwise filter g."""
  hidden = depthwise_terms(x, f_dw, stride, padding)
  if depthwise_gamma is not None:
    for i in range(hidden.shape[-1]):
      hidden[..., i] *= depthwise_gamma[i]
  return dense_terms(hidden, g_pw[0, 0])


def truncated_sum(terms, gamma, k, n_out=None):
  """y_j = sum_{i <= k} gamma_i terms[..., i, j] for j < n_out (001 §II-C)."""
  m = terms.shape[-1] if n_out is None else n_out
  y = np.zeros(terms.shape[:-2] + (m,))
  for i in range(k):
    y += gamma[i] * terms[..., i, :m]
  return y


def truncated_depthwise(terms, gamma, k):
  """y_i = gamma_i (f_i * x_i) for i <= k, zero beyond (the masked form keeps C channels)."""
  y = np.zeros_like(terms)
  for i in range(k):
    y[..., i] = gamma[i] * terms[..., i]
  return y


# --------------------------------------------------------------------------
# Inputs and helpers
# --------------------------------------------------------------------------


def decreasing_gamma(rng, n):
  """A positive non-increasing float32 profile whose coefficients all differ."""
  return np.sort(rng.uniform(0.1, 1.0, n))[::-1].astype(np.float32)


def normal(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def conv_inputs(n, m, kernel, seed=0):
  rng = np.random.default_rng(seed)
  return normal(rng, B, H, W, n), normal(rng, kernel, kernel, n, m), decreasing_gamma(rng, n)


def depthwise_inputs(n, kernel, seed=0):
  rng = np.random.default_rng(seed)
  return normal(rng, B, H, W, n), normal(rng, kernel, kernel, 1, n), decreasing_gamma(rng, n)


def separable_inputs(n, m, kernel, seed=0):
  """x, depthwise filter, pointwise filter, gamma, depthwise gamma."""
  rng = np.random.default_rng(seed)
  return (normal(rng, B, H, W, n), normal(rng, kernel, kernel, 1, n), normal(rng, 1, 1, n, m),
          decreasing_gamma(rng, n), decreasing_gamma(rng, n))


def kept_levels(n):
  """The distinct ``k = num_kept(n, dp)`` over DPS, each checked against ``hand_k``."""
  ks = [idp.num_kept(n, dp) for dp in DPS]
  assert ks == [hand_k(n, dp) for dp in DPS]
  return sorted(set(ks))


def over_dps(kernel_fn, arrays, dps, **static):
  """``kernel_fn(*arrays, dp, **static)`` for each dp of the traced batch ``dps`` (vmap)."""
  return jax.vmap(lambda dp: kernel_fn(*arrays, dp, **static))(dps)


def run_compiled(fn, *args):
  """``jax.jit(fn)(*args)`` fetched to numpy: one compile per test, and indexing the
  results on the host compiles nothing more."""
  return jax.device_get(jax.jit(fn)(*args))


def assert_close(actual, expected, msg="", tol=2e-5):
  np.testing.assert_allclose(np.asarray(actual).astype(np.float64), expected, rtol=tol,
                             atol=tol, err_msg=msg)


# --------------------------------------------------------------------------
# The hand references themselves (so a broken reference cannot pass silently)
# --------------------------------------------------------------------------


def test_hand_pads_follow_xla_same_rule():
  assert hand_pads(5, 3, 1, "SAME") == (1, 1)  # (k - 1) // 2 each side
  assert hand_pads(6, 3, 2, "SAME") == (0, 1)  # total 1: on the high side
  assert hand_pads(5, 3, 2, "SAME") == (1, 1)  # total 2
  assert hand_pads(5, 1, 2, "SAME") == (0, 0)
  assert hand_pads(5, 3, 2, "VALID") == (0, 0)


def test_hand_conv2d_worked_example():
  # 3x3 input 1..9, kernel [[1, 0], [0, -1]] VALID: x[y, x] - x[y+1, x+1] = -4 everywhere.
  x = np.arange(1.0, 10.0).reshape(1, 3, 3)
  out = hand_conv2d(x, np.array([[1.0, 0.0], [0.0, -1.0]]), 1, "VALID")
  np.testing.assert_array_equal(out, np.full((1, 2, 2), -4.0))
  # A 1x1 kernel of 2 with stride 2 picks every other pixel.
  np.testing.assert_array_equal(hand_conv2d(x, np.array([[2.0]]), 2, "SAME")[0],
                                [[2.0, 6.0], [14.0, 18.0]])


# --------------------------------------------------------------------------
# num_kept and channel_mask (001 §II-A)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n, dp, k", [
    (10, 0.25, 3), (10, 0.3, 3), (10, 0.05, 1), (10, 0.01, 1), (10, 1.0, 10),
    (10, 0.7, 7), (10, 0.71, 8), (3, 0.5, 2), (1, 0.1, 1), (17, 0.1, 2), (64, 0.5, 32),
])
def test_num_kept_by_hand(n, dp, k):
  assert idp.num_kept(n, dp) == k
  assert hand_k(n, dp) == k


GRID_N = (1, 2, 3, 7, 10, 16, 17, 64, 100, 1000)
GRID_DP = DPS + (0.01, 0.05, 0.25, 0.33, 0.34, 0.55, 0.99, 1 / 3, 2 / 3)


def hand_mask(n, k):
  return np.array([1.0] * k + [0.0] * (n - k))


def test_num_kept_and_channel_mask_grid():
  # Traced DPs under jit: every n of the grid, every DP (vmap), one compile.
  masks = run_compiled(lambda dps: {n: jax.vmap(functools.partial(idp.channel_mask, n))(dps)
                                    for n in GRID_N}, np.asarray(GRID_DP, np.float32))
  for n in GRID_N:
    ks = [hand_k(n, dp) for dp in GRID_DP]
    assert min(ks) >= 1
    assert [idp.num_kept(n, dp) for dp in GRID_DP] == ks
    np.testing.assert_array_equal(masks[n], [hand_mask(n, k) for k in ks], err_msg=f"n={n}")
    np.testing.assert_array_equal(masks[n].sum(axis=1), ks)


@pytest.mark.parametrize("n", [10, 17])
def test_channel_mask_concrete_dp(n):
  for dp in GRID_DP:
    mask = idp.channel_mask(n, dp)
    np.testing.assert_array_equal(mask, hand_mask(n, hand_k(n, dp)), err_msg=f"dp={dp}")
    assert float(mask.sum()) == idp.num_kept(n, dp)


def test_channel_mask_traced_scalar_dp():
  mask_jit = jax.jit(lambda dp: idp.channel_mask(10, dp))
  for dp, k in [(0.05, 1), (0.25, 3), (0.3, 3), (0.31, 4), (1.0, 10)]:
    np.testing.assert_array_equal(mask_jit(jnp.float32(dp)), hand_mask(10, k))


# dp * n within float32 rounding of an integer plus the slack: a product and a
# subtraction fused into one rounding (XLA:CPU does) kept one channel more or less
EDGE_CASES = ((3, 0.667), (73, 0.137), (33, 0.697), (853, 0.517), (1273, 0.337),
              (143, 0.007))


def test_a_traced_dp_keeps_what_a_concrete_one_keeps_at_the_slacks_edge():
  """``num_kept`` (the sliced path, a static int) and the masked path's traced
  ``channel_mask`` / ``widths_at_dp`` keep the same channels for DPs whose
  ``dp * n`` sits at the slack's edge. Catches the traced count computed as
  ``ceil(dp * n - slack)``, which XLA rounds once where NumPy rounds twice."""
  for n, dp in EDGE_CASES:
    traced = jax.jit(lambda d, n=n: jnp.sum(idp.channel_mask(n, d)))(dp)
    assert int(traced) == idp.num_kept(n, dp), (n, dp)
    arch = spec.validate_architecture({"name": "edge", "input_shape": [4], "num_classes": 2,
                                       "layers": [{"kind": "dense", "features": n},
                                                  {"kind": "dense", "features": 2, "idp": True}]})
    traced_widths = jax.jit(lambda d, arch=arch: spec.widths_at_dp(arch, d))(dp)
    assert tuple(np.asarray(traced_widths).tolist()) == spec.widths_at_dp(arch, dp), (n, dp)


def test_num_kept_absorbs_float_error():
  # 0.1 * 3 = 0.30000000000000004 and float32(0.3) * 10 = 3.0000001: still 3 channels.
  assert idp.num_kept(10, 0.1 * 3) == 3
  assert idp.num_kept(10, np.float32(0.3)) == 3
  assert idp.num_kept(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001
  assert float(idp.channel_mask(10, jnp.float32(0.3)).sum()) == 3.0


# --------------------------------------------------------------------------
# Profiles (001 §II-B)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROFILE_NAMES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 16, 17])
def test_profile_formulas(name, n):
  gamma = idp.profile(name, n)
  assert gamma.shape == (n,) and gamma.dtype == jnp.float32
  np.testing.assert_allclose(gamma, hand_profile(name, n), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(idp.resolve_profile(name, n), gamma)
  assert np.all(np.diff(np.asarray(gamma)) <= 0)


def test_profile_worked_examples():
  # Each value written out from the formulas of 001 §II-B for N = 4 (and N = 5).
  np.testing.assert_allclose(idp.profile("all-one", 4), [1, 1, 1, 1])
  np.testing.assert_allclose(idp.profile("harmonic", 4), [1, 1 / 2, 1 / 3, 1 / 4], rtol=1e-6)
  np.testing.assert_allclose(idp.profile("linear", 4), [0.75, 0.5, 0.25, 0.0], atol=1e-7)
  e = math.e
  np.testing.assert_allclose(idp.profile("half-exp", 4), [1, 1 / e, 1 / e**2, 1 / e**3],
                             rtol=1e-6)
  # Odd N = 5: i < 2.5 keeps 1 for i = 1, 2; then exp(2.5 - i - 1).
  np.testing.assert_allclose(idp.profile("half-exp", 5), [1, 1, e**-1.5, e**-2.5, e**-3.5],
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["all-one", "harmonic", "half-exp"])
@pytest.mark.parametrize("n", [1, 4, 7])
def test_named_profiles_pass_check_profile(name, n):
  checked = idp.check_profile(idp.profile(name, n))
  np.testing.assert_allclose(checked, hand_profile(name, n), rtol=1e-6)


def test_resolve_profile_explicit_values():
  values = [1.0, 0.5, 0.5, 0.1]
  gamma = idp.resolve_profile(values, 4)
  assert gamma.dtype == jnp.float32
  np.testing.assert_array_equal(gamma, np.float32(values))
  with pytest.raises(ValueError, match="4 coefficients.*3 channels"):
    idp.resolve_profile(values, 3)


# --------------------------------------------------------------------------
# Dense (001 §II-C.1)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
def test_dense_matches_truncated_sum(n, m):
  rng = np.random.default_rng(n * 10 + m)
  x, w, gamma = normal(rng, 2, 3, n), normal(rng, n, m), decreasing_gamma(rng, n)  # x (..., N)
  terms = dense_terms(x, w)
  ks, n_out = kept_levels(n), (m + 1) // 2

  # Sliced, every k (the ends for M = 1): alternately the full input, and the input
  # already cut to its first k channels with only n_out outputs. (Dots are slow to
  # compile on CPU, hence not both every time.)
  if m == 1:
    ks = sorted({ks[0], ks[-1]})
  cut_ks = ks[1::2]

  def all_cases(x, w, gamma, dps):
    masked = over_dps(idp.dense, (x, w, gamma), dps)
    sliced = {k: idp.dense_sliced(x[..., :k], w, gamma, k, n_out) if k in cut_ks
              else idp.dense_sliced(x, w, gamma, k) for k in ks}
    return masked, sliced

  masked, sliced = run_compiled(all_cases, x, w, gamma, DPS_ARRAY)
  for row, dp in enumerate(DPS):
    assert_close(masked[row], truncated_sum(terms, gamma, hand_k(n, dp)), f"masked dp={dp}")
  for k in ks:
    expected = truncated_sum(terms, gamma, k, n_out if k in cut_ks else None)
    assert_close(sliced[k], expected, f"sliced k={k} cut={k in cut_ks}")


def test_dense_all_one_full_dp_is_plain_matmul():
  # 001 §II-C.1: with the all-one profile and 100% DP, y_j = sum_i w_ji x_i.
  rng = np.random.default_rng(1)
  x, w = normal(rng, 3, 5), normal(rng, 5, 2)
  expected = [[sum(w[i, j] * x[b, i] for i in range(5)) for j in range(2)] for b in range(3)]
  assert_close(idp.dense(x, w, jnp.ones(5), 1.0), np.array(expected))


# --------------------------------------------------------------------------
# Convolution (001 §II-C.2)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_conv_masked_matches_truncated_sum(n, kernel):
  data = {m: conv_inputs(n, m, kernel, seed=m) for m in MS}

  def all_cases(data, dps):
    return {(m, s, p): over_dps(idp.conv, data[m], dps, strides=s, padding=p)
            for m in MS for s, p in GEOMETRIES}

  outs = run_compiled(all_cases, data, DPS_ARRAY)
  for (m, s, p), by_dp in outs.items():
    x, f, gamma = data[m]
    terms = conv_terms(x, f, s, p)
    assert by_dp.shape == (len(DPS),) + terms.shape[:-2] + (m,)
    for row, dp in enumerate(DPS):
      assert_close(by_dp[row], truncated_sum(terms, gamma, hand_k(n, dp)),
                   f"m={m} stride={s} padding={p} dp={dp}")


@pytest.mark.parametrize("n, kernel, stride, padding", SLICED_CASES)
def test_conv_sliced_matches_truncated_sum(n, kernel, stride, padding):
  x, f, gamma = conv_inputs(n, 4, kernel, seed=1)
  ks, n_out = kept_levels(n), 2
  static = dict(strides=stride, padding=padding)

  def all_cases(x, f, gamma):
    full = {k: idp.conv_sliced(x, f, gamma, k, **static) for k in ks}
    # The input may already carry only its first k channels; n_out cuts the outputs.
    cut = {k: idp.conv_sliced(x[..., :k], f, gamma, k, n_out, **static) for k in ks}
    return full, cut

  full, cut = run_compiled(all_cases, x, f, gamma)
  terms = conv_terms(x, f, stride, padding)
  for k in ks:
    assert_close(full[k], truncated_sum(terms, gamma, k), f"k={k}")
    assert_close(cut[k], truncated_sum(terms, gamma, k, n_out), f"k={k} n_out={n_out}")


def test_conv_eager_equals_hand():
  # The plain (not jitted) path with a Python float DP.
  x, f, gamma = conv_inputs(5, 3, 3, seed=2)
  terms = conv_terms(x, f, 2, "SAME")
  for dp in (0.2, 0.6, 1.0):
    out = idp.conv(x, f, gamma, dp, strides=2, padding="SAME")
    assert_close(out, truncated_sum(terms, gamma, hand_k(5, dp)), f"dp={dp}")


def test_conv_explicit_padding_pairs():
  # Padding as ((low, high), (low, high)), as lax takes it: rows (1, 1), columns (0, 1).
  x, f, gamma = conv_inputs(4, 2, 3, seed=3)
  xp = np.zeros((B, H + 2, W + 1, 4))
  xp[:, 1:1 + H, :W] = x
  terms = conv_terms(xp, f, 1, "VALID")
  assert terms.shape[1:3] == (H, W - 1)
  assert_close(idp.conv(x, f, gamma, 0.5, padding=((1, 1), (0, 1))),
               truncated_sum(terms, gamma, 2))
  assert_close(idp.conv_sliced(x, f, gamma, 2, padding=((1, 1), (0, 1))),
               truncated_sum(terms, gamma, 2))


# --------------------------------------------------------------------------
# Depthwise and depthwise-separable convolution (001 §II-C.3)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_depthwise_masked_matches_hand(n, kernel):
  x, f, gamma = depthwise_inputs(n, kernel, seed=n)

  def all_cases(x, f, gamma, dps):
    return {(s, p): over_dps(idp.depthwise_conv, (x, f, gamma), dps, strides=s, padding=p)
            for s, p in GEOMETRIES}

  outs = run_compiled(all_cases, x, f, gamma, DPS_ARRAY)
  for (s, p), by_dp in outs.items():
    terms = depthwise_terms(x, f, s, p)
    for row, dp in enumerate(DPS):
      assert_close(by_dp[row], truncated_depthwise(terms, gamma, hand_k(n, dp)),
                   f"stride={s} padding={p} dp={dp}")


@pytest.mark.parametrize("n, kernel, stride, padding", SLICED_CASES)
def test_depthwise_sliced_matches_hand(n, kernel, stride, padding):
  x, f, gamma = depthwise_inputs(n, kernel, seed=n + 1)
  ks = kept_levels(n)
  outs = run_compiled(lambda x, f, gamma: {
      k: idp.depthwise_conv_sliced(x, f, gamma, k, strides=stride, padding=padding)
      for k in ks}, x, f, gamma)
  terms = depthwise_terms(x, f, stride, padding)
  for k in ks:
    assert outs[k].shape == terms.shape[:-1] + (k,)  # only the first k channels computed
    assert_close(outs[k], truncated_depthwise(terms, gamma, k)[..., :k], f"k={k}")


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_separable_masked_matches_hand(n, kernel):
  x, f_dw, g_pw, gamma, dgamma = separable_inputs(n, 4, kernel, seed=n)

  def all_cases(x, f_dw, g_pw, gamma, dgamma, dps):
    # depthwise_gamma on two of the four geometries
    return {(s, p, i in (1, 2)): over_dps(idp.separable_conv, (x, f_dw, g_pw, gamma), dps,
                                          depthwise_gamma=dgamma if i in (1, 2) else None,
                                          strides=s, padding=p)
            for i, (s, p) in enumerate(GEOMETRIES)}

  outs = run_compiled(all_cases, x, f_dw, g_pw, gamma, dgamma, DPS_ARRAY)
  for (s, p, with_dg), by_dp in outs.items():
    terms = separable_terms(x, f_dw, g_pw, s, p, dgamma if with_dg else None)
    for row, dp in enumerate(DPS):
      assert_close(by_dp[row], truncated_sum(terms, gamma, hand_k(n, dp)),
                   f"stride={s} padding={p} depthwise_gamma={with_dg} dp={dp}")


@pytest.mark.parametrize("n, kernel, stride, padding", SLICED_CASES)
def test_separable_sliced_matches_hand(n, kernel, stride, padding):
  x, f_dw, g_pw, gamma, dgamma = separable_inputs(n, 4, kernel, seed=n + 2)
  ks, n_out = kept_levels(n), 2
  static = dict(strides=stride, padding=padding)
  dgamma_ks = ks[1::2]  # alternately without, and with depthwise_gamma and n_out

  def all_cases(x, f_dw, g_pw, gamma, dgamma):
    return {k: idp.separable_conv_sliced(x, f_dw, g_pw, gamma, k, n_out, depthwise_gamma=dgamma,
                                         **static) if k in dgamma_ks
            else idp.separable_conv_sliced(x, f_dw, g_pw, gamma, k, **static) for k in ks}

  outs = run_compiled(all_cases, x, f_dw, g_pw, gamma, dgamma)
  plain = separable_terms(x, f_dw, g_pw, stride, padding)
  with_dgamma = separable_terms(x, f_dw, g_pw, stride, padding, dgamma)
  for k in ks:
    if k in dgamma_ks:
      expected = truncated_sum(with_dgamma, gamma, k, n_out)
    else:
      expected = truncated_sum(plain, gamma, k)
    assert_close(outs[k], expected, f"k={k}")


def test_separable_and_depthwise_eager_with_python_dp():
  x, f_dw, g_pw, gamma, dgamma = separable_inputs(6, 3, 3, seed=11)
  terms = separable_terms(x, f_dw, g_pw, 1, "SAME", dgamma)
  out = idp.separable_conv(x, f_dw, g_pw, gamma, 0.5, depthwise_gamma=dgamma)
  assert_close(out, truncated_sum(terms, gamma, 3))
  out = idp.depthwise_conv(x, f_dw, gamma, 0.5)
  assert_close(out, truncated_depthwise(depthwise_terms(x, f_dw, 1, "SAME"), gamma, 3))


# --------------------------------------------------------------------------
# vmap over DPs equals stacking; gradients
# --------------------------------------------------------------------------


def test_vmap_over_dps_equals_stacked_results():
  x, f, gamma = conv_inputs(8, 3, 3, seed=4)
  xd, w = x[:, 0, 0], f[1, 1]
  dps = jnp.asarray(DPS_ARRAY)
  batched = jax.vmap(lambda dp: idp.dense(xd, w, gamma, dp))(dps)
  stacked = np.stack([idp.dense(xd, w, gamma, dp) for dp in DPS])
  np.testing.assert_allclose(batched, stacked, rtol=1e-6, atol=1e-6)
  terms = dense_terms(xd, w)
  assert_close(batched, np.stack([truncated_sum(terms, gamma, hand_k(8, dp)) for dp in DPS]))
  batched = jax.vmap(lambda dp: idp.conv(x, f, gamma, dp))(dps)
  stacked = np.stack([idp.conv(x, f, gamma, dp) for dp in DPS])
  np.testing.assert_allclose(batched, stacked, rtol=1e-5, atol=1e-5)


def dense_grads_by_hand(x, w, gamma, k, n_out=None):
  """Gradients of L = sum_b sum_{j < n_out} sum_{i <= k} gamma_i w_ji x_bi, by hand.

  dL/dw_ij = gamma_i sum_b x_bi; dL/dx_bi = gamma_i sum_j w_ij;
  dL/dgamma_i = sum_b x_bi sum_j w_ij; all for i <= k (and j < n_out), zero elsewhere.
  Returned in the order (dx, dw, dgamma).
  """
  n, m = w.shape
  m_out = m if n_out is None else n_out
  dx, dw, dgamma = np.zeros(x.shape), np.zeros((n, m)), np.zeros(n)
  for i in range(k):
    for j in range(m_out):
      dw[i, j] = gamma[i] * x[:, i].sum()
    dx[:, i] = gamma[i] * w[i, :m_out].sum()
    dgamma[i] = x[:, i].sum() * w[i, :m_out].sum()
  return dx, dw, dgamma


def dense_inputs(n, seed):
  rng = np.random.default_rng(seed)
  return normal(rng, 3, n), normal(rng, n, 4), decreasing_gamma(rng, n)


def _dense_loss(x, w, gamma, dp):
  return idp.dense(x, w, gamma, dp).sum()


def _dense_sliced_loss(x, w, gamma, k, n_out):
  return idp.dense_sliced(x, w, gamma, k, n_out).sum()


def assert_grads(grads, hand, msg):
  for name, got, want in zip(("dx", "dw", "dgamma"), grads, hand):
    assert_close(got, want, f"{name} {msg}")


@pytest.mark.parametrize("n", NS)
def test_dense_grad_masked(n):
  x, w, gamma = dense_inputs(n, seed=n)
  grad_fn = jax.grad(_dense_loss, argnums=(0, 1, 2))
  by_dp = run_compiled(jax.vmap(grad_fn, in_axes=(None, None, None, 0)), x, w, gamma,
                       DPS_ARRAY)
  for row, dp in enumerate(DPS):
    k = hand_k(n, dp)
    grads = [g[row] for g in by_dp]
    assert_grads(grads, dense_grads_by_hand(x, w, gamma, k), f"dp={dp}")
    np.testing.assert_array_equal(np.asarray(grads[1])[k:], 0.0)  # rows i > k get nothing


@pytest.mark.parametrize("n, n_out", [(3, None), (8, 2), (17, None)])
def test_dense_grad_sliced(n, n_out):
  x, w, gamma = dense_inputs(n, seed=n + 100)
  ks = sorted({hand_k(n, dp) for dp in (0.1, 0.5, 1.0)})
  grad_fn = jax.grad(_dense_sliced_loss, argnums=(0, 1, 2))
  by_k = run_compiled(lambda x, w, gamma: {k: grad_fn(x, w, gamma, k, n_out) for k in ks},
                      x, w, gamma)
  for k in ks:
    assert_grads(by_k[k], dense_grads_by_hand(x, w, gamma, k, n_out), f"k={k}")
    dw = np.asarray(by_k[k][1])  # gradient for the full w: zero outside the used block
    np.testing.assert_array_equal(dw[k:], 0.0)
    np.testing.assert_array_equal(dw[:, n_out or w.shape[1]:], 0.0)


def conv_filter_grad_by_hand(x, f_shape, gamma, k, stride, padding, n_out=None):
  """d sum(y) / d f[a, c, i, j] = gamma_i sum_{b, oy, ox} xpad[b, s oy + a, s ox + c, i], i <= k."""
  kh, kw, _, m = f_shape
  xp = hand_padded(x, kh, kw, stride, padding)
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  grad = np.zeros(f_shape)
  for i in range(k):
    for a in range(kh):
      for c in range(kw):
        window_sum = sum(xp[:, stride * oy + a, stride * ox + c, i].sum()
                         for oy in range(ho) for ox in range(wo))
        grad[a, c, i, :m if n_out is None else n_out] = gamma[i] * window_sum
  return grad


@pytest.mark.parametrize("stride, padding", GEOMETRIES)
def test_conv_grad_masked_and_sliced(stride, padding):
  x, f, gamma = conv_inputs(5, 3, 3, seed=5)
  dps, n_out = (0.2, 0.6, 1.0), 2
  ks = [hand_k(5, dp) for dp in dps]
  static = dict(strides=stride, padding=padding)

  def grads(f, dps):
    masked = jax.vmap(jax.grad(lambda f, dp: idp.conv(x, f, gamma, dp, **static).sum()),
                      in_axes=(None, 0))(f, dps)
    sliced = {k: jax.grad(lambda f, k=k: idp.conv_sliced(x, f, gamma, k, n_out,
                                                         **static).sum())(f) for k in ks}
    return masked, sliced

  masked, sliced = run_compiled(grads, f, np.float32(dps))
  for row, k in enumerate(ks):
    assert_close(masked[row], conv_filter_grad_by_hand(x, f.shape, gamma, k, stride, padding),
                 f"masked k={k}", tol=1e-4)
    np.testing.assert_array_equal(np.asarray(masked[row])[:, :, k:], 0.0)
    assert_close(sliced[k], conv_filter_grad_by_hand(x, f.shape, gamma, k, stride, padding,
                                                     n_out), f"sliced k={k}", tol=1e-4)
    np.testing.assert_array_equal(np.asarray(sliced[k])[:, :, k:], 0.0)
    np.testing.assert_array_equal(np.asarray(sliced[k])[..., n_out:], 0.0)


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, weights_too", [(jnp.bfloat16, False), (jnp.float16, True)])
def test_dtype_kept(dtype, weights_too):
  n, k = 6, 3  # dp 0.5 keeps 3 of 6
  x, f, gamma = conv_inputs(n, 3, 3, seed=6)
  _, fdw, _ = depthwise_inputs(n, 3, seed=7)
  # Inputs rounded to the low precision first, so only the arithmetic differs.
  x = jnp.asarray(x, dtype)
  f, fdw = (jnp.asarray(a, dtype if weights_too else jnp.float32) for a in (f, fdw))
  g_pw = f[1:2, 1:2]
  xr, fr, fdwr = (np.asarray(a).astype(np.float32) for a in (x, f, fdw))

  def all_kernels(x, f, fdw, g_pw, gamma, dp):
    return {
        "dense": idp.dense(x[:, 0, 0], f[1, 1], gamma, dp),
        "dense_sliced": idp.dense_sliced(x[:, 0, 0], f[1, 1], gamma, k),
        "conv": idp.conv(x, f, gamma, dp),
        "conv_sliced": idp.conv_sliced(x, f, gamma, k),
        "depthwise": idp.depthwise_conv(x, fdw, gamma, dp),
        "depthwise_sliced": idp.depthwise_conv_sliced(x, fdw, gamma, k),
        "separable": idp.separable_conv(x, fdw, g_pw, gamma, dp, depthwise_gamma=gamma),
        "separable_sliced": idp.separable_conv_sliced(x, fdw, g_pw, gamma, k,
                                                      depthwise_gamma=gamma),
    }

  outs = run_compiled(all_kernels, x, f, fdw, g_pw, gamma, np.float32(0.5))
  dense_ref = truncated_sum(dense_terms(xr[:, 0, 0], fr[1, 1]), gamma, k)
  conv_ref = truncated_sum(conv_terms(xr, fr, 1, "SAME"), gamma, k)
  dw_ref = truncated_depthwise(depthwise_terms(xr, fdwr, 1, "SAME"), gamma, k)
  sep_ref = truncated_sum(separable_terms(xr, fdwr, fr[1:2, 1:2], 1, "SAME", gamma), gamma, k)
  refs = {"dense": dense_ref, "dense_sliced": dense_ref, "conv": conv_ref,
          "conv_sliced": conv_ref, "depthwise": dw_ref, "depthwise_sliced": dw_ref[..., :k],
          "separable": sep_ref, "separable_sliced": sep_ref}
  for name, out in outs.items():
    assert out.dtype == dtype, name
    scale = max(1.0, float(np.abs(refs[name]).max()))
    np.testing.assert_allclose(np.asarray(out).astype(np.float32), refs[name],
                               atol=0.05 * scale, rtol=0, err_msg=name)


# --------------------------------------------------------------------------
# binarize (001 §II-D)
# --------------------------------------------------------------------------


def test_binarize_forward_and_straight_through_gradient():
  w = np.float32([-3.0, -1.5, -1.0, -0.7, -1e-6, 0.0, 1e-6, 0.3, 1.0, 1.2, 5.0])
  upstream = np.arange(1.0, 12.0, dtype=np.float32)  # a distinct upstream gradient per entry
  values, grad = jax.jit(lambda w: (idp.binarize(w),
                                    jax.grad(lambda v: (idp.binarize(v) * upstream).sum())(w)))(w)
  np.testing.assert_array_equal(values, [-1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1])
  # Straight-through: the upstream gradient passes where |w| <= 1 (ends included).
  expected = [upstream[i] if abs(v) <= 1 else 0.0 for i, v in enumerate(w)]
  np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_binarize_dtype_and_use_in_dense(dtype):
  rng = np.random.default_rng(9)
  w = jnp.asarray(normal(rng, 5, 2), dtype)
  x, ones = normal(rng, 3, 5), np.ones(5, np.float32)
  # dense casts the binarized bf16/f16 weights to f32: XLA's excess precision once let
  # 1.0009766 through here instead of 1.
  bw, y = jax.jit(lambda w: (idp.binarize(w), idp.dense(x, idp.binarize(w), ones, 0.6)))(w)
  assert bw.dtype == dtype
  signs = np.where(np.asarray(w).astype(np.float32) >= 0, 1.0, -1.0)
  np.testing.assert_array_equal(np.asarray(bw).astype(np.float32), signs)
  assert_close(y, truncated_sum(dense_terms(x, signs), ones, 3))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dp", [0.0, -0.1, 1.0001, 1.5, 2, float("nan")])
def test_bad_dp_raises(dp):
  for fn in (lambda: idp.num_kept(10, dp), lambda: idp.check_dp(dp)):
    with pytest.raises(ValueError, match=r"dp.*\(0, 1\]"):
      fn()


def test_num_kept_bad_n_raises():
  with pytest.raises(ValueError, match="n"):
    idp.num_kept(0, 0.5)


def test_a_profile_may_fall_to_zero_after_a_positive_first_coefficient():
  """001's linear profile ``1 - i / N`` ends at 0: only gamma_1 must be positive."""
  np.testing.assert_array_equal(idp.check_profile([1.0, 0.5, 0.0]), [1.0, 0.5, 0.0])
  np.testing.assert_allclose(idp.resolve_profile([1.0, 0.0, 0.0], 3), [1.0, 0.0, 0.0])


@pytest.mark.parametrize("values", [[1.0, 0.5, 0.7], [1.0, 1.0, 1.0001], [0.5, 0.2, 0.2, 0.3]])
def test_non_monotone_profile_raises(values):
  with pytest.raises(ValueError, match="non-increasing"):
    idp.check_profile(values)
  with pytest.raises(ValueError, match="non-increasing"):
    idp.resolve_profile(values, len(values))


@pytest.mark.parametrize("values", [[0.0, 0.0], [-1.0, -2.0], [0.0]])
def test_non_positive_first_coefficient_raises(values):
  with pytest.raises(ValueError, match=r"gamma_1.*> 0"):
    idp.check_profile(values)
  with pytest.raises(ValueError, match=r"gamma_1.*> 0"):
    idp.resolve_profile(values, len(values))


@pytest.mark.parametrize("values", [[], [[1.0, 0.5]], [1.0, float("nan")], [float("inf"), 1.0]])
def test_malformed_profile_raises(values):
  with pytest.raises(ValueError, match="profile"):
    idp.check_profile(values)


@pytest.mark.parametrize("name", ["cosine", "Linear", "half_exp", ""])
def test_unknown_profile_name_lists_allowed(name):
  for fn in (idp.profile, idp.resolve_profile):
    with pytest.raises(ValueError) as info:
      fn(name, 4)
    for allowed in PROFILE_NAMES:
      assert allowed in str(info.value)


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_bad_profile_length_raises(n):
  with pytest.raises(ValueError, match="n"):
    idp.profile("linear", n)


@pytest.mark.parametrize("k", [0, -1, 6, 2.0])
def test_sliced_k_out_of_range_raises(k):
  x = jnp.ones((1, 4, 4, 5))
  gamma = jnp.ones(5)
  calls = [
      lambda: idp.dense_sliced(x[:, 0, 0], jnp.ones((5, 2)), gamma, k),
      lambda: idp.conv_sliced(x, jnp.ones((3, 3, 5, 2)), gamma, k),
      lambda: idp.depthwise_conv_sliced(x, jnp.ones((3, 3, 1, 5)), gamma, k),
      lambda: idp.separable_conv_sliced(x, jnp.ones((3, 3, 1, 5)), jnp.ones((1, 1, 5, 2)),
                                        gamma, k),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=r"k must be .*\[1, 5\]"):
      call()


def test_out_of_range_n_out_and_concrete_dp_are_refused():
  x, w, g = jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.ones(4)
  with pytest.raises(ValueError, match=r"n_out must be a static int in \[1, 3\]"):
    idp.dense_sliced(x, w, g, 2, n_out=7)
  with pytest.raises(ValueError, match=r"n_out must be a static int in \[1, 3\]"):
    idp.dense_sliced(x, w, g, 2, n_out=0)
  for dp in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"dp must be in \(0, 1\]"):
      idp.dense(x, w, g, dp)
