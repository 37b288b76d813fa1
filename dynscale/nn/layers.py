"""Flax NNX networks of architecture dicts: the masked path, with the gate hook.

McDanel et al., *Incomplete Dot Products* (paper 001), §II-C/D. A layer's
variables come from its kind's definition (:mod:`dynscale.nn.kinds`):
kernels (He-normal, float32), IDP profiles (:class:`Profile`), biases and
batch norms. :class:`IDPNet` runs :func:`dynscale.nn.forward.run` over its
own variables with channel masks: this is the MASKED path of DESIGN
invariant 1. Shapes never depend on the widths, which may be traced, so one
executable serves any width vector (training, vmap over DP levels). The
sliced path, :func:`dynscale.nn.sliced.apply_sliced`, computes the same
function with only the kept channels; tests prove the two equal in outputs,
gradients and batch-norm state.

Batch-norm state follows the sliced path exactly: in train mode a batch norm
updates the running statistics of only the channels kept at these widths;
the others keep their values.

The profile ``gamma`` of an IDP layer is a :class:`Profile` variable, not an
``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` leaves it fixed,
and ATP (paper 000 §3.4) trains it with ``wrt=Profile``.

The gate hook (DESIGN invariant 10; SANP, paper 002, Eq. 3): ``build(...,
gate=factory)`` calls ``factory(name, in_channels, out_channels, rngs)`` for
every gate point of the network (``layers.3``, ``layers.5.conv1``, ...) and
keeps the modules it returns (None skips a point). At run time each one
maps ``(x_in, y, train)`` (the convolution's input, its batch-normed output,
and whether the network runs in train mode: a gate may be stochastic in
training only) to a per-sample, per-channel multiplier ``s`` of shape ``(B, C)`` applied
before the activation, and :meth:`IDPNet.run` records which channels each
sample kept.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynscale import idp as kernels
from dynscale.nn import forward, sliced, spec
from dynscale.nn.kinds import KINDS, Context, Feature, GatePoint, Var, gate_name

Array = jax.Array
ProfileSpec = str | list[float]
GateFactory = Callable[[str, int, int, nnx.Rngs], nnx.Module | None]

# The standard deviation of a unit normal truncated to [-2, 2] (as in
# ``jax.nn.initializers.variance_scaling``).
TRUNCATED_NORMAL_STD = 0.87962566103423978


def he_normal(key: Array, shape: tuple[int, ...]) -> Array:
  """A float32 kernel drawn as ``nnx.initializers.he_normal()`` draws one (a
  unit normal truncated to [-2, 2], scaled to variance ``2 / fan_in`` with
  ``fan_in = prod(shape[:-1])``), on the host by NumPy seeded with ``key``;
  under ``jit`` or ``eval_shape`` the same draw, through a host callback.

  An XLA draw compiles once per distinct shape, about 0.3 s each on a CPU:
  nine of the ten seconds a MobileNetV2 (42 kernel shapes) took to build,
  again for every trimmed copy. Truncation is by redrawing the samples
  outside [-2, 2], which leaves the others' distribution the truncated one.
  """
  seed = jax.random.key_data(key)
  draw = functools.partial(_he_normal_on_host, shape=tuple(shape))
  if isinstance(seed, jax.core.Tracer):
    return jax.pure_callback(draw, jax.ShapeDtypeStruct(tuple(shape), jnp.float32), seed)
  return jnp.asarray(draw(seed))


def _he_normal_on_host(seed, shape: tuple[int, ...]) -> np.ndarray:
  rng = np.random.default_rng(np.asarray(seed).ravel())
  x = rng.standard_normal(math.prod(shape))
  outside = np.abs(x) > 2
  while outside.any():
    x[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(x) > 2
  scale = math.sqrt(2.0 / math.prod(shape[:-1])) / TRUNCATED_NORMAL_STD
  return (scale * x).reshape(shape).astype(np.float32)


def _filled(shape, value: float) -> Array:
  """A float32 array of ``value``, made on the host (``jnp.full`` compiles once per shape)."""
  return jnp.asarray(np.full(shape, value, np.float32))


class Profile(nnx.Variable):
  """Profile coefficients gamma of an IDP layer, one per input channel (001 §II-B)."""


class BatchNorm(nnx.Module):
  """Batch-norm variables over ``n`` channels (the arithmetic is in :class:`Context.norm`)."""

  def __init__(self, n: int):
    self.scale = nnx.Param(_filled(n, 1.0))
    self.bias = nnx.Param(_filled(n, 0.0))
    self.mean = nnx.BatchStat(_filled(n, 0.0))
    self.var = nnx.BatchStat(_filled(n, 1.0))


class Parts(nnx.Module):
  """Named variables (and nested parts) of a layer, created from a ``Var`` tree."""

  def __init__(self, specs: Mapping[str, Any], profile: ProfileSpec, rngs: nnx.Rngs):
    for name, var in specs.items():
      setattr(self, name, _variable(var, profile, rngs))


def _variable(var: Var | Mapping, profile: ProfileSpec, rngs: nnx.Rngs) -> Any:
  if not isinstance(var, Var):
    return Parts(var, profile, rngs)
  if var.role == "kernel":
    return nnx.Param(he_normal(rngs.params(), var.shape))
  if var.role == "gamma":
    return Profile(kernels.resolve_profile(profile, var.shape[0]))
  if var.role == "bias":
    return nnx.Param(_filled(var.shape, 0.0))
  return BatchNorm(var.shape[0])


class Block(Parts):
  """One parametric layer of an architecture: its variables, named by its kind."""

  def __init__(self, layer: dict, inputs: Feature, outputs: Feature, profile: ProfileSpec,
               rngs: nnx.Rngs):
    super().__init__(KINDS[layer["kind"]].variables(layer, inputs, outputs), profile, rngs)


class _Standalone(Block):
  """A single incomplete block used on its own: ``block(x, dp, train=...)``.

  ``dp`` keeps the first ``num_kept(C_in, dp)`` input channels of an IDP
  block (all of them otherwise); every output is computed. In train mode
  the running statistics are updated (all channels).
  """

  def __init__(self, layer: dict, inputs: Feature, *, bn_momentum: float, bn_epsilon: float,
               dtype, rngs: nnx.Rngs):
    layer = spec.validate_architecture({
        "name": layer["kind"], "input_shape": list(inputs.shape()),
        "num_classes": 1, "layers": [layer, {"kind": "flatten"}, {"kind": "dense",
                                                                   "features": 1}]})["layers"][0]
    self.layer_json = json.dumps(layer, sort_keys=True)
    self.inputs, self.dtype = inputs, dtype
    self.outputs = KINDS[layer["kind"]].output("layer", layer, inputs)
    self.bn_momentum, self.bn_epsilon = bn_momentum, bn_epsilon
    super().__init__(layer, inputs, self.outputs, layer["profile"] or "linear", rngs)

  def __call__(self, x: Array, dp, *, train: bool) -> Array:
    layer = json.loads(self.layer_json)
    kind = KINDS[layer["kind"]]
    masks = {}
    if "in" in kind.idp_slots(layer):
      masks["in"] = mask = kernels.channel_mask(self.inputs.channels, dp)
      x = (x.reshape(x.shape[0], -1, self.inputs.channels) * mask.astype(x.dtype)
           ).reshape(x.shape)
    variables = nnx.state(self).to_pure_dict()
    moments = {}

    def record(name, slot, first, second):
      if second is not None:
        moments[(name,)] = (slot, first, second)

    # the slot's mask also keeps what a block computes on it (a separable block's
    # depthwise output) at zero beyond the kept channels, as in a network
    ctx = Context(train=train, epsilon=self.bn_epsilon, masks=masks, gates=None, path="layer",
                  record=record)
    y = kind.apply(layer, variables, jnp.asarray(x, self.dtype), ctx, self.inputs,
                   self.outputs)
    if moments:
      stats = sliced.running_stats(moments, sliced.bn_stats_of(variables), self.bn_momentum,
                                   lambda slot, old, new: new)
      nnx.update(self, nnx.State(stats))
    return y


def _standalone(kind: str, in_features: int | tuple[int, int, int], fields: dict, *,
                bn_momentum: float = 0.9, bn_epsilon: float = 1e-5, dtype=jnp.float32,
                rngs: nnx.Rngs) -> _Standalone:
  if isinstance(in_features, tuple):
    inputs = Feature(*in_features, kind == "dense")
  else:
    inputs = Feature(1, 1, in_features, kind == "dense")
  return _Standalone({"kind": kind, **fields}, inputs, bn_momentum=bn_momentum,
                     bn_epsilon=bn_epsilon, dtype=dtype, rngs=rngs)


def IDPDense(in_features: int, out_features: int, *, map_shape=None, rngs: nnx.Rngs,
             bn_momentum: float = 0.9, bn_epsilon: float = 1e-5, dtype=jnp.float32,
             **fields) -> _Standalone:
  """FC / B-FC block ``act(BN(sum_{i<=k} gamma_i w_ji x_i))`` (001 §II-C).

  Input ``(B, in_features)``; with ``map_shape = (H, W, C)`` the input is a
  flattened map and an IDP profile is per channel (length C). ``fields``
  are those of the ``dense`` kind (``idp``, ``bn``, ``act``, ``binary``,
  ``profile``).
  """
  shape = tuple(map_shape) if map_shape is not None else in_features
  if map_shape is not None and map_shape[0] * map_shape[1] * map_shape[2] != in_features:
    raise ValueError(f"map_shape {map_shape} does not hold in_features={in_features}")
  return _standalone("dense", shape, {"features": out_features, **fields}, rngs=rngs,
                     bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, dtype=dtype)


def IDPConv(in_features: int, out_features: int, kernel_size: int = 3, *, height: int = 8,
            width: int = 8, rngs: nnx.Rngs, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
            dtype=jnp.float32, **fields) -> _Standalone:
  """Conv / B-Conv block ``act(BN(sum_{i<=k} gamma_i (f_ji * x_i)))`` (001 §II-C).

  NHWC input; ``fields`` are those of the ``conv`` kind. ``height`` /
  ``width`` only check the input shape rule (any SAME-padded size runs).
  """
  return _standalone("conv", (height, width, in_features),
                     {"features": out_features, "kernel": kernel_size, **fields}, rngs=rngs,
                     bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, dtype=dtype)


def IDPSeparableConv(in_features: int, out_features: int, kernel_size: int = 3, *,
                     height: int = 8, width: int = 8, rngs: nnx.Rngs,
                     bn_momentum: float = 0.9, bn_epsilon: float = 1e-5, dtype=jnp.float32,
                     **fields) -> _Standalone:
  """S-Conv block (001 §II-C, Fig. 4): depthwise -> BN -> act -> pointwise -> BN -> act."""
  return _standalone("sconv", (height, width, in_features),
                     {"features": out_features, "kernel": kernel_size, **fields}, rngs=rngs,
                     bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, dtype=dtype)


class Stateless(nnx.Module):
  """A parameter-free layer of an architecture (maxpool, global_avgpool, flatten)."""


def _gate_points(arch: dict):
  """``(gate name, GatePoint, the group it gates)`` of every gateable
  convolution of ``arch``, in network order."""
  graph = spec.graph(arch)
  for node in graph.nodes:
    layer = arch["layers"][node.index]
    for point, gated in KINDS[layer["kind"]].gate_points(layer, node.inputs).items():
      yield gate_name(f"layers.{node.index}", point), gated, graph.groups[node.slots[gated.slot]]


def gate_points(arch: dict) -> dict[str, GatePoint]:
  """Every gateable convolution of ``arch`` by gate name, in network order."""
  return {name: gated for name, gated, _ in _gate_points(arch)}


def gated_groups(arch: dict) -> dict[str, spec.Group]:
  """The channel group (:func:`dynscale.nn.spec.graph`) each gate point of
  ``arch`` multiplies, by gate name: a residual block's ``conv1`` gates its
  ``mid`` group, a ``conv2`` before the add a group it may share with the
  block's input (tied)."""
  return {name: group for name, _, group in _gate_points(arch)}


def _gate_modules(arch: dict, gate: GateFactory | None, rngs: nnx.Rngs) -> nnx.Dict:
  """The gate hook's modules by gate name (module docstring)."""
  modules = {}
  if gate is not None:
    for name, gated in gate_points(arch).items():
      module = gate(name, gated.inputs, gated.outputs, rngs)
      if module is not None:
        modules[name] = module
  return nnx.Dict(modules)


def masked_keep(arch: dict, widths: Array) -> Callable[[int, Array, Array], Array]:
  """For :func:`~dynscale.nn.sliced.running_stats`: new statistics on the kept channels only."""
  masks = spec.group_masks(arch, widths)

  def keep(group: int, old: Array, new: Array) -> Array:
    return new if group not in masks else jnp.where(masks[group] > 0, new, old)
  return keep


class IDPNet(nnx.Module):
  """The masked network of an architecture dict (see :mod:`dynscale.nn.spec`).

  ``layers[i]`` holds the variables of ``arch['layers'][i]``. Under MP-IDP
  (``arch['profiles']`` not null) the first and last parametric layers are an
  ``nnx.List`` with one block per profile (001 §III: "each profile maintains a
  separate first and last layer"); the middle layers are shared. ``gates``
  holds the gate hook's modules by gate name.

  Parameters are float32. With ``dtype=jnp.bfloat16`` the input is cast and
  the layers compute in bf16; logits always come back float32.
  """

  def __init__(self, arch: dict, *, rngs: nnx.Rngs, dtype=jnp.float32,
               gate: GateFactory | None = None):
    arch = spec.validate_architecture(arch)
    self.arch_json = json.dumps(arch, sort_keys=True)
    self.dtype = dtype
    separate = spec.separate_layers(arch)
    copies = len(arch["profiles"]) if separate else 1
    blocks = []
    for node in spec.graph(arch).nodes:
      layer = arch["layers"][node.index]
      if node.kind not in spec.PARAMETRIC_KINDS:
        blocks.append(Stateless())
        continue
      profile = spec.layer_profile(arch, node.index)

      def block(layer=layer, node=node, profile=profile):
        return Block(layer, node.inputs, node.outputs, profile, rngs)
      blocks.append(nnx.List([block() for _ in range(copies)]) if node.index in separate
                    else block())
    self.layers = nnx.List(blocks)
    self.gates = _gate_modules(arch, gate, rngs)

  @property
  def arch(self) -> dict:
    """The (normalised) architecture dict; a fresh copy on every access."""
    return json.loads(self.arch_json)

  def pure_variables(self) -> dict:
    """The layers' variables as a pure nested dict of arrays, ``{'layers': {i: ...}}``.

    The layout is what :func:`dynscale.nn.sliced.apply_sliced` and export use.
    """
    return {"layers": nnx.state(self.layers).to_pure_dict()}

  def run(self, x: Array, dp=None, *, widths=None, train: bool,
          profile_index: int | None = None) -> forward.Trace:
    """The masked forward (module docstring); returns logits and recorded gate activity.

    Args:
      x: a batch ``(B, *input_shape)``.
      dp: fraction of channels kept by IDP (:func:`~dynscale.nn.spec.
        widths_at_dp`), in (0, 1]; may be traced.
      widths: instead of ``dp``, a width vector (any form of
        :func:`~dynscale.nn.spec.resolve_widths`, or an int array over the
        prunable groups, which may be traced).
      train: REQUIRED. True uses batch statistics and updates the running
        ones (only the kept channels); False uses the running statistics.
        There is no default, so evaluation never runs in train mode by
        accident.
      profile_index: MP-IDP: the profile to use (static int). Without it the
        profile is chosen from ``dp``, which must then be concrete.
    """
    if not isinstance(train, bool):
      raise ValueError(f"train must be True or False, got {train!r}")
    if (dp is None) == (widths is None):
      raise ValueError("give exactly one of dp or widths")
    arch = self.arch
    spec.check_input(arch, x)
    if dp is not None:
      if not isinstance(dp, jax.core.Tracer) and jnp.ndim(dp) == 0:
        kernels.check_dp(dp)
      kept = spec.widths_at_dp(arch, dp)
    elif isinstance(widths, jax.Array):
      kept = spec.width_array(arch, widths)
    else:
      kept = spec.resolve_widths(arch, widths)
    kept = jnp.asarray(kept, jnp.int32)
    s = spec.select_profile(arch, dp, profile_index)
    variables = self.pure_variables()
    gates = {name: module for name, module in self.gates.items()}
    trace = forward.run(arch, variables, x, widths=kept, train=train, profile=s, gates=gates,
                        dtype=self.dtype)
    if trace.moments:
      stats = sliced.running_stats(trace.moments, sliced.bn_stats_of(variables),
                                   arch["bn_momentum"], masked_keep(arch, kept))
      nnx.update(self.layers, nnx.State(stats["layers"]))
    return trace

  def __call__(self, x: Array, dp=None, *, widths=None, train: bool,
               profile_index: int | None = None) -> Array:
    """Logits ``(B, num_classes)`` float32 of the masked network (:meth:`run`)."""
    return self.run(x, dp, widths=widths, train=train, profile_index=profile_index).output
