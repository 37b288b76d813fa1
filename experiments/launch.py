"""What every absl launcher shares: flags, logging, multi-host start-up."""

from __future__ import annotations

from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dynscale import plots
from dynscale.train import sweep

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (one process per host).")
  flags.mark_flags_as_required(["config", "workdir"])


def dispatch(methods: dict[str, sweep.Method]) -> Callable:
  """``train_and_evaluate(config, workdir)`` over ``config.method`` or a figure's variants."""

  def train_and_evaluate(config, workdir):
    if config.get("variants"):
      return sweep.run_variants(config, workdir, methods)
    if config.method not in methods:
      raise ValueError(f"method must be one of {tuple(methods)}, got {config.method!r}")
    return methods[config.method].train_and_evaluate(config, workdir)

  return train_and_evaluate


def run(argv, train_and_evaluate: Callable) -> dict:
  """Logs the config, starts multi-host JAX if asked, runs, prints the headline."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.info("JAX devices: %s", jax.devices())
  logging.info("Config:\n%s", FLAGS.config)
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(summary(results, FLAGS.workdir))
  return results


def summary(results: dict, workdir: str) -> str:
  """Every curve as a table (one column per run or variant), each run's scalar
  results, and where the files are."""
  by_label = (results["variants"] if "variants" in results
              else {results["config"]["method"]: sweep.variant_summary(results)})
  parts = [f"{name} ({plots.axes(curves)[1]}):\n{plots.format_curves_table(curves)}"
           for name, curves in sweep.curves_by_name(by_label).items()]
  for label, entry in by_label.items():
    scalars = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in entry.items() if k != "curves")
    parts.append(f"{label}: {scalars}")
  parts.append(f"Results: {workdir}/results.json; plots: {workdir}/<curve name>.png")
  return "\n\n".join(parts)
