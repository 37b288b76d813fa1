r"""The launcher: trains and evaluates the method ``config.method`` names.

python -m experiments.main --config=experiments/configs/tesla_main.py --workdir=runs/tesla
python -m experiments.main --config=experiments/configs/idp_fig8.py:vgg16 --workdir=runs/fig8-vgg16

A config with ``variants`` is a figure: each variant runs the method it
names (:mod:`dynscale.train.sweep`). A new method adds one entry to
``METHODS`` (a module with ``check_config`` and ``train_and_evaluate``) and a
config that names it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dynscale import host, plots
from dynscale.compactnet import training as compactnet_training
from dynscale.idp import mpidp, training as idp_training
from dynscale.sanp import training as sanp_training
from dynscale.tesla import training as tesla_training
from dynscale.train import runs, sweep

METHODS: dict[str, sweep.Method] = {
    "idp": idp_training,
    "mpidp": mpidp,
    "tesla": tesla_training,
    "sanp": sanp_training,
    "compactnet": compactnet_training,
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
  flags.DEFINE_list("variants", [],
                    "Of a figure, train only these variants (and those they start from), "
                    "writing no figure; a later run without the flag completes it.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (one process per host).")
  flags.DEFINE_string("compilation_cache", None,
                      "Directory of JAX's persistent compilation cache, shared by this run "
                      "and the processes it starts (default: <workdir>/compilation-cache, or "
                      "JAX_COMPILATION_CACHE_DIR when set; 'off': none).")
  flags.mark_flags_as_required(["config", "workdir"])


def train_and_evaluate(config, workdir: str, variants: Sequence[str] = ()) -> dict:
  """Runs ``config.method`` (or a figure's variants, or only ``variants`` of
  them) from ``METHODS``; returns the results."""
  if config.get("variants"):
    return sweep.run_variants(config, workdir, METHODS, only=variants)
  if variants:
    raise ValueError(f"--variants={','.join(variants)} needs a figure: this config has no variants")
  method = config.get("method")
  if method not in METHODS:
    raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
  return METHODS[method].train_and_evaluate(config, workdir)


def use_compilation_cache(directory: str | None, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache in ``directory`` (``None``:
  ``JAX_COMPILATION_CACHE_DIR`` if set, else ``<workdir>/compilation-cache``;
  ``'off'``: none) for this process and, through the environment, the
  processes it starts (CompactNet's measuring processes). A program compiled
  once is read back by a later stage, process or rerun: e.g. the original
  network in every measurement of a CompactNet run, and every program of a
  killed run resumed. Entries are keyed by the program, the compile options,
  the XLA flags and the jax version, so none is used in another's place.
  Returns the directory in use."""
  if directory == "off":
    return None
  directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      workdir, runs.COMPILATION_CACHE)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def summary(results: dict, workdir: str) -> str:
  """Every curve as a table (one column per run or variant), each run's scalar
  results, each variant's mean and spread over seeds, and where the files are."""
  by_label = (results["variants"] if "variants" in results
              else {results["config"]["method"]: sweep.variant_summary(results)})
  by_name = sweep.curves_by_name(by_label)
  parts = [f"{name} ({plots.axes(curves)[1]}):\n{plots.format_curves_table(curves)}"
           for name, curves in by_name.items()]
  for label, entry in by_label.items():
    scalars = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in entry.items() if k != "curves")
    parts.append(f"{label}: {scalars}")
  for name, group in results.get("by_variant", {}).items():
    spread = ", ".join(f"{key}={mean:.4f}±{group['std'][key]:.4f}"
                       for key, mean in group["mean"].items())
    parts.append(f"{name}, mean±std over seeds {sorted(group['by_seed'])}: {spread}")
  if results.get("partial"):
    parts.append(f"Results: {workdir}/<variant>/results.json (rerun without --variants "
                 f"for the figure)")
  else:
    plotted = "".join(f", {workdir}/{name}.png" for name in by_name)
    parts.append(f"Results: {workdir}/results.json{plotted}")
  return "\n\n".join(parts)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.multihost:
    jax.distributed.initialize()
  # before any XLA computation
  logging.info("Host: %s, %s", host.tune_allocator(), host.tune_xla_cpu())
  logging.info("Compilation cache: %s", use_compilation_cache(FLAGS.compilation_cache,
                                                              FLAGS.workdir))
  logging.info("JAX devices: %s", jax.devices())
  logging.info("Config:\n%s", FLAGS.config)
  print(summary(train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.variants), FLAGS.workdir))


if __name__ == "__main__":
  define_flags()
  app.run(main)
