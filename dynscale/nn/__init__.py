"""Flax NNX incomplete networks, the model zoo, whole-network slicing and export.

Importing this package is cheap: the names below load their module on first
use (PEP 562), so ``dynscale.nn.sliced`` (with ``load`` for exported
networks) runs without importing Flax or the model classes.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "spec": ("validate_architecture", "graph", "plan", "LayerPlan", "Feature", "LAYER_KINDS",
             "ACTIVATIONS", "select_profile", "prunable_groups", "resolve_widths",
             "widths_at_dp", "trimmed_architecture"),
    "kinds": ("KINDS",),
    "layers": ("Profile", "IDPDense", "IDPConv", "IDPSeparableConv", "IDPNet"),
    "models": ("MODELS", "architecture", "build", "init_rngs"),
    "sliced": ("apply_sliced", "features_sliced", "slice_variables", "SlicedModel", "export",
               "load", "bn_stats_of", "merge_variables", "variable_shapes", "batch_moments"),
    "batchnorm": ("BN_MODES", "recalibrate", "recalibrate_masked"),
    "costs": ("layer_costs", "flops", "params", "sample_flops"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
  if name in _WHERE:
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
  if name in _EXPORTS:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
