"""Architecture dicts, their channel groups, and width vectors.

An architecture is a plain dict, the single source of truth: the zoo
produces it, the masked NNX network builds from it, the sliced path and the
cost model read it, and export saves exactly it::

    {"name": "resnet18", "input_shape": [32, 32, 3], "num_classes": 10,
     "profile": "linear",            # a name from idp.PROFILES
     "profiles": None,               # or MP-IDP DP ranges [[0, .3], [.3, 1]]
     "bn_momentum": 0.9, "bn_epsilon": 1e-5,
     "layers": [{"kind": "conv", "features": 64, "kernel": 3, "stride": 1,
                 "padding": "SAME", "idp": False, "bn": True, "act": "relu",
                 "binary": False, "profile": None},
                {"kind": "resblock", "features": 64, "stride": 1, ...}, ...]}

Each layer kind (fields, shape rule, groups, variables, apply, cost) is
defined once in :mod:`dynscale.nn.kinds`.

Channel groups and widths (DESIGN invariant 9). :func:`graph` assigns the
channels of every tensor to a group. A layer's output is a new group, except
that pooling and flatten pass their input's group on, and a residual block
whose output is added to its input keeps the input's group: the channels that
meet at a residual add are one *tied* group. A *width vector* keeps the first
``w_g`` channels of every prunable group ``g`` (every group but the network
input and the logits; the input only when an IDP layer reads it), in the
order of :func:`prunable_groups`. It may also be given per member layer
(``{"layers.3": 40, "layers.5.mid": 64, ...}``), and then the members of a
tied group must agree. IDP's DP is one way to produce widths
(:func:`widths_at_dp`): a group read by an IDP profile keeps
``num_kept(C, dp)`` channels (001 Fig. 1), every other group all of them.

``"idp": True`` on a layer puts the profile on the input channels of its
convolutions (001 §II-C). A layer may override the network profile with its
own ``"profile"`` (a name, or explicit non-increasing values, one per input
channel). Dense layers after ``flatten`` of an ``H x W x C`` map address
channels: the profile is per channel, shared by every position.

Nothing here depends on Flax, so an exported network reloads with only
:mod:`dynscale.nn.sliced`, this module, :mod:`dynscale.nn.kinds` and the
kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynscale import idp
from dynscale.nn.kinds import ACTIVATIONS, KINDS, REQUIRED, Feature

LAYER_KINDS = tuple(KINDS)
PARAMETRIC_KINDS = tuple(name for name, kind in KINDS.items() if kind.parametric)

_ARCH_DEFAULTS: dict[str, Any] = dict(
    name=REQUIRED, input_shape=REQUIRED, num_classes=REQUIRED, profile="linear",
    profiles=None, layers=REQUIRED, bn_momentum=0.9, bn_epsilon=1e-5)

# DP ranges of MP-IDP are compared with this slack (0.3 vs 0.30000000000000004).
_RANGE_TOLERANCE = 1e-9

# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(where: str, value: Any) -> int:
  if not _is_int(value) or value < 1:
    raise ValueError(f"{where} must be a positive int, got {value!r}")
  return int(value)


def _boolean(where: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{where} must be true or false, got {value!r}")
  return value


def _fill(where: str, given: dict, defaults: dict) -> dict:
  """``given`` with defaults filled in; unknown or missing keys raise."""
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"{where} has unknown keys {unknown}; allowed keys are {sorted(defaults)}")
  filled = {}
  for key, default in defaults.items():
    if key in given:
      filled[key] = given[key]
    elif default is REQUIRED:
      raise ValueError(f"{where} needs the key {key!r}")
    else:
      filled[key] = default
  return filled


def _check_profile_spec(where: str, value: Any) -> str | list[float] | None:
  if value is None or (isinstance(value, str) and value in idp.PROFILES):
    return value
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(f"{where} must be one of {idp.PROFILES} or a list of coefficients, "
                     f"got {value!r}")
  return [float(v) for v in idp.check_profile(value, where)]


def _check_layer(i: int, layer: Any) -> dict:
  where = f"layers[{i}]"
  if not isinstance(layer, dict):
    raise ValueError(f"{where} must be a dict, got {type(layer).__name__}")
  name = layer.get("kind")
  if name not in KINDS:
    raise ValueError(f"{where}.kind must be one of {LAYER_KINDS}, got {name!r}")
  kind = KINDS[name]
  out = {"kind": name, **_fill(where, {k: v for k, v in layer.items() if k != "kind"},
                               kind.fields)}
  for key in kind.int_fields:
    out[key] = _positive_int(f"{where}.{key}", out[key])
  for key in kind.bool_fields:
    out[key] = _boolean(f"{where}.{key}", out[key])
  if "act" in out and out["act"] not in ACTIVATIONS:
    raise ValueError(f"{where}.act must be one of {ACTIVATIONS}, got {out['act']!r}")
  if "profile" in out:
    out["profile"] = _check_profile_spec(f"{where}.profile", out["profile"])
    if out["profile"] is not None and not out["idp"]:
      raise ValueError(f"{where}.profile is set but the layer is not IDP (idp is false)")
  kind.check(where, out)
  return out


def _check_ranges(value: Any) -> list[list[float]] | None:
  """MP-IDP DP ranges: contiguous [lo, hi] pairs from 0 to 1 (001 §III)."""
  if value is None:
    return None
  where = "profiles"
  if not isinstance(value, Sequence) or isinstance(value, str) or not value:
    raise ValueError(f"{where} must be null or a non-empty list of [lo, hi] DP ranges, "
                     f"got {value!r}")
  ranges, previous = [], 0.0
  for s, pair in enumerate(value):
    if (not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)):
      raise ValueError(f"{where}[{s}] must be a [lo, hi] pair of numbers, got {pair!r}")
    lo, hi = float(pair[0]), float(pair[1])
    if abs(lo - previous) > _RANGE_TOLERANCE or not lo < hi <= 1.0:
      raise ValueError(f"{where}[{s}] = {pair!r}: ranges must be contiguous, increasing, "
                       f"start at 0 and end at 1 (expected lo={previous})")
    ranges.append([lo, hi])
    previous = hi
  if abs(previous - 1.0) > _RANGE_TOLERANCE:
    raise ValueError(f"{where} must end at 1.0, got {previous}")
  return ranges


def _input_feature(shape: Any) -> Feature:
  if (not isinstance(shape, Sequence) or isinstance(shape, str) or len(shape) not in (1, 3)):
    raise ValueError(f"input_shape must be [features] or [height, width, channels], got {shape!r}")
  dims = [_positive_int("input_shape[*]", d) for d in shape]
  return Feature(1, 1, dims[0], True) if len(dims) == 1 else Feature(*dims, False)


def _profile_widths(layer: dict, inputs: Feature, outputs: Feature) -> set[int]:
  """The channel counts the IDP profiles of ``layer`` run over (one per gamma)."""
  def widths(specs: Mapping) -> set[int]:
    found = set()
    for var in specs.values():
      if isinstance(var, Mapping):
        found |= widths(var)
      elif var.role == "gamma":
        found.add(var.shape[0])
    return found
  return widths(KINDS[layer["kind"]].variables(layer, inputs, outputs))


def validate_architecture(arch: Any) -> dict:
  """Checks an architecture dict and returns a normalised deep copy.

  Every optional field is filled in with its default, so the result is
  self-describing (and idempotent under this function). Raises ValueError
  naming the field and the allowed values on any problem, including shape
  errors (a dense layer on a map, a pool window larger than its input, a
  network whose output is not ``num_classes`` logits, a profile of the wrong
  length).
  """
  if not isinstance(arch, dict):
    raise ValueError(f"architecture must be a dict, got {type(arch).__name__}")
  out = _fill("architecture", copy.deepcopy(arch), _ARCH_DEFAULTS)
  if not isinstance(out["name"], str):
    raise ValueError(f"name must be a string, got {out['name']!r}")
  out["input_shape"] = list(_input_feature(out["input_shape"]).shape())
  out["num_classes"] = _positive_int("num_classes", out["num_classes"])
  if out["profile"] not in idp.PROFILES:
    raise ValueError(f"profile must be one of {idp.PROFILES}, got {out['profile']!r}")
  out["profiles"] = _check_ranges(out["profiles"])
  momentum, epsilon = out["bn_momentum"], out["bn_epsilon"]
  if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
    raise ValueError(f"bn_momentum must be in [0, 1), got {momentum!r}")
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0:
    raise ValueError(f"bn_epsilon must be > 0, got {epsilon!r}")
  out["bn_momentum"], out["bn_epsilon"] = float(momentum), float(epsilon)
  if not isinstance(out["layers"], Sequence) or not out["layers"]:
    raise ValueError("layers must be a non-empty list of layer dicts")
  out["layers"] = [_check_layer(i, layer) for i, layer in enumerate(out["layers"])]
  if not any(layer["kind"] in PARAMETRIC_KINDS for layer in out["layers"]):
    raise ValueError(f"layers must contain at least one of {PARAMETRIC_KINDS}")
  features = _features(out)
  for i, layer in enumerate(out["layers"]):
    values = layer.get("profile")
    if isinstance(values, list):
      widths = _profile_widths(layer, features[i], features[i + 1])
      if widths - {len(values)}:  # a layer without profiles ignores the list
        raise ValueError(f"layers[{i}].profile has {len(values)} coefficients, the layer's "
                         f"profiles run over {sorted(widths)} channels (a list serves layers "
                         "whose profiles share one width; name a profile for the others)")
  last = features[-1]
  if not last.flat or last.size != out["num_classes"]:
    raise ValueError(f"the network must end in {out['num_classes']} logits (num_classes), "
                     f"its output shape is {last.shape()}")
  _check_shared_idp_layer(out)
  return out


def _check_shared_idp_layer(arch: dict) -> None:
  """MP-IDP needs an IDP layer that the profiles share (001 §III, Fig. 9).

  Each profile holds its own first and last parametric layer
  (:func:`separate_layers`); the profiles share the channels of the middle
  IDP layers ("the beginning 40% of input channels in the IDP layer are
  shared between all three profiles", 001 §IV-D). With no IDP layer in the
  middle, the "profiles" would be independent networks.
  """
  if arch["profiles"] is None:
    return
  separate = separate_layers(arch)
  shared = [i for i in parametric_indices(arch) if i not in separate
            and KINDS[arch["layers"][i]["kind"]].idp_slots(arch["layers"][i])]
  if not shared:
    raise ValueError(
        f"profiles: an MP-IDP network needs an IDP layer shared between its profiles, but "
        f"every IDP layer of {arch['name']!r} is a first or last parametric layer "
        f"(layers {list(separate)}), which each profile holds on its own; use a network "
        "with an IDP layer in the middle (e.g. tesla_mlp rather than mlp)")


def _features(arch: dict) -> list[Feature]:
  """Input feature of every layer, plus the network output at the end."""
  x = _input_feature(arch["input_shape"])
  features = [x]
  for i, layer in enumerate(arch["layers"]):
    x = KINDS[layer["kind"]].output(f"layers[{i}] ({layer['kind']})", layer, x)
    features.append(x)
  return features


# --------------------------------------------------------------------------
# The graph: shapes and channel groups
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Group:
  """A set of channels trimmed or gated together.

  members: the layer outputs in the group (``"layers.3"``, ``"layers.5.mid"``,
  ``"input"``); more than one for a tied residual group. idp: an IDP
  profile reads it. prunable: a width vector has an entry for it.
  """

  id: int
  name: str
  size: int
  members: tuple[str, ...]
  idp: bool
  prunable: bool


@dataclasses.dataclass(frozen=True)
class Node:
  """One layer: its full input / output shapes and the group of each slot."""

  index: int
  kind: str
  inputs: Feature
  outputs: Feature
  slots: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class Graph:
  nodes: tuple[Node, ...]
  groups: tuple[Group, ...]

  @property
  def prunable(self) -> tuple[Group, ...]:
    return tuple(g for g in self.groups if g.prunable)


def graph(arch: dict) -> Graph:
  """Shapes and channel groups of a validated architecture (module docstring)."""
  features = _features(arch)
  sizes, members, idp_read = [features[0].channels], [["input"]], [False]
  nodes, current = [], 0

  def new_group(size: int, member: str) -> int:
    sizes.append(size)
    members.append([member])
    idp_read.append(False)
    return len(sizes) - 1

  for i, layer in enumerate(arch["layers"]):
    kind, x, out = KINDS[layer["kind"]], features[i], features[i + 1]
    slots = {"in": current}
    mid = kind.mid_width(layer, x)
    if mid is not None:
      slots["mid"] = new_group(mid, f"layers.{i}.mid")
    if not kind.parametric:
      slots["out"] = current
    elif kind.ties_output(layer, x):
      slots["out"] = current
      members[current].append(f"layers.{i}")
    else:
      slots["out"] = new_group(out.channels, f"layers.{i}")
    for slot in kind.idp_slots(layer):
      idp_read[slots[slot]] = True
    nodes.append(Node(i, layer["kind"], x, out, slots))
    current = slots["out"]
  groups = tuple(
      Group(g, members[g][0], sizes[g], tuple(members[g]), idp_read[g],
            prunable=g != current and (g != 0 or idp_read[g]))
      for g in range(len(sizes)))
  return Graph(tuple(nodes), groups)


def prunable_groups(arch: dict) -> tuple[Group, ...]:
  """The groups a width vector covers, in its order."""
  return graph(arch).prunable


# --------------------------------------------------------------------------
# Width vectors
# --------------------------------------------------------------------------


def widths_at_dp(arch: dict, dp) -> tuple[int, ...] | jax.Array:
  """IDP's widths at DP ``dp``: ``num_kept(C, dp)`` for groups an IDP profile reads.

  A concrete ``dp`` gives a tuple of ints (checked to lie in (0, 1]); a
  traced one an int32 array, for the masked path.
  """
  groups = prunable_groups(arch)
  if isinstance(dp, jax.core.Tracer):
    return jnp.stack([idp.kept_width(g.size, dp) if g.idp else jnp.int32(g.size)
                      for g in groups])
  return tuple(idp.num_kept(g.size, dp) if g.idp else g.size for g in groups)


def _member_widths(groups: Sequence[Group], widths: Mapping) -> list[int]:
  """Group widths from per-member widths; members of a tied group must agree."""
  known = {m: g for g in groups for m in g.members}
  unknown = sorted(set(widths) - set(known))
  if unknown:
    raise ValueError(f"widths has unknown layers {unknown}; the prunable layer outputs are "
                     f"{sorted(known)}")
  out = []
  for g in groups:
    given = {m: widths[m] for m in g.members if m in widths}
    values = set(given.values()) | ({g.size} if len(given) < len(g.members) else set())
    if len(values) > 1:
      raise ValueError(f"widths break the tied group {g.name!r} (members {list(g.members)} "
                       f"meet at a residual add and keep the same channels): got {given}")
    out.append(values.pop())
  return out


def dp_of(widths: Any) -> float | None:
  """The DP when ``widths`` (any form :func:`resolve_widths` takes) is one, else
  None: a real number that is not an integer, NumPy's floats included (a
  width vector is a sequence, an int never a DP)."""
  if isinstance(widths, numbers.Real) and not isinstance(widths, (bool, numbers.Integral)):
    return float(widths)
  return None


def resolve_widths(arch: dict, widths: Any) -> tuple[int, ...]:
  """A checked width vector (one int per prunable group) from any accepted form.

  ``widths``: a DP in (0, 1] (:func:`widths_at_dp`); a sequence of ints, one
  per group of :func:`prunable_groups`; or a mapping from member layer names
  to ints (missing members keep their full width; tied members must agree).
  Each width must lie in [1, group size]. Errors name the group.
  """
  groups = prunable_groups(arch)
  dp = dp_of(widths)
  if dp is not None:
    return widths_at_dp(arch, idp.check_dp(dp))
  if isinstance(widths, Mapping):
    values = _member_widths(groups, widths)
  elif isinstance(widths, (Sequence, np.ndarray)) and not isinstance(widths, str):
    values = widths.tolist() if isinstance(widths, np.ndarray) else list(widths)
    if len(values) != len(groups):
      raise ValueError(f"widths must have one entry per prunable group ({len(groups)}: "
                       f"{[g.name for g in groups]}), got {len(values)}")
  else:
    raise ValueError("widths must be a DP in (0, 1], a sequence of ints (one per prunable "
                     f"group) or a mapping from layer names to ints, got {widths!r}")
  for g, w in zip(groups, values):
    if not _is_int(w) or not 1 <= w <= g.size:
      raise ValueError(f"widths[{g.name!r}] must be an int in [1, {g.size}], got {w!r}")
  return tuple(int(w) for w in values)


def width_array(arch: dict, widths: Any) -> jax.Array:
  """``widths`` as an int array over :func:`prunable_groups`, checked as
  :func:`resolve_widths` checks a list: its dtype and length even when
  traced (an index past its end would be clamped, one width serving every
  group), its values when concrete (ints in [1, group size])."""
  groups = prunable_groups(arch)
  widths = jnp.asarray(widths)
  if not jnp.issubdtype(widths.dtype, jnp.integer):
    raise ValueError(f"widths as an array must hold ints, got dtype {widths.dtype}")
  if widths.shape != (len(groups),):
    raise ValueError(f"widths must have one entry per prunable group ({len(groups)}: "
                     f"{[g.name for g in groups]}), got an array of shape {widths.shape}")
  if not isinstance(widths, jax.core.Tracer):
    resolve_widths(arch, np.asarray(widths))
  return widths


def group_masks(arch: dict, widths: jax.Array) -> dict[int, jax.Array]:
  """``{group id: (C,) float 0/1 mask of the first widths[g] channels}``; widths
  (:func:`width_array`) may be traced."""
  widths = width_array(arch, widths)
  return {g.id: (jnp.arange(g.size) < widths[j]).astype(jnp.float32)
          for j, g in enumerate(prunable_groups(arch))}


def group_widths(arch: dict, widths: Sequence[int]) -> dict[int, int]:
  """``{group id: width}`` for every group (non-prunable ones at full size)."""
  groups = graph(arch).groups
  out = {g.id: g.size for g in groups}
  out.update({g.id: int(w) for g, w in zip((g for g in groups if g.prunable), widths)})
  return out


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer at a width vector: full shapes and the kept width of each slot."""

  index: int
  kind: str
  inputs: Feature
  outputs: Feature
  widths: Mapping[str, int]

  @property
  def in_width(self) -> int:
    return self.widths["in"]

  @property
  def out_width(self) -> int:
    return self.widths["out"]


def plan(arch: dict, widths: Any = 1.0) -> list[LayerPlan]:
  """Per-layer shapes and kept slot widths at ``widths`` (any form of :func:`resolve_widths`)."""
  by_group = group_widths(arch, resolve_widths(arch, widths))
  return [LayerPlan(n.index, n.kind, n.inputs, n.outputs,
                    {slot: by_group[g] for slot, g in n.slots.items()})
          for n in graph(arch).nodes]


def trimmed_architecture(arch: dict, widths: Any) -> dict:
  """The architecture of the network cut to ``widths``: every group at its kept width.

  Its full network is the trimmed one (a width vector of all-full widths).
  The profile fields describe initialisation only; exported profile values
  are in the parameters.
  """
  arch = validate_architecture(arch)
  layers = []
  for p in plan(arch, widths):
    layer = arch["layers"][p.index]
    layers.append(KINDS[layer["kind"]].with_widths(layer, p.widths, p.inputs) if p.kind in
                  PARAMETRIC_KINDS else layer)
    if isinstance(layer.get("profile"), list):
      layers[-1] = {**layers[-1], "profile": layer["profile"][:p.in_width]}
  out = {**arch, "layers": layers}
  if graph(arch).groups[0].prunable:
    shape = list(arch["input_shape"])
    shape[-1] = plan(arch, widths)[0].in_width
    out["input_shape"] = shape
  return validate_architecture(out)


# --------------------------------------------------------------------------
# Other queries on a (validated) architecture
# --------------------------------------------------------------------------


def parametric_indices(arch: dict) -> list[int]:
  """Indices of the layers with weights."""
  return [i for i, layer in enumerate(arch["layers"]) if layer["kind"] in PARAMETRIC_KINDS]


def separate_layers(arch: dict) -> tuple[int, ...]:
  """Layers held once per profile under MP-IDP: the first and last parametric ones.

  001 §III: "each profile maintains a separate first and last layer". Empty
  for a single-profile network.
  """
  if arch["profiles"] is None:
    return ()
  params = parametric_indices(arch)
  return tuple(sorted({params[0], params[-1]}))


def layer_profile(arch: dict, index: int) -> str | list[float]:
  """The profile spec of layer ``index``: its own, else the network's."""
  own = arch["layers"][index].get("profile")
  return arch["profile"] if own is None else own


def select_profile(arch: dict, dp: float | None, profile_index: int | None) -> int | None:
  """The MP-IDP profile used at ``dp`` (None for a single-profile network).

  The profile is the first whose range upper bound is >= dp (001 §III: "when
  IDP is between 0% and 50%, profile 1 is used, otherwise profile 2").
  ``profile_index`` overrides the choice (training stage s forces profile s);
  otherwise ``dp`` must be a concrete number.
  """
  ranges = arch["profiles"]
  if ranges is None:
    if profile_index is not None:
      raise ValueError("profile_index is only for MP-IDP networks (architecture "
                       "'profiles' is null)")
    return None
  if profile_index is not None:
    if not _is_int(profile_index) or not 0 <= profile_index < len(ranges):
      raise ValueError(f"profile_index must be an int in [0, {len(ranges)}), "
                       f"got {profile_index!r}")
    return int(profile_index)
  if dp is None or isinstance(dp, jax.core.Tracer):
    raise ValueError("an MP-IDP network needs a concrete dp or an explicit profile_index "
                     "to choose its profile (dp is traced or widths were given)")
  dp = idp.check_dp(dp)
  return next(s for s, (_, hi) in enumerate(ranges) if hi >= dp - _RANGE_TOLERANCE)


def check_input(arch: dict, x: jax.Array) -> None:
  """Raises ValueError unless ``x`` is a batch ``(B, *input_shape)``."""
  expected = tuple(arch["input_shape"])
  if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
    raise ValueError(f"x must have shape (batch, {', '.join(map(str, expected))}), "
                     f"got {tuple(x.shape)}")
