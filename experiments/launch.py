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
  """The test accuracy-by-DP table (one column per variant) and where results are."""
  if "variants" in results:
    curves = {name: v["test_accuracy_by_dp"] for name, v in results["variants"].items()}
    means = {name: v["mean_test_accuracy"] for name, v in results["variants"].items()}
    bn_mode = "/".join(sorted({v["bn_mode"] for v in results["variants"].values()}))
  else:
    curves = {results["model"]["name"]: results["test_accuracy_by_dp"]}
    means = {results["model"]["name"]: results["mean_test_accuracy"]}
    bn_mode = results["bn_mode"]
  mean_row = "mean  " + "  ".join(f"{100 * m:12.2f}" for m in means.values())
  return (f"Test accuracy (%) by DP, {bn_mode} batch-norm statistics:\n"
          f"{plots.format_accuracy_table(curves)}\n{mean_row}\n"
          f"Results: {workdir}/results.json, plot: {workdir}/accuracy_by_dp.png")

