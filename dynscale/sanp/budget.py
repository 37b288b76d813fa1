"""What a FLOPs budget means for the SANP baselines, by the §4.1.1 formula.

* FIXED-K (002 §5.1) keeps the same fraction ``k`` of every gated layer's
  channels; ``k`` is "chosen to match the expected computational cost":
  :func:`fixed_k_keep`.
* ``thin`` (beyond the paper) is the backbone made uniformly narrower until
  it costs the budget: :func:`thin_width_multiplier`.

Both solve ``FLOPs(x) / FLOPs(full) = budget`` for a monotone ``x`` by
bisection, with the core's cost functions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from dynscale.nn import costs, layers, models
from dynscale.sanp import gates


def check_budget(budget) -> None:
  """Raises unless ``budget`` is a fraction of the full FLOPs in (0, 1)."""
  if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
    raise ValueError(f"sanp.budget must be a fraction of the full network's FLOPs in (0, 1), "
                     f"got {budget!r}")


def _solve(ratio: Callable[[float], float], budget: float, steps: int = 40) -> float:
  """The ``x`` in (0, 1] whose non-decreasing ``ratio(x)`` is closest to ``budget``."""
  lo, hi = 0.0, 1.0
  for _ in range(steps):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if ratio(mid) < budget else (lo, mid)
  return min((lo, hi), key=lambda x: abs(ratio(x) - budget) if x > 0 else float("inf"))


def fixed_k_flops_ratio(arch: dict, keep: float) -> float:
  """FLOPs of ``arch`` with every gated layer keeping ``keep`` of its channels,
  as a fraction of the full network's.

  Every gate keeps its first channels here. That is FIXED-K's cost on a chain
  of convolutions, whichever channels each image keeps; at a residual add,
  whose active channels are the union of the two sides' (§4.1.1 counted per
  sample), images that keep different channels on the two sides cost more:
  on residual networks this is a lower bound.
  """
  activity = {name: jnp.asarray(jnp.arange(p.outputs) < gates.kept_channels(keep, p.outputs),
                                jnp.float32)[None]
              for name, p in layers.gate_points(arch).items()}
  return float(costs.sample_flops(arch, 1.0, activity)[0]) / costs.flops(arch)


def fixed_k_keep(arch: dict, budget: float) -> float:
  """FIXED-K's keep fraction ``k`` whose FLOPs are closest to ``budget``."""
  check_budget(budget)
  return _solve(lambda keep: fixed_k_flops_ratio(arch, keep), budget)


def thin_width_multiplier(name: str, num_classes: int, input_shape, budget: float,
                          width_multiplier: float = 1.0) -> float:
  """The width multiplier (absolute, as ``model.width_multiplier`` takes it)
  whose network ``name`` costs ``budget`` of the one at ``width_multiplier``."""
  check_budget(budget)

  def flops(w: float) -> int:
    return costs.flops(models.architecture(name, num_classes=num_classes,
                                           input_shape=input_shape, width_multiplier=w))
  full = flops(width_multiplier)
  return width_multiplier * _solve(lambda x: flops(width_multiplier * x) / full, budget)


def spm_flops(arch: dict, reduction: int) -> int:
  """Multiply-adds of SPM gates (Eq. 6's two layers) on every gate point of ``arch``,
  per image: the gates' own cost, listed apart from the network's. Eq. 5's
  pooling of each gate's input (``H W C_in`` additions, no multiplies) is not
  counted, as §4.1.1 counts multiply-adds."""
  total = 0
  for point in layers.gate_points(arch).values():
    hidden = max(1, point.outputs // reduction)
    total += point.inputs * hidden + hidden * point.outputs
  return total
