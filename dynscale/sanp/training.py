"""SANP training (paper 002 §4.1.2): pretrain, warm up the gates, fine-tune under a budget.

Three stages, each checkpointed and resumed by rerunning the same command:

1. ``pretrain``: the backbone alone (no gates), plain cross-entropy, for
   ``sanp.pretrain_epochs`` epochs; skipped when ``model.init_from`` names a
   trained backbone.
2. ``warmup``: gates (``sanp.variant``, :mod:`dynscale.sanp.gates`) are
   inserted after every convolution's batch norm; inserted, they leave the
   backbone's function unchanged. For ``sanp.warmup_epochs`` epochs only the
   gates learn, from the classification loss; the convolutions and batch
   norm parameters stay fixed.
   With ``sanp.gate_start='fixed_k'`` (not in the paper) the SPMs warm
   up as FIXED-K's at the budget (each keeps its ``k`` most salient
   channels), so their saliencies learn to rank the channels while the
   network already runs at the budget; then :func:`hand_off` moves each
   binarized gate's decision point to the saliency that opens FIXED-K's
   fraction of its layer's (image, channel) entries over calibration
   batches (:func:`dynscale.sanp.gates.decision_point`), and the fine-tune
   starts at the budget's
   FLOPs with FIXED-K's accuracy instead of at the full network with every
   gate at the same saliency (``'open'``, the paper's ``s = 1``).
3. ``finetune``: everything learns from Eq. 9's ``CE + lambda L_cost`` for
   ``train.num_epochs`` epochs. ``lambda`` is Eq. 10 with ``p_t`` the mean
   FLOPs of the last ``sanp.flops_window`` training batches with the gates
   deciding as at inference (noisy training codes misread the cost the
   network will have). Eq. 10 is a proportional controller: it settles
   where ``lambda0 (p_t - p)`` balances the classification loss, off the
   budget. ``sanp.integral_rate > 0`` (not in the paper) adds the running
   sum of ``integral_rate (p_t - p)`` over steps, which keeps moving lambda
   until the error is gone. FIXED-K has no cost term: its ``k`` holds the budget.

Both gated stages keep the batch-norm running statistics those of the
network inference runs (:func:`sanp_loss`).

The run reports what the test split costs and how it is gated: accuracy,
mean FLOPs per image as a fraction of the backbone's (``flops_ratio``), its
spread over images (``flops_ratio_std``), the fraction of images for which
some gated layer is entirely off (``dead_layer_rate``), and the analyses of
:mod:`dynscale.sanp.analysis`. Model selection reads the validation split
only.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from dynscale.nn import costs, layers, models
from dynscale.sanp import analysis, budget, gates, objective
from dynscale.train import protocols, runs, steps, validation


CONFIG_BLOCKS = ("sanp",)
"""The config blocks SANP reads beyond the core ones (a resumed run is checked on them)."""
GATE_STARTS = ("open", "fixed_k")
"""``sanp.gate_start``: the paper's gates open at ``s = 1``, or warmed up as
FIXED-K's and handed off at the budget (:func:`hand_off`)."""
FLOPS_STATISTICS = ("batch", "running")
"""``sanp.flops_statistics``: how Eq. 10's ``p_t`` is measured, under the measuring
forward's batch statistics or in evaluation mode under the running ones (:func:`sanp_loss`)."""


class FlopsWindow(nnx.Variable):
  """The evaluation-mode FLOPs fractions of the last N training batches (Eq. 10's p_t)."""


class CostIntegral(nnx.Variable):
  """The running sum ``sum_t rate (p_t - p)`` of ``sanp.integral_rate``'s term of lambda."""


class CostSteps(nnx.Variable):
  """Fine-tune steps taken under the cost loss (for the budget ramp)."""


def handed_off(s: ml_collections.ConfigDict) -> bool:
  """Whether the binarized gates of the ``sanp`` block ``s`` start from a FIXED-K
  warm-up (``gate_start='fixed_k'``; FIXED-K itself has nothing to hand off)."""
  return s.gate_start == "fixed_k" and s.variant != "fixed_k"


def binarization(config) -> gates.Binarization:
  return gates.Binarization(**config.sanp.binarization.to_dict())


def check_config(config: ml_collections.ConfigDict) -> None:
  """The core blocks and ``sanp``; every error names its field, before any compute."""
  validation.check_core(config)
  validation.needs_validation(config, "SANP reports the validation split's FLOPs beside "
                              "the test split's (the budget is read on it)")
  s = config.sanp
  validation.one_of(s.variant, gates.VARIANTS, "sanp.variant")
  budget.check_budget(s.budget)
  validation.non_negative(s.lambda0, "sanp.lambda0")
  validation.one_of(s.cost, objective.COSTS, "sanp.cost")
  validation.one_of(s.code, objective.CODES, "sanp.code")
  if s.code == "saliency" and s.cost == "flops":
    raise ValueError("sanp.code='saliency' (Eq. 9's L1 of s, unbounded) needs sanp.cost "
                     "'filters' or 'layers': the FLOPs formula reads each code as an activity "
                     "in [0, 1] (a residual add takes a + b - ab), got sanp.cost='flops'")
  validation.positive(s.flops_window, "sanp.flops_window", integer=True)
  validation.non_negative(s.integral_rate, "sanp.integral_rate")
  validation.positive(s.reduction, "sanp.reduction", integer=True)
  validation.non_negative_int(s.floor, "sanp.floor")
  gates.check_floor_fraction(s.floor_fraction)
  validation.non_negative_int(s.pretrain_epochs, "sanp.pretrain_epochs")
  validation.non_negative_int(s.warmup_epochs, "sanp.warmup_epochs")
  validation.non_negative_int(s.budget_ramp_epochs, "sanp.budget_ramp_epochs")
  validation.one_of(s.gate_start, GATE_STARTS, "sanp.gate_start")
  validation.positive(s.calibration_batches, "sanp.calibration_batches", integer=True)
  validation.one_of(s.decision_point, gates.DECISION_POINTS, "sanp.decision_point")
  validation.one_of(s.flops_statistics, FLOPS_STATISTICS, "sanp.flops_statistics")
  if handed_off(s) and not s.warmup_epochs:
    raise ValueError(f"sanp.gate_start='fixed_k' hands FIXED-K's warmed-up saliencies to "
                     f"the {s.variant!r} gates: it needs sanp.warmup_epochs > 0, got "
                     f"{s.warmup_epochs}")
  binarization(config)  # raises naming the binarization field
  backbone = runs.planned_architecture(config)
  points = layers.gate_points(backbone)
  if not points:
    raise ValueError(f"{runs.architecture_field(config)}: SANP gates a network's "
                     f"convolutions, and {backbone['name']!r} has none")
  narrowest = min(p.outputs for p in points.values())
  if s.reduction > narrowest:
    raise ValueError(f"sanp.reduction must be in [1, {narrowest}] (the narrowest gated "
                     f"layer's channels), got {s.reduction}")
  if s.floor > narrowest:
    raise ValueError(f"sanp.floor must be at most {narrowest} (the narrowest gated layer's "
                     f"channels), got {s.floor}")


def gate_factory(config, arch: dict) -> gates.GateFactory:
  """The ``sanp`` block's gates for :func:`dynscale.nn.models.build` (FIXED-K's k
  solved for the budget)."""
  s = config.sanp
  keep = (budget.fixed_k_keep(arch, s.budget) if s.variant == "fixed_k" or s.floor_fraction
          else None)
  return gates.gate_factory(s.variant, reduction=s.reduction, binarization=binarization(config),
                            keep=keep, floor=s.floor, floor_fraction=s.floor_fraction,
                            decision_point=s.decision_point)


def gated_model(config, arch: dict, backbone: nnx.Module, variant: str = "") -> nnx.Module:
  """``backbone`` with the gates of ``variant`` (default ``sanp.variant``) at every
  gate point (same layer variables)."""
  if variant:
    config = ml_collections.ConfigDict(config.to_dict())
    config.sanp.variant = variant
  model = models.build(arch, rngs=models.init_rngs(config.seed), dtype=runs.compute_dtype(config),
                       gate=gate_factory(config, arch))
  nnx.update(model.layers, nnx.state(backbone.layers))
  model.flops_window = FlopsWindow(jnp.ones((config.sanp.flops_window,), jnp.float32))
  model.cost_integral = CostIntegral(jnp.zeros((), jnp.float32))
  model.cost_steps = CostSteps(jnp.zeros((), jnp.float32))
  return model


def ramped_budget(final: float, step, ramp_steps: int):
  """The budget after ``step`` steps of a linear ramp from the full network (1.0)
  down to ``final`` over ``ramp_steps`` steps (``final`` at once when 0)."""
  if not ramp_steps:
    return final
  return final + (1.0 - final) * jnp.maximum(0.0, 1.0 - step / ramp_steps)


@contextlib.contextmanager
def running_statistics_kept(model: nnx.Module):
  """Within the block, train-mode forwards of ``model`` leave its batch-norm
  running statistics as they were."""
  statistics = nnx.state(model.layers, nnx.BatchStat)
  before = statistics.to_pure_dict()
  try:
    yield
  finally:
    statistics.replace_by_pure_dict(before)
    nnx.update(model.layers, statistics)


def _sown(intermediates: nnx.State, name: str) -> dict[str, jax.Array]:
  """``{gate name: (B, C)}``: the gates' ``name`` (``'saliency_out'`` or
  ``'relaxed_out'``) that the train-mode forward sowed (its last call)."""
  return {gate: values[name][-1]
          for gate, values in intermediates.to_pure_dict()["gates"].items()}


def _codes(intermediates: nnx.State, code: str) -> dict[str, jax.Array]:
  """The cost loss's codes (``sanp.code``): relaxed codes, or ``|s|``."""
  if code == "relaxed":
    return _sown(intermediates, "relaxed_out")
  return {name: jnp.abs(s) for name, s in _sown(intermediates, "saliency_out").items()}


def sanp_loss(arch: dict, config, *, penalised: bool, ramp_steps: int = 0) -> steps.LossFn:
  """Eq. 9-10: ``CE + lambda L_cost`` (``lambda = 0`` unless ``penalised``), the
  budget ramped down from 1.0 over ``ramp_steps`` steps (:func:`ramped_budget`).

  Two forwards of the batch in train mode (batch statistics):

  1. with the gates as in training (noise, the s1/s2 mix): the logits of the
     cross-entropy and the codes of the cost; the batch-norm running
     statistics it would update are put back;
  2. with the gates as in evaluation (:func:`dynscale.sanp.gates.
     set_deterministic`): it updates the running statistics, so that they
     describe the network inference will run (noisy codes scale the
     channels differently), and its FLOPs join the window of Eq. 10's
     ``p_t``. No gradient flows through it.
  3. with ``sanp.flops_statistics='running'`` (not the default), the batch
     once more in evaluation mode, the running statistics just updated:
     its FLOPs join the window instead, the cost inference will have (the
     gates read batch-normalised inputs, and batch statistics of augmented
     training images decide differently from the running ones).
  """
  s = config.sanp
  full = costs.flops(arch)
  lambda0 = s.lambda0 if penalised else 0.0

  def loss_fn(model, images, labels, task):
    del task
    with running_statistics_kept(model):
      trace = model.run(images, 1.0, train=True)
      codes = _codes(nnx.pop(model, nnx.Intermediate), s.code)
    gates.set_deterministic(model, True)
    measured = model.run(images, 1.0, train=True)
    gates.set_deterministic(model, False)
    if s.flops_statistics == "running":
      measured = model.run(images, 1.0, train=False)
    batch_flops = jax.lax.stop_gradient(
        jnp.mean(costs.sample_flops(arch, 1.0, measured.activity)) / full)
    window = jnp.concatenate([model.flops_window.value[1:], batch_flops[None]])
    model.flops_window.value = window
    ce = jnp.mean(steps.cross_entropy(trace.output, labels))
    target = ramped_budget(s.budget, model.cost_steps.value, ramp_steps)
    if penalised:
      model.cost_steps.value = model.cost_steps.value + 1
    lam = objective.cost_weight(jnp.mean(window), target, lambda0)
    if penalised and s.integral_rate:
      integral = model.cost_integral.value + objective.cost_weight(jnp.mean(window), target,
                                                                   s.integral_rate)
      model.cost_integral.value = integral
      lam = lam + integral
    cost = objective.cost_loss(arch, codes, s.cost)
    loss = ce + lam * cost
    return loss, {"loss": loss, "accuracy": steps.accuracy(trace.output, labels),
                  "cross_entropy": ce, "cost": cost, "lambda": lam, "budget": target,
                  "eval_flops_ratio": batch_flops}
  return loss_fn


def gated_forward(arch: dict) -> steps.ForwardFn:
  """Evaluation: logits, FLOPs per image as a fraction of the backbone's (and its
  square, for the spread), and whether some gated layer was entirely off."""
  full = costs.flops(arch)

  def forward(model, images, task):
    del task
    trace = model.run(images, 1.0, train=False)
    ratio = costs.sample_flops(arch, 1.0, trace.activity) / full
    dead = jnp.any(jnp.stack([jnp.all(a == 0, axis=-1) for a in trace.activity.values()]),
                   axis=0)
    return trace.output, {"flops_ratio": ratio, "flops_ratio_sq": ratio * ratio,
                          "dead_layer": dead.astype(jnp.float32)}
  return forward


def pretrain(run: runs.Run) -> None:
  """Stage 1: the backbone ``run.model`` alone, plain cross-entropy."""
  runs.fit_stage(run, run.model, runs.Stage("pretrain", run.config.sanp.pretrain_epochs, nnx.Param,
                                  steps.classification_loss, steps.eval_forward))


def warm_up(run: runs.Run, model: nnx.Module, epochs_before: int) -> runs.Fitted:
  """Stage 2: the gates of ``model`` alone learn; convolutions and batch-norm
  parameters stay as they are. It starts after ``epochs_before`` epochs of the run."""
  return runs.fit_stage(run, model, runs.Stage(
      "warmup", run.config.sanp.warmup_epochs, nnx.All(nnx.Param, nnx.PathContains("gates")),
      sanp_loss(run.arch, run.config, penalised=False), gated_forward(run.arch),
      epochs_before=epochs_before))


def hand_off(run: runs.Run, ranked: nnx.Module, model: nnx.Module, trainer) -> None:
  """``sanp.gate_start='fixed_k'``: gives the SPMs of ``model`` the warmed-up
  saliency heads of the FIXED-K network ``ranked`` (STATIC gates: each
  channel's mean saliency, the ``k`` highest open), and moves each one's
  decision point (:func:`dynscale.sanp.gates.decision_point`) to where it
  opens, over ``sanp.calibration_batches`` training batches, the fraction of
  channels FIXED-K keeps in that layer (:meth:`dynscale.sanp.gates.SPM.adopt`).
  The heads are re-expressed in decision units (``W2 / rho``,
  ``(b2 - tau) / rho``; ``s = tau + rho z`` is the saliency FIXED-K learned):
  the saliencies of a warm-up span a few hundredths,
  and learned in saliency units every step would move the decisions
  ``1 / rho`` times as far (a first run saturated most gates shut or open
  within 70 steps, and they stayed there: the saturating sigmoid has no
  gradient to reopen them). The saliencies are read from
  ``ranked`` (train-mode forwards; its running statistics are put back),
  whose gates decide as they did in the warm-up; ``model`` also takes its
  running statistics, estimated under those gates. Eq. 10's FLOPs window
  starts at what ``model`` then costs on those batches in evaluation."""
  s = run.config.sanp
  keep = budget.fixed_k_keep(run.arch, s.budget)
  batches = trainer.training_batches(s.calibration_batches)
  sown = {}
  with running_statistics_kept(ranked):
    for images in batches:
      ranked.run(images, 1.0, train=True)
      for name, saliency in _sown(nnx.pop(ranked, nnx.Intermediate), "saliency_out").items():
        sown.setdefault(name, []).append(saliency)
  nnx.update(model.layers, nnx.state(ranked.layers))
  for name, gate in model.gates.items():
    saliencies = jnp.concatenate(sown[name])
    channels = saliencies.shape[-1]
    gate.hand_off(ranked.gates[name], saliencies,
                  gates.kept_channels(keep, channels) / channels)
  forward = gated_forward(run.arch)
  ratio = jnp.mean(jnp.stack([jnp.mean(forward(model, images, None)[1]["flops_ratio"])
                              for images in batches]))
  model.flops_window.value = jnp.full_like(model.flops_window.value, ratio)
  logging.info("Gates handed off from FIXED-K (keep %.3f): %.3f of the FLOPs in evaluation "
               "on %d training batches", keep, float(ratio), len(batches))


def fine_tune(run: runs.Run, model: nnx.Module, epochs_before: int) -> runs.Fitted:
  """Stage 3: everything learns under Eq. 9-10; hands on the final state (the best
  validation accuracy is often an early epoch still over budget). It starts
  after ``epochs_before`` epochs of the run."""
  return runs.fit_stage(run, model, runs.Stage(
      "finetune", run.config.train.num_epochs, nnx.Param,
      sanp_loss(run.arch, run.config, penalised=run.config.sanp.variant != "fixed_k",
                ramp_steps=run.config.sanp.budget_ramp_epochs * runs.total_steps(run, 1)),
      gated_forward(run.arch), keep="final", epochs_before=epochs_before))


def run_stages(run: runs.Run) -> tuple[nnx.Module, runs.Fitted]:
  """The three stages (each resumed from its checkpoint; each reads the data
  order of the run's epochs after the earlier stages', the warm-up after
  ``sanp.pretrain_epochs`` also when the backbone comes from another run,
  ``model.init_from``, e.g. the figure's ``backbone`` variant of the same
  seed); the gated model in its final state, and the fine-tune's outcome."""
  s = run.config.sanp
  if not run.init_from and s.pretrain_epochs:
    pretrain(run)
  spent = s.pretrain_epochs  # the backbone's epochs, here or in the run it came from
  model = gated_model(run.config, run.arch, run.model)
  if handed_off(s):
    ranked = gated_model(run.config, run.arch, run.model, variant="fixed_k")
    warmed = warm_up(run, ranked, spent)
    hand_off(run, ranked, model, warmed.trainer)
    spent += warmed.epochs
  elif s.warmup_epochs:
    spent += warm_up(run, model, spent).epochs
  return model, fine_tune(run, model, spent)


def _spread(metrics: dict) -> float:
  """Standard deviation over images of the FLOPs ratio, from an evaluation's
  mean ratio and mean squared ratio."""
  return float(max(0.0, metrics["flops_ratio_sq"] - metrics["flops_ratio"] ** 2) ** 0.5)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the three stages of ``config``; writes and returns results."""
  run = runs.start(config, workdir, check=check_config, blocks=CONFIG_BLOCKS)
  s = config.sanp
  model, tuned = run_stages(run)
  test = tuned.trainer.evaluate(tuned.state, "test", jnp.float32(1.0))
  val = tuned.trainer.evaluate(tuned.state, "val", jnp.float32(1.0))
  usage = analysis.channel_usage(model, run.dataset, "test", config.data.eval_batch_size)
  analysis.plot(usage, run.workdir, runs.title("sanp", run.arch["name"], run.dataset.name,
                                               protocols.name_of(config)))
  return runs.finish(run, tuned.graphdef, tuned.state, {
      "variant": s.variant,
      "budget": s.budget,
      "test_accuracy": test["accuracy"],
      "val_accuracy": val["accuracy"],
      "flops_ratio": test["flops_ratio"],
      "flops_ratio_std": _spread(test),
      "dead_layer_rate": test["dead_layer"],
      "val_flops_ratio": val["flops_ratio"],
      "val_flops_ratio_std": _spread(val),
      "flops_full": costs.flops(run.arch),
      "gate_flops": 0 if s.variant == "static" else budget.spm_flops(run.arch, s.reduction),
      **analysis.summary(usage),
  })


def trained_model(config: ml_collections.ConfigDict, workdir: str) -> nnx.Module:
  """The gated network of the run of ``config`` in ``workdir``, in its final
  fine-tune state (the run's checkpoints are resumed, so an unfinished run
  is finished first). The export holds the backbone's layers only."""
  model, _ = run_stages(runs.start(config, workdir, check=check_config, blocks=CONFIG_BLOCKS))
  return model

