"""CompactNet's launcher method end to end on a fake platform (paper 004)."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from benchmarks import compactnet_exchange, compactnet_models, compactnet_prefixes, compactnet_table
from dynscale import data
from dynscale.compactnet import latency, measure, platform, simulator, training, trimming
from dynscale.data import pipeline
from dynscale.nn import sliced, spec
from dynscale.train import runs, steps, sweep
from experiments import main as launcher
from experiments.configs import compactnet_cpu, compactnet_paper
from compactnet_fakes import WHOLE_SCALE, fake_remote, whole_network_latency
from data_orders import recorded_batches, recorded_orders


def _tiny(data_dir, **compactnet):
  """The smoke config at test size: a plain conv net keeps the compiles short."""
  config = compactnet_cpu.get_config("smoke")
  config.data.data_dir = str(data_dir)
  config.data.train_examples = 0
  config.data.val_size, config.data.batch_size, config.data.eval_batch_size = 12, 16, 20
  config.model.name, config.model.width_multiplier = "m_cifarnet", 1 / 16
  config.tensorboard = False
  c = config.compactnet
  c.finetune_steps, c.recalibration_batches, c.retrain_epochs = 2, 1, 1
  c.table_settings.round_to = 1
  c.t_final, c.iterations, c.decay = 1.3, 2, 1.0
  c.update(compactnet)
  return config


def _overhead(config):
  """The fake platform's cost per network that no unit of the table shows:
  every trim saves less than the table predicts."""
  return 0.1 * whole_network_latency(runs.planned_architecture(config))


def _fake_latency(export_dir, config):
  """What the fake platform says an exported network takes."""
  return whole_network_latency(sliced.load(export_dir).arch) + _overhead(config)


@pytest.fixture(scope="module")
def finished(fake_cifar, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("compactnet")
  config = _tiny(fake_cifar, measure_on=("cpu-b1",), corrections=4, distill=dict(weight=0.5),
                 decay=0.9)  # iterations of different depths (Eq. 1)
  requests = []
  results = training.train_and_evaluate(
      config, str(workdir), remote=fake_remote(requests, network_overhead_s=_overhead(config)))
  return config, workdir, results, requests


def test_the_run_meets_its_target_and_reports_measured_speedups(finished):
  config, workdir, results, _ = finished
  assert json.loads((workdir / "results.json").read_text())["measured_speedup"] == \
      results["measured_speedup"]
  assert results["target_speedup"] == pytest.approx(config.compactnet.t_final)
  assert results["measured_speedup"] >= results["target_speedup"]
  # the measured speed-up is that of the two exports, measured on the platform
  expected = (_fake_latency(results["original_export_dir"], config)
              / _fake_latency(results["export_dir"], config))
  assert results["measured_speedup"] == pytest.approx(expected)
  assert set(results["speedup_by_platform"]) == {"cpu-b64", "cpu-b1"}
  # each platform's latencies are the median of the readings kept with the load
  processes = training.table_settings(config).processes
  for name, conditions in results["latency_conditions"].items():
    assert len(conditions["readings"]) == processes and conditions["load_1min"] == 0.0
    assert results["latency_s"][name] == pytest.approx(
        simulator.median_over_processes(conditions["readings"]))
  # and so is every check's speed-up in the search
  assert results["search_checks"]
  for check in results["search_checks"]:
    readings = check["conditions"]["readings"]
    assert len(readings) == processes and check["conditions"]["load_1min"] == 0.0
    latencies = simulator.median_over_processes(readings)
    assert check["measured_speedup"] == pytest.approx(latencies["original"] /
                                                      latencies["searched"])
  # the uniform model is the widest one at most as slow as the searched one
  assert results["uniform_measured_speedup"] >= results["measured_speedup"]
  table, arch = latency.load(results["table"]), runs.planned_architecture(config)
  groups = trimming.trimmable_groups(arch)
  chosen = training.uniform_widths(table, results["uniform_multiplier"])
  searched = whole_network_latency(sliced.load(results["export_dir"]).arch)
  wider = [m for m in config.compactnet.uniform_multipliers if m > results["uniform_multiplier"]
           and training.uniform_widths(table, m) != chosen]
  assert wider, "the check needs a wider uniform model"
  for m in wider:
    widths = trimming.core_widths(arch, groups, training.uniform_widths(table, m))
    assert whole_network_latency(spec.trimmed_architecture(arch, list(widths))) > searched
  for key in ("test_accuracy", "original_test_accuracy", "uniform_test_accuracy"):
    assert 0 <= results[key] <= 1
  # each reported accuracy is the mean over retraining seeds of its own model and split
  by_seed = results["accuracy_by_seed"]
  for key, name, split in (("test_accuracy", "searched", "test"),
                           ("val_accuracy", "searched", "val"),
                           ("original_test_accuracy", "original", "test"),
                           ("uniform_test_accuracy", "uniform", "test")):
    assert results[key] == pytest.approx(np.mean(by_seed[name][split])), key
  assert by_seed["searched"]["test"] != by_seed["searched"]["val"]
  assert (workdir / "widths_per_layer.png").stat().st_size > 0


def test_the_trimmed_networks_retrain_distilled_from_the_original(finished):
  """With compactnet.distill.weight > 0 the searched and uniform networks log the
  distillation term of their loss; the original, their teacher, trains on labels."""
  config, workdir, _, _ = finished
  logged = set()
  for line in (workdir / "metrics.jsonl").open():
    logged.update(json.loads(line))
  for seed in config.compactnet.retrain_seeds:
    for name in ("searched", "uniform"):
      assert f"retrain-{name}-seed{seed}/train_distillation" in logged
    assert f"retrain-original-seed{seed}/train_loss" in logged
    assert f"retrain-original-seed{seed}/train_distillation" not in logged


def test_every_search_iteration_met_its_budget(finished):
  _, workdir, results, _ = finished
  table = latency.load(results["table"])
  history = json.loads((workdir / "search-summary.json").read_text())
  for record in history["iterations"]:
    assert table.predict(record["widths"]) <= record["budget_s"]
  assert list(results["widths"].values()) == history["iterations"][-1]["widths"]


@pytest.mark.parametrize("searched_error", [-0.15, 0.0, 0.3])
def test_the_uniform_model_is_found_where_the_table_misjudges_the_searched_one(
    finished, searched_error):
  config, _, results, _ = finished
  table, arch = latency.load(results["table"]), runs.planned_architecture(config)
  groups = trimming.trimmable_groups(arch)
  searched_s = whole_network_latency(sliced.load(results["export_dir"]).arch) * (
      1 + searched_error)
  requests = []

  def measured(item):
    return searched_s if "export_dir" in item else whole_network_latency(measure.network(item)[0])

  def remote(target, request):
    requests.append(len(request["networks"]))
    return {"latencies": {name: {"latency_s": measured(item), "spread": 0.0}
                          for name, item in request["networks"].items()}}

  multipliers = config.compactnet.uniform_multipliers
  settings = training.table_settings(config)
  chosen, widths, measurements = training.choose_uniform(
      table, arch, multipliers, list(results["widths"].values()), results["export_dir"],
      platform.get(config.compactnet.platform), settings, remote)

  def uniform_s(m):
    core = trimming.core_widths(arch, groups, training.uniform_widths(table, m))
    return whole_network_latency(spec.trimmed_architecture(arch, list(core)))
  fast = [m for m in multipliers if uniform_s(m) <= searched_s]
  assert fast, "the searched model must not be faster than every uniform model here"
  assert chosen == max(fast)
  assert widths == training.uniform_widths(table, chosen)
  assert max(requests) <= training.UNIFORM_WINDOW + 1  # a few at a time, beside the searched
  # every window measured is kept, with its readings
  assert len(measurements) == len(requests) // settings.processes
  for window in measurements:
    assert len(window["readings"]) == settings.processes
    assert window["latency_s"] == pytest.approx(simulator.median_over_processes(window["readings"]))
    assert window["latency_s"]["searched"] == pytest.approx(searched_s)
  # the table is exact here: its guess holds the boundary unless the searched model misleads it
  assert (len(requests) > 1) == (searched_error != 0)


@pytest.mark.parametrize("window", [1, 0, True])
def test_a_uniform_window_that_could_not_move_is_refused_before_measuring(finished, window):
  """Windows move by ``window - 1`` (they share a multiplier): one of 1 never
  moved, and the search for the uniform model never ended."""
  config, _, results, _ = finished
  table, arch = latency.load(results["table"]), runs.planned_architecture(config)

  def remote(target, request):
    raise AssertionError("measured before the window was checked")
  with pytest.raises(ValueError, match=rf"window must be an integer >= 2 .*got {window!r}"):
    training.choose_uniform(table, arch, config.compactnet.uniform_multipliers,
                            list(results["widths"].values()), results["export_dir"],
                            platform.get(config.compactnet.platform),
                            training.table_settings(config), remote, window=window)


def test_a_uniform_model_is_each_group_at_the_multiplier_to_the_nearest_width_on_the_grid(
    finished):
  """Groups of 4, 8 and 12 channels (the table's grids start at 1, 2 and 3):
  x0.7 gives 2.8, 5.6, 8.4 -> 3, 6, 8; x0.62 gives 2.48, 4.96, 7.44 -> 2, 5, 7;
  x0.2 gives 0.8, 1.6, 2.4 -> 1, 2 and the 12-channel groups' grid minimum 3."""
  table = latency.load(finished[2]["table"])
  assert table.group_sizes == (4, 4, 8, 8, 8, 12, 12, 12) and table.round_to == 1
  assert training.uniform_widths(table, 0.7) == [3, 3, 6, 6, 6, 8, 8, 8]
  assert training.uniform_widths(table, 0.62) == [2, 2, 5, 5, 5, 7, 7, 7]
  assert training.uniform_widths(table, 0.2) == [1, 1, 2, 2, 2, 3, 3, 3]
  assert training.uniform_widths(table, 1.0) == list(table.group_sizes)


def _choose_on(finished, uniform_s, searched_s):
  """:func:`training.choose_uniform` on a platform measuring the uniform model of
  widths ``w`` at ``uniform_s(w, window)`` and the searched one at ``searched_s``,
  ``window`` counting the windows measured so far (0 first)."""
  config, _, results, _ = finished
  table, arch = latency.load(results["table"]), runs.planned_architecture(config)
  windows = []

  def remote(target, request):
    windows.append(request["networks"])
    return {"latencies": {
        name: {"latency_s": searched_s if "export_dir" in item
               else uniform_s(tuple(item["widths"]), len(windows) - 1), "spread": 0.0}
        for name, item in request["networks"].items()}}
  chosen, _, _ = training.choose_uniform(
      table, arch, config.compactnet.uniform_multipliers, list(results["widths"].values()),
      results["export_dir"], platform.get(config.compactnet.platform),
      training.table_settings(config), remote)
  return chosen, windows


def test_the_uniform_model_is_the_widest_measured_at_most_as_slow_as_the_searched_one(finished):
  """Latencies unrelated to the table's (1 ms per distinct uniform model from the
  narrowest up): a uniform model that measures exactly the searched model's
  latency counts as fast enough, one a hair slower does not, wherever the
  table guessed the boundary."""
  config, _, results, _ = finished
  table = latency.load(results["table"])
  options = training.distinct_uniform(table, config.compactnet.uniform_multipliers)
  ms = list(options)  # widest first
  rank = {tuple(w): len(ms) - i for i, w in enumerate(options.values())}

  def uniform_s(widths, _):
    return rank[widths] * 1e-3
  for k in (1, len(ms) // 2, len(ms) - 2):
    chosen, _ = _choose_on(finished, uniform_s, rank[tuple(options[ms[k]])] * 1e-3)
    assert chosen == ms[k]
    chosen, _ = _choose_on(finished, uniform_s, rank[tuple(options[ms[k]])] * 1e-3 * 0.999)
    assert chosen == ms[k + 1]


def test_a_boundary_lost_to_noise_in_a_wider_window_keeps_the_widest_fast_model_seen(finished):
  """Every uniform model of the first window measures fast, so the search
  looks wider; when that window then measures every one slow (noise between
  windows), the choice is the widest model the first window found fast."""
  def uniform_s(widths, window):
    return 0.5 if window == 0 else 2.0
  chosen, windows = _choose_on(finished, uniform_s, 1.0)
  config, _, results, _ = finished
  options = training.distinct_uniform(latency.load(results["table"]),
                                      config.compactnet.uniform_multipliers)
  first = [name for name in windows[0] if name != "searched"]
  assert len(windows) == 2 and first[0] != f"uniform-{list(options)[0]:g}"
  assert f"uniform-{chosen:g}" == first[0]


def test_a_rerun_reads_the_uniform_choice_back_instead_of_measuring_again(finished, tmp_path):
  config, workdir, results, _ = finished
  kept = json.loads((workdir / training.UNIFORM_CHOICE).read_text())
  assert kept["multiplier"] == results["uniform_multiplier"]
  assert kept["measurements"] and all(m["readings"] for m in kept["measurements"])
  assert kept["widths"] == list(results["uniform_widths"].values())
  table, arch = latency.load(results["table"]), runs.planned_architecture(config)
  searched = list(results["widths"].values())
  target, settings = platform.get(config.compactnet.platform), training.table_settings(config)

  def choose(workdir_, widths, remote):
    return training.kept_uniform_choice(
        str(workdir_), table, arch, config.compactnet.uniform_multipliers, widths,
        results["export_dir"], target, settings, remote)

  def never(target, request):
    raise AssertionError("the kept choice was measured again")
  assert choose(workdir, searched, never) == (kept["multiplier"], kept["widths"])
  # another searched model (a changed config in the same workdir) is measured anew
  (tmp_path / training.UNIFORM_CHOICE).write_text(json.dumps(kept))
  other = list(table.group_sizes)  # on the grid, and not the searched widths
  assert other != searched
  requests = []
  choose(tmp_path, other, fake_remote(requests))
  assert requests
  assert json.loads((tmp_path / training.UNIFORM_CHOICE).read_text())["searched_widths"] == other


def test_a_model_measured_short_of_the_target_is_searched_further(finished):
  config, workdir, results, _ = finished
  table, arch = latency.load(results["table"]), runs.planned_architecture(config)
  history = json.loads((workdir / "search-summary.json").read_text())
  checks, iterations = history["checks"], history["iterations"]
  assert results["search_checks"] == checks
  original = whole_network_latency(arch) + _overhead(config)
  t = config.compactnet.t_final
  assert len(checks) > 1 and checks[-1]["next_budgets_s"] == []
  step = training.plan(config).reductions[-1] * table.predict(table.full_widths)
  for check in checks:
    widths = iterations[check["after_iterations"] - 1]["widths"]
    core = trimming.core_widths(arch, trimming.trimmable_groups(arch), widths)
    measured = original / (whole_network_latency(spec.trimmed_architecture(arch, list(core)))
                           + _overhead(config))
    assert check["measured_speedup"] == pytest.approx(measured)
    budgets = check["next_budgets_s"]
    if budgets:
      assert measured < t
      # the last: the budget of a predicted speed-up T p / m, p the table's speed-up here
      assert budgets[-1] == pytest.approx(
          table.predict(table.full_widths) / (t * table.speedup(widths) / measured))
      # reached in equal steps, none removing more than the schedule's last iteration
      steps = -np.diff([table.predict(widths), *budgets])
      assert np.allclose(steps, steps[0]) and steps[0] <= step * (1 + 1e-9)
      assert steps[0] * len(budgets) > step * (len(budgets) - 1)  # as few steps as that allows
      first = check["after_iterations"]
      assert [r["budget_s"] for r in iterations[first:first + len(budgets)]] == budgets
  assert checks[0]["measured_speedup"] < t <= checks[-1]["measured_speedup"]
  assert results["measured_speedup"] == pytest.approx(checks[-1]["measured_speedup"])


@pytest.mark.parametrize("iterations, decay", [(3, 0.5), (4, 0.9)])
def test_a_correction_steps_at_most_what_the_schedules_last_iteration_removes(
    finished, iterations, decay):
  """Eq. 1-2 read as reductions: T_sub,i = r/N d^i sum to 1 - 1/T_final, so the
  last (smallest) is (1 - 1/T_final) d^(N-1) / sum_i d^i of the original latency.
  Catches the corrections stepping as deep as the first (largest) iteration."""
  config, _, results, _ = finished
  config = ml_collections.ConfigDict(config.to_dict())
  config.compactnet.iterations, config.compactnet.decay = iterations, decay
  table = latency.load(results["table"])
  powers = decay ** np.arange(iterations)
  last = (1 - 1 / config.compactnet.t_final) * powers[-1] / powers.sum()
  assert training.last_step_s(config, table) == pytest.approx(
      last * table.predict(table.full_widths), rel=1e-9)


def _and_scrambled_statistics(run):
  """The run's starting variables, and a copy with random batch-norm statistics."""
  given = run.model.pure_variables()
  rng = np.random.default_rng(0)
  return given, sliced.merge_variables(given, jax.tree.map(
      lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), sliced.bn_stats_of(given)))


def _core_widths(run, results, key):
  """The core widths of the group widths ``results[key]`` of the run's network."""
  groups = trimming.trimmable_groups(run.arch, latency.load(results["table"]).expansion)
  return trimming.core_widths(run.arch, groups, list(results[key].values()))


def test_a_candidate_is_recalibrated_at_its_widths_before_its_fine_tune(finished, tmp_path):
  """The batch-norm statistics a candidate comes with do not matter: they are
  recalibrated at its widths before its fine-tune (without it every trimmed
  network tried fell to about 10%). Two copies of a network that differ only in
  their running statistics fine-tune to the same kept channels. Catches the
  recalibration computed and then dropped."""
  config, _, results, _ = finished
  run = runs.start(config, str(tmp_path))
  given, scrambled = _and_scrambled_statistics(run)
  core = _core_widths(run, results, "widths")
  candidates = training.Candidates.create(run, given)
  kept = [sliced.slice_variables(run.arch, candidates.fine_tune(v, core, slot=0), core)
          for v in (given, scrambled)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *kept)


def _assert_first_layer_statistics_are_the_batches_moments(arch, variables, batches):
  """The first layer's batch-norm statistics in ``variables`` are the moments of
  its filters' outputs over ``batches``, by hand (its input is the image)."""
  first = arch["layers"][0]
  assert first["kind"] == "conv" and first["bn"]
  layer = variables["layers"][0]
  outputs = jnp.concatenate([jax.lax.conv_general_dilated(
      x, layer["kernel"], (1, 1), first["padding"], dimension_numbers=("NHWC", "HWIO", "NHWC"))
      for x in batches])
  np.testing.assert_allclose(layer["bn"]["mean"], jnp.mean(outputs, axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(layer["bn"]["var"], jnp.var(outputs, axis=(0, 1, 2)),
                             rtol=1e-3, atol=1e-5)


def test_the_uniform_model_is_recalibrated_after_its_trim(finished, tmp_path):
  """The uniform model's batch-norm statistics are measured again after its
  trim: the statistics it was cut with do not matter, and its first layer's
  are the moments of its kept filters' outputs over the batches, by hand.
  Catches the trimmed network keeping the original's statistics; and the
  uniform model's retraining records the recalibration in its origin (one
  started without it is refused, not resumed)."""
  config, workdir, results, _ = finished
  run = runs.start(config, str(tmp_path))
  given, scrambled = _and_scrambled_statistics(run)
  core = _core_widths(run, results, "uniform_widths")
  batches = training.Candidates.create(run, given).trainer.training_batches(2)
  trimmed = [training.trimmed_recalibrated(run.arch, v, core, batches, jnp.float32)[1]
             for v in (given, scrambled)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               *map(sliced.bn_stats_of, trimmed))
  _assert_first_layer_statistics_are_the_batches_moments(run.arch, trimmed[0], batches)
  seed = config.compactnet.retrain_seeds[0]
  shutil.copytree(workdir / "checkpoints", tmp_path / "copy" / "checkpoints")
  copy = runs.start(config, str(tmp_path / "copy"))
  uniform = sliced.load(results["uniform_export_dir"])
  catch_up = (sum(i["chosen"] is not None for i in
                  json.loads((workdir / "search-summary.json").read_text())["iterations"])
              * config.compactnet.finetune_steps)
  teacher = training.Teacher(run.arch, given, training.retrain_origin(catch_up))
  with pytest.raises(ValueError, match=f"retrain-uniform-seed{seed}.*delete"):
    training.retrain(copy, "uniform", uniform.arch, uniform.variables, seed, catch_up, teacher)


def test_the_uniform_model_keeps_the_originals_largest_filters(finished):
  """The uniform model is L2-trimmed from the original (§3.3's importance): its
  first layer's filters, after a short retraining, are each nearest to one of
  the original's largest-norm filters, in that order, by hand (kept in
  channel order, the first filters would be its ancestors)."""
  _, _, results, _ = finished
  original = np.asarray(sliced.load(results["original_export_dir"]).variables["layers"][0]
                        ["kernel"], np.float64)
  uniform = np.asarray(sliced.load(results["uniform_export_dir"]).variables["layers"][0]
                       ["kernel"], np.float64)
  width = uniform.shape[-1]
  largest = np.argsort(-np.sqrt(np.sum(original ** 2, axis=(0, 1, 2))))[:width]
  assert set(largest) != set(range(width)), "the original's largest filters are its first"
  distance = np.sum((uniform[..., :, None] - original[..., None, :]) ** 2, axis=(0, 1, 2))
  np.testing.assert_array_equal(np.argmin(distance, axis=1), largest)


def test_a_speedup_margin_searches_until_the_measurement_clears_it(finished, tmp_path):
  """With compactnet.speedup_margin m the checks hold the model to T (1 + m):
  a search whose model measured T without it trims further, each corrected
  budget aimed at T (1 + m); a history checked against another goal is refused;
  allowed one correction fewer than that took, it stops short of the goal."""
  config, _, results, _ = finished
  t = config.compactnet.t_final
  margin = 1.02 * results["measured_speedup"] / t - 1  # the run without it ends below
  goal = t * (1 + margin)
  config = ml_collections.ConfigDict(config.to_dict())
  config.compactnet.speedup_margin = margin
  run = runs.start(config, str(tmp_path))
  table = latency.load(results["table"])
  original = run.model.pure_variables()

  def search_on_platform(run):
    return training.search_on_platform(
        run, original, results["original_export_dir"], table,
        training.Candidates.create(run, original),
        fake_remote([], network_overhead_s=_overhead(config)))
  history = search_on_platform(run).history
  checks, iterations = history["checks"], history["iterations"]
  assert [c["goal_speedup"] for c in checks] == [pytest.approx(goal)] * len(checks)
  assert checks[-1]["next_budgets_s"] == []
  assert checks[-1]["measured_speedup"] >= goal > results["measured_speedup"]
  for check in checks[:-1]:
    widths = iterations[check["after_iterations"] - 1]["widths"]
    assert check["measured_speedup"] < goal
    assert check["next_budgets_s"][-1] == pytest.approx(
        table.predict(table.full_widths) / (goal * table.speedup(widths)
                                            / check["measured_speedup"]))
  # rerun, the finished search (its last check says so) is read back, not measured again
  assert search_on_platform(run).history == history
  config.compactnet.speedup_margin = 0.0
  with pytest.raises(ValueError, match="compactnet.speedup_margin.*another workdir"):
    search_on_platform(runs.start(config, str(tmp_path)))
  # with one correction fewer than it took, the search stops short of the goal
  assert len(checks) >= 2
  config.compactnet.speedup_margin = margin
  config.compactnet.corrections = len(checks) - 2
  stopped = search_on_platform(runs.start(config, str(tmp_path / "fewer"))).history["checks"]
  assert len(stopped) == len(checks) - 1
  assert stopped[-1]["next_budgets_s"] == [] and stopped[-1]["measured_speedup"] < goal


def test_a_retraining_copied_from_another_search_is_refused_not_resumed(finished, tmp_path):
  """The original's and the uniform model's retrainings first train as many
  steps as the search's chosen fine-tunes (so all three models see as many
  images); the original's checkpoint in a workdir whose search chose another
  number (a copy from another run) is refused, as is a trimmed network's that
  distilled from such an original, and the uniform model's checkpoint records
  its catch-up; the run's own checkpoints resume."""
  config, workdir, results, _ = finished
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  run = runs.start(config, str(tmp_path))
  history = json.loads((workdir / "search-summary.json").read_text())
  chosen = sum(i["chosen"] is not None for i in history["iterations"])
  catch_up = chosen * config.compactnet.finetune_steps
  seed = config.compactnet.retrain_seeds[0]
  variables = run.model.pure_variables()
  with pytest.raises(ValueError, match=f"retrain-original-seed{seed}.*delete"):
    training.retrain(run, "original", run.arch, variables, seed,  # one more chosen
                     catch_up + config.compactnet.finetune_steps)
  resumed = training.retrain(run, "original", run.arch, variables, seed, catch_up)
  assert resumed.trainer.evaluate(resumed.state, "val", 1.0)["accuracy"] == \
      results["accuracy_by_seed"]["original"]["val"][0]
  searched = sliced.load(results["export_dir"])
  teacher = lambda steps: training.Teacher(run.arch, variables, training.retrain_origin(steps))
  with pytest.raises(ValueError, match=f"retrain-searched-seed{seed}"):
    training.retrain(run, "searched", searched.arch, searched.variables, seed, 0,
                     teacher(catch_up + 1))
  training.retrain(run, "searched", searched.arch, searched.variables, seed, 0,
                   teacher(catch_up))
  uniform = sliced.load(results["uniform_export_dir"])
  with pytest.raises(ValueError, match=f"retrain-uniform-seed{seed}.*delete"):
    training.retrain(run, "uniform", uniform.arch, uniform.variables, seed, 0,
                     teacher(catch_up))
  training.retrain(run, "uniform", uniform.arch, uniform.variables, seed, catch_up,
                   teacher(catch_up), config.compactnet.recalibration_batches)


def test_a_retraining_killed_before_its_first_checkpoint_catches_up_again(finished, tmp_path):
  """A retraining killed during its first epoch leaves its stage directory
  (opened for checkpoints) without a checkpoint: the rerun trains the
  catch-up steps again, and ends as a retraining never killed. Catches the
  directory taken for a started stage: the rerun skipped the catch-up (its
  model saw fewer images than the searched one)."""
  config, workdir, results, _ = finished
  history = json.loads((workdir / "search-summary.json").read_text())
  catch_up = (sum(i["chosen"] is not None for i in history["iterations"])
              * config.compactnet.finetune_steps)
  assert catch_up > 0
  seed = config.compactnet.retrain_seeds[0]

  def retrained(directory, killed):
    run = runs.start(config, str(directory))
    if killed:
      (directory / "checkpoints" / f"retrain-original-seed{seed}").mkdir(parents=True)
    fitted = training.retrain(run, "original", run.arch, run.model.pure_variables(), seed,
                              catch_up)
    return fitted.trainer.evaluate(fitted.state, "val", 1.0)
  assert retrained(tmp_path / "killed", True) == retrained(tmp_path / "straight", False)


def test_a_retraining_seeded_as_the_pretraining_reads_other_batches(finished, tmp_path,
                                                                   monkeypatch):
  """The retraining with the pretraining's seed reads the data order of the
  epochs after the pretraining's, its catch-up steps first, then its own
  epochs after those. Catches the catch-up or the retraining counting data
  epochs from zero (they replayed the pretraining's batches), and the
  retraining starting at the catch-up's epoch (it replayed the catch-up's)."""
  config, _, _, _ = finished
  assert config.seed in config.compactnet.retrain_seeds and not config.model.init_from
  orders = recorded_orders(monkeypatch)
  run = runs.start(config, str(tmp_path))
  runs.fit_stage(run, run.model, runs.Stage("pretrain", config.train.num_epochs, nnx.Param,
                                            steps.classification_loss, steps.eval_forward))
  pretraining = set(orders)
  orders.clear()
  training.retrain(run, "original", run.arch, run.model.pure_variables(), config.seed, 2)
  catch_up, retraining = orders[0], orders[1:]
  assert retraining and not pretraining & set(orders) and catch_up not in retraining


def test_candidates_share_their_iterations_batches_and_the_catch_up_reads_them_in_turn(
    finished, tmp_path, monkeypatch):
  """Every candidate of an iteration is fine-tuned on the same batches (they
  were each read from an epoch numbered by their group: selection compared
  data luck too), none of the pretraining's; the original's catch-up reads
  the chosen fine-tunes' batches in turn, and its retraining none of them."""
  config, _, _, _ = finished
  assert not config.model.init_from
  f = config.compactnet.finetune_steps
  batches = recorded_batches(monkeypatch)
  run = runs.start(config, str(tmp_path))
  runs.fit_stage(run, run.model, runs.Stage("pretrain", config.train.num_epochs, nnx.Param,
                                            steps.classification_loss, steps.eval_forward))
  pretraining = set(batches)
  original = run.model.pure_variables()
  candidates = training.Candidates.create(run, original)
  full = list(spec.resolve_widths(run.arch, 1.0))
  read = {}
  for slot, core in ((0, full), (0, [w // 2 for w in full]), (1, full)):
    batches.clear()
    candidates.fine_tune(original, core, slot)
    read.setdefault(slot, []).append(list(batches))
  assert read[0][0] == read[0][1] and len(read[0][0]) == f  # one iteration: the same batches
  assert not set(read[0][0]) & set(read[1][0]) and not pretraining & set(read[0][0] + read[1][0])
  batches.clear()
  training.retrain(run, "original", run.arch, original, config.seed, 2 * f)
  catch_up, retraining = batches[:2 * f], set(batches[2 * f:])
  assert catch_up == read[0][0] + read[1][0]
  assert retraining and not retraining & (pretraining | set(catch_up))


_LOAD_ALONE = """
import json, sys
import numpy as np
from dynscale.nn import sliced
logits = sliced.load(sys.argv[1])(np.load(sys.argv[2]), 1.0)
print(json.dumps({"logits": np.asarray(logits).tolist(), "flax": "flax" in sys.modules}))
"""


def test_the_export_reloads_without_flax_and_is_the_retrained_network(finished, tmp_path):
  """The searched export is the trimmed architecture with the retrained weights:
  its cross-entropy on the validation split is the one the retraining logged
  for its kept epoch (first retraining seed), and a process that imports no
  Flax loads it and computes the same logits (the test checked shape and
  finiteness only: an export of zeros passed)."""
  config, workdir, results, _ = finished
  exported = sliced.load(results["export_dir"])
  original = sliced.load(results["original_export_dir"])
  groups = trimming.trimmable_groups(original.arch)
  core = trimming.core_widths(original.arch, groups, list(results["widths"].values()))
  assert exported.arch == spec.trimmed_architecture(original.arch, list(core))
  dataset = data.load(config.data.dataset, data_dir=config.data.data_dir,
                      val_size=config.data.val_size, seed=config.seed,
                      train_examples=config.data.train_examples)
  images = np.asarray(pipeline.normalize(dataset.val_x,
                                         *pipeline.normalization_stats(dataset.name)))
  logits = np.asarray(sliced.apply_sliced(exported.arch, exported.variables, images), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -log_p[np.arange(len(dataset.val_y)), dataset.val_y].mean()
  stage = f"retrain-searched-seed{config.compactnet.retrain_seeds[0]}"
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [row[f"{stage}/val_loss"] for row in logged if f"{stage}/val_loss" in row]
  assert config.compactnet.retrain_epochs == len(losses) == 1  # the kept epoch: the only one
  assert loss == pytest.approx(losses[0], rel=1e-4)
  np.save(tmp_path / "x.npy", images)
  out = subprocess.run([sys.executable, "-c", _LOAD_ALONE, results["export_dir"],
                        str(tmp_path / "x.npy")], capture_output=True, text=True, check=True)
  alone = json.loads(out.stdout.strip().splitlines()[-1])
  assert not alone["flax"]
  np.testing.assert_allclose(alone["logits"], logits, rtol=1e-5, atol=1e-5)


def test_the_models_benchmark_reports_the_fakes_cost_model(finished, capsys):
  _, workdir, results, _ = finished
  requests = []
  out = workdir / "models.json"
  settings = simulator.TableSettings(warmup=0, rounds=1)
  record = compactnet_models.run(results_path=str(workdir / "results.json"),
                                 platforms=["cpu-b1", "cpu-b64"], multipliers=[0.75, 0.5],
                                 settings=settings, out=str(out), remote=fake_remote(requests))
  assert json.loads(capsys.readouterr().out.strip()) == json.loads(out.read_text())
  assert requests == ["networks"] * (2 * settings.processes)
  assert list(record["networks"]) == ["original", "searched", "uniform", "x0.75", "x0.5"]
  original = sliced.load(results["original_export_dir"])
  for name, key in (("original", "original_export_dir"), ("searched", "export_dir"),
                    ("uniform", "uniform_export_dir")):
    arch = sliced.load(results[key]).arch
    speedup = whole_network_latency(original.arch) / whole_network_latency(arch)
    assert record["speedup"]["cpu-b1"][name] == pytest.approx(speedup)
  assert record["networks"]["original"]["weight_mib"] * 2**20 == sum(
      np.asarray(x).nbytes for x in jax.tree.leaves(original.variables))
  # the fake costs 0.7 ns per multiply-add and nothing per byte
  for fit in record["fits"].values():
    assert fit["ms_per_mflop"] == pytest.approx(WHOLE_SCALE * 1e-9 * 1e6 * 1e3, rel=1e-6)
    assert fit["ms_per_mib"] == pytest.approx(0, abs=1e-6)
  # M-CifarNet on 32x32: two convs on 30x30 maps, three on 15x15, three on 8x8, a dense layer
  layers = record["layers"]["original"]
  assert list(layers) == ["900", "225", "64", "1", "bn"]
  assert sum(r["multiply_adds"] for r in layers.values()) == \
      record["networks"]["original"]["multiply_adds"]
  assert sum(r["params"] for r in layers.values()) == record["networks"]["original"]["params"]


@pytest.mark.parametrize("change, message", [
    (dict(platforms=["tpu"]), r"platforms must be one of \['cpu-b1'"),
    (dict(platforms=[]), "platforms must name at least one"),
    (dict(multipliers=[1.5]), r"multipliers must lie in \(0, 1\)"),
    (dict(results_path="/nonexistent/results.json"), "results must be a CompactNet run"),
    # the record would be lost after every measurement
    (dict(out="/dev/null/record.json"), "out's directory '/dev/null' cannot be written"),
])
def test_the_models_benchmark_refuses_bad_input_before_measuring(finished, change, message):
  _, workdir, _, _ = finished
  requests = []
  kwargs = dict(results_path=str(workdir / "results.json"), platforms=["cpu-b1"],
                remote=fake_remote(requests))
  with pytest.raises(ValueError, match=message):
    compactnet_models.run(**{**kwargs, **change})
  assert requests == []


def _exchange_runs(workdir, results, third: bool = False):
  """The run's own results (for its platform, cpu-b64) and a second run's for
  cpu-b1 whose searched model is this run's uniform one (same original); with
  ``third``, a cpu-b64-bf16 run whose searched model is the original itself."""
  others = {"cpu-b1": results["uniform_export_dir"]}
  if third:
    others["cpu-b64-bf16"] = results["original_export_dir"]
  paths = [str(workdir / "results.json")]
  for name, export_dir in others.items():
    path = workdir / f"exchange-{name}-results.json"
    path.write_text(json.dumps({**results, "platform": name, "export_dir": export_dir}))
    paths.append(str(path))
  return paths


def test_the_prefixes_benchmark_charges_each_unit_what_it_adds_to_its_prefix(finished, capsys):
  _, workdir, results, _ = finished
  requests = []
  out = workdir / "prefixes.json"
  settings = simulator.TableSettings(warmup=0, rounds=1, processes=1)
  record = compactnet_prefixes.run(results_path=str(workdir / "results.json"), settings=settings,
                                   out=str(out), remote=fake_remote(requests))
  assert json.loads(capsys.readouterr().out.strip()) == json.loads(out.read_text())
  assert requests == ["networks"]  # every prefix of both networks in one interleaved run
  table = latency.load(results["table"])
  original, searched = (sliced.load(results[k]).arch for k in ("original_export_dir", "export_dir"))
  full, trimmed = record["networks"].values()
  assert full["widths"] == list(table.full_widths)
  assert trimmed["widths"] == list(results["widths"].values())
  for traced, arch in ((full, original), (trimmed, searched)):
    assert traced["measured_ms"] == pytest.approx(1e3 * whole_network_latency(arch))
    assert traced["units"][-1]["prefix_ms"] == pytest.approx(traced["measured_ms"])
    assert traced["predicted_ms"] == pytest.approx(1e3 * table.predict(traced["widths"]))
  # The fake runs a network in WHOLE_SCALE x the sum of its units alone, and the
  # table holds the units alone: at full width (grid points, no interpolation)
  # each unit's increment over the prefix before it is WHOLE_SCALE x its entry.
  assert len(full["units"]) == len(table.units) > 2
  for row, unit in zip(full["units"], table.units):
    assert row["unit"] == unit.name
    assert row["increment_ms"] == pytest.approx(WHOLE_SCALE * row["table_ms"], rel=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(widths=[[10 ** 6] * 9]), "widths"),
    (dict(results_path="/nonexistent/results.json"), "results must be a CompactNet run"),
    (dict(out="/dev/null/record.json"), "out's directory '/dev/null' cannot be written"),
])
def test_the_prefixes_benchmark_refuses_bad_input_before_measuring(finished, change, message):
  _, workdir, _, _ = finished
  requests = []
  kwargs = dict(results_path=str(workdir / "results.json"), remote=fake_remote(requests))
  with pytest.raises(ValueError, match=message):
    compactnet_prefixes.run(**{**kwargs, **change})
  assert requests == []


def test_the_exchange_times_every_platforms_model_on_every_platform(finished, capsys):
  _, workdir, results, _ = finished
  per_mib_s = {"cpu-b64": 0.0, "cpu-b1": 5e-3}  # weights cost only at batch 1
  requests = []
  fakes = {p: fake_remote(requests, per_mib_s=c) for p, c in per_mib_s.items()}
  settings = simulator.TableSettings(warmup=0, rounds=1)
  record = compactnet_exchange.run(
      results_paths=_exchange_runs(workdir, results), settings=settings,
      remote=lambda target, request: fakes[target.name](target, request))
  assert json.loads(capsys.readouterr().out.strip()) == record
  # one interleaved run per platform and process
  assert requests == ["networks"] * (2 * settings.processes)
  assert [pair["platforms"] for pair in record["pairs"]] == [["cpu-b64", "cpu-b1"]]
  assert record["pairs"][0]["advantage"] == pytest.approx(record["home_advantage"])

  def expected(export_dir, on):
    network = sliced.load(export_dir)
    mib = sum(np.asarray(x).nbytes for x in jax.tree.leaves(network.variables)) / 2**20
    return whole_network_latency(network.arch) + per_mib_s[on] * mib
  exports = {"original": results["original_export_dir"], "cpu-b64": results["export_dir"],
             "cpu-b1": results["uniform_export_dir"]}
  for on in per_mib_s:
    latency_s = {model: expected(d, on) for model, d in exports.items()}
    assert record["latency_s"][on] == pytest.approx(latency_s)
    other = "cpu-b1" if on == "cpu-b64" else "cpu-b64"
    assert record["home_advantage"][on] == pytest.approx(latency_s[other] / latency_s[on] - 1)
    assert record["speedup"][on]["original"] == 1


def test_the_exchange_of_three_platforms_compares_every_pair_alone(finished, capsys):
  """With a third platform, ``home_advantage`` is against the fastest other
  model, while each pair of Table 7 compares two platforms' models alone."""
  _, workdir, results, _ = finished
  per_mib_s = {"cpu-b64": 0.0, "cpu-b1": 5e-3, "cpu-b64-bf16": 1e-3}
  fakes = {p: fake_remote([], per_mib_s=c) for p, c in per_mib_s.items()}
  record = compactnet_exchange.run(
      results_paths=_exchange_runs(workdir, results, third=True),
      settings=simulator.TableSettings(warmup=0, rounds=1, processes=1),
      remote=lambda target, request: fakes[target.name](target, request))
  lat = record["latency_s"]
  expected = {("cpu-b64", "cpu-b1"), ("cpu-b64", "cpu-b64-bf16"), ("cpu-b1", "cpu-b64-bf16")}
  assert {tuple(pair["platforms"]) for pair in record["pairs"]} == expected
  for pair in record["pairs"]:
    a, b = pair["platforms"]
    assert pair["advantage"] == pytest.approx({a: lat[a][b] / lat[a][a] - 1,
                                               b: lat[b][a] / lat[b][b] - 1})
  for home in per_mib_s:
    others = [lat[home][m] for m in per_mib_s if m != home]
    assert record["home_advantage"][home] == pytest.approx(min(others) / lat[home][home] - 1)
  assert "cpu-b1 / cpu-b64-bf16: on cpu-b1 its own" in capsys.readouterr().err


def test_the_exchange_refuses_runs_it_cannot_compare(finished, tmp_path):
  _, workdir, results, _ = finished
  paths = _exchange_runs(workdir, results)
  same_platform = tmp_path / "b64-again.json"
  same_platform.write_text(json.dumps(results))
  other_original = tmp_path / "other-original.json"
  other_original.write_text(json.dumps({**results, "platform": "cpu-b1",
                                        "original_export_dir": results["export_dir"]}))
  for paths_, message in (([paths[0]], "at least two runs"),
                          ([paths[0], str(same_platform)], "two runs for platform 'cpu-b64'"),
                          ([paths[0], str(other_original)], "must trim the same original"),
                          ([paths[0], "/nonexistent.json"], "a CompactNet run's results.json")):
    requests = []
    with pytest.raises(ValueError, match=message):
      compactnet_exchange.run(results_paths=paths_, remote=fake_remote(requests))
    assert requests == []
  for out, message in (("/dev/null/exchange.json", "out's directory '/dev/null' cannot be"),
                       (str(tmp_path), "out .* is a directory")):
    requests = []
    with pytest.raises(ValueError, match=message):  # the record would be lost
      compactnet_exchange.run(results_paths=paths, out=out, remote=fake_remote(requests))
    assert requests == []


def test_a_finished_run_rerun_reports_its_measurements_without_measuring_again(finished,
                                                                              tmp_path):
  """Rerunning a finished run (as a figure does for its finished variants)
  resumes every stage and reads the final latencies back; a platform's
  reading is taken again only for other networks. Catches the rerun
  measuring again and rewriting the results with another reading. Also: the
  uniform model the run hands its retraining has its batch norm
  recalibrated on the candidates' batches (catches the plain trim, whose
  statistics are the original's)."""
  config, workdir, results, _ = finished
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  requests, retrained = [], {}
  retrain = training.retrain

  def kept(run, name, arch, variables, *args):
    retrained[name] = (arch, variables)
    return retrain(run, name, arch, variables, *args)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(training, "retrain", kept)
    rerun = training.train_and_evaluate(config, str(copy), remote=fake_remote(requests))
  run = runs.start(config, str(tmp_path / "batches"))
  batches = training.Candidates.create(run, run.model.pure_variables()).trainer.training_batches(
      config.compactnet.recalibration_batches)
  _assert_first_layer_statistics_are_the_batches_moments(*retrained["uniform"], batches)
  assert requests == []  # the fake would now read other latencies: no overhead
  assert rerun["latency_s"] == results["latency_s"]
  assert rerun["measured_speedup"] == results["measured_speedup"]
  target = platform.get(config.compactnet.platform)
  settings = training.table_settings(config)
  networks = {"original": results["original_export_dir"], "searched": results["export_dir"]}
  first = training.kept_measurements(str(tmp_path), fake_remote(requests), target, networks,
                                     settings)
  assert training.kept_measurements(str(tmp_path), fake_remote(requests), target, networks,
                                    settings) == first
  assert requests == ["networks"] * settings.processes
  original = sliced.load(results["original_export_dir"])
  sliced.export(sliced.SlicedModel(original.arch, jax.tree.map(lambda a: 2 * a,
                                                               original.variables)),
                tmp_path / "other")  # the same shapes, other weights
  training.kept_measurements(str(tmp_path), fake_remote(requests), target,
                             {**networks, "original": str(tmp_path / "other")}, settings)
  assert requests == ["networks"] * 2 * settings.processes


def test_a_table_is_measured_once_and_reused(finished, fake_cifar):
  """A rerun reads its own table back, and refuses it when the config now asks
  for another grid (the search would trim in the old steps)."""
  config, workdir, results, requests = finished
  assert requests.count("table") == 1
  reused = []
  path, _ = training.load_or_build_table(config, runs.planned_architecture(config), str(workdir),
                                         fake_remote(reused))
  assert path == results["table"] and reused == []
  # a rerun asking for another grid refuses the table it built, naming the setting
  config = ml_collections.ConfigDict(config.to_dict())
  config.compactnet.table_settings.round_to = 2
  with pytest.raises(ValueError, match=r"compactnet.table_settings.round_to: the table in "
                                       r".* was built with 1, this config asks for 2; delete"):
    training.load_or_build_table(config, runs.planned_architecture(config), str(workdir),
                                 fake_remote(reused))
  assert reused == []


@pytest.mark.parametrize("change, message", [
    (dict(t_final=1.0), r"compactnet.t_final must be a finite number > 1"),
    (dict(iterations=0), r"compactnet.iterations must be an integer >= 1"),
    (dict(decay=1.5), r"compactnet.decay"),
    (dict(t_final=3.0, iterations=2, decay=0.2), r"t_final must be below"),
    (dict(platform="tpu-b64"), r"compactnet.platform must be one of"),
    (dict(measure_on=("npu",)), r"compactnet.measure_on must be one of"),
    (dict(finetune_steps=0), r"compactnet.finetune_steps must be a positive integer"),
    (dict(score_examples=-1), r"compactnet.score_examples must be an integer >= 0"),
    (dict(recalibration_batches=0),
     r"compactnet.recalibration_batches must be a positive integer, got 0"),
    (dict(retrain_epochs=-1), r"compactnet.retrain_epochs must be an integer >= 0, got -1"),
    (dict(corrections=-1), r"compactnet.corrections must be an integer >= 0, got -1"),
    (dict(min_width=0.0), r"compactnet.min_width\['layers.0'\] must be a fraction"),
    (dict(retrain_seeds=()), r"compactnet.retrain_seeds must be a non-empty list"),
    (dict(uniform_multipliers=(1.2,)), r"compactnet.uniform_multipliers must be fractions"),
    (dict(uniform_multipliers=("a",)), r"compactnet.uniform_multipliers must be fractions"),
    (dict(uniform_multipliers=(True,)), r"compactnet.uniform_multipliers must be fractions"),
    (dict(distill=dict(weight=1.5)), r"compactnet.distill.weight must be a number in \[0, 1\]"),
    (dict(distill=dict(temperature=0.0)), r"compactnet.distill.temperature must be"),
    (dict(speedup_margin=1.0), r"compactnet.speedup_margin must be a number in \[0, 1\)"),
    (dict(speedup_margin=-0.1), r"compactnet.speedup_margin must be a number in \[0, 1\)"),
])
def test_bad_settings_are_refused_before_compute(fake_cifar, change, message):
  with pytest.raises(ValueError, match=message):
    training.check_config(_tiny(fake_cifar, **change))


def test_a_search_without_a_validation_split_is_refused(fake_cifar):
  """Candidates are kept by validation accuracy: with no validation images
  every score was NaN and the first candidate won, silently."""
  config = _tiny(fake_cifar)
  config.data.val_size = 0
  with pytest.raises(ValueError, match=r"data.val_size must be >= 1: the search keeps each "
                                       r"iteration's candidate by validation accuracy"):
    training.check_config(config)


def test_the_shared_blocks_are_checked_too(fake_cifar):
  """The blocks every method shares (seed, data, model, optimizer, train) are
  checked with CompactNet's own."""
  config = _tiny(fake_cifar)
  config.seed = -1
  with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
    training.check_config(config)


def test_a_table_built_by_the_benchmark_serves_the_launcher(fake_cifar, tmp_path):
  """The README's two CompactNet commands compose: the benchmark's network (the
  models' default profile) and the launcher's (``all-one``) compute the same."""
  config = _tiny(fake_cifar)
  settings = training.table_settings(config)
  arch, target = compactnet_table.check(
      config.model.name, config.compactnet.platform, 1, 0, str(tmp_path / "t.json"),
      config.model.width_multiplier, 10, settings)
  assert arch["profile"] != config.model.profile
  simulator.build_table(arch, target, settings, str(tmp_path / "t.json"), fake_remote([]))
  config.compactnet.table = str(tmp_path / "t.json")
  training.check_config(config)


def test_bad_table_settings_name_the_field(fake_cifar):
  config = _tiny(fake_cifar)
  config.compactnet.table_settings.grid_points = 1
  with pytest.raises(ValueError, match="compactnet.table_settings.grid_points must be"):
    training.check_config(config)


def test_a_given_table_must_be_readable_match_and_reach_the_target(fake_cifar, tmp_path):
  config = _tiny(fake_cifar)
  arch = runs.planned_architecture(config)
  table = simulator.build_table(arch, platform.get("cpu-b64"), training.table_settings(config),
                                str(tmp_path / "table.json"), fake_remote([]))
  cut = tmp_path / "cut.json"
  cut.write_text((tmp_path / "table.json").read_text()[:100])
  for path, message in ((str(cut), "truncated or not JSON"),):
    config.compactnet.table = path
    with pytest.raises(ValueError, match=message):
      training.check_config(config)
  config.compactnet.table = str(tmp_path / "table.json")
  config.compactnet.platform = "cpu-b1"
  with pytest.raises(ValueError, match="compactnet.table was measured with platform name"):
    training.check_config(config)
  config.compactnet.platform = "cpu-b64"
  config.model.width_multiplier = 1 / 8
  with pytest.raises(ValueError, match="compactnet.table is for model"):
    training.check_config(config)
  config.model.width_multiplier = 1 / 16
  config.compactnet.min_width = 0.95
  with pytest.raises(ValueError, match="compactnet.min_width: with every group at its minimum"):
    training.check_config(config)
  del table


def test_minimum_widths_that_cannot_reach_the_target_are_refused_before_the_pretraining(
    fake_cifar, tmp_path):
  """Without a given table the run builds its own, then checks the minimum
  widths against it, before it pretrains (it pretrained first, then failed)."""
  config = _tiny(fake_cifar, min_width=0.95)
  assert not config.model.init_from  # the run pretrains its own original
  requests = []
  with pytest.raises(ValueError, match="compactnet.min_width: with every group at its minimum"):
    training.train_and_evaluate(config, str(tmp_path / "run"), remote=fake_remote(requests))
  assert requests[0] == "table"  # built (and calibrated on networks), then refused
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("module", [compactnet_cpu, compactnet_paper])
def test_the_figures_pretrain_once_then_search_from_it(module):
  configs = sweep.check_variants(module.get_config(), launcher.METHODS)
  order = sweep.in_running_order(configs)
  assert order[0] == "pretrain" and configs["pretrain"].method == "idp"
  for name in order[1:]:
    assert configs[name].method == "compactnet"
    assert configs[name].model.init_from == "variant:pretrain"


def test_the_paper_figure_runs_table_3s_rows():
  configs = sweep.variant_configs(compactnet_paper.get_config())
  for name, (t_init, n, d) in (("gpu-b64-1_5x", (2.0, 24, 0.96)),
                               ("gpu-b64-1_8x", (2.5, 30, 0.98))):
    c = configs[name].compactnet
    assert (c.iterations, c.decay) == (n, d)
    r = 1 - 1 / t_init  # Eq. 1-2 as latency reductions, written out
    assert c.t_final == pytest.approx(1 / (1 - sum(r / n * d ** i for i in range(n))))
    assert training.plan(configs[name]).t_init == pytest.approx(t_init)
