"""benchmarks.conv_speed: the shapes it times, its FLOP count, and its records."""

import logging

import jax
import pytest

from benchmarks import conv_speed
from dynscale import metrics
from dynscale.nn import models, spec


def test_conv_shapes_are_the_sliced_networks_convolutions():
  arch = models.architecture("vgg16", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=1 / 16)  # 4, 4 | 8, 8 | 16 x3 | 32 x3 | 32 x3
  shapes = conv_speed.conv_shapes(arch, spec.widths_at_dp(arch, 0.5), batch=2)
  # At 50% every IDP conv reads and computes half its channels; duplicates counted once.
  # The two 16 -> 16 convolutions of blocks 4 and 5 run on 4x4 and 2x2 maps: two shapes.
  assert [tuple(s["filter"]) for s in shapes] == [
      (3, 3, 3, 2), (3, 3, 2, 2), (3, 3, 2, 4), (3, 3, 4, 4), (3, 3, 4, 8), (3, 3, 8, 8),
      (3, 3, 8, 16), (3, 3, 16, 16), (3, 3, 16, 16)]
  assert [s["input"][1] for s in shapes] == [32, 32, 16, 16, 8, 8, 4, 4, 2]
  assert all(s["groups"] == 1 and s["strides"] == [1, 1] for s in shapes)
  # 2 x multiply-adds over every tap: B H W kh kw C M.
  assert conv_speed._conv_flops(shapes[1]) == 2 * 2 * 32 * 32 * 9 * 2 * 2


def test_depthwise_shapes_and_records():
  arch = models.architecture("mobilenet_v2", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=1 / 8)
  shapes = conv_speed.conv_shapes(arch, spec.widths_at_dp(arch, 1.0), batch=2)
  depthwise = [s for s in shapes if s["groups"] > 1]
  assert depthwise and all(s["filter"][2] == 1 and s["groups"] == s["filter"][3]
                           for s in depthwise)
  record = conv_speed.time_shape(depthwise[0], repeats=1)
  assert record["implementation"] == "shifted"
  for key in ("chosen_fwd", "chosen_bwd", "xla_fwd", "xla_bwd", "dot_fwd", "dot_bwd"):
    assert record[f"{key}_gflops_per_s"] > 0
  assert record["chosen_over_dot_fwd"] == pytest.approx(
      record["chosen_fwd_gflops_per_s"] / record["dot_fwd_gflops_per_s"], rel=0.1)
  assert record["filter_grad_frames_over_windows"] == pytest.approx(
      record["filter_grad_frames_ms"] / record["filter_grad_windows_ms"], rel=0.02)
  # the 32x32 stem's first depthwise layer, stride 1: frames
  assert depthwise[0]["input"][1:3] == [32, 32] and depthwise[0]["strides"] == [1, 1]
  assert record["filter_grad_form"] == "frames"


def test_a_first_layer_on_rgb_is_timed_in_both_forms_the_rule_chooses_between():
  arch = models.architecture("vgg16", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=1 / 16)
  shapes = conv_speed.conv_shapes(arch, spec.widths_at_dp(arch, 1.0), batch=2)
  first, wider = shapes[0], next(s for s in shapes if s["filter"][2] > 4)
  record = conv_speed.time_shape(first, repeats=1)
  assert record["implementation"] == "taps"   # 3 -> 4 channels
  for form in ("patches", "taps"):
    for way in ("fwd", "bwd"):
      assert record[f"{form}_{way}_gflops_per_s"] > 0
  assert not any(key.startswith(("patches_", "taps_"))
                 for key in conv_speed.time_shape(wider, repeats=1))


def test_network_record():
  record = conv_speed.time_network("m_cifarnet", batch=2, repeats=1, width_multiplier=1 / 8)
  assert record["model"] == "m_cifarnet" and record["batch"] == 2
  for program in ("train", "infer", "grad"):  # the ratio is rounded to 2 decimals
    assert record[f"{program}_speedup"] == pytest.approx(
        record[f"{program}_chosen_images_per_s"] / record[f"{program}_xla_images_per_s"],
        rel=0.02, abs=0.006)
  # the roofline: the slower of moving the bytes at the stream rate and the flops at the
  # matmul rate (each to 4 significant digits in the record)
  seconds = max(record["grad_gb_accessed"] / record["stream_gb_per_s"],
                record["grad_gflop"] / record["matmul_gflops_per_s"])
  assert record["grad_roofline_images_per_s"] == pytest.approx(2 / seconds, rel=0.002)
  assert record["grad_flops_per_byte"] == pytest.approx(
      record["grad_gflop"] / record["grad_gb_accessed"], rel=0.02)


def test_network_programs_builds_only_the_programs_asked_for():
  arch = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=1 / 8)
  programs = conv_speed.network_programs(arch, batch=2, names=("infer",))
  assert list(programs) == ["infer"]
  assert programs["infer"]().shape == (2, 10)


def test_network_programs_run_as_traced_under_the_forced_implementation(caplog):
  """Each program is traced once, inside ``conv.forced``: calling it again
  compiles nothing. Catches the train step's state coming back placed on the
  mesh and re-traced at the second call, outside the block, under the rule
  (``train_speedup`` then timed the rule against itself)."""
  arch = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=1 / 8)
  programs = conv_speed.network_programs(arch, batch=2, impl="xla")
  with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
    for _ in range(2):
      jax.block_until_ready([run() for run in programs.values()])
  assert "Compiling" not in caplog.text, caplog.text[:2000]


def test_program_cost_reads_the_gradient_program_it_timed():
  arch = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=1 / 8)
  grad = conv_speed.network_programs(arch, batch=2, names=("grad",))["grad"]
  variables, x, y = grad.args
  assert conv_speed.program_cost(grad) == metrics.xla_cost(
      jax.grad(conv_speed._sliced_loss(arch)), variables, x, y)


@pytest.mark.slow  # compiles conv gradients inside scan and cond: minutes on CPU
def test_nested_control_flow_record():
  from benchmarks import nested_control_flow
  record = nested_control_flow.measure("vgg16", batch=2, width_multiplier=1 / 16, repeats=1)
  assert record["scan_over_loop"] == pytest.approx(
      record["scan_ms_per_step"] / record["loop_ms_per_step"], rel=0.1)
  assert record["cond_over_all"] == pytest.approx(
      record["tesla_cond_ms_per_step"] / record["tesla_all_ms_per_step"], rel=0.1)


def test_conv_time_by_layer_adds_every_repeated_shape():
  from benchmarks import conv_time_by_layer
  arch = models.architecture("vgg16", num_classes=10, input_shape=(32, 32, 3))
  sweep = []
  for dp in (1.0, 0.5):
    for s in conv_speed.conv_shapes(arch, spec.widths_at_dp(arch, dp), batch=2):
      # 1 GFLOP/s everywhere but 2x2 maps, which run at 2: time = GFLOPs / rate.
      sweep.append({"kind": "conv", "model": "vgg16", **s,
                    "gflops": conv_speed._conv_flops(s) / 1e9,
                    "chosen_fwd_gflops_per_s": 2.0 if s["input"][1] == 2 else 1.0})
  full, half = conv_time_by_layer.predict(sweep, "vgg16", [0.5], batch=2)
  every = [conv_speed._conv_flops(s) / 1e9 for s in
           conv_speed.conv_shapes(arch, spec.widths_at_dp(arch, 1.0), 2, distinct=False)]
  on_2x2 = [conv_speed._conv_flops(s) / 1e9 for s in
            conv_speed.conv_shapes(arch, spec.widths_at_dp(arch, 1.0), 2, distinct=False)
            if s["input"][1] == 2]
  assert len(every) == 13 and len(on_2x2) == 3  # VGG-16's block 5 repeats one shape 3 times
  assert full["predicted_conv_ms"] == pytest.approx(1e3 * (sum(every) - sum(on_2x2) / 2),
                                                    abs=0.1)
  assert half["conv_flops_ratio"] == pytest.approx(0.251, abs=0.001)
  with pytest.raises(ValueError, match="--sweep has no record"):
    conv_time_by_layer.predict(sweep, "vgg16", [0.25], batch=2)


def test_conv_time_by_layer_reads_a_narrow_networks_dps_from_full_network_widths():
  from benchmarks import conv_time_by_layer
  full_arch = models.architecture("vgg16", num_classes=10, input_shape=(32, 32, 3))
  sweep = []
  for width in (0.25, 0.175):  # x0.25 at 100% and 70% DP, as fractions of the full network
    for s in conv_speed.conv_shapes(full_arch, spec.widths_at_dp(full_arch, width), batch=2):
      sweep.append({"kind": "conv", "model": "vgg16", **s,
                    "gflops": conv_speed._conv_flops(s) / 1e9, "chosen_fwd_gflops_per_s": 1.0})
  full, seventy = conv_time_by_layer.predict(sweep, "vgg16", [0.7], batch=2,
                                             width_multiplier=0.25)
  # VGG-16 x0.25: 16 16 | 32 32 | 64 x3 | 128 x3 | 128 x3 on 32, 16, 8, 4, 2 maps;
  # at 70% every width rounds up: 12 12 | 23 23 | 45 x3 | 90 x6.
  def macs(widths):
    maps = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    inputs = [3] + widths[:-1]
    return sum(9 * m * m * i * o for m, i, o in zip(maps, inputs, widths))
  x025 = [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
  x025_70 = [12, 12, 23, 23, 45, 45, 45, 90, 90, 90, 90, 90, 90]
  assert seventy["conv_flops_ratio"] == pytest.approx(macs(x025_70) / macs(x025), abs=0.001)
  assert full["predicted_conv_ms"] == pytest.approx(1e3 * 2 * 2 * macs(x025) / 1e9, abs=0.1)
  with pytest.raises(ValueError, match="at width 0.125"):
    conv_time_by_layer.predict(sweep, "vgg16", [0.5], batch=2, width_multiplier=0.25)
