"""The ``cpu`` protocol of the CIFAR experiments: its documented settings, bad
protocols refused before compute, what results record, and a tiny-size run
of every CIFAR config under it."""

import json

import PIL.Image
import pytest

from dynscale.train import protocols, sweep, validation
from experiments import main as launcher
from experiments.configs import common, idp_fig8, idp_fig9, tesla_vgg16_cifar

# The protocol as README and dynscale.train.protocols document it, written out here.
CPU_SETTINGS = {
    ("data", "val_size"): 5000, ("data", "batch_size"): 128, ("data", "augment"): "auto",
    ("data", "train_examples"): 0, ("model", "width_multiplier"): 0.25,
    ("train", "num_epochs"): 10,
    ("optimizer", "name"): "sgd", ("optimizer", "learning_rate"): 0.05,
    ("optimizer", "momentum"): 0.9, ("optimizer", "nesterov"): False,
    ("optimizer", "schedule"): "cosine", ("optimizer", "weight_decay"): 5e-4,
    ("optimizer", "warmup_steps"): 0,
}
# A DP curve at width x0.25 reads batch norm re-estimated at each DP (README, "Protocols").
CPU_DP_CURVE_BN_MODE = "recalibrated"
RTESLA_EPOCH_BUDGET = 20
RTESLA_STAGE_EPOCHS = 10  # the same cap as every other stage

CIFAR_CONFIGS = [(idp_fig8, "vgg16"), (idp_fig8, "mobilenet"), (idp_fig9, "vgg16"),
                 (tesla_vgg16_cifar, "cifar10"), (tesla_vgg16_cifar, "cifar100")]
IDS = [f"{module.__name__.split('.')[-1]}:{arg}" for module, arg in CIFAR_CONFIGS]


@pytest.mark.parametrize("module, arg", CIFAR_CONFIGS, ids=IDS)
def test_every_variant_of_a_cifar_config_under_the_cpu_protocol_has_the_documented_settings(
    module, arg):
  config = module.get_config(f"{arg},cpu")
  paper = module.get_config(arg)
  paper_variants = sweep.variant_configs(paper)
  for name, variant in sweep.variant_configs(config).items():
    paper_variant = paper_variants[name]
    assert variant.protocol == "cpu"
    for (block, field), value in CPU_SETTINGS.items():
      assert variant[block][field] == value, (name, block, field)
    assert variant.eval.bn_mode == CPU_DP_CURVE_BN_MODE, name
    assert paper_variant.eval.bn_mode == "shared", name  # the papers'
    if "schedule" in variant:
      assert variant.schedule.epoch_budget == RTESLA_EPOCH_BUDGET
      assert variant.schedule.stage_epochs == RTESLA_STAGE_EPOCHS
    assert protocols.deviations(variant) == {}, name
    # Everything else is the paper config's: same data, method, network, comparisons.
    assert (variant.data.dataset, variant.method, variant.model.name, variant.model.profile) == (
        paper_variant.data.dataset, paper_variant.method, paper_variant.model.name,
        paper_variant.model.profile)
  assert set(config.variants) == set(paper.variants)


def test_idp_variants_of_table_1_train_the_cpu_epochs_without_early_stopping():
  variants = sweep.variant_configs(tesla_vgg16_cifar.get_config("cifar10,cpu"))
  for name in ("idp-all-one", "idp-linear", "mp-idp"):
    assert (variants[name].train.num_epochs, variants[name].train.patience) == (10, 0)
  assert variants["tesla"].train.patience == 4  # TESLA's stopping rule stays Table 1's
  assert variants["tesla-gap-cam"].cam.dps == (0.1, 0.2, 0.3, 0.5, 1.0)  # Figs. 5-6


def test_fig_8_and_9_under_the_cpu_protocol_train_the_networks_of_table_1s_cifar10_column():
  # RESULTS reads 001 Figs. 8-9 (VGG-16) off the CIFAR-10 column's rows.
  column = sweep.variant_configs(tesla_vgg16_cifar.get_config("cifar10,cpu"))
  rows = {(idp_fig8, "all-one"): "idp-all-one", (idp_fig8, "linear"): "idp-linear",
          (idp_fig9, "linear"): "idp-linear", (idp_fig9, "mp-idp"): "mp-idp"}
  for (module, name), row in rows.items():
    panel = sweep.variant_configs(module.get_config("vgg16,cpu"))[name]
    for block in ("data", "model", "optimizer", "train", "eval"):
      assert panel[block].to_dict() == column[row][block].to_dict(), (name, block)
    assert (panel.method, panel.seed, panel.protocol) == (column[row].method, column[row].seed,
                                                          "cpu")


def test_only_the_cifar10_column_has_the_cam_run():
  # 000 §4.2 trains the GAP network at 20/50/100% DP: CIFAR-10's tasks.
  for arg in ("cifar10", "cifar10,cpu", "cifar10-recipe"):
    assert "tesla-gap-cam" in tesla_vgg16_cifar.get_config(arg).variants
  for arg in ("cifar100", "cifar100,cpu", "cifar100-recipe"):
    variants = tesla_vgg16_cifar.get_config(arg).variants
    assert set(variants) == {"idp-all-one", "idp-linear", "mp-idp", "tesla", "rtesla"}


def test_the_paper_protocol_is_the_default_and_changes_nothing():
  config = tesla_vgg16_cifar.get_config("cifar10")
  assert config.protocol == "paper"
  assert (config.model.width_multiplier, config.optimizer.learning_rate,
          config.data.batch_size) == (1.0, 0.004, 32)
  assert protocols.record(config) == {"name": "paper", "settings": {}, "deviations": {}}


@pytest.mark.parametrize("module, arg, message", [
    (tesla_vgg16_cifar, "cifar10,gpu", r"protocol must be one of \('paper', 'cpu'\), got 'gpu'"),
    (idp_fig8, "vgg16,laptop", r"protocol must be one of \('paper', 'cpu'\), got 'laptop'"),
    (idp_fig8, "mlp,cpu", r"idp_fig8 panel: the cpu protocol is for \('vgg16', 'mobilenet'\)"),
    (idp_fig9, "mlp,cpu", r"idp_fig9 panel: the cpu protocol is for \('vgg16',\)"),
    (tesla_vgg16_cifar, "cifar10-recipe,cpu",
     r"the cpu protocol is for \('cifar10', 'cifar100'\)"),
])
def test_a_config_argument_with_a_bad_protocol_names_the_allowed_values(module, arg, message):
  with pytest.raises(ValueError, match=message):
    module.get_config(arg)


def test_an_unknown_protocol_set_on_the_command_line_fails_before_anything_is_written(
    tmp_path):
  config = idp_fig8.get_config("vgg16,cpu")
  config.protocol = "gpu"
  with pytest.raises(ValueError, match=r"variants.all-one: protocol must be one of "
                                       r"\('paper', 'cpu'\), got 'gpu'"):
    launcher.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arg, label, built", [("vgg16,cpu", "paper", "cpu"),
                                                ("vgg16", "cpu", "paper")])
def test_a_protocol_set_on_the_command_line_is_refused_for_it_would_change_only_the_label(
    arg, label, built, tmp_path):
  """``--config.protocol`` changes the field after the config file applied its
  protocol's settings: a run at one protocol's settings recorded as the
  other's (no deviations) is refused before anything is written, naming the
  way to choose the protocol."""
  config = idp_fig8.get_config(arg)
  config.protocol = label
  with pytest.raises(ValueError, match=rf"protocol: this config was built under the "
                                       rf"'{built}' protocol, not '{label}'; choose the "
                                       r"protocol with the config argument"):
    launcher.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  assert protocols.apply(idp_fig8.get_config("vgg16,cpu"), "paper").protocol == "paper"
  validation.check_core(protocols.apply(idp_fig8.get_config("vgg16,cpu"), "paper"))


def test_a_cpu_dp_curve_read_with_the_shared_statistics_is_recorded_as_a_deviation():
  config = tesla_vgg16_cifar.get_config("cifar10,cpu")
  assert protocols.record(config)["settings"]["eval.bn_mode"] == CPU_DP_CURVE_BN_MODE
  config.eval.bn_mode = "shared"
  assert protocols.record(config)["deviations"] == {
      "eval.bn_mode": {"protocol": CPU_DP_CURVE_BN_MODE, "run": "shared"}}


def test_an_experiment_can_fix_its_own_sizes_within_the_cpu_protocol():
  from experiments.configs import sanp_cpu
  variants = sweep.variant_configs(sanp_cpu.get_config("all"))
  sanp = variants["sanp-seed0"]
  fixed = protocols.record(sanp)
  assert fixed["settings"]["data.train_examples"] == 10000
  assert fixed["settings"]["data.val_size"] == 1000
  assert fixed["settings"]["model.width_multiplier"] == 0.25
  # the gated stages read the training images without crop and flip, on purpose:
  assert fixed["deviations"] == {"data.augment": {"protocol": "auto", "run": "off"}}
  assert "data.augment" not in protocols.deviations(variants["backbone-seed0"])
  # The thin network is narrower on purpose:
  assert set(protocols.deviations(variants["thin-backbone-seed0"])) == {
      "model.width_multiplier", "train.num_epochs"}
  with pytest.raises(ValueError, match=r"protocol sizes apply to the cpu protocol only"):
    protocols.apply(sanp, "paper", {"data": {"val_size": 10}})


def test_applying_a_protocol_leaves_the_callers_config_as_it_was():
  """``apply`` returns a copy: the config it was given (a variant another
  protocol also reads, for instance) keeps its own settings."""
  config = idp_fig8.get_config("vgg16")
  before = config.to_dict()
  cpu = protocols.apply(config, "cpu", {"data": {"train_examples": 1000}})
  assert cpu.protocol == "cpu" and cpu.data.train_examples == 1000
  assert cpu.to_dict() != before and config.to_dict() == before


def test_split_arg_defaults_to_the_paper_protocol():
  assert common.split_arg("vgg16", "panel", ("vgg16",)) == ("vgg16", "paper")
  assert common.split_arg("vgg16,cpu", "panel", ("vgg16",)) == ("vgg16", "cpu")
  with pytest.raises(ValueError, match=r"panel must be one of \('vgg16',\), optionally followed "
                                       r"by ',<protocol>', got 'resnet'"):
    common.split_arg("resnet", "panel", ("vgg16",))


# --------------------------------------------------------------------------
# A tiny-size run of every CIFAR config under the cpu protocol.
# --------------------------------------------------------------------------

def shrunk(config, data_dir):
  """``config`` at smoke-test size: what a user would override on the command line."""
  config.data.data_dir = str(data_dir)
  config.data.val_size = 12
  config.data.batch_size = 16
  config.data.eval_batch_size = 20
  config.model.width_multiplier = 1 / 16
  config.train.num_epochs = 1
  config.eval.dps = (0.5, 1.0)
  config.tensorboard = False
  if "schedule" in config:
    config.train.patience = 1
    config.schedule.epoch_budget = 2
    config.cam.num_images = 2
  return config


@pytest.mark.parametrize("module, arg", [
    (idp_fig8, "vgg16"), (idp_fig8, "mobilenet"),
    # VGG-16 compiled for each MP-IDP profile: 90 s (test_idp_training runs Figure 9's
    # launcher on the default suite).
    pytest.param(idp_fig9, "vgg16", marks=pytest.mark.slow),
    # Table 1's six variants (VGG-16 compiled for each method) take two minutes a column.
    pytest.param(tesla_vgg16_cifar, "cifar10", marks=pytest.mark.slow),
    pytest.param(tesla_vgg16_cifar, "cifar100", marks=pytest.mark.slow),
], ids=IDS)
def test_a_tiny_run_of_every_cifar_config_under_the_cpu_protocol_records_it(
    module, arg, fake_cifar, tmp_path):
  config = shrunk(module.get_config(f"{arg},cpu"), fake_cifar)
  longer = next(iter(config.variants))  # a run of the figure deviating on its own
  assert "train" not in config.variants[longer]
  config.variants[longer].train = {"num_epochs": 2}
  figure = launcher.train_and_evaluate(config, str(tmp_path))
  assert figure["title"].endswith(", cpu protocol")
  assert PIL.Image.open(tmp_path / "test_accuracy_by_dp.png").text["Title"] == figure["title"]
  recorded = figure["protocol"]
  assert recorded["name"] == "cpu"
  assert recorded["deviations"]["model.width_multiplier"] == {"protocol": 0.25, "run": 1 / 16}
  assert recorded["deviations"]["train.num_epochs"] == {"protocol": 10, "run": 1}
  assert "optimizer.learning_rate" not in recorded["deviations"]  # left as the protocol has it
  for name in config.variants:
    results = json.loads((tmp_path / name / "results.json").read_text())
    own = results["protocol"]
    assert (own["name"], own["settings"]) == (recorded["name"], recorded["settings"])
    assert recorded["deviations_by_run"][name] == own["deviations"]
    assert own["deviations"]["train.num_epochs"]["run"] == (2 if name == longer else 1)
    assert results["config"]["model"]["width_multiplier"] == 1 / 16
    assert len(results["curves"]["test_accuracy_by_dp"]["points"]) == 2


# Every method and the CAM path of Table 1's columns, in the default suite (the
# whole columns above are slow): one variant per method each.
@pytest.mark.parametrize("arg, variants", [
    ("cifar10", ("idp-linear", "mp-idp", "tesla-gap-cam")),
    ("cifar100", ("idp-linear",)),
])
def test_one_variant_per_method_of_each_table_1_column_runs_under_the_cpu_protocol(
    arg, variants, fake_cifar, tmp_path):
  config = shrunk(tesla_vgg16_cifar.get_config(f"{arg},cpu"), fake_cifar)
  launcher.train_and_evaluate(config, str(tmp_path), variants)
  for name in variants:
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["protocol"]["name"] == "cpu"
    assert results["dataset"]["name"] == arg
    assert len(results["curves"]["test_accuracy_by_dp"]["points"]) == 2
  assert (tmp_path / "tesla-gap-cam" / "cam.png").exists() == ("tesla-gap-cam" in variants)
