"""TESLA and R-TESLA loss aggregation as pure functions (paper 000, §3).

A *task* is a DP level (a fraction of channels kept, in (0, 1]); task ``j``
has loss ``L_j``. TESLA trains a sequence of *stages*; each stage optimises an
aggregated objective, an affine combination of the task losses, until early
stopping fires. Eq. 3 of the paper defines the objectives (1-based ``i``):

    L_1^obj = L_1   and   L_{i+1}^obj = alpha * L_{i+1} + (1 - alpha) * L_i^obj,
                                                  for i = 1, ..., N - 1   (3)

Here every objective is represented by its *coefficient vector* ``c`` over
the ``N`` tasks, ``L^obj = sum_j c_j L_j``, shape ``(N,)``. A jitted train step
takes ``c`` as an array argument, so moving to the next stage changes data,
not code (DESIGN.md invariant 4). Tasks with ``c_j == 0`` are *inactive*:
``active_tasks`` lists the others, so a step can compute only those.

Indices in this module are 0-based: stage ``s`` is the paper's ``L_{s+1}^obj``
and task ``j`` is the paper's ``L_{j+1}``.

* TESLA (Algorithm 1): tasks in decreasing DP order, stage ``s`` adds task
  ``s``; ``stage_coefficients`` gives Eq. 3 in closed form.
* R-TESLA (Algorithm 2): the objective starts as ``L_1`` and, after each
  stage, a sampled task ``k`` is folded in with the same recursion,
  ``c <- alpha * e_k + (1 - alpha) * c`` (``aggregate``). A task may be
  sampled again; the set of active tasks only grows.

Deviations from the paper, both in Algorithm 2: its initialisation reads
"L_1^obj <- L_1, i <- 0", an index mismatch; we start, as its text intends,
from the first task of the given order (stage 0 has ``c = e_0``). The
sampling distribution is unspecified there; §3.3 says it "can be specified by
a customized task distribution", which ``task_probabilities`` accepts
(``'uniform'`` or explicit probabilities). The stopping rules (early stopping
per stage, the R-TESLA epoch budget of Table 1) belong to the training loop.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterator, Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from dynscale import idp

DISTRIBUTIONS = ("uniform",)

# Tolerance on the sum of explicit task probabilities.
_PROB_SUM_TOLERANCE = 1e-6

Rng = Union[np.random.Generator, jax.Array]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a TESLA / R-TESLA plan.

  Attributes:
    index: 0-based stage number (the paper's ``i - 1`` in ``L_i^obj``).
    task: index into ``tasks`` of the task added at this stage (TESLA's
      ``L_{i+1}``, R-TESLA's sampled ``L_k``).
    dp: the DP level of that task, ``tasks[task]``.
    coefficients: the aggregated objective's weight per task, length N; feed
      ``jnp.asarray(stage.coefficients)`` to the train step.
  """

  index: int
  task: int
  dp: float
  coefficients: tuple[float, ...]

  @property
  def active(self) -> tuple[int, ...]:
    """Indices of the tasks with non-zero weight in this stage."""
    return active_tasks(self.coefficients)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def check_tasks(tasks: Sequence[float], decreasing: bool = True,
                name: str = "tasks") -> tuple[float, ...]:
  """Validates a task set (DP levels) and returns it as a tuple of floats;
  errors call it ``name``.

  Every task must be a number in (0, 1] and the tasks distinct. TESLA
  (Algorithm 1) takes "a task set in decreasing order"; R-TESLA takes "a
  task set in any order" (``decreasing=False``).
  """
  for i, t in enumerate(tasks):
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
      raise ValueError(f"{name}[{i}] must be a number in (0, 1], got {t!r}")
  values = tuple(idp.check_dp(t, name=f"{name}[{i}]") for i, t in enumerate(tasks))
  if not values:
    raise ValueError(f"{name} must contain at least one DP level in (0, 1], got ()")
  if len(set(values)) != len(values):
    raise ValueError(f"{name} must be distinct DP levels, got {values}")
  if decreasing and any(a <= b for a, b in zip(values, values[1:])):
    raise ValueError(
        f"{name} must be in decreasing DP order for TESLA (Algorithm 1), got {values}")
  return values


def check_alpha(alpha: float, name: str = "alpha") -> float:
  """Validates the aggregation coefficient alpha of Eq. 3, a number in (0,
  1]; errors call it ``name``.

  ``alpha = 0`` would give the new task no weight at all, so it is refused;
  ``alpha = 1`` drops all earlier tasks (plain sequential training).
  """
  if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha <= 1:
    raise ValueError(f"{name} must be a number in (0, 1], got {alpha!r}")
  return float(alpha)


def _check_num_tasks(num_tasks: int) -> int:
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
  return int(num_tasks)


def _check_task_index(task: int, num_tasks: int) -> int:
  if not isinstance(task, (int, np.integer)) or not 0 <= task < num_tasks:
    raise ValueError(f"task must be an int in [0, {num_tasks - 1}], got {task!r}")
  return int(task)


def _check_coefficients(coefficients) -> np.ndarray:
  values = np.asarray(coefficients, dtype=np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(
        f"coefficients must be a non-empty 1-D vector, got shape {values.shape}")
  if not np.all(np.isfinite(values)):
    raise ValueError("coefficients must be finite")
  return values


# --------------------------------------------------------------------------
# TESLA (Algorithm 1, Eq. 3)
# --------------------------------------------------------------------------


def stage_coefficients(num_tasks: int, stage: int, alpha: float) -> np.ndarray:
  """Coefficients of the TESLA objective at 0-based ``stage`` (Eq. 3 unrolled).

  Unrolling ``c^(0) = e_0`` and ``c^(s) = alpha * e_s + (1 - alpha) * c^(s-1)``
  (Eq. 3 with 0-based indices) gives, for ``s >= 1``:

    c_0 = (1 - alpha)^s
    c_j = alpha * (1 - alpha)^(s - j)      for 1 <= j <= s
    c_j = 0                                for j > s   (future tasks)

  and ``c = e_0`` at ``s = 0``. The weights are non-negative and sum to 1
  (the paper's "affine combination"). Future tasks are exactly zero.

  Returns a float64 array of shape ``(num_tasks,)``.
  """
  n = _check_num_tasks(num_tasks)
  if not isinstance(stage, (int, np.integer)) or not 0 <= stage < n:
    raise ValueError(f"stage must be an int in [0, {n - 1}], got {stage!r}")
  a = check_alpha(alpha)
  j = np.arange(n)
  weights = np.where(j == 0, 1.0, a) * (1.0 - a) ** np.maximum(stage - j, 0)
  return np.where(j <= stage, weights, 0.0)


def coefficient_schedule(num_tasks: int, alpha: float) -> np.ndarray:
  """All TESLA stages' coefficients, row ``s`` = ``stage_coefficients(.., s, ..)``.

  Returns a float64 array of shape ``(num_tasks, num_tasks)``; it is lower
  triangular (stage ``s`` weights tasks ``0..s`` only).
  """
  n = _check_num_tasks(num_tasks)
  return np.stack([stage_coefficients(n, s, alpha) for s in range(n)])


def tesla_stages(tasks: Sequence[float], alpha: float) -> tuple[Stage, ...]:
  """The TESLA plan (Algorithm 1): one stage per task, in the given order.

  ``tasks`` must be distinct DP levels in (0, 1], in decreasing order
  (e.g. Table 1's ``(1.0, 0.7, 0.4, 0.1)`` with ``alpha = 0.5``).
  """
  values = check_tasks(tasks, decreasing=True)
  schedule = coefficient_schedule(len(values), alpha)
  return tuple(
      Stage(index=s, task=s, dp=values[s], coefficients=tuple(map(float, row)))
      for s, row in enumerate(schedule))


def active_tasks(coefficients) -> tuple[int, ...]:
  """Indices of the tasks with non-zero weight in a coefficient vector ``(N,)``."""
  values = _check_coefficients(coefficients)
  return tuple(int(j) for j in np.flatnonzero(values))


# --------------------------------------------------------------------------
# R-TESLA (Algorithm 2)
# --------------------------------------------------------------------------


def aggregate(coefficients, task: int, alpha: float) -> np.ndarray:
  """Folds ``task`` into an objective: ``alpha * e_task + (1 - alpha) * c``.

  This is the recursion of Eq. 3 and line 6 of Algorithm 2,
  ``L_{i+1}^obj <- alpha * L_k + (1 - alpha) * L_i^obj``, on coefficient
  vectors of shape ``(N,)``. Tasks with weight 0 in ``c`` other than
  ``task`` stay exactly 0. Returns a new float64 array.
  """
  values = _check_coefficients(coefficients)
  k = _check_task_index(task, values.size)
  a = check_alpha(alpha)
  out = (1.0 - a) * values
  out[k] += a
  return out


def task_probabilities(distribution: Union[str, Sequence[float]],
                       num_tasks: int, name: str = "task distribution") -> np.ndarray:
  """The R-TESLA task distribution as probabilities of shape ``(num_tasks,)``;
  errors call it ``name``.

  ``distribution`` is a name in ``DISTRIBUTIONS`` (``'uniform'``) or explicit
  probabilities, one per task: finite, non-negative and summing to 1 (within
  1e-6; the result is renormalised).
  """
  n = _check_num_tasks(num_tasks)
  if isinstance(distribution, str):
    if distribution not in DISTRIBUTIONS:
      raise ValueError(
          f"{name} must be one of {DISTRIBUTIONS} or explicit "
          f"probabilities, got {distribution!r}")
    return np.full(n, 1.0 / n)
  probs = _check_probabilities(distribution, name)
  if probs.size != n:
    raise ValueError(
        f"{name} must have one probability per task ({n}), got {probs.size}")
  return probs


def _check_probabilities(probs, name: str = "task probabilities") -> np.ndarray:
  """Explicit probabilities: 1-D, finite, >= 0, sum 1; returned renormalised."""
  if isinstance(probs, str):
    raise ValueError(f"{name} must be a vector of numbers, got {probs!r}")
  values = np.asarray(probs, dtype=np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {values.shape}")
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError(f"{name} must be finite and >= 0, got {values.tolist()}")
  total = values.sum()
  if abs(total - 1.0) > _PROB_SUM_TOLERANCE:
    raise ValueError(f"{name} must sum to 1, got sum {total}")
  return values / total


def sample_task(rng: Rng, probs) -> int:
  """Samples a task index with probabilities ``probs`` (Algorithm 2, line 5).

  ``rng`` is a ``numpy.random.Generator`` (advanced in place) or a JAX PRNG
  key (used once; split it before the next call). ``probs`` is checked as
  explicit probabilities (finite, >= 0, summing to 1).
  """
  p = _check_probabilities(probs)
  if isinstance(rng, np.random.Generator):
    return int(rng.choice(p.size, p=p))
  return int(jax.random.choice(rng, p.size, p=jnp.asarray(p)))


def rtesla_first_stage(tasks: Sequence[float]) -> Stage:
  """Stage 0 of R-TESLA: the objective is the first task's loss alone."""
  values = check_tasks(tasks, decreasing=False)
  first = np.zeros(len(values))
  first[0] = 1.0
  return Stage(index=0, task=0, dp=values[0], coefficients=tuple(map(float, first)))


def rtesla_next_stage(stage: Stage, task: int, tasks: Sequence[float],
                      alpha: float) -> Stage:
  """The R-TESLA stage after ``stage`` when ``task`` was sampled (Alg. 2, l. 6)."""
  values = check_tasks(tasks, decreasing=False)
  if len(stage.coefficients) != len(values):
    raise ValueError(
        f"stage.coefficients has {len(stage.coefficients)} entries, tasks has "
        f"{len(values)}")
  coefficients = aggregate(stage.coefficients, task, alpha)
  return Stage(index=stage.index + 1, task=int(task), dp=values[task],
               coefficients=tuple(map(float, coefficients)))


def rtesla_stages(tasks: Sequence[float], alpha: float,
                  distribution: Union[str, Sequence[float]],
                  rng: np.random.Generator) -> Iterator[Stage]:
  """The R-TESLA plan (Algorithm 2) as an endless iterator of stages.

  Yields ``rtesla_first_stage(tasks)`` and then, for ever, the next stage
  with a task drawn from ``distribution`` by ``rng``. The caller stops it
  when its epoch budget (``max_epoch``, Table 1) is spent. Arguments are
  validated before the first stage is yielded.
  """
  values = check_tasks(tasks, decreasing=False)
  check_alpha(alpha)
  probs = task_probabilities(distribution, len(values))
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
  return _rtesla_iterator(values, alpha, probs, rng)


def _rtesla_iterator(tasks: tuple[float, ...], alpha: float, probs: np.ndarray,
                     rng: np.random.Generator) -> Iterator[Stage]:
  stage = rtesla_first_stage(tasks)
  while True:
    yield stage
    stage = rtesla_next_stage(stage, sample_task(rng, probs), tasks, alpha)
