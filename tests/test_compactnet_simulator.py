"""CompactNet's platform simulator end to end (paper 004 §3.1, §4.3): a fake platform."""

import dataclasses
import json
import os

import numpy as np
import pytest

from benchmarks import compactnet_table
from dynscale.compactnet import latency, platform, simulator
from compactnet_fakes import WHOLE_SCALE, fake_remote
from dynscale.nn import models

SETTINGS = simulator.TableSettings(grid_points=3, warmup=0, rounds=1, processes=2,
                                   calibration_variants=8)


def _mobilenet():
  return models.architecture("mobilenet_v2_imagenet", num_classes=10, input_shape=[32, 32, 3],
                             idp_layers="none", width_multiplier=0.25)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  requests = []
  out = str(tmp_path_factory.mktemp("table") / "table.json")
  table = simulator.build_table(_mobilenet(), platform.get("cpu-b64"), SETTINGS, out,
                                fake_remote(requests))
  return table, out, requests


@pytest.fixture(scope="module")
def report(built):
  table, _, _ = built
  return simulator.validate_table(table, _mobilenet(), platform.get("cpu-b64"), 5, seed=0,
                                  remote=fake_remote([]))


@pytest.mark.parametrize("change, message", [
    (dict(expansion="shared"), r"table.expansion must be one of \['tied', 'independent'\]"),
    (dict(grid_points=1), "table.grid_points must be an int >= 2"),
    (dict(min_fraction=0.0), r"table.min_fraction must be a number in \(0, 1\]"),
    (dict(round_to=0), "table.round_to must be an int >= 1"),
    (dict(warmup=-1), "table.warmup must be an int >= 0"),
    (dict(rounds=0), "table.rounds must be an int >= 1"),
    (dict(burst=0), "table.burst must be an int >= 1"),
    (dict(processes=0), "table.processes must be an int >= 1"),
    (dict(calibration_processes=0), "table.calibration_processes must be an int >= 1"),
    (dict(estimator="mean"), r"table.estimator must be one of \['median', 'min', 'q10'\]"),
    (dict(calibration_variants=-1), "table.calibration_variants must be an int >= 0"),
    (dict(calibration_seed=True), "table.calibration_seed must be an int >= 0"),
    (dict(calibration_form="cubic"),
     r"table.calibration_form must be one of \['auto', 'raw', 'scale', 'affine', "
     r"'affine\+weights'\]"),
    # a form the settings cannot fit: refused before the unit table is measured
    (dict(calibration_form="scale", calibration_variants=0),
     r"table.calibration_variants must be >= 1 for calibration_form 'scale'"),
    (dict(calibration_form="affine", calibration_variants=6),
     r"table.calibration_variants must be >= 7 for calibration_form 'affine'"),
    (dict(calibration_form="affine+weights", calibration_variants=3),
     r"table.calibration_variants must be >= 7 for calibration_form 'affine\+weights'"),
])
def test_settings_name_the_bad_field(change, message, tmp_path):
  settings = simulator.TableSettings(**change)
  with pytest.raises(ValueError, match=message):
    settings.check()
  requests = []
  with pytest.raises(ValueError, match=message):  # before anything is measured
    simulator.build_table(_mobilenet(), platform.get("cpu-b64"), settings,
                          str(tmp_path / "t.json"), fake_remote(requests))
  assert requests == []


def test_no_calibration_variants_build_the_raw_table(tmp_path):
  """``calibration_variants=0``: the units' sum as measured, no network timed."""
  requests = []
  table = simulator.build_table(_mobilenet(), platform.get("cpu-b64"),
                                dataclasses.replace(SETTINGS, calibration_variants=0),
                                str(tmp_path / "t.json"), fake_remote(requests))
  assert requests == ["table"] and table.calibration is None
  widths = latency.random_widths(table, 1, seed=0)[0]
  assert table.predict(widths) == table.raw(widths)


def test_the_built_table_is_calibrated_and_saved(built):
  table, out, requests = built
  # the calibration networks in one request per calibration process
  assert requests == ["table"] + ["networks"] * SETTINGS.calibration_processes
  loaded = latency.load(out)
  assert loaded.calibration == table.calibration
  assert table.calibration["scale"] == pytest.approx(WHOLE_SCALE, rel=0.02)
  assert table.calibration["form"] != "raw"  # 43% off: left out, every fitted form does better
  assert set(table.calibration["leave_one_out_mean_abs_error"]) == set(latency.CALIBRATION_FORMS)
  assert table.calibration["seed"] == SETTINGS.calibration_seed
  assert len(table.calibration["networks"]) == 1 + SETTINGS.calibration_variants
  assert table.calibration["networks"][0]["widths"] == list(table.full_widths)
  assert loaded.provenance["build_s"] > 0
  assert loaded.provenance["settings"]["grid_points"] == 3


def test_calibration_removes_the_whole_network_discount(report):
  # raw: the sum of units over-predicts by 1 / 0.7 - 1 = 0.43
  assert report["raw_mean_abs_error"] == pytest.approx(1 / WHOLE_SCALE - 1, abs=0.02)
  assert report["calibrated"] and report["mean_abs_error"] < 0.01
  assert report["max_abs_error"] < 0.02
  assert report["speedup_mean_abs_error"] < 0.02
  assert report["variants"] == len(report["rows"]) == 5
  for row in report["rows"]:
    assert row["raw_predicted_s"] == pytest.approx(row["predicted_s"] / WHOLE_SCALE, rel=0.03)


def test_validation_without_settings_times_as_the_table_was_timed(built):
  """The validation without settings measures as the table was built: its
  timing and its number of processes, not the defaults (25 rounds, 3
  processes). Catches the processes taken from the defaults (a table built
  to measure in one process was validated in three)."""
  table, _, _ = built
  requests = []
  report = simulator.validate_table(table, _mobilenet(), platform.get("cpu-b64"), 5, seed=0,
                                    remote=fake_remote(requests))
  assert report["timing"] == {"warmup": SETTINGS.warmup, "rounds": SETTINGS.rounds,
                              "estimator": SETTINGS.estimator, "burst": SETTINGS.burst,
                              "processes": SETTINGS.processes}
  assert requests == ["networks"] * SETTINGS.processes != ["networks"] * 3


def test_fig7_has_one_increasing_row_per_unit(built, report):
  table, _, _ = built
  fig7 = report["fig7"]
  assert [r["units"] for r in fig7] == list(range(1, len(table.units) + 1))
  predicted = [r["predicted_s"] for r in fig7]
  assert all(b > a for a, b in zip(predicted, predicted[1:]))
  # at full width the table holds the measured units: prefixes are exactly 0.7 x their sum
  np.testing.assert_allclose([r["measured_s"] for r in fig7], WHOLE_SCALE * np.array(predicted),
                             rtol=1e-9)
  assert fig7[-1]["measured_s"] == pytest.approx(report["original_measured_s"])
  assert report["repeat_error"] == pytest.approx(0, abs=1e-9)  # the original, timed twice


def test_calibration_learns_what_weight_bytes_cost_the_whole_network(tmp_path):
  per_mib_s = 1e-3  # of the order of the fake's whole-network latencies
  table = simulator.build_table(_mobilenet(), platform.get("cpu-b1"), SETTINGS,
                                str(tmp_path / "t.json"), fake_remote([], per_mib_s=per_mib_s))
  assert table.calibration["per_mib"] == pytest.approx(per_mib_s, rel=0.05)
  report = simulator.validate_table(table, _mobilenet(), platform.get("cpu-b1"), 5, seed=0,
                                    remote=fake_remote([], per_mib_s=per_mib_s))
  assert report["mean_abs_error"] < 0.01
  # a scale and an offset alone, fitted on the same networks, cannot follow it
  affine = simulator.calibrate(dataclasses.replace(table, weight_bytes=None), _mobilenet(),
                               platform.get("cpu-b1"), SETTINGS,
                               fake_remote([], per_mib_s=per_mib_s))
  assert affine.calibration["per_mib"] == 0.0
  assert table.calibration["form"] == "affine+weights"
  forced = simulator.calibrate(table, _mobilenet(), platform.get("cpu-b1"),
                               dataclasses.replace(SETTINGS, calibration_form="raw"),
                               fake_remote([], per_mib_s=per_mib_s)).calibration
  assert (forced["form"], forced["scale"], forced["offset"]) == ("raw", 1.0, 0.0)
  assert simulator.validate_table(affine, _mobilenet(), platform.get("cpu-b1"), 5, seed=0,
                                  remote=fake_remote([], per_mib_s=per_mib_s)
                                  )["mean_abs_error"] > 2 * report["mean_abs_error"]


def test_validation_refuses_the_calibration_seed_and_bad_counts(built):
  table, _, _ = built
  requests = []
  for kwargs, message in ((dict(variants=3, seed=SETTINGS.calibration_seed),
                           "seed must differ from the table's calibration seed"),
                          (dict(variants=0, seed=0), "variants must be an int >= 1")):
    with pytest.raises(ValueError, match=message):
      simulator.validate_table(table, _mobilenet(), platform.get("cpu-b64"),
                               remote=fake_remote(requests), **kwargs)
  assert requests == []


def test_a_measurement_over_processes_takes_the_median_of_their_own_ratios(built):
  """Three processes: the first reads the reference 10% fast and the trimmed
  network 8% slow (its ratio 20% off), the second reads everything 30% slow,
  the third is right. The reference (the first network) keeps its median
  latency (the third's, not the first process's) and the trimmed network the
  median of its ratio to it, so the answer is the true one; a median of each
  network's latencies alone would keep the 8% (the second process's 1.3x
  outvotes the true reading)."""
  table, _, _ = built
  target = platform.get("cpu-b64")
  networks = {"original": {"arch": _mobilenet(), "widths": list(table.full_widths)},
              "trimmed": {"arch": _mobilenet(),
                          "widths": latency.random_widths(table, 1, seed=0)[0]}}
  truth, _ = simulator.measure_networks(fake_remote([]), target, networks, SETTINGS)
  distortions = iter([{"original": 0.9, "trimmed": 1.08}, {"original": 1.3, "trimmed": 1.3},
                      {"original": 1.0, "trimmed": 1.0}])
  requests = []

  def remote(target, request):
    result, scale = fake_remote(requests)(target, request), next(distortions)
    return {**result, "latencies": {n: {**s, "latency_s": s["latency_s"] * scale[n]}
                                    for n, s in result["latencies"].items()}}
  measured, provenance = simulator.measure_networks(
      remote, target, networks, dataclasses.replace(SETTINGS, processes=3))
  assert requests == ["networks"] * 3
  assert measured == pytest.approx(truth)
  assert [r["trimmed"] / r["original"] for r in provenance["readings"]] == pytest.approx(
      [1.2 * truth["trimmed"] / truth["original"], truth["trimmed"] / truth["original"],
       truth["trimmed"] / truth["original"]])


def test_a_failed_calibration_leaves_no_table(tmp_path):
  def failing(target, request):
    if request["kind"] == "networks":
      raise RuntimeError("the platform process died")
    return fake_remote([])(target, request)
  out = tmp_path / "table.json"
  with pytest.raises(RuntimeError, match="died"):
    simulator.build_table(_mobilenet(), platform.get("cpu-b64"), SETTINGS, str(out), failing)
  assert not out.exists()


def test_the_benchmark_prints_one_record_and_reuses_a_matching_table(built, tmp_path, capsys):
  _, table_path, _ = built
  out = tmp_path / "table.json"
  out.write_bytes(open(table_path, "rb").read())  # as if built by an earlier run
  requests = []
  kwargs = dict(model="mobilenet_v2_imagenet", platform_name="cpu-b64", variants=3, seed=0,
                out=str(out), width_multiplier=0.25, settings=SETTINGS,
                remote=fake_remote(requests))
  record = compactnet_table.run(**kwargs)
  captured = capsys.readouterr()
  lines = captured.out.strip().splitlines()
  assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(record))
  assert requests == ["networks"] * SETTINGS.processes and record["table"] == "loaded"
  assert "matches this model and platform" in captured.err
  for key in ("mean_abs_error", "max_abs_error", "variants", "raw_mean_abs_error",
              "raw_max_abs_error", "speedup_mean_abs_error", "speedup_max_abs_error",
              "table_build_s", "platform", "model", "date", "load"):
    assert key in record, key
  assert record["variants"] == 3 and record["raw_mean_abs_error"] > 0.3
  assert record["timing"] == {"warmup": SETTINGS.warmup, "rounds": SETTINGS.rounds,
                              "estimator": SETTINGS.estimator, "burst": SETTINGS.burst,
                              "processes": SETTINGS.processes}
  full = json.loads((tmp_path / "table.json.validation.json").read_text())
  assert len(full["rows"]) == 3 and len(full["fig7"]) == record["units"]
  assert os.path.getsize(tmp_path / "table.json.validation.png") > 0
  # another width is another model: refused, not overwritten
  with pytest.raises(ValueError, match="is for model.*choose another --out"):
    compactnet_table.run(**{**kwargs, "width_multiplier": 0.5})


@pytest.mark.parametrize("change, message", [
    (dict(model="resnet50"), "model must be one of"),
    (dict(platform_name="tpu-b64"), r"platform must be one of \['cpu-b1'"),
    (dict(variants=0), "variants must be an int >= 1"),
    (dict(seed=1000), "seed must differ from calibration_seed"),
])
def test_the_benchmark_refuses_bad_flags_before_measuring(change, message, tmp_path):
  requests = []
  kwargs = dict(model="mobilenet_v2_imagenet", platform_name="cpu-b64", variants=3, seed=0,
                out=str(tmp_path / "t.json"), width_multiplier=0.25, settings=SETTINGS,
                remote=fake_remote(requests))
  with pytest.raises(ValueError, match=message):
    compactnet_table.run(**{**kwargs, **change})
  assert requests == [] and not (tmp_path / "t.json").exists()
