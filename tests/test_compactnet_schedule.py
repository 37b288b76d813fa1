"""CompactNet's sub-target schedule (paper 004, §3.2, Eq. 1-2, Table 3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dynscale.compactnet import schedule
from dynscale.compactnet.schedule import Schedule, solve_t_init

# Table 3: (T_init, N, d) and the final speed-up our reading gives (the paper
# lists 1.5x, 1.8x, 1.3x, 1.5x; the NPU row's 1.3x is not reproduced).
TABLE_3 = [
    ((2.0, 24, 0.96), 1.48),
    ((2.5, 30, 0.98), 1.83),
    ((1.5, 36, 0.96), 1.22),
    ((2.0, 48, 0.98), 1.48),
]


def final_speedup_by_hand(t_init, n, d):
  """Eq. 1-2 written out: reductions r/N d^i of the original latency, summed."""
  r = 1 - 1 / t_init
  removed = 0.0
  for i in range(n):
    removed += r / n * d**i
  return 1 / (1 - removed)


@pytest.mark.parametrize("row, expected", TABLE_3)
def test_table_3_rows(row, expected):
  by_hand = final_speedup_by_hand(*row)
  assert round(by_hand, 2) == expected
  assert Schedule(*row).final_speedup == pytest.approx(by_hand, rel=1e-12)
  assert round(Schedule(*row).final_speedup, 2) == expected


@pytest.mark.parametrize("row, _", TABLE_3)
def test_targets_decrease_and_end_at_one_over_t_final(row, _):
  s = Schedule(*row)
  t_init, n, d = row
  assert len(s.reductions) == len(s.targets) == len(s.speedups) == n
  assert s.reductions[0] == pytest.approx((1 - 1 / t_init) / n)
  np.testing.assert_allclose(np.diff(np.log(s.reductions)), np.log(d))
  assert all(b < a for a, b in zip((1.0,) + s.targets, s.targets))
  assert all(b > a for a, b in zip((1.0,) + s.speedups, s.speedups))
  assert s.targets[-1] == pytest.approx(1 / s.final_speedup, rel=1e-12)
  np.testing.assert_allclose(s.budgets(10.0), np.asarray(s.targets) * 10.0)


@pytest.mark.parametrize("latency", [0.0, -1e-3, "1", True])
def test_budgets_need_a_positive_original_latency(latency):
  with pytest.raises(ValueError, match=rf"original_latency must be a positive number, "
                                       rf"got {latency!r}"):
    Schedule(2.0, 24, 0.96).budgets(latency)


def test_schedule_is_frozen():
  s = Schedule(2.0, 24, 0.96)
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.t_init = 3.0


@pytest.mark.parametrize("t_final", [1.01, 1.3, 1.5, 1.8, 2.1])
@pytest.mark.parametrize("n, d", [(24, 0.96), (30, 0.98), (36, 0.96), (48, 0.98), (10, 1.0)])
def test_solve_t_init_round_trips(t_final, n, d):
  s = Schedule.for_final(t_final, n, d)
  assert s.final_speedup == pytest.approx(t_final, rel=1e-12)
  assert s.iterations == n and s.decay == d


def test_solve_t_init_recovers_table_3_first_row():
  t_final = final_speedup_by_hand(2.0, 24, 0.96)
  assert solve_t_init(t_final, 24, 0.96) == pytest.approx(2.0, rel=1e-12)


def test_no_decay_reaches_t_init_exactly():
  s = Schedule(2.0, 8, 1.0)
  assert s.reductions == pytest.approx((0.5 / 8,) * 8)
  assert s.final_speedup == pytest.approx(2.0, rel=1e-12)
  assert solve_t_init(3.0, 5, 1) == pytest.approx(3.0, rel=1e-12)
  assert schedule.max_final_speedup(5, 1.0) == float("inf")


@pytest.mark.parametrize("args, message", [
    ((1.0, 24, 0.96), r"t_init must be a finite number > 1 \(a speed-up\), got 1.0"),
    ((0.5, 24, 0.96), r"t_init must be a finite number > 1"),
    ((float("inf"), 24, 0.96), r"t_init must be a finite number > 1"),
    (("2", 24, 0.96), r"t_init must be a finite number > 1"),
    ((True, 24, 0.96), r"t_init must be a finite number > 1"),
    ((2.0, 0, 0.96), r"iterations must be an integer >= 1 \(N\), got 0"),
    ((2.0, -3, 0.96), r"iterations must be an integer >= 1"),
    ((2.0, 24.0, 0.96), r"iterations must be an integer >= 1 \(N\), got 24.0"),
    ((2.0, True, 0.96), r"iterations must be an integer >= 1 \(N\), got True"),
    ((2.0, 24, 0.0), r"decay must be a number in \(0, 1\] \(d\), got 0.0"),
    ((2.0, 24, -0.5), r"decay must be a number in \(0, 1\]"),
    ((2.0, 24, 1.01), r"decay must be a number in \(0, 1\] \(d\), got 1.01"),
    ((2.0, 24, True), r"decay must be a number in \(0, 1\]"),
])
def test_bad_schedule_raises_naming_the_field(args, message):
  with pytest.raises(ValueError, match=message):
    Schedule(*args)


@pytest.mark.parametrize("t_final", [1.0, 0.9, float("nan")])
def test_t_final_must_be_above_one(t_final):
  with pytest.raises(ValueError, match=r"t_final must be a finite number > 1"):
    solve_t_init(t_final, 24, 0.96)


def test_solve_t_init_checks_n_and_d():
  with pytest.raises(ValueError, match=r"iterations must be an integer >= 1"):
    solve_t_init(1.5, 0, 0.96)
  with pytest.raises(ValueError, match=r"decay must be a number in \(0, 1\]"):
    Schedule.for_final(1.5, 24, 1.5)


def test_unreachable_t_final_names_the_best_reachable_value():
  # S = (1 - d^N) / ((1 - d) N); the supremum is 1 / (1 - S), reached as T_init -> inf.
  n, d = 24, 0.5
  s = sum(d**i for i in range(n)) / n
  best = 1 / (1 - s)
  assert schedule.max_final_speedup(n, d) == pytest.approx(best, rel=1e-12)
  assert final_speedup_by_hand(1e12, n, d) == pytest.approx(best, rel=1e-9)
  with pytest.raises(ValueError, match=rf"t_final must be below {best:.6g}, the largest "
                                       rf"speed-up reachable with iterations=24 and "
                                       rf"decay=0.5 .*got 1.5"):
    solve_t_init(1.5, n, d)
  assert Schedule.for_final(0.99 * best, n, d).final_speedup == pytest.approx(0.99 * best)
