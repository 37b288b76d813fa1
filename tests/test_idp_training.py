"""IDP training: MP-IDP freezes earlier profiles' channels bit for bit, BN
recalibration helps low DPs, and the figure launchers run end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dynscale import data, idp
from dynscale.nn import models, spec
from dynscale.idp import evaluation, mpidp
from dynscale.train import loop, runs, steps
from dynscale.train.state import create_train_state
from experiments import main as launcher
from experiments.configs import idp_fig7, idp_fig9
from blind_selection import val_accuracy_by_hand


def small_cnn(profiles=None):
  """A LeNet-sized IDP conv net for 28x28 digits (BN, pooling, IDP dense head)."""
  return {
      "name": "small_cnn", "input_shape": [28, 28, 1], "num_classes": 10,
      "profile": "linear", "profiles": profiles,
      "layers": [
          {"kind": "conv", "features": 8},
          {"kind": "maxpool", "window": 2},
          {"kind": "conv", "features": 16, "idp": True},
          {"kind": "maxpool", "window": 2},
          {"kind": "conv", "features": 16, "idp": True},
          {"kind": "global_avgpool"},
          {"kind": "flatten"},
          {"kind": "dense", "features": 10, "idp": True},
      ],
  }


@pytest.fixture(scope="module")
def digits():
  full = data.load("mnist_sample", val_size=300, seed=0)
  return dataclasses.replace(full, train_x=full.train_x[:1500], train_y=full.train_y[:1500])


def make_trainer(dataset, model, tx, loss_fn, forward=steps.eval_forward):
  graphdef, state = create_train_state(model, tx)
  trainer = loop.Trainer(graphdef=graphdef, tx=tx, loss_fn=loss_fn, forward=forward,
                         dataset=dataset, batch_size=50, eval_batch_size=300, augment=False,
                         seed=0, steps_per_chunk=10)
  return trainer, trainer.place(state)


def test_mp_idp_stage_leaves_frozen_entries_bit_identical(digits):
  arch = small_cnn(profiles=[[0.0, 0.5], [0.5, 1.0]])
  model = models.build(arch, rngs=models.init_rngs(0))
  variables = model.pure_variables()
  frozen = mpidp.frozen_entries(arch, variables, stage=1)
  params_frozen = mpidp.restrict(frozen, nnx.state(model, nnx.Param).to_pure_dict())
  stats_frozen = mpidp.restrict(frozen, nnx.state(model, nnx.BatchStat).to_pure_dict())
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), mpidp.freeze(params_frozen))
  trainer, state = make_trainer(digits, model, tx, mpidp.stage_loss(1, 1.0, stats_frozen),
                                mpidp.profile_forward(arch["profiles"]))
  before = jax.tree.map(np.array, (state.params, state.model_state))
  state = trainer.fit(state, task=jnp.float32(1.0), num_epochs=1, stage="profile1").state
  after = jax.tree.map(np.asarray, (state.params, state.model_state))
  stats = lambda tree: mpidp.restrict(tree, stats_frozen)
  changed_trainable = []
  for mask_tree, old_tree, new_tree in ((params_frozen, before[0], after[0]),
                                        (stats_frozen, stats(before[1]), stats(after[1]))):
    for mask, old, new in zip(jax.tree.leaves(mask_tree), jax.tree.leaves(old_tree),
                              jax.tree.leaves(new_tree)):
      mask = np.asarray(mask)
      np.testing.assert_array_equal(old[mask].view(np.uint32), new[mask].view(np.uint32))
      if (~mask).any():
        changed_trainable.append(np.abs(old[~mask] - new[~mask]).max())
  assert max(changed_trainable) > 1e-3, "the unfrozen entries must train"
  # Stage 1 freezes what profile 0 reads: conv 2's first 8 of 16 filters on its first
  # 4 of 8 input channels, and profile 0's own first and last layers entirely.
  kernel = np.asarray(frozen["layers"][2]["kernel"])
  assert kernel[:, :, :4, :8].all() and not kernel[:, :, 4:, :].any()
  assert not kernel[:, :, :, 8:].any()
  assert np.asarray(frozen["layers"][0][0]["kernel"]).all()
  assert not np.asarray(frozen["layers"][0][1]["kernel"]).any()


@pytest.mark.parametrize("stage, dp", [(0, 0.5), (1, 1.0), (1, 0.75)])
def test_mp_idp_stage_loss_is_the_masked_network_at_the_stage_dp(digits, stage, dp):
  arch = small_cnn(profiles=[[0.0, 0.5], [0.5, 1.0]])
  model = models.build(arch, rngs=models.init_rngs(0))
  stats_frozen = mpidp.restrict(mpidp.frozen_entries(arch, model.pure_variables(), stage),
                                nnx.state(model, nnx.BatchStat).to_pure_dict())
  images, labels = jnp.asarray(digits.train_x[:32] / 255.0, jnp.float32), digits.train_y[:32]

  def masked(model):
    before = nnx.state(model, nnx.BatchStat).to_pure_dict()
    logits = model(images, dp, train=True, profile_index=stage)
    after = nnx.state(model, nnx.BatchStat).to_pure_dict()
    nnx.update(model, nnx.State(jax.tree.map(lambda f, old, new: jnp.where(f, old, new),
                                             stats_frozen, before, after)))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  def stats_of(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat).to_pure_dict())

  loss_fn = mpidp.stage_loss(stage, dp, stats_frozen)
  reference = models.build(arch, rngs=models.init_rngs(0))
  want_loss, want_grads = nnx.jit(nnx.value_and_grad(masked))(reference)
  (got_loss, _), got_grads = nnx.jit(nnx.value_and_grad(
      lambda m: loss_fn(m, images, labels, jnp.float32(dp)), has_aux=True))(model)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               got_grads.to_pure_dict(), want_grads.to_pure_dict())
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
               stats_of(model), stats_of(reference))
  assert any(not np.allclose(s, 0) and not np.allclose(s, 1)
             for s in jax.tree.leaves(stats_of(model)))  # the statistics did move


def test_bn_recalibration_changes_statistics_and_raises_low_dp_accuracy(digits):
  arch = small_cnn()
  model = models.build(arch, rngs=models.init_rngs(0))
  trainer, state = make_trainer(digits, model, optax.adam(1e-2), steps.classification_loss)
  state = trainer.fit(state, task=jnp.float32(1.0), num_epochs=3, stage="train").state
  dp = 0.5
  recalibrated = evaluation.recalibrated_state(trainer, state, dp, num_batches=10)
  old = np.asarray(state.model_state["layers"][2]["bn"]["mean"])
  new = np.asarray(recalibrated.model_state["layers"][2]["bn"]["mean"])
  k = idp.num_kept(16, dp)  # conv 2's outputs that conv 4 keeps at this DP
  assert not np.allclose(old[:k], new[:k]), "recalibration must change the kept channels"
  np.testing.assert_array_equal(old[k:], new[k:])
  shared = trainer.evaluate(state, "val", jnp.float32(dp))["accuracy"]
  recal = trainer.evaluate(recalibrated, "val", jnp.float32(dp))["accuracy"]
  assert recal > shared + 0.02, (shared, recal)


def tiny_figure(config, epochs=2):
  config.data.dataset = "mnist_sample"
  config.data.val_size = 300
  config.model.width_multiplier = 0.2
  config.train.num_epochs = epochs
  config.eval.dps = (0.2, 0.5, 1.0)
  config.tensorboard = False
  return config


def test_figure_7_launcher_writes_one_curve_per_profile(tmp_path):
  config = tiny_figure(idp_fig7.get_config("sample"), epochs=1)
  figure = launcher.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["variants"]) == {"all-one", "harmonic", "linear", "half-exp"}
  for name, summary in saved["variants"].items():
    curve = summary["curves"]["test_accuracy_by_dp"]
    assert (curve["x"], curve["y"]) == ("dp", "test_accuracy")
    assert [x for x, _ in curve["points"]] == [0.2, 0.5, 1.0]
    assert summary["bn_mode"] == "shared"
    assert summary["mean_test_accuracy"] == pytest.approx(
        np.mean([y for _, y in curve["points"]]))
    run = json.loads((tmp_path / name / "results.json").read_text())
    assert run["curves"]["test_accuracy_by_dp"] == curve
  assert (tmp_path / "test_accuracy_by_dp.png").stat().st_size > 0
  assert figure == saved


def test_figure_9_mp_idp_runs_each_profile(tmp_path, monkeypatch):
  """Each profile hands on its best epoch, and later profiles leave it as it was
  (its entries frozen): the exported network scores every profile's best
  validation accuracy at its DP, by hand, where a profile ended on an epoch
  that scored less. Catches a profile handing on its last epoch, and
  each profile replaying the first profile's batches (every epoch of the
  run reads its own order of the images)."""
  config = tiny_figure(idp_fig9.get_config("mlp"), epochs=3)
  config.train.patience = 2
  config.optimizer.learning_rate = 3e-2  # noisy enough that an epoch loses accuracy
  orders = set()
  chunks = loop.Trainer.epoch_chunks

  def recorded(self, epoch):
    for i, (idx, key) in enumerate(chunks(self, epoch)):
      orders.update([np.asarray(idx).tobytes()] if i == 0 else [])
      yield idx, key
  monkeypatch.setattr(loop.Trainer, "epoch_chunks", recorded)
  figure = launcher.train_and_evaluate(config, str(tmp_path))
  mp = json.loads((tmp_path / "mp-idp" / "results.json").read_text())
  assert mp["profiles"] == [[0.0, 0.2], [0.2, 0.4], [0.4, 1.0]]
  assert len(mp["epochs_run"]) == 3
  # the `linear` variant's 3 epochs read the orders of the run's first 3
  assert len(orders) == sum(mp["epochs_run"]) > max(mp["epochs_run"])
  logged = [json.loads(line) for line in (tmp_path / "mp-idp" / "metrics.jsonl").open()]
  scores = [[m[f"profile{s}/val_accuracy"] for m in logged if f"profile{s}/val_accuracy" in m]
            for s in range(3)]
  assert any(s[-1] < max(s) for s in scores), scores
  accuracy = val_accuracy_by_hand(tmp_path / "mp-idp" / "export", (0.2, 0.4, 1.0),
                                  config.data.val_size)
  assert list(accuracy.values()) == [pytest.approx(max(s), abs=1e-6) for s in scores]
  assert set(figure["variants"]) == {"linear", "mp-idp"}
  # The profiles share an IDP layer (001 Fig. 9): one that is not a per-profile copy.
  arch = mp["model"]["architecture"]
  shared_idp = [i for i, layer in enumerate(arch["layers"])
                if layer.get("idp") and i not in spec.separate_layers(arch)]
  assert shared_idp, arch["layers"]


def test_a_figure_with_an_mp_idp_network_sharing_nothing_fails_before_training(tmp_path):
  config = tiny_figure(idp_fig9.get_config("mlp"))
  config.model.name = "mlp"  # its one IDP layer is the per-profile classifier
  with pytest.raises(ValueError, match="variants.mp-idp: model.mp_profiles on "
                     "model.name='mlp': .*IDP layer shared between its profiles"):
    launcher.train_and_evaluate(config, str(tmp_path / "fig"))
  assert not (tmp_path / "fig").exists()


@pytest.mark.parametrize("override, message", [
    ({"model.mp_profiles": ()}, r"model.mp_profiles must list the DP ranges of MP-IDP"),
    ({"model.mp_profiles": ((0.0, 0.5), (0.4, 1.0))}, r"model.mp_profiles on model.name="),
    ({"eval.bn_mode": "frozen"}, r"eval.bn_mode must be one of \('shared', 'recalibrated'\)"),
    ({"data.batch_size": 0}, r"data.batch_size must be a positive integer, got 0"),
])
def test_bad_mp_idp_settings_name_the_field(override, message):
  config = idp_fig9.get_config("mlp")
  config.method, config.model.mp_profiles = "mpidp", config.variants["mp-idp"].model.mp_profiles
  config.update_from_flattened_dict(override)
  with pytest.raises(ValueError, match=message):
    mpidp.check_config(config)


def test_unknown_variant_field_is_refused_before_training(tmp_path):
  config = tiny_figure(idp_fig7.get_config("sample"))
  config.variants["linear"]["model"]["profil"] = "linear"
  with pytest.raises(ValueError, match="variants.linear: unknown config field 'model.profil'"):
    launcher.train_and_evaluate(config, str(tmp_path / "fig"))
  assert not (tmp_path / "fig").exists()


def test_mp_idp_stages_select_on_the_statistics_the_report_reads(tmp_path):
  """With ``eval.bn_mode='recalibrated'``, each profile's validation (early stopping, the
  state kept) reads statistics recalibrated at its DP: the logged validation loss of
  every profile equals the exported network's recalibrated loss there, which the
  running statistics after one epoch do not give."""
  config = tiny_figure(idp_fig9.get_config("mlp"), epochs=1)
  config.update_from_flattened_dict({
      "method": "mpidp", "data.train_examples": 1000, "model.name": "m_cifarnet",
      "model.width_multiplier": 0.1,
      "model.mp_profiles": ((0.0, 0.5), (0.5, 1.0)), "eval.bn_mode": "recalibrated"})
  mpidp.train_and_evaluate(config, str(tmp_path / "run"))
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  config.model.init_from = str(tmp_path / "run" / "export")
  run = runs.start(config, str(tmp_path / "reload"), check=mpidp.check_config)
  graphdef, state = create_train_state(run.model, optax.sgd(0.0))
  trainer = runs.make_trainer(run, graphdef, optax.sgd(0.0), steps.classification_loss,
                              mpidp.profile_forward(run.arch["profiles"]))
  for s, (_, hi) in enumerate(run.arch["profiles"]):
    val_loss = [m[f"profile{s}/val_loss"] for m in logged if f"profile{s}/val_loss" in m]
    recalibrated = evaluation.evaluate_at(config.eval, trainer, state, "val", hi)["loss"]
    running = trainer.evaluate(state, "val", jnp.float32(hi))["loss"]
    assert val_loss == [pytest.approx(recalibrated, rel=1e-5)], s
    assert abs(running - recalibrated) > 1e-3, "the two readings must differ for the check"
