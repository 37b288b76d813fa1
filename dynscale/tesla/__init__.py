"""TESLA, R-TESLA and ATP (paper 000).

This package re-exports the pure schedule functions of
:mod:`dynscale.tesla.schedules` (Eq. 3 unrolled into coefficient vectors,
Algorithms 1-2), so ``from dynscale import tesla; tesla.tesla_stages(...)``
works. The other submodules are not imported here, so the schedules load
without Flax:

* :mod:`dynscale.tesla.atp`: ATP's non-increasing projections as optax
  transformations (§3.4);
* :mod:`dynscale.tesla.multitask`: the aggregated multi-task loss;
* :mod:`dynscale.tesla.training`: TESLA / R-TESLA training with task-wise
  early stopping.
"""

from dynscale.tesla.schedules import (
    DISTRIBUTIONS,
    Stage,
    active_tasks,
    aggregate,
    check_alpha,
    check_tasks,
    coefficient_schedule,
    rtesla_first_stage,
    rtesla_next_stage,
    rtesla_stages,
    sample_task,
    stage_coefficients,
    task_probabilities,
    tesla_stages,
)

__all__ = [
    "DISTRIBUTIONS", "Stage", "active_tasks", "aggregate", "check_alpha", "check_tasks",
    "coefficient_schedule", "rtesla_first_stage", "rtesla_next_stage", "rtesla_stages",
    "sample_task", "stage_coefficients", "task_probabilities", "tesla_stages",
]
