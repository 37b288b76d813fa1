"""Train at one DP, evaluate across DPs: the baseline and the original IDP recipe.

001 §IV: a network is trained at 100% DP with its profile (all-one for the
standard network), then evaluated at DP 10%, ..., 100%.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
from absl import logging

from dynscale import plots
from dynscale.train import evaluation, runs, steps
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.optim import make_optimizer
from dynscale.train.state import create_train_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.model`` at ``config.train.dp``; writes and returns results."""
  run = runs.start(config, workdir)
  tx = make_optimizer(config.optimizer, runs.total_steps(run))
  graphdef, state = create_train_state(run.model, tx)
  trainer = runs.make_trainer(run, graphdef, tx, steps.classification_loss)
  patience = config.train.patience
  fit = trainer.fit(
      trainer.place(state), task=jnp.float32(config.train.dp),
      num_epochs=config.train.num_epochs, stage="train", checkpoint_dir=run.checkpoint_dir,
      writer=run.writer, early_stopping=EarlyStopping(patience) if patience else None)
  by_dp = evaluation.accuracy_by_dp(run, trainer, fit.best_state, "test")
  label = f"{config.model.name} {config.model.profile} ({config.eval.bn_mode} BN)"
  logging.info("Test accuracy by DP:\n%s", plots.format_accuracy_table({label: by_dp}))
  if run.is_main_process:
    plots.plot_accuracy_by_dp({label: by_dp}, os.path.join(run.workdir, "accuracy_by_dp.png"),
                              title=f"{config.model.name} on {run.dataset.name}")
  dp = jnp.float32(config.train.dp)
  val = trainer.evaluate(fit.best_state, "val", dp)
  return runs.finish(run, {
      "test_accuracy_by_dp": by_dp,
      "mean_test_accuracy": sum(by_dp.values()) / len(by_dp),
      "test_accuracy": trainer.evaluate(fit.best_state, "test", dp)["accuracy"],
      "val_accuracy": val["accuracy"],
      "bn_mode": config.eval.bn_mode,
      "epochs_run": fit.epochs_run,
      "steps": int(fit.state.step),
  })
