"""What every absl launcher shares: flags, logging, multi-host start-up."""

from __future__ import annotations

import json
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (one process per host).")
  flags.mark_flags_as_required(["config", "workdir"])


def run(argv, train_and_evaluate: Callable) -> dict:
  """Logs the config, starts multi-host JAX if asked, runs, prints the headline."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.info("JAX devices: %s", jax.devices())
  logging.info("Config:\n%s", FLAGS.config)
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  headline = {k: v for k, v in results.items()
              if k in ("test_accuracy", "mean_test_accuracy", "test_accuracy_by_dp", "bn_mode")}
  print(json.dumps(headline, indent=1))
  return results

