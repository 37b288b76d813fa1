"""Architecture dicts: the JSON-able description of an incomplete network.

An architecture is a plain dict (the single source of truth: the model zoo
produces it, :class:`~dynscale.nn.layers.IDPNet` builds from it, the sliced
path and the cost model read it, and export saves exactly it)::

    {"name": "vgg16", "input_shape": [32, 32, 3], "num_classes": 10,
     "profile": "linear",            # a name from idp.PROFILES
     "profiles": None,               # or MP-IDP DP ranges [[0, .3], [.3, 1]]
     "bn_momentum": 0.9, "bn_epsilon": 1e-5,
     "layers": [{"kind": "conv", "features": 64, "kernel": 3, "stride": 1,
                 "idp": False, "bn": True, "act": "relu", "binary": False,
                 "profile": None}, ...]}

``"idp": True`` on a layer puts the profile on that layer's INPUT channels
(001 §II-C, y_j = sum_i gamma_i w_ji x_i): at DP ``p`` it uses the first
``num_kept(C_in, p)`` input channels, so the layer before it need compute only
those outputs (001 Fig. 1). A layer may override the network profile with its
own ``"profile"`` (a name, or explicit non-increasing values, one per input
channel). Layers with batch norm have no bias; layers without one have a bias.

Dense layers after ``flatten`` of an ``H x W x C`` map: the profile is defined
per CHANNEL (length C, shared by all H*W positions), so DP keeps the first
channels of every position and the layer before computes only those. When
``H * W > 1`` the dense layer is evaluated as an ``H x W`` VALID convolution
over the map (the same arithmetic with a reshaped kernel), which lets the
channel-prefix kernels of :mod:`dynscale.idp` slice it.

Nothing here depends on Flax, so an exported network reloads with only
:mod:`dynscale.nn.sliced`, this module and :mod:`dynscale.idp`.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dynscale import idp

LAYER_KINDS = ("conv", "sconv", "dense", "maxpool", "global_avgpool", "flatten")
PARAMETRIC_KINDS = ("conv", "sconv", "dense")
ACTIVATIONS = ("relu", "sign", None)

_REQUIRED = object()

_LAYER_DEFAULTS: dict[str, dict[str, Any]] = {
    "conv": dict(features=_REQUIRED, kernel=3, stride=1, idp=False, bn=True, act="relu",
                 binary=False, profile=None),
    "sconv": dict(features=_REQUIRED, kernel=3, stride=1, idp=False, idp_depthwise=False,
                  bn=True, act="relu", binary=False, profile=None),
    "dense": dict(features=_REQUIRED, idp=False, bn=False, act=None, binary=False,
                  profile=None),
    "maxpool": dict(window=2, stride=None),
    "global_avgpool": {},
    "flatten": {},
}

_ARCH_DEFAULTS: dict[str, Any] = dict(
    name=_REQUIRED, input_shape=_REQUIRED, num_classes=_REQUIRED, profile="linear",
    profiles=None, layers=_REQUIRED, bn_momentum=0.9, bn_epsilon=1e-5)

# DP ranges of MP-IDP are compared with this slack (0.3 vs 0.30000000000000004).
_RANGE_TOLERANCE = 1e-9


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Feature:
  """The per-example shape of a tensor between two layers.

  A map is ``(height, width, channels)``; a vector (``flat``) has
  ``height * width * channels`` features laid out HWC, where ``height`` and
  ``width`` are those of the map it was flattened from (1 x 1 otherwise), so
  that IDP can address its channels.
  """

  height: int
  width: int
  channels: int
  flat: bool

  @property
  def size(self) -> int:
    return self.height * self.width * self.channels

  @property
  def positions(self) -> int:
    return self.height * self.width

  def shape(self) -> tuple[int, ...]:
    """The per-example array shape."""
    return (self.size,) if self.flat else (self.height, self.width, self.channels)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer of the network at a DP.

  inputs / outputs: the full shapes. in_width: channels of the input that
  take part (the kept prefix for an IDP layer, all otherwise). out_width:
  output channels computed (the prefix the next parametric layer keeps).
  """

  index: int
  kind: str
  inputs: Feature
  outputs: Feature
  in_width: int
  out_width: int


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
    elif default is _REQUIRED:
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
  kind = layer.get("kind")
  if kind not in LAYER_KINDS:
    raise ValueError(f"{where}.kind must be one of {LAYER_KINDS}, got {kind!r}")
  out = {"kind": kind, **_fill(where, {k: v for k, v in layer.items() if k != "kind"},
                               _LAYER_DEFAULTS[kind])}
  for key in ("features", "kernel", "window"):
    if key in out:
      out[key] = _positive_int(f"{where}.{key}", out[key])
  if "stride" in out and not (kind == "maxpool" and out["stride"] is None):
    out["stride"] = _positive_int(f"{where}.stride", out["stride"])
  if kind == "maxpool" and out["stride"] is None:
    out["stride"] = out["window"]
  for key in ("idp", "idp_depthwise", "bn", "binary"):
    if key in out:
      out[key] = _boolean(f"{where}.{key}", out[key])
  if "act" in out and out["act"] not in ACTIVATIONS:
    raise ValueError(f"{where}.act must be one of {ACTIVATIONS}, got {out['act']!r}")
  if "profile" in out:
    out["profile"] = _check_profile_spec(f"{where}.profile", out["profile"])
    if out["profile"] is not None and not out["idp"]:
      raise ValueError(f"{where}.profile is set but the layer is not IDP (idp is false)")
  if out.get("idp_depthwise") and not out["idp"]:
    raise ValueError(f"{where}.idp_depthwise needs idp=true (the depthwise part keeps "
                     "the same channels as the pointwise part)")
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


def _next_feature(i: int, layer: dict, x: Feature) -> Feature:
  """Shape inference for one layer (convolutions use SAME, pooling VALID)."""
  kind, where = layer["kind"], f"layers[{i}] ({layer['kind']})"
  if kind == "dense":
    if not x.flat:
      raise ValueError(f"{where} needs a flat input: put a 'flatten' or 'global_avgpool' "
                       f"layer before it (input is {x.shape()})")
    return Feature(1, 1, layer["features"], True)
  if kind == "flatten":
    return dataclasses.replace(x, flat=True)
  if x.flat:
    raise ValueError(f"{where} needs an H x W x C input, got a flat one")
  if kind in ("conv", "sconv"):
    s = layer["stride"]
    return Feature(-(-x.height // s), -(-x.width // s), layer["features"], False)
  if kind == "maxpool":
    w, s = layer["window"], layer["stride"]
    h, wd = (x.height - w) // s + 1, (x.width - w) // s + 1
    if h < 1 or wd < 1:
      raise ValueError(f"{where}: window {w} is larger than the {x.height}x{x.width} input")
    return Feature(h, wd, x.channels, False)
  return Feature(1, 1, x.channels, True)  # global_avgpool


def _input_feature(shape: Any) -> Feature:
  if (not isinstance(shape, Sequence) or isinstance(shape, str) or len(shape) not in (1, 3)):
    raise ValueError(f"input_shape must be [features] or [height, width, channels], got {shape!r}")
  dims = [_positive_int("input_shape[*]", d) for d in shape]
  return Feature(1, 1, dims[0], True) if len(dims) == 1 else Feature(*dims, False)


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
    if isinstance(values, list) and len(values) != features[i].channels:
      raise ValueError(f"layers[{i}].profile has {len(values)} coefficients, the layer has "
                       f"{features[i].channels} input channels")
  last = features[-1]
  if not last.flat or last.size != out["num_classes"]:
    raise ValueError(f"the network must end in {out['num_classes']} logits (num_classes), "
                     f"its output shape is {last.shape()}")
  return out


# --------------------------------------------------------------------------
# Queries on a (validated) architecture
# --------------------------------------------------------------------------


def _features(arch: dict) -> list[Feature]:
  """Input feature of every layer, plus the network output at the end."""
  x = _input_feature(arch["input_shape"])
  features = [x]
  for i, layer in enumerate(arch["layers"]):
    x = _next_feature(i, layer, x)
    features.append(x)
  return features


def parametric_indices(arch: dict) -> list[int]:
  """Indices of the layers with weights (conv, sconv, dense)."""
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


def uses_map_dense(layer: dict, inputs: Feature) -> bool:
  """Whether a dense layer is evaluated as a VALID conv over an H x W map.

  True for an IDP dense layer whose flat input came from an H x W x C map with
  H * W > 1: its profile is per channel (see the module docstring).
  """
  return layer["kind"] == "dense" and layer["idp"] and inputs.positions > 1


def plan(arch: dict, dp: float) -> list[LayerPlan]:
  """Per-layer shapes and computed channel widths of the network at DP ``dp``.

  Walking backwards: the input of an IDP layer keeps ``num_kept(C, dp)``
  channels; the output of a layer has the width its consumer keeps (the next
  parametric layer; pooling and flatten pass widths through); the logits are
  complete. This is 001 Fig. 1: a layer computes only the outputs the next
  layer uses, so a middle layer's cost falls to about ``dp**2``.
  """
  dp = idp.check_dp(dp)
  features = _features(arch)
  layers = arch["layers"]
  widths = [0] * (len(layers) + 1)
  widths[-1] = features[-1].channels
  for i in range(len(layers) - 1, -1, -1):
    layer, c = layers[i], features[i].channels
    if layer["kind"] not in PARAMETRIC_KINDS:
      widths[i] = widths[i + 1]
    else:
      widths[i] = idp.num_kept(c, dp) if layer["idp"] else c
  return [LayerPlan(i, layer["kind"], features[i], features[i + 1], widths[i], widths[i + 1])
          for i, layer in enumerate(layers)]


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
                     "to choose its profile (dp is traced)")
  dp = idp.check_dp(dp)
  return next(s for s, (_, hi) in enumerate(ranges) if hi >= dp - _RANGE_TOLERANCE)


# --------------------------------------------------------------------------
# Parameter-free pieces shared by the masked and sliced paths
# --------------------------------------------------------------------------


def activate(name: str | None, y: jax.Array) -> jax.Array:
  """Applies a block activation: ReLU, sign (binarized, straight-through), or none."""
  if name == "relu":
    return jax.nn.relu(y)
  if name == "sign":
    return idp.binarize(y)
  return y


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """VALID max pooling of an NHWC map."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                               (1, window, window, 1), (1, stride, stride, 1), "VALID")


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes: ``(B, H, W, C) -> (B, C)``."""
  return jnp.mean(x, axis=(1, 2))


def flatten(x: jax.Array) -> jax.Array:
  """``(B, ...) -> (B, prod(...))`` in HWC order."""
  return x.reshape(x.shape[0], -1)


def apply_stateless(layer: dict, x: jax.Array) -> jax.Array:
  """Runs a parameter-free layer (maxpool, global_avgpool, flatten)."""
  kind = layer["kind"]
  if kind == "maxpool":
    return max_pool(x, layer["window"], layer["stride"])
  if kind == "global_avgpool":
    return global_avg_pool(x)
  return flatten(x)


def check_input(arch: dict, x: jax.Array) -> None:
  """Raises ValueError unless ``x`` is a batch ``(B, *input_shape)``."""
  expected = tuple(arch["input_shape"])
  if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
    raise ValueError(f"x must have shape (batch, {', '.join(map(str, expected))}), "
                     f"got {tuple(x.shape)}")
