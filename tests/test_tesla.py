"""Tests for dynscale.tesla: Eq. 3 and Algorithms 1-2 of the TESLA paper (000)."""

import jax
import numpy as np
import pytest

from dynscale import tesla

TABLE1_MNIST_TASKS = (1.0, 0.7, 0.4, 0.1)


def eq3_by_hand(alpha, losses):
  """Eq. 3 written out literally for four tasks, on scalar losses L_1..L_4."""
  l1, l2, l3, l4 = losses
  obj1 = l1
  obj2 = alpha * l2 + (1 - alpha) * obj1
  obj3 = alpha * l3 + (1 - alpha) * obj2
  obj4 = alpha * l4 + (1 - alpha) * obj3
  return [obj1, obj2, obj3, obj4]


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.9, 1.0])
def test_schedule_matches_eq3_by_hand(alpha):
  schedule = tesla.coefficient_schedule(4, alpha)
  assert schedule.shape == (4, 4)
  # Coefficient of task j at every stage: run Eq. 3 with L_j = 1, others 0.
  for j in range(4):
    unit = [0.0] * 4
    unit[j] = 1.0
    np.testing.assert_allclose(schedule[:, j], eq3_by_hand(alpha, unit), rtol=1e-12)
  # And the aggregated loss for arbitrary task losses.
  losses = [2.3, 0.7, 1.9, 4.1]
  np.testing.assert_allclose(schedule @ np.array(losses), eq3_by_hand(alpha, losses),
                             rtol=1e-12)


def test_schedule_alpha_half_table():
  # Table 1 uses alpha = 0.5; Eq. 3 by hand:
  # L1obj = L1; L2obj = L2/2 + L1/2; L3obj = L3/2 + L2/4 + L1/4;
  # L4obj = L4/2 + L3/4 + L2/8 + L1/8.
  expected = np.array([
      [1.0, 0.0, 0.0, 0.0],
      [0.5, 0.5, 0.0, 0.0],
      [0.25, 0.25, 0.5, 0.0],
      [0.125, 0.125, 0.25, 0.5],
  ])
  np.testing.assert_array_equal(tesla.coefficient_schedule(4, 0.5), expected)
  for s in range(4):
    np.testing.assert_array_equal(tesla.stage_coefficients(4, s, 0.5), expected[s])


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("num_tasks", [1, 3, 6])
def test_inactive_tasks_exactly_zero_and_affine(alpha, num_tasks):
  schedule = tesla.coefficient_schedule(num_tasks, alpha)
  for s in range(num_tasks):
    assert np.all(schedule[s, s + 1:] == 0.0)
    assert np.all(schedule[s, :s + 1] >= 0.0)
    np.testing.assert_allclose(schedule[s].sum(), 1.0, rtol=1e-12)
    expected_active = (s,) if alpha == 1.0 else tuple(range(s + 1))
    assert tesla.active_tasks(schedule[s]) == expected_active


def test_tesla_stages_plan():
  stages = tesla.tesla_stages(TABLE1_MNIST_TASKS, 0.5)
  assert len(stages) == 4
  for s, stage in enumerate(stages):
    assert stage.index == s
    assert stage.task == s
    assert stage.dp == TABLE1_MNIST_TASKS[s]
    assert stage.active == tuple(range(s + 1))
    assert isinstance(stage.coefficients, tuple) and len(stage.coefficients) == 4
  assert stages[2].coefficients == (0.25, 0.25, 0.5, 0.0)
  hash(stages[0])  # frozen and hashable


def test_recursion_folds_to_closed_form():
  coefficients = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
  for s in range(1, 5):
    coefficients = tesla.aggregate(coefficients, s, 0.35)
    np.testing.assert_allclose(coefficients, tesla.stage_coefficients(5, s, 0.35),
                               rtol=1e-12)


def test_active_tasks_accepts_jax_arrays():
  assert tesla.active_tasks(jax.numpy.array([0.5, 0.0, 0.5])) == (0, 2)


@pytest.mark.parametrize("tasks, match", [
    ((0.4, 0.7, 1.0), "decreasing"),
    ((1.0, 0.5, 0.5), "distinct"),
    ((1.5, 0.5), r"tasks\[0\] must be in \(0, 1\]"),
    ((1.0, 0.0), r"tasks\[1\] must be in \(0, 1\]"),
    ((1.0, -0.1), r"tasks\[1\]"),
    ((1.0, float("nan")), r"tasks\[1\]"),
    ((1.0, "0.5"), r"tasks\[1\] must be a number in \(0, 1\], got '0.5'"),
    ((1.0, True), r"tasks\[1\] must be a number in \(0, 1\], got True"),
    ((), "at least one"),
])
def test_tesla_stages_rejects_bad_tasks(tasks, match):
  with pytest.raises(ValueError, match=match):
    tesla.tesla_stages(tasks, 0.5)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_rejects_bad_alpha(alpha):
  with pytest.raises(ValueError, match="alpha"):
    tesla.stage_coefficients(3, 1, alpha)
  with pytest.raises(ValueError, match="alpha"):
    tesla.tesla_stages((1.0, 0.5), alpha)


@pytest.mark.parametrize("num_tasks, stage, match", [
    (0, 0, "num_tasks"), (3, 3, "stage"), (3, -1, "stage"), (3, 1.0, "stage"),
    (3.0, 1, "num_tasks"),
])
def test_stage_coefficients_rejects_bad_indices(num_tasks, stage, match):
  with pytest.raises(ValueError, match=match):
    tesla.stage_coefficients(num_tasks, stage, 0.5)


# --------------------------------------------------------------------------
# R-TESLA
# --------------------------------------------------------------------------


def test_rtesla_hand_sequence():
  # Algorithm 2 by hand, alpha = 0.5, sampled tasks 2, 0, 2 (0-based):
  # L^obj = L1; then L3/2 + L1/2; then L1/2 + (L3/2 + L1/2)/2 = 3/4 L1 + 1/4 L3;
  # then L3/2 + (3/4 L1 + 1/4 L3)/2 = 3/8 L1 + 5/8 L3.
  tasks = (1.0, 0.7, 0.4, 0.1)
  stage = tesla.rtesla_first_stage(tasks)
  assert stage.coefficients == (1.0, 0.0, 0.0, 0.0)
  expected = [(0.5, 0.0, 0.5, 0.0), (0.75, 0.0, 0.25, 0.0), (0.375, 0.0, 0.625, 0.0)]
  for i, (task, coefficients) in enumerate(zip([2, 0, 2], expected), start=1):
    stage = tesla.rtesla_next_stage(stage, task, tasks, 0.5)
    assert stage.index == i
    assert stage.task == task
    assert stage.dp == tasks[task]
    assert stage.coefficients == coefficients
  assert stage.active == (0, 2)


def test_rtesla_accepts_any_task_order():
  stage = tesla.rtesla_first_stage((0.4, 1.0, 0.7))
  assert stage.dp == 0.4
  with pytest.raises(ValueError, match="distinct"):
    tesla.rtesla_first_stage((0.4, 0.4))


def test_rtesla_stages_follow_algorithm2():
  tasks = (1.0, 0.5, 0.2)
  alpha = 0.4
  stages = list(zip(range(30), tesla.rtesla_stages(
      tasks, alpha, (0.2, 0.3, 0.5), np.random.default_rng(0))))
  coefficients = [1.0, 0.0, 0.0]
  for i, stage in stages:
    assert stage.index == i
    if i > 0:  # independent scalar loop of line 6 with the sampled task k
      coefficients = [alpha * (j == stage.task) + (1 - alpha) * c
                      for j, c in enumerate(coefficients)]
    np.testing.assert_allclose(stage.coefficients, coefficients, rtol=1e-12)
  assert {stage.task for _, stage in stages[1:]} == {0, 1, 2}


def test_rtesla_stages_validates_eagerly():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="alpha"):
    tesla.rtesla_stages((1.0, 0.5), 2.0, "uniform", rng)
  with pytest.raises(ValueError, match="sum to 1"):
    tesla.rtesla_stages((1.0, 0.5), 0.5, (0.5, 0.6), rng)
  with pytest.raises(ValueError, match="rng"):
    tesla.rtesla_stages((1.0, 0.5), 0.5, "uniform", 0)


def test_task_probabilities():
  np.testing.assert_array_equal(tesla.task_probabilities("uniform", 4), [0.25] * 4)
  np.testing.assert_allclose(tesla.task_probabilities([0.1, 0.0, 0.9], 3), [0.1, 0.0, 0.9])


@pytest.mark.parametrize("distribution, match", [
    ("zipf", r"one of \('uniform',\)"),
    ([0.5, 0.5], "one probability per task"),
    ([0.5, 0.7, -0.2], ">= 0"),
    ([0.5, 0.2, 0.2], "sum to 1"),
    ([0.5, 0.2, 0.295], "sum to 1"),  # 0.995: off by more than rounding
    ([0.5, 0.3, 0.2, 0.0], "one probability per task"),
    ([0.5, float("nan"), 0.5], "finite"),
    ([[0.5, 0.5, 0.0]], "1-D"),
])
def test_task_probabilities_rejects(distribution, match):
  with pytest.raises(ValueError, match=match):
    tesla.task_probabilities(distribution, 3)


def test_sample_task_frequencies_numpy():
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  rng = np.random.default_rng(1234)
  draws = np.array([tesla.sample_task(rng, probs) for _ in range(20000)])
  frequencies = np.bincount(draws, minlength=4) / draws.size
  np.testing.assert_allclose(frequencies, probs, atol=0.015)


def test_sample_task_jax_key():
  probs = (0.0, 0.75, 0.0, 0.25)
  keys = jax.random.split(jax.random.key(0), 200)
  draws = np.array([tesla.sample_task(k, probs) for k in keys])
  assert set(draws.tolist()) == {1, 3}
  assert 0.6 < np.mean(draws == 1) < 0.9
  assert tesla.sample_task(keys[0], probs) == draws[0]


def test_sample_task_rejects_bad_probs():
  with pytest.raises(ValueError, match="sum to 1"):
    tesla.sample_task(np.random.default_rng(0), (0.3, 0.3))
  with pytest.raises(ValueError, match="vector of numbers"):
    tesla.sample_task(np.random.default_rng(0), "uniform")


def test_aggregate_rejects_bad_task():
  for task in (3, -1):  # -1 would wrap to the last task
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 2\]"):
      tesla.aggregate([1.0, 0.0, 0.0], task, 0.5)
  with pytest.raises(ValueError, match="coefficients must be finite"):
    tesla.aggregate([1.0, float("inf"), 0.0], 1, 0.5)
  with pytest.raises(ValueError, match="tasks has 3"):
    tesla.rtesla_next_stage(tesla.rtesla_first_stage((1.0, 0.5)), 1, (1.0, 0.5, 0.2), 0.5)
  with pytest.raises(ValueError, match="tasks has 2"):
    tesla.rtesla_next_stage(tesla.rtesla_first_stage((1.0, 0.5, 0.2)), 1, (1.0, 0.5), 0.5)
