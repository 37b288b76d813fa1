"""Smoke tests of the benchmarks: record fields, sane ratios, analytic costs.

Cost ratios are checked against the FLOP formulas written out here (dense
layer: ``(C_in + 1) C_out`` multiply-adds with a bias, 001 §I's ``p**2`` cost
of a middle IDP layer), not against the benchmark code.
"""

import math

import pytest

from benchmarks import idp_latency, tesla_step
from dynscale.nn import costs, models


def _positive_finite(value) -> bool:
  return isinstance(value, float) and math.isfinite(value) and value > 0


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
    for key in ("sliced_ratio", "masked_ratio", "sliced_ms", "masked_ms"):
      assert _positive_finite(record[key]), (key, record)
  assert records[0]["sliced_ratio"] == records[0]["masked_ratio"] == 1.0
  half = records[1]
  assert half["flops_ratio"] == pytest.approx(costs.flops(arch, .5) / costs.flops(arch, 1.),
                                              abs=1e-4)
  assert half["flops_ratio"] == pytest.approx(_mlp_flops(10, .5) / _mlp_flops(10, 1.),
                                              abs=1e-4)


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
  for name in ("single", "tesla_sliced", "tesla_masked"):
    assert _positive_finite(record[f"{name}_images_per_s"])
    assert _positive_finite(record[f"{name}_ms"])
    assert record[f"{name}_images_per_s"] == pytest.approx(4e3 / record[f"{name}_ms"],
                                                           rel=1e-2)
  for key in ("tesla_over_single", "masked_over_single", "flops_over_single"):
    assert _positive_finite(record[key]), (key, record)
  expected = sum(_mlp_flops(10, dp) for dp in tasks) / _mlp_flops(10, 1.)
  assert record["flops_over_single"] == pytest.approx(expected, abs=1e-4)


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
])
def test_tesla_step_rejects_bad_input(kwargs, field):
  args = {"model_name": "mlp", "batch": 4, "tasks": [1.0, 0.5], **kwargs}
  with pytest.raises(ValueError, match=field):
    tesla_step.measure(**args, repeats=1, warmup=0)
