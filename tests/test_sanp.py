"""SANP's gates and objective (paper 002 Eq. 3-10), checked against the
equations written out here, and its backbones' published sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynscale import data
from dynscale.nn import costs, layers, models, spec
from dynscale.sanp import analysis, budget, gates, objective


def paper_s1(s, xi=0.0, a=1.2, b=0.1):
  """Eq. 7 by hand: max(0, min(1, a * sigmoid(s + xi) - b))."""
  return np.clip(a / (1.0 + np.exp(-(np.asarray(s, np.float64) + xi))) - b, 0.0, 1.0)


# --------------------------------------------------------------------------
# Binarization (Eq. 7-8)
# --------------------------------------------------------------------------

def test_evaluation_codes_are_deterministic_hard_codes_of_eq_7_without_noise():
  s = jnp.linspace(-3, 3, 61, dtype=jnp.float32).reshape(1, -1)
  config = gates.Binarization()
  first = gates.binarize(s, None, config, train=False)
  second = gates.binarize(s, None, config, train=False)
  np.testing.assert_array_equal(first.decision, second.decision)
  np.testing.assert_array_equal(first.decision, (paper_s1(s) > 0.5).astype(np.float32))
  np.testing.assert_allclose(first.relaxed, paper_s1(s), atol=1e-6)


def test_training_noise_has_the_configured_spread_and_s1_follows_eq_7():
  s = jnp.zeros((1, 20000), jnp.float32)
  key = jax.random.key(0)
  code = gates.binarize(s, key, gates.Binarization(sigma=1.0, mix=0.0), train=True)
  xi = jax.random.normal(jax.random.split(key)[0], s.shape, s.dtype)  # the noise it drew
  np.testing.assert_allclose(code.relaxed, paper_s1(s, np.asarray(xi)), atol=1e-6)
  np.testing.assert_allclose(code.decision, code.relaxed)  # mix 0: the forward uses s1
  assert 0.97 < float(jnp.std(xi)) < 1.03


def test_the_gradient_through_a_hard_code_is_the_s1_paths_under_the_same_noise():
  s = jax.random.normal(jax.random.key(1), (8, 16))
  weights = jax.random.normal(jax.random.key(2), (8, 16))
  key = jax.random.key(3)
  config = gates.Binarization(mix=1.0)  # every sample uses s2 in the forward

  def through_binarize(s):
    return jnp.sum(weights * gates.binarize(s, key, config, train=True).decision)

  xi = jax.random.normal(jax.random.split(key)[0], s.shape, s.dtype)

  def through_s1(s):
    return jnp.sum(weights * jnp.clip(1.2 * jax.nn.sigmoid(s + xi) - 0.1, 0.0, 1.0))

  np.testing.assert_allclose(jax.grad(through_binarize)(s), jax.grad(through_s1)(s),
                             rtol=1e-6, atol=1e-7)
  decision = gates.binarize(s, key, config, train=True).decision
  np.testing.assert_array_equal(decision, (paper_s1(s, np.asarray(xi)) > 0.5))
  assert set(np.unique(np.asarray(decision))) <= {0.0, 1.0}  # closed channels: exact zeros


@pytest.mark.parametrize("mix_per", ["sample", "step"])
def test_half_of_the_forwards_use_the_hard_code(mix_per):
  # s = 0.3 without noise: s1 = 0.589 (a soft value), s2 = 1; a row of ones used s2.
  s = jnp.full((4000, 3), 0.3, jnp.float32)
  config = gates.Binarization(sigma=0.0, mix=0.5, mix_per=mix_per)
  if mix_per == "sample":
    decision = gates.binarize(s, jax.random.key(4), config, train=True).decision
    hard = np.all(np.asarray(decision) == 1.0, axis=1)
    assert abs(hard.mean() - 0.5) <= 0.05
  else:
    rows = [np.asarray(gates.binarize(s, jax.random.key(k), config, train=True).decision)
            for k in range(200)]
    assert all(np.all(r == r[0]) for r in rows)  # one draw for the whole batch
    assert abs(np.mean([r[0, 0] == 1.0 for r in rows]) - 0.5) <= 0.1


@pytest.mark.parametrize("field, kwargs, message", [
    ("a", {"a": 0.0}, r"binarization.a must be > 0, got 0.0"),
    ("b", {"b": 1.2}, r"binarization.b must be in \[0, a\) = \[0, 1.2\), got 1.2"),
    ("b", {"b": -0.1}, r"binarization.b must be in \[0, a\)"),
    ("a, b", {"b": 0.5}, r"binarization.a and binarization.b must open a gate at s = 1 "
                         r"\(a sigmoid\(1\) - b > 0.5\).*got a=1.2, b=0.5"),
    ("a, b", {"a": 0.6, "b": 0.0}, r"must open a gate at s = 1.*got a=0.6, b=0.0"),
    ("sigma", {"sigma": -1.0}, r"binarization.sigma must be >= 0, got -1.0"),
    ("mix", {"mix": 1.5}, r"binarization.mix must be a number in \[0, 1\], got 1.5"),
    ("mix_per", {"mix_per": "batch"}, r"binarization.mix_per must be one of \('sample', "
                                      r"'step'\), got 'batch'"),
])
def test_bad_binarization_settings_name_the_field(field, kwargs, message):
  with pytest.raises(ValueError, match=message):
    gates.Binarization(**kwargs)


# --------------------------------------------------------------------------
# Gates in a network (Eq. 1-6 through the core's gate hook)
# --------------------------------------------------------------------------

ARCH = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                           width_multiplier=0.125)  # convs of 8 .. 24 channels
# Images that differ in their channel means, so that per-sample saliencies differ.
IMAGES = (jax.random.normal(jax.random.key(5), (6, 32, 32, 3))
          + 2 * jax.random.normal(jax.random.key(9), (6, 1, 1, 3)))


def gated(variant, **kwargs):
  return models.build(ARCH, rngs=models.init_rngs(0),
                      gate=gates.gate_factory(variant, reduction=4, **kwargs))


def test_an_open_channel_with_a_negative_multiplier_is_active():
  """A gate opens where ``z = (s - tau) / rho > 0``: with a decision point below
  zero a channel can open with ``s < 0``. It computes (its output is ``s``
  times the layer's), so the activity and the FLOPs count it. (An SPM's head
  gives ``z``; ``s = tau + rho z``.)"""
  model = gated("sanp")
  for gate in model.gates.values():
    gate.head.w2.bias.value = jnp.full_like(gate.head.w2.bias.value, 0.5)  # z ~ 0.5: open
    gate.threshold.value = jnp.asarray(-10.0, jnp.float32)  # s ~ -9.5
  trace = model.run(IMAGES, 1.0, train=False)
  assert all(np.all(np.asarray(a) == 1) for a in trace.activity.values())
  np.testing.assert_allclose(costs.sample_flops(ARCH, 1.0, trace.activity),
                             [costs.flops(ARCH)] * len(IMAGES), rtol=1e-6)


def test_the_cost_loss_reads_the_relaxed_code_s1_whatever_the_forward_used():
  """Eq. 9 penalises ``s1 = clip(a sigmoid(z) - b, 0, 1)``: with every forward
  on the hard code (mix 1, no noise) the gates still sow ``s1``, by hand from
  the saliencies they sow and their decision points, not the 0/1 ``s2``."""
  model = gated("sanp", binarization=gates.Binarization(sigma=0.0, mix=1.0))
  for gate in model.gates.values():  # decision points off (0, 1), so z is not s
    gate.threshold.value = jnp.asarray(0.9, jnp.float32)
    gate.temperature.value = jnp.asarray(0.5, jnp.float32)
  model.run(IMAGES, 1.0, train=True)
  sown = nnx.pop(model, nnx.Intermediate).to_pure_dict()["gates"]
  for name, values in sown.items():
    s = np.asarray(values["saliency_out"][-1], np.float64)
    s1 = np.clip(1.2 / (1 + np.exp(-(s - 0.9) / 0.5)) - 0.1, 0, 1)
    np.testing.assert_allclose(values["relaxed_out"][-1], s1, rtol=1e-5, atol=1e-6)
    assert np.any((s1 > 0.01) & (s1 < 0.99)), name  # soft somewhere: s2 would differ


@pytest.mark.parametrize("target", [0.2, 0.48])  # the step below the budget is the closer
def test_fixed_k_keep_is_the_closest_to_the_budget_of_every_keep(target):
  """FLOPs are a step function of ``keep`` (channels are whole): the keep chosen
  costs the closest to the budget of any keep, by brute force over a grid
  finer than every layer's steps (widths 8 to 24 here)."""
  chosen = budget.fixed_k_flops_ratio(ARCH, budget.fixed_k_keep(ARCH, target))
  reachable = [budget.fixed_k_flops_ratio(ARCH, keep) for keep in np.linspace(0.01, 1, 200)]
  assert abs(chosen - target) == pytest.approx(min(abs(r - target) for r in reachable),
                                               abs=1e-9)


def test_fixed_k_cost_is_exact_on_a_chain_and_a_lower_bound_across_a_residual_add():
  """FIXED-K keeps k channels per gate, whichever its saliencies pick: on a
  chain of convolutions any pick costs what ``fixed_k_flops_ratio`` counts;
  across a residual add the same pick on both sides costs that, different
  picks more (the add's active channels are the union of both sides')."""
  keep = 0.5
  residual = spec.validate_architecture({
      "name": "tiny-res", "input_shape": [6, 6, 2], "num_classes": 3, "layers": [
          {"kind": "conv", "features": 4}, {"kind": "resblock", "features": 4},
          {"kind": "resblock", "features": 4},
          {"kind": "global_avgpool"}, {"kind": "dense", "features": 3}]})

  def cost(arch, offset):
    """Every gate keeps k channels starting at ``offset`` times its index (cyclic)."""
    activity = {}
    for i, (name, point) in enumerate(layers.gate_points(arch).items()):
      kept = (np.arange(gates.kept_channels(keep, point.outputs)) + offset * i) % point.outputs
      activity[name] = jnp.zeros((1, point.outputs)).at[0, kept].set(1.0)
    return float(costs.sample_flops(arch, 1.0, activity)[0]) / costs.flops(arch)

  for arch in (ARCH, residual):
    assert cost(arch, 0) == pytest.approx(budget.fixed_k_flops_ratio(arch, keep), rel=1e-6)
  assert cost(ARCH, 1) == pytest.approx(budget.fixed_k_flops_ratio(ARCH, keep), rel=1e-6)
  # the second block's convolutions read the first add's union: 4 channels, not 2
  assert cost(residual, 1) > budget.fixed_k_flops_ratio(residual, keep) + 0.05


@pytest.mark.parametrize("keep, channels, k", [
    (0.01, 8, 1), (0.04, 10, 1),  # 0.08 and 0.4 round to none: one is kept
    (0.3, 10, 3), (0.35, 10, 4), (1.0, 7, 7)])
def test_fixed_k_keeps_keep_of_the_channels_rounded_and_never_none(keep, channels, k):
  assert gates.kept_channels(keep, channels) == k


@pytest.mark.parametrize("variant", ["sanp", "static"])
def test_inserted_gates_keep_the_backbones_evaluation_logits(variant):
  backbone = models.build(ARCH, rngs=models.init_rngs(0))
  model = gated(variant)
  np.testing.assert_array_equal(model.pure_variables()["layers"][3]["kernel"],
                                backbone.pure_variables()["layers"][3]["kernel"])
  trace = model.run(IMAGES, 1.0, train=False)
  np.testing.assert_allclose(trace.output, backbone(IMAGES, 1.0, train=False), rtol=1e-6,
                             atol=1e-6)
  assert all(np.all(np.asarray(a) == 1) for a in trace.activity.values())


def test_the_spm_is_eq_6_on_the_global_average_pool_of_the_layer_input():
  spm = gates.SPM(5, 8, reduction=4, binarization=gates.Binarization(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for linear in (spm.head.w1, spm.head.w2):  # away from the initial W2 = 0
    linear.kernel.value = jnp.asarray(rng.standard_normal(linear.kernel.value.shape),
                                      jnp.float32)
    linear.bias.value = jnp.asarray(rng.standard_normal(linear.bias.value.shape), jnp.float32)
  x = rng.standard_normal((3, 4, 4, 5)).astype(np.float32)
  d = x.mean(axis=(1, 2))                                     # Eq. 5
  h = np.maximum(d @ np.asarray(spm.head.w1.kernel.value) + np.asarray(spm.head.w1.bias.value),
                 0)
  s = h @ np.asarray(spm.head.w2.kernel.value) + np.asarray(spm.head.w2.bias.value)  # Eq. 6
  assert spm.head.w1.kernel.value.shape == (5, 2)             # C_l / r = 8 / 4 hidden units
  out = spm(jnp.asarray(x), None, False)
  np.testing.assert_allclose(out, s * (paper_s1(s) > 0.5), rtol=1e-5, atol=1e-5)  # Eq. 3


def test_gated_channels_are_exact_zeros_in_the_layer_output():
  model = gated("sanp")
  spm = model.gates["layers.1"]
  spm.head.w2.bias.value = jnp.where(jnp.arange(spm.head.w2.bias.value.shape[0]) % 2 == 0,
                                     1.0, -5.0)  # odd channels: s = -5, closed
  trace = model.run(IMAGES, 1.0, train=False)
  active = np.asarray(trace.activity["layers.1"])
  np.testing.assert_array_equal(active, np.tile(np.arange(active.shape[1]) % 2 == 0,
                                                (IMAGES.shape[0], 1)))
  from dynscale.nn import forward
  out = forward.run(ARCH, model.pure_variables(), IMAGES,
                    widths=jnp.asarray(spec.resolve_widths(ARCH, 1.0)), train=False,
                    profile=None, gates=dict(model.gates), upto=2).output
  assert np.all(np.asarray(out)[..., 1::2] == 0.0)
  assert np.any(np.asarray(out)[..., 0::2] != 0.0)


def test_fixed_k_keeps_exactly_k_channels_of_highest_saliency_per_sample():
  s = jax.random.normal(jax.random.key(6), (5, 12))
  mask = np.asarray(gates.top_k_mask(s, 4))
  assert np.all(mask.sum(1) == 4)
  order = np.argsort(-np.asarray(s), axis=1)[:, :4]
  for row, top in zip(mask, order):
    assert set(np.flatnonzero(row)) == set(top)
  model = gated("fixed_k", keep=0.5)
  model.gates["layers.2"].head.w2.kernel.value = jax.random.normal(
      jax.random.key(7), model.gates["layers.2"].head.w2.kernel.value.shape)
  model.gates["layers.2"].head.w1.bias.value += 1.0  # so the head's hidden units are active
  trace = model.run(IMAGES, 1.0, train=True)
  for name, active in trace.activity.items():
    channels = active.shape[1]
    assert np.all(np.asarray(active).sum(1) == max(1, round(0.5 * channels))), name
  assert len({tuple(row) for row in np.asarray(trace.activity["layers.2"])}) > 1  # per sample


def test_static_gates_are_the_same_for_every_sample():
  model = gated("static")
  gate = model.gates["layers.1"]
  gate.vector.value = jax.random.normal(jax.random.key(8), gate.vector.value.shape)
  active = np.asarray(model.run(IMAGES, 1.0, train=False).activity["layers.1"])
  assert np.all(active == active[0]) and 0 < active[0].sum() < active.shape[1]


def test_a_gates_noise_stream_advances_and_resumes_from_its_saved_state():
  model = gated("sanp")
  saved = nnx.state(model, gates.NoiseKey).to_pure_dict()  # what a checkpoint holds
  first = model.run(IMAGES, 1.0, train=True).output
  second = model.run(IMAGES, 1.0, train=True).output
  assert not np.allclose(first, second)  # a new draw each call
  resumed = gated("sanp")
  nnx.replace_by_pure_dict(state := nnx.state(resumed, gates.NoiseKey), saved)
  nnx.update(resumed, state)
  np.testing.assert_array_equal(resumed.run(IMAGES, 1.0, train=True).output, first)
  before = nnx.state(model, gates.NoiseKey).to_pure_dict()
  model.run(IMAGES, 1.0, train=False)  # evaluation draws no noise
  assert jax.tree.all(jax.tree.map(np.array_equal, before,
                                   nnx.state(model, gates.NoiseKey).to_pure_dict()))


@pytest.mark.parametrize("channels, floor, fraction, keep, expected", [
    (64, 0, 0.5, 0.5, 16),      # k = 32, half of it
    (64, 20, 0.5, 0.5, 20),     # the absolute floor is larger
    (64, 1, 1 / 3, 0.5, 11),    # ceil(32 / 3)
    (12, 1, 0.5, 0.3, 2),       # k = round(3.6) = 4
    (64, 3, 0.0, None, 3),      # no fraction: the floor alone, no keep needed
    (25, 0, 0.28, 1.0, 7),      # 0.28 * 25 is 7.000000000000001 in floating point
    (100, 0, 0.07, 1.0, 7),     # 0.07 * 100 likewise
])
def test_a_layers_floor_is_a_fraction_of_its_fixed_k_k_rounded_up(channels, floor, fraction,
                                                                  keep, expected):
  assert gates.layer_floor(channels, floor=floor, floor_fraction=fraction, keep=keep) == expected


@pytest.mark.parametrize("floor", [65, -1, 2.0])
def test_a_floor_the_layer_cannot_hold_is_refused_where_the_gate_is_built(floor):
  """The config checker compares ``sanp.floor`` with the narrowest gated layer;
  a gate built from the library directly gets the same error, not one from
  inside ``lax.top_k`` at the first forward."""
  with pytest.raises(ValueError, match=rf"sanp.floor must be an integer in \[0, 64\] \(the "
                                       rf"layer's channels\), got {floor!r}"):
    gates.layer_floor(64, floor=floor)
  assert gates.layer_floor(64, floor=64) == 64


def test_a_floor_fraction_keeps_that_many_most_salient_channels_open_per_sample():
  model = gated("sanp", keep=0.5, floor_fraction=0.5)
  for name, gate in model.gates.items():  # layers of 8, 16 and 24 channels
    channels = gate.head.w2.bias.value.shape[0]
    least = -(-max(1, round(0.5 * channels)) // 2)
    assert gate.floor == least, name
    s = jax.random.normal(jax.random.key(4), (5, channels)) - 50.0  # every code closed
    for train in (False, True):
      decision = np.asarray(gate.decide(s, train).decision)
      for row, saliency in zip(decision, np.asarray(s)):
        assert set(np.flatnonzero(row)) == set(np.argsort(-saliency)[:least]), (name, train)
    assert gated("static", keep=0.5, floor_fraction=0.5).gates[name].floor == least, name
    # per-channel decision points that reverse the order of s - tau: still the most salient
    gate.threshold.value = -2.0 * jnp.arange(channels, dtype=jnp.float32) + 60.0
    s = -50.0 - 0.5 * jnp.arange(channels, dtype=jnp.float32)[None]  # falls with the channel
    decision = np.asarray(gate.decide(s, False).decision)[0]
    assert set(np.flatnonzero(decision)) == set(range(least)), name


def test_a_channel_held_open_by_the_floor_gets_its_codes_whole_gradient():
  """The floor opens a layer's most salient channels without taking the
  gradient from their codes (it flows through s1 as if no floor were there):
  ``jnp.maximum`` gave half where the hard code was already 1 and none where
  the soft code was raised to 1, whatever the floor's own opinion."""
  config = gates.Binarization(sigma=1.0, mix=0.5, mix_per="sample")
  s = jax.random.normal(jax.random.key(0), (64, 6))
  key = jax.random.key(1)
  weights = jax.random.normal(jax.random.key(2), (64, 6))

  def loss(s, floor):
    decision = gates.binarize(s, key, config, train=True).decision
    if floor:
      decision = gates.floored(decision, gates.top_k_mask(s, floor))
    return jnp.sum(weights * decision)
  np.testing.assert_allclose(jax.grad(loss)(s, 2), jax.grad(loss)(s, 0), rtol=1e-6)
  code = gates.binarize(s, key, config, train=True).decision
  held = np.asarray(gates.floored(code, gates.top_k_mask(s, 2)))
  assert np.all(held[np.arange(64)[:, None], np.argsort(-np.asarray(s))[:, :2]] == 1)
  np.testing.assert_array_equal(held, np.maximum(np.asarray(code),
                                                 np.asarray(gates.top_k_mask(s, 2))))


def test_an_spm_may_reduce_its_layer_to_one_hidden_unit_and_no_further():
  """r in [1, C]: r = C (the narrowest layer here has 8 channels) is one hidden
  unit; r = C + 1 none."""
  model = models.build(ARCH, rngs=models.init_rngs(0), gate=gates.gate_factory("sanp",
                                                                              reduction=8))
  narrowest = min(g.head.w2.bias.value.shape[0] for g in model.gates.values())
  assert narrowest == 8
  with pytest.raises(ValueError, match=r"sanp.reduction must be in \[1, 8\]"):
    models.build(ARCH, rngs=models.init_rngs(0), gate=gates.gate_factory("sanp", reduction=9))


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "sanp", "floor_fraction": 1.5}, r"sanp.floor_fraction must be a fraction of "
                                                r"FIXED-K's k in \[0, 1\], got 1.5"),
    ({"variant": "dynamic"}, r"sanp.variant must be one of \('sanp', 'static', 'fixed_k'\), "
                             r"got 'dynamic'"),
    ({"variant": "fixed_k", "keep": 0.0}, r"sanp.keep must be in \(0, 1\] for fixed_k, got 0.0"),
    ({"variant": "fixed_k"}, r"sanp.keep must be in \(0, 1\] for fixed_k, got None"),
])
def test_bad_gate_settings_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gates.gate_factory(**kwargs)


def test_a_reduction_outside_one_to_the_layer_width_is_refused():
  with pytest.raises(ValueError, match=r"sanp.reduction must be in \[1, 8\] \(the layer's "
                                       r"output channels\), got 16"):
    models.build(ARCH, rngs=models.init_rngs(0), gate=gates.gate_factory("sanp", reduction=16))


def test_channel_types_and_the_last_blocks_open_channels_by_hand():
  """Fig. 3's types from four images' open counts (4: never pruned, 0: always,
  else sometimes), the fraction of all gated channels sometimes pruned, and
  Fig. 4's open channels per image summed over the last block's two gates."""
  usage = analysis.ChannelUsage(
      open_counts={"layers.0": np.array([4, 0, 2, 4]), "layers.3.conv1": np.array([1, 4, 0]),
                   "layers.3.conv2": np.array([4, 3])},
      active={"layers.0": np.array([2, 2, 3, 3]), "layers.3.conv1": np.array([1, 1, 2, 1]),
              "layers.3.conv2": np.array([2, 3, 1, 2])},
      images=4)
  assert analysis.channel_types(usage) == {
      "layers.0": {"never": 2, "sometimes": 1, "always": 1},
      "layers.3.conv1": {"never": 1, "sometimes": 1, "always": 1},
      "layers.3.conv2": {"never": 1, "sometimes": 1, "always": 0}}
  summary = analysis.summary(usage)
  assert summary["sometimes_pruned_fraction"] == pytest.approx(3 / 9)
  assert summary["last_block_active_channels"] == {"mean": 3.25, "min": 3, "max": 4}


def test_channel_usage_lists_the_gates_in_network_order_past_ten_layers():
  """Catches the gates in the order of their names' text (``layers.11`` before
  ``layers.3``, as a jitted function returns a dict): with 12 gated layers the
  last block would be ``layers.9``, and Fig. 3's bars out of order."""
  arch = spec.validate_architecture({
      "name": "twelve", "input_shape": [4, 4, 1], "num_classes": 10, "profile": "all-one",
      "layers": [{"kind": "conv", "features": 2} for _ in range(12)]
      + [{"kind": "global_avgpool"}, {"kind": "dense", "features": 10}]})
  model = models.build(arch, rngs=models.init_rngs(0),
                       gate=gates.gate_factory("sanp", reduction=1))
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
  labels = np.zeros(3, np.int32)
  dataset = data.Dataset(name="mnist_sample", train_x=images, train_y=labels, val_x=images,
                         val_y=labels, test_x=images, test_y=labels, num_classes=10,
                         source="random images")
  usage = analysis.channel_usage(model, dataset, "test", batch_size=2)
  in_order = [f"layers.{i}" for i in range(12)]
  assert list(usage.open_counts) == list(usage.active) == in_order
  assert analysis.last_block(usage) == ["layers.11"]
  assert list(analysis.channel_types(usage)) == in_order


# --------------------------------------------------------------------------
# Objective (Eq. 9-10)
# --------------------------------------------------------------------------

def test_lambda_follows_eq_10_by_hand_and_passes_no_gradient():
  lambda0, budget = 0.01, 0.3
  assert float(objective.cost_weight(0.6, budget, lambda0)) == pytest.approx(0.01 * 0.3)
  assert float(objective.cost_weight(0.1, budget, lambda0)) == pytest.approx(-0.01 * 0.2)
  assert float(objective.cost_weight(budget, budget, lambda0)) == 0.0
  for p_t in np.linspace(0, 1, 11):
    for p in (0.05, 0.5, 0.95):
      assert abs(float(objective.cost_weight(p_t, p, lambda0))) <= lambda0
  assert float(jax.grad(lambda p: objective.cost_weight(p, budget, lambda0))(0.7)) == 0.0


def test_per_sample_flops_through_an_inverted_residual_by_hand():
  """Gates on a stem and on an inverted residual's three convolutions (4x4
  maps, 16 positions). A depthwise channel costs its 9 taps only where its
  input is on, and is an input of the projection wherever its own gate is
  open (batch norm's offset makes it nonzero); the identity add takes the
  union of the projection's channels and the block's input."""
  arch = spec.validate_architecture({
      "name": "stem_invres", "input_shape": [4, 4, 3], "num_classes": 3, "layers": [
          {"kind": "conv", "features": 4, "act": "relu6"},
          {"kind": "invres", "features": 4, "expansion": 2},
          {"kind": "global_avgpool"}, {"kind": "flatten"}, {"kind": "dense", "features": 3}]})
  stem = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
  expand = np.array([[1, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
  depthwise = np.array([[1, 0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], np.float32)
  project = np.array([[0, 0, 1, 1], [0, 1, 0, 0]], np.float32)
  activity = {"layers.0": stem, "layers.1.expand": expand, "layers.1.depthwise": depthwise,
              "layers.1.project": project}
  expected = []
  for b in range(2):
    n_stem, n_expand, n_dw, n_out = (a[b].sum() for a in (stem, expand, depthwise, project))
    n_taps = (depthwise[b] * expand[b]).sum()
    n_after_add = np.maximum(project[b], stem[b]).sum()
    expected.append(16 * 27 * n_stem + 16 * n_stem * n_expand + 16 * 9 * n_taps
                    + 16 * n_dw * n_out + (n_after_add + 1) * 3)
  np.testing.assert_allclose(costs.sample_flops(arch, 1.0, {k: jnp.asarray(v) for k, v in
                                                            activity.items()}), expected)
  every_gate_open = {k: jnp.ones_like(jnp.asarray(v)) for k, v in activity.items()}
  np.testing.assert_allclose(costs.sample_flops(arch, 1.0, every_gate_open),
                             [costs.flops(arch)] * 2)


def test_the_cost_loss_normalisations_by_hand():
  codes = {"layers.0": jnp.asarray([[1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]),
           "layers.1": jnp.asarray([[1.0, 1.0], [1.0, 0.0]])}
  # Eq. 9: the L1 of every code over the N_c = 6 gated channels, mean over samples.
  assert float(objective.cost_loss(ARCH, codes, "filters")) == pytest.approx(
      ((2.0 + 0.0) / 2 + (2.0 + 1.0) / 2) / 6)
  assert float(objective.cost_loss(ARCH, codes, "layers")) == pytest.approx(
      ((2.0 / 4 + 0.0) / 2 + (2.0 / 2 + 1.0 / 2) / 2) / 2)
  with pytest.raises(ValueError, match=r"sanp.cost must be one of \('filters', 'layers', "
                                       r"'flops'\), got 'l2'"):
    objective.cost_loss(ARCH, codes, "l2")


def test_the_flops_cost_is_the_section_4_formula_with_soft_activities():
  arch = spec.validate_architecture({
      "name": "two_convs", "input_shape": [6, 6, 2], "num_classes": 3, "layers": [
          {"kind": "conv", "features": 4, "bn": True, "act": "relu"},
          {"kind": "conv", "features": 5, "bn": True, "act": "relu"},
          {"kind": "global_avgpool"}, {"kind": "flatten"}, {"kind": "dense", "features": 3}]})
  first = jnp.asarray([[1.0, 0.5, 0.0, 0.25], [1.0, 1.0, 1.0, 1.0]])
  second = jnp.asarray([[0.0] * 5, [1.0, 0.0, 1.0, 0.0, 1.0]])
  per_sample = [36 * (2 * 9) * first[b].sum()                   # conv 1: all 2 inputs
                + 36 * (first[b].sum() * 9) * second[b].sum()   # conv 2: both sides soft
                + (second[b].sum() + 1) * 3 for b in range(2)]  # classifier with bias
  full = 36 * 18 * 4 + 36 * 36 * 5 + 6 * 3
  assert costs.flops(arch) == full
  np.testing.assert_allclose(objective.cost_loss(arch, {"layers.0": first, "layers.1": second},
                                                 "flops"), np.mean(per_sample) / full,
                             rtol=1e-6)
  # An all-off layer: no sample pays for the layer after it either.
  off = {"layers.0": jnp.zeros((2, 4)), "layers.1": jnp.ones((2, 5))}
  np.testing.assert_allclose(costs.sample_flops(arch, 1.0, off), [(5 + 1) * 3] * 2)


def test_the_cost_gradient_can_reopen_a_channel_through_the_relaxed_code():
  """With lambda < 0 the penalty on s1 pushes s up (the literal L1 of s cannot
  when s < 0: it pushes |s| down)."""
  s = jnp.asarray([[-0.5, 0.2]])

  def penalty(s, code):
    c = (gates.binarize(s, None, gates.Binarization(), train=False).relaxed if code == "relaxed"
         else jnp.abs(s))
    return -0.01 * objective.cost_loss(ARCH, {"layers.0": c}, "filters")  # lambda < 0

  relaxed = jax.grad(penalty)(s, "relaxed")
  literal = jax.grad(penalty)(s, "saliency")
  assert np.all(np.asarray(relaxed) < 0)        # descent raises every saliency
  assert float(literal[0, 0]) > 0               # the L1 of s lowers s = -0.5 further


# --------------------------------------------------------------------------
# Backbones (002 §4.1.2): all-open totals
# --------------------------------------------------------------------------

def test_sanp_backbones_have_the_published_sizes():
  def arch(name):
    return models.architecture(name, num_classes=10, input_shape=(32, 32, 3))
  assert costs.flops(arch("m_cifarnet")) / 1e6 == pytest.approx(174.3, abs=0.05)
  assert costs.flops(arch("vgg19")) / 1e6 == pytest.approx(398.5, abs=0.5)
  assert costs.params(arch("vgg19")) / 1e6 == pytest.approx(20.04, abs=0.01)
  convs = [layer for layer in arch("vgg19")["layers"] if layer["kind"] == "conv"]
  assert [c["features"] for c in convs] == [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8


def test_the_spm_overhead_counts_both_of_eq_6s_products_on_every_gated_layer():
  """``spm_flops`` against the gates the model really builds: ``W1`` (C_in x
  C_out / r) and ``W2`` (C_out / r x C_out) of every SPM, one multiply-add per
  weight per image; and by hand for two convolutions, 2 -> 4 and 4 -> 5
  channels at r = 2 (hidden 2 each): 2*2 + 2*4 and 4*2 + 2*5 (the classifier
  has no gate)."""
  model = gated("sanp")
  weights = sum(spm.head.w1.kernel.value.size + spm.head.w2.kernel.value.size
                for spm in model.gates.values())
  assert budget.spm_flops(ARCH, 4) == weights
  two_convs = spec.validate_architecture({
      "name": "two_convs", "input_shape": [6, 6, 2], "num_classes": 3, "layers": [
          {"kind": "conv", "features": 4}, {"kind": "conv", "features": 5},
          {"kind": "global_avgpool"}, {"kind": "flatten"}, {"kind": "dense", "features": 3}]})
  assert budget.spm_flops(two_convs, 2) == (2 * 2 + 2 * 4) + (4 * 2 + 2 * 5)


def test_a_calibrated_decision_point_opens_the_asked_fraction_and_reads_s_minus_tau_over_rho():
  s = jax.random.normal(jax.random.key(3), (64, 40)) * 0.05 + 1.0   # the paper's start: s ~ 1
  tau, rho = gates.decision_point(s, 0.3)
  assert abs(float(jnp.mean(s > tau)) - 0.3) <= 1.0 / s.size
  np.testing.assert_allclose(float(rho), float(jnp.std(s)), rtol=1e-5)
  gate = gates.SPM(8, 40, reduction=4, binarization=gates.Binarization(), rngs=nnx.Rngs(0))
  gate.threshold.value, gate.temperature.value = tau, rho
  code = gate.decide(s, train=False)
  # saturating sigmoid a=1.2, b=0.1 crosses 0.5 at 0: open exactly where s > tau
  np.testing.assert_array_equal(np.asarray(code.decision), np.asarray(s > tau, np.float32))
  uncalibrated = gates.SPM(8, 40, reduction=4, binarization=gates.Binarization(),
                           rngs=nnx.Rngs(0)).decide(s, train=False)
  assert float(jnp.mean(uncalibrated.decision)) == 1.0   # s > 0 everywhere
  with pytest.raises(ValueError, match=r"open_fraction must be in \(0, 1\], got 0"):
    gates.decision_point(s, 0)


@pytest.mark.parametrize("a, b", [(1.2, 0.1), (1.5, 0.1), (1.2, 0.2), (2.0, 0.0)])
@pytest.mark.parametrize("variant", ["layer", "channel", "static"])
def test_a_hand_off_opens_where_the_source_split_its_saliencies_for_any_a_and_b(a, b, variant):
  """The evaluation code opens at ``a sigma(z) - b = 0.5``, ``z = logit((0.5 +
  b) / a)``, which is 0 only when ``a = 1 + 2b``: a handed-off gate must open
  exactly the saliencies above the split its calibration chose (FIXED-K's
  fraction), whatever a and b. Catches a decision point placed at ``z = 0``
  (it opened 0.46 of a layer asked for 0.3 at a = 1.5)."""
  source = gates.FixedK(8, 40, reduction=4, keep=0.3, rngs=nnx.Rngs(0))
  source.head.w2.kernel.value = jax.random.normal(jax.random.key(1),
                                                  source.head.w2.kernel.value.shape)
  x = jax.random.normal(jax.random.key(2), (64, 4, 4, 8))
  saliencies = source.saliency(x)
  binarization = gates.Binarization(a=a, b=b)
  if variant == "static":
    gate = gates.StaticSaliency(40, binarization=binarization, rngs=nnx.Rngs(0))
    split, _ = gates.decision_point(jnp.mean(saliencies, 0)[None], 0.3)
    expected = jnp.broadcast_to(jnp.mean(saliencies, 0) > split, saliencies.shape)
  else:
    gate = gates.SPM(8, 40, reduction=4, binarization=binarization, decision_point=variant,
                     rngs=nnx.Rngs(0))
    if variant == "layer":
      split, _ = gates.decision_point(saliencies, 0.3)
    else:
      rates = jnp.mean(gates.top_k_mask(saliencies, source.k), axis=0)
      split, _ = gates.channel_decision_points(saliencies, rates)
    expected = saliencies > split
  gate.hand_off(source, saliencies, 0.3)
  opened = gate.decide(gate.saliency(x), train=False).decision
  np.testing.assert_array_equal(np.asarray(opened), np.asarray(expected, np.float32))
  assert abs(float(jnp.mean(opened)) - 0.3) <= 0.02


@pytest.mark.parametrize("asked, opened", [(0.6, 0.7), (0.4, 0.3)])
def test_a_decision_point_on_tied_saliencies_opens_or_shuts_the_tie_nearer_the_fraction(
    asked, opened):
  """A FIXED-K warm-up leaves the channels it never kept at exactly s = 1. Here
  40% of the saliencies tie at 1 around the split: the tie opens whole or shuts
  whole, whichever opens nearer the asked fraction, layer-wide and per
  channel. Catches the split landing on the tied value and shutting it always
  (0.3 opened where 0.6 was asked)."""
  s = jnp.concatenate([jnp.linspace(0.0, 0.9, 30), jnp.ones(40), jnp.linspace(1.1, 2.0, 30)])
  tau, rho = gates.decision_point(s[:, None], asked)
  assert float(jnp.mean(s > tau)) == pytest.approx(opened)
  gate = gates.SPM(8, 1, reduction=1, binarization=gates.Binarization(), rngs=nnx.Rngs(0))
  gate.threshold.value, gate.temperature.value = tau, rho
  assert float(jnp.mean(gate.decide(s[:, None], train=False).decision)) == pytest.approx(opened)
  constant = jnp.stack([jnp.linspace(0.0, 2.0, 10), jnp.ones(10)], axis=1)
  tau, _ = gates.channel_decision_points(constant, jnp.asarray([0.5, asked]))
  np.testing.assert_allclose(jnp.mean(constant > tau, axis=0), [0.5, round(asked)])


def test_per_channel_decision_points_open_each_channel_at_its_own_rate():
  # channels with their own offsets (far apart) and small per-image movement: one
  # layer-wide point would leave each channel always open or always shut
  key_offsets, key_moves = jax.random.split(jax.random.key(5))
  offsets = jax.random.normal(key_offsets, (12,))
  s = offsets + 0.01 * jax.random.normal(key_moves, (200, 12))
  rates = jnp.linspace(0.0, 1.0, 12)
  tau, rho = gates.channel_decision_points(s, rates)
  values = np.asarray(s)
  for c in range(12):   # each column split where round(rate N) samples lie above, by numpy
    column, rho_c = np.sort(values[:, c]), values[:, c].std()
    opened = round(float(rates[c]) * 200)
    np.testing.assert_allclose(float(rho[c]), rho_c, rtol=1e-4)
    assert (values[:, c] > float(tau[c])).sum() == opened
    below = column[200 - opened - 1] if opened < 200 else column[0] - rho_c
    above = column[200 - opened] if opened else column[-1] + rho_c
    np.testing.assert_allclose(float(tau[c]), (below + above) / 2, rtol=1e-5, atol=1e-6)
  gate = gates.SPM(8, 12, reduction=4, binarization=gates.Binarization(),
                   decision_point="channel", rngs=nnx.Rngs(0))
  assert gate.threshold.value.shape == gate.temperature.value.shape == (12,)
  gate.threshold.value, gate.temperature.value = tau, rho
  code = gate.decide(s, train=False)
  np.testing.assert_array_equal(np.asarray(code.decision), np.asarray(s > tau, np.float32))
  layer_tau, _ = gates.decision_point(s, 0.5)
  per_layer = np.asarray(s > layer_tau)
  assert ((per_layer.mean(0) > 0) & (per_layer.mean(0) < 1)).sum() <= 1   # static channels
  with pytest.raises(ValueError, match=r"open_rates must have shape \(12,\), got \(3,\)"):
    gates.channel_decision_points(s, rates[:3])
  with pytest.raises(ValueError, match=r"sanp.decision_point must be one of \('layer', "
                                       r"'channel'\), got 'sample'"):
    gates.SPM(8, 12, reduction=4, binarization=gates.Binarization(), decision_point="sample",
              rngs=nnx.Rngs(0))
