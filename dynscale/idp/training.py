"""Train at one DP, evaluate across DPs: the baseline and the original IDP recipe.

001 §IV: a network is trained at 100% DP with its profile (all-one for the
standard network), then evaluated at DP 10%, ..., 100%. Early stopping and
the state kept read validation at ``train.dp`` with the batch-norm
statistics of ``eval.bn_mode``.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from dynscale.idp import checks, evaluation
from dynscale.nn import costs
from dynscale.train import runs, steps, validation
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.optim import make_optimizer
from dynscale.train.state import create_train_state


def check_config(config: ml_collections.ConfigDict) -> None:
  """The core blocks, ``train.dp``, the ``eval`` block, and a network of one profile."""
  validation.check_core(config)
  checks.dp(config.train.dp, "train.dp")
  checks.check_eval(config.eval)
  arch = runs.planned_architecture(config)
  if arch["profiles"] is not None:
    raise ValueError(f"{runs.architecture_field(config)}: IDP trains one profile; the "
                     f"network has MP-IDP's profiles {arch['profiles']} (method 'mpidp' "
                     f"trains them)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.model`` at ``config.train.dp``; writes and returns results."""
  run = runs.start(config, workdir, check=check_config)
  tx = make_optimizer(config.optimizer, runs.total_steps(run))
  graphdef, state = create_train_state(run.model, tx)
  trainer = runs.make_trainer(run, graphdef, tx, steps.classification_loss)
  patience = config.train.patience
  fit = trainer.fit(
      trainer.place(state), task=jnp.float32(config.train.dp),
      num_epochs=config.train.num_epochs, stage="train", checkpoint_dir=run.checkpoint_dir,
      writer=run.writer, early_stopping=EarlyStopping(patience) if patience else None,
      validate=evaluation.validation_at(config.eval, trainer, config.train.dp))
  report = evaluation.test_report(config.eval, trainer, fit.best_state)
  dp = config.train.dp
  at_dp = evaluation.state_at(config.eval, trainer, fit.best_state, dp)
  return runs.finish(run, graphdef, fit.best_state, {
      **report,
      "test_accuracy": trainer.evaluate(at_dp, "test", jnp.float32(dp))["accuracy"],
      "val_accuracy": trainer.evaluate(at_dp, "val", jnp.float32(dp))["accuracy"],
      "flops": costs.flops(run.arch, dp),  # of the network at train.dp (a plain one: all)
      "epochs_run": fit.epochs,  # the stage's, resumed epochs included
      "steps": int(fit.state.step),
  })
