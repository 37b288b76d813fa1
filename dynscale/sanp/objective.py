"""SANP's multi-task objective (paper 002 §3.4, Eq. 9-10).

``L = L_cls + lambda L_cost`` (Eq. 9), with ``lambda`` set from how far the
network's current cost is from the budget (Eq. 10) and never differentiated.

The cost term penalises the gates' codes. Eq. 9 is ``(1/N_c) sum_l ||s^l||_1``
over the saliencies ``s``; the literal L1 of ``s`` cannot reopen a channel
when lambda < 0 (its gradient only shrinks ``|s|``), so the default
penalises the relaxed codes ``s1`` (Eq. 7) that decide which channels stay
open. Three normalisations (``COSTS``):

* ``'filters'``: Eq. 9's ``1/N_c``, every channel of every gated layer alike;
* ``'layers'``: the mean over gated layers of each layer's mean code, so a
  narrow layer weighs as much as a wide one;
* ``'flops'``: the network's FLOPs with the codes as soft activities
  (:func:`dynscale.nn.costs.sample_flops`, the §4.1.1 formula, input and
  output side), as a fraction of the full network's, so a channel costs what
  it computes.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dynscale.nn import costs

COSTS = ("filters", "layers", "flops")
CODES = ("relaxed", "saliency")


def cost_weight(flops_fraction, budget: float, lambda0: float) -> jax.Array:
  """Eq. 10's ``lambda = lambda0 (p_t - p) / p0`` with ``p_t`` and ``p`` as
  fractions of the full network's FLOPs ``p0``; in ``[-lambda0, lambda0]``,
  and a constant to the gradient."""
  return lambda0 * jax.lax.stop_gradient(jnp.asarray(flops_fraction, jnp.float32) - budget)


def cost_loss(arch: dict, codes: Mapping[str, jax.Array], cost: str) -> jax.Array:
  """Eq. 9's ``L_cost`` of the codes ``{gate name: (B, C)}`` of one batch, a scalar.

  ``cost``: one of :data:`COSTS` (module docstring). Codes are non-negative
  (relaxed codes, or ``|s|`` for the literal L1 of the saliency, with
  ``'filters'`` or ``'layers'`` only: ``'flops'`` reads codes as activities
  in [0, 1]).
  """
  if cost not in COSTS:
    raise ValueError(f"sanp.cost must be one of {COSTS}, got {cost!r}")
  if cost == "flops":
    return jnp.mean(costs.sample_flops(arch, 1.0, codes)) / costs.flops(arch)
  per_layer = {name: jnp.mean(jnp.sum(code, axis=-1)) for name, code in codes.items()}
  if cost == "filters":
    channels = sum(code.shape[-1] for code in codes.values())
    return sum(per_layer.values()) / channels
  return sum(per_layer[name] / codes[name].shape[-1] for name in codes) / len(codes)
