"""The ``sanp`` method: its stages, what it reports, resume, and bad configs."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynscale.nn import costs, layers, models, sliced
from dynscale.sanp import budget, gates, objective, training
from dynscale.train import runs, sweep
from experiments import main as launcher
from experiments.configs import sanp_cpu
from data_orders import recorded_orders


def tiny(**overrides):
  """``sanp_cpu``'s SANP variant on the embedded MNIST sample at test size."""
  config = sanp_cpu.get_config("single")
  config.data.dataset = "mnist_sample"
  config.data.train_examples = 640
  config.data.val_size = 200
  config.data.batch_size = 64
  config.train.num_epochs = 1
  config.train.steps_per_chunk = 20
  config.sanp.pretrain_epochs = 1
  config.sanp.warmup_epochs = 1
  config.sanp.reduction = 4
  config.tensorboard = False
  config.update_from_flattened_dict(overrides)
  return config


def test_the_warm_up_trains_only_the_gates(tmp_path):
  config = tiny()
  run = runs.start(config, str(tmp_path), check=training.check_config)
  model = training.gated_model(config, run.arch, run.model)
  before = nnx.state(model.layers).to_pure_dict()
  gates_before = nnx.state(model.gates, nnx.Param).to_pure_dict()
  training.warm_up(run, model, 0)
  after = nnx.state(model.layers).to_pure_dict()
  for index, layer in before.items():
    for name in ("kernel", "bias"):
      if name in layer:
        np.testing.assert_array_equal(after[index][name], layer[name])  # bit-identical
    if "bn" in layer:
      for name in ("scale", "bias"):
        np.testing.assert_array_equal(after[index]["bn"][name], layer["bn"][name])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), gates_before,
                       nnx.state(model.gates, nnx.Param).to_pure_dict())
  assert any(jax.tree.leaves(moved))


def test_a_tiny_run_reports_cost_and_gating_and_the_analyses(tmp_path):
  results = training.train_and_evaluate(tiny(**{"sanp.budget": 0.5}), str(tmp_path))
  for key in ("test_accuracy", "flops_ratio", "flops_ratio_std", "dead_layer_rate",
              "val_flops_ratio", "val_flops_ratio_std", "sometimes_pruned_fraction", "budget",
              "gate_flops"):
    assert key in results, key
  assert 0 < results["flops_ratio"] <= 1 and 0 <= results["dead_layer_rate"] <= 1
  types = results["channel_types"]
  widths = [p.outputs for p in layers.gate_points(results["model"]["architecture"]).values()]
  assert [sum(t.values()) for t in types.values()] == widths  # every channel typed once
  assert (tmp_path / "channel_types.png").exists()
  assert (tmp_path / "last_block_active_channels.png").exists()
  assert results["flops_full"] == costs.flops(results["model"]["architecture"])


def test_fixed_k_costs_its_budget_on_every_image(tmp_path):
  config = tiny(**{"sanp.variant": "fixed_k", "sanp.budget": 0.4})
  results = training.train_and_evaluate(config, str(tmp_path))
  expected = budget.fixed_k_flops_ratio(results["model"]["architecture"],
                                        budget.fixed_k_keep(results["model"]["architecture"],
                                                            0.4))
  assert results["flops_ratio"] == pytest.approx(expected, rel=1e-5)
  assert abs(expected - 0.4) < 0.03
  assert results["flops_ratio_std"] < 1e-3 and results["val_flops_ratio_std"] < 1e-3
  assert results["dead_layer_rate"] == 0  # every layer keeps its k channels open


def test_an_image_is_counted_dead_when_one_gated_layer_is_entirely_off():
  """``dead_layer`` per image: 1 when some gated layer closes every channel for
  it (by hand from the gates' activity), not when a layer closes some."""
  config = tiny(**{"sanp.floor": 0})
  arch = runs.planned_architecture(config)
  model = training.gated_model(config, arch, models.build(arch, rngs=models.init_rngs(0)))
  gate = list(model.gates.values())[1]
  gate.head.w2.kernel.value = jnp.zeros_like(gate.head.w2.kernel.value)
  images = jax.random.normal(jax.random.key(0), (6, *arch["input_shape"]))
  forward = training.gated_forward(arch)
  channels = gate.head.w2.bias.value.shape[0]
  for opened, dead in ((channels, 0.0), (channels - 1, 0.0), (0, 1.0)):
    gate.head.w2.bias.value = jnp.where(jnp.arange(channels) < opened, 5.0, -5.0)
    activity = model.run(images, 1.0, train=False).activity
    assert all(np.all(np.asarray(a).sum(-1) > 0) for a in activity.values()) == (dead == 0)
    _, extra = forward(model, images, None)
    np.testing.assert_array_equal(extra["dead_layer"], np.full(6, dead))


def test_the_fine_tune_loss_is_eq_9_with_eq_10s_lambda_from_evaluation_flops():
  config = tiny(**{"sanp.lambda0": 2.0, "sanp.budget": 0.4, "sanp.flops_window": 3})
  arch = runs.planned_architecture(config)
  backbone = models.build(arch, rngs=models.init_rngs(0))
  model = training.gated_model(config, arch, backbone)
  images = jax.random.normal(jax.random.key(0), (8, *arch["input_shape"]))
  labels = jnp.arange(8) % 10
  loss, metrics = training.sanp_loss(arch, config, penalised=True)(model, images, labels, None)
  # Gates start open: this batch costs the full network, as the window's ones say.
  assert float(metrics["eval_flops_ratio"]) == pytest.approx(1.0)
  np.testing.assert_allclose(model.flops_window.value, [1.0, 1.0, 1.0], rtol=1e-6)
  assert float(metrics["lambda"]) == pytest.approx(2.0 * (1.0 - 0.4))
  assert float(loss) == pytest.approx(float(metrics["cross_entropy"])
                                      + float(metrics["lambda"]) * float(metrics["cost"]),
                                      rel=1e-6)
  # the cost is Eq. 9's of the relaxed codes s1 = sat((s - tau) / rho), by hand from the
  # saliencies the forward sowed (sigma 0: no noise)
  assert config.sanp.binarization.sigma == 0 and config.sanp.code == "relaxed"
  model.run(images, 1.0, train=True)
  sown = nnx.pop(model, nnx.Intermediate).to_pure_dict()["gates"]
  relaxed = {}
  for name, gate in model.gates.items():
    s = np.asarray(sown[name]["saliency_out"][-1], np.float64)
    z = (s - np.asarray(gate.threshold.value)) / np.asarray(gate.temperature.value)
    relaxed[name] = np.clip(1.2 / (1 + np.exp(-z)) - 0.1, 0, 1)
  assert not all(np.allclose(r, np.clip(np.asarray(sown[n]["saliency_out"][-1]), 0, 1))
                 for n, r in relaxed.items())
  assert float(metrics["cost"]) == pytest.approx(
      float(objective.cost_loss(arch, relaxed, config.sanp.cost)), rel=1e-5)
  # p_t is the mean over the last N = 3 batches: the oldest leaves, this one enters.
  model.flops_window.value = jnp.asarray([0.2, 0.5, 0.8], jnp.float32)
  _, metrics = training.sanp_loss(arch, config, penalised=True)(model, images, labels, None)
  np.testing.assert_allclose(model.flops_window.value, [0.5, 0.8, 1.0], rtol=1e-6)
  assert float(metrics["lambda"]) == pytest.approx(2.0 * ((0.5 + 0.8 + 1.0) / 3 - 0.4),
                                                   rel=1e-5)


@pytest.mark.slow  # three launcher runs of three stages each
def test_a_killed_fine_tune_resumes_to_the_same_metrics(tmp_path, straight_and_resumed):
  overrides = ("--config.data.dataset=mnist_sample", "--config.data.train_examples=1000",
               "--config.data.val_size=200", "--config.data.batch_size=50",
               "--config.train.num_epochs=3", "--config.train.steps_per_chunk=4",
               "--config.sanp.pretrain_epochs=1", "--config.sanp.warmup_epochs=1",
               "--config.sanp.reduction=4", "--config.tensorboard=False")

  def command(workdir):
    return [sys.executable, "-m", "experiments.main",
            "--config=experiments/configs/sanp_cpu.py:single", f"--workdir={workdir}",
            *overrides]
  a, b = straight_and_resumed(tmp_path, command, "finetune/1", "checkpoints/warmup-best")
  for key in ("test_accuracy", "flops_ratio", "flops_ratio_std", "dead_layer_rate",
              "channel_types"):
    assert a[key] == b[key], key


def test_seeds_give_each_variant_a_mean_and_a_by_seed_entry():
  config = sanp_cpu.get_config("all")
  names = list(sweep.variant_configs(config))
  assert set(names) == {f"{variant}-seed{seed}" for variant in config.variants
                        for seed in (0, 1, 2)}
  summaries = {name: {"method": "sanp", "test_accuracy": 0.1 * (i % 3), "flops_ratio": 0.3}
               for i, name in enumerate(names)}
  grouped = sweep.by_variant(config, summaries)
  assert grouped["sanp"]["mean"]["test_accuracy"] == pytest.approx(0.1)
  assert grouped["sanp"]["std"]["test_accuracy"] == pytest.approx(np.std([0.0, 0.1, 0.2]))
  assert set(grouped["sanp"]["by_seed"]) == {"0", "1", "2"}
  text = launcher.summary({"variants": summaries, "by_variant": grouped}, "w")
  assert "sanp, mean±std over seeds ['0', '1', '2']: test_accuracy=0.1000±0.0816" in text


def test_the_thin_variant_costs_the_budget_and_trains_as_the_gated_ones():
  variants = sweep.variant_configs(sanp_cpu.get_config("all"))
  thin, backbone = variants["thin-seed0"], variants["thin-backbone-seed0"]
  unpruned, sanp = variants["unpruned-seed0"], variants["sanp-seed0"]
  def flops(c):
    return costs.flops(models.architecture(c.model.name, num_classes=10,
                                           input_shape=(32, 32, 3),
                                           width_multiplier=c.model.width_multiplier))
  assert thin.model.init_from == "variant:thin-backbone-seed0"
  assert abs(flops(backbone) / flops(unpruned) - sanp_cpu.BUDGET) < 0.02
  # the same epochs on the same images as a gated variant: backbone, then warm-up + fine-tune
  gated_epochs = variants["backbone-seed0"].train.num_epochs + sanp.sanp.warmup_epochs \
      + sanp.train.num_epochs
  assert backbone.train.num_epochs + thin.train.num_epochs == gated_epochs
  assert thin.data.augment == sanp.data.augment == "off"
  assert backbone.data.augment == variants["backbone-seed0"].data.augment == "auto"


def test_the_plain_networks_follow_the_epochs_set_on_the_command_line():
  """The figure's epochs changed on the command line (its config locked, as
  the launcher's is) reach the plain networks: the backbones train the
  pretraining's epochs, ``unpruned`` those plus the fine-tune's, ``thin``
  the warm-up's plus the fine-tune's; a variant's own epochs set there move
  that variant alone. Catches the variants' epochs fixed when the config
  file was read (a shortened figure compared a 16-epoch ``unpruned`` with
  gated networks trained 3)."""
  config = sanp_cpu.get_config("all")
  config.lock()
  config.sanp.pretrain_epochs, config.sanp.warmup_epochs, config.train.num_epochs = 1, 2, 3
  config.variants["thin-backbone"].train.num_epochs = 5
  epochs = {name: c.train.num_epochs for name, c in sweep.variant_configs(config).items()
            if name.endswith("-seed0")}
  assert epochs == {"backbone-seed0": 1, "unpruned-seed0": 4, "thin-backbone-seed0": 5,
                    "thin-seed0": 5, "sanp-seed0": 3, "static-seed0": 3, "fixed_k-seed0": 3,
                    "sanp-paper-seed0": 3}


@pytest.mark.parametrize("override, message", [
    ({"sanp.budget": 0.0}, r"sanp.budget must be a fraction of the full network's FLOPs in "
                           r"\(0, 1\), got 0.0"),
    ({"sanp.budget": 1.0}, r"sanp.budget must be a fraction"),
    ({"sanp.lambda0": -0.1}, r"sanp.lambda0 must be a finite number >= 0, got -0.1"),
    ({"sanp.variant": "dynamic"}, r"sanp.variant must be one of \('sanp', 'static', "
                                  r"'fixed_k'\), got 'dynamic'"),
    ({"sanp.binarization.a": 0.0}, r"binarization.a must be > 0"),
    ({"sanp.binarization.b": 1.5}, r"binarization.b must be in \[0, a\)"),
    ({"sanp.binarization.sigma": -1.0}, r"binarization.sigma must be >= 0"),
    ({"sanp.binarization.mix": 2.0}, r"binarization.mix must be a number in \[0, 1\]"),
    ({"sanp.reduction": 100}, r"sanp.reduction must be in \[1, 16\] \(the narrowest gated "
                              r"layer's channels\), got 100"),
    ({"sanp.floor": 17}, r"sanp.floor must be at most 16"),
    ({"sanp.floor_fraction": -0.1}, r"sanp.floor_fraction must be a fraction of FIXED-K's k "
                                    r"in \[0, 1\], got -0.1"),
    ({"sanp.cost": "l2"}, r"sanp.cost must be one of \('filters', 'layers', 'flops'\)"),
    ({"sanp.gate_start": "closed"}, r"sanp.gate_start must be one of \('open', 'fixed_k'\)"),
    ({"sanp.gate_start": "fixed_k", "sanp.variant": "static", "sanp.warmup_epochs": 0},
     r"sanp.gate_start='fixed_k' hands .* to the 'static' gates: it needs "
     r"sanp.warmup_epochs > 0, got 0"),
    ({"sanp.calibration_batches": 0}, r"sanp.calibration_batches must be"),
    ({"sanp.decision_point": "sample"}, r"sanp.decision_point must be one of \('layer', "
                                        r"'channel'\), got 'sample'"),
    ({"sanp.flops_statistics": "ema"}, r"sanp.flops_statistics must be one of \('batch', "
                                       r"'running'\), got 'ema'"),
    ({"model.name": "resnet50"}, r"model.name must be one of .*'m_cifarnet'.*, got 'resnet50'"),
    ({"model.name": "mlp"}, r"model.name: SANP gates a network's convolutions, and 'mlp' has "
                            r"none"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ({"sanp.reduction": 0}, r"sanp.reduction must be a positive integer, got 0"),
    ({"sanp.code": "hard"}, r"sanp.code must be one of \('relaxed', 'saliency'\), got 'hard'"),
    ({"sanp.code": "saliency", "sanp.cost": "flops"},
     r"sanp.code='saliency' .* needs sanp.cost 'filters' or 'layers'"),
    ({"sanp.lambda0": float("inf")}, r"sanp.lambda0 must be a finite number >= 0, got inf"),
    ({"sanp.integral_rate": float("nan")},
     r"sanp.integral_rate must be a finite number >= 0, got nan"),
    ({"sanp.binarization.b": 0.5}, r"binarization.a and binarization.b must open a gate"),
    ({"sanp.flops_window": 0}, r"sanp.flops_window must be a positive integer, got 0"),
    ({"sanp.integral_rate": -0.5}, r"sanp.integral_rate must be a finite number >= 0, got -0.5"),
    ({"sanp.floor": -1}, r"sanp.floor must be an integer >= 0, got -1"),
    ({"sanp.pretrain_epochs": -1}, r"sanp.pretrain_epochs must be an integer >= 0, got -1"),
    ({"sanp.warmup_epochs": -1}, r"sanp.warmup_epochs must be an integer >= 0, got -1"),
    ({"sanp.budget_ramp_epochs": -2}, r"sanp.budget_ramp_epochs must be an integer >= 0"),
    # without a validation split the run trained all its stages, then failed writing results
    ({"data.val_size": 0}, r"data.val_size must be >= 1: SANP reports the validation split's "
                           r"FLOPs .*; got data.val_size 0"),
])
def test_bad_sanp_settings_fail_before_anything_is_written(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    training.train_and_evaluate(tiny(**override), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ({"sanp.reduction": 100}, r"sanp.reduction must be in \[1, 8\] \(the narrowest gated "
                              r"layer's channels\), got 100"),
    ({"sanp.floor": 9}, r"sanp.floor must be at most 8"),
])
def test_settings_beyond_an_exported_backbones_widths_fail_before_anything_is_written(
    tmp_path, override, message):
  """With ``model.init_from`` the gates sit on the exported backbone (here half
  as wide as the config's), so its widths bound ``sanp.reduction`` and
  ``sanp.floor``. Catches the check skipped for an exported backbone: the
  workdir was written and the run failed building its gates."""
  config = tiny()
  config.model.width_multiplier /= 2
  backbone = models.build(runs.planned_architecture(config), rngs=models.init_rngs(0))
  sliced.export(backbone, tmp_path / "backbone")
  with pytest.raises(ValueError, match=message):
    training.train_and_evaluate(tiny(**{"model.init_from": str(tmp_path / "backbone"),
                                        **override}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_the_reduction_and_floor_may_reach_the_narrowest_gated_layer_and_no_further():
  narrowest = min(p.outputs for p in layers.gate_points(runs.planned_architecture(tiny())).values())
  for field in ("sanp.reduction", "sanp.floor"):
    training.check_config(tiny(**{field: narrowest}))
    with pytest.raises(ValueError, match=rf"{field} must be .*{narrowest}.*got {narrowest + 1}"):
      training.check_config(tiny(**{field: narrowest + 1}))


def test_the_launcher_runs_sanp():
  assert launcher.METHODS["sanp"] is training


def test_running_statistics_follow_the_inference_gates_not_the_noisy_ones():
  config = tiny(**{"sanp.binarization.sigma": 3.0})  # noisy codes far from inference's
  arch = runs.planned_architecture(config)
  model = training.gated_model(config, arch, models.build(arch, rngs=models.init_rngs(0)))
  reference = nnx.clone(model)
  images = jax.random.normal(jax.random.key(0), (16, *arch["input_shape"]))
  training.sanp_loss(arch, config, penalised=True)(model, images, jnp.arange(16) % 10, None)
  # What one train-mode forward with the gates deciding as at inference leaves:
  gates.set_deterministic(reference, True)
  reference.run(images, 1.0, train=True)
  ours = jax.tree.leaves(nnx.state(model.layers, nnx.BatchStat).to_pure_dict())
  theirs = jax.tree.leaves(nnx.state(reference.layers, nnx.BatchStat).to_pure_dict())
  assert len(ours) == len(theirs) > 0
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("statistics", ["batch", "running"])
def test_p_t_is_measured_under_the_batch_norm_statistics_asked_for(statistics):
  """Eq. 10's p_t is what the inference gates cost, under the statistics asked
  for, with the training codes noisy and mixed (sigma 1, half soft: with the
  working settings' hard noiseless codes a p_t read from the training forward
  passed too)."""
  config = tiny(**{"sanp.flops_statistics": statistics, "sanp.flops_window": 1,
                   "sanp.binarization.sigma": 1.0, "sanp.binarization.mix": 0.5})
  arch = runs.planned_architecture(config)
  model = training.gated_model(config, arch, models.build(arch, rngs=models.init_rngs(0)))
  rng = np.random.default_rng(0)
  for gate in model.gates.values():  # saliencies that depend on the image, about half open
    for linear in (gate.head.w1, gate.head.w2):
      linear.kernel.value = jnp.asarray(rng.standard_normal(linear.kernel.value.shape),
                                        jnp.float32)
    gate.head.w2.bias.value = jnp.zeros_like(gate.head.w2.bias.value)
  images = 3.0 + jax.random.normal(jax.random.key(0), (16, *arch["input_shape"]))

  def flops_ratio(network, train):
    gates.set_deterministic(network, True)
    activity = network.run(images, 1.0, train=train).activity
    return float(jnp.mean(costs.sample_flops(arch, 1.0, activity)) / costs.flops(arch))

  under_batch = flops_ratio(nnx.clone(model), train=True)
  _, metrics = training.sanp_loss(arch, config, penalised=True)(model, images,
                                                               jnp.arange(16) % 10, None)
  under_running = flops_ratio(nnx.clone(model), train=False)  # the statistics just updated
  assert abs(under_batch - under_running) > 0.01  # the two readings differ here
  expected = under_running if statistics == "running" else under_batch
  assert float(metrics["eval_flops_ratio"]) == pytest.approx(expected, rel=1e-5)


def test_the_integral_term_accumulates_the_budget_error_step_by_step():
  config = tiny(**{"sanp.lambda0": 1.0, "sanp.budget": 0.4, "sanp.integral_rate": 0.5})
  arch = runs.planned_architecture(config)
  model = training.gated_model(config, arch, models.build(arch, rngs=models.init_rngs(0)))
  loss_fn = training.sanp_loss(arch, config, penalised=True)
  images = jax.random.normal(jax.random.key(0), (8, *arch["input_shape"]))
  lambdas = [float(loss_fn(model, images, jnp.arange(8) % 10, None)[1]["lambda"])
             for _ in range(3)]
  error = 1.0 - 0.4  # the gates start open: every batch costs the full network
  np.testing.assert_allclose(lambdas, [error + 0.5 * error * t for t in (1, 2, 3)], rtol=1e-5)
  assert float(model.cost_integral.value) == pytest.approx(3 * 0.5 * error, rel=1e-5)


def test_the_ramped_budget_drives_lambda_and_advances_on_penalised_steps_only():
  """Over a 10-step ramp from 1.0 to 40%: Eq. 10 reads the ramped budget, and
  only the fine-tune's (penalised) steps move it or the integral term (rate
  0.5, summing 0.5 (p_t - budget) per penalised step); the warm-up's leave
  both."""
  config = tiny(**{"sanp.lambda0": 2.0, "sanp.budget": 0.4, "sanp.flops_window": 3,
                   "sanp.integral_rate": 0.5})
  arch = runs.planned_architecture(config)
  model = training.gated_model(config, arch, models.build(arch, rngs=models.init_rngs(0)))
  images = jax.random.normal(jax.random.key(0), (8, *arch["input_shape"]))
  labels = jnp.arange(8) % 10
  fine_tune = training.sanp_loss(arch, config, penalised=True, ramp_steps=10)
  warm_up = training.sanp_loss(arch, config, penalised=False, ramp_steps=10)
  seen = []
  for loss_fn in (warm_up, fine_tune, warm_up, warm_up, fine_tune):
    _, metrics = loss_fn(model, images, labels, None)  # every gate open: p_t = 1
    seen.append((float(metrics["budget"]), float(metrics["lambda"])))
  ramped = 1.0 - 0.6 / 10  # after one penalised step
  np.testing.assert_allclose(seen, [(1.0, 0.0), (1.0, 0.0), (ramped, 0.0), (ramped, 0.0),
                                   (ramped, 2.5 * (1.0 - ramped))], atol=1e-6)


def test_the_budget_ramps_down_from_the_full_network():
  assert float(training.ramped_budget(0.3, 0, 10)) == pytest.approx(1.0)
  assert float(training.ramped_budget(0.3, 5, 10)) == pytest.approx(0.65)
  assert float(training.ramped_budget(0.3, 20, 10)) == pytest.approx(0.3)
  assert training.ramped_budget(0.3, 5, 0) == 0.3


def test_each_stage_reads_the_data_order_of_the_runs_later_epochs(tmp_path, monkeypatch):
  """Pretraining, warm-up and fine-tune, one epoch each, are three ``fit``s of
  one run: each must draw its own order of the training images, also when
  the backbone was trained by another run. Catches a stage counting data
  epochs from zero, which replayed the pretraining's first epoch in the
  warm-up and the fine-tune (with ``model.init_from``, the backbone run's)."""
  config = tiny(**{"train.steps_per_chunk": 1000})  # one chunk an epoch: the epoch's order
  assert training.handed_off(config.sanp)
  orders = recorded_orders(monkeypatch)
  run = runs.start(config, str(tmp_path / "own"), check=training.check_config)
  sliced.export(run.model, tmp_path / "backbone")  # a backbone for the second run
  training.run_stages(run)
  assert len(orders) == 3 and len(set(orders)) == 3
  # A backbone from another run of the same seed (the figure's `backbone`
  # variant): the gated stages read what follows its epochs, not its orders.
  started = runs.start(tiny(**{"train.steps_per_chunk": 1000,
                               "model.init_from": str(tmp_path / "backbone")}),
                       str(tmp_path / "from-export"), check=training.check_config)
  training.run_stages(started)
  assert len(orders) == 5 and orders[3:] == orders[1:3]


def _handed_off_run(tmp_path, **overrides):
  """A tiny run at a 40% budget warmed up as FIXED-K (``ranked``) and handed off to
  ``model``; also the warm-up's outcome and the running statistics it left."""
  config = tiny(**{"sanp.gate_start": "fixed_k", "sanp.budget": 0.4, **overrides})
  run = runs.start(config, str(tmp_path), check=training.check_config)
  ranked = training.gated_model(config, run.arch, run.model, variant="fixed_k")
  fitted = training.warm_up(run, ranked, 0)
  warmed = nnx.state(ranked.layers, nnx.BatchStat).to_pure_dict()
  model = training.gated_model(config, run.arch, run.model)
  training.hand_off(run, ranked, model, fitted.trainer)
  return run, ranked, model, fitted, warmed


def test_the_hand_off_opens_fixed_ks_fraction_at_the_first_gate_and_starts_the_window_there(
    tmp_path):
  run, ranked, model, fitted, warmed = _handed_off_run(tmp_path,
                                                       **{"sanp.calibration_batches": 3})
  # the running statistics were estimated under FIXED-K's gates: the handed-off network
  # takes them, and the calibration forwards (train mode) leave them, in both networks
  for network in (ranked, model):
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.state(network.layers, nnx.BatchStat).to_pure_dict(), warmed)
  keep = budget.fixed_k_keep(run.arch, 0.4)
  batches = fitted.trainer.training_batches(3)
  first = next(iter(model.gates))   # its input is the image: no upstream gate moves it
  gate = model.gates[first]
  for images in batches:   # the same saliency, learned in decision units z = (s - tau) / rho
    np.testing.assert_allclose(gate.saliency(images), ranked.gates[first].saliency(images),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gate.head(images), (ranked.gates[first].saliency(images)
                                                   - gate.threshold.value) / gate.temperature.value,
                               rtol=1e-4, atol=1e-4)
  inputs = [model.run(images, 1.0, train=False) for images in batches]
  opened = np.concatenate([np.asarray(trace.activity[first]) for trace in inputs])
  channels = opened.shape[-1]
  target = gates.kept_channels(keep, channels) / channels * opened.size
  saliency = np.concatenate([np.asarray(ranked.gates[first].saliency(images))
                             for images in batches])
  # tau splits the ranked saliencies at FIXED-K's fraction, up to the saliencies tied
  # with it (a one-epoch warm-up leaves them within 0.003 of s = 1, where float32
  # tells only about 1,500 values apart in these 3,072), and the gates open just those
  tau = np.float32(gate.threshold.value)
  above, at_or_above = (saliency > tau).sum(), (saliency >= tau).sum()
  assert above - 1 <= target <= at_or_above + 1
  assert above - 1 <= opened.sum() <= at_or_above + 1
  # the decision reads (s - tau) / rho: rho is the spread of the first gate's saliencies
  np.testing.assert_allclose(float(gate.temperature.value), saliency.std(), rtol=1e-4)
  # Eq. 10's window holds what the handed-off network costs, not the full network
  full = costs.flops(run.arch)
  measured = np.mean([np.mean(costs.sample_flops(run.arch, 1.0, t.activity)) / full
                      for t in inputs])
  np.testing.assert_allclose(np.asarray(model.flops_window.value), measured, rtol=1e-5)
  assert measured < 0.9


def test_per_channel_decision_points_open_each_channel_as_often_as_fixed_k_did(tmp_path):
  run, ranked, model, fitted, _ = _handed_off_run(tmp_path, **{"sanp.calibration_batches": 3,
                                                           "sanp.decision_point": "channel"})
  batches = fitted.trainer.training_batches(3)
  first = next(iter(model.gates))   # its input is the image: no upstream gate moves it
  gate, source = model.gates[first], ranked.gates[first]
  saliency = np.concatenate([np.asarray(source.saliency(images)) for images in batches])
  for images in batches:   # the same saliencies, learned in per-channel decision units
    np.testing.assert_allclose(gate.saliency(images), source.saliency(images),
                               rtol=1e-5, atol=1e-6)
  def open_rates(network):
    return np.concatenate([np.asarray(network.run(images, 1.0, train=False).activity[first])
                           for images in batches]).mean(0)

  # each channel opens on as many images as under FIXED-K's top k, up to a few images
  # whose saliencies tie across channels at float precision (a one-epoch warm-up leaves
  # them within 0.003 of s = 1); one point per layer would open these channels on all
  # images or none
  fixed_k = open_rates(ranked)
  assert ((fixed_k > 0) & (fixed_k < 1)).any()
  np.testing.assert_allclose(open_rates(model), fixed_k, atol=5.0 / saliency.shape[0])
  np.testing.assert_allclose(np.asarray(gate.temperature.value), saliency.std(axis=0),
                             rtol=1e-3, atol=1e-6)


def test_a_handed_off_static_gate_opens_the_k_channels_of_highest_mean_saliency(tmp_path):
  run, ranked, model, fitted, _ = _handed_off_run(tmp_path, **{"sanp.variant": "static",
                                                           "sanp.calibration_batches": 2})
  images = fitted.trainer.training_batches(2)
  first = next(iter(model.gates))
  mean = np.mean(np.concatenate([np.asarray(ranked.gates[first].saliency(x)) for x in images]),
                 axis=0)
  gate = model.gates[first]
  np.testing.assert_allclose(gate.saliency(images[0])[0], mean, rtol=1e-4, atol=1e-5)
  k = gates.kept_channels(budget.fixed_k_keep(run.arch, 0.4), mean.size)
  opened = np.asarray(gate.decide(gate.saliency(images[0]), train=False).decision)
  assert (opened == opened[:1]).all()   # the same for every sample
  np.testing.assert_array_equal(np.flatnonzero(opened[0]), np.sort(np.argsort(-mean)[:k]))
