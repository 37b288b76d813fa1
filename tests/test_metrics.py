"""Tests for dynscale.metrics: hand-counted FLOPs, array-counted params, survey Eq. 8-10, XLA."""

import jax
import jax.numpy as jnp
import pytest

from dynscale import metrics

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, padding="SAME", groups=1):
  return jax.lax.conv_general_dilated(x,
                                      w, (1, 1),
                                      padding,
                                      dimension_numbers=_DN,
                                      feature_group_count=groups)


def _hand_conv_ops(h, w, c_in, c_out, kh, kw, bias):
  """Counts, output position by output position, the multiply-adds of a conv (+1 bias add)."""
  count = 0
  for _y in range(h):
    for _x in range(w):
      for _co in range(c_out):
        for _ci in range(c_in):
          for _i in range(kh):
            for _j in range(kw):
              count += 1  # one multiply-add
        if bias:
          count += 1  # the bias add
  return count


# --------------------------------------------------------------------------
# Analytic FLOPs against hand counts
# --------------------------------------------------------------------------


def test_conv_flops_worked_example():
  # SANP §4.1.1 by hand: H=W=4, Cin=3, Cout=2, k=3 -> 4*4*(3*9+1)*2.
  assert 4 * 4 * (3 * 9 + 1) * 2 == 896
  assert _hand_conv_ops(4, 4, 3, 2, 3, 3, bias=True) == 896
  assert metrics.conv_flops(4, 4, 3, 2, 3) == 896
  assert metrics.conv_flops(4, 4, 3, 2, 3, bias=False) == 4 * 4 * 3 * 9 * 2  # 864


@pytest.mark.parametrize(
    "h, w, c_in, c_out, kernel, kh, kw",
    [(4, 4, 3, 2, 3, 3, 3), (5, 3, 2, 4, (3, 5), 3, 5), (2, 6, 1, 1, 1, 1, 1),
     (3, 3, 4, 7, (2, 2), 2, 2)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_flops_hand_loop(h, w, c_in, c_out, kernel, kh, kw, bias):
  expected = _hand_conv_ops(h, w, c_in, c_out, kh, kw, bias)
  assert metrics.conv_flops(h, w, c_in, c_out, kernel, bias=bias) == expected


def test_dense_flops_worked_example():
  # (Cin + 1) * Cout with Cin=7, Cout=4: each output does 7 multiply-adds + 1 bias add.
  count = 0
  for _o in range(4):
    count += 7 + 1
  assert count == (7 + 1) * 4 == 32
  assert metrics.dense_flops(7, 4) == 32
  assert metrics.dense_flops(7, 4, bias=False) == 28


def test_depthwise_flops_worked_example():
  # H=W=5, C=3, k=3: each output element sees ONE input channel: 5*5*(9+1)*3 = 750.
  count = 0
  for _y in range(5):
    for _x in range(5):
      for _c in range(3):
        count += 3 * 3  # one k x k filter over its own channel
        count += 1  # bias
  assert count == 5 * 5 * (9 + 1) * 3 == 750
  assert metrics.depthwise_conv_flops(5, 5, 3, 3) == 750
  assert metrics.depthwise_conv_flops(5, 5, 3, 3, bias=False) == 675
  assert metrics.depthwise_conv_flops(5, 5, 3, (1, 3)) == 5 * 5 * (3 + 1) * 3


def test_pointwise_flops_worked_example():
  # H=W=6, Cin=4, Cout=8, k=1: 6*6*(4+1)*8 = 1440.
  assert _hand_conv_ops(6, 6, 4, 8, 1, 1, bias=True) == 6 * 6 * (4 + 1) * 8 == 1440
  assert metrics.pointwise_conv_flops(6, 6, 4, 8) == 1440
  assert metrics.pointwise_conv_flops(6, 6, 4, 8, bias=False) == 6 * 6 * 4 * 8


def test_flops_scale_with_active_channels():
  # Half the input and half the output channels (a 50% DP slice): the weight term drops 4x.
  full = metrics.conv_flops(8, 8, 16, 32, 3, bias=False)
  half = metrics.conv_flops(8, 8, 8, 16, 3, bias=False)
  assert full == 8 * 8 * 16 * 9 * 32
  assert half * 4 == full


# --------------------------------------------------------------------------
# Parameter counts against the sizes of real weight arrays
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kernel, kh, kw", [(3, 3, 3), ((1, 5), 1, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_params_match_arrays(kernel, kh, kw, bias):
  c_in, c_out = 3, 5
  w = jnp.zeros((kh, kw, c_in, c_out))
  b = jnp.zeros((c_out,))
  # the weight really is a conv kernel for these channels
  assert _conv(jnp.ones((1, 6, 6, c_in)), w).shape == (1, 6, 6, c_out)
  assert metrics.conv_params(c_in, c_out, kernel, bias=bias) == w.size + (b.size if bias else 0)


def test_dense_params_match_arrays():
  w, b = jnp.zeros((7, 4)), jnp.zeros((4,))
  assert (jnp.ones((2, 7)) @ w + b).shape == (2, 4)
  assert metrics.dense_params(7, 4) == w.size + b.size == 32
  assert metrics.dense_params(7, 4, bias=False) == w.size


def test_depthwise_params_match_arrays():
  c = 6
  w, b = jnp.zeros((3, 3, 1, c)), jnp.zeros((c,))
  assert _conv(jnp.ones((1, 5, 5, c)), w, groups=c).shape == (1, 5, 5, c)
  assert metrics.depthwise_conv_params(c, 3) == w.size + b.size == 9 * 6 + 6
  assert metrics.depthwise_conv_params(c, 3, bias=False) == w.size


def test_pointwise_params_match_arrays():
  w, b = jnp.zeros((1, 1, 4, 8)), jnp.zeros((8,))
  assert _conv(jnp.ones((1, 3, 3, 4)), w).shape == (1, 3, 3, 8)
  assert metrics.pointwise_conv_params(4, 8) == w.size + b.size == 40


def test_batchnorm_params_match_arrays():
  scale, offset = jnp.ones((5,)), jnp.zeros((5,))  # running mean/var are not parameters
  assert metrics.batchnorm_params(5) == scale.size + offset.size == 10


# --------------------------------------------------------------------------
# LayerCost, totals, table
# --------------------------------------------------------------------------


def _toy_costs():
  return [
      metrics.LayerCost("conv1", "conv", 896, 3 * 3 * 3 * 2 + 2),
      metrics.LayerCost("bn1", "bn", 0, 4),
      metrics.LayerCost("fc", "dense", 32, 32),
  ]


def test_total_sums_layers():
  t = metrics.total(_toy_costs())
  assert (t.flops, t.params) == (896 + 0 + 32, 56 + 4 + 32)
  assert t.name == "total"


def test_format_table_lists_layers_and_totals():
  table = metrics.format_table(_toy_costs())
  lines = table.splitlines()
  for name in ("conv1", "bn1", "fc"):
    assert any(line.startswith(name) for line in lines)
  assert lines[-1].split() == ["total", "928", "92"]
  assert "FLOPs" in lines[0] and "params" in lines[0]


def test_layer_cost_is_frozen_and_validated():
  cost = metrics.LayerCost("fc", "dense", 1, 1)
  with pytest.raises(AttributeError):
    cost.flops = 2
  with pytest.raises(ValueError, match="flops"):
    metrics.LayerCost("fc", "dense", -1, 1)
  with pytest.raises(ValueError, match="params"):
    metrics.LayerCost("fc", "dense", 1, 2.5)
  with pytest.raises(ValueError, match="costs"):
    metrics.total([])


# --------------------------------------------------------------------------
# Survey Eq. 8-10
# --------------------------------------------------------------------------


def test_compression_rate_eq8():
  # alpha = a / a*: 1000 params -> 250 params is a 4x compression.
  assert metrics.compression_rate(1000, 250) == pytest.approx(1000 / 250) == 4.0


def test_index_space_saving_eq9():
  # beta = (a - a*) / a*: (1000 - 250) / 250 = 750 / 250 = 3.
  assert metrics.index_space_saving(1000, 250) == pytest.approx(3.0)
  assert metrics.index_space_saving(10, 10) == 0.0


def test_speedup_rate_eq10():
  # delta = s / s*: 0.9 s -> 0.3 s is a 3x speedup.
  assert metrics.speedup_rate(0.9, 0.3) == pytest.approx(3.0)
  assert metrics.speedup_rate(2.0, 4.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "fn, bad_args, field",
    [
        (metrics.compression_rate, (0, 10), "params_original"),
        (metrics.compression_rate, (10, -1), "params_compressed"),
        (metrics.index_space_saving, (0, 10), "dims_original"),
        (metrics.index_space_saving, (10, 0.0), "dims_compressed"),
        (metrics.speedup_rate, (float("nan"), 1.0), "time_original"),
        (metrics.speedup_rate, (1.0, 0.0), "time_compressed"),
    ],
)
def test_survey_measures_reject_non_positive(fn, bad_args, field):
  with pytest.raises(ValueError, match=field):
    fn(*bad_args)


# --------------------------------------------------------------------------
# Validation of layer dims
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, args, field",
    [
        (metrics.conv_flops, (0, 4, 3, 2, 3), "h_out"),
        (metrics.conv_flops, (4, -1, 3, 2, 3), "w_out"),
        (metrics.conv_flops, (4, 4, 0, 2, 3), "c_in"),
        (metrics.conv_flops, (4, 4, 3, 0, 3), "c_out"),
        (metrics.conv_flops, (4, 4, 3, 2, 0), "kernel"),
        (metrics.conv_flops, (4, 4, 3, 2, (3, 0)), r"kernel\[1\]"),
        (metrics.conv_flops, (4, 4, 3, 2, (3, 3, 3)), "kernel"),
        (metrics.conv_flops, (4.0, 4, 3, 2, 3), "h_out"),
        (metrics.dense_flops, (0, 4), "c_in"),
        (metrics.depthwise_conv_flops, (4, 4, 0, 3), "channels"),
        (metrics.pointwise_conv_flops, (4, 4, 3, -2), "c_out"),
        (metrics.conv_params, (3, 2, (0, 3)), r"kernel\[0\]"),
        (metrics.dense_params, (4, 0), "c_out"),
        (metrics.depthwise_conv_params, (3, -3), "kernel"),
        (metrics.depthwise_conv_params, (0, 3), "channels"),
        (metrics.pointwise_conv_params, (0, 2), "c_in"),
        (metrics.batchnorm_params, (0,), "c"),
    ],
)
def test_non_positive_dims_raise(fn, args, field):
  with pytest.raises(ValueError, match=field):
    fn(*args)


# --------------------------------------------------------------------------
# XLA cross-check (XLA counts a multiply-add as 2 flops, a bias add as 1)
# --------------------------------------------------------------------------

_X = jnp.ones((1, 8, 8, 3))
_W = jnp.ones((3, 3, 3, 5))
_B = jnp.ones((5,))


def test_xla_valid_conv_is_twice_analytic():
  # VALID: 8x8 -> 6x6; no padding, so every tap is a real multiply-add. Tolerance: 1%.
  macs = metrics.conv_flops(6, 6, 3, 5, 3, bias=False)
  assert metrics.xla_flops(_conv, _X, _W, "VALID", static_argnums=(2,)) == pytest.approx(2 * macs,
                                                                                         rel=0.01)
  with_bias = metrics.conv_flops(6, 6, 3, 5, 3, bias=True)
  outputs = 6 * 6 * 5
  got = metrics.xla_flops(lambda x, w, b: _conv(x, w, "VALID") + b, _X, _W, _B)
  assert got == pytest.approx(2 * with_bias - outputs, rel=0.01)


def test_xla_same_conv_within_border_tolerance():
  # SAME on 8x8 with k=3: XLA skips taps that fall in the zero padding. Along one axis the
  # in-bounds taps are 2 + 3*6 + 2 = 22 of 3*8 = 24, counted here by hand.
  in_bounds = 0
  for y in range(8):
    for x in range(8):
      for i in (-1, 0, 1):
        for j in (-1, 0, 1):
          in_bounds += 0 <= y + i < 8 and 0 <= x + j < 8
  assert in_bounds == 22 * 22
  got = metrics.xla_flops(_conv, _X, _W)
  assert got == pytest.approx(2 * in_bounds * 3 * 5, rel=0.01)
  # Against the analytic (padding-blind) count: XLA is lower by the border fraction
  # 1 - (22/24)^2 ~ 16%; stated tolerance 20%.
  analytic = metrics.conv_flops(8, 8, 3, 5, 3, bias=False)
  assert 0.80 * 2 * analytic <= got <= 2 * analytic


def test_xla_dense_is_twice_analytic():
  a, w, b = jnp.ones((1, 7)), jnp.ones((7, 4)), jnp.ones((4,))
  assert metrics.xla_flops(jnp.matmul, a,
                           w) == pytest.approx(2 * metrics.dense_flops(7, 4, bias=False), rel=0.01)
  got = metrics.xla_flops(lambda a, w, b: a @ w + b, a, w, b)
  assert got == pytest.approx(2 * metrics.dense_flops(7, 4) - 4, rel=0.01)


def test_xla_cost_counts_operands_and_outputs_once():
  # one fused elementwise kernel reads x (4 kB) and writes its result (4 kB): 2 flops each
  x = jnp.ones((1000,), jnp.float32)
  assert metrics.xla_cost(lambda x: x * 2 + 1, x) == {"flops": 2 * 1000,
                                                      "bytes_accessed": 2 * 4 * 1000}
  # a product reads both operands and writes its output: (64x32 + 32x16 + 64x16) floats
  a, w = jnp.ones((64, 32)), jnp.ones((32, 16))
  cost = metrics.xla_cost(jnp.matmul, a, w)
  assert cost["bytes_accessed"] == 4 * (64 * 32 + 32 * 16 + 64 * 16)
  assert cost["flops"] == metrics.xla_flops(jnp.matmul, a, w) == 2 * 64 * 32 * 16
