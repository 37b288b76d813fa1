"""CompactNet's sub-target schedule as pure functions (paper 004, §3.2).

The search trims the pre-trained model over ``N`` iterations; iteration ``i``
(0-based) has a sub-target (Eq. 1) that decays geometrically with ``d``:

    T_sub,i = T_init / N * d^i,   i = 0, ..., N - 1          (1)
    T_final = sum_i T_sub,i                                  (2)

Read literally, with the T's as speed-ups, Eq. 2 does not reproduce Table 3:
the rows (T_init, N, d) = (2.0, 24, .96), (2.5, 30, .98), (1.5, 36, .96),
(2.0, 48, .98) give T_final = 1.30, 1.89, 0.80 (a slow-down) and 1.29, where
the table lists 1.5x, 1.8x, 1.3x and 1.5x. We therefore read the T's as
latency *reductions*, as fractions of the original latency:

* ``r = 1 - 1/T_init`` is the total reduction the undecayed schedule
  (``d = 1``) would give, i.e. a speed-up of exactly ``T_init``;
* ``T_sub,i = r / N * d^i`` is the fraction of the ORIGINAL latency removed
  in iteration ``i`` (Eq. 1);
* after iteration ``i`` the model may take at most
  ``1 - sum_{j<=i} T_sub,j`` of the original latency (``targets``), a
  cumulative speed-up of ``1 / (1 - sum_{j<=i} T_sub,j)`` (``speedups``);
* the final speed-up is ``T_final = 1 / (1 - sum_i T_sub,i)`` (Eq. 2).

This gives 1.48x, 1.83x, 1.22x and 1.48x for the four rows of Table 3: it
matches the table's 1.5x, 1.8x and 1.5x to its rounding, but the NPU row
(T_init 1.5x, N 36, d 0.96) gives 1.22x, not the 1.3x the paper lists. No
reading we found gives all four rows.

§3.2 says the user keeps T_final in mind and "inversely compute[s] T_init
first": ``solve_t_init`` does so in closed form, and ``Schedule.for_final``
builds the schedule from T_final.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


def _is_number(value) -> bool:
  """True for a real number that is not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_t_init(t_init) -> None:
  """Raises unless ``t_init`` (T_init, Eq. 1) is a finite number > 1."""
  if not _is_number(t_init) or not math.isfinite(t_init) or t_init <= 1:
    raise ValueError(f"t_init must be a finite number > 1 (a speed-up), got {t_init!r}")


def check_iterations(iterations) -> None:
  """Raises unless ``iterations`` (N, Eq. 1) is an int >= 1."""
  if (isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral)
      or iterations < 1):
    raise ValueError(f"iterations must be an integer >= 1 (N), got {iterations!r}")


def check_decay(decay) -> None:
  """Raises unless ``decay`` (d, Eq. 1) is a number in (0, 1]."""
  if not _is_number(decay) or not 0 < decay <= 1:
    raise ValueError(f"decay must be a number in (0, 1] (d), got {decay!r}")


def mean_decay(iterations: int, decay: float) -> float:
  """``S = (1/N) sum_{i<N} d^i = (1 - d^N) / ((1 - d) N)``; 1 when ``d == 1``.

  The fraction of ``r`` the decayed schedule of Eq. 1 removes in all.
  """
  if decay == 1:
    return 1.0
  return -math.expm1(iterations * math.log(decay)) / ((1 - decay) * iterations)


def reductions(t_init: float, iterations: int, decay: float) -> tuple[float, ...]:
  """``T_sub,i = r / N * d^i`` with ``r = 1 - 1/T_init`` (Eq. 1, as reductions)."""
  r = 1 - 1 / t_init
  return tuple(r / iterations * decay**i for i in range(iterations))


def targets(subtargets: tuple[float, ...]) -> tuple[float, ...]:
  """``1 - sum_{j<=i} T_sub,j``: the latency allowed after each iteration,
  as fractions of the original latency."""
  return tuple(1 - math.fsum(subtargets[:i + 1]) for i in range(len(subtargets)))


def max_final_speedup(iterations: int, decay: float) -> float:
  """The supremum of T_final (Eq. 2) over T_init for ``N``, ``d``: ``1 / (1 - S)``.

  Approached as T_init -> infinity (``r -> 1``) and never reached; infinite
  when ``d == 1``.
  """
  s = mean_decay(iterations, decay)
  return math.inf if s >= 1 else 1 / (1 - s)


def solve_t_init(t_final: float, iterations: int, decay: float) -> float:
  """The T_init whose schedule (Eq. 1) reaches exactly ``t_final`` (Eq. 2).

  ``r = (1 - 1/T_final) / S`` and ``T_init = 1 / (1 - r)``; ``T_final`` is
  reachable only when ``r < 1``, i.e. ``T_final < max_final_speedup(N, d)``.
  """
  check_iterations(iterations)
  check_decay(decay)
  if not _is_number(t_final) or not math.isfinite(t_final) or t_final <= 1:
    raise ValueError(f"t_final must be a finite number > 1 (a speed-up), got {t_final!r}")
  r = (1 - 1 / t_final) / mean_decay(iterations, decay)
  if r >= 1:
    best = max_final_speedup(iterations, decay)
    raise ValueError(f"t_final must be below {best:.6g}, the largest speed-up reachable "
                     f"with iterations={iterations} and decay={decay} (as t_init -> "
                     f"infinity), got {t_final!r}")
  return 1 / (1 - r)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """CompactNet's sub-targets for ``iterations`` = N, ``decay`` = d (Eq. 1-2)."""

  t_init: float
  iterations: int
  decay: float

  def __post_init__(self):
    self.check()

  def check(self) -> None:
    """Raises a ValueError naming the first bad field and its allowed values."""
    check_t_init(self.t_init)
    check_iterations(self.iterations)
    check_decay(self.decay)

  @classmethod
  def for_final(cls, t_final: float, iterations: int, decay: float) -> Schedule:
    """The schedule whose final speed-up (Eq. 2) is ``t_final``."""
    return cls(solve_t_init(t_final, iterations, decay), iterations, decay)

  @property
  def reductions(self) -> tuple[float, ...]:
    """``T_sub,i`` (Eq. 1): the fraction of the original latency removed in iteration i."""
    return reductions(self.t_init, self.iterations, self.decay)

  @property
  def targets(self) -> tuple[float, ...]:
    """The latency allowed after each iteration, as fractions of the original; decreasing."""
    return targets(self.reductions)

  @property
  def speedups(self) -> tuple[float, ...]:
    """The cumulative speed-up required after each iteration, ``1 / targets``."""
    return tuple(1 / t for t in self.targets)

  @property
  def final_speedup(self) -> float:
    """T_final = 1 / (1 - sum_i T_sub,i) (Eq. 2, as reductions)."""
    return self.speedups[-1]

  def budgets(self, original_latency: float) -> tuple[float, ...]:
    """The latency each iteration must reach, for a model of ``original_latency``."""
    if not _is_number(original_latency) or not original_latency > 0:
      raise ValueError(f"original_latency must be a positive number, got {original_latency!r}")
    return tuple(original_latency * t for t in self.targets)
