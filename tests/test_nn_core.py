"""The network core on width vectors: residual networks, tied groups, the gate hook,
FLOPs, one executable for every width vector, export of a trimmed network."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynscale import metrics
from dynscale.kernels import conv
from dynscale.nn import costs, forward, layers, models, sliced, spec

FAST = {"xla_backend_optimization_level": 0}  # compile speed for tests only


def _arch(name, wm, shape=(32, 32, 3), classes=10):
  return models.architecture(name, num_classes=classes, input_shape=list(shape),
                             width_multiplier=wm)


def _random_widths(arch, seed):
  rng = np.random.default_rng(seed)
  return [int(rng.integers(1, g.size + 1)) for g in spec.prunable_groups(arch)]


def _perturbed_model(arch, seed=0, dtype=jnp.float32):
  """A model with random batch-norm affine parameters and statistics (not the identity)."""
  model = models.build(arch, rngs=models.init_rngs(seed), dtype=dtype)
  rng = np.random.default_rng(seed + 1)
  state = nnx.state(model.layers)
  pure = state.to_pure_dict()

  def perturb(tree):
    if set(tree) == set(sliced.BN_LEAVES):
      n = tree["mean"].shape[0]
      return {"scale": jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32),
              "bias": jnp.asarray(rng.normal(0, 0.3, n), jnp.float32),
              "mean": jnp.asarray(rng.normal(0, 0.3, n), jnp.float32),
              "var": jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)}
    return {k: perturb(v) if isinstance(v, dict) else v for k, v in tree.items()}
  state.replace_by_pure_dict(perturb(pure))
  nnx.update(model.layers, state)
  return model


def _close(a, b, rtol=1e-9):
  """Leaves equal to rtol, with an absolute floor of rtol times the tree's largest entry.

  Run in float64: in float32 the two paths' rounding differs by up to 1% of a
  kernel gradient (train-mode batch norm over 4 images amplifies it, and by
  how much depends on the machine and XLA's optimization level), while in
  float64 they agree to 1e-12. A structural error is of the order of the
  values themselves.
  """
  fa, fb = sliced.flatten_tree(a), sliced.flatten_tree(b)
  assert fa.keys() == fb.keys()
  scale = max(float(np.max(np.abs(v))) for v in fa.values())
  for key in fa:
    np.testing.assert_allclose(fa[key], fb[key], rtol=rtol, atol=rtol * scale, err_msg=key)


def _variables_in_float64(model):
  """``model`` with its floating variables cast to float64 (call under ``jax.enable_x64``)."""
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64)
                                 if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
  return model


# --------------------------------------------------------------------------
# Masked == sliced at random width vectors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,wm", [
    ("vgg16", 1 / 16), ("resnet18", 1 / 16),
    # 90 s in float64; inverted residual blocks tied by their adds also meet their
    # trimmed form on the default suite (test_compactnet's small network).
    pytest.param("mobilenet_v2", 1 / 8, marks=pytest.mark.slow)])
def test_masked_equals_sliced_at_random_widths(name, wm):
  """Logits, gradients of every variable and updated running statistics, train mode, float64."""
  arch = _arch(name, wm)
  widths = _random_widths(arch, seed=len(name))
  assert any(w < g.size for w, g in zip(widths, spec.prunable_groups(arch)))
  x = np.random.default_rng(2).standard_normal((4, 32, 32, 3))
  proj = np.random.default_rng(3).standard_normal((4, 10))
  with jax.enable_x64(True):
    model = _variables_in_float64(_perturbed_model(arch, dtype=jnp.float64))
    graphdef, state = nnx.split(model)

    def masked_loss(state, w):
      m = nnx.merge(graphdef, state)
      y = m(x, widths=w, train=True)
      return jnp.sum(y * proj), (y, nnx.state(m, nnx.BatchStat))

    g_m, (y_m, stats_m) = jax.jit(jax.grad(masked_loss, has_aux=True),
                                  compiler_options=FAST)(state, jnp.asarray(widths))
    variables = model.pure_variables()

    def sliced_loss(v):
      y, stats = sliced.apply_sliced(arch, v, x, widths, train=True, dtype=jnp.float64)
      return jnp.sum(y * proj), (y, stats)

    g_s, (y_s, stats_s) = jax.jit(jax.grad(sliced_loss, has_aux=True),
                                  compiler_options=FAST)(variables)
  # Logits are float32 by contract; everything before them ran in float64.
  np.testing.assert_allclose(y_m, y_s, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(y_s))))
  _close({"layers": stats_m.to_pure_dict()["layers"]}, stats_s)
  grads_m = g_m.to_pure_dict()
  assert all(v.dtype == jnp.float64 for v in sliced.flatten_tree(grads_m).values())
  # The masked gradient is zero outside the kept channels and equals the sliced one inside.
  kept = sliced.slice_variables(arch, {"layers": grads_m["layers"]}, widths)
  _close(kept, sliced.slice_variables(arch, {"layers": g_s["layers"]}, widths))
  total = sum(float(np.sum(np.abs(v))) for v in sliced.flatten_tree(grads_m).values())
  inside = sum(float(np.sum(np.abs(v))) for v in sliced.flatten_tree(kept).values())
  assert total == pytest.approx(inside, rel=1e-9)


def test_one_executable_serves_every_width_vector():
  arch = _arch("resnet18", 1 / 16)
  model = models.build(arch, rngs=models.init_rngs(0))
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def run(state, x, widths):
    traces.append(1)
    return nnx.merge(graphdef, state)(x, widths=widths, train=False)

  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  outs = [run(state, x, jnp.asarray(_random_widths(arch, seed))) for seed in range(3)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])
  for seed, out in enumerate(outs):
    reference = jax.jit(functools.partial(sliced.apply_sliced, arch, x=x,
                                          widths=_random_widths(arch, seed)),
                        compiler_options=FAST)
    np.testing.assert_allclose(out, reference(model.pure_variables()), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Tied groups
# --------------------------------------------------------------------------


def test_resnet18_groups_tie_each_stage():
  arch = _arch("resnet18", 1 / 16)
  groups = spec.prunable_groups(arch)
  # Stem + stage 1 (identity shortcuts) share one group; stages 2-4 each start with a
  # projection, so each is one group with its two blocks; plus one inner group per block.
  tied = [g.members for g in groups if len(g.members) > 1]
  assert tied == [("layers.0", "layers.1", "layers.2"), ("layers.3", "layers.4"),
                  ("layers.5", "layers.6"), ("layers.7", "layers.8")]
  assert sum(g.name.endswith(".mid") for g in groups) == 8
  assert len(groups) == 12


def test_trimming_a_tied_channel_removes_it_from_every_tensor_of_the_group():
  arch = _arch("resnet18", 1 / 16)  # stage 2: 8 channels
  model = _perturbed_model(arch)
  groups = spec.prunable_groups(arch)
  stage2 = next(j for j, g in enumerate(groups) if g.members == ("layers.3", "layers.4"))
  widths = [g.size for g in groups]
  widths[stage2] -= 1
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  variables = model.pure_variables()
  for member in (3, 4):  # the masked output of every block adding into the group
    out = forward.run(arch, variables, jnp.asarray(x), widths=jnp.asarray(widths),
                      train=False, profile=None, upto=member + 1).output
    assert np.all(np.asarray(out)[..., 7] == 0)
    assert np.any(np.asarray(out)[..., 6] != 0)
  # In the sliced network every tensor of the group, and every consumer, loses it.
  compact = sliced.slice_variables(arch, variables, widths)["layers"]
  assert compact[3]["conv2"]["kernel"].shape[3] == 7
  assert compact[3]["shortcut"]["kernel"].shape[3] == 7
  assert compact[3]["bn2"]["mean"].shape == (7,)
  assert compact[4]["conv1"]["kernel"].shape[2] == 7
  assert compact[4]["conv2"]["kernel"].shape[3] == 7
  assert compact[5]["conv1"]["kernel"].shape[2] == 7
  assert compact[5]["shortcut"]["kernel"].shape[2] == 7


def test_a_width_vector_that_breaks_a_tie_is_refused():
  arch = _arch("resnet18", 1 / 16)
  with pytest.raises(ValueError, match=r"tied group 'layers.3'.*layers.4"):
    spec.resolve_widths(arch, {"layers.3": 8, "layers.4": 6})
  with pytest.raises(ValueError, match=r"tied group 'layers.0'"):
    spec.resolve_widths(arch, {"layers.1": 3})
  per_member = spec.resolve_widths(arch, {"layers.3": 6, "layers.4": 6, "layers.3.mid": 5})
  assert per_member == spec.resolve_widths(
      arch, [6 if g.name == "layers.3" else 5 if g.name == "layers.3.mid" else g.size
             for g in spec.prunable_groups(arch)])


@pytest.mark.parametrize("widths,match", [
    ([0] * 12, r"widths\['layers.0'\] must be an int in \[1, 4\]"),
    ([5] + [1] * 11, r"widths\['layers.0'\] must be an int in \[1, 4\]"),
    ([1] * 11, "one entry per prunable group \\(12"),
    ({"layers.99": 2}, "unknown layers \\['layers.99'\\]"),
    ("wide", "widths must be a DP"),
    (1.5, "dp must be in \\(0, 1\\]"),
])
def test_bad_widths_name_the_field(widths, match):
  arch = _arch("resnet18", 1 / 16)
  with pytest.raises(ValueError, match=match):
    spec.resolve_widths(arch, widths)


def test_width_arrays_are_checked_as_width_lists_are():
  """A width vector given as an array (the traced form: training, a search's
  masked candidates, per-sample FLOPs, masked recalibration) is refused as a
  list would be: a wrong length (its index was clamped, the first width
  serving every group), widths outside [1, group size], floats. Each was
  accepted silently."""
  from dynscale.nn import batchnorm
  arch = _arch("resnet18", 1 / 16)
  model = models.build(arch, rngs=models.init_rngs(0))
  x = jnp.zeros((1, 32, 32, 3))
  n = len(spec.prunable_groups(arch))
  bad = [(jnp.asarray([2]), "one entry per prunable group \\(12"),
         (jnp.zeros(n, jnp.int32), r"widths\['layers.0'\] must be an int in \[1, 4\]"),
         (jnp.full(n, 500), r"widths\['layers.0'\] must be an int in \[1, 4\]"),
         (jnp.full(n, 2.0), r"widths as an array must hold ints, got dtype float32")]
  for widths, match in bad:
    with pytest.raises(ValueError, match=match):
      model(x, widths=widths, train=False)
    with pytest.raises(ValueError, match=match):
      costs.sample_flops(arch, widths, {"layers.0": jnp.ones((1, 4))})
    with pytest.raises(ValueError, match=match):
      batchnorm.recalibrate_masked(model, widths, [x])
  good = jnp.asarray([max(1, g.size // 2) for g in spec.prunable_groups(arch)])
  np.testing.assert_array_equal(model(x, widths=good, train=False),
                                model(x, widths=good.tolist(), train=False))
  jax.jit(lambda w: model(x, widths=w, train=False))(good)  # traced: the shape is checked


def test_unknown_block_kind_and_bad_block_fields():
  base = _arch("resnet18", 1 / 16)
  with pytest.raises(ValueError, match=r"layers\[1\].kind must be one of .*'resblock'"):
    spec.validate_architecture({**base, "layers": [base["layers"][0], {"kind": "bottleneck"},
                                                   *base["layers"][2:]]})
  bad = {**base, "layers": [dict(l) for l in base["layers"]]}
  bad["layers"][1]["mid_features"] = 0
  with pytest.raises(ValueError, match=r"layers\[1\].mid_features must be null or a positive"):
    spec.validate_architecture(bad)
  conv = {**base, "layers": [{**base["layers"][0], "padding": "FULL"}, *base["layers"][1:]]}
  with pytest.raises(ValueError, match=r"layers\[0\].padding must be one of \('SAME', 'VALID'\)"):
    spec.validate_architecture(conv)


@pytest.mark.parametrize("block, widths", [
    ({"kind": "resblock", "features": 6, "stride": 2}, "[4, 6]"),
    ({"kind": "invres", "features": 4, "expansion": 2}, "[4, 8]"),
])
def test_a_profile_list_must_fit_every_profile_of_its_block(block, widths):
  """A block's profiles run over its input and its inner channels: a list of
  the input's length is refused when checked, naming both widths, not taken
  until the build fails on the inner one; a list that fits them all builds."""
  def network(profile, **fields):
    return {"name": "r", "input_shape": [4, 4, 3], "num_classes": 2, "layers": [
        {"kind": "conv", "features": 4}, {**block, **fields, "idp": True, "profile": profile},
        {"kind": "global_avgpool"}, {"kind": "dense", "features": 2}]}
  with pytest.raises(ValueError, match=rf"layers\[1\].profile has 4 coefficients, the layer's "
                                       rf"profiles run over \{widths}\ channels"):
    spec.validate_architecture(network([1.0, 0.8, 0.6, 0.4]))
  fitting = network([1.0, 0.8, 0.6, 0.4], **{"mid_features": 4} if block["kind"] == "resblock"
                    else {"expansion": 1})
  models.build(spec.validate_architecture(fitting), rngs=models.init_rngs(0))


# --------------------------------------------------------------------------
# FLOPs and parameters
# --------------------------------------------------------------------------


def test_published_counts():
  """ResNet-18 (CIFAR): ~0.56 G multiply-adds, 11.17 M parameters (He et al.; the common
  CIFAR code's 11,173,962). MobileNetV2 1.0 at 224x224: 300 M multiply-adds (Sandler et
  al. Table 3) and torchvision's 3,504,872 parameters. M-CifarNet: 174.3 M (SANP)."""
  resnet = _arch("resnet18", 1.0)
  assert costs.params(resnet) == 11_173_962
  assert costs.flops(resnet) / 1e9 == pytest.approx(0.556, abs=0.005)
  mv2 = _arch("mobilenet_v2_imagenet", 1.0, shape=(224, 224, 3), classes=1000)
  assert costs.params(mv2) == 3_504_872
  assert costs.flops(mv2) / 1e6 == pytest.approx(300, rel=0.01)
  assert costs.flops(_arch("m_cifarnet", 1.0)) / 1e6 == pytest.approx(174.3, abs=0.05)
  # The CIFAR MobileNetV2 has the same parameters but for the classifier (10 classes).
  assert costs.params(_arch("mobilenet_v2", 1.0)) == 3_504_872 - 990 * 1281


def _valid_taps(n, k, s, padding):
  """Kernel taps that land inside an n-long input, summed over the output positions."""
  if padding == "VALID":
    return ((n - k) // s + 1) * k
  out = -(-n // s)
  lo = max((out - 1) * s + k - n, 0) // 2
  return sum(1 for o in range(out) for t in range(k) if 0 <= o * s + t - lo < n)


def _resnet_xla_expected(arch, widths):
  """2 x the multiply-adds XLA's convolutions do (border taps skipped), by hand."""
  trimmed = spec.trimmed_architecture(arch, widths)
  n, c = trimmed["input_shape"][0], trimmed["input_shape"][2]
  total = 0
  for layer in trimmed["layers"]:
    if layer["kind"] == "conv":
      total += _valid_taps(n, 3, 1, "SAME") ** 2 * c * layer["features"]
      c = layer["features"]
    elif layer["kind"] == "resblock":
      s, mid, out = layer["stride"], layer["mid_features"], layer["features"]
      total += _valid_taps(n, 3, s, "SAME") ** 2 * c * mid
      m = -(-n // s)
      total += _valid_taps(m, 3, 1, "SAME") ** 2 * mid * out
      if s != 1 or c != out:
        total += m * m * c * out
      n, c = m, out
    elif layer["kind"] == "dense":
      total += c * layer["features"]
  return 2 * total


@pytest.mark.parametrize("dp", [1.0, 0.5])
def test_resnet18_flops_against_xla(dp):
  """XLA's cost analysis of the whole sliced network: its convolutions and classifier
  (counted by hand with border taps skipped) are all but the elementwise ops (<3%)."""
  arch = _arch("resnet18", 0.5, shape=(16, 16, 3))
  model = models.build(arch, rngs=models.init_rngs(0))
  widths = spec.widths_at_dp(arch, dp)
  compact = sliced.slice_variables(arch, model.pure_variables(), widths)
  with conv.forced("xla"):  # every convolution as lax.conv, whose skipped taps we count
    xla = metrics.xla_flops(lambda v, x: sliced.apply_sliced(arch, v, x, widths), compact,
                            jnp.zeros((1, 16, 16, 3)))
  expected = _resnet_xla_expected(arch, widths)
  assert expected <= xla <= 1.03 * expected
  # The analytic count of all taps is larger by the border fraction alone.
  assert costs.flops(arch, widths) > expected / 2


def _gated_net():
  return spec.validate_architecture({
      "name": "tiny-res", "input_shape": [6, 6, 2], "num_classes": 3, "layers": [
          {"kind": "conv", "features": 4},
          {"kind": "resblock", "features": 4},
          {"kind": "resblock", "features": 5, "stride": 2, "mid_features": 3},
          {"kind": "global_avgpool"},
          {"kind": "dense", "features": 3}]})


def test_each_gate_multiplies_the_group_of_its_output_slot():
  """By hand from the architecture: a conv gates its own output; a residual
  block's conv1 its inner width and conv2 the group it shares with the
  block's input across the add (or its own behind a projection); an
  inverted residual's expand and depthwise gates the inner width, and
  without expansion the depthwise gates the block's input. (Catches a gate
  read as gating its input or a wrong slot, which would give SANP's
  skipping benchmark and CompactNet's groups the wrong widths.)"""
  arch = spec.validate_architecture({
      "name": "gated-groups", "input_shape": [8, 8, 3], "num_classes": 3, "layers": [
          {"kind": "conv", "features": 4},
          {"kind": "resblock", "features": 4, "mid_features": 6},
          {"kind": "resblock", "features": 5, "stride": 2},
          {"kind": "invres", "features": 5, "expansion": 1},
          {"kind": "invres", "features": 7, "expansion": 2},
          {"kind": "global_avgpool"},
          {"kind": "dense", "features": 3}]})
  members = {name: group.members for name, group in layers.gated_groups(arch).items()}
  assert members == {
      "layers.0": ("layers.0", "layers.1"), "layers.1.conv1": ("layers.1.mid",),
      "layers.1.conv2": ("layers.0", "layers.1"), "layers.2.conv1": ("layers.2.mid",),
      "layers.2.conv2": ("layers.2", "layers.3"), "layers.3.depthwise": ("layers.2", "layers.3"),
      "layers.3.project": ("layers.2", "layers.3"), "layers.4.expand": ("layers.4.mid",),
      "layers.4.depthwise": ("layers.4.mid",), "layers.4.project": ("layers.4",)}
  points = layers.gate_points(arch)
  assert list(points) == list(members)
  assert [(p.inputs, p.outputs) for p in points.values()] == [
      (3, 4), (4, 6), (6, 4), (4, 5), (5, 5), (5, 5), (5, 5), (5, 10), (10, 10), (10, 7)]


class _SignGate(nnx.Module):
  """A data-dependent 0/1 gate: channel c of sample b is open where mean(y[b, :, :, c]) > 0."""

  def __call__(self, x, y, train):
    return (jnp.mean(y, axis=(1, 2)) > 0).astype(y.dtype)


def test_per_sample_flops_under_a_gate_by_hand():
  arch = _gated_net()
  model = models.build(arch, rngs=models.init_rngs(3), gate=lambda name, ci, co, r: _SignGate())
  assert sorted(model.gates) == ["layers.0", "layers.1.conv1", "layers.1.conv2",
                                 "layers.2.conv1", "layers.2.conv2"]
  x = np.random.default_rng(0).standard_normal((6, 6, 6, 2)).astype(np.float32)
  trace = model.run(x, 1.0, train=False)
  a = {k: np.asarray(v) for k, v in trace.activity.items()}
  assert 0 < np.mean(np.concatenate([v.ravel() for v in a.values()])) < 1
  stem, r1c1, r1c2 = a["layers.0"].sum(1), a["layers.1.conv1"].sum(1), a["layers.1.conv2"]
  # Block 1 adds its conv2 output to its input: the union of the two activities.
  union1 = np.maximum(r1c2, a["layers.0"]).sum(1)
  r2c1, r2c2 = a["layers.2.conv1"].sum(1), a["layers.2.conv2"].sum(1)
  expected = (36 * (2 * 9) * stem            # stem: 6x6, all 2 input channels
              + 36 * (stem * 9) * r1c1       # block 1 conv1 reads the stem
              + 36 * (r1c1 * 9) * r1c2.sum(1)
              + 9 * (union1 * 9) * r2c1      # block 2 conv1, stride 2: 3x3 output
              + 9 * (r2c1 * 9) * r2c2
              + 9 * union1 * 5               # the projection shortcut (ungated, 5 out)
              + (5 + 1) * 3)                 # classifier with bias over the 5 pooled channels
  np.testing.assert_allclose(costs.sample_flops(arch, 1.0, trace.activity), expected)
  # Traceable, and equal to the static count when every gate is open.
  open_model = models.build(arch, rngs=models.init_rngs(3),
                            gate=lambda name, ci, co, r: _OpenGate())
  run = jax.jit(lambda m, x, w: costs.sample_flops(arch, w, m.run(x, widths=w,
                                                                   train=False).activity))
  widths = jnp.asarray(_random_widths(arch, 0))
  np.testing.assert_allclose(run(open_model, x, widths),
                             costs.flops(arch, _random_widths(arch, 0)), rtol=1e-6)


class _OpenGate(nnx.Module):
  def __call__(self, x, y, train):
    return jnp.ones((y.shape[0], y.shape[-1]), y.dtype)


def test_gated_channels_are_exact_zeros_and_the_hook_sees_batch_norm_output():
  arch = _gated_net()
  seen = {}

  class Recorder(nnx.Module):
    def __init__(self, name):
      self.name = name

    def __call__(self, x, y, train):
      seen[self.name] = (x.shape, y.shape)
      return jnp.zeros((y.shape[0], y.shape[-1]), y.dtype).at[:, 0].set(1.0)

  model = models.build(arch, rngs=models.init_rngs(0),
                       gate=lambda name, ci, co, r: Recorder(name) if name == "layers.0"
                       else None)
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 2)).astype(np.float32)
  out = forward.run(arch, model.pure_variables(), jnp.asarray(x), widths=jnp.asarray(
      spec.resolve_widths(arch, 1.0)), train=False, profile=None, gates=dict(model.gates),
      upto=1).output
  assert seen == {"layers.0": ((2, 6, 6, 2), (2, 6, 6, 4))}
  assert np.all(np.asarray(out)[..., 1:] == 0) and np.any(np.asarray(out)[..., 0] != 0)


def test_kernels_are_he_normal_truncated_at_two_deviations_one_draw_per_kernel():
  """Every kernel is He-normal as ``nnx.initializers.he_normal`` defines it:
  a unit normal truncated to [-2, 2] scaled to variance 2 / fan_in, fan_in
  the product of all but the output axis (a 3x3 conv's 9 C_in, a depthwise
  conv's 9). Catches a wrong fan_in, a missing truncation or its variance
  correction, and one key reused by layers or seeds."""
  arch = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                             profile="all-one")
  kernels = {path: np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
      models.build(arch, rngs=models.init_rngs(0)).pure_variables())
             if leaf.ndim >= 2}
  assert len(kernels) == 9
  for path, w in kernels.items():
    fan_in = int(np.prod(w.shape[:-1]))
    std = np.sqrt(2.0 / fan_in)
    bound = 2 * std / 0.87962566103423978  # the unit truncated normal's deviation
    assert np.abs(w).max() <= bound * (1 + 1e-6), path
    if w.size >= 20000:  # the statistics of large kernels
      assert abs(w.std() / std - 1) < 0.02, path
      assert abs(w.mean()) < 0.02 * std, path
      assert np.abs(w).max() > 0.99 * bound, path  # truncated at the bound, not inside it
      # the fraction within one pre-truncation deviation: a unit normal's
      # mass in [-1, 1] over its mass in [-2, 2]
      inner = np.mean(np.abs(w) <= bound / 2)
      assert abs(inner - 0.6827 / 0.9545) < 0.01, path
  again = models.build(arch, rngs=models.init_rngs(0)).pure_variables()
  other = models.build(arch, rngs=models.init_rngs(1)).pure_variables()
  for path, leaf in jax.tree_util.tree_leaves_with_path(again):
    if path in kernels:
      np.testing.assert_array_equal(np.asarray(leaf), kernels[path])
  for path, leaf in jax.tree_util.tree_leaves_with_path(other):
    if path in kernels:
      assert not np.allclose(np.asarray(leaf), kernels[path]), path
  same_shape = [w for w in kernels.values() if w.shape == (3, 3, 128, 128)]
  assert len(same_shape) == 2 and not np.allclose(*same_shape)
  # built under jit (the draw as a host callback), the same network
  small = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                              profile="all-one", width_multiplier=0.25)
  jitted = nnx.jit(lambda: models.build(small, rngs=models.init_rngs(3)))().pure_variables()
  eager = models.build(small, rngs=models.init_rngs(3)).pure_variables()
  jax.tree.map(np.testing.assert_array_equal, jitted, eager)


# --------------------------------------------------------------------------
# Export of a trimmed network
# --------------------------------------------------------------------------

_LOAD_ALONE = """
import json, sys
import numpy as np
from dynscale.nn import sliced
model = sliced.load(sys.argv[1])
print(json.dumps({"out": np.asarray(model(np.load(sys.argv[2]))).tolist(),
                  "flax": "flax" in sys.modules}))
"""


def test_exported_resnet18_at_a_width_vector_reloads_without_flax(tmp_path):
  arch = _arch("resnet18", 1 / 16)
  model = _perturbed_model(arch)
  widths = _random_widths(arch, seed=7)
  directory = sliced.export(model, tmp_path / "trimmed", widths=widths)
  trimmed = json.loads((directory / "architecture.json").read_text())
  assert trimmed == spec.trimmed_architecture(arch, widths)
  assert costs.flops(trimmed) == costs.flops(arch, widths)
  assert costs.params(trimmed) == costs.params(arch, widths)
  x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  result = subprocess.run([sys.executable, "-c", _LOAD_ALONE, str(directory),
                           str(tmp_path / "x.npy")], capture_output=True, text=True,
                          check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert not report["flax"]
  expected = model(x, widths=widths, train=False)
  np.testing.assert_allclose(report["out"], expected, rtol=1e-4, atol=1e-5)


def test_model_costs_benchmark_counts_m_cifarnet_by_hand():
  from benchmarks import model_costs
  record, = model_costs.records("m_cifarnet", 32, 3, 10, [1.0])
  # SANP §4.1.1, H W C_in k^2 C_out per conv (batch norm, no bias), 32x32 input:
  # the VALID stem gives 30x30, the stride-2 convs 15x15 and 8x8.
  by_hand = (30 * 30 * 3 * 9 * 64 + 30 * 30 * 64 * 9 * 64 + 15 * 15 * 64 * 9 * 128
             + 2 * 15 * 15 * 128 * 9 * 128 + 8 * 8 * 128 * 9 * 192
             + 2 * 8 * 8 * 192 * 9 * 192 + (192 + 1) * 10)
  assert record["flops"] == by_hand
  assert round(by_hand / 1e6, 1) == 174.3
  weights = 9 * (3 * 64 + 64 * 64 + 64 * 128 + 2 * 128 * 128 + 128 * 192 + 2 * 192 * 192)
  bn = 2 * (64 * 2 + 128 * 3 + 192 * 3)
  assert record["params"] == weights + bn + 192 * 10 + 10
