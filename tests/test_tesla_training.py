"""TESLA training: sliced multi-task step = masked one, no recompilation
between stages, early stopping blind to the test split, a full schedule."""

import dataclasses
import itertools
import json

import jax
import PIL.Image
import matplotlib.image
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dynscale import data, tesla
from dynscale.idp import evaluation
from dynscale.data.pipeline import normalize
from dynscale.nn import batchnorm, models, sliced
from dynscale.tesla import multitask, training as tesla_training
from dynscale.train import loop, runs, steps, sweep
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.state import create_train_state, merge_model
from experiments import main as launcher
from experiments.configs import common, tesla_main, tesla_mlp_mnist, tesla_vgg16_cifar
from blind_selection import assert_fit_never_reads_the_test_split, val_accuracy_by_hand
from injected_kills import killed_at_checkpoint, logged_lines
from data_orders import recorded_orders

TASKS = (1.0, 0.5, 0.2)
SHARED = common.evaluation(bn_mode="shared")


# A small conv net with every IDP ingredient (conv, BN, pooling, flatten, IDP dense):
# it compiles in seconds where VGG-16 takes a minute on two cores.
TINY_CNN = {
    "name": "tiny_cnn", "input_shape": [8, 8, 3], "num_classes": 10, "profile": "linear",
    "layers": [
        {"kind": "conv", "features": 6},
        {"kind": "conv", "features": 8, "idp": True},
        {"kind": "maxpool", "window": 2},
        {"kind": "conv", "features": 8, "idp": True, "stride": 2},
        {"kind": "global_avgpool"},
        {"kind": "flatten"},
        {"kind": "dense", "features": 10, "idp": True},
    ],
}


def tiny(name, shape, width):
  arch = (TINY_CNN if name == "tiny_cnn" else
          models.architecture(name, num_classes=10, input_shape=shape, profile="linear",
                              width_multiplier=width))
  return arch, models.build(arch, rngs=models.init_rngs(0))


@pytest.mark.parametrize("name, shape, width", [
    ("tesla_mlp", (28, 28, 1), 0.1),
    ("tiny_cnn", (8, 8, 3), None),
    pytest.param("vgg16", (32, 32, 3), 1 / 16, marks=pytest.mark.slow),
])
def test_sliced_multitask_loss_and_gradients_equal_masked(name, shape, width):
  arch, model = tiny(name, shape, width)
  graphdef, state = create_train_state(model, optax.sgd(0.1))
  images = jax.random.normal(jax.random.key(1), (8, *shape))
  labels = jnp.arange(8) % 10
  coefficients = jnp.asarray(tesla.stage_coefficients(len(TASKS), len(TASKS) - 1, 0.5),
                             jnp.float32)
  assert np.all(np.asarray(coefficients) > 0)

  def objective(loss_fn):
    def f(params):
      m = merge_model(graphdef, params, state.model_state)
      loss, _ = loss_fn(m, images, labels, coefficients)
      return loss, nnx.state(m, nnx.BatchStat).to_pure_dict()
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (loss_s, stats_s), grads_s = objective(multitask.sliced_loss(TASKS))(state.params)
  (loss_m, stats_m), grads_m = objective(multitask.masked_loss(TASKS))(state.params)
  np.testing.assert_allclose(loss_s, loss_m, rtol=1e-5)
  # Sixteen batch-normalised layers: compare each gradient relative to its scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=1e-4 * np.abs(b).max()),
               grads_s, grads_m)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats_s, stats_m)


def test_a_stage_without_the_teacher_task_distills_nothing_on_every_path():
  """With ``c_0 = 0`` (Eq. 3 with alpha 1 after stage 0) the 100% task, the
  teacher, is not trained: the loss is the plain weighted cross-entropy
  whether inactive tasks are skipped (``lax.cond``, zero logits), computed
  and weighted by zero, or not computed (a CPU stage's active tasks). Catches
  the skip path distilling towards the zero logits of the skipped teacher,
  and the computed path distilling from a teacher it does not train."""
  _, model = tiny("tiny_cnn", None, None)
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  labels = jnp.arange(8) % 10
  c = jnp.asarray([0.0, 0.6, 0.4])
  options = dict(distill_weight=0.7, temperature=2.0)
  plain = multitask.sliced_loss(TASKS)(model, images, labels, c)[0]
  for loss in (multitask.sliced_loss(TASKS, skip_inactive=True, **options),
               multitask.sliced_loss(TASKS, skip_inactive=False, **options),
               multitask.sliced_loss(TASKS, active=(1, 2), **options)):
    np.testing.assert_allclose(loss(model, images, labels, c)[0], plain, rtol=1e-6)


def test_in_place_distillation_matches_each_task_to_the_full_network_by_hand():
  """``distill_weight`` w: each lower task adds ``w T^2 KL(p_100 || p_k)`` (the
  softened predictions of the first, 100% task as the target, no gradient into
  it) to its cross-entropy; written out here with NumPy for the value and with
  a stop-gradient on the masked network for the gradients."""
  _, model = tiny("tiny_cnn", None, None)
  graphdef, state = create_train_state(model, optax.sgd(0.1))
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  labels = jnp.arange(8) % 10
  c, w, t = jnp.asarray([0.5, 0.3, 0.2]), 0.7, 2.0

  def by_hand(m):
    logits = [m(images, dp, train=True) for dp in TASKS]
    target = jax.nn.softmax(jax.lax.stop_gradient(logits[0]) / t)
    total = 0.0
    for k, l in enumerate(logits):
      loss = jnp.mean(steps.cross_entropy(l, labels))
      if k > 0:
        kl = jnp.sum(target * (jnp.log(target) - jax.nn.log_softmax(l / t)), axis=-1)
        loss = loss + w * t**2 * jnp.mean(kl)
      total = total + c[k] * loss
    return total

  def gradient(loss_of_model):
    return jax.jit(jax.value_and_grad(lambda p: loss_of_model(
        merge_model(graphdef, p, state.model_state))))(state.params)

  value, grads = gradient(
      lambda m: multitask.sliced_loss(TASKS, distill_weight=w, temperature=t)(
          m, images, labels, c)[0])
  expected, expected_grads = gradient(by_hand)

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  logits = [np.asarray(model(images, dp, train=True), np.float64) for dp in TASKS]
  target, numpy_total = softmax(logits[0] / t), 0.0
  for k, l in enumerate(logits):
    loss = -np.mean(np.log(softmax(l)[np.arange(8), labels]))
    if k:
      loss += w * t**2 * np.mean(np.sum(target * np.log(target / softmax(l / t)), -1))
    numpy_total += float(c[k]) * loss
  np.testing.assert_allclose(value, numpy_total, rtol=1e-5)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=1e-5 * np.abs(b).max()),
               grads, expected_grads)


def test_each_task_reports_its_own_metrics_under_its_own_name():
  """Tasks 12.5% and 13% round to the same whole percent: named by it, one
  task's loss and accuracy overwrote the other's."""
  _, model = tiny("tiny_cnn", None, None)
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  labels = jnp.arange(8) % 10
  tasks = (1.0, 0.13, 0.125)
  for loss_fn in (multitask.sliced_loss(tasks), multitask.masked_loss(tasks)):
    _, metrics = loss_fn(model, images, labels, jnp.ones((3,), jnp.float32))
    assert sorted(k for k in metrics if k.startswith("loss_dp")) == [
        "loss_dp100", "loss_dp12.5", "loss_dp13"]
    for dp, name in zip(tasks, ("100", "13", "12.5")):
      logits = model(images, dp, train=True)  # batch statistics, as the loss computes
      assert float(metrics[f"accuracy_dp{name}"]) == float(steps.accuracy(logits, labels))


@pytest.mark.parametrize("skip_inactive, active", [(True, None), (False, None),
                                                    (False, (0,))])
def test_inactive_tasks_contribute_nothing(skip_inactive, active):
  """Stage 0 (only the 100% task) equals a plain step: gradients and BN statistics."""
  arch, model = tiny("tiny_cnn", None, None)
  graphdef, state = create_train_state(model, optax.sgd(0.1))
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  labels = jnp.arange(8) % 10
  first_stage = jnp.asarray([1.0, 0.0, 0.0], jnp.float32)
  loss_fn = multitask.sliced_loss(TASKS, skip_inactive=skip_inactive, active=active)

  def run(objective):
    def f(params):
      m = merge_model(graphdef, params, state.model_state)
      return objective(m), nnx.state(m, nnx.BatchStat).to_pure_dict()
    return jax.jit(jax.grad(f, has_aux=True))(state.params)

  g_multi, stats_multi = run(lambda m: loss_fn(m, images, labels, first_stage)[0])
  g_single, stats_single = run(
      lambda m: steps.classification_loss(m, images, labels, 1.0)[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_multi, g_single)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               stats_multi, stats_single)


@pytest.mark.parametrize("active", [(3,), (-1,), ()])
def test_sliced_loss_rejects_active_tasks_out_of_range(active):
  with pytest.raises(ValueError, match="active"):
    multitask.sliced_loss(TASKS, active=active)


def small_trainer(dataset, loss_fn, counter=None, arch=None):
  """A trainer of the ``tesla_mlp`` at width 0.1 (of ``arch`` when given) on ``dataset``."""
  if arch is None:
    arch, model = tiny("tesla_mlp", (28, 28, 1), 0.1)
  else:
    model = models.build(arch, rngs=models.init_rngs(0))
  tx = optax.adam(1e-3)
  graphdef, state = create_train_state(model, tx)

  def counted(*args):
    if counter is not None:
      counter.append(1)
    return loss_fn(*args)

  trainer = loop.Trainer(graphdef=graphdef, tx=tx, loss_fn=counted, forward=steps.eval_forward,
                         dataset=dataset, batch_size=50, eval_batch_size=250, augment=False,
                         seed=0, steps_per_chunk=10)
  return trainer, trainer.place(state)


def small_dataset():
  full = data.load("mnist_sample", val_size=250, seed=0)
  return dataclasses.replace(full, train_x=full.train_x[:500], train_y=full.train_y[:500])


def test_changing_stage_does_not_recompile():
  traces = []
  trainer, state = small_trainer(small_dataset(), multitask.sliced_loss(TASKS), traces)
  idx, key = next(trainer.epoch_chunks(0))
  for stage in tesla.tesla_stages(TASKS, 0.5):
    state, metrics = trainer.train_chunk(state, trainer.splits["train"], idx, key,
                                         jnp.asarray(stage.coefficients, jnp.float32))
  assert len(traces) == 1, f"traced {len(traces)} times for {len(TASKS)} stages"
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("monitor", tesla_training.MONITORS)
def test_early_stopping_and_model_selection_never_read_the_test_split(monitor):
  stage = tesla.tesla_stages(TASKS, 0.5)[1]

  def fit(dataset):
    trainer, state = small_trainer(dataset, multitask.sliced_loss(TASKS))
    return trainer, trainer.fit(
        state, task=jnp.asarray(stage.coefficients, jnp.float32),
        validate=tesla_training.stage_validation(trainer, stage, TASKS, monitor, SHARED),
        num_epochs=4, stage="stage1", early_stopping=EarlyStopping(1))
  assert_fit_never_reads_the_test_split(small_dataset(), fit)


def test_objective_monitor_is_the_coefficient_weighted_validation_score():
  trainer, state = small_trainer(small_dataset(), multitask.sliced_loss(TASKS))
  idx, key = next(trainer.epoch_chunks(0))
  state, _ = trainer.train_chunk(state, trainer.splits["train"], idx, key,
                                 jnp.asarray([1.0, 0.0, 0.0]))
  stage = tesla.tesla_stages(TASKS, 0.5)[2]  # Eq. 3: c = (1/4, 1/4, 1/2)
  per_task = [trainer.evaluate(state, "val", jnp.float32(dp)) for dp in TASKS]
  for key in ("accuracy", "loss"):
    expected = 0.25 * per_task[0][key] + 0.25 * per_task[1][key] + 0.5 * per_task[2][key]
    objective = tesla_training.stage_validation(trainer, stage, TASKS, "objective",
                                                SHARED)(state)
    assert objective[key] == pytest.approx(expected, rel=1e-6)
    newest = tesla_training.stage_validation(trainer, stage, TASKS, "newest_task",
                                             SHARED)(state)
    assert newest[key] == pytest.approx(per_task[2][key], rel=1e-6)
  assert per_task[0]["accuracy"] != per_task[2]["accuracy"], "tasks must differ for the check"


def test_validation_reads_the_statistics_the_report_reads():
  """With ``eval.bn_mode='recalibrated'`` every task's validation metrics come from
  statistics recalibrated at its DP (as computed by hand), not from the running
  ones, shifted here so far off that the two readings differ."""
  trainer, state = small_trainer(small_dataset(), multitask.sliced_loss(TASKS),
                                 arch={**TINY_CNN, "input_shape": [28, 28, 1]})
  for idx, key in trainer.epoch_chunks(0):
    state, _ = trainer.train_chunk(state, trainer.splits["train"], jnp.asarray(idx), key,
                                   jnp.asarray([1.0, 0.0, 0.0]))
  off = state.replace(model_state=jax.tree.map(lambda t: t + 3.0, state.model_state))
  recalibrated = common.evaluation(bn_mode="recalibrated")
  stage = tesla.tesla_stages(TASKS, 0.5)[2]
  by_hand = {dp: trainer.evaluate(evaluation.recalibrated_state(
      trainer, off, dp, recalibrated.recalibration_batches), "val", jnp.float32(dp))
      for dp in TASKS}
  got = tesla_training.stage_validation(trainer, stage, TASKS, "objective", recalibrated)(off)
  shared = tesla_training.stage_validation(trainer, stage, TASKS, "objective", SHARED)(off)
  for key in ("accuracy", "loss"):
    want = sum(c * by_hand[dp][key] for dp, c in zip(TASKS, stage.coefficients))
    assert got[key] == pytest.approx(want, rel=1e-6)
  assert abs(got["loss"] - shared["loss"]) > 0.1, "the two readings must differ for the check"
  score = tesla_training.mean_validation_accuracy(trainer, TASKS, recalibrated)(off)
  assert score == pytest.approx(np.mean([by_hand[dp]["accuracy"] for dp in TASKS]), rel=1e-6)


def assert_the_export_is_the_last_stages_best_state(workdir, config, results, logged):
  """Catches a stage handing on its last epoch's state instead of its best: the
  last stage ended on an epoch that scored below its best, and the exported
  network scores that best (its Eq. 3 objective on validation, by hand)."""
  last = results["stages"][-1]
  key = f"stage{last['stage']}/val_accuracy"
  scores = [line[key] for line in logged if key in line]
  assert scores[-1] < max(scores) == last["best_val_accuracy"], scores
  tasks = config.schedule.tasks
  accuracy = val_accuracy_by_hand(workdir / "export", tasks, config.data.val_size, config.seed)
  objective = sum(c * accuracy[dp] for dp, c in zip(tasks, last["coefficients"]) if c > 0)
  assert objective == pytest.approx(last["best_val_accuracy"], abs=1e-6)


@pytest.mark.parametrize("schedule, atp_enabled", [("tesla", False), ("rtesla", True)])
def test_schedule_runs_end_to_end_and_writes_results(tmp_path, schedule, atp_enabled):
  config = tesla_main.get_config()
  config.data.val_size = 200
  config.model.width_multiplier = 0.1
  config.train.num_epochs = 2
  config.train.patience = 1
  config.schedule.name = schedule
  config.schedule.epoch_budget = 4
  config.atp.enabled = atp_enabled
  config.atp.projection = "isotonic"
  if atp_enabled:
    config.model.profile = "all-one"
  config.eval.dps = (0.1, 0.5, 1.0)
  config.tensorboard = False
  if schedule == "tesla":  # a last stage whose last epoch scores below its best (asserted below)
    config.seed, config.train.num_epochs, config.train.patience = 1, 3, 2
  results = tesla_training.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  curve = saved["curves"]["test_accuracy_by_dp"]
  assert (curve["x"], curve["y"]) == ("dp", "test_accuracy")
  assert [x for x, _ in curve["points"]] == [0.1, 0.5, 1.0]
  assert all(0 <= y <= 1 for _, y in curve["points"])
  assert saved["mean_test_accuracy"] == pytest.approx(np.mean([y for _, y in curve["points"]]))
  assert (tmp_path / "test_accuracy_by_dp.png").stat().st_size > 0
  if schedule == "rtesla":
    assert results["epochs"] <= 4
  else:
    assert [s["task_dp"] for s in results["stages"]] == [1.0, 0.7, 0.4, 0.1]
  # on CPU each stage's step computes its active tasks alone (the run-time
  # skip elsewhere computes them alone too, but reports every task)
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for stage in results["stages"]:
    computed = {key.split("_dp")[1] for line in logged for key in line
                if key.startswith(f"stage{stage['stage']}/train_loss_dp")}
    active = {f"{round(100 * dp)}" for dp, c in zip(config.schedule.tasks,
                                                    stage["coefficients"]) if c > 0}
    assert computed == (active if jax.default_backend() == "cpu"
                        else {f"{round(100 * dp)}" for dp in config.schedule.tasks})
  if schedule == "tesla":
    assert_the_export_is_the_last_stages_best_state(tmp_path, config, results, logged)
  if atp_enabled:
    (gamma,) = results["learned_profiles"].values()  # the one IDP layer of tesla_mlp
    assert np.all(np.diff(gamma) <= 0), "ATP profiles must stay non-increasing"
    assert np.max(np.abs(np.asarray(gamma) - 1.0)) > 1e-3, "ATP must move the profile from one"


@pytest.mark.parametrize("stage_epochs, epochs_by_stage", [(0, [4]), (1, [1, 1, 1, 1])])
def test_rtesla_stages_end_at_their_epoch_cap_and_follow_the_sampled_plan(
    tmp_path, stage_epochs, epochs_by_stage):
  config = tesla_main.get_config()
  config.data.val_size = 200
  config.model.width_multiplier = 0.1
  config.train.patience = 10  # early stopping never ends a stage here
  config.schedule.name = "rtesla"
  config.schedule.tasks = TASKS
  config.schedule.epoch_budget = 4
  config.schedule.stage_epochs = stage_epochs
  config.eval.dps = TASKS
  config.tensorboard = False
  config.seed = 3  # not the default: the plan is drawn with the run's own seed
  results = tesla_training.train_and_evaluate(config, str(tmp_path))
  assert [s["epochs"] for s in results["stages"]] == epochs_by_stage
  assert results["epochs"] == 4
  # Algorithm 2 by hand: the first task, then each new task's loss weighs alpha and
  # the objective so far 1 - alpha, the task drawn uniformly with the run's seed.
  rng = np.random.default_rng(config.seed)
  coefficients = np.eye(len(TASKS))[0]
  for stage in results["stages"]:
    np.testing.assert_allclose(stage["coefficients"], coefficients)
    task = rng.choice(len(TASKS), p=np.full(len(TASKS), 1 / len(TASKS)))
    coefficients = 0.5 * np.eye(len(TASKS))[task] + 0.5 * coefficients


def test_every_epoch_of_a_run_of_one_epoch_stages_reads_its_own_batches(tmp_path, monkeypatch):
  """R-TESLA with one epoch a stage: each stage is a new ``fit``, yet the
  run's epochs must each draw their own order of the training images.
  Catches every stage replaying its first epoch's batches (a stage counting
  data epochs from zero), which made the whole run one epoch's order."""
  config = tesla_main.get_config()
  config.data.val_size = 200
  config.model.width_multiplier = 0.1
  config.train.steps_per_chunk = 1000  # one chunk an epoch: its indices are the epoch's order
  config.schedule.name = "rtesla"
  config.schedule.tasks = TASKS
  config.schedule.epoch_budget = 3
  config.schedule.stage_epochs = 1
  config.eval.dps = TASKS
  config.tensorboard = False
  orders = recorded_orders(monkeypatch)
  results = tesla_training.train_and_evaluate(config, str(tmp_path))
  assert [s["epochs"] for s in results["stages"]] == [1, 1, 1]
  assert len(orders) == 3 and len(set(orders)) == 3


def test_rtesla_draws_its_tasks_from_explicit_probabilities_set_by_a_variant():
  """``schedule.distribution`` takes explicit probabilities, also as a variant's
  override of a locked config (the command line's; the field is typed to take
  a name or a tuple); the plan draws each next task from them with the run's
  seed, by hand. Catches the field refusing a tuple, a copy of the config
  losing that type or its lock refusing the variant, and the plan drawing
  uniformly."""
  config = tesla_main.get_config()
  config.schedule.name = "rtesla"
  probabilities = (0.05, 0.05, 0.1, 0.8)
  config.variants = {"skewed": common.overrides(**{"schedule.distribution": probabilities})}
  config.lock()
  config = sweep.variant_configs(config)["skewed"]
  tesla_training.check_config(config)
  rng = np.random.default_rng(config.seed)
  plan = tesla_training.stage_plan(config)
  next(plan)  # the first task
  for stage in itertools.islice(plan, 30):
    assert stage.task == rng.choice(len(probabilities), p=probabilities)


@pytest.mark.parametrize("override, message", [
    ({"schedule.name": "random"}, r"schedule.name must be one of \('tesla', 'rtesla'\)"),
    ({"schedule.tasks": (0.4, 1.0)}, r"schedule.tasks must be in decreasing DP order"),
    ({"schedule.tasks": (1.0, 0.0)}, r"schedule.tasks\[1\] must be in \(0, 1\], got 0.0"),
    ({"schedule.tasks": (1.0, "0.5")},
     r"schedule.tasks\[1\] must be a number in \(0, 1\], got '0.5'"),
    ({"schedule.tasks": (1.0, True)}, r"schedule.tasks\[1\] must be a number in \(0, 1\], got True"),
    ({"schedule.tasks": (1.0, 1.0)}, r"schedule.tasks must be distinct DP levels"),
    ({"schedule.alpha": 0.0}, r"schedule.alpha must be a number in \(0, 1\], got 0.0"),
    ({"schedule.name": "rtesla", "schedule.distribution": "zipf"},
     r"schedule.distribution must be one of \('uniform',\) or explicit probabilities"),
    ({"schedule.name": "rtesla", "schedule.distribution": (0.5, 0.5)},
     r"schedule.distribution must have one probability per task \(4\), got 2"),
    ({"schedule.name": "rtesla", "schedule.distribution": (0.5, 0.5, 0.5, -0.5)},
     r"schedule.distribution must be finite and >= 0"),
    ({"distill.weight": float("nan")}, r"distill.weight must be a finite number >= 0, got nan"),
    ({"distill.weight": -0.5}, r"distill.weight must be a finite number >= 0, got -0.5"),
    ({"distill.weight": 0.5, "schedule.alpha": 1.0},
     r"distill.weight > 0 needs schedule.alpha < 1"),
    ({"distill.temperature": float("inf")},
     r"distill.temperature must be a positive number, got inf"),
    ({"schedule.monitor": "test"},
     r"schedule.monitor must be one of \('objective', 'newest_task'\)"),
    ({"schedule.selection": "best_test"},
     r"schedule.selection must be one of \('final', 'best_mean'\)"),
    ({"atp.enabled": True}, r"model.profile \(ATP starts at one\) must be one of"),
    ({"train.patience": 0}, r"train.patience must be >= 1"),
    ({"schedule.stage_epochs": -1}, r"schedule.stage_epochs must be an integer >= 0, got -1"),
    ({"data.batch_size": 0}, r"data.batch_size must be a positive integer, got 0"),
    ({"eval.bn_mode": "frozen"}, r"eval.bn_mode must be one of \('shared', 'recalibrated'\)"),
    ({"schedule.name": "rtesla", "schedule.epoch_budget": 0},
     r"schedule.epoch_budget must be a positive integer, got 0"),
    ({"atp.enabled": True, "model.profile": "all-one", "atp.projection": "sort"},
     r"atp.projection must be one of \('clip', 'isotonic'\), got 'sort'"),
    ({"atp.enabled": True, "model.profile": "all-one", "atp.period_steps": 0},
     r"atp.period_steps must be a positive integer, got 0"),
    ({"atp.enabled": True, "model.profile": "all-one", "atp.learning_rate": 0.0},
     r"atp.learning_rate must be a positive number, got 0.0"),
    ({"cam.enabled": True}, r"model.name \(CAM needs a GAP head\) must be one of "
                            r"\('vgg16_gap', 'mobilenet'\), got 'tesla_mlp'"),
    ({"cam.enabled": True, "model.name": "mobilenet", "cam.num_images": 0},
     r"cam.num_images must be a positive integer, got 0"),
    ({"cam.enabled": True, "model.name": "mobilenet", "cam.dps": (0.5, 1.5)},
     r"cam.dps\[1\] must be in \(0, 1\]"),
])
def test_bad_tesla_config_raises_before_compute(tmp_path, override, message):
  config = tesla_main.get_config()
  for path, value in override.items():
    block, field = path.split(".")
    config[block][field] = value
  with pytest.raises(ValueError, match=message):
    tesla_training.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def _table_1_rows(profiles, atp):
  """000 Table 1's MLP rows, written out: (method, profile, schedule, ATP) by variant."""
  rows = {}
  for p in profiles:
    rows[f"idp-{p}"] = ("idp", p, "tesla", False)
    rows[f"tesla-{p}"] = ("tesla", p, "tesla", False)
    rows[f"rtesla-{p}"] = ("tesla", p, "rtesla", False)
  if atp:
    rows.update({"tesla-atp": ("tesla", "all-one", "tesla", True),
                 "rtesla-atp": ("tesla", "all-one", "rtesla", True)})
  return rows


@pytest.mark.parametrize("subset, rows", [
    ("all", _table_1_rows(("linear", "harmonic", "all-one"), atp=True)),
    ("linear", _table_1_rows(("linear",), atp=False)),
    ("atp", _table_1_rows((), atp=True)),
    ("monitors", {f"tesla-linear-{m}-seed{s}": ("tesla", "linear", "tesla", False)
                  for m in ("objective", "newest_task") for s in range(4)}),
    ("rtesla_selection", {f"rtesla-{p}-seed{s}": ("tesla", p, "rtesla", False)
                          for p in ("linear", "all-one") for s in range(4)}),
])
def test_table_1_variants_are_the_papers_rows(subset, rows):
  configs = sweep.check_variants(tesla_mlp_mnist.get_config(subset), launcher.METHODS)
  got = {name: (c.method, c.model.profile, c.schedule.name, c.atp.enabled)
         for name, c in configs.items()}
  assert got == rows
  for name, c in configs.items():
    # Table 1, MLP column: tasks 100/70/40/10, Adam 1e-3, batch 28, alpha 0.5,
    # 4 epochs of patience, R-TESLA 50 epochs.
    assert c.schedule.tasks == (1.0, 0.7, 0.4, 0.1) and c.schedule.alpha == 0.5, name
    assert (c.optimizer.name, c.optimizer.learning_rate, c.data.batch_size) == (
        "adam", 1e-3, 28), name
    assert (c.train.patience, c.schedule.epoch_budget) == (4, 50), name
    seed = int(name[-1]) if "seed" in name else 0
    assert c.seed == seed, name
  if subset == "monitors":
    assert {(c.schedule.monitor, c.seed) for c in configs.values()} == {
        (m, s) for m in ("objective", "newest_task") for s in range(4)}
  if subset == "rtesla_selection":
    assert {c.schedule.selection for c in configs.values()} == {"best_mean"}


@pytest.mark.parametrize("column, tasks, batch", [("cifar10", (1.0, 0.5, 0.2), 32),
                                                  ("cifar100", (1.0, 0.7, 0.5, 0.3), 64)])
def test_vgg16_table_1_configs_have_the_papers_settings_and_a_named_recipe(column, tasks,
                                                                          batch):
  # 000 Table 1: SGD momentum 0.9, lr 0.004, alpha 0.5, patience 4, R-TESLA 35 epochs;
  # no weight decay and no learning-rate schedule.
  config = tesla_vgg16_cifar.get_config(column)
  o = config.optimizer
  assert (o.name, o.learning_rate, o.momentum, o.nesterov, o.weight_decay, o.schedule,
          o.warmup_steps) == ("sgd", 0.004, 0.9, False, 0.0, "constant", 0)
  assert (config.data.batch_size, config.schedule.tasks, config.schedule.alpha) == (
      batch, tasks, 0.5)
  assert (config.train.patience, config.schedule.epoch_budget) == (4, 35)
  recipe = tesla_vgg16_cifar.get_config(f"{column}-recipe")
  assert (recipe.optimizer.weight_decay, recipe.optimizer.schedule,
          recipe.optimizer.learning_rate) == (5e-4, "cosine", 0.004)
  assert "weight decay 5e-4, cosine decay" in recipe.title
  assert "weight decay" not in config.title


def test_a_bad_last_variant_fails_before_the_first_trains(tmp_path):
  config = tesla_mlp_mnist.get_config("linear")
  last = sorted(config.variants)[-1]
  config.variants[last]["schedule"] = {"monitor": "test_accuracy"}
  with pytest.raises(ValueError, match=rf"variants.{last}: schedule.monitor must be one of"):
    launcher.train_and_evaluate(config, str(tmp_path / "fig"))
  assert not (tmp_path / "fig").exists()


def cam_config(name, width):
  config = tesla_main.get_config()
  config.data.val_size = 200
  config.model.name = name
  config.model.width_multiplier = width
  config.cam.enabled = True
  config.cam.num_images = 3
  config.tensorboard = False
  return config


def cam_run(tmp_path, bn_mode):
  config = cam_config("vgg16_gap", 1 / 16)
  config.eval.bn_mode = bn_mode
  config.eval.recalibration_batches = 2
  run = runs.start(config, str(tmp_path))
  graphdef, state = create_train_state(run.model, optax.sgd(0.1))
  loss = multitask.sliced_loss(tuple(config.schedule.tasks))
  trainer = runs.make_trainer(run, graphdef, optax.sgd(0.1), loss)
  return run, trainer, state


def test_class_activation_maps_of_a_run_are_saved_as_a_grid(tmp_path):
  run, trainer, state = cam_run(tmp_path, "shared")
  path, _ = tesla_training.save_cams(run, trainer, state)
  image = matplotlib.image.imread(path)
  assert image.shape[1] > image.shape[0] > 0  # 3 rows of 4 columns: input, 20, 50, 100%


def test_class_activation_maps_read_the_statistics_of_the_test_report(tmp_path):
  # A fresh network's running statistics (mean 0, variance 1) are far from its
  # activations' own, so the maps change with the statistics they read.
  run, trainer, state = cam_run(tmp_path, "recalibrated")
  _, logits = tesla_training.save_cams(run, trainer, state)
  n = run.config.cam.num_images
  images = normalize(jnp.asarray(run.dataset.test_x[:n]),
                     *data.normalization_stats(run.dataset.name))
  variables = sliced.merge_variables(state.params, state.model_state)
  for dp in run.config.cam.dps:
    stats = batchnorm.recalibrate((run.arch, variables), dp, trainer.training_batches(2))
    recalibrated = sliced.apply_sliced(run.arch, sliced.merge_variables(variables, stats),
                                       images, dp, train=False)
    running = sliced.apply_sliced(run.arch, variables, images, dp, train=False)
    np.testing.assert_allclose(logits[dp], recalibrated, rtol=1e-4, atol=1e-4)
    assert not np.allclose(logits[dp], running, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_tesla_on_a_gap_network_saves_class_activation_maps(tmp_path):
  config = cam_config("mobilenet", 1 / 32)  # the zoo's other GAP network
  config.schedule.tasks = (1.0, 0.5)
  config.train.num_epochs = 1
  config.train.patience = 1
  config.eval.dps = (0.5, 1.0)
  results = tesla_training.train_and_evaluate(config, str(tmp_path))
  image = matplotlib.image.imread(results["cam"])
  assert image.shape[0] > 0 and image.shape[1] > image.shape[0]  # 3 rows, 4 columns
  assert {dp: len(classes) for dp, classes in results["cam_predictions"].items()} == {
      f"{dp:g}": 3 for dp in config.cam.dps}


def test_cam_needs_a_gap_model(tmp_path):
  config = tesla_main.get_config()
  config.cam.enabled = True
  with pytest.raises(ValueError, match=r"model.name \(CAM needs a GAP head\) must be one of"):
    tesla_training.train_and_evaluate(config, str(tmp_path / "run"))


def test_atp_learns_every_profile_of_a_separable_network(tmp_path):
  """ATP trains and projects each profile, found by type: the depthwise one too.

  A separable block with IDP on its depthwise part has two profiles
  (``gamma`` and ``depthwise_gamma``); the dense classifier a third. The
  network is exported at all-one and continued by TESLA + ATP.
  """
  arch = {"name": "sep", "input_shape": [28, 28, 1], "num_classes": 10, "profile": "all-one",
          "layers": [{"kind": "conv", "features": 4, "stride": 2},
                     {"kind": "sconv", "features": 8, "stride": 2, "idp": True,
                      "idp_depthwise": True},
                     {"kind": "global_avgpool"},
                     {"kind": "dense", "features": 10, "idp": True}]}
  exported = sliced.export(models.build(arch, rngs=models.init_rngs(0)), tmp_path / "net")
  config = tesla_main.get_config()
  config.data.val_size = 200
  config.model.init_from = str(exported)
  config.model.profile = "all-one"
  config.atp.enabled = True
  config.atp.learning_rate = 1e-2
  config.schedule.tasks = (1.0, 0.5)
  config.train.num_epochs = 1
  config.train.patience = 1
  config.eval.dps = (0.5, 1.0)
  config.tensorboard = False
  results = tesla_training.train_and_evaluate(config, str(tmp_path / "run"))
  learned = results["learned_profiles"]
  assert set(learned) == {"['layers'][1]['depthwise_gamma']", "['layers'][1]['gamma']",
                          "['layers'][3]['gamma']"}
  for path, gamma in learned.items():
    assert np.all(np.diff(gamma) <= 0), (path, gamma)
    assert np.max(np.abs(np.asarray(gamma) - 1.0)) > 1e-3, f"{path} never moved"


def test_titles_and_summary_name_the_dataset_model_and_method_that_ran(tmp_path):
  config = tesla_mlp_mnist.get_config("linear")  # Table 1's MNIST column ...
  config.data.dataset = "mnist_sample"          # ... run on another dataset
  config.data.val_size = 200
  config.model.width_multiplier = 0.1
  config.train.num_epochs = 1
  config.train.patience = 1
  config.train.checkpoint = False
  config.schedule.epoch_budget = 2
  config.eval.dps = (0.5, 1.0)
  config.tensorboard = False
  figure = launcher.train_and_evaluate(config, str(tmp_path))
  title = "000 Table 1 column 1 / Fig. 3: tesla_mlp on mnist_sample (idp, tesla)"
  assert figure["title"] == title
  assert PIL.Image.open(tmp_path / "test_accuracy_by_dp.png").text["Title"] == title
  for variant, method in (("idp-linear", "idp"), ("tesla-linear", "tesla"),
                          ("rtesla-linear", "tesla")):
    plot = PIL.Image.open(tmp_path / variant / "test_accuracy_by_dp.png")
    assert plot.text["Title"] == f"{method}: tesla_mlp on mnist_sample"
    line, = [l for l in launcher.summary(figure, str(tmp_path)).splitlines()
             if l.startswith(f"{variant}: ")]
    assert f"method={method}, model=tesla_mlp, dataset=mnist_sample," in line, line


def test_best_mean_selection_reports_the_kept_states_test_curve_beside_the_final_ones(
    tmp_path):
  """``selected``: the kept state (here a trained one) is what the results'
  test curve and mean validation accuracy describe; the final state (here
  untrained) is reported apart. Catches the two states' reports swapped."""
  config = tesla_main.get_config()
  config.data.val_size = 200
  config.model.width_multiplier = 0.1
  config.schedule.tasks = TASKS
  config.schedule.selection = "best_mean"
  config.eval.dps = (0.2, 0.5, 1.0)
  config.tensorboard = False
  run = runs.start(config, str(tmp_path))
  graphdef, untrained = create_train_state(run.model, optax.sgd(0.1))
  trainer = runs.make_trainer(run, graphdef, optax.sgd(0.1), multitask.sliced_loss(TASKS))
  untrained = trainer.place(untrained)
  trained = trainer.train_steps(jax.tree.map(jnp.copy, untrained),
                                jnp.ones((3,), jnp.float32), 30, epoch=0)
  score = tesla_training.mean_validation_accuracy(trainer, TASKS, config.eval)
  kept = tesla_training.RunBest(score, None, untrained)
  kept.observe(stage=1, run_epoch=4, state=trained)
  state, report = tesla_training.selected(trainer, config, untrained, kept, score)
  curve = lambda s: evaluation.test_report(config.eval, trainer, s)["curves"][evaluation.CURVE]
  assert curve(trained) != curve(untrained)
  assert report["curves"][evaluation.CURVE] == curve(trained)
  assert report["curves"][tesla_training.FINAL_STATE_CURVE] == curve(untrained)
  assert (report["selected_stage"], report["selected_epoch"]) == (1, 4)
  assert report["mean_val_accuracy"] == score(trained) > score(untrained)
  assert report["final_state_mean_val_accuracy"] == score(untrained)
  jax.tree.map(np.testing.assert_array_equal, state.params, trained.params)


def test_best_mean_selection_keeps_the_run_state_with_the_best_mean_validation_accuracy(
    tmp_path):
  config = tesla_main.get_config()
  config.data.val_size = 200
  config.model.width_multiplier = 0.1
  config.train.patience = 1
  config.schedule.name = "rtesla"
  config.schedule.tasks = (1.0, 0.5, 0.2)
  config.schedule.epoch_budget = 6
  config.schedule.selection = "best_mean"
  config.eval.dps = (0.2, 0.5, 1.0)
  config.tensorboard = False
  results = tesla_training.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  scores = [(r["run_epoch"], r["run/mean_val_accuracy"]) for r in lines
            if "run/mean_val_accuracy" in r]
  assert [epoch for epoch, _ in scores] == list(range(1, 7))  # every epoch of every stage
  best = max(scores, key=lambda s: (s[1], -s[0]))  # the first epoch with the best score
  assert (results["selected_epoch"], results["mean_val_accuracy"]) == best
  assert results["final_state_mean_val_accuracy"] <= best[1]
  # The exported network is the selected state: its mean validation accuracy by hand.
  by_hand = np.mean(list(val_accuracy_by_hand(tmp_path / "export", (1.0, 0.5, 0.2), 200).values()))
  assert by_hand == pytest.approx(best[1], abs=2e-3)


def test_best_mean_selection_killed_before_an_epochs_checkpoint_logs_each_epoch_once(
    tmp_path, monkeypatch):
  """A stage's epoch is scored for best-mean selection before the stage's own
  checkpoint is saved: a run killed between the two retrains that epoch on the
  rerun (here the second stage's first, before that stage has a checkpoint).
  Catches its lines, ``run/mean_val_accuracy`` among them, logged twice in
  ``metrics.jsonl``, and the rerun's selection differing from a straight run's."""
  config = tesla_main.get_config()
  config.update_from_flattened_dict({
      "data.val_size": 200, "model.width_multiplier": 0.1, "train.num_epochs": 2,
      "train.steps_per_chunk": 20, "schedule.tasks": (1.0, 0.2),
      "schedule.selection": "best_mean", "eval.dps": (0.2, 1.0), "tensorboard": False})
  straight = tesla_training.train_and_evaluate(config, str(tmp_path / "straight"))
  with killed_at_checkpoint(monkeypatch, lambda directory, step: directory.endswith("stage1")
                            and step == 1):
    tesla_training.train_and_evaluate(config, str(tmp_path / "killed"))
  resumed = tesla_training.train_and_evaluate(config, str(tmp_path / "killed"))
  for key in ("selected_stage", "selected_epoch", "mean_val_accuracy", "curves", "epochs"):
    assert resumed[key] == straight[key], key
  run_epochs = [r["run_epoch"] for r in logged_lines(tmp_path / "straight") if "run_epoch" in r]
  assert run_epochs == list(range(1, straight["epochs"] + 1))
  assert logged_lines(tmp_path / "killed") == logged_lines(tmp_path / "straight")
