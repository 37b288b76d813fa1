"""Analytic per-layer FLOPs and parameters at a width vector, or per sample under gates.

The network is costed as the sliced path runs it: each layer with its ACTIVE
input and output channels, at its output resolution, with SANP's formula
``H W (C_in k^2 + b) C_out`` (:func:`dynscale.metrics.sanp_flops`; one
multiply-add = one FLOP, ``b = 1`` only for layers with a bias). Each kind's
:meth:`~dynscale.nn.kinds.Kind.costs` writes its own entries once; the walk
here propagates the channel *activity* of every tensor:

* static (:func:`layer_costs`, :func:`flops`, :func:`params`): the first
  ``w_g`` channels of each group (a DP or a width vector), so a middle IDP
  layer costs about ``dp**2`` of its full cost (001 §I);
* per sample (:func:`sample_flops`): the activity the gate hook recorded,
  ``(B, C)`` per gated output, traceable, zero active channels allowed.
  Activity passes through activations, pooling and flatten; a residual add
  takes the union; an ungated output is active over its width.

Conventions: a dense layer on a flattened ``H x W`` map counts ``H W k``
inputs; a depthwise-separable block is a depthwise and a pointwise entry;
batch norm is its own entry with its ``2 n`` trainable parameters and no
FLOPs (it folds into the preceding layer at inference); pooling and flatten
are free; profiles are not parameters (``gamma_i w_ji`` folds into the
weights at inference). Under MP-IDP one profile's first and last layers
run, so :func:`params` counts one copy; :func:`stored_params` counts every
profile's copy, the size a compression rate (003 Eq. 8) divides by.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynscale import metrics
from dynscale.nn import spec
from dynscale.nn.kinds import KINDS, Activity, gate_name


def _walk(arch: dict, masks: Mapping[int, Any], activity: Mapping[str, Any]) -> list:
  """(name, kind, flops, params) of every parametric layer, propagating channel activity.

  ``masks``: the width mask of every group (numpy ints for static widths,
  jnp floats for traced ones); ``activity``: recorded gate activity by name.
  """
  active, entries = masks[0], []
  for node in spec.graph(arch).nodes:
    layer, path = arch["layers"][node.index], f"layers.{node.index}"

    def width(slot, node=node):
      return masks[node.slots[slot]]

    def gated(point, slot, path=path, width=width):
      recorded = activity.get(gate_name(path, point))
      return width(slot) if recorded is None else recorded

    costs, active = KINDS[layer["kind"]].costs(layer, node.inputs, node.outputs,
                                               Activity(active, width, gated))
    entries += [(f"{path}.{name}", kind, flops, params) for name, kind, flops, params in costs]
  return entries


def layer_costs(arch: dict, widths: Any = 1.0) -> list[metrics.LayerCost]:
  """Per-layer costs of the sliced network of ``arch`` at ``widths`` (a DP or a width vector).

  Entries are named after the variable paths: ``layers.3.conv``,
  ``layers.3.bn``, ``layers.5.depthwise``, ``layers.5.pointwise``,
  ``layers.7.conv1``, ``layers.7.shortcut``, ...
  """
  arch = spec.validate_architecture(arch)
  kept = spec.group_widths(arch, spec.resolve_widths(arch, widths))
  masks = {g.id: (np.arange(g.size) < kept[g.id]).astype(np.int64)
           for g in spec.graph(arch).groups}
  return [metrics.LayerCost(name, kind, int(flops), int(params))
          for name, kind, flops, params in _walk(arch, masks, {})]


def flops(arch: dict, widths: Any = 1.0) -> int:
  """Total analytic FLOPs of the network at ``widths`` (a DP or a width vector)."""
  return metrics.total(layer_costs(arch, widths)).flops


def params(arch: dict, widths: Any = 1.0) -> int:
  """Parameters used by the network at ``widths`` (all of one profile's at 1.0)."""
  return metrics.total(layer_costs(arch, widths)).params


def stored_params(arch: dict) -> int:
  """Parameters the network stores: under MP-IDP, every profile's own layers too.

  With ``P`` profiles each holds its own first and last parametric layer
  (001 §III), so ``stored = params(arch) + (P - 1) * params(separate layers)``;
  without profiles it equals :func:`params`. This is the size ``|W|`` that
  the compression rate ``|W| / |W*|`` (003 Eq. 8) needs.
  """
  arch = spec.validate_architecture(arch)
  entries = layer_costs(arch, 1.0)
  separate = {f"layers.{i}" for i in spec.separate_layers(arch)}
  own = sum(c.params for c in entries if ".".join(c.name.split(".")[:2]) in separate)
  copies = len(arch["profiles"]) - 1 if arch["profiles"] else 0
  return metrics.total(entries).params + copies * own


def sample_flops(arch: dict, widths: Any, activity: Mapping[str, jax.Array]) -> jax.Array:
  """FLOPs of each sample ``(B,)`` float32, from the gate activity of a masked run.

  ``activity``: ``{gate name: (B, C) 0/1}`` as :meth:`dynscale.nn.layers.
  IDPNet.run` records it; ``widths``: the widths of that run (a DP, a width
  vector, or an int array over the prunable groups, which may be traced).
  Traceable. With every gate open it equals :func:`flops` at the same widths.
  """
  if not activity:
    raise ValueError("activity is empty: sample_flops needs the gate activity of a run "
                     "(build the model with a gate factory)")
  if not isinstance(widths, jax.Array):
    widths = jnp.asarray(spec.resolve_widths(arch, widths))
  prunable = spec.group_masks(arch, widths)
  masks = {g.id: prunable.get(g.id, jnp.ones((g.size,), jnp.float32))
           for g in spec.graph(arch).groups}
  batch = next(iter(activity.values())).shape[0]
  total = jnp.zeros((batch,), jnp.float32)
  for _, kind, value, _ in _walk(arch, masks, activity):
    total = total + jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch,))
  return total
