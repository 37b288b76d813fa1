"""Multiple-profile IDP (MP-IDP), 001 §III and Fig. 5.

Profiles cover consecutive DP ranges ``(lo_s, hi_s]`` and are trained stage by
stage: stage ``s`` trains profile ``s`` at ``dp = hi_s`` with its own first
and last layer, while every entry of the shared middle layers that an earlier
profile uses (the part computed at ``dp = lo_s``) stays frozen: its updates
are zeroed by an optax transformation after the optimizer (so momentum and
weight decay cannot move it either) and its batch-norm running statistics
are restored after each forward. At inference the DP picks the profile.
Each stage's early stopping and kept state read validation at ``hi_s`` with
the batch-norm statistics of ``eval.bn_mode``, as the test report does
(:func:`dynscale.idp.evaluation.validation_at`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from dynscale.data.datasets import dataset_spec
from dynscale.nn import models, sliced, spec
from dynscale.idp import checks, evaluation
from dynscale.train import runs, steps, validation
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.optim import make_optimizer
from dynscale.train.state import create_train_state


def used_entries(arch: dict, variables: dict, dp: float) -> dict:
  """Bool tree shaped like ``variables``: True where the sliced network at ``dp`` reads.

  The transpose (VJP) of :func:`dynscale.nn.sliced.slice_variables` applied to
  ones marks exactly the entries the slicing selects, whatever their layout.
  """
  floats = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), variables)
  taken, transpose = jax.vjp(lambda v: sliced.slice_variables(arch, v, dp), floats)
  (marks,) = transpose(jax.tree.map(jnp.ones_like, taken))
  return jax.tree.map(lambda m: m > 0, marks)


def frozen_entries(arch: dict, variables: dict, stage: int) -> dict:
  """Bool tree: True for the entries stage ``stage`` must not change.

  Shared layers: the entries profiles ``< stage`` use (those read at
  ``dp = lo_stage``). Per-profile first/last layers: every copy but
  ``stage``'s own.
  """
  ranges = arch["profiles"]
  lo = ranges[stage][0]
  frozen = (used_entries(arch, variables, lo) if lo > 0
            else jax.tree.map(lambda a: jnp.zeros(a.shape, bool), variables))
  layers = dict(frozen["layers"])
  for index in spec.separate_layers(arch):
    layers[index] = {s: jax.tree.map(lambda a, own=(s == stage): jnp.full(a.shape, not own),
                                     copy)
                     for s, copy in variables["layers"][index].items()}
  return {**frozen, "layers": layers}


def restrict(tree: dict, like: dict) -> dict:
  """The sub-tree of ``tree`` with the keys of ``like`` (nested dicts)."""
  return {k: restrict(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def freeze(frozen: dict) -> optax.GradientTransformation:
  """Zeroes the updates of the entries marked True in ``frozen`` (applied last)."""
  return optax.stateless(
      lambda updates, params=None: jax.tree.map(lambda u, f: jnp.where(f, 0, u), updates,
                                                frozen))


def stage_loss(profile_index: int, dp: float, frozen_stats: dict) -> steps.LossFn:
  """Cross-entropy of profile ``profile_index`` at the stage's static DP ``dp``;
  frozen statistics kept.

  The network is the sliced one (:func:`dynscale.nn.sliced.apply_sliced`):
  only the channels kept at ``dp`` are computed, so the 0-30% profile trains
  at about 0.3**2 of a full step. Its value, gradients and statistics are the
  masked network's at ``dp``; the loss's task argument is unused.
  """

  def loss_fn(model, images, labels, _):
    variables = model.pure_variables()
    before = sliced.bn_stats_of(variables)
    logits, after = sliced.apply_sliced(model.arch, variables, images, dp, train=True,
                                        bn_stats=before, profile_index=profile_index,
                                        dtype=model.dtype)
    nnx.update(model, nnx.State(jax.tree.map(lambda f, old, new: jnp.where(f, old, new),
                                             frozen_stats, before, after)))
    loss = jnp.mean(steps.cross_entropy(logits, labels))
    return loss, {"loss": loss, "accuracy": steps.accuracy(logits, labels)}

  return loss_fn


def profile_forward(ranges) -> steps.ForwardFn:
  """Eval forward for a traced DP: each profile's logits, the one whose range holds dp."""
  uppers = jnp.asarray([hi for _, hi in ranges], jnp.float32)

  def forward(model, images, dp):
    logits = jnp.stack([model(images, dp, train=False, profile_index=s)
                        for s in range(len(ranges))])
    chosen = jnp.argmax(uppers >= dp - 1e-9)  # the first range whose upper bound covers dp
    return logits[chosen]

  return forward


def check_config(config: ml_collections.ConfigDict) -> None:
  """The core blocks, the ``eval`` block, and ``model.mp_profiles`` with the
  architecture they give (unless the network comes from ``model.init_from``,
  whose architecture holds them): the ranges, and an IDP layer the profiles
  share (:func:`dynscale.nn.spec.validate_architecture`). Reads no data."""
  validation.check_core(config)
  checks.check_eval(config.eval)
  if config.model.init_from:
    return
  if not config.model.get("mp_profiles"):
    raise ValueError("model.mp_profiles must list the DP ranges of MP-IDP, e.g. "
                     "((0.0, 0.3), (0.3, 1.0))")
  dataset = dataset_spec(config.data.dataset)
  try:
    models.architecture(
        config.model.name, num_classes=dataset.num_classes, input_shape=dataset.image_shape,
        profile=config.model.profile, idp_layers=config.model.idp_layers,
        width_multiplier=config.model.width_multiplier, mp_profiles=config.model.mp_profiles)
  except ValueError as error:
    raise ValueError(f"model.mp_profiles on model.name={config.model.name!r}: {error}") from error


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the profiles of ``config.model.mp_profiles`` in turn; writes results."""
  run = runs.start(config, workdir, check=check_config)
  arch = run.arch
  ranges = arch["profiles"]
  if not ranges:
    raise ValueError(f"model.init_from: the network in {run.init_from!r} has no MP-IDP "
                     "profiles (its architecture's 'profiles' is empty)")
  variables = run.model.pure_variables()
  state = None
  graphdef = None
  epochs_run = []
  for s, (lo, hi) in enumerate(ranges):
    frozen = frozen_entries(arch, variables, s)
    tx = optax.chain(make_optimizer(config.optimizer, runs.total_steps(run)), freeze(
        restrict(frozen, nnx.state(run.model, nnx.Param).to_pure_dict())))
    frozen_stats = restrict(frozen, nnx.state(run.model, nnx.BatchStat).to_pure_dict())
    if state is None:
      graphdef, state = create_train_state(run.model, tx)
    else:
      state = state.replace(opt_state=tx.init(state.params))
    trainer = runs.make_trainer(run, graphdef, tx, stage_loss(s, hi, frozen_stats),
                                profile_forward(ranges))
    patience = config.train.patience
    logging.info("MP-IDP profile %d: DP (%.2f, %.2f]", s, lo, hi)
    fit = trainer.fit(trainer.place(state), task=jnp.float32(hi),
                      num_epochs=config.train.num_epochs, stage=f"profile{s}",
                      checkpoint_dir=run.checkpoint_dir, writer=run.writer,
                      early_stopping=EarlyStopping(patience) if patience else None,
                      validate=evaluation.validation_at(config.eval, trainer, hi),
                      epochs_before=sum(epochs_run))
    state = fit.best_state
    epochs_run.append(fit.epochs)  # the profile's, resumed epochs included
  report = evaluation.test_report(config.eval, trainer, state)
  return runs.finish(run, graphdef, state, {
      **report,
      "profiles": [list(r) for r in ranges],
      "epochs_run": epochs_run,
  })
