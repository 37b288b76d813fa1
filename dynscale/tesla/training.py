"""TESLA and R-TESLA training (000 Algorithms 1-2), with optional ATP (§3.4).

Each stage optimises the aggregated objective ``sum_k c_k L_k`` (Eq. 3) with
the sliced multi-task loss of :mod:`dynscale.tesla.multitask`: the
coefficient vector is the step's task argument, so all stages share one
executable. Algorithm 1 optimises ``L_i^obj`` "until meeting early stopping
criteria": a stage runs until its validation score has not improved for
``train.patience`` epochs (never the test split); its best-validation state
is kept and the next stage starts from it. Validation reads the batch-norm
statistics the test report reads (``eval.bn_mode``): with ``recalibrated``,
each task's accuracy comes from statistics recalibrated at its DP, so that a
low-DP task the running statistics put at chance can still count.
``schedule.monitor`` says which score (:func:`stage_validation`):

* ``'objective'`` (default): the stage's objective on the validation split,
  every active task's accuracy weighted by its Eq. 3 coefficient;
* ``'newest_task'``: the accuracy at the newest task's DP alone.

``schedule.selection`` says which state the run reports and exports:

* ``'final'`` (default): the state the schedule ends with, the last stage's
  best-validation state, as Algorithms 1-2 return it;
* ``'best_mean'``: across the whole run (every epoch of every stage), the
  state with the best mean validation accuracy over all tasks
  (:class:`RunBest`). 000 §3.3 notes that R-TESLA's random order may leave
  the final model without the best representation; this reading keeps the
  best one seen, by validation only. The results then also hold the final
  state's reading (curve ``test_accuracy_by_dp_final_state``), so one run
  gives both.

* ``schedule.name='tesla'``: tasks in decreasing DP, one stage per task.
* ``schedule.name='rtesla'``: after the first task, each stage's task is
  sampled from ``schedule.distribution`` until ``schedule.epoch_budget``
  epochs are spent. A stage ends at its early stopping (Algorithm 2) or,
  with ``schedule.stage_epochs`` > 0, after that many epochs, whichever
  comes first.
* ``cam.enabled``: after training, class activation maps of a few test
  images at ``cam.dps`` are saved as ``cam.png`` (a GAP model such as
  ``vgg16_gap``; 000 §4.2), each DP with the batch-norm statistics of
  ``eval.bn_mode``, and the class each map shows is recorded as
  ``cam_predictions``.
* ``atp.enabled``: the profiles start at one and are trained too, alternating
  with the weights every ``atp.period_steps`` steps, and projected back to a
  non-increasing sequence (``atp.projection``: the paper's clip or the exact
  isotonic projection) after every profile update.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from dynscale import cam, data
from dynscale.data.datasets import dataset_spec
from dynscale.nn import layers, sliced
from dynscale.idp import checks, evaluation
from dynscale.tesla import atp, multitask, schedules
from dynscale.train import runs, steps, validation
from dynscale.train.checkpoint import Checkpoints
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.optim import make_optimizer
from dynscale.train.state import TrainState, create_train_state

CONFIG_BLOCKS = ("schedule", "atp", "distill", "cam")
"""The config blocks TESLA reads beyond the core ones (a resumed run is checked on them)."""
SCHEDULES = ("tesla", "rtesla")
MONITORS = ("objective", "newest_task")
SELECTIONS = ("final", "best_mean")
FINAL_STATE_CURVE = f"{evaluation.CURVE}_final_state"
CAM_MODELS = ("vgg16_gap", "mobilenet")


def check_config(config) -> None:
  """The core blocks, the ``eval`` block, ``schedule``, ``atp``, ``cam`` and ``distill``."""
  validation.check_core(config)
  checks.check_eval(config.eval)
  s = config.schedule
  validation.one_of(s.name, SCHEDULES, "schedule.name")
  validation.one_of(s.monitor, MONITORS, "schedule.monitor")
  validation.one_of(s.selection, SELECTIONS, "schedule.selection")
  schedules.check_tasks(s.tasks, decreasing=s.name == "tesla", name="schedule.tasks")
  schedules.check_alpha(s.alpha, name="schedule.alpha")
  validation.non_negative_int(s.stage_epochs, "schedule.stage_epochs")
  if s.name == "rtesla":
    validation.positive(s.epoch_budget, "schedule.epoch_budget", integer=True)
    schedules.task_probabilities(s.distribution, len(s.tasks), name="schedule.distribution")
  if config.train.patience < 1:
    raise ValueError(f"train.patience must be >= 1 for TESLA's task-wise early stopping, "
                     f"got {config.train.patience}")
  arch, field = runs.planned_architecture(config), runs.architecture_field(config)
  if arch["profiles"] is not None:
    raise ValueError(f"{field}: TESLA trains one profile; the network has MP-IDP's "
                     f"profiles {arch['profiles']} (method 'mpidp' trains them)")
  if config.atp.enabled:
    validation.one_of(config.atp.projection, tuple(atp.PROJECTIONS), "atp.projection")
    validation.positive(config.atp.period_steps, "atp.period_steps", integer=True)
    validation.positive(config.atp.learning_rate, "atp.learning_rate")
    if config.model.init_from:
      check_starts_at_one(config.model.init_from)
    else:
      validation.one_of(config.model.profile, ("all-one",), "model.profile (ATP starts at one)")
  if config.cam.enabled:
    if not config.model.init_from:
      validation.one_of(config.model.name, CAM_MODELS, "model.name (CAM needs a GAP head)")
    try:
      cam.classifier_index(arch)
    except ValueError as error:
      raise ValueError(f"{field}: CAM needs a GAP head: {error}") from error
    checks.dp_list(config.cam.dps, "cam.dps")
    validation.positive(config.cam.num_images, "cam.num_images", integer=True)
  validation.non_negative(config.distill.weight, "distill.weight")
  validation.positive(config.distill.temperature, "distill.temperature")
  if config.distill.weight > 0 and s.alpha == 1:
    raise ValueError("distill.weight > 0 needs schedule.alpha < 1: with alpha 1 each stage "
                     "trains its newest task alone, so the teacher (the first task) never "
                     "trains beside another, got schedule.alpha 1")


def check_starts_at_one(init_from: str) -> None:
  """Raises, naming ``model.init_from``, unless every profile coefficient of
  the exported network it names is one: ATP starts from the all-one profile
  (000 §3.4), and a network's profiles come with its export."""
  exported = sliced.load(validation.exported_network(init_from))
  for path, leaf in jax.tree_util.tree_leaves_with_path(exported.variables):
    name = str(getattr(path[-1], "key", path[-1]))
    if name.endswith("gamma") and not np.all(np.asarray(leaf) == 1):
      raise ValueError(f"model.init_from: ATP starts from the all-one profile; the network "
                       f"in {init_from!r} has {jax.tree_util.keystr(path)} = "
                       f"{np.round(np.asarray(leaf)[:4], 3).tolist()}...")


# What ATP trains: the weights and every profile.
ATP_TRAINABLE = nnx.Any(nnx.Param, layers.Profile)


def profile_mask(model: nnx.Module) -> dict:
  """Bool tree over the variables ATP trains: True for every profile.

  Profiles are found by type (:class:`dynscale.nn.layers.Profile`), so every
  kind's profiles are covered whatever their names (``gamma``, a separable
  block's ``depthwise_gamma``, ...).
  """
  state = nnx.state(model, ATP_TRAINABLE)
  return nnx.State(jax.tree.map(lambda v: isinstance(v, layers.Profile), state,
                                is_leaf=lambda v: isinstance(v, nnx.Variable))).to_pure_dict()


def optimizer(config, total_steps: int, model: nnx.Module) -> optax.GradientTransformation:
  """The weights' optimizer, or ATP's alternation of weights and ``model``'s
  profiles, the weights' learning-rate schedule then counting the run's weight
  steps (every other period), so that it ends with the run."""
  if not config.atp.enabled:
    return make_optimizer(config.optimizer, total_steps)
  period = config.atp.period_steps
  weights = make_optimizer(config.optimizer, atp.steps_in_phase(total_steps, period, 0))
  return atp.alternating(weights, optax.adam(config.atp.learning_rate),
                         period=period, is_profile=profile_mask(model),
                         method=config.atp.projection)


def stage_plan(config):
  """The stages in order: a finite tuple (TESLA) or an endless iterator (R-TESLA)."""
  s = config.schedule
  if s.name == "tesla":
    return iter(schedules.tesla_stages(s.tasks, s.alpha))
  return schedules.rtesla_stages(s.tasks, s.alpha, s.distribution,
                             np.random.default_rng(config.seed))


def stage_validation(trainer, stage: schedules.Stage, tasks, monitor: str, eval_config):
  """What early stopping and model selection read in ``stage``: validation metrics of a state.

  ``'objective'``: ``sum_k c_k m_k`` over the tasks with ``c_k > 0``, where
  ``m_k`` is the validation accuracy (or loss) at task ``k``'s DP and ``c``
  the stage's Eq. 3 coefficients (they sum to one, so the loss is the
  validation value of ``L_i^obj``). ``'newest_task'``: the metrics at
  ``stage.dp``. Each ``m_k`` reads the statistics of ``eval_config.bn_mode``
  (:func:`dynscale.idp.evaluation.evaluate_at`).
  """
  if monitor == "newest_task":
    weights = {stage.dp: 1.0}
  else:
    weights = {dp: c for dp, c in zip(tasks, stage.coefficients) if c > 0}

  def validate(state) -> dict[str, float]:
    metrics = [evaluation.evaluate_at(eval_config, trainer, state, "val", dp) for dp in weights]
    return {key: sum(w * m[key] for w, m in zip(weights.values(), metrics))
            for key in ("accuracy", "loss")}

  return validate


def stage_trainer(trainer, tasks, stage: schedules.Stage, built: dict, **loss_options):
  """The trainer of ``stage``: ``trainer``, which skips inactive tasks at run time;
  on XLA:CPU, where that skip is slow and the run-time step computes every
  task (:mod:`dynscale.tesla.multitask`), one whose step leaves the stage's
  inactive tasks out, built once per set of active tasks (kept in ``built``).
  """
  if not steps.nested_control_flow_is_slow():
    return trainer
  if stage.active not in built:
    built[stage.active] = trainer.with_loss(multitask.sliced_loss(tasks, active=stage.active,
                                                                  **loss_options))
  return built[stage.active]


def mean_validation_accuracy(trainer, tasks, eval_config) -> Callable[[TrainState], float]:
  """The ``'best_mean'`` score of a state: ``(1/N) sum_k acc_val(d_k)`` over all N tasks.

  ``acc_val(d_k)``: accuracy on the validation split at task ``k``'s DP
  (never the test split), whether or not the task has been trained yet, with
  the statistics of ``eval_config.bn_mode``.
  """

  def score(state) -> float:
    return sum(evaluation.evaluate_at(eval_config, trainer, state, "val", dp)["accuracy"]
               for dp in tasks) / len(tasks)

  return score


class RunBest:
  """The state with the best :func:`mean_validation_accuracy` seen in a whole run.

  :meth:`observe` is called at every epoch end of every stage; a strictly
  better score replaces the kept state. It returns the score as
  ``run/mean_val_accuracy`` with the ``run_epoch`` (epochs counted over the
  whole run), which the stage logs with its epoch's line
  (:meth:`dynscale.train.loop.Trainer.fit`). With a ``checkpoint_dir`` the
  kept state and its ``meta`` (``stage``, ``epoch``, ``mean_val_accuracy``) are saved under
  ``<checkpoint_dir>/best-mean`` and restored on construction, so a resumed
  run keeps what it had found.
  """

  def __init__(self, score: Callable[[TrainState], float], checkpoint_dir: str | None,
               template: TrainState):
    self.score = score
    self.state, self.meta = None, None
    self.store = (None if checkpoint_dir is None else
                  Checkpoints(os.path.join(checkpoint_dir, "best-mean"), max_to_keep=1))
    restored = None if self.store is None else self.store.restore(template)
    if restored is not None:
      _, self.state, self.meta = restored

  def callback(self, stage: int, epochs_before: int) -> Callable[[int, TrainState], dict]:
    """``on_epoch_end`` for stage ``stage``, which starts after ``epochs_before`` epochs."""
    return lambda epoch, state: self.observe(stage, epochs_before + epoch, state)

  def observe(self, stage: int, run_epoch: int, state: TrainState) -> dict:
    """Scores ``state``, keeps it if it is the best so far; returns the metrics to log."""
    value = self.score(state)
    logged = {"run/mean_val_accuracy": value, "run_epoch": run_epoch}
    if self.meta is not None and value <= self.meta["mean_val_accuracy"]:
      return logged
    self.state = jax.tree.map(jnp.copy, state)
    self.meta = {"stage": stage, "epoch": run_epoch, "mean_val_accuracy": value}
    if self.store is not None:
      self.store.save(run_epoch, self.state, self.meta)
    return logged

  def close(self) -> None:
    if self.store is not None:
      self.store.close()


def selected(trainer, config, final: TrainState, run_best: RunBest | None,
             score: Callable[[TrainState], float]) -> tuple[TrainState, dict]:
  """The state ``schedule.selection`` picks, and its results fields.

  ``'final'``: ``final``, its test report and its ``mean_val_accuracy``
  (``score``). ``'best_mean'``: the kept state's test report, where it was
  found and its ``mean_val_accuracy``, next to the final state's curve
  (``test_accuracy_by_dp_final_state``) and mean validation and test
  accuracies.
  """
  if run_best is None:
    return final, {**evaluation.test_report(config.eval, trainer, final),
                   "mean_val_accuracy": score(final)}
  best = trainer.place(run_best.state)
  report = evaluation.test_report(config.eval, trainer, best)
  last = evaluation.test_report(config.eval, trainer, final)
  return best, {
      **report,
      "curves": {**report["curves"], FINAL_STATE_CURVE: last["curves"][evaluation.CURVE]},
      "selected_stage": run_best.meta["stage"], "selected_epoch": run_best.meta["epoch"],
      "mean_val_accuracy": run_best.meta["mean_val_accuracy"],
      "final_state_mean_val_accuracy": score(final),
      "final_state_mean_test_accuracy": last["mean_test_accuracy"],
  }


def learned_profiles(params, mask) -> dict[str, list[float]]:
  """Every profile of ATP's parameters (``mask``: :func:`profile_mask`), by variable path."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {jax.tree_util.keystr(path): [round(float(g), 5) for g in np.asarray(leaf)]
          for (path, leaf), is_profile in zip(leaves, jax.tree.leaves(mask)) if is_profile}


def save_cams(run: runs.Run, trainer, state) -> tuple[str, dict]:
  """Class activation maps of the first test images at ``cam.dps``, each DP read
  with the batch-norm statistics the test report reads there
  (:func:`dynscale.idp.evaluation.state_at`); returns the PNG path and DP ->
  logits of those images."""
  n, path = run.config.cam.num_images, os.path.join(run.workdir, "cam.png")
  stats = {dp: evaluation.state_at(run.config.eval, trainer, state, dp).model_state
           for dp in run.config.cam.dps}
  logits = cam.cam_figure(run.arch, sliced.merge_variables(state.params, state.model_state),
                          run.dataset.test_x[:n], run.config.cam.dps, path,
                          normalization=data.normalization_stats(run.dataset.name),
                          labels=run.dataset.test_y[:n], bn_stats_by_dp=stats,
                          class_names=dataset_spec(run.dataset.name).class_names)
  return path, logits


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the TESLA or R-TESLA schedule of ``config``; writes and returns results."""
  run = runs.start(config, workdir, check=check_config, blocks=CONFIG_BLOCKS)
  tasks = tuple(config.schedule.tasks)
  trainable = ATP_TRAINABLE if config.atp.enabled else nnx.Param
  budget = (config.schedule.epoch_budget if config.schedule.name == "rtesla"
            else config.train.num_epochs * len(tasks))
  tx = optimizer(config, runs.total_steps(run, budget), run.model)
  graphdef, state = create_train_state(run.model, tx, trainable)
  loss_options = dict(distill_weight=config.distill.weight,
                      temperature=config.distill.temperature)
  trainer = runs.make_trainer(run, graphdef, tx, multitask.sliced_loss(tasks, **loss_options),
                              trainable=trainable)
  stage_trainers = {}
  state = trainer.place(state)
  score = mean_validation_accuracy(trainer, tasks, config.eval)
  run_best = (RunBest(score, run.checkpoint_dir, state)
              if config.schedule.selection == "best_mean" else None)
  spent, history = 0, []
  for stage in stage_plan(config):
    limit = config.train.num_epochs
    if config.schedule.name == "rtesla":
      if spent >= budget:
        break
      limit = min(budget - spent, config.schedule.stage_epochs or budget)
    logging.info("Stage %d: task %d (DP %.2f), coefficients %s", stage.index, stage.task,
                 stage.dp, stage.coefficients)
    fit = stage_trainer(trainer, tasks, stage, stage_trainers, **loss_options).fit(
        state, task=jnp.asarray(stage.coefficients, jnp.float32),
        validate=stage_validation(trainer, stage, tasks, config.schedule.monitor, config.eval),
        num_epochs=limit,
        stage=f"stage{stage.index}", checkpoint_dir=run.checkpoint_dir,
        writer=run.writer, early_stopping=EarlyStopping(config.train.patience),
        on_epoch_end=run_best and run_best.callback(stage.index, spent), epochs_before=spent)
    spent += fit.epochs
    history.append({"stage": stage.index, "task_dp": stage.dp,
                    "coefficients": list(stage.coefficients), "epochs": fit.epochs,
                    "best_val_accuracy": fit.early_stopping.best})
    state = fit.best_state
  if run_best is not None:
    run_best.close()
  state, report = selected(trainer, config, state, run_best, score)
  extra = ({"learned_profiles": learned_profiles(state.params, profile_mask(run.model))}
           if config.atp.enabled else {})
  if config.cam.enabled and run.is_main_process:
    extra["cam"], logits = save_cams(run, trainer, state)
    extra["cam_predictions"] = {f"{dp:g}": np.asarray(jnp.argmax(l, -1)).tolist()
                                for dp, l in logits.items()}
  return runs.finish(run, graphdef, state, {
      **report,
      "schedule": config.schedule.name, "monitor": config.schedule.monitor,
      "selection": config.schedule.selection,
      "atp": bool(config.atp.enabled),
      "distillation": config.distill.weight > 0,
      "stages": history, "epochs": spent,
      **extra,
  })
