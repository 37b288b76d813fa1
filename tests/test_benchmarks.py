"""Tests of the benchmarks: record fields, ratios equal to the quotients of the
measured times, a sliced network measurably faster than the masked one, and
analytic costs.

Cost ratios are checked against the FLOP formulas written out here (dense
layer: ``(C_in + 1) C_out`` multiply-adds with a bias, 001 §I's ``p**2`` cost
of a middle IDP layer), not against the benchmark code.
"""

import math

import jax
import numpy as np
import pytest

from benchmarks import idp_latency, tesla_step
from dynscale.nn import costs, models, sliced


def _mlp_flops(hidden: int, dp: float) -> int:
  """mlp at DP ``dp``: flatten 784 -> FC ``hidden`` (complete) -> FC 10 (IDP inputs).

  The hidden layer computes only the ``k = ceil(dp * hidden)`` units the
  classifier keeps (001 Fig. 1).
  """
  k = max(1, math.ceil(dp * hidden - 1e-9))
  return (784 + 1) * k + (k + 1) * 10


def test_idp_latency_records():
  records = idp_latency.measure("mlp", 4, [0.5], repeats=2, warmup=1, width_multiplier=0.1)
  assert [r["dp"] for r in records] == [1.0, 0.5]
  arch = models.architecture("mlp", num_classes=10, input_shape=(28, 28, 1),
                             width_multiplier=0.1)
  for record in records:
    assert record["model"] == "mlp" and record["batch"] == 4
    assert record["dtype"] == "float32" and record["device"].startswith("cpu:")
  half = records[1]
  assert half["flops_ratio"] == pytest.approx(costs.flops(arch, .5) / costs.flops(arch, 1.),
                                              abs=1e-4)
  assert half["flops_ratio"] == pytest.approx(_mlp_flops(10, .5) / _mlp_flops(10, 1.),
                                              abs=1e-4)


def test_sliced_inference_pays_for_the_kept_units_and_masked_for_all():
  # 1,000 hidden units at batch 256: the 784 x 1000 layer dominates. At 10% DP the sliced
  # network computes 100 of them (about a tenth of the FLOPs), the masked one all 1,000.
  # The other test worker shares the cores, so each latency is the fastest of its runs and
  # the claims compare paths timed in the same rounds with wide margins (true ratios: sliced
  # about 0.15 of full, masked about 1).
  full, low = idp_latency.measure("mlp", 256, [0.1], repeats=15, warmup=1, width_multiplier=10,
                                  estimator="min")
  assert low["estimator"] == "min"
  for path in ("sliced", "masked"):
    assert low[f"{path}_ratio"] == pytest.approx(low[f"{path}_ms"] / full[f"{path}_ms"],
                                                 rel=1e-2, abs=1e-3)
  assert low["flops_ratio"] == pytest.approx(_mlp_flops(1000, .1) / _mlp_flops(1000, 1.),
                                             abs=1e-4)
  assert low["sliced_ratio"] < 0.5, low
  assert low["masked_ms"] > 2 * low["sliced_ms"], low
  assert low["masked_ratio"] > 2 * low["sliced_ratio"], low


def test_idp_latency_refuses_an_unknown_estimator_before_anything_else():
  # An unknown model too: checked later, it would raise a KeyError first.
  with pytest.raises(ValueError, match="estimator must be one of"):
    idp_latency.measure("no-such-model", 4, [0.5], repeats=1, warmup=0, estimator="mean")


def test_vgg16_flops_ratio_below_half_at_half_dp():
  arch = models.architecture("vgg16", num_classes=10, input_shape=(32, 32, 3))
  ratio = costs.flops(arch, 0.5) / costs.flops(arch, 1.0)
  # Middle layers cost about dp**2 = 0.25; only the first conv's outputs and the
  # classifier's outputs stay above that.
  assert 0.25 < ratio < 0.5


def test_tesla_step_record():
  tasks = [1.0, 0.5, 0.2]
  record = tesla_step.measure("mlp", 4, tasks, repeats=2, warmup=1, width_multiplier=0.1)
  assert record["model"] == "mlp" and record["batch"] == 4
  assert record["tasks"] == tasks and record["dtype"] == "float32"
  assert record["device"].startswith("cpu:") and record["jax"]
  # The last TESLA stage with alpha 0.5 (000 Eq. 3): every task active.
  assert record["coefficients"] == pytest.approx([0.25, 0.25, 0.5])
  assert record["stage"] == 2
  for name in ("single", "tesla_sliced", "tesla_stage", "tesla_masked"):
    assert record[f"{name}_images_per_s"] == pytest.approx(4e3 / record[f"{name}_ms"],
                                                           rel=1e-2)
  for ratio, step in (("tesla_over_single", "tesla_sliced"),
                      ("stage_over_single", "tesla_stage"),
                      ("masked_over_single", "tesla_masked")):
    assert record[ratio] == pytest.approx(record[f"{step}_ms"] / record["single_ms"],
                                          rel=1e-2), (ratio, record)
  expected = sum(_mlp_flops(10, dp) for dp in tasks) / _mlp_flops(10, 1.)
  assert record["flops_over_single"] == pytest.approx(expected, abs=1e-4)
  assert record["stage_flops_over_single"] == pytest.approx(expected, abs=1e-4)


def test_tesla_step_at_an_early_stage_counts_only_its_active_tasks():
  tasks = [1.0, 0.5, 0.2]
  record = tesla_step.measure("mlp", 4, tasks, repeats=1, warmup=1, width_multiplier=0.1,
                              stage=1)
  # Stage 1 with alpha 0.5 (000 Eq. 3): c = (0.5, 0.5, 0); the 20% task is inactive.
  assert record["stage"] == 1 and record["coefficients"] == pytest.approx([0.5, 0.5, 0.0])
  active = (_mlp_flops(10, 1.0) + _mlp_flops(10, 0.5)) / _mlp_flops(10, 1.0)
  assert record["stage_flops_over_single"] == pytest.approx(active, abs=1e-4)
  assert record["flops_over_single"] > record["stage_flops_over_single"]


def test_tesla_step_flops_ratio_near_sum_of_squares():
  arch = models.architecture("vgg16", num_classes=10, input_shape=(32, 32, 3))
  tasks = (1.0, 0.5, 0.2)
  ratio = tesla_step.flops_over_single(arch, tasks)
  # About sum(p**2) = 1.29 (the first conv and classifier costs scale more slowly).
  assert sum(p * p for p in tasks) < ratio < 1.30


@pytest.mark.parametrize("kwargs, field", [
    ({"model_name": "resnet"}, "model"),
    ({"batch": 0}, "batch"),
    ({"tasks": [0.5, 1.0]}, "tasks"),
    ({"steps_per_call": 0}, "steps_per_call"),
    ({"stage": 2}, "stage"),
])
def test_tesla_step_rejects_bad_input(kwargs, field):
  args = {"model_name": "mlp", "batch": 4, "tasks": [1.0, 0.5], **kwargs}
  with pytest.raises(ValueError, match=field):
    tesla_step.measure(**args, repeats=1, warmup=0)


def test_sanp_latency_records_skipping_against_dense_and_masked():
  from benchmarks import sanp_latency  # imports the SANP package only here

  (record,) = sanp_latency.measure("m_cifarnet", [0.5], width_multiplier=0.25, buckets=4,
                                   repeats=2, warmup=1)  # raises if skip != masked
  assert record["batch"] == 1 and record["buckets"] == 4 and record["open_channels"] == "random"
  assert record["flops_ratio"] == pytest.approx(0.5, abs=0.03)  # the gates open keep
  # keep 0.707 opens 11 of 16, 23 of 32, 17 of 24 channels: buckets of a quarter
  # compute 3/4 of every layer, so 3/4 of the first and last, (3/4)^2 of the middle.
  assert 0.5625 <= record["thin_flops_ratio"] <= 0.75
  assert record["skip_over_thin"] == pytest.approx(record["skip_ms"] / record["thin_ms"],
                                                   abs=2e-3)
  assert record["skip_over_dense"] == pytest.approx(record["skip_ms"] / record["dense_ms"],
                                                    abs=2e-3)
  assert record["masked_over_dense"] == pytest.approx(
      record["masked_ms"] / record["dense_ms"], abs=2e-3)


def test_sanp_latency_opens_k_channels_of_every_gate_at_random_or_the_first_k():
  """What the gates open (read from the masked network's recorded activity):
  ``kept_channels(keep, C)`` of each layer's channels, the first ones with
  'first', and with 'random' not the first ones in every layer (a 'random'
  that opened the first k would time contiguous gathers only)."""
  from benchmarks import sanp_latency
  from dynscale.sanp import gates
  arch = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=0.25)
  image = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  opened = {}
  for channels in sanp_latency.OPEN_CHANNELS:
    model = models.build(arch, rngs=models.init_rngs(0), gate=gates.gate_factory("sanp"))
    sanp_latency.open_fraction(model, 0.6, channels)
    activity = sanp_latency.masked_forward(model)(image)[1]
    opened[channels] = {name: np.flatnonzero(np.asarray(a)[0]) for name, a in activity.items()}
  for name, first in opened["first"].items():
    k = gates.kept_channels(0.6, model.gates[name].head.w2.bias.value.shape[0])
    np.testing.assert_array_equal(first, np.arange(k))
    assert len(opened["random"][name]) == k
  assert sum(not np.array_equal(opened["random"][n], f) for n, f in opened["first"].items()) >= 6
  with pytest.raises(ValueError, match=r"channels must be one of \('random', 'first'\)"):
    sanp_latency.open_fraction(model, 0.6, "last")


def test_sanp_latency_thin_resnet_narrows_only_the_blocks_inner_widths():
  """Outputs that meet at a residual add stay whole in ``thin`` (a width there
  would also cut the shortcut and the tied group); each block's inner width is
  its open count rounded up to a bucket: keep 0.4 opens 2 of 4, 3 of 8, 6 of 16
  and 13 of 32 channels, in buckets of a quarter 2, 4, 8 and 16."""
  from benchmarks import sanp_latency
  from dynscale.sanp import gates
  arch = models.architecture("resnet18", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=1 / 16)
  model = models.build(arch, rngs=models.init_rngs(0),
                       gate=gates.gate_factory("sanp", reduction=4))
  widths = sanp_latency.bucketed_widths(model, 0.4, 4)
  mid = {1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 16, 8: 16}
  assert widths == {f"layers.{i}.mid": w for i, w in mid.items()}
  sliced.slice_variables(arch, models.build(arch, rngs=models.init_rngs(0)).pure_variables(),
                         widths)  # a width vector the sliced path takes


def test_call_cost_counts_the_arrays_and_reports_the_measured_ratio():
  from benchmarks import call_cost  # its flags would clash with the other benchmarks'
  record = call_cost.measure("mobilenet_v2_imagenet", 1, width_multiplier=0.25, rounds=3, burst=2)
  arch = models.architecture("mobilenet_v2_imagenet", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=0.25)
  shapes = jax.tree.leaves(sliced.variable_shapes(arch), is_leaf=lambda s: isinstance(s, tuple))
  assert record["arrays"] == len(shapes)
  assert record["arrays_bound_alone"] == sum(math.prod(s) >= 4096 for s in shapes)
  assert record["bound_over_arrays"] == pytest.approx(
      record["bound_ms"] / record["arrays_ms"], abs=2e-3)
  assert record["us_per_array"] == pytest.approx(
      1e3 * (record["arrays_ms"] - record["bound_ms"]) / record["arrays"], abs=2e-3)
