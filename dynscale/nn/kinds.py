"""Layer kinds, each defined once: fields, shape rule, channel groups, variables, apply, cost.

A kind is everything the core knows about one ``"kind"`` of layer dict in an
architecture (:mod:`dynscale.nn.spec`). Adding a kind means adding one class
here and one entry in :data:`KINDS`; the validator, the masked NNX network,
the sliced path, export and the cost model all read it.

Channel groups. Every tensor between layers has its channels in a *group*
(:func:`dynscale.nn.spec.graph`). A layer sees its groups through *slots*:
``"in"`` (the channels of its input), ``"out"`` (of its output) and, for
blocks with an inner width, ``"mid"``. A residual block whose output is added
to its input (:meth:`Kind.ties_output`) has ``"out"`` and ``"in"`` in one
group: the channels that meet at the add are trimmed or gated together.

One apply for both execution paths. :meth:`Kind.apply` computes a layer from
its variables through a :class:`Context`:

* masked: full variables; ``ctx.keep(y, slot)`` zeroes the channels beyond
  the slot's (possibly traced) width, so one executable serves every width
  vector;
* sliced: variables already cut to the widths (:func:`dynscale.nn.sliced.
  slice_variables`); ``ctx.keep`` is the identity and only the kept channels
  are computed.

IDP (001 §II-C): ``"idp": true`` puts the layer's profile gamma on the input
channels of its IDP convolutions (:meth:`Kind.idp_slots`); a layer with
``idp`` false has no gamma. Shortcut projections never carry a profile.

Gate points (:meth:`Kind.gate_points`): convolution outputs where the gate
hook may multiply each sample's channels after batch norm and before the
activation (SANP's ``x = s * BN(f * x)``). Shortcuts and dense layers have
none.

Costs follow SANP §4.1.1, ``H W (C_in k^2 + b) C_out`` with one multiply-add
as one FLOP (:func:`dynscale.metrics.sanp_flops`), from the *activity* of
each tensor: per channel 0/1, static (a width prefix) or per sample (gates).
Activity passes through activations, pooling and flatten; a residual add
takes the union; a depthwise convolution costs its channels active on both
sides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dynscale import idp, metrics

Array = jax.Array

REQUIRED = object()
ACTIVATIONS = ("relu", "relu6", "sign", None)
PADDINGS = ("SAME", "VALID")


# --------------------------------------------------------------------------
# Shapes and variables
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Feature:
  """The per-example shape of a tensor between two layers.

  A map is ``(height, width, channels)``; a vector (``flat``) has
  ``height * width * channels`` features laid out HWC, where ``height`` and
  ``width`` are those of the map it was flattened from (1 x 1 otherwise), so
  that widths and profiles can address its channels.
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
class Var:
  """One variable of a layer.

  role: ``kernel`` (He-normal weights), ``gamma`` (an IDP profile), ``bias``
  (zeros) or ``bn`` (batch norm: ``scale``, ``bias``, ``mean``, ``var``, each
  ``(C,)``). axes: ``((axis, slot), ...)``: the axes cut to a slot's width
  by the sliced path. positions > 1: axis 0 of a dense kernel on a flattened
  map, ``positions x channels`` rows, is cut per channel.
  """

  shape: tuple[int, ...]
  role: str
  axes: tuple[tuple[int, str], ...]
  positions: int = 1


def _kernel(shape, axes) -> Var:
  return Var(tuple(shape), "kernel", tuple(axes))


def _norm(bn: bool, name: str, bias_name: str, c: int, slot: str) -> dict[str, Var]:
  """Batch norm over ``c`` channels, or a bias when the layer has no batch norm."""
  if bn:
    return {name: Var((c,), "bn", ((0, slot),))}
  return {bias_name: Var((c,), "bias", ((0, slot),))}


def _gamma(enabled: bool, c: int, slot: str) -> dict[str, Var]:
  return {"gamma": Var((c,), "gamma", ((0, slot),))} if enabled else {}


# --------------------------------------------------------------------------
# What a kind's apply and cost see
# --------------------------------------------------------------------------


class Context:
  """The execution services a layer's apply uses (one per layer call).

  Built by :func:`dynscale.nn.forward.run`. In the masked path ``masks``
  maps a slot to its ``(C,)`` 0/1 mask; in the sliced path it is empty.
  """

  def __init__(self, *, train: bool, epsilon: float, masks: Mapping[str, Array],
               gates: Mapping[str, Callable] | None, path: str, record: Callable):
    self.train = train
    self.epsilon = epsilon
    self.masks = masks
    self.gates = gates or {}
    self.path = path
    self._record = record

  def keep(self, y: Array, slot: str) -> Array:
    """``y`` with the channels beyond the slot's width zeroed (masked path only)."""
    mask = self.masks.get(slot)
    return y if mask is None else y * mask.astype(y.dtype)

  def norm(self, v: Mapping, name: str, bias_name: str, y: Array, slot: str) -> Array:
    """Batch norm ``name`` of ``v`` (train: batch moments, recorded), or ``y + bias``."""
    if name not in v:
      return y + v[bias_name].astype(y.dtype)
    stats = v[name]
    yf = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    if self.train:
      axes = tuple(range(y.ndim - 1))
      mean, mean_sq = yf.mean(axes), (yf * yf).mean(axes)
      var = jnp.maximum(0.0, mean_sq - mean * mean)
      self._record(name, slot, mean, mean_sq)
    else:
      mean, var = stats["mean"], stats["var"]
    out = (yf - mean) * (jax.lax.rsqrt(var + self.epsilon) * stats["scale"]) + stats["bias"]
    return out.astype(y.dtype)

  def gate(self, point: str, x: Array, y: Array, slot: str) -> Array:
    """``s * y`` with ``s = gate(x, y, train)`` per sample and channel, if a gate hooks ``point``.

    The gate's nonzero pattern, within the slot's width, is recorded as the
    activity of this output (``(B, C)`` 0/1).
    """
    gate = self.gates.get(self._name(point))
    if gate is None:
      return y
    s = gate(x, y, self.train).astype(y.dtype)
    if s.shape != (y.shape[0], y.shape[-1]):
      raise ValueError(f"gate {self._name(point)} returned shape {s.shape}, expected "
                       f"(batch, channels) = {(y.shape[0], y.shape[-1])}")
    self._record_activity(point, slot, s)
    return y * s.reshape(s.shape[:1] + (1,) * (y.ndim - 2) + s.shape[1:])

  def _record_activity(self, point: str, slot: str, s: Array) -> None:
    active = (s != 0).astype(jnp.float32)
    mask = self.masks.get(slot)
    self._record(self._name(point), slot, active if mask is None else active * mask, None)

  def _name(self, point: str) -> str:
    return gate_name(self.path, point)


def gate_name(layer_path: str, point: str) -> str:
  """The name of a gate point: ``layers.3`` (a layer's only one) or ``layers.5.conv1``."""
  return layer_path if not point else f"{layer_path}.{point}"


def activate(name: str | None, y: Array) -> Array:
  """A block activation: ReLU, ReLU6, sign (binarized, straight-through), or none."""
  if name == "relu":
    return jax.nn.relu(y)
  if name == "relu6":
    return jax.nn.relu6(y)
  if name == "sign":
    return idp.binarize(y)
  return y


def _weight(v: Mapping, binary: bool = False) -> Array:
  w = v["kernel"]
  return idp.binarize(w) if binary else w


def _coefficients(v: Mapping, name: str, c: int) -> Array:
  """A layer's profile, or all-one coefficients for a complete (CDP) layer."""
  return v[name] if name in v else jnp.ones((c,), jnp.float32)


def _conv(x: Array, f: Array, gamma: Array, *, stride: int = 1, padding: str = "SAME") -> Array:
  """``sum_i gamma_i (f_i * x_i)`` over every input channel present (001 §II-C)."""
  return idp.conv_sliced(x, f, gamma, f.shape[2], strides=stride, padding=padding)


def _depthwise(x: Array, f: Array, gamma: Array, stride: int) -> Array:
  return idp.depthwise_conv_sliced(x, f, gamma, f.shape[3], strides=stride)


def _same(size: int, stride: int) -> int:
  return -(-size // stride)


def _strided_map(layer: dict, x: Feature) -> Feature:
  """The output map of a SAME-padded block with ``stride`` and ``features`` outputs
  on the H x W x C input ``x`` (:func:`_checked_strided_map` checks it is one)."""
  s = layer["stride"]
  return Feature(_same(x.height, s), _same(x.width, s), layer["features"], False)


def _checked_strided_map(where: str, layer: dict, x: Feature) -> Feature:
  """:func:`_strided_map`, or a ValueError naming ``where`` if ``x`` is flat."""
  if x.flat:
    raise ValueError(f"{where} needs an H x W x C input, got a flat one")
  return _strided_map(layer, x)


def _identity_shortcut(layer: dict, x: Feature) -> bool:
  """Whether a residual block adds its input as it is: ``shortcut`` 'auto' does
  when stride and width are kept; 'identity' always (checked by
  :func:`_check_shortcut`); otherwise never."""
  if layer["shortcut"] == "auto":
    return layer["stride"] == 1 and x.channels == layer["features"]
  return layer["shortcut"] == "identity"


def _check_shortcut(where: str, layer: dict, x: Feature, allowed: tuple[str, ...]) -> None:
  """``shortcut`` is one of ``allowed``; 'identity' needs stride 1 and a kept width."""
  if layer["shortcut"] not in allowed:
    raise ValueError(f"{where}.shortcut must be one of {allowed}, got {layer['shortcut']!r}")
  if layer["shortcut"] == "identity" and not (layer["stride"] == 1
                                              and x.channels == layer["features"]):
    raise ValueError(f"{where}.shortcut 'identity' needs stride 1 and features equal to the "
                     f"{x.channels} input channels")


def _pinned_shortcut(kind: Kind, layer: dict, x: Feature, otherwise: str) -> str:
  """The shortcut a trimmed copy of the block must keep, whatever its new widths:
  trimming never adds or removes a residual add."""
  return "identity" if kind.ties_output(layer, x) else otherwise


def _check_mid_features(where: str, layer: dict) -> None:
  mid = layer["mid_features"]
  if mid is not None and (isinstance(mid, bool) or not isinstance(mid, int) or mid < 1):
    raise ValueError(f"{where}.mid_features must be null or a positive int, got {mid!r}")


class GatePoint(NamedTuple):
  """A gateable convolution: the channels it reads and gates, and the slot
  of the gated ones (its output's)."""

  inputs: int
  outputs: int
  slot: str


@dataclasses.dataclass
class Activity:
  """What a cost function reads: activity of the input and of each gated output.

  ``inp``: ``(..., C_in)`` 0/1 of the input tensor. ``width(slot)``: the
  slot's width mask ``(C,)``. ``gated(point, slot)``: the activity of a gate
  point's output (the recorded gate pattern within the width, else the
  width mask).
  """

  inp: Any
  width: Callable[[str], Any]
  gated: Callable[[str, str], Any]


def union(a, b) -> Any:
  """The channels active in ``a`` or ``b`` (0/1 arrays, numpy or jnp): a residual add."""
  return a + b - a * b


def count(active) -> Any:
  """Active channels: the sum over the last axis (an int for static activity)."""
  return active.sum(-1)


def _cost(name: str, kind: str, flops, params) -> tuple[str, str, Any, Any]:
  return (name, kind, flops, params)


def _bn_cost(bn: bool, name: str, active) -> list:
  return [_cost(name, "bn", 0, 2 * count(active))] if bn else []


# --------------------------------------------------------------------------
# Kinds
# --------------------------------------------------------------------------


class Kind:
  """A layer kind. Subclasses set ``name`` and ``fields`` and override what applies."""

  name: str = ""
  fields: dict[str, Any] = {}
  parametric: bool = True
  #: names of fields holding positive ints / booleans (checked by the validator)
  int_fields: tuple[str, ...] = ()
  bool_fields: tuple[str, ...] = ()

  def check(self, where: str, layer: dict) -> None:
    """Kind-specific checks beyond field types; raises ValueError naming the field."""

  def output(self, where: str, layer: dict, x: Feature) -> Feature:
    raise NotImplementedError

  def mid_width(self, layer: dict, x: Feature) -> int | None:
    """Size of the inner channel group (``"mid"`` slot), if the block has one."""
    return None

  def ties_output(self, layer: dict, x: Feature) -> bool:
    """True when the output is added to the input: one channel group for both."""
    return False

  def idp_slots(self, layer: dict) -> tuple[str, ...]:
    """The slots whose channels an IDP profile weights (so IDP trims them)."""
    return ()

  def gate_points(self, layer: dict, x: Feature) -> dict[str, GatePoint]:
    """The gateable convolutions by point, in the order apply runs them."""
    return {}

  def variables(self, layer: dict, x: Feature, out: Feature) -> dict[str, Any]:
    return {}

  def with_widths(self, layer: dict, widths: Mapping[str, int], x: Feature) -> dict:
    """The layer dict of the network trimmed to ``widths`` (by slot); ``x``: the
    layer's full input."""
    return layer

  def apply(self, layer: dict, v: Mapping, x: Array, ctx: Context, inputs: Feature,
            out: Feature) -> Array:
    """The layer on ``x``; ``inputs`` / ``out`` are the full (untrimmed) shapes."""
    raise NotImplementedError

  def costs(self, layer: dict, x: Feature, out: Feature, a: Activity) -> tuple[list, Any]:
    """(cost entries ``(name, kind, flops, params)``, activity of the output)."""
    return [], a.inp


class _OneOutput(Kind):
  """A layer with one output group of ``features`` channels and IDP on its input."""

  def idp_slots(self, layer):
    return ("in",) if layer["idp"] else ()

  def with_widths(self, layer, widths, x):
    return {**layer, "features": widths["out"]}


class _GatedOutput(_OneOutput):
  """... whose output is a gate point of the hook."""

  def gate_points(self, layer, x):
    return {"": GatePoint(x.channels, layer["features"], "out")}


_CONV_FIELDS = dict(features=REQUIRED, kernel=3, stride=1, padding="SAME", idp=False, bn=True,
                    act="relu", binary=False, profile=None)


class Dense(_OneOutput):
  """FC / B-FC block: ``act(BN(sum_i gamma_i w_ji x_i))`` (001 §II-C).

  On a flattened ``H x W x C`` map the profile is per channel (length C,
  shared by every position) and widths cut channels at every position.
  """

  name = "dense"
  fields = dict(features=REQUIRED, idp=False, bn=False, act=None, binary=False, profile=None)
  int_fields = ("features",)
  bool_fields = ("idp", "bn", "binary")

  def output(self, where, layer, x):
    if not x.flat:
      raise ValueError(f"{where} needs a flat input: put a 'flatten' or 'global_avgpool' "
                       f"layer before it (input is {x.shape()})")
    return Feature(1, 1, layer["features"], True)

  def variables(self, layer, x, out):
    m = layer["features"]
    kernel = Var((x.size, m), "kernel", ((0, "in"), (1, "out")), positions=x.positions)
    return {"kernel": kernel, **_gamma(layer["idp"], x.channels, "in"),
            **_norm(layer["bn"], "bn", "bias", m, "out")}

  def apply(self, layer, v, x, ctx, inputs, out):
    w = _weight(v, layer["binary"])
    if "gamma" in v:  # per channel at every position of a flattened map
      gamma = v["gamma"]
      x = (x.reshape(x.shape[0], -1, gamma.shape[0]) * gamma.astype(x.dtype)).reshape(x.shape)
    y = x @ w.astype(x.dtype)
    y = ctx.norm(v, "bn", "bias", y, "out")
    return ctx.keep(activate(layer["act"], y), "out")

  def costs(self, layer, x, out, a):
    bias = not layer["bn"]
    c_in, a_out = x.positions * count(a.inp), a.width("out")
    c_out = count(a_out)
    entries = [_cost("dense", "dense", metrics.sanp_flops(1, 1, c_in, c_out, 1, bias),
                     c_in * c_out + (c_out if bias else 0))]
    return entries + _bn_cost(layer["bn"], "bn", a_out), a_out


class Conv(_GatedOutput):
  """Conv / B-Conv block: ``act(s * BN(sum_i gamma_i (f_ji * x_i)))`` (001 §II-C; 002 Eq. 3).

  NHWC, HWIO kernel, ``padding`` SAME or VALID.
  """

  name = "conv"
  fields = dict(_CONV_FIELDS)
  int_fields = ("features", "kernel", "stride")
  bool_fields = ("idp", "bn", "binary")

  def check(self, where, layer):
    if layer["padding"] not in PADDINGS:
      raise ValueError(f"{where}.padding must be one of {PADDINGS}, got {layer['padding']!r}")

  def output(self, where, layer, x):
    if x.flat:
      raise ValueError(f"{where} needs an H x W x C input, got a flat one")
    k, s = layer["kernel"], layer["stride"]
    if layer["padding"] == "SAME":
      return Feature(_same(x.height, s), _same(x.width, s), layer["features"], False)
    h, w = (x.height - k) // s + 1, (x.width - k) // s + 1
    if h < 1 or w < 1:
      raise ValueError(f"{where}: a VALID {k}x{k} kernel is larger than the "
                       f"{x.height}x{x.width} input")
    return Feature(h, w, layer["features"], False)

  def variables(self, layer, x, out):
    k, c, m = layer["kernel"], x.channels, layer["features"]
    return {"kernel": _kernel((k, k, c, m), ((2, "in"), (3, "out"))),
            **_gamma(layer["idp"], c, "in"), **_norm(layer["bn"], "bn", "bias", m, "out")}

  def apply(self, layer, v, x, ctx, inputs, out):
    w = _weight(v, layer["binary"])
    y = _conv(x, w, _coefficients(v, "gamma", w.shape[2]), stride=layer["stride"],
              padding=layer["padding"])
    y = ctx.gate("", x, ctx.norm(v, "bn", "bias", y, "out"), "out")
    return ctx.keep(activate(layer["act"], y), "out")

  def costs(self, layer, x, out, a):
    bias, k = not layer["bn"], layer["kernel"]
    c_in, a_out = count(a.inp), a.gated("", "out")
    c_out = count(a_out)
    entries = [_cost("conv", "conv",
                     metrics.sanp_flops(out.height, out.width, c_in, c_out, k * k, bias),
                     k * k * c_in * c_out + (c_out if bias else 0))]
    return entries + _bn_cost(layer["bn"], "bn", a_out), a_out


class SeparableConv(_GatedOutput):
  """S-Conv block (001 §II-C, Fig. 4): depthwise -> BN -> act -> pointwise -> BN -> act.

  IDP is on the pointwise part, ``y_j = sum_i gamma_i g_ji * (f_i * x_i)``;
  with ``idp_depthwise`` the depthwise part has its own profile too. The
  depthwise part keeps the input's channels (its group).
  """

  name = "sconv"
  fields = dict(features=REQUIRED, kernel=3, stride=1, idp=False, idp_depthwise=False,
                bn=True, act="relu", binary=False, profile=None)
  int_fields = ("features", "kernel", "stride")
  bool_fields = ("idp", "idp_depthwise", "bn", "binary")

  def check(self, where, layer):
    if layer["idp_depthwise"] and not layer["idp"]:
      raise ValueError(f"{where}.idp_depthwise needs idp=true (the depthwise part keeps "
                       "the same channels as the pointwise part)")

  def output(self, where, layer, x):
    return _checked_strided_map(where, layer, x)

  def variables(self, layer, x, out):
    k, c, m = layer["kernel"], x.channels, layer["features"]
    dw_gamma = ({"depthwise_gamma": Var((c,), "gamma", ((0, "in"),))}
                if layer["idp_depthwise"] else {})
    return {"depthwise_kernel": _kernel((k, k, 1, c), ((3, "in"),)), **dw_gamma,
            **_norm(layer["bn"], "depthwise_bn", "depthwise_bias", c, "in"),
            "kernel": _kernel((1, 1, c, m), ((2, "in"), (3, "out"))),
            **_gamma(layer["idp"], c, "in"), **_norm(layer["bn"], "bn", "bias", m, "out")}

  def apply(self, layer, v, x, ctx, inputs, out):
    f = idp.binarize(v["depthwise_kernel"]) if layer["binary"] else v["depthwise_kernel"]
    h = _depthwise(x, f, _coefficients(v, "depthwise_gamma", f.shape[3]), layer["stride"])
    h = ctx.norm(v, "depthwise_bn", "depthwise_bias", h, "in")
    h = ctx.keep(activate(layer["act"], h), "in")
    w = _weight(v, layer["binary"])
    y = _conv(h, w, _coefficients(v, "gamma", w.shape[2]))
    y = ctx.gate("", h, ctx.norm(v, "bn", "bias", y, "out"), "out")
    return ctx.keep(activate(layer["act"], y), "out")

  def costs(self, layer, x, out, a):
    bias, k = not layer["bn"], layer["kernel"]
    a_dw = a.width("in") * a.inp
    c, a_out = count(a_dw), a.gated("", "out")
    c_out = count(a_out)
    # the depthwise output is not gated: a closed input's channel leaves it as
    # act(BN(0)) (or act(bias)), a constant map the pointwise reads, so the
    # pointwise and that batch norm run over the whole width (as invres's project)
    a_mid = a.width("in")
    c_mid = count(a_mid)
    h, w = out.height, out.width
    entries = [_cost("depthwise", "depthwise", metrics.sanp_flops(h, w, 1, c, k * k, bias),
                     k * k * c + (c if bias else 0)),
               *_bn_cost(layer["bn"], "depthwise_bn", a_mid),
               _cost("pointwise", "pointwise", metrics.sanp_flops(h, w, c_mid, c_out, 1, bias),
                     c_mid * c_out + (c_out if bias else 0)),
               *_bn_cost(layer["bn"], "bn", a_out)]
    return entries, a_out


@dataclasses.dataclass(frozen=True)
class BlockConvolution:
  """One SAME-padded convolution inside a block, ``act(s * BN(sum_i gamma_i (f_i * x_i)))``.

  ``name``: the entry of its kernel (and profile) in the block's variables,
  and its gate point when ``gated``; ``norm``: the entry of its batch norm;
  ``slots``: the slots of its input and output channels; ``idp``: a profile
  on its input channels. A block's variables, apply and costs are those of
  its convolutions (:meth:`variables`, :meth:`apply`, :meth:`costs`);
  :meth:`as_layer` gives the same convolution as a ``conv`` layer, for
  executors that run a block one convolution at a time.
  """

  name: str
  norm: str
  kernel: int
  stride: int
  slots: tuple[str, str]
  act: str | None
  idp: bool
  gated: bool

  def variables(self, channels: Mapping[str, int]) -> dict[str, Any]:
    """Its kernel (with the profile) and batch norm, ``channels`` by slot."""
    c_in, c_out = (channels[slot] for slot in self.slots)
    return {self.name: {"kernel": _kernel((self.kernel, self.kernel, c_in, c_out),
                                          ((2, self.slots[0]), (3, self.slots[1]))),
                        **_gamma(self.idp, c_in, self.slots[0])},
            **_norm(True, self.norm, "", c_out, self.slots[1])}

  def apply(self, v: Mapping, x: Array, ctx: Context) -> Array:
    """It on ``x``, from the block's variables ``v``."""
    w = v[self.name]["kernel"]
    y = ctx.norm(v, self.norm, "", _conv(x, w, _coefficients(v[self.name], "gamma", w.shape[2]),
                                         stride=self.stride), self.slots[1])
    if self.gated:
      y = ctx.gate(self.name, x, y, self.slots[1])
    return activate(self.act, y)

  def costs(self, out: Feature, a_in, a_out) -> list:
    """Its multiply-adds and parameters, and its batch norm's, on the output map
    ``out`` from the activity of its input and output channels (SANP §4.1.1)."""
    c_in, c_out, taps = count(a_in), count(a_out), self.kernel * self.kernel
    return [_cost(self.name, "conv",
                  metrics.sanp_flops(out.height, out.width, c_in, c_out, taps, False),
                  taps * c_in * c_out), *_bn_cost(True, self.norm, a_out)]

  def as_layer(self, features: int) -> dict:
    """The ``conv`` layer dict (:class:`Conv`, ``features`` outputs) that computes
    it from the variables ``{**v[name], "bn": v[norm]}``."""
    return {"kind": "conv", "features": features, "kernel": self.kernel, "stride": self.stride,
            "padding": "SAME", "idp": self.idp, "bn": True, "act": self.act, "binary": False,
            "profile": None}


class ResBlock(Kind):
  """ResNet basic block (He et al. 2016): ``act(BN(conv(act(BN(conv x)))) + shortcut(x))``.

  Two 3x3 convs (the first with ``stride``) of ``features`` outputs, the
  inner width ``mid_features`` (default ``features``). The shortcut is the
  identity, so the output and input channels are one tied group, unless the
  stride or the width changes: then a 1x1 conv with batch norm projects it
  and the output is a new group. ``shortcut`` 'identity' or 'projection'
  fixes the choice (a trimmed copy keeps its original's, whatever its
  widths). Gates: ``conv1``, ``conv2`` (before the add).
  """

  name = "resblock"
  fields = dict(features=REQUIRED, mid_features=None, stride=1, idp=False, act="relu",
                profile=None, shortcut="auto")
  int_fields = ("features", "stride")
  bool_fields = ("idp",)

  def check(self, where, layer):
    _check_mid_features(where, layer)

  def output(self, where, layer, x):
    _check_shortcut(where, layer, x, ("auto", "identity", "projection"))
    return _checked_strided_map(where, layer, x)

  def mid_width(self, layer, x):
    return layer["mid_features"] or layer["features"]

  def ties_output(self, layer, x):
    return _identity_shortcut(layer, x)

  def idp_slots(self, layer):
    return ("in", "mid") if layer["idp"] else ()

  def gate_points(self, layer, x):
    channels = self.slot_channels(layer, x)
    return {conv.name: GatePoint(*(channels[slot] for slot in conv.slots), conv.slots[1])
            for conv in self.convolutions(layer, x) if conv.gated}

  def slot_maps(self, layer: dict, x: Feature) -> dict[str, Feature]:
    """The map each slot holds on input ``x``: ``"in"`` the input, ``"mid"``
    ``conv1``'s output and ``"out"`` the block's, both at the strided size."""
    out = _strided_map(layer, x)
    return {"in": x, "mid": dataclasses.replace(out, channels=self.mid_width(layer, x)),
            "out": out}

  def slot_channels(self, layer: dict, x: Feature) -> dict[str, int]:
    """The channel count of each slot (:meth:`slot_maps`)."""
    return {slot: f.channels for slot, f in self.slot_maps(layer, x).items()}

  def convolutions(self, layer: dict, x: Feature) -> tuple[BlockConvolution, ...]:
    """``conv1`` (with ``stride`` and the block's activation), ``conv2`` (no
    activation: it comes after the add) and, unless the shortcut is the
    identity, the 1x1 projection ``shortcut``; on input ``x``."""
    s, profiled = layer["stride"], layer["idp"]
    convs = (BlockConvolution("conv1", "bn1", 3, s, ("in", "mid"), layer["act"], profiled, True),
             BlockConvolution("conv2", "bn2", 3, 1, ("mid", "out"), None, profiled, True))
    if self.ties_output(layer, x):
      return convs
    return (*convs, BlockConvolution("shortcut", "shortcut_bn", 1, s, ("in", "out"), None,
                                     False, False))

  def variables(self, layer, x, out):
    channels = self.slot_channels(layer, x)
    return {name: var for conv in self.convolutions(layer, x)
            for name, var in conv.variables(channels).items()}

  def with_widths(self, layer, widths, x):
    return {**layer, "features": widths["out"], "mid_features": widths["mid"],
            "shortcut": _pinned_shortcut(self, layer, x, "projection")}

  def apply(self, layer, v, x, ctx, inputs, out):
    first, second, *shortcut = self.convolutions(layer, inputs)
    h = ctx.keep(first.apply(v, x, ctx), "mid")
    y = second.apply(v, h, ctx)
    if shortcut:
      x = shortcut[0].apply(v, x, ctx)
    return ctx.keep(activate(layer["act"], y + x), "out")

  def costs(self, layer, x, out, a):
    """Each convolution from the activity of the slot it reads; the block's
    output is active where either side of the add is: ``conv2``'s output and
    the projection's (the input itself for the identity)."""
    entries, read, added = [], {"in": a.inp}, [a.inp] if self.ties_output(layer, x) else []
    for conv in self.convolutions(layer, x):
      slot_in, slot_out = conv.slots
      a_out = a.gated(conv.name, slot_out) if conv.gated else a.width(slot_out)
      entries += conv.costs(out, read[slot_in], a_out)
      if slot_out == "out":
        added.append(a_out)
      else:
        read[slot_out] = a_out
    return entries, union(*added) * a.width("out")


class InvertedResidual(Kind):
  """MobileNetV2 inverted residual (Sandler et al. 2018, Table 1).

  1x1 expansion to ``mid_features`` (default ``expansion x C_in``; none when
  ``expansion`` is 1) -> BN -> ReLU6 -> 3x3 depthwise with ``stride`` -> BN ->
  ReLU6 -> 1x1 linear projection to ``features`` -> BN, plus the input when
  the stride is 1 and the width is kept (then input and output are one tied
  group). ``shortcut`` 'identity' or 'none' fixes the choice (a trimmed copy
  keeps its original's, whatever its widths). Gates: ``expand``,
  ``depthwise``, ``project``.
  """

  name = "invres"
  fields = dict(features=REQUIRED, expansion=6, mid_features=None, stride=1, idp=False,
                profile=None, shortcut="auto")
  int_fields = ("features", "expansion", "stride")
  bool_fields = ("idp",)

  def check(self, where, layer):
    _check_mid_features(where, layer)
    if layer["expansion"] == 1 and layer["mid_features"] is not None:
      raise ValueError(f"{where}.mid_features must be null when expansion is 1 (the "
                       "depthwise part then works on the block's input channels)")

  def output(self, where, layer, x):
    _check_shortcut(where, layer, x, ("auto", "identity", "none"))
    return _checked_strided_map(where, layer, x)

  def _expands(self, layer) -> bool:
    return layer["expansion"] != 1

  def mid_width(self, layer, x):
    if not self._expands(layer):
      return None
    return layer["mid_features"] or layer["expansion"] * x.channels

  def ties_output(self, layer, x):
    return _identity_shortcut(layer, x)

  def _mid_slot(self, layer) -> str:
    return "mid" if self._expands(layer) else "in"

  def idp_slots(self, layer):
    if not layer["idp"]:
      return ()
    return ("in", "mid") if self._expands(layer) else ("in",)

  def gate_points(self, layer, x):
    mid, slot = self.mid_width(layer, x) or x.channels, self._mid_slot(layer)
    points = {"expand": GatePoint(x.channels, mid, slot)} if self._expands(layer) else {}
    return {**points, "depthwise": GatePoint(mid, mid, slot),
            "project": GatePoint(mid, layer["features"], "out")}

  def variables(self, layer, x, out):
    c, m, slot = x.channels, layer["features"], self._mid_slot(layer)
    mid = self.mid_width(layer, x) or c
    v = {}
    if self._expands(layer):
      v["expand"] = {"kernel": _kernel((1, 1, c, mid), ((2, "in"), (3, "mid"))),
                     **_gamma(layer["idp"], c, "in")}
      v.update(_norm(True, "expand_bn", "", mid, "mid"))
    v["depthwise"] = {"kernel": _kernel((3, 3, 1, mid), ((3, slot),))}
    v.update(_norm(True, "depthwise_bn", "", mid, slot))
    v["project"] = {"kernel": _kernel((1, 1, mid, m), ((2, slot), (3, "out"))),
                    **_gamma(layer["idp"], mid, slot)}
    v.update(_norm(True, "project_bn", "", m, "out"))
    return v

  def with_widths(self, layer, widths, x):
    out = {**layer, "features": widths["out"], "shortcut": _pinned_shortcut(self, layer, x, "none")}
    if self._expands(layer):
      out["mid_features"] = widths["mid"]
    return out

  def apply(self, layer, v, x, ctx, inputs, out):
    slot, h = self._mid_slot(layer), x
    if "expand" in v:
      w = v["expand"]["kernel"]
      h = _conv(x, w, _coefficients(v["expand"], "gamma", w.shape[2]))
      h = ctx.gate("expand", x, ctx.norm(v, "expand_bn", "", h, slot), slot)
      h = ctx.keep(activate("relu6", h), slot)
    f = v["depthwise"]["kernel"]
    d = _depthwise(h, f, jnp.ones((f.shape[3],)), layer["stride"])
    d = ctx.gate("depthwise", h, ctx.norm(v, "depthwise_bn", "", d, slot), slot)
    d = ctx.keep(activate("relu6", d), slot)
    w = v["project"]["kernel"]
    y = _conv(d, w, _coefficients(v["project"], "gamma", w.shape[2]))
    y = ctx.gate("project", d, ctx.norm(v, "project_bn", "", y, "out"), "out")
    return ctx.keep(y + x if self.ties_output(layer, inputs) else y, "out")

  def costs(self, layer, x, out, a):
    h, w, slot = out.height, out.width, self._mid_slot(layer)
    entries, a_mid = [], a.inp
    if self._expands(layer):
      a_mid = a.gated("expand", "mid")
      c_in, c_mid = count(a.inp), count(a_mid)
      entries += [_cost("expand", "pointwise",
                        metrics.sanp_flops(x.height, x.width, c_in, c_mid, 1, False),
                        c_in * c_mid), *_bn_cost(True, "expand_bn", a_mid)]
    a_dw = a.gated("depthwise", slot)
    c_dw = count(a_dw * a_mid)
    a_out = a.gated("project", "out")
    c_out = count(a_out)
    entries += [_cost("depthwise", "depthwise", metrics.sanp_flops(h, w, 1, c_dw, 9, False),
                      9 * count(a_dw)), *_bn_cost(True, "depthwise_bn", a_dw),
                _cost("project", "pointwise", metrics.sanp_flops(h, w, count(a_dw), c_out, 1,
                                                                 False),
                      count(a_dw) * c_out), *_bn_cost(True, "project_bn", a_out)]
    if self.ties_output(layer, x):
      a_out = union(a_out, a.inp) * a.width("out")
    return entries, a_out


class MaxPool(Kind):
  """VALID max pooling; channels (and their group) pass through."""

  name = "maxpool"
  fields = dict(window=2, stride=None)
  parametric = False
  int_fields = ("window",)

  def check(self, where, layer):
    if layer["stride"] is None:
      layer["stride"] = layer["window"]
    stride = layer["stride"]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
      raise ValueError(f"{where}.stride must be a positive int or null, got {stride!r}")

  def output(self, where, layer, x):
    if x.flat:
      raise ValueError(f"{where} needs an H x W x C input, got a flat one")
    w, s = layer["window"], layer["stride"]
    h, wd = (x.height - w) // s + 1, (x.width - w) // s + 1
    if h < 1 or wd < 1:
      raise ValueError(f"{where}: window {w} is larger than the {x.height}x{x.width} input")
    return Feature(h, wd, x.channels, False)

  def apply(self, layer, v, x, ctx, inputs, out):
    w, s = layer["window"], layer["stride"]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, w, w, 1), (1, s, s, 1), "VALID")


class GlobalAvgPool(Kind):
  """Mean over the spatial axes: ``(B, H, W, C) -> (B, C)``."""

  name = "global_avgpool"
  fields = {}
  parametric = False

  def output(self, where, layer, x):
    if x.flat:
      raise ValueError(f"{where} needs an H x W x C input, got a flat one")
    return Feature(1, 1, x.channels, True)

  def apply(self, layer, v, x, ctx, inputs, out):
    return jnp.mean(x, axis=(1, 2))


class Flatten(Kind):
  """``(B, H, W, C) -> (B, H*W*C)`` in HWC order; the channels keep their group."""

  name = "flatten"
  fields = {}
  parametric = False

  def output(self, where, layer, x):
    return dataclasses.replace(x, flat=True)

  def apply(self, layer, v, x, ctx, inputs, out):
    return x.reshape(x.shape[0], -1)


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Dense(), Conv(), SeparableConv(), ResBlock(), InvertedResidual(), MaxPool(),
    GlobalAvgPool(), Flatten())}
