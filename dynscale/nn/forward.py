"""The one forward pass of an architecture, shared by the masked and sliced paths.

:func:`run` walks the layers of :func:`dynscale.nn.spec.graph` and applies
each with its kind's :meth:`~dynscale.nn.kinds.Kind.apply`:

* masked (``widths`` given, may be traced): full variables; every tensor's
  channels beyond its group's width are zeroed, so shapes never change and
  one executable serves any width vector;
* sliced (``widths=None``): variables already cut to the widths
  (:func:`dynscale.nn.sliced.slice_variables`), so only the kept channels are
  computed (DESIGN invariants 1-2).

It returns the output, the batch moments of every batch norm (train mode)
with the group each one normalises, and the per-sample activity of every
gated output (the gate hook, DESIGN invariant 10).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dynscale.nn import spec
from dynscale.nn.kinds import KINDS, Context

Array = jax.Array
TreePath = tuple[Any, ...]


@dataclasses.dataclass
class Trace:
  """What :func:`run` returns.

  output: float32 logits (or the activations entering layer ``upto``).
  moments: ``{variables path of a batch norm: (group id, E[y], E[y^2])}`` in
  train mode. activity: ``{gate name: (B, C) 0/1}`` for every gate that ran.
  """

  output: Array
  moments: dict[TreePath, tuple[int, Array, Array]]
  activity: dict[str, Array]


def layer_path(index: int, profile: int | None) -> TreePath:
  """The variables path of layer ``index`` (of profile ``profile`` for MP-IDP copies)."""
  return ("layers", index) + (() if profile is None else (profile,))


def run(arch: dict, variables: Mapping, x: Array, *, widths: Array | None, train: bool,
        profile: int | None, gates: Mapping[str, Callable] | None = None,
        dtype=jnp.float32, upto: int | None = None) -> Trace:
  """The network of (validated) ``arch`` on ``x``.

  Args:
    arch: a validated architecture.
    variables: the pure variable dict (full for masked, sliced for sliced).
    x: a batch ``(B, *input_shape)`` (checked by the caller; the sliced path
      passes only the kept input channels when an IDP first layer trims them).
    widths: masked path: an int vector over :func:`dynscale.nn.spec.
      prunable_groups` (may be traced); None for the sliced path.
    train: batch statistics (recorded in ``moments``) or running ones.
    profile: the MP-IDP profile (None for a single-profile network).
    gates: ``{gate name: callable(x_in, y, train) -> (B, C)}`` (names
      ``layers.i`` or ``layers.i.<point>``).
    dtype: compute dtype; the output is float32.
    upto: run only layers ``0 .. upto - 1`` and return their output.
  """
  g = spec.graph(arch)
  masks = {} if widths is None else spec.group_masks(arch, widths)
  separate = spec.separate_layers(arch)
  moments: dict[TreePath, tuple[int, Array, Array]] = {}
  activity: dict[str, Array] = {}
  y = jnp.asarray(x, dtype)
  if 0 in masks:  # an IDP first layer reads only the first input channels
    y = y * masks[0].astype(y.dtype)
  for node in g.nodes[:upto]:
    layer = arch["layers"][node.index]
    kind = KINDS[layer["kind"]]
    path = layer_path(node.index, profile if node.index in separate else None)
    v = get_path(variables, path) if kind.parametric else {}

    def record(name, slot, first, second, path=path, node=node):
      if second is None:
        activity[name] = first
      else:
        moments[path + (name,)] = (node.slots[slot], first, second)

    ctx = Context(train=train, epsilon=arch["bn_epsilon"],
                  masks={slot: masks[gid] for slot, gid in node.slots.items() if gid in masks},
                  gates=gates, path=f"layers.{node.index}", record=record)
    y = kind.apply(layer, v, y, ctx, node.inputs, node.outputs)
  return Trace(y.astype(jnp.float32), moments, activity)


def get_path(tree: Mapping, path: TreePath) -> Any:
  """``tree[path[0]][path[1]]...``."""
  for key in path:
    tree = tree[key]
  return tree
