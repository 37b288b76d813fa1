"""Training infrastructure: resume after a kill, checkpoint fallback, data
parallel, early stopping, config validation, atomic results."""

import dataclasses
import gc
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from dynscale import io
from dynscale.idp import training as idp_training
from dynscale.nn import costs, sliced
from dynscale.train import runs, steps, validation
from dynscale.train.checkpoint import Checkpoints
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.state import create_train_state
from experiments.configs import baseline
from blind_selection import assert_fit_never_reads_the_test_split
from injected_kills import killed_at_checkpoint, logged_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = baseline.get_config()
  config.data.val_size = 300
  config.model.width_multiplier = 0.1
  config.train.num_epochs = 4
  config.train.steps_per_chunk = 20
  config.eval.dps = (0.5, 1.0)
  config.tensorboard = False
  config.update_from_flattened_dict(overrides)
  return config


def launcher_command(workdir, *overrides):
  return [sys.executable, "-m", "experiments.main",
          "--config=experiments/configs/baseline.py", f"--workdir={workdir}",
          "--config.data.val_size=300", "--config.model.width_multiplier=0.1",
          "--config.train.num_epochs=6", "--config.train.steps_per_chunk=20",
          "--config.eval.dps=(0.5,1.0)", "--config.tensorboard=False", *overrides]


def tesla_command(workdir, *overrides):
  """The main TESLA job at test size: tasks 100/50/20% DP, 2-3 epochs a stage."""
  return [sys.executable, "-m", "experiments.main",
          "--config=experiments/configs/tesla_main.py", f"--workdir={workdir}",
          "--config.data.val_size=200", "--config.model.width_multiplier=0.1",
          "--config.train.num_epochs=3", "--config.train.patience=1",
          "--config.train.steps_per_chunk=20", "--config.schedule.tasks=(1.0,0.5,0.2)",
          "--config.eval.dps=(0.2,0.5,1.0)", "--config.tensorboard=False", *overrides]


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


# --------------------------------------------------------------------------
# Kill and rerun: the same final metrics as a straight run.
# --------------------------------------------------------------------------


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path, straight_and_resumed):
  a, b = straight_and_resumed(tmp_path, launcher_command, "train/1")
  assert a["curves"] == b["curves"]
  assert a["val_accuracy"] == b["val_accuracy"]
  assert a["steps"] == b["steps"]


def test_a_run_killed_between_an_epochs_two_saves_resumes_to_the_same_results(
    tmp_path, monkeypatch):
  """An epoch's best state is saved before the epoch's own checkpoint: a run
  killed between the two resumes before that epoch and saves its best state
  again. Catches every rerun failing (orbax refuses a step that is already
  there), ``epochs_run`` counting only the rerun's epochs, and the epoch's
  metrics logged twice."""
  config = tiny_config(**{"train.num_epochs": 2})
  straight = idp_training.train_and_evaluate(config, str(tmp_path / "straight"))
  with killed_at_checkpoint(monkeypatch, lambda directory, step: step == 2
                            and not directory.endswith("-best")):
    idp_training.train_and_evaluate(config, str(tmp_path / "killed"))
  assert os.listdir(tmp_path / "killed" / "checkpoints" / "train-best") == ["2"]
  resumed = idp_training.train_and_evaluate(config, str(tmp_path / "killed"))
  for key in ("curves", "val_accuracy", "steps", "epochs_run", "flops"):
    assert resumed[key] == straight[key], key
  assert straight["epochs_run"] == 2
  # what the network trained costs (a plain figure variant's, e.g. sanp_cpu's thin)
  assert straight["flops"] == costs.flops(straight["model"]["architecture"],
                                          config.train.dp) > 0
  assert logged_lines(tmp_path / "killed") == logged_lines(tmp_path / "straight")


def test_a_resumed_stage_forgets_only_its_own_lines_logged_after_its_checkpoint(tmp_path):
  """What the stage logged past its checkpoint's step goes, and a line a kill
  cut short; an earlier stage's lines, at any step (a stage may count steps
  from zero again), and the stage's own up to the step stay."""
  from dynscale.train.writers import MetricWriter
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  lines = [{"step": 10, "warmup/train_loss": 1.0}, {"step": 30, "warmup/train_loss": 0.9},
           {"step": 10, "finetune/train_loss": 0.8},
           {"step": 20, "finetune/val_accuracy": 0.5, "epoch": 1.0},
           {"step": 30, "finetune/train_loss": 0.7}]
  for line in lines:
    writer.write(line["step"], {k: v for k, v in line.items() if k != "step"})
  with open(writer.path, "a") as f:
    f.write('{"finetune/train_loss": 0.6, "st')
  writer.forget_after(20, "finetune")
  assert [json.loads(line) for line in open(writer.path)] == lines[:4]


def test_tesla_killed_inside_a_stage_resumes_to_the_same_final_metrics(tmp_path,
                                                                     straight_and_resumed):
  # Killed after the first epoch of the second stage: stage 0's best state, the
  # running stage's state, optimizer state and early stopping come from checkpoints.
  a, b = straight_and_resumed(tmp_path, tesla_command, "stage1/1", "checkpoints/stage0-best")
  assert [s["task_dp"] for s in a["stages"]] == [1.0, 0.5, 0.2]
  for key in ("curves", "stages", "epochs", "mean_val_accuracy"):
    assert a[key] == b[key], key


def test_rtesla_killed_mid_run_resumes_to_the_same_final_metrics(tmp_path, straight_and_resumed):
  # R-TESLA with an 8-epoch budget and best-mean selection, killed inside its second
  # stage: the sampled plan, the epochs spent and the best-mean state are restored.
  # Stages of at most 2 epochs, so that a second stage starts whatever early stopping
  # does (uncapped, the first stage may spend the whole budget).
  command = lambda workdir: tesla_command(
      workdir, "--config.schedule.name=rtesla", "--config.schedule.epoch_budget=8",
      "--config.schedule.selection=best_mean", "--config.schedule.stage_epochs=2")
  a, b = straight_and_resumed(tmp_path, command, "stage1/1", "checkpoints/best-mean")
  assert a["epochs"] == 8 and len(a["stages"]) >= 2
  for key in ("curves", "stages", "epochs", "selected_stage", "selected_epoch",
              "mean_val_accuracy", "final_state_mean_val_accuracy"):
    assert a[key] == b[key], key


# --------------------------------------------------------------------------
# Checkpoints: a corrupted latest falls back to the previous one.
# --------------------------------------------------------------------------


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
  store = Checkpoints(str(tmp_path / "ckpt"), max_to_keep=2)
  state1 = {"w": np.arange(4.0, dtype=np.float32), "step": np.array(1, np.int32)}
  state2 = {"w": np.arange(4.0, dtype=np.float32) + 10, "step": np.array(2, np.int32)}
  store.save(1, state1, {"epoch": 1})
  store.save(2, state2, {"epoch": 2})
  for root, _, files in os.walk(tmp_path / "ckpt" / "2"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  step, restored, meta = Checkpoints(str(tmp_path / "ckpt")).restore(state1)
  assert step == 1 and meta == {"epoch": 1}
  np.testing.assert_array_equal(restored["w"], state1["w"])
  assert "unreadable" in caplog.text


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_workdir_rerun_with_another_network_is_refused_and_its_checkpoints_kept(tmp_path):
  """The same workdir with a wider network, its ``config.json`` gone: its
  checkpoints hold other shapes. Catches them taken for damaged files: the run would start from scratch and
  save over the first run's checkpoints. Refused before any array is read
  (orbax, failing part-way, left reads behind that warned at collection)."""
  workdir = str(tmp_path / "run")
  idp_training.train_and_evaluate(tiny_config(**{"train.num_epochs": 1}), workdir)
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints", "train")))
  os.remove(os.path.join(workdir, "config.json"))  # checkpoints without their run's config
  with pytest.raises(ValueError, match=r"checkpoint 1 in .*checkpoints/train holds another "
                                       r"network than this run's \(\S+ has shape \([\d, ]+\) "
                                       r"there, \([\d, ]+\) here\); delete"):
    idp_training.train_and_evaluate(
        tiny_config(**{"train.num_epochs": 2, "model.width_multiplier": 0.2}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "train"))) == saved
  gc.collect()  # anything orbax left unfinished reports now, within this test


def test_a_started_run_resumes_only_with_its_own_config(tmp_path):
  """A workdir holding a run is rerun with another learning rate: refused before
  anything is trained or written, naming the field and both values (resumed,
  it gave the old run's numbers under the new config). With only fields it
  does not train by changed (evaluation batch size, TensorBoard, a block
  another method reads: a figure's backbone beside its gated variants) it
  resumes, as the same command does; a workdir whose run was refused after
  it started (its TensorBoard directory and an empty log) takes another
  config."""
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"train.num_epochs": 1})
  config.sanp = {"lambda0": 20.0}  # a block the idp method does not read
  first = idp_training.train_and_evaluate(config, workdir)
  kept = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  with pytest.raises(ValueError, match=r"holds a run of another config \(optimizer\."
                                       r"learning_rate: 0\.001 there, 0\.5 now\); rerun it "
                                       r"with its own config.*or use another workdir"):
    idp_training.train_and_evaluate(
        tiny_config(**{"train.num_epochs": 1, "optimizer.learning_rate": 0.5}), workdir)
  assert {name: os.path.getmtime(os.path.join(workdir, name))
          for name in os.listdir(workdir)} == kept
  with pytest.raises(ValueError, match=r"\(eval\.dps: \[0\.5, 1\.0\] there, \[1\.0\] now\)"):
    idp_training.train_and_evaluate(  # evaluation reads them: validation drives the selection
        tiny_config(**{"train.num_epochs": 1, "eval.dps": (1.0,)}), workdir)
  config = tiny_config(**{"train.num_epochs": 1, "data.eval_batch_size": 100,
                          "tensorboard": True})
  config.sanp = {"lambda0": 5.0}
  resumed = idp_training.train_and_evaluate(config, workdir)
  assert resumed["steps"] == first["steps"]
  assert resumed["test_accuracy"] == pytest.approx(first["test_accuracy"], abs=1e-6)
  refused = tmp_path / "refused"
  (refused / "tensorboard").mkdir(parents=True)
  (refused / "metrics.jsonl").touch()
  with open(refused / "config.json", "w") as f:
    json.dump(tiny_config(**{"optimizer.learning_rate": 0.5}).to_dict(), f)
  runs.start(tiny_config(), str(refused))


def test_a_run_from_an_export_compares_the_network_it_names_not_its_path(tmp_path):
  """A run started from an exported network resumes when its source moved (a
  figure's directory renamed: its variants name their backbones by new
  paths; refused before, though nothing changed), and is refused, naming
  ``model.init_from``, when its source path holds another network (a
  backbone trained again in place: resumed before, on checkpoints grown from
  the old one)."""
  source, other = str(tmp_path / "source"), tmp_path / "other"
  idp_training.train_and_evaluate(tiny_config(**{"train.num_epochs": 1}), source)
  exported = sliced.load(os.path.join(source, "export"))  # another network: one weight moved
  leaves, tree = jax.tree.flatten(exported.variables)
  moved_weight = jax.tree.unflatten(tree, [leaves[0] + 1e-3, *leaves[1:]])
  sliced.export(sliced.SlicedModel(exported.arch, moved_weight), other / "export")
  other = str(other)
  workdir = str(tmp_path / "run")
  first = idp_training.train_and_evaluate(
      tiny_config(**{"train.num_epochs": 1, "model.init_from": source}), workdir)
  moved = str(tmp_path / "moved")
  shutil.move(source, moved)
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints", "train")))
  resumed = idp_training.train_and_evaluate(
      tiny_config(**{"train.num_epochs": 1, "model.init_from": moved}), workdir)
  assert resumed["steps"] == first["steps"]
  assert resumed["test_accuracy"] == pytest.approx(first["test_accuracy"], abs=1e-6)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "train"))) == saved
  shutil.rmtree(os.path.join(moved, "export"))
  shutil.copytree(os.path.join(other, "export"), os.path.join(moved, "export"))
  with pytest.raises(ValueError, match=r"holds a run of another config \(model\.init_from: "
                                       r"'\S+moved' holds another network than the one the "
                                       r"run started from\)"):
    idp_training.train_and_evaluate(
        tiny_config(**{"train.num_epochs": 1, "model.init_from": moved}), workdir)
  with pytest.raises(ValueError, match=r"\(model\.init_from: '\S+moved' there, '\S+other' now"):
    idp_training.train_and_evaluate(
        tiny_config(**{"train.num_epochs": 1, "model.init_from": other}), workdir)


def test_the_runs_seed_draws_its_validation_split_initialisation_and_batches(tmp_path):
  """``seed`` is the run's one source of randomness: two seeds hold out
  different validation images, start from different weights and draw
  different batches and augmentation keys; the same seed, the same of each."""
  def started(seed, name):
    config = tiny_config(seed=seed, **{"data.augment": "on"})
    run = runs.start(config, str(tmp_path / name))
    graphdef, state = create_train_state(run.model, optax.sgd(0.1))
    trainer = runs.make_trainer(run, graphdef, optax.sgd(0.1), steps.classification_loss)
    (order, key), = [next(trainer.epoch_chunks(0))]
    weights = max(jax.tree.leaves(state.params), key=lambda a: a.size)  # a kernel
    return (run.dataset.val_x, weights, np.asarray(order),
            np.asarray(jax.random.key_data(key)))
  first, again, other = started(0, "a"), started(0, "b"), started(1, "c")
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_stage_hands_on_its_best_or_its_final_state_and_schedules_its_own_epochs(tmp_path):
  """After a trained first stage, a second one climbs the loss (validation
  accuracy falls epoch by epoch): kept 'best', the model leaves it as its
  first epoch left it, the most accurate; kept 'final', as its last. Its
  optimizer's schedule spans its own epochs, not ``train.num_epochs``."""
  def ascent(model, images, labels, dp):
    loss, metrics = steps.classification_loss(model, images, labels, dp)
    return -loss, metrics

  def accuracy_after(keep):
    config = tiny_config(**{"train.patience": 5, "optimizer.learning_rate": 3e-3})
    gentle = config.optimizer.copy_and_resolve_references()
    gentle.learning_rate = 1e-4
    run = runs.start(config, str(tmp_path / keep))
    assert runs.total_steps(run, 3) == len(run.dataset.train_y) // 64 * 3
    assert runs.total_steps(run) == len(run.dataset.train_y) // 64 * 4
    runs.fit_stage(run, run.model, runs.Stage("learn", 2, nnx.Param,
                                              steps.classification_loss, steps.eval_forward))
    fitted = runs.fit_stage(run, run.model, runs.Stage("unlearn", 3, nnx.Param, ascent,
                                                       steps.eval_forward, keep=keep,
                                                       optimizer=gentle))
    graphdef, state = create_train_state(run.model, optax.sgd(0.0))
    assert jax.tree.all(jax.tree.map(np.array_equal, state.params, fitted.state.params))
    return fitted.trainer.evaluate(state, "val", jnp.float32(1.0))["accuracy"]

  best, final = accuracy_after("best"), accuracy_after("final")
  assert best > final + 0.1, (best, final)


def test_progress_reports_the_rate_of_the_steps_since_its_last_report(monkeypatch):
  """A run resumed at step 100: 10 steps of 8 images in 2 s (40 images/s),
  then 5 in 0.5 s (80): not counting the steps before the resume, nor
  averaging over the whole run."""
  from dynscale.train import writers
  clock = iter([0.0, 2.0, 2.5])
  monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
  progress = writers.Progress(total_steps=200, batch_size=8, start_step=100)
  assert progress.update(110, 1, {"loss": 1.0})["images_per_s"] == pytest.approx(40.0)
  assert progress.update(115, 1, {"loss": 1.0})["images_per_s"] == pytest.approx(80.0)


def test_no_checkpoint_restores_none(tmp_path):
  assert Checkpoints(str(tmp_path / "empty")).restore({"w": np.zeros(2)}) is None


def test_a_stage_resumes_only_a_checkpoint_started_as_it_starts(fake_cifar, tmp_path, caplog):
  """A stage's origin is saved with its checkpoints: another origin is refused
  (naming the checkpoint to delete), the same one resumes, and a checkpoint
  that records none (written before origins were kept) resumes with a warning."""
  config = tiny_config(**{"data.dataset": "cifar10", "data.data_dir": str(fake_cifar),
                          "data.val_size": 12, "data.batch_size": 16,
                          "train.num_epochs": 1})
  run = runs.start(config, str(tmp_path))
  caplog.set_level(logging.INFO)

  def fit(name, origin):
    return runs.fit_stage(run, run.model, runs.Stage(
        name, 1, nnx.Param, steps.classification_loss, steps.eval_forward, origin=origin))
  started = {"catch_up_steps": 3, "teacher": None}
  first = fit("stage", started)
  with pytest.raises(ValueError, match=r"catch_up_steps.: 3.*catch_up_steps.: 5.*delete .*stage"):
    fit("stage", {**started, "catch_up_steps": 5})
  caplog.clear()
  again = fit("stage", started)
  assert "Resumed stage 'stage'" in caplog.text and "records no origin" not in caplog.text
  assert jax.tree.all(jax.tree.map(np.array_equal, again.state.params, first.state.params))
  fit("older", None)
  fit("older", started)
  assert "records no origin" in caplog.text


# --------------------------------------------------------------------------
# Data parallel: 8 host devices match 1 device.
# --------------------------------------------------------------------------

DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dynscale import data
    from dynscale.nn import models
    from dynscale.train import loop, optim, steps
    from dynscale.train.state import create_train_state
    from experiments.configs import common

    assert jax.device_count() == 8, jax.devices()
    dataset = data.load("mnist_sample", val_size=200)
    arch = models.architecture("mlp", num_classes=10, input_shape=(28, 28, 1),
                               profile="linear", width_multiplier=0.1)

    def train(devices):
      model = models.build(arch, rngs=models.init_rngs(0))
      tx = optim.make_optimizer(common.optimizer("sgd", learning_rate=0.1), 10)
      graphdef, state = create_train_state(model, tx)
      initial = jax.tree.map(np.array, state.params)
      trainer = loop.Trainer(graphdef=graphdef, tx=tx, loss_fn=steps.classification_loss,
                             forward=steps.eval_forward, dataset=dataset, batch_size=64,
                             eval_batch_size=200, augment=False, seed=0, steps_per_chunk=5,
                             mesh=steps.data_mesh(devices))
      idx, key = next(trainer.epoch_chunks(0))
      state, _ = trainer.train_chunk(trainer.place(state), trainer.splits["train"], idx, key,
                                     jnp.float32(0.5))
      val = trainer.evaluate(state, "val", jnp.float32(0.5))["accuracy"]
      return initial, jax.tree.map(np.asarray, (state.params, state.model_state)), val

    initial, one, val_one = train(jax.devices()[:1])
    _, eight, val_eight = train(jax.devices())
    max_diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                                one, eight)))
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             initial, one[0])))
    print(json.dumps({"max_diff": max_diff, "moved": moved, "val": [val_one, val_eight]}))
""")



def test_eight_device_data_parallel_matches_one_device():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT], cwd=ROOT, env=env,
                       check=True, capture_output=True, text=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["moved"] > 1e-3, "the steps must change the parameters"
  assert result["max_diff"] < 1e-5
  assert result["val"][0] == result["val"][1]


# --------------------------------------------------------------------------
# Evaluation sums extra per-example metrics of the forward, padding masked out.
# --------------------------------------------------------------------------


def pixel_mean_trainer(extra, dataset=None, seed=0):
  """A Trainer over 300 validation digits (or ``dataset``), evaluated in
  batches of 128 (84 padded), its forward adding the metric ``extra(images)``."""
  import optax
  from dynscale import data
  from dynscale.nn import models
  from dynscale.train import loop, steps
  from dynscale.train.state import create_train_state

  if dataset is None:
    dataset = data.load("mnist_sample", val_size=300)
  arch = models.architecture("mlp", num_classes=10, input_shape=(28, 28, 1),
                             width_multiplier=0.1)
  tx = optax.sgd(0.1)
  graphdef, state = create_train_state(models.build(arch, rngs=models.init_rngs(0)), tx)

  def forward(model, images, dp):
    return model(images, dp, train=False), {"pixel_mean": extra(images)}

  trainer = loop.Trainer(graphdef=graphdef, tx=tx, loss_fn=steps.classification_loss,
                         forward=forward, dataset=dataset, batch_size=50,
                         eval_batch_size=128, augment=False, seed=seed)
  return trainer, trainer.place(state), dataset


def test_a_fits_early_stopping_and_best_state_never_read_the_test_split():
  """The default validation of ``Trainer.fit`` (IDP, SANP and CompactNet stages
  use it): a test split of noise with wrong labels leaves the early-stopping
  record and the kept state unchanged, while it changes the test metric."""
  import jax.numpy as jnp
  from dynscale import data

  def fit(dataset):
    trainer, state, _ = pixel_mean_trainer(lambda images: jnp.mean(images, axis=(1, 2, 3)),
                                           dataset)
    return trainer, trainer.fit(state, task=jnp.float32(1.0), num_epochs=3, stage="only",
                                early_stopping=EarlyStopping(1))
  assert_fit_never_reads_the_test_split(data.load("mnist_sample", val_size=300), fit)


def test_training_batches_beyond_an_epoch_are_the_next_epochs_not_fewer():
  """``Trainer.training_batches(n)`` (batch-norm recalibration: ``eval.
  recalibration_batches``, SANP's and CompactNet's counts) gives n batches
  even when n exceeds an epoch's: the first epoch's shuffle, then another
  shuffle of the split. It gave one epoch's batches at most."""
  import jax.numpy as jnp
  from dynscale.data import pipeline
  trainer, _, dataset = pixel_mean_trainer(lambda images: jnp.mean(images, axis=(1, 2, 3)))
  per_epoch = trainer.steps_per_epoch
  one_epoch = [np.asarray(b) for b in trainer.training_batches(per_epoch)]
  more = [np.asarray(b) for b in trainer.training_batches(per_epoch + 5)]
  assert len(more) == per_epoch + 5
  for a, b in zip(one_epoch, more):
    np.testing.assert_array_equal(a, b)
  mean, std = pipeline.normalization_stats(dataset.name)
  flat = ((dataset.train_x.astype(np.float32) / 255 - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32)).reshape(len(dataset.train_x), -1)

  def indices(batch):  # each image's index in the training split
    distances = np.abs(flat[None] - batch.reshape(len(batch), 1, -1)).max(axis=-1)
    assert distances.min(axis=1).max() < 1e-4  # every image is a training image
    return distances.argmin(axis=1).tolist()
  first = [i for b in more[:per_epoch] for i in indices(b)]
  second = [i for b in more[per_epoch:] for i in indices(b)]
  assert len(set(first)) == len(first) and len(set(second)) == len(second)
  assert second != first[:len(second)]  # a new shuffle, not the first epoch again


@pytest.mark.parametrize("augment", [True, False])
def test_a_trainer_trains_on_crops_and_flips_drawn_anew_each_epoch(monkeypatch, augment):
  """What a train step of a CIFAR trainer sees (read inside the step): with
  ``augment`` each image is a crop and flip of the image its index names,
  not all untouched, and an image's draw changes from epoch to epoch (a
  key that ignored the epoch replays epoch 0's crops); without, the images
  themselves. The pipeline's tests check crop_flip alone; nothing read the
  trainer's batches."""
  import jax
  import jax.numpy as jnp
  import optax
  from augmentation import crop_flip_of, distinct_images
  from data_orders import recorded_batches
  from dynscale import data
  from dynscale.data import pipeline
  from dynscale.nn import models
  from dynscale.train import loop, steps
  from dynscale.train.state import create_train_state

  x = distinct_images(32, 8, 8, 3)[np.random.default_rng(0).permutation(32)]
  y = (np.arange(32) % 10).astype(np.int32)
  dataset = data.Dataset("cifar10", x, y, x[:8], y[:8], x[:8], y[:8], 10, "test images")
  seen = []

  def loss_fn(model, images, labels, task):
    jax.debug.callback(lambda im: seen.append(np.asarray(im)), images)
    return steps.classification_loss(model, images, labels, task)
  orders = recorded_batches(monkeypatch)
  arch = models.architecture("mlp", num_classes=10, input_shape=(8, 8, 3), width_multiplier=0.1)
  tx = optax.sgd(0.01)
  graphdef, state = create_train_state(models.build(arch, rngs=models.init_rngs(0)), tx)
  trainer = loop.Trainer(graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                         forward=steps.eval_forward, dataset=dataset, batch_size=16,
                         eval_batch_size=8, augment=augment, seed=0, steps_per_chunk=2)
  state = trainer.train_steps(trainer.place(state), jnp.float32(1.0), 4, epoch=0)  # epochs 0, 1
  assert len(seen) == len(orders) == 4
  mean, std = pipeline.normalization_stats("cifar10")
  draws = {0: [], 1: []}  # per epoch, by position: step in the epoch, place in the batch
  for step, (images, order) in enumerate(zip(seen, orders)):
    pixels = np.rint((images * np.asarray(std) + np.asarray(mean)) * 255).astype(np.uint8)
    for i, image in zip(np.frombuffer(order, np.int32), pixels):
      draw = crop_flip_of(x[i], image, pad=4)
      assert draw is not None, "a batch image is no crop and flip of its index's image"
      draws[step // 2].append(draw)
  untouched = (4, 4, False)
  if not augment:
    assert set(draws[0] + draws[1]) == {untouched}
    return
  assert sum(d == untouched for d in draws[0] + draws[1]) < 16
  # the draws are per place in the batch: a key that ignored the epoch would
  # give epoch 1 epoch 0's draws (the same one by chance 1 time in 162)
  assert sum(a != b for a, b in zip(draws[0], draws[1])) > 24


def test_evaluate_reports_the_mean_of_an_extra_per_example_metric():
  import jax.numpy as jnp
  from dynscale.data import pipeline
  trainer, state, dataset = pixel_mean_trainer(lambda images: jnp.mean(images, axis=(1, 2, 3)))
  metrics = trainer.evaluate(state, "val", jnp.float32(0.5))
  mean, std = pipeline.normalization_stats(dataset.name)
  normalized = (dataset.val_x.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)
  assert len(dataset.val_y) % 128 != 0, "the split must end in a padded batch"
  assert metrics["pixel_mean"] == pytest.approx(normalized.mean(axis=(1, 2, 3)).mean(),
                                                rel=1e-5)
  assert set(metrics) == {"accuracy", "loss", "pixel_mean"}
  assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0


def test_an_evaluation_of_part_of_a_split_reads_a_random_subset_not_its_first_examples():
  """Catches ``evaluate(limit=k)`` reading a split's first k examples: a split keeps
  its file's order, the CIFAR files are ordered by class, and CompactNet scores
  its candidates on such a subset. Here the validation images are sorted by
  class and each is a flat shade of its label: the subset's mean shade must be
  near the split's (the first examples' is far from it), and every call, of a
  trainer with the same seed, reads the same subset."""
  import jax.numpy as jnp
  from dynscale import data
  full = data.load("mnist_sample", val_size=300, seed=0)
  order = np.argsort(full.val_y, kind="stable")
  labels = full.val_y[order]
  shades = np.broadcast_to((25 * labels).astype(np.uint8)[:, None, None, None],
                           full.val_x.shape).copy()

  def shade(val_x, val_y, limit, seed=0):
    trainer, state, _ = pixel_mean_trainer(
        lambda images: jnp.mean(images, axis=(1, 2, 3)),
        dataclasses.replace(full, val_x=val_x, val_y=val_y), seed)
    return trainer.evaluate(state, "val", 1.0, limit=limit)["pixel_mean"]

  whole, subset = shade(shades, labels, 0), shade(shades, labels, 100)
  first = shade(shades[:100], labels[:100], 0)
  assert abs(subset - whole) < abs(first - whole) / 4, (whole, subset, first)
  assert shade(shades, labels, 100) == subset != shade(shades, labels, 100, seed=1)
  assert shade(shades, labels, 300) == whole  # the whole split when the limit covers it


def test_an_extra_metric_needs_one_value_per_example():
  import jax.numpy as jnp
  trainer, state, _ = pixel_mean_trainer(lambda images: jnp.mean(images))
  with pytest.raises(ValueError, match=r"'pixel_mean' must have one value per example"):
    trainer.evaluate(state, "val", jnp.float32(0.5))


# --------------------------------------------------------------------------
# Augmentation: the standard CIFAR crop and flip, written out in NumPy.
# --------------------------------------------------------------------------


def test_crop_and_flip_take_the_window_at_each_offset_of_the_zero_padded_image():
  """Each image zero-padded by 4, the 8x8 window at its offset (both extreme
  corners included), mirrored left to right where flipped."""
  import jax.numpy as jnp
  from dynscale.data import pipeline
  x = np.random.default_rng(0).integers(1, 256, (4, 8, 8, 3)).astype(np.float32)
  offsets = np.array([[0, 0], [8, 8], [3, 5], [8, 0]], np.int32)
  flips = np.array([False, True, True, False])
  got = pipeline.crop_flip(jnp.asarray(x), jnp.asarray(offsets), jnp.asarray(flips), pad=4)
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i, ((row, col), flip) in enumerate(zip(offsets, flips)):
    window = padded[i, row:row + 8, col:col + 8]
    np.testing.assert_array_equal(got[i], window[:, ::-1] if flip else window)


def test_crop_offsets_cover_zero_to_twice_the_padding_and_half_the_images_flip():
  import jax
  from dynscale.data import pipeline
  offsets, flips = pipeline.crop_flip_params(jax.random.key(0), 4000, pad=4)
  offsets = np.asarray(offsets)
  assert set(np.unique(offsets[:, 0])) == set(range(9)) == set(np.unique(offsets[:, 1]))
  assert np.mean(np.asarray(flips)) == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------
# Early stopping
# --------------------------------------------------------------------------


def test_early_stopping_counts_patience_and_keeps_the_best():
  """Patience counts the evaluations since the last improvement: the one at
  epoch 3 is forgiven by epoch 4's improvement, so the stop comes at 6, not 5."""
  es, stops = EarlyStopping(patience=2), []
  for epoch, value in enumerate([0.5, 0.6, 0.59, 0.61, 0.60, 0.60], start=1):
    es = es.update(value, epoch)
    stops.append(es.should_stop)
  assert stops == [False] * 5 + [True]
  assert es.best == 0.61 and es.best_epoch == 4
  assert EarlyStopping.from_json(es.to_json()) == es


def test_early_stopping_rejects_bad_settings():
  with pytest.raises(ValueError, match="patience"):
    EarlyStopping(patience=0)
  with pytest.raises(ValueError, match="mode"):
    EarlyStopping(patience=1, mode="up")


# --------------------------------------------------------------------------
# Bad configs fail before any compute, naming the field and allowed values.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ({"data.dataset": "imagenet"}, r"data.dataset must be one of \("),
    ({"model.name": "resnet"}, r"model.name must be one of \("),
    ({"data.batch_size": 0}, r"data.batch_size must be a positive integer"),
    ({"data.batch_size": -8}, r"data.batch_size must be a positive integer"),
    ({"optimizer.learning_rate": 0.0}, r"optimizer.learning_rate must be a positive number"),
    ({"optimizer.learning_rate": -1e-3}, r"optimizer.learning_rate must be a positive number"),
    ({"train.dp": 0.0}, r"train.dp must be in \(0, 1\]"),
    ({"train.dp": 1.5}, r"train.dp must be in \(0, 1\]"),
    ({"eval.dps": (0.5, 1.2)}, r"eval.dps\[1\] must be in \(0, 1\]"),
    ({"model.profile": "cubic"}, r"model.profile must be one of \("),
    ({"eval.bn_mode": "frozen"}, r"eval.bn_mode must be one of \('shared', 'recalibrated'\)"),
    ({"data.augment": "False"}, r"data.augment must be one of \('auto', 'on', 'off'\), got 'False'"),
    ({"train.num_epochs": 0}, r"train.num_epochs must be a positive integer, got 0"),
    ({"train.steps_per_chunk": 0}, r"train.steps_per_chunk must be a positive integer, got 0"),
    ({"train.patience": -1}, r"train.patience must be an integer >= 0, got -1"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ({"data.eval_batch_size": 0}, r"data.eval_batch_size must be a positive integer"),
    ({"data.val_size": -1}, r"data.val_size must be an integer >= 0, got -1"),
    ({"data.train_examples": -10}, r"data.train_examples must be an integer >= 0, got -10"),
    # the checks that need the data name the config's field too
    ({"data.val_size": 10 ** 6}, r"data.val_size must be in \[0, \d+\] \(the training split "),
    ({"data.train_examples": 1005},
     r"data.train_examples must be a positive multiple of the 10 classes"),
    ({"data.batch_size": 5000},
     r"data.batch_size \(5000\) exceeds the \d+ training examples of mnist_sample"),
    ({"model.width_multiplier": 0.0}, r"model.width_multiplier must be a positive number"),
    ({"model.dtype": "float16"}, r"model.dtype must be one of \('float32', 'bfloat16'\)"),
    ({"model.init_from": "/nonexistent"}, r"model.init_from must name an exported network"),
    ({"optimizer.name": "lamb"}, r"optimizer.name must be one of \("),
    ({"optimizer.schedule": "cyclic"}, r"optimizer.schedule must be one of \("),
    ({"optimizer.momentum": -0.1}, r"optimizer.momentum must be a finite number >= 0, got -0.1"),
    ({"optimizer.weight_decay": -1e-4}, r"optimizer.weight_decay must be a finite number >= 0"),
    ({"optimizer.weight_decay": float("nan")},
     r"optimizer.weight_decay must be a finite number >= 0, got nan"),
    ({"optimizer.momentum": float("nan")},
     r"optimizer.momentum must be a finite number >= 0, got nan"),
    ({"optimizer.schedule": "step", "optimizer.step_every": 0},
     r"optimizer.step_every must be a positive integer, got 0"),
    ({"optimizer.schedule": "step", "optimizer.step_factor": 1.5},
     r"optimizer.step_factor must be in \(0, 1\], got 1.5"),
    ({"optimizer.learning_rate": float("nan")},
     r"optimizer.learning_rate must be a positive number, got nan"),
    ({"model.width_multiplier": float("inf")},
     r"model.width_multiplier must be a positive number, got inf"),
    ({"optimizer.warmup_steps": -50}, r"optimizer.warmup_steps must be an integer >= 0, got -50"),
    # early stopping with nothing to read: every epoch a NaN, the run stopped after `patience`
    ({"data.val_size": 0, "train.patience": 2},
     r"data.val_size must be >= 1: train.patience > 0 stops early on validation accuracy "
     r"\(or set train.patience 0\); got data.val_size 0"),
])
def test_bad_config_raises_a_clear_error_before_compute(tmp_path, override, message):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    idp_training.train_and_evaluate(tiny_config(**override), str(workdir))
  assert not workdir.exists(), "validation must happen before anything is written"


@pytest.mark.parametrize("setting, dataset, augmented", [
    ("auto", "mnist", False), ("auto", "cifar10", True), ("on", "mnist", True),
    ("off", "cifar10", False)])
def test_data_augment_on_and_off_override_the_datasets_recipe(setting, dataset, augmented):
  config = tiny_config(**{"data.augment": setting})
  assert runs.augment(config, dataset) is augmented


def test_data_augment_off_on_the_command_line_turns_augmentation_off():
  # absl/ml_collections parse the flag into the field's type: 'off' must arrive
  # as a value validation accepts and runs.augment reads as off.
  argv = ["launcher", "--config=experiments/configs/baseline.py", "--config.data.augment=off",
          "--config.data.dataset=cifar10"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  validation.check_data(config.data)
  assert runs.augment(config, config.data.dataset) is False


def test_core_checks_need_no_dp_fields_and_the_idp_method_adds_them():
  config = tiny_config()
  del config.train["dp"]
  del config["eval"]
  validation.check_core(config)  # method-neutral: no train.dp, no eval block
  with pytest.raises((AttributeError, KeyError)):
    idp_training.check_config(config)
  config = tiny_config(**{"train.dp": 0.0, "eval.bn_mode": "frozen"})
  validation.check_core(config)
  with pytest.raises(ValueError, match=r"train.dp must be in \(0, 1\], got 0.0"):
    idp_training.check_config(config)


def test_missing_data_files_name_the_files(tmp_path):
  empty = tmp_path / "no-data"
  empty.mkdir()
  config = tiny_config(**{"data.dataset": "cifar10", "data.data_dir": str(empty)})
  with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
    idp_training.train_and_evaluate(config, str(tmp_path / "run"))


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="workdir"):
    idp_training.train_and_evaluate(tiny_config(), str(blocker / "run"))


# --------------------------------------------------------------------------
# Curves: a sweep, the tables and the launcher summary read any curve.
# --------------------------------------------------------------------------


class FlopsMethod:
  """A stand-in method whose curve is not a DP curve: accuracy = level * flops_ratio."""

  @staticmethod
  def check_config(config):
    if config.level <= 0:
      raise ValueError(f"level must be > 0, got {config.level}")

  @staticmethod
  def train_and_evaluate(config, workdir):
    from dynscale.train import runs
    points = [(r, config.level * r) for r in (0.25, 1.0)]
    return {"curves": {"accuracy_by_flops": runs.curve("flops_ratio", "test_accuracy", points)},
            "level": config.level, "config": config.to_dict(),
            "model": {"name": "stand-in"}, "dataset": {"name": "none"}}


def test_a_sweep_gathers_and_plots_any_method_curve(tmp_path):
  import ml_collections
  from dynscale.train import sweep
  from experiments import main as launcher
  config = ml_collections.ConfigDict({"method": "flops", "level": 0.5, "title": "by FLOPs",
                                      "variants": {"low": {}, "high": {"level": 0.75}}})
  figure = sweep.run_variants(config, str(tmp_path), {"flops": FlopsMethod})
  assert json.loads((tmp_path / "results.json").read_text()) == figure
  assert figure["variants"]["high"] == {
      "method": "flops", "model": "stand-in", "dataset": "none",
      "curves": {"accuracy_by_flops": {"x": "flops_ratio", "y": "test_accuracy",
                                       "points": [[0.25, 0.1875], [1.0, 0.75]]}},
      "level": 0.75}
  assert figure["title"] == "by FLOPs: stand-in on none (flops)"
  assert (tmp_path / "accuracy_by_flops.png").stat().st_size > 0
  text = launcher.summary(figure, str(tmp_path))
  assert "accuracy_by_flops (test_accuracy):" in text
  rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
  columns = {label: {x: rows[x][i] for x in ("0.25", "1", "mean")}
             for i, label in enumerate(rows["flops_ratio"])}
  assert columns == {"low": {"0.25": "0.1250", "1": "0.5000", "mean": "0.3125"},
                     "high": {"0.25": "0.1875", "1": "0.7500", "mean": "0.4688"}}


def test_curves_with_different_axes_are_not_tabulated_together():
  from dynscale import plots
  from dynscale.train import runs
  with pytest.raises(ValueError, match="share one x and one y axis"):
    plots.format_curves_table({"a": runs.curve("dp", "test_accuracy", [(1.0, 0.9)]),
                               "b": runs.curve("flops_ratio", "test_accuracy", [(1.0, 0.9)])})


def test_a_figure_shows_its_whole_title_and_a_legend_that_hides_no_point():
  import matplotlib.pyplot as plt
  from dynscale import plots
  from dynscale.train import runs
  # A Table 1 column: six variants and a title longer than the figure is wide.
  curves = {f"variant-{i}": runs.curve("dp", "test_accuracy",
                                       [(dp / 10, 0.1 * i + dp / 100) for dp in range(1, 11)])
            for i in range(6)}
  title = ("000 Table 1 / Fig. 4, from scratch: vgg16, vgg16_gap on cifar10 "
           "(idp, mpidp, tesla), cpu protocol")
  fig = plots.curves_figure(curves, title=title)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  ax = fig.axes[0]
  inside = fig.bbox
  drawn = ax.title.get_window_extent(renderer)
  legend = ax.get_legend().get_window_extent(renderer)
  for box in (drawn, legend):
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and box.y1 <= inside.y1, box
  assert legend.x0 >= ax.get_window_extent(renderer).x1  # beside the axes, not over the lines
  assert ax.title.get_text().replace("\n", " ") == title
  plt.close(fig)


# --------------------------------------------------------------------------
# Every run exports its best state; model.init_from continues from an export.
# --------------------------------------------------------------------------


def test_a_run_exports_its_best_state_and_a_later_stage_starts_from_it(tmp_path):
  import jax.numpy as jnp
  from dynscale import data
  from dynscale.nn import sliced
  from dynscale.train import runs
  config = tiny_config(**{"train.num_epochs": 2, "train.checkpoint": False})
  first = idp_training.train_and_evaluate(config, str(tmp_path / "first"))
  assert first["export"] == str(tmp_path / "first" / "export")
  assert first["model"]["init_from"] is None

  # The export is the evaluated state: its sliced network scores the reported accuracy.
  exported = sliced.load(tmp_path / "first" / "export")
  dataset = data.load("mnist_sample", val_size=300)
  images = data.normalize(dataset.test_x, *data.normalization_stats(dataset.name))
  accuracy = float(jnp.mean(jnp.argmax(exported(images, 1.0), -1) == dataset.test_y))
  points = dict(map(tuple, first["curves"]["test_accuracy_by_dp"]["points"]))
  assert accuracy == pytest.approx(points[1.0], abs=2e-3)

  # A run directory or the export itself; the model fields of the config are not used.
  for source in (tmp_path / "first", tmp_path / "first" / "export"):
    later = tiny_config(**{"model.init_from": str(source), "model.width_multiplier": 0.5})
    run = runs.start(later, str(tmp_path / "later"))
    assert run.arch == exported.arch
    jax.tree.map(np.testing.assert_array_equal, run.model.pure_variables(), exported.variables)
    assert run.init_from == str(tmp_path / "first" / "export")
  second = tiny_config(**{"model.init_from": str(tmp_path / "first"), "train.num_epochs": 1,
                          "train.checkpoint": False})
  idp_training.train_and_evaluate(second, str(tmp_path / "second"))
  assert read_results(tmp_path / "second")["model"]["init_from"] == str(
      tmp_path / "first" / "export")


def test_init_from_without_an_export_fails_before_anything_is_written(tmp_path):
  (tmp_path / "run-without-export").mkdir()
  config = tiny_config(**{"model.init_from": str(tmp_path / "run-without-export")})
  with pytest.raises(ValueError, match=r"model.init_from must name an exported network"):
    idp_training.train_and_evaluate(config, str(tmp_path / "later"))
  assert not (tmp_path / "later").exists()


def test_init_from_an_export_for_other_inputs_is_refused(tmp_path):
  from dynscale.nn import models, sliced
  arch = models.architecture("mlp", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=0.1)
  sliced.export(models.build(arch, rngs=models.init_rngs(0)), tmp_path / "cifar-mlp")
  config = tiny_config(**{"model.init_from": str(tmp_path / "cifar-mlp")})
  with pytest.raises(ValueError, match=r"model.init_from: the exported network takes inputs "
                                       r"\(32, 32, 3\) with 10 classes; mnist_sample has "
                                       r"\(28, 28, 1\)"):
    idp_training.train_and_evaluate(config, str(tmp_path / "later"))


def _exported_mlp(directory, **fields):
  from dynscale.nn import models, sliced
  arch = models.architecture("tesla_mlp", num_classes=10, input_shape=(28, 28, 1),
                             width_multiplier=0.1, **fields)
  sliced.export(models.build(arch, rngs=models.init_rngs(0)), directory)
  return str(directory)


def test_init_from_is_checked_by_the_network_it_names_not_model_fields_it_replaces(tmp_path):
  """With ``model.init_from`` the model fields are unused: each method's checks
  read the exported network (``runs.planned_architecture``), and refuse, naming
  model.init_from, before anything is written: an MP-IDP network for IDP or
  TESLA (it failed at the first step), a network without a GAP head for
  TESLA's CAM (every stage trained, then CAM failed), a linear-profile
  network for ATP (which started from it, not from one)."""
  from dynscale.tesla import training as tesla_training
  from experiments.configs import tesla_main
  mp = _exported_mlp(tmp_path / "mp", profile="linear", mp_profiles=((0.0, 0.4), (0.4, 1.0)))
  linear = _exported_mlp(tmp_path / "linear", profile="linear")
  ones = _exported_mlp(tmp_path / "ones", profile="all-one")
  with pytest.raises(ValueError, match=r"model.init_from: IDP trains one profile; the network "
                                       r"has MP-IDP's profiles"):
    idp_training.train_and_evaluate(tiny_config(**{"model.init_from": mp}),
                                    str(tmp_path / "idp"))

  def tesla(**overrides):
    config = tesla_main.get_config()
    config.data.val_size = 300
    config.update_from_flattened_dict(overrides)
    return config
  cases = [
      (tesla(**{"model.init_from": mp}), r"model.init_from: TESLA trains one profile"),
      (tesla(**{"model.init_from": ones, "cam.enabled": True, "model.name": "vgg16_gap"}),
       r"model.init_from: CAM needs a GAP head: arch must end in a map, 'global_avgpool'"),
      (tesla(**{"model.init_from": linear, "atp.enabled": True, "model.profile": "all-one"}),
       r"model.init_from: ATP starts from the all-one profile; .*gamma"),
  ]
  for config, match in cases:
    with pytest.raises(ValueError, match=match):
      tesla_training.train_and_evaluate(config, str(tmp_path / "tesla"))
  assert not (tmp_path / "idp").exists() and not (tmp_path / "tesla").exists()
  tesla_training.check_config(tesla(**{"model.init_from": ones, "atp.enabled": True,
                                       "model.profile": "linear"}))  # the export's profile


def test_a_run_that_failed_before_its_first_checkpoint_does_not_hold_its_workdir(tmp_path):
  """A run that fails after :func:`runs.start` but before any checkpoint is
  saved leaves its config, empty checkpoint directories and compiled
  programs; a corrected config then runs there (it was refused as another
  config's started run). A finished checkpoint still holds the workdir."""
  config = tiny_config(**{"train.num_epochs": 1})
  run = runs.start(config, str(tmp_path / "run"))
  (tmp_path / "run" / "checkpoints" / "train").mkdir(parents=True)  # opened, nothing saved
  (tmp_path / "run" / "checkpoints" / "train-best").mkdir()
  (tmp_path / "run" / runs.COMPILATION_CACHE).mkdir()  # the launcher's compiled programs
  (tmp_path / "run" / runs.COMPILATION_CACHE / "jit_step-0123").write_bytes(b"program")
  corrected = tiny_config(**{"train.num_epochs": 1, "optimizer.learning_rate": 0.05})
  runs.start(corrected, str(tmp_path / "run"))
  idp_training.train_and_evaluate(corrected, str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"holds a run of another config"):
    runs.start(config, run.workdir)


# --------------------------------------------------------------------------
# One launcher: every config names a registered method and passes its checks.
# --------------------------------------------------------------------------

CONFIGS = [("baseline", None), ("tesla_main", None), ("idp_fig7", "sample"),
           *[("idp_fig8", panel) for panel in ("mlp", "binary_net", "vgg16", "mobilenet")],
           ("idp_fig9", "mlp"), ("idp_fig9", "vgg16"),
           *[("tesla_mlp_mnist", subset)
             for subset in ("all", "atp", "monitors", "rtesla_selection")],
           *[("tesla_vgg16_cifar", column)
             for column in ("cifar10", "cifar100", "cifar10-recipe", "cifar100-recipe")],
           *[("sanp_cifar10", b) for b in ("m_cifarnet", "vgg19", "resnet18")],
           *[("sanp_cifar100", b) for b in ("vgg19", "resnet18")], ("sanp_ablation", None),
           *[("sanp_cpu", subset) for subset in ("all", "quick", "single")]]


@pytest.mark.parametrize("name, arg", CONFIGS)
def test_every_config_names_a_registered_method_and_passes_its_checks(name, arg):
  import importlib
  from dynscale.train import sweep
  from experiments import main as launcher
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config() if arg is None else module.get_config(arg)
  assert config.method in launcher.METHODS
  if config.get("variants"):
    sweep.check_variants(config, launcher.METHODS)
  else:
    launcher.METHODS[config.method].check_config(config)


def test_the_launcher_refuses_an_unknown_method(tmp_path):
  from experiments import main as launcher
  config = tiny_config(method="netadapt")
  with pytest.raises(ValueError, match=r"method must be one of \('idp', 'mpidp', 'tesla', "
                                       r"'sanp', 'compactnet'\), got 'netadapt'"):
    launcher.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_the_launcher_keeps_compiled_programs_in_the_workdir_unless_told_otherwise(tmp_path):
  """Without ``JAX_COMPILATION_CACHE_DIR`` (the tests set one) a launcher run
  writes its compiled programs to ``<workdir>/compilation-cache``, which does
  not make the workdir a started run; ``--compilation_cache=off`` writes
  none. Catches a flag that sets nothing, and an 'off' that still caches
  (that the cache does not hold a workdir: test_a_run_that_failed_before_
  its_first_checkpoint_does_not_hold_its_workdir)."""
  env = {key: value for key, value in os.environ.items()
         if key != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def launch(workdir, *flags):
    subprocess.run(launcher_command(workdir, "--config.train.num_epochs=1", *flags), cwd=ROOT,
                   env=env, check=True, capture_output=True)
  launch(tmp_path / "default")
  assert any((tmp_path / "default" / runs.COMPILATION_CACHE).iterdir())
  launch(tmp_path / "off", "--compilation_cache=off")
  assert not (tmp_path / "off" / runs.COMPILATION_CACHE).exists()


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------


def test_an_atomic_write_over_a_file_does_what_a_plain_write_does(tmp_path):
  """An existing file keeps its permissions, a symbolic link stays a link
  (its target rewritten), and the longest name a plain ``open`` takes works.
  Catches each replaced as a new file (0o600 became 0o644; the link became a
  file beside an unchanged target) and a temporary name longer than allowed."""
  private = tmp_path / "private.json"
  private.write_text("{}")
  private.chmod(0o600)
  io.write_json_atomic(str(private), {"a": 1})
  assert stat.S_IMODE(private.stat().st_mode) == 0o600
  target, link = tmp_path / "target.json", tmp_path / "link.json"
  target.write_text("{}")
  link.symlink_to(target)
  io.write_json_atomic(str(link), {"b": 2})
  assert link.is_symlink() and json.loads(target.read_text()) == {"b": 2}
  longest = tmp_path / ("r" * 250 + ".json")
  io.write_json_atomic(str(longest), {"c": 3})
  assert json.loads(longest.read_text()) == {"c": 3}


def test_atomic_json_write_keeps_the_old_file_when_serialisation_fails(tmp_path):
  path = tmp_path / "results.json"
  io.write_json_atomic(str(path), {"a": 1})
  with pytest.raises(TypeError):
    io.write_json_atomic(str(path), {"a": object()})
  assert json.loads(path.read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_run_that_fails_writing_its_results_keeps_the_previous_results(tmp_path):
  """Catches ``results.json`` written in place by ``runs.finish``: a value that
  cannot be serialised, found after part of the file was written, would leave
  it truncated; the previous run's file must survive whole."""
  run = runs.start(tiny_config(), str(tmp_path))
  graphdef, state = create_train_state(run.model, optax.sgd(0.1))
  first = runs.finish(run, graphdef, state, {"test_accuracy": 0.5}, exported="kept")
  with pytest.raises(TypeError):
    runs.finish(run, graphdef, state, {"test_accuracy": 0.5, "unserialisable": object()},
                exported="kept")
  assert read_results(str(tmp_path)) == json.loads(json.dumps(first))


def test_an_atomic_write_that_fails_at_the_rename_leaves_no_temporary_file(tmp_path):
  (tmp_path / "results.json").mkdir()  # a directory in the way: os.replace fails
  (tmp_path / "results.json" / "keep").write_text("x")
  with pytest.raises(OSError):
    io.write_json_atomic(str(tmp_path / "results.json"), {"a": 1})
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_atomic_write_renames_within_the_destinations_directory(tmp_path, monkeypatch):
  """The temporary file sits beside its destination: a rename across file
  systems (from the system's temporary directory) is a copy, not atomic."""
  renames = []
  real_replace = os.replace
  monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)),
                                                       real_replace(src, dst)))
  io.write_json_atomic(str(tmp_path / "sub" / "results.json"), {"a": 1})
  (source, destination), = renames
  assert os.path.dirname(source) == os.path.dirname(destination) == str(tmp_path / "sub")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_an_atomic_write_gets_the_permissions_a_plain_write_would(tmp_path, mask):
  """``mkstemp`` makes its file readable by its owner alone: a result file moved
  into place as it is could not be read by anyone else (a shared workdir)."""
  previous = os.umask(mask)
  try:
    io.write_json_atomic(str(tmp_path / "results.json"), {"a": 1})
    with open(tmp_path / "plain.json", "w") as f:
      f.write("{}")
  finally:
    os.umask(previous)
  assert stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode) == 0o666 & ~mask
  assert stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode) == 0o666 & ~mask


# --------------------------------------------------------------------------
# bf16 compute, float32 parameters
# --------------------------------------------------------------------------


def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
  config = tiny_config(**{"model.dtype": "bfloat16", "train.num_epochs": 1,
                          "train.checkpoint": False})
  results = idp_training.train_and_evaluate(config, str(tmp_path))
  assert results["test_accuracy"] > 0.5  # ten classes: chance is 0.1
  assert not (tmp_path / "checkpoints").exists()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any("train/images_per_s" in line for line in lines)


# --------------------------------------------------------------------------
# The scanned chunk (accelerators) and the looped one (CPU) take the same steps.
# --------------------------------------------------------------------------


def test_scanned_and_looped_chunks_take_the_same_steps():
  import jax.numpy as jnp
  import optax
  from dynscale.data import pipeline
  from dynscale.nn import models
  from dynscale.train import steps
  from dynscale.train.state import create_train_state

  arch = models.architecture("tesla_mlp", num_classes=10, input_shape=(28, 28, 1),
                             width_multiplier=0.1)
  rng = np.random.default_rng(0)
  data = (jnp.asarray(rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)),
          jnp.asarray(rng.integers(0, 10, 64), jnp.int32))
  # augmented: each step's crop and flip come from its own key, which both must draw alike
  batch_fn = lambda d, idx, key: pipeline.make_batch(d[0], d[1], idx, augment=True, key=key,
                                                    mean=(0.5,), std=(0.5,))
  idx = jnp.arange(64).reshape(4, 16)
  results = []
  for scan in (True, False):
    tx = optax.adam(1e-2)
    graphdef, state = create_train_state(models.build(arch, rngs=models.init_rngs(0)), tx)
    chunk = steps.make_train_chunk(graphdef, tx, steps.classification_loss, batch_fn,
                                   steps.data_mesh(), scan=scan)
    state, metrics = chunk(state, data, idx, jax.random.key(0), jnp.float32(0.5))
    results.append((jax.tree.map(np.asarray, state.params), float(metrics["loss"]),
                    int(state.step)))
  (p_scan, loss_scan, n_scan), (p_loop, loss_loop, n_loop) = results
  assert n_scan == n_loop == 4
  np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               p_scan, p_loop)


def test_the_step_schedule_divides_the_learning_rate_every_step_every_steps(tmp_path):
  from dynscale.train import optim
  config = baseline.get_config().optimizer
  config.update(dict(schedule="step", learning_rate=0.1, step_every=100, step_factor=0.1))
  schedule = optim.learning_rate_schedule(config, total_steps=1000)
  np.testing.assert_allclose([schedule(i) for i in (0, 99, 100, 199, 200, 450)],
                             [0.1, 0.1, 0.01, 0.01, 0.001, 1e-5], rtol=1e-5)
  bad = tiny_config(**{"optimizer.schedule": "step", "optimizer.step_factor": 1.5})
  with pytest.raises(ValueError, match=r"optimizer.step_factor must be in \(0, 1\], got 1.5"):
    idp_training.train_and_evaluate(bad, str(tmp_path / "run"))


def test_rmsprop_steps_like_tensorflow_1_and_its_decay_is_checked():
  import jax.numpy as jnp
  from dynscale.train import optim, validation
  config = baseline.get_config().optimizer
  config.update(dict(name="rmsprop", learning_rate=1e-3, momentum=0.0, weight_decay=0.0))
  config.decay = 0.9   # RMSProp's rho (paper 004, Table 4), not in the default block
  tx = optim.make_optimizer(config, total_steps=10)
  params = {"w": jnp.asarray([0.5, -1.0, 2.0])}
  g1, g2 = np.asarray([0.3, -2.0, 1e-3]), np.asarray([-0.1, 0.5, 4.0])
  state = tx.init(params)
  u1, state = tx.update({"w": jnp.asarray(g1)}, state, params)
  u2, _ = tx.update({"w": jnp.asarray(g2)}, state, params)
  rho, lr, eps = 0.9, 1e-3, 1e-10
  ms1 = rho * 1.0 + (1 - rho) * g1**2  # TF1 starts the mean square at ones
  ms2 = rho * ms1 + (1 - rho) * g2**2
  np.testing.assert_allclose(u1["w"], -lr * g1 / np.sqrt(ms1 + eps), rtol=1e-6)
  np.testing.assert_allclose(u2["w"], -lr * g2 / np.sqrt(ms2 + eps), rtol=1e-6)

  validation.check_optimizer(config)
  validation.check_core(tiny_config(**{"optimizer.name": "rmsprop"}))
  for bad in (0.0, 1.0, 1.5, -0.1):
    config.decay = bad
    with pytest.raises(ValueError, match=rf"optimizer.decay must be in \(0, 1\), got {bad}"):
      validation.check_optimizer(config)


class StartsFromMethod:
  """A stand-in that records where each run started and exports nothing but a marker."""

  ran: list = []

  @staticmethod
  def check_config(config):
    if config.model.init_from:
      raise ValueError("model.init_from must not be checked for a variant reference")

  @staticmethod
  def train_and_evaluate(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    StartsFromMethod.ran.append((os.path.basename(workdir), config.model.init_from))
    return {"config": config.to_dict(), "model": {"name": "stand-in"},
            "dataset": {"name": "none"}}


def test_a_variant_can_start_from_another_variants_export(tmp_path):
  import ml_collections
  from dynscale.train import sweep
  config = ml_collections.ConfigDict({
      "method": "starts", "seed": 0, "model": {"init_from": ""}, "seeds": (0, 1),
      "variants": {"a-search": {"model": {"init_from": "variant:z-pretrain"}},
                   "z-pretrain": {}}})
  StartsFromMethod.ran = []
  figure = sweep.run_variants(config, str(tmp_path), {"starts": StartsFromMethod})
  # the referenced variant runs first although it sorts last; each seed starts from its own
  assert [name for name, _ in StartsFromMethod.ran] == [
      "z-pretrain-seed0", "z-pretrain-seed1", "a-search-seed0", "a-search-seed1"]
  assert dict(StartsFromMethod.ran)["a-search-seed1"] == str(tmp_path / "z-pretrain-seed1")
  assert list(figure["variants"]) == ["a-search-seed0", "a-search-seed1", "z-pretrain-seed0",
                                      "z-pretrain-seed1"]
  config.variants["a-search"].model.init_from = "variant:nowhere"
  with pytest.raises(ValueError, match="names variant 'nowhere-seed0'; it must be one of"):
    sweep.check_variants(config, {"starts": StartsFromMethod})
  # a chain (a -> b -> z): b's own start is a reference, so a is refused before anything runs
  config.variants["a-search"].model.init_from = "variant:b-middle"
  config.variants["b-middle"] = {"model": {"init_from": "variant:z-pretrain"}}
  with pytest.raises(ValueError, match=r"names variant 'b-middle-seed0'; it must be one of the "
                                       r"variants that start from scratch \['z-pretrain-seed0', "
                                       r"'z-pretrain-seed1'\]"):
    sweep.check_variants(config, {"starts": StartsFromMethod})


def test_only_some_variants_run_with_those_they_start_from_and_no_figure_is_written(tmp_path):
  import ml_collections
  from dynscale.train import sweep
  from experiments import main as launcher
  config = ml_collections.ConfigDict({
      "method": "starts", "seed": 0, "model": {"init_from": ""}, "seeds": (0, 1),
      "variants": {"a-search": {"model": {"init_from": "variant:z-pretrain"}},
                   "b-other": {}, "z-pretrain": {}}})
  StartsFromMethod.ran = []
  figure = sweep.run_variants(config, str(tmp_path), {"starts": StartsFromMethod},
                              only=["a-search"])
  assert [name for name, _ in StartsFromMethod.ran] == [
      "z-pretrain-seed0", "z-pretrain-seed1", "a-search-seed0", "a-search-seed1"]
  assert figure["partial"] and not (tmp_path / "results.json").exists()
  assert list(figure["by_variant"]) == ["a-search"]
  text = launcher.summary(figure, str(tmp_path))
  assert "rerun without --variants" in text and "a-search, mean±std over seeds ['0', '1']" in text
  for bad in (["a-search", "c"], []):
    with pytest.raises(ValueError, match=r"variants to run must be names from "
                                         r"\('a-search', 'b-other', 'z-pretrain'\)"):
      sweep.selected_runs(config, sweep.variant_configs(config), bad)
  with pytest.raises(ValueError, match="--variants=a-search needs a figure"):
    launcher.train_and_evaluate(ml_collections.ConfigDict({"method": "idp"}), str(tmp_path),
                                ["a-search"])


def test_distillation_loss_mixes_cross_entropy_with_hintons_soft_targets():
  """(1 - w) CE + w T^2 KL(teacher || student) of softened predictions, written out
  here with numpy; the teacher runs in evaluation mode and gets no gradient."""
  from dynscale.nn import models, sliced
  from dynscale.train import steps
  arch = models.architecture("mlp", num_classes=10, input_shape=(6, 6, 1), profile="all-one",
                             width_multiplier=0.25)
  student = models.build(arch, rngs=models.init_rngs(0))
  teacher = models.build(arch, rngs=models.init_rngs(1)).pure_variables()
  images = jax.random.normal(jax.random.key(2), (5, 6, 6, 1))
  labels = np.array([0, 3, 9, 3, 1])
  s = np.asarray(student(images, 1.0, train=True), np.float64)
  t = np.asarray(sliced.apply_sliced(arch, teacher, images, 1.0), np.float64)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -log_softmax(s)[np.arange(5), labels].mean()
  for weight, temperature in [(0.0, 4.0), (0.5, 4.0), (1.0, 2.0)]:
    p_teacher = np.exp(log_softmax(t / temperature))
    kl = (p_teacher * (log_softmax(t / temperature) - log_softmax(s / temperature))).sum(-1)
    want = (1 - weight) * ce + weight * temperature**2 * kl.mean()
    loss, metrics = steps.distillation_loss(arch, weight, temperature)(
        student, images, labels, teacher)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["cross_entropy"], ce, rtol=1e-5)
  grads = jax.grad(lambda v: steps.distillation_loss(arch, 1.0, 4.0)(
      student, images, labels, v)[0])(teacher)
  assert all(not np.any(g) for g in jax.tree.leaves(grads))
