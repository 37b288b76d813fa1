"""Flax NNX incomplete blocks and the network built from an architecture dict.

McDanel et al., *Incomplete Dot Products* (paper 001), §II-C/D. Each module
here is an *incomplete block* of 001 §II-D: an incomplete layer, then batch
norm (or a bias) and an activation — FC / B-FC (:class:`IDPDense`), Conv /
B-Conv (:class:`IDPConv`) and S-Conv (:class:`IDPSeparableConv`). ``binary``
blocks use sign(w) in {-1, +1} with the straight-through estimator
(:func:`dynscale.idp.binarize`).

This is the MASKED path of DESIGN invariant 1: every call runs the masked
kernels of :mod:`dynscale.idp`, shapes do not depend on ``dp`` and ``dp`` may
be a traced scalar (training, vmap over DP levels). The sliced path,
:func:`dynscale.nn.sliced.apply_sliced`, computes the same function with only
the kept channels; tests prove the two equal in outputs, gradients and
batch-norm state.

Batch-norm state follows the sliced path exactly: in train mode a block whose
output feeds an IDP layer (``out_idp``) updates the running statistics of
only the channels kept at this DP; the others, not computed by the sliced
network, keep their values.

The profile ``gamma`` of an IDP layer is a :class:`Profile` variable, not an
``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` leaves it fixed,
and ATP (paper 000 §3.4) trains it with ``wrt=Profile``.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynscale import idp as kernels
from dynscale.nn import spec

Array = jax.Array
ProfileSpec = str | list[float]


class Profile(nnx.Variable):
  """Profile coefficients gamma of an IDP layer, one per input channel (001 §II-B)."""


def _kernel(rngs: nnx.Rngs, shape: tuple[int, ...]) -> nnx.Param:
  """He-normal (fan-in) weights, float32."""
  return nnx.Param(nnx.initializers.he_normal()(rngs.params(), shape, jnp.float32))


def _weight(param: nnx.Param, binary: bool) -> Array:
  w = param[...]
  return kernels.binarize(w) if binary else w


def _coefficients(gamma: Profile | None, n: int, dp) -> tuple[Array, Any]:
  """(gamma, dp) for a masked kernel; all-one at DP 1 for a complete (CDP) layer."""
  if gamma is None:
    return jnp.ones((n,), jnp.float32), 1.0
  return gamma[...], dp


def _profile(profile_spec: ProfileSpec, n: int, enabled: bool) -> Profile | None:
  """The ``Profile`` over ``n`` channels of an IDP layer, None for a complete one."""
  return Profile(kernels.resolve_profile(profile_spec, n)) if enabled else None


class _Block(nnx.Module):
  """Shared tail of a block: batch norm (or bias), then the activation."""

  def _norm(self, n: int, bn: bool, momentum: float, epsilon: float, dtype,
            rngs: nnx.Rngs) -> tuple[nnx.BatchNorm | None, nnx.Param | None]:
    if bn:
      return nnx.BatchNorm(n, momentum=momentum, epsilon=epsilon, dtype=dtype,
                           rngs=rngs), None
    return None, nnx.Param(jnp.zeros((n,), jnp.float32))

  def _tail(self, y: Array, bn: nnx.BatchNorm | None, bias: nnx.Param | None, dp, *,
            kept: bool, train: bool) -> Array:
    """``act(BN(y))`` or ``act(y + bias)``; ``kept``: only the DP prefix is used downstream."""
    if bn is None:
      y = y + bias[...].astype(y.dtype)
    elif not train:
      y = bn(y, use_running_average=True)
    else:
      mean, var = bn.mean[...], bn.var[...]
      y = bn(y, use_running_average=False)
      if kept:
        keep = kernels.channel_mask(mean.shape[0], dp) > 0
        bn.mean[...] = jnp.where(keep, bn.mean[...], mean)
        bn.var[...] = jnp.where(keep, bn.var[...], var)
    return spec.activate(self.act, y)


class IDPDense(_Block):
  """FC / B-FC block: ``act(BN(sum_{i<=k} gamma_i w_ji x_i))`` (001 §II-C, Eq. for y_j).

  Input ``(B, in_features)``; output ``(B, out_features)``. With ``map_shape
  = (H, W, C)`` the input is a flattened map (``in_features = H*W*C``) and an
  IDP profile is per channel (length C); otherwise per feature.
  """

  def __init__(self, in_features: int, out_features: int, *, idp: bool = False,
               binary: bool = False, bn: bool = False, act: str | None = None,
               profile: ProfileSpec = "linear", map_shape: tuple[int, int, int] | None = None,
               out_idp: bool = False, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.map_shape = tuple(map_shape) if map_shape is not None else (1, 1, in_features)
    if self.map_shape[0] * self.map_shape[1] * self.map_shape[2] != in_features:
      raise ValueError(f"map_shape {map_shape} does not hold in_features={in_features}")
    self.binary, self.act, self.out_idp = binary, act, out_idp
    self.as_conv = idp and self.map_shape[0] * self.map_shape[1] > 1
    self.kernel = _kernel(rngs, (in_features, out_features))
    self.gamma = _profile(profile, self.map_shape[2], idp)
    self.bn, self.bias = self._norm(out_features, bn, bn_momentum, bn_epsilon, dtype, rngs)

  def __call__(self, x: Array, dp, *, train: bool) -> Array:
    w = _weight(self.kernel, self.binary)
    if self.as_conv:
      h, wd, c = self.map_shape
      gamma, dp_ = _coefficients(self.gamma, c, dp)
      y = kernels.conv(x.reshape(-1, h, wd, c), w.reshape(h, wd, c, -1), gamma, dp_,
                       padding="VALID").reshape(x.shape[0], -1)
    else:
      gamma, dp_ = _coefficients(self.gamma, w.shape[0], dp)
      y = kernels.dense(x, w, gamma, dp_)
    return self._tail(y, self.bn, self.bias, dp, kept=self.out_idp, train=train)


class IDPConv(_Block):
  """Conv / B-Conv block: ``act(BN(sum_{i<=k} gamma_i (f_ji * x_i)))`` (001 §II-C).

  NHWC input ``(B, H, W, in_features)``; SAME padding; HWIO kernel.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               stride: int = 1, idp: bool = False, binary: bool = False, bn: bool = True,
               act: str | None = "relu", profile: ProfileSpec = "linear",
               out_idp: bool = False, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.stride, self.binary, self.act, self.out_idp = stride, binary, act, out_idp
    self.kernel = _kernel(rngs, (kernel_size, kernel_size, in_features, out_features))
    self.gamma = _profile(profile, in_features, idp)
    self.bn, self.bias = self._norm(out_features, bn, bn_momentum, bn_epsilon, dtype, rngs)

  def __call__(self, x: Array, dp, *, train: bool) -> Array:
    w = _weight(self.kernel, self.binary)
    gamma, dp_ = _coefficients(self.gamma, w.shape[2], dp)
    y = kernels.conv(x, w, gamma, dp_, strides=self.stride)
    return self._tail(y, self.bn, self.bias, dp, kept=self.out_idp, train=train)


class IDPSeparableConv(_Block):
  """S-Conv block (001 §II-C, Fig. 4): depthwise -> BN -> act -> pointwise -> BN -> act.

  IDP is on the pointwise part: y_j = sum_{i<=k} gamma_i g_ji * (f_i * x_i).
  With ``idp_depthwise`` the depthwise part is incomplete too (its own
  profile, the same k). As in MobileNet v1, batch norm and the activation sit
  between the two parts, so they are separate kernel calls rather than
  :func:`dynscale.idp.separable_conv`.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               stride: int = 1, idp: bool = False, idp_depthwise: bool = False,
               binary: bool = False, bn: bool = True, act: str | None = "relu",
               profile: ProfileSpec = "linear", out_idp: bool = False,
               bn_momentum: float = 0.9, bn_epsilon: float = 1e-5, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if idp_depthwise and not idp:
      raise ValueError("idp_depthwise needs idp=True")
    self.stride, self.binary, self.act, self.out_idp = stride, binary, act, out_idp
    self.idp = idp
    self.depthwise_kernel = _kernel(rngs, (kernel_size, kernel_size, 1, in_features))
    self.depthwise_gamma = _profile(profile, in_features, idp_depthwise)
    self.depthwise_bn, self.depthwise_bias = self._norm(in_features, bn, bn_momentum,
                                                        bn_epsilon, dtype, rngs)
    self.kernel = _kernel(rngs, (1, 1, in_features, out_features))
    self.gamma = _profile(profile, in_features, idp)
    self.bn, self.bias = self._norm(out_features, bn, bn_momentum, bn_epsilon, dtype, rngs)

  def __call__(self, x: Array, dp, *, train: bool) -> Array:
    f = _weight(self.depthwise_kernel, self.binary)
    gamma, dp_ = _coefficients(self.depthwise_gamma, f.shape[3], dp)
    h = kernels.depthwise_conv(x, f, gamma, dp_, strides=self.stride)
    h = self._tail(h, self.depthwise_bn, self.depthwise_bias, dp, kept=self.idp, train=train)
    g = _weight(self.kernel, self.binary)
    gamma, dp_ = _coefficients(self.gamma, g.shape[2], dp)
    y = kernels.conv(h, g, gamma, dp_)
    return self._tail(y, self.bn, self.bias, dp, kept=self.out_idp, train=train)


class Stateless(nnx.Module):
  """A parameter-free layer of an architecture (maxpool, global_avgpool, flatten)."""

  def __init__(self, layer: dict):
    self.layer_json = json.dumps(layer, sort_keys=True)

  def __call__(self, x: Array, dp, *, train: bool) -> Array:
    del dp, train
    return spec.apply_stateless(json.loads(self.layer_json), x)


def _block(arch: dict, index: int, inputs: spec.Feature, out_idp: bool, dtype,
           rngs: nnx.Rngs) -> nnx.Module:
  """The module of ``arch['layers'][index]``."""
  layer = arch["layers"][index]
  kind = layer["kind"]
  if kind not in spec.PARAMETRIC_KINDS:
    return Stateless(layer)
  common = dict(idp=layer["idp"], binary=layer["binary"], bn=layer["bn"], act=layer["act"],
                profile=spec.layer_profile(arch, index), out_idp=out_idp,
                bn_momentum=arch["bn_momentum"], bn_epsilon=arch["bn_epsilon"], dtype=dtype,
                rngs=rngs)
  if kind == "dense":
    map_shape = (inputs.height, inputs.width, inputs.channels)
    return IDPDense(inputs.size, layer["features"], map_shape=map_shape, **common)
  if kind == "conv":
    return IDPConv(inputs.channels, layer["features"], layer["kernel"], stride=layer["stride"],
                   **common)
  return IDPSeparableConv(inputs.channels, layer["features"], layer["kernel"],
                          stride=layer["stride"], idp_depthwise=layer["idp_depthwise"],
                          **common)


class IDPNet(nnx.Module):
  """The masked network of an architecture dict (see :mod:`dynscale.nn.spec`).

  ``layers[i]`` is the module of ``arch['layers'][i]``. Under MP-IDP
  (``arch['profiles']`` not null) the first and last parametric layers are an
  ``nnx.List`` with one block per profile (001 §III: "each profile maintains a
  separate first and last layer"); the middle layers are shared.

  Parameters are float32. With ``dtype=jnp.bfloat16`` the input is cast and
  the kernels and batch norm compute in bf16; logits always come back float32.
  """

  def __init__(self, arch: dict, *, rngs: nnx.Rngs, dtype=jnp.float32):
    arch = spec.validate_architecture(arch)
    self.arch_json = json.dumps(arch, sort_keys=True)
    self.dtype = dtype
    plans = spec.plan(arch, 1.0)
    separate = spec.separate_layers(arch)
    params = spec.parametric_indices(arch)
    copies = len(arch["profiles"]) if separate else 1
    blocks = []
    for i, p in enumerate(plans):
      consumer = next((j for j in params if j > i), None)
      out_idp = consumer is not None and arch["layers"][consumer]["idp"]
      if i in separate:
        blocks.append(nnx.List([_block(arch, i, p.inputs, out_idp, dtype, rngs)
                                for _ in range(copies)]))
      else:
        blocks.append(_block(arch, i, p.inputs, out_idp, dtype, rngs))
    self.layers = nnx.List(blocks)

  @property
  def arch(self) -> dict:
    """The (normalised) architecture dict; a fresh copy on every access."""
    return json.loads(self.arch_json)

  def pure_variables(self) -> dict:
    """Every variable as a pure nested dict of arrays (``nnx.state(self).to_pure_dict()``).

    The layout is what :func:`dynscale.nn.sliced.apply_sliced` and export use.
    """
    return nnx.state(self).to_pure_dict()

  def __call__(self, x: Array, dp, *, train: bool, profile_index: int | None = None) -> Array:
    """Logits ``(B, num_classes)`` float32 at DP ``dp`` (masked path).

    Args:
      x: a batch ``(B, *input_shape)``.
      dp: fraction of channels kept by IDP layers, in (0, 1]; may be traced.
      train: REQUIRED. True uses batch statistics and updates the running
        ones (only the channels computed at ``dp``); False uses the running
        statistics. There is no default, so evaluation never runs in train
        mode by accident.
      profile_index: MP-IDP only: the profile to use (static int). Without it
        the profile is chosen from ``dp``, which must then be concrete.
    """
    if not isinstance(train, bool):
      raise ValueError(f"train must be True or False, got {train!r}")
    arch = self.arch
    spec.check_input(arch, x)
    if not isinstance(dp, jax.core.Tracer) and jnp.ndim(dp) == 0:
      kernels.check_dp(dp)
    s = spec.select_profile(arch, dp, profile_index)
    separate = spec.separate_layers(arch)
    y = jnp.asarray(x, self.dtype)
    for i, layer in enumerate(self.layers):
      y = (layer[s] if i in separate else layer)(y, dp, train=train)
    return y.astype(jnp.float32)
