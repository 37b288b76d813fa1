"""Several variants of one experiment, one figure: each variant is the base
config with a few overrides, trained in its own sub-directory; the figure's
``results.json`` gathers their accuracy-by-DP curves and one plot shows them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

import ml_collections
from absl import logging

from dynscale import io, plots


class Method(Protocol):
  """A training method: a module with these two functions (e.g. ``tesla_training``)."""

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the bad field, before any compute."""

  def train_and_evaluate(self, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, evaluates, writes ``results.json`` under ``workdir``; returns the results."""


def flatten_overrides(overrides: Mapping, prefix: str = "") -> dict[str, object]:
  """``{"model": {"profile": "linear"}} -> {"model.profile": "linear"}``."""
  flat = {}
  for key, value in overrides.items():
    if isinstance(value, Mapping):
      flat.update(flatten_overrides(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping,
                   field: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with nested ``overrides`` applied; unknown fields raise."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in flatten_overrides(overrides).items():
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      node = node.get(part)
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"{field}: unknown config field {path!r}")
    if leaf not in node:
      raise ValueError(f"{field}: unknown config field {path!r}")
    node[leaf] = value
  return config


def variant_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The config of every variant in ``config.variants`` (name -> nested overrides)."""
  if not config.get("variants"):
    raise ValueError("variants must map at least one variant name to its overrides")
  base = ml_collections.ConfigDict(config.to_dict())
  del base["variants"]
  return {name: with_overrides(base, overrides.to_dict(), f"variants.{name}")
          for name, overrides in config.variants.items()}


def check_variants(config: ml_collections.ConfigDict,
                   methods: Mapping[str, Method]) -> dict[str, ml_collections.ConfigDict]:
  """Every variant's config, each checked by its method; the error names the variant."""
  configs = variant_configs(config)
  for name, variant in configs.items():
    if variant.method not in methods:
      raise ValueError(f"variants.{name}.method must be one of {tuple(methods)}, "
                       f"got {variant.method!r}")
    try:
      methods[variant.method].check_config(variant)
    except ValueError as error:
      raise ValueError(f"variants.{name}: {error}") from error
  return configs


def run_variants(config: ml_collections.ConfigDict, workdir: str,
                 methods: Mapping[str, Method]) -> dict:
  """Trains every variant with its ``method``, then writes the figure.

  Every variant's config is checked before the first one trains, so a bad
  last variant fails before any compute.
  """
  configs = check_variants(config, methods)
  workdir = io.check_writable_dir(workdir)
  curves, summaries = {}, {}
  for name, variant in configs.items():
    logging.info("Variant %s", name)
    results = methods[variant.method].train_and_evaluate(variant, os.path.join(workdir, name))
    curves[name] = results["test_accuracy_by_dp"]
    summaries[name] = {k: results[k] for k in
                       ("test_accuracy_by_dp", "mean_test_accuracy", "bn_mode") if k in results}
  title = config.get("title", "")
  plots.plot_accuracy_by_dp(curves, os.path.join(workdir, "accuracy_by_dp.png"), title=title)
  logging.info("%s\n%s", title, plots.format_accuracy_table(curves))
  figure = {"title": title, "variants": summaries}
  io.write_json_atomic(os.path.join(workdir, "results.json"), figure)
  return figure
