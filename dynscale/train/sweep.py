"""Several variants of one experiment, one figure: each variant is the base
config with a few overrides, trained by its own method in its own
sub-directory. The figure's ``results.json`` gathers every variant's curves
and scalar results, and each curve name gets one plot with a line per
variant, whatever the methods.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
import ml_collections
import numpy as np
from absl import logging

from dynscale import io, plots
from dynscale.train import protocols


class Method(Protocol):
  """A training method: a module with these two functions (e.g. ``dynscale.tesla.training``)."""

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the bad field, before any compute."""

  def train_and_evaluate(self, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, evaluates, writes ``results.json`` under ``workdir``; returns the results."""


def flat_fields(tree: Mapping, prefix: str = "") -> dict[str, object]:
  """Nested config fields (or overrides) by dotted name:
  ``{"model": {"profile": "linear"}} -> {"model.profile": "linear"}``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flat_fields(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping,
                   field: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with nested ``overrides`` applied; unknown fields raise."""
  config = protocols.editable_copy(config)
  for path, value in flat_fields(overrides).items():
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


VARIANT_REFERENCE = "variant:"
"""``model.init_from='variant:<name>'``: start from variant ``<name>``'s export."""


def referenced_variant(config: ml_collections.ConfigDict) -> str | None:
  """The variant whose export ``config.model.init_from`` names, if it names one."""
  init_from = config.get("model", {}).get("init_from", "")
  if isinstance(init_from, str) and init_from.startswith(VARIANT_REFERENCE):
    return init_from[len(VARIANT_REFERENCE):]
  return None


def run_name(variant: str, seed: int | None) -> str:
  """The run of ``variant`` at ``seed`` (``<variant>-seed<k>``; ``variant`` without seeds)."""
  return variant if seed is None else f"{variant}-seed{seed}"


def variant_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The config of every run of the figure: each variant of ``config.variants``
  (name -> nested overrides), and with ``config.seeds`` each variant once per
  seed, named ``<variant>-seed<k>`` (a ``variant:<name>`` reference then names
  the same seed's run)."""
  if not config.get("variants"):
    raise ValueError("variants must map at least one variant name to its overrides")
  base = protocols.editable_copy(config)
  del base["variants"]
  seeds = base.get("seeds")
  if seeds:
    del base["seeds"]
  configs = {name: with_overrides(base, overrides.to_dict(), f"variants.{name}")
             for name, overrides in config.variants.items()}
  if not seeds:
    return configs
  for seed in seeds:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
      raise ValueError(f"seeds must be integers >= 0, got {seed!r}")
  out = {}
  for name, variant in configs.items():
    for seed in seeds:
      seeded = with_overrides(variant, {"seed": seed}, "seeds")
      if referenced_variant(seeded) is not None:
        seeded.model.init_from = run_name(seeded.model.init_from, seed)
      out[run_name(name, seed)] = seeded
  return out


def by_variant(config: ml_collections.ConfigDict, summaries: Mapping[str, Mapping],
               variants: Sequence[str] = ()) -> dict:
  """Over the seeds of each variant (of ``variants``, default all): the mean and
  the population standard deviation (``ddof=0``) of every numeric result, and
  each seed's summary (``by_seed``)."""
  grouped = {}
  for name in variants or config.variants:
    runs = {seed: summaries[run_name(name, seed)] for seed in config.seeds}
    numeric = [key for key, value in next(iter(runs.values())).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    values = {key: np.array([run[key] for run in runs.values()], np.float64) for key in numeric}
    grouped[name] = {"mean": {key: float(v.mean()) for key, v in values.items()},
                     "std": {key: float(v.std()) for key, v in values.items()},
                     "by_seed": {str(seed): run for seed, run in runs.items()}}
  return grouped


def check_variants(config: ml_collections.ConfigDict,
                   methods: Mapping[str, Method]) -> dict[str, ml_collections.ConfigDict]:
  """Every variant's config, each checked by its method; the error names the variant."""
  configs = variant_configs(config)
  for name, variant in configs.items():
    if variant.method not in methods:
      raise ValueError(f"variants.{name}.method must be one of {tuple(methods)}, "
                       f"got {variant.method!r}")
    reference = referenced_variant(variant)
    if reference is not None:
      if reference not in configs or referenced_variant(configs[reference]) is not None:
        raise ValueError(f"variants.{name}: model.init_from names variant {reference!r}; "
                         f"it must be one of the variants that start from scratch "
                         f"{[n for n, c in configs.items() if referenced_variant(c) is None]}")
      variant = with_overrides(variant, {"model": {"init_from": ""}}, f"variants.{name}")
    try:
      methods[variant.method].check_config(variant)
    except ValueError as error:
      raise ValueError(f"variants.{name}: {error}") from error
  return configs


def in_running_order(configs: Mapping[str, ml_collections.ConfigDict]) -> list[str]:
  """Variant names, those another variant starts from first."""
  referenced = {referenced_variant(c) for c in configs.values()}
  return sorted(configs, key=lambda name: name not in referenced)


def selected_runs(config: ml_collections.ConfigDict,
                  configs: Mapping[str, ml_collections.ConfigDict],
                  variants: Sequence[str]) -> list[str]:
  """The runs of ``variants`` (names in ``config.variants``; every seed of each)
  and the runs they start from, in running order."""
  unknown = [name for name in variants if name not in config.variants]
  if unknown or not variants:
    raise ValueError(f"variants to run must be names from {tuple(config.variants)}, "
                     f"got {list(variants)!r}")
  seeds = config.get("seeds")
  wanted = {run_name(name, seed) for name in variants for seed in (seeds or [None])}
  wanted |= {referenced_variant(configs[name]) for name in wanted} - {None}
  return [name for name in in_running_order(configs) if name in wanted]


def variant_summary(results: Mapping) -> dict:
  """A variant's entry in the figure: the method, model and dataset that ran (from
  the results of :func:`dynscale.train.runs.finish`), its curves and its scalar results."""
  scalars = {key: value for key, value in results.items()
             if isinstance(value, (bool, int, float, str))}
  return {"method": results["config"]["method"], "model": results["model"]["name"],
          "dataset": results["dataset"]["name"], "curves": results.get("curves", {}),
          **scalars}


def figure_title(title: str, summaries: Mapping[str, Mapping], protocol: str = "paper") -> str:
  """``title`` followed by every model, dataset and method the variants ran, e.g.
  ``'000 Table 1: tesla_mlp on fashion_mnist (idp, tesla)'``, and the protocol
  unless it is the paper's."""
  def names(key: str) -> str:
    return ", ".join(sorted({summary[key] for summary in summaries.values()}))
  ran = f"{names('model')} on {names('dataset')} ({names('method')})"
  if protocol != "paper":
    ran += f", {protocol} protocol"
  return f"{title}: {ran}" if title else ran


def curves_by_name(results_by_label: Mapping[str, Mapping]) -> dict[str, dict[str, dict]]:
  """``{curve name: {label: curve}}`` from ``{label: results (or summary) with "curves"}``."""
  by_name: dict[str, dict[str, dict]] = {}
  for label, results in results_by_label.items():
    for name, curve in results.get("curves", {}).items():
      by_name.setdefault(name, {})[label] = curve
  return by_name


def run_variants(config: ml_collections.ConfigDict, workdir: str,
                 methods: Mapping[str, Method], only: Sequence[str] = ()) -> dict:
  """Trains every variant with its ``method``, then writes the figure.

  Every variant's config is checked before the first one trains, so a bad
  last variant fails before any compute. Writes (process 0) ``results.json``
  (the title, :func:`figure_title` of ``config.title``, the protocol with
  each run's deviations from it, and each variant's
  :func:`variant_summary`) and ``<curve name>.png`` for every curve name,
  one line per variant that has it.

  With ``only`` (variant names), trains just those variants and the ones
  they start from, and writes no figure: each run's own ``results.json`` is
  in its sub-directory, and a later call without ``only`` reuses the
  finished runs (every method resumes) and writes the whole figure.
  """
  configs = check_variants(config, methods)
  names = selected_runs(config, configs, only) if only else in_running_order(configs)
  workdir = io.check_writable_dir(workdir)
  summaries = {}
  for name in names:
    variant = configs[name]
    reference = referenced_variant(variant)
    if reference is not None:
      variant = with_overrides(variant, {"model": {"init_from": os.path.join(workdir, reference)}},
                               f"variants.{name}")
    logging.info("Variant %s", name)
    results = methods[variant.method].train_and_evaluate(variant, os.path.join(workdir, name))
    summaries[name] = variant_summary(results)
  if only:
    partial = {"variants": summaries, "partial": True}
    if config.get("seeds"):
      partial["by_variant"] = by_variant(config, summaries, only)
    return partial
  summaries = {name: summaries[name] for name in configs}
  title = figure_title(config.get("title", ""), summaries, protocols.name_of(config))
  main = jax.process_index() == 0
  for curve_name, curves in curves_by_name(summaries).items():
    if main:
      plots.plot_curves(curves, os.path.join(workdir, f"{curve_name}.png"), title=title)
    logging.info("%s, %s:\n%s", title, curve_name, plots.format_curves_table(curves))
  deviating = {name: protocols.deviations(c) for name, c in configs.items()}
  figure = {"title": title,
            "protocol": {**protocols.record(config),
                         "deviations_by_run": {name: d for name, d in deviating.items() if d}},
            "variants": summaries}
  if config.get("seeds"):
    figure["by_variant"] = by_variant(config, summaries)
  if main:
    io.write_json_atomic(os.path.join(workdir, "results.json"), figure)
  return figure
