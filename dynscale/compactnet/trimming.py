"""Trimmable groups, filter importance and trimming (CompactNet, paper 004 §3.3).

A *trimmable group* is a channel group of the core (:mod:`dynscale.nn.spec`)
whose width the search chooses: the first conv's outputs, each MobileNetV2
stage's outputs (one group: its blocks' outputs meet at residual adds), any
other prunable layer output. An inverted residual block's expansion width
*follows* its input: ``t x`` the block input's width, as the paper's Table 2
(``expansion="tied"``); with ``expansion="independent"`` every expansion is
a trimmable group of its own.

§3.3: "filters with the largest L2-norm magnitude remain". A group's
importance per channel is the sum, over the layers whose outputs are in the
group (every member of a tied group), of the L2 norm of the filter producing
that channel (a kernel's last axis). :func:`reorder` permutes every
variable's channels so each group lists its kept channels by decreasing
importance; a width ``w`` then keeps the ``w`` most important, as a prefix.
That makes both execution paths of the core available: the *masked* network
at a traced width vector (one compile serves every candidate) and the
*trimmed* one (:func:`trim`, a smaller architecture and its sliced
variables), equal in logits, gradients of the kept weights and batch-norm
statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from dynscale.nn import sliced, spec
from dynscale.nn.kinds import Var

EXPANSIONS = ("tied", "independent")


@dataclasses.dataclass(frozen=True)
class TrimGroup:
  """One width the search chooses.

  name: the core group's name (its first member, e.g. ``"layers.0"``).
  size: its full width. index: its position in the core's width vector.
  followers: ``(core index, factor)`` of the expansion groups whose width is
  ``factor x`` this group's.
  """

  name: str
  size: int
  index: int
  followers: tuple[tuple[int, int], ...] = ()


def _expansion_inputs(arch: dict) -> dict[int, tuple[int, int]]:
  """``{mid group id: (input group id, expansion factor)}`` of every expanding block."""
  out = {}
  for node in spec.graph(arch).nodes:
    layer = arch["layers"][node.index]
    if layer["kind"] == "invres" and "mid" in node.slots:
      out[node.slots["mid"]] = (node.slots["in"], layer["expansion"])
  return out


def trimmable_groups(arch: dict, expansion: str = "tied") -> tuple[TrimGroup, ...]:
  """The groups of ``arch`` the search trims, in network order (module docstring).

  With ``expansion="tied"`` an expansion group whose size is not ``t x`` its
  input's (``mid_features`` set by hand) is trimmable on its own.
  """
  if expansion not in EXPANSIONS:
    raise ValueError(f"expansion must be one of {EXPANSIONS}, got {expansion!r}")
  arch = spec.validate_architecture(arch)
  if arch["profiles"] is not None:
    raise ValueError("trimming needs a single-profile network (profiles: null); MP-IDP "
                     "keeps separate first and last layers per profile")
  prunable = spec.prunable_groups(arch)
  position = {g.id: j for j, g in enumerate(prunable)}
  sizes = {g.id: g.size for g in prunable}
  followed: dict[int, list[tuple[int, int]]] = {}
  if expansion == "tied":
    for mid, (source, t) in _expansion_inputs(arch).items():
      if source in position and sizes[mid] == t * sizes[source]:
        followed.setdefault(source, []).append((position[mid], t))
  following = {j for pairs in followed.values() for j, _ in pairs}
  return tuple(TrimGroup(g.name, g.size, position[g.id], tuple(followed.get(g.id, ())))
               for g in prunable if position[g.id] not in following)


def core_widths(arch: dict, groups: Sequence[TrimGroup], widths: Sequence[int]
                ) -> tuple[int, ...]:
  """The core width vector (:func:`dynscale.nn.spec.resolve_widths`) of trimmed widths.

  ``widths``: one int per trimmable group, in [1, size]. Followers get
  ``factor x`` their group's width; groups nobody trims keep their size.
  """
  if len(widths) != len(groups):
    raise ValueError(f"widths must have one entry per trimmable group ({len(groups)}: "
                     f"{[g.name for g in groups]}), got {len(widths)}")
  out = [g.size for g in spec.prunable_groups(arch)]
  for g, w in zip(groups, widths):
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 1 <= w <= g.size:
      raise ValueError(f"widths[{g.name!r}] must be an int in [1, {g.size}], got {w!r}")
    out[g.index] = int(w)
    for j, t in g.followers:
      out[j] = t * int(w)
  return tuple(out)


def _filter_norms(a: np.ndarray) -> np.ndarray:
  """L2 norm of each output filter of kernel ``a`` (its last axis)."""
  return np.sqrt(np.sum(np.square(a.reshape(-1, a.shape[-1])), axis=0))


def importance(arch: dict, variables: Mapping) -> dict[int, np.ndarray]:
  """``{core group id: (C,) importance}``: the summed L2 norms of the filters
  producing each channel, over every layer output in the group (§3.3)."""
  arch = spec.validate_architecture(arch)
  g = spec.graph(arch)
  out = {group.id: np.zeros(group.size, np.float64) for group in g.groups}

  def walk(specs: Mapping, values: Mapping, slots: Mapping[str, int]) -> None:
    for name, var in specs.items():
      if not isinstance(var, Var):
        walk(var, values[name], slots)
      elif var.role == "kernel":
        last = dict(var.axes).get(len(var.shape) - 1)
        if last is not None:
          out[slots[last]] += _filter_norms(np.asarray(values[name], np.float64))

  for node in g.nodes:
    if node.kind in spec.PARAMETRIC_KINDS:
      walk(sliced.layer_variables(arch, node), variables["layers"][node.index], node.slots)
  return out


def ranking(scores: np.ndarray, width: int) -> np.ndarray:
  """Channel order: the first ``width`` channels (the kept ones) by decreasing
  score, then the rest in their order. Ties keep the lower index first."""
  kept = np.argsort(-scores[:width], kind="stable")
  return np.concatenate([kept, np.arange(width, scores.shape[0])])


def reorder(arch: dict, variables: Mapping, orders: Mapping[int, np.ndarray]) -> dict:
  """``variables`` with the channels of each group ``g`` in ``orders[g]``
  (a permutation), along every axis of every layer tied to that group.

  A function-preserving change when every order is a permutation (channels
  keep their weights, statistics and consumers).
  """
  arch = spec.validate_architecture(arch)
  layers = dict(variables["layers"])
  for node in spec.graph(arch).nodes:
    if node.kind not in spec.PARAMETRIC_KINDS:
      continue
    channels = {slot: jnp.asarray(orders[gid]) for slot, gid in node.slots.items()
                if gid in orders}
    if channels:
      layers[node.index] = sliced.gather_layer_variables(arch, node.index,
                                                         layers[node.index], channels)
  return {**variables, "layers": layers}


@dataclasses.dataclass(frozen=True)
class Ordered:
  """Variables reordered by importance at a core width vector.

  variables: full-size, each group's kept channels first by decreasing
  importance. origin: ``{core group id: (C,) int}``, the index each position
  had in the variables given (composes over successive reorders).
  """

  variables: dict
  origin: dict[int, np.ndarray]


def order_by_importance(arch: dict, variables: Mapping, widths: Sequence[int],
                        origin: Mapping[int, np.ndarray] | None = None) -> Ordered:
  """Reorders ``variables`` so that every prefix of a kept group is its most
  important channels (importance measured on the kept channels at ``widths``,
  a core width vector; the channels already trimmed stay last)."""
  arch = spec.validate_architecture(arch)
  widths = spec.resolve_widths(arch, list(widths))
  prunable = spec.prunable_groups(arch)
  # scored on the network at ``widths``: a kept filter's rows that read trimmed
  # channels are not part of it (they keep their old values, unused)
  trimmed, kept_variables = trim(arch, variables, widths)
  kept = importance(trimmed, kept_variables)
  orders = {g.id: ranking(np.pad(kept[t.id], (0, g.size - w)), w)
            for g, t, w in zip(prunable, spec.prunable_groups(trimmed), widths)}
  origin = {g.id: np.arange(g.size) for g in prunable} if origin is None else origin
  return Ordered(reorder(arch, variables, orders),
                 {gid: np.asarray(origin[gid])[order] for gid, order in orders.items()})


def kept_channels(arch: dict, ordered: Ordered, widths: Sequence[int]) -> dict[str, list[int]]:
  """``{group name: sorted original indices of its kept channels}`` at core ``widths``."""
  prunable = spec.prunable_groups(arch)
  return {g.name: sorted(int(i) for i in ordered.origin[g.id][:w])
          for g, w in zip(prunable, widths)}


def trim(arch: dict, variables: Mapping, widths: Sequence[int]) -> tuple[dict, dict]:
  """The network cut to core ``widths``: ``(trimmed architecture, its variables)``.

  The variables must already be ordered (:func:`order_by_importance`), so the
  kept channels are each group's prefix; batch-norm statistics come along
  as they are (recalibrate after trimming, :mod:`dynscale.nn.batchnorm`).
  """
  arch = spec.validate_architecture(arch)
  widths = spec.resolve_widths(arch, list(widths))
  return (spec.trimmed_architecture(arch, widths),
          sliced.slice_variables(arch, variables, widths))
