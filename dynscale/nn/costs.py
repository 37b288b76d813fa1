"""Analytic per-layer FLOPs and parameters of an architecture at a DP.

The network is costed as the sliced path runs it (:func:`dynscale.nn.spec.plan`):
each layer with its ACTIVE input channels ``k`` and computed output channels
``n`` at that DP, at its output resolution, with the SANP formula of
:mod:`dynscale.metrics` (``H W (C_in k^2 + 1) C_out``, one multiply-add = one
FLOP, ``+1`` only for layers with a bias). A middle IDP layer therefore costs
about ``dp**2`` of its full cost (001 §I).

Conventions: a dense layer on a flattened ``H x W`` map counts ``H W k``
inputs; a depthwise-separable block is a depthwise and a pointwise entry;
batch norm is its own entry with its ``2 n`` trainable parameters and no
FLOPs (it folds into the preceding layer at inference); pooling and flatten
are free; profiles are not parameters (``gamma_i w_ji`` folds into the
weights at inference). Under MP-IDP one profile's first and last layers
run, so only one copy is counted.
"""

from __future__ import annotations

from dynscale import metrics
from dynscale.nn import spec


def _block_costs(layer: dict, p: spec.LayerPlan) -> list[metrics.LayerCost]:
  name, bias = f"layers.{p.index}", not layer["bn"]
  k, n, out = p.in_width, p.out_width, p.outputs
  costs = []
  if layer["kind"] == "dense":
    c_in = p.inputs.positions * k
    costs.append(metrics.LayerCost(f"{name}.dense", "dense",
                                   metrics.dense_flops(c_in, n, bias=bias),
                                   metrics.dense_params(c_in, n, bias=bias)))
  elif layer["kind"] == "conv":
    kernel = layer["kernel"]
    costs.append(metrics.LayerCost(
        f"{name}.conv", "conv",
        metrics.conv_flops(out.height, out.width, k, n, kernel, bias=bias),
        metrics.conv_params(k, n, kernel, bias=bias)))
  else:
    kernel = layer["kernel"]
    costs.append(metrics.LayerCost(
        f"{name}.depthwise", "depthwise",
        metrics.depthwise_conv_flops(out.height, out.width, k, kernel, bias=bias),
        metrics.depthwise_conv_params(k, kernel, bias=bias)))
    if layer["bn"]:
      costs.append(metrics.LayerCost(f"{name}.depthwise_bn", "bn", 0,
                                     metrics.batchnorm_params(k)))
    costs.append(metrics.LayerCost(
        f"{name}.pointwise", "pointwise",
        metrics.pointwise_conv_flops(out.height, out.width, k, n, bias=bias),
        metrics.pointwise_conv_params(k, n, bias=bias)))
  if layer["bn"]:
    costs.append(metrics.LayerCost(f"{name}.bn", "bn", 0, metrics.batchnorm_params(n)))
  return costs


def layer_costs(arch: dict, dp: float = 1.0) -> list[metrics.LayerCost]:
  """Per-layer costs of the sliced network of ``arch`` at DP ``dp`` (module docstring).

  Entries are named after the variable paths: ``layers.3.conv``,
  ``layers.3.bn``, ``layers.5.depthwise``, ``layers.5.pointwise``, ...
  """
  arch = spec.validate_architecture(arch)
  return [cost for p in spec.plan(arch, dp) if p.kind in spec.PARAMETRIC_KINDS
          for cost in _block_costs(arch["layers"][p.index], p)]


def flops(arch: dict, dp: float = 1.0) -> int:
  """Total analytic FLOPs of the network at DP ``dp``."""
  return metrics.total(layer_costs(arch, dp)).flops


def params(arch: dict, dp: float = 1.0) -> int:
  """Parameters used by the network at DP ``dp`` (all of them at 1.0)."""
  return metrics.total(layer_costs(arch, dp)).params
