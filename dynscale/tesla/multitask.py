"""Multi-task objectives over DP levels: TESLA's aggregated loss (000 Eq. 3).

The objective of a stage is ``sum_k c_k L_k`` over tasks (DP levels) with a
coefficient vector ``c`` that arrives as an array, so moving to the next
stage changes data, not code (DESIGN invariant 4).

* :func:`sliced_loss` computes each task at its sliced size (only the kept
  channels, :func:`dynscale.nn.sliced.apply_sliced`) and skips inactive tasks
  (``c_k == 0``) at run time with ``lax.cond``: one executable serves every
  stage, and a step costs about ``sum_{active} p_k**2`` of a full step. On
  XLA:CPU, where gradients inside ``lax.cond`` branches take a much slower
  path (:func:`dynscale.train.steps.nested_control_flow_is_slow`), every
  task is computed instead and an inactive one is weighted by zero and
  leaves the statistics alone; or, given the stage's ``active`` tasks, the
  inactive ones are left out of the program (one executable per set of
  active tasks, which the TESLA trainer builds on CPU, once per stage).
* :func:`masked_loss` computes every task with the masked network: the same
  value and gradients when every task is active, at the price of a full
  forward and backward pass per task.

Batch-norm running statistics are shared across tasks; tasks update them in
order (each only on the channels it computes). With ``distill_weight > 0``
lower-DP tasks also match the softened predictions of the first (100%) task
(in-place distillation, an addition to the paper; off by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dynscale.nn import sliced
from dynscale.train import steps


def _task_metrics(tasks: Sequence[float], losses, accuracies) -> dict:
  """``loss_dp<percent>`` and ``accuracy_dp<percent>`` of each task, the percent
  to six significant digits (``dp50``, ``dp12.5``): distinct tasks, distinct names."""
  metrics = {}
  for dp, loss, acc in zip(tasks, losses, accuracies):
    pct = f"{100 * dp:g}"
    metrics[f"loss_dp{pct}"] = loss
    metrics[f"accuracy_dp{pct}"] = acc
  return metrics


def sliced_loss(tasks: Sequence[float], *, distill_weight: float = 0.0,
                temperature: float = 1.0, skip_inactive: bool | None = None,
                active: Sequence[int] | None = None) -> steps.LossFn:
  """``sum_k c_k CE(sliced network at tasks[k])``; inactive tasks skipped (lax.cond).

  ``tasks`` are static DPs; the task argument of the returned loss is the
  coefficient vector ``c`` of shape ``(len(tasks),)``. Distillation takes
  ``tasks[0]`` (the full network, when it is 1.0) as the teacher, while it
  is trained (``c_0 > 0``): a stage without it distills nothing, whether
  its tasks are skipped, computed and weighted by zero, or not computed.
  ``skip_inactive`` defaults to True except on CPU (module docstring).
  ``active``: the indices of the tasks to compute (a stage's
  :attr:`dynscale.tesla.schedules.Stage.active`); any other task is not
  computed at all (nor reported in the metrics), and its coefficient must
  be zero. Default: every task.
  """
  tasks = tuple(float(dp) for dp in tasks)
  computed = list(range(len(tasks))) if active is None else sorted({int(k) for k in active})
  if not computed or not 0 <= computed[0] <= computed[-1] < len(tasks):
    raise ValueError(f"active must be task indices in [0, {len(tasks) - 1}], got {active!r}")
  if skip_inactive is None:
    skip_inactive = not steps.nested_control_flow_is_slow()

  def loss_fn(model, images, labels, coefficients):
    arch = model.arch
    variables = model.pure_variables()
    stats = sliced.bn_stats_of(variables)
    total = jnp.zeros((), jnp.float32)
    losses, accuracies = [], []
    teacher = None
    for k in computed:
      dp = tasks[k]

      def compute(stats, dp=dp):
        logits, new_stats = sliced.apply_sliced(arch, variables, images, dp, train=True,
                                                bn_stats=stats, dtype=model.dtype)
        return logits, new_stats

      def skip(stats):
        return jnp.zeros((images.shape[0], arch["num_classes"]), jnp.float32), stats

      if skip_inactive:
        logits, stats = jax.lax.cond(coefficients[k] != 0, compute, skip, stats)
      else:
        logits, new_stats = compute(stats)
        stats = jax.tree.map(lambda new, old, c=coefficients[k]: jnp.where(c != 0, new, old),
                             new_stats, stats)
      loss = jnp.mean(steps.cross_entropy(logits, labels))
      if teacher is not None and distill_weight > 0:
        taught = (coefficients[0] != 0).astype(jnp.float32)  # a skipped teacher's logits are zeros
        loss = loss + taught * distill_weight * steps.distillation(logits, teacher, temperature)
      teacher = logits if k == 0 else teacher
      total = total + coefficients[k] * loss
      losses.append(loss)
      accuracies.append(steps.accuracy(logits, labels))
    nnx.update(model, nnx.State(stats))
    return total, {"loss": total,
                   **_task_metrics([tasks[k] for k in computed], losses, accuracies)}

  return loss_fn


def masked_loss(tasks: Sequence[float]) -> steps.LossFn:
  """``sum_k c_k CE(masked network at tasks[k])``, every task computed in full."""
  tasks = tuple(float(dp) for dp in tasks)

  def loss_fn(model, images, labels, coefficients):
    total = jnp.zeros((), jnp.float32)
    losses, accuracies = [], []
    for k, dp in enumerate(tasks):
      logits = model(images, dp, train=True)
      loss = jnp.mean(steps.cross_entropy(logits, labels))
      total = total + coefficients[k] * loss
      losses.append(loss)
      accuracies.append(steps.accuracy(logits, labels))
    return total, {"loss": total, **_task_metrics(tasks, losses, accuracies)}

  return loss_fn
