"""CompactNet (paper 004): groups, importance, trimming, the latency table, the search."""

import dataclasses
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import compactnet_paths
from dynscale import host, timing
from dynscale.compactnet import latency, platform, schedule, search, trimming
from dynscale.nn import costs, models, sliced, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mobilenet(width=0.25):
  return models.architecture("mobilenet_v2_imagenet", num_classes=10, input_shape=[32, 32, 3],
                             idp_layers="none", width_multiplier=width)


def _small():
  """Stem, a stage of two inverted residual blocks tied by their add, a strided
  stage, a head: every case of the MobileNetV2 groups, quick to compile."""
  conv = dict(kind="conv", kernel=3, act="relu6")
  return spec.validate_architecture({
      "name": "small_invres", "input_shape": [8, 8, 3], "num_classes": 10, "layers": [
          {**conv, "features": 8},
          {"kind": "invres", "features": 6, "expansion": 1},
          {"kind": "invres", "features": 6, "expansion": 4},
          {"kind": "invres", "features": 6, "expansion": 4},
          {"kind": "invres", "features": 12, "expansion": 4, "stride": 2},
          {"kind": "invres", "features": 12, "expansion": 4},
          {**conv, "features": 16, "kernel": 1},
          {"kind": "global_avgpool"}, {"kind": "dense", "features": 10}]})


def _variables(arch, seed=0):
  """Trained-looking variables: random kernels and batch-norm state."""
  v = models.build(arch, rngs=models.init_rngs(seed)).pure_variables()
  rng = np.random.default_rng(seed)

  def perturb(tree):
    if isinstance(tree, dict) and set(tree) == set(sliced.BN_LEAVES):
      return {"scale": 1 + 0.2 * rng.standard_normal(tree["scale"].shape),
              "bias": 0.1 * rng.standard_normal(tree["bias"].shape),
              "mean": 0.1 * rng.standard_normal(tree["mean"].shape),
              "var": 1 + rng.uniform(0, 0.5, tree["var"].shape)}
    if isinstance(tree, dict):
      return {k: perturb(t) for k, t in tree.items()}
    return tree
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), perturb(v))


# --------------------------------------------------------------------------
# Groups, importance, trimming
# --------------------------------------------------------------------------


def test_mobilenet_v2_groups_are_the_stem_the_stages_and_the_head():
  arch = _mobilenet(1.0)
  groups = trimming.trimmable_groups(arch)
  assert [g.size for g in groups] == [32, 16, 24, 32, 64, 96, 160, 320, 1280]
  layers = arch["layers"]
  # every stage group lists its blocks' expansions, each t x its input's width
  follower_sizes = {}
  for g in groups:
    for j, t in g.followers:
      follower_sizes[j] = t * g.size
  prunable = spec.prunable_groups(arch)
  for j, size in follower_sizes.items():
    assert prunable[j].size == size and prunable[j].name.endswith(".mid")
  expanding = [i for i, layer in enumerate(layers) if layer["kind"] == "invres"
               and layer["expansion"] != 1]
  assert len(follower_sizes) == len(expanding) == 16
  # independent expansions are groups of their own
  assert len(trimming.trimmable_groups(arch, "independent")) == 9 + 16
  with pytest.raises(ValueError, match="expansion must be one of"):
    trimming.trimmable_groups(arch, "shared")
  # an expansion whose width was set by hand (not t x its input) is a group of its own
  first = expanding[0]
  hand_set = spec.validate_architecture({**arch, "layers": [
      {**layer, "mid_features": 40} if i == first else layer for i, layer in enumerate(layers)]})
  own = [g for g in trimming.trimmable_groups(hand_set) if g.name == f"layers.{first}.mid"]
  assert len(own) == 1 and own[0].size == 40 and not own[0].followers
  assert len(trimming.trimmable_groups(hand_set)) == 9 + 1


def test_a_permutation_of_a_tied_group_keeps_every_residual_add_aligned():
  arch = _small()
  assert [g.name for g in trimming.trimmable_groups(arch)] == [
      "layers.0", "layers.1", "layers.4", "layers.6"]
  v = _variables(arch)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  rng = np.random.default_rng(0)
  orders = {g.id: rng.permutation(g.size) for g in spec.prunable_groups(arch)}
  moved = trimming.reorder(arch, v, orders)
  np.testing.assert_allclose(sliced.apply_sliced(arch, moved, x), sliced.apply_sliced(arch, v, x),
                             rtol=1e-4, atol=1e-4)
  # and the permutation really moved the weights
  assert not np.allclose(moved["layers"][0]["kernel"], v["layers"][0]["kernel"])


def test_importance_after_a_trim_reads_only_the_trimmed_networks_filters():
  """After a trim, a kept filter's rows that read trimmed channels are no part
  of the network (they keep their old values). The next iteration ranks each
  group's kept channels as the trimmed network itself (``trim``) ranks them
  (its summed filter norms, checked by hand above). Catches the norms taken
  over the full-size kernels, which keep a different channel here."""
  arch = _small()
  groups = trimming.trimmable_groups(arch)
  prunable = spec.prunable_groups(arch)
  ordered = trimming.order_by_importance(arch, _variables(arch), [g.size for g in prunable])
  widths = [g.size for g in groups]
  widths[1] = 2  # the first stage (layers.1), its followers' expansions with it
  core = trimming.core_widths(arch, groups, widths)
  again = trimming.order_by_importance(arch, ordered.variables, core, ordered.origin)
  t_arch, t_vars = trimming.trim(arch, ordered.variables, core)
  own = trimming.importance(t_arch, t_vars)
  full_size = trimming.importance(arch, ordered.variables)
  moved = 0
  for g, t, w in zip(prunable, spec.prunable_groups(t_arch), core):
    rank = np.argsort(-own[t.id], kind="stable")
    np.testing.assert_array_equal(again.origin[g.id][:w], ordered.origin[g.id][:w][rank],
                                  err_msg=g.name)
    moved += not np.array_equal(rank, np.argsort(-full_size[g.id][:w], kind="stable"))
  assert moved, "the check needs a group the dropped rows reorder"


def test_kept_channels_are_the_largest_summed_filter_norms():
  arch = _mobilenet()
  v = _variables(arch)
  groups = trimming.trimmable_groups(arch)
  stage = next(g for g in groups if g.name == "layers.4")  # (6, 32, 3, 2): three blocks
  # brute force: the stage's members are the projections of layers 4, 5, 6
  norms = sum(np.linalg.norm(np.asarray(v["layers"][i]["project"]["kernel"]).reshape(
      -1, stage.size), axis=0) for i in (4, 5, 6))
  width = stage.size // 2
  expected = sorted(np.argsort(-norms)[:width].tolist())
  widths = [g.size for g in groups]
  widths[groups.index(stage)] = width
  core = trimming.core_widths(arch, groups, widths)
  ordered = trimming.order_by_importance(arch, v, [g.size for g in spec.prunable_groups(arch)])
  assert trimming.kept_channels(arch, ordered, core)["layers.4"] == expected
  # the expansion after the stage keeps 6 x width channels, by its own filters' norms
  mid = spec.prunable_groups(arch)[stage.followers[0][0]]
  mid_norms = (np.linalg.norm(np.asarray(v["layers"][5]["expand"]["kernel"]).reshape(-1, mid.size),
                              axis=0)
               + np.linalg.norm(np.asarray(v["layers"][5]["depthwise"]["kernel"]).reshape(
                   -1, mid.size), axis=0))
  assert trimming.kept_channels(arch, ordered, core)[mid.name] == sorted(
      np.argsort(-mid_norms)[:6 * width].tolist())


def _masked_and_trimmed(arch, v, core, x, labels):
  """(logits, grads of the kernels, new statistics) of the masked network at
  ``core`` and of the trimmed one, in train mode."""
  model = models.build(arch, rngs=models.init_rngs(0))
  nnx.update(model.layers, nnx.State(v["layers"]))
  graphdef, state = nnx.split(model)

  def masked_loss(state):
    m = nnx.merge(graphdef, state)
    logits = m(x, widths=jnp.asarray(core), train=True)
    return jnp.mean(logits * labels), (logits, m.pure_variables())
  m_grads, (m_logits, m_vars) = jax.jit(jax.grad(masked_loss, has_aux=True))(state)
  m_grads = m_grads.to_pure_dict()["layers"]

  t_arch, t_vars = trimming.trim(arch, v, core)

  def trimmed_loss(variables):
    logits, stats = sliced.apply_sliced(t_arch, variables, x, train=True)
    return jnp.mean(logits * labels), (logits, stats)
  (_, (t_logits, t_stats)), t_grads = jax.jit(jax.value_and_grad(trimmed_loss, has_aux=True))(
      t_vars)
  return (m_logits, m_grads, m_vars), (t_arch, t_logits, t_grads, t_stats)


def test_trimmed_equals_masked_in_logits_gradients_and_batch_norm_statistics():
  arch = _small()
  v = _variables(arch)
  groups = trimming.trimmable_groups(arch)
  widths = [max(1, g.size * 5 // 8) for g in groups]
  core = trimming.core_widths(arch, groups, widths)
  v = trimming.order_by_importance(arch, v, [g.size for g in spec.prunable_groups(arch)]).variables
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
  labels = jax.random.normal(jax.random.key(3), (4, 10))
  (m_logits, m_grads, m_vars), (t_arch, t_logits, t_grads, t_stats) = _masked_and_trimmed(
      arch, v, core, x, labels)
  np.testing.assert_allclose(m_logits, t_logits, rtol=2e-3, atol=1e-3)
  kept_grads = sliced.slice_variables(arch, {"layers": m_grads}, core)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(t_grads))
  for path, g in sliced.flatten_tree(t_grads).items():
    np.testing.assert_allclose(sliced.flatten_tree(kept_grads)[path], g, rtol=1e-3,
                               atol=1e-4 * scale, err_msg=path)
  kept_stats = sliced.bn_stats_of(sliced.slice_variables(arch, m_vars, core))
  for path, s in sliced.flatten_tree(t_stats).items():
    np.testing.assert_allclose(sliced.flatten_tree(kept_stats)[path], s, rtol=1e-3, atol=1e-5,
                               err_msg=path)
  assert t_arch["layers"][0]["features"] == widths[0]


def test_trimming_never_adds_a_residual_add():
  arch = _small()
  v = _variables(arch)
  groups = trimming.trimmable_groups(arch)
  # the stem (8) cut to the width of the stride-1 block after it (6): equal
  # widths, but that block had no residual add and must not get one
  widths = [6] + [g.size for g in groups[1:]]
  core = trimming.core_widths(arch, groups, widths)
  t_arch, t_vars = trimming.trim(arch, v, core)
  assert t_arch["layers"][1]["shortcut"] == "none"
  assert t_arch["layers"][3]["shortcut"] == "identity"
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
  np.testing.assert_allclose(sliced.apply_sliced(t_arch, t_vars, x),
                             sliced.apply_sliced(arch, v, x, list(core)), rtol=1e-4, atol=1e-5)


def test_removing_an_all_zero_channel_changes_nothing():
  arch = _small()
  v = _variables(arch)
  dead = 3

  def silence(bn):  # this channel's batch norm outputs zero
    return {k: a.at[dead].set(0.0) if k in ("scale", "bias") else a for k, a in bn.items()}
  # the stem's group is also the depthwise output of the t = 1 block after it
  stem, block = v["layers"][0], v["layers"][1]
  layers = {**v["layers"],
            0: {"kernel": stem["kernel"].at[..., dead].set(0.0), "bn": silence(stem["bn"])},
            1: {**block, "depthwise": {"kernel": block["depthwise"]["kernel"].at[..., dead].set(0.0)},
                "depthwise_bn": silence(block["depthwise_bn"])}}
  v = {**v, "layers": layers}
  groups = trimming.trimmable_groups(arch)
  full = [g.size for g in spec.prunable_groups(arch)]
  ordered = trimming.order_by_importance(arch, v, full)
  assert ordered.origin[spec.prunable_groups(arch)[0].id][-1] == dead
  widths = [g.size for g in groups]
  widths[0] -= 1
  core = trimming.core_widths(arch, groups, widths)
  t_arch, t_vars = trimming.trim(arch, ordered.variables, core)
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
  np.testing.assert_allclose(sliced.apply_sliced(t_arch, t_vars, x),
                             sliced.apply_sliced(arch, v, x), rtol=1e-4, atol=1e-5)


def test_core_widths_rejects_bad_widths():
  arch = _mobilenet()
  groups = trimming.trimmable_groups(arch)
  with pytest.raises(ValueError, match="one entry per trimmable group"):
    trimming.core_widths(arch, groups, [1])
  with pytest.raises(ValueError, match=r"widths\['layers.0'\] must be an int in \[1, 8\]"):
    trimming.core_widths(arch, groups, [9] + [g.size for g in groups[1:]])


# --------------------------------------------------------------------------
# The latency table (timing injected)
# --------------------------------------------------------------------------

OVERHEAD_S = 1e-4


def _flops_timer(networks, overhead=OVERHEAD_S):
  """A fake platform: a unit's latency is its FLOPs at 1 GFLOP/s plus an overhead."""
  return {name: {"latency_s": costs.flops(arch) * 1e-9 + overhead, "spread": 0.01}
          for name, (arch, _) in networks.items()}


@pytest.fixture(scope="module")
def table():
  return latency.build(_mobilenet(), platform.get("cpu-b64"), _flops_timer, grid_points=4,
                       min_fraction=0.25, round_to=2)


def test_validation_variants_hold_every_group_within_the_fraction_asked(table):
  """Each group's width in [low, 1] x its size, on the table's multiples: rounded
  down, a group of 4 in steps of 2 drew 2 (a half) under ``low=0.6``, and a
  32-channel one in steps of 8 drew a quarter under 0.3."""
  for low in (0.3, 0.6):
    variants = np.array(latency.random_widths(table, 200, seed=0, low=low))
    sizes = np.array(table.group_sizes)
    assert np.all(variants >= low * sizes - 1e-9) and np.all(variants <= sizes)
    assert np.all(variants % table.round_to == 0)
    assert len({tuple(v) for v in variants}) > 150


def test_units_are_the_stem_the_stages_and_the_head(table):
  assert [(u.start, u.stop) for u in table.units] == [
      (0, 1), (1, 2), (2, 4), (4, 7), (7, 11), (11, 14), (14, 17), (17, 18), (18, 21)]
  assert [u.dims for u in table.units] == [(0,), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5),
                                           (5, 6), (6, 7), (7, 8)]


def test_a_unit_is_timed_without_the_flatten_that_makes_it_a_network(table):
  """A unit ending in a map is timed up to that map (a fused flatten slowed
  MobileNetV2's stem ninefold on XLA:CPU); a whole network up to its logits."""
  arch = _mobilenet()
  full = [g.size for g in spec.prunable_groups(arch)]
  stem = latency.unit_architecture(arch, table.units[0], full)
  v = latency.random_variables(stem)
  x = jax.random.normal(jax.random.key(0), (2, *stem["input_shape"]))
  timed = latency.timed_forward(stem)(v, x)
  assert stem["layers"][-1]["kind"] == "flatten" and timed.ndim == 4
  np.testing.assert_array_equal(timed.reshape(2, -1), sliced.apply_sliced(stem, v, x))
  whole = latency.random_variables(arch)
  x = jax.random.normal(jax.random.key(0), (2, *arch["input_shape"]))
  np.testing.assert_array_equal(latency.timed_forward(arch)(whole, x),
                                sliced.apply_sliced(arch, whole, x))


def test_the_table_sums_interpolated_units(table):
  arch = _mobilenet()
  groups = trimming.trimmable_groups(arch)

  def expected(widths):  # the whole network's FLOPs plus one overhead per unit
    trimmed = spec.trimmed_architecture(arch, list(trimming.core_widths(arch, groups, widths)))
    return costs.flops(trimmed) * 1e-9 + OVERHEAD_S * len(table.units)
  rng = np.random.default_rng(0)
  for _ in range(3):  # on grid points the table holds the measurements themselves
    widths = [int(rng.choice(grid)) for grid in table.grids]
    assert table.predict(widths) == pytest.approx(expected(widths), rel=1e-9)
  for _ in range(3):  # between them, FLOPs are nearly bilinear in a unit's two widths
    widths = [int(rng.choice([w for w in range(grid[0], grid[-1] + 1) if w % 2 == 0
                              or w == grid[-1]])) for grid in table.grids]
    assert table.predict(widths) == pytest.approx(expected(widths), rel=0.02)


def test_the_table_does_not_extrapolate_or_leave_its_grid(table):
  low = list(table.full_widths)
  low[8] = table.grids[8][0] - 2
  with pytest.raises(ValueError, match="off the latency table's grid.*does not extrapolate"):
    table.predict(low)
  odd = list(table.full_widths)
  odd[8] = table.grids[8][-1] - 1
  with pytest.raises(ValueError, match="multiples of round_to=2"):
    table.predict(odd)


def test_calibration_recovers_an_affine_relation(table):
  variants = latency.random_widths(table, latency.AFFINE_MIN_NETWORKS, seed=1)
  raw = [table.raw(w) for w in variants]
  calibrated = table.with_calibration(raw, [0.8 * r - 2e-4 for r in raw], seed=1)
  assert calibrated.calibration["scale"] == pytest.approx(0.8)
  assert calibrated.calibration["offset"] == pytest.approx(-2e-4)
  assert calibrated.predict(variants[0]) == pytest.approx(0.8 * raw[0] - 2e-4)
  few = table.with_calibration(raw[:3], [0.8 * r for r in raw[:3]])  # a scale alone
  assert (few.calibration["scale"], few.calibration["offset"]) == (pytest.approx(0.8), 0.0)
  # the speed-ups the search reads are the calibrated ones (an offset changes them)
  full = table.raw(table.full_widths)
  assert calibrated.speedup(variants[0]) == pytest.approx(
      (0.8 * full - 2e-4) / (0.8 * raw[0] - 2e-4))
  assert calibrated.speedup(variants[0]) != pytest.approx(full / raw[0])


def test_calibration_separates_weight_traffic_from_the_units(table):
  variants = latency.random_widths(table, latency.AFFINE_MIN_NETWORKS + 2, seed=1)
  raw = [table.raw(w) for w in variants]
  mib = [table.weight_mib(w) for w in variants]
  measured = [0.8 * r + 3e-4 * m - 2e-4 for r, m in zip(raw, mib)]
  calibrated = table.with_calibration(raw, measured, mib)
  assert calibrated.calibration["scale"] == pytest.approx(0.8)
  assert calibrated.calibration["per_mib"] == pytest.approx(3e-4)
  assert calibrated.calibration["offset"] == pytest.approx(-2e-4, abs=1e-12)
  other = latency.random_widths(table, 1, seed=5)[0]
  assert calibrated.predict(other) == pytest.approx(
      0.8 * table.raw(other) + 3e-4 * table.weight_mib(other) - 2e-4)
  with pytest.raises(ValueError, match="one weight_mib per network"):
    table.with_calibration(raw, measured, mib[:-1])


def _relative_fit(columns, measured):
  """Least squares of sum_k (columns_k . c / measured_k - 1)^2, written out."""
  design = np.stack(columns, axis=1) / measured[:, None]
  return np.linalg.solve(design.T @ design, design.T @ np.ones_like(measured))


def _held_out(raw, mib, measured):
  """Per calibration form, each network's |predicted / measured - 1| when
  left out of the fit."""
  forms = {"raw": None, "scale": lambda r, w: [r], "affine": lambda r, w: [r, np.ones_like(r)],
           "affine+weights": lambda r, w: [r, w, np.ones_like(r)]}
  errors = {}
  for name, columns in forms.items():
    e = []
    for k in range(len(raw)):
      rest = np.arange(len(raw)) != k
      if columns is None:
        predicted = raw[k]
      else:
        c = _relative_fit(columns(raw[rest], mib[rest]), measured[rest])
        predicted = float(np.dot(c, [v[k] for v in columns(raw, mib)]))
      e.append(abs(predicted / measured[k] - 1))
    errors[name] = np.array(e)
  return errors


def _one_standard_error_choice(held_out):
  """The first form (fewest terms) within one standard error of the best mean."""
  means = {f: e.mean() for f, e in held_out.items()}
  best = min(means, key=means.get)
  bar = means[best] + held_out[best].std(ddof=1) / np.sqrt(len(held_out[best]))
  return next(f for f in held_out if means[f] <= bar + 1e-12)


def test_calibration_form_is_chosen_by_leaving_one_network_out(table):
  variants = latency.random_widths(table, 12, seed=3)
  raw = np.array([table.raw(w) for w in variants])
  mib = np.array([table.weight_mib(w) for w in variants])
  columns = np.stack([raw, mib, np.ones_like(raw)], 1)
  chosen, best_means = [], []
  for seed in range(6):
    # The raw sum is the truth, timed with 6% noise: on their own networks
    # the extra terms always fit the noise better; left out, not always.
    noise = np.random.default_rng(seed).uniform(-0.06, 0.06, raw.shape)
    measured = raw * (1 + noise)
    held_out = _held_out(raw, mib, measured)
    calibration = table.with_calibration(raw, measured, mib).calibration
    assert calibration["leave_one_out_mean_abs_error"] == pytest.approx(
        {f: e.mean() for f, e in held_out.items()})
    assert calibration["form"] == _one_standard_error_choice(held_out)
    chosen.append(calibration["form"])
    best_means.append(min(held_out, key=lambda f: held_out[f].mean()))
    in_sample = columns @ _relative_fit(list(columns.T), measured)
    assert np.mean(np.abs(in_sample / measured - 1)) < np.mean(np.abs(raw / measured - 1))
  # the rule keeps the raw sum in draws where a richer form's mean was lower by less than 1 SE
  assert any(c == "raw" != b for c, b in zip(chosen, best_means))
  # a weight cost the sum of units does not see: only the weight term follows it
  weighted = raw + 0.5 * mib * raw.mean() / mib.mean()
  assert table.with_calibration(raw, weighted, mib).calibration["form"] == "affine+weights"
  exact = table.with_calibration(raw, raw, mib).calibration  # every form fits: fewest terms
  assert (exact["form"], exact["scale"], exact["per_mib"], exact["offset"]) == ("raw", 1, 0, 0)
  scaled = table.with_calibration(raw, 0.7 * raw, mib).calibration
  assert (scaled["form"], scaled["scale"]) == ("scale", pytest.approx(0.7))
  # A forced form is fitted on relative errors.
  forced = table.with_calibration(raw, measured, mib, forms=("scale",)).calibration
  assert forced["form"] == "scale"
  assert forced["scale"] == pytest.approx(_relative_fit([raw], measured)[0])
  assert list(forced["leave_one_out_mean_abs_error"]) == ["scale"]


def test_calibration_refuses_what_it_cannot_fit(table):
  raw = [table.raw(w) for w in latency.random_widths(table, 3, seed=1)]
  with pytest.raises(ValueError, match="forms must be a non-empty subset of"):
    table.with_calibration(raw, raw, forms=("cubic",))
  with pytest.raises(ValueError, match="at least 2 networks"):
    table.with_calibration(raw[:1], raw[:1])
  with pytest.raises(ValueError, match="affine forms need 8"):
    table.with_calibration(raw, raw, forms=("affine",))


def test_weight_bytes_are_the_networks_variables_on_the_grid(table):
  arch = _mobilenet()
  groups = trimming.trimmable_groups(arch)
  for widths in (list(table.full_widths), [grid[1] for grid in table.grids]):
    _, variables = latency.trimmed_network(arch, groups, widths)
    counted = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    assert table.weight_mib(widths) * 2**20 == pytest.approx(counted)


def test_a_table_round_trips_and_refuses_edits_and_truncation(table, tmp_path):
  path = str(tmp_path / "table.json")
  latency.save(table, path)
  loaded = latency.load(path)
  widths = latency.random_widths(table, 1, seed=2)[0]
  assert loaded.predict(widths) == table.predict(widths)
  assert loaded.weight_mib(widths) == table.weight_mib(widths)
  latency.save(dataclasses.replace(table, weight_bytes=None), path)  # an older table
  with pytest.raises(ValueError, match="no weight bytes.*build it again"):
    latency.load(path).weight_mib(widths)
  text = open(path).read()
  data = json.loads(text)
  data["units"][0]["latency_s"][0] *= 0.5
  (tmp_path / "edited.json").write_text(json.dumps(data))
  with pytest.raises(ValueError, match="edited or corrupted"):
    latency.load(str(tmp_path / "edited.json"))
  (tmp_path / "cut.json").write_text(text[:len(text) // 2])
  with pytest.raises(ValueError, match="truncated or not JSON"):
    latency.load(str(tmp_path / "cut.json"))


@pytest.mark.parametrize("change, message", [
    (dict(arch_width=0.5), "is for model"),
    (dict(platform="cpu-b1"), "platform name"),
    (dict(platform_field=("batch", 32)), "platform batch 64, this run needs 32"),
    (dict(platform_field=("dtype", "bfloat16")), "platform dtype"),
    (dict(platform_field=("threads", 2)), "platform threads"),
    (dict(expansion="independent"), "groups expansions as 'tied'"),
])
def test_a_table_for_another_model_or_platform_is_refused(table, change, message):
  arch = _mobilenet(change.get("arch_width", 0.25))
  target = platform.get(change.get("platform", "cpu-b64"))
  if "platform_field" in change:
    field, value = change["platform_field"]
    target = dataclasses.replace(target, **{field: value})
  with pytest.raises(ValueError, match=message):
    latency.check_matches(table, arch, target, change.get("expansion", "tied"))


def test_a_table_serves_every_profile_name_of_a_network_without_idp_layers(table):
  """The network-level profile is read only by IDP layers: with none, a table
  built under one profile name (the benchmark's default) serves a run whose
  config names another (CompactNet's ``all-one``); with an IDP layer the
  profile changes the computation and the table is refused."""
  plain = dict(_mobilenet(), profile="all-one")
  target = platform.get("cpu-b64")
  latency.check_matches(table, plain, target, "tied")
  idp = models.architecture("mobilenet_v2_imagenet", num_classes=10, input_shape=[32, 32, 3],
                            idp_layers="all", width_multiplier=0.25)
  other_profile = dataclasses.replace(table, model_fingerprint=latency.fingerprint(idp))
  with pytest.raises(ValueError, match="is for model"):
    latency.check_matches(other_profile, dict(idp, profile="all-one"), target, "tied")


def test_a_table_written_before_profiles_were_left_out_still_matches_its_network(table):
  """Tables written before hashed the whole architecture, profile included."""
  arch = dict(_mobilenet(), profile="all-one")
  whole = hashlib.sha256(json.dumps(spec.validate_architecture(arch), sort_keys=True)
                         .encode()).hexdigest()[:16]
  older = dataclasses.replace(table, model_fingerprint=whole)
  latency.check_matches(older, arch, platform.get("cpu-b64"), "tied")
  with pytest.raises(ValueError, match="is for model"):
    latency.check_matches(older, _mobilenet(0.5), platform.get("cpu-b64"), "tied")


def test_unknown_platform_is_refused():
  with pytest.raises(ValueError, match=r"platform must be one of \['cpu-b1'"):
    platform.get("tpu-b64")


def test_a_platforms_process_runs_the_tuned_xla_cpu_whoever_starts_it():
  """The launcher tunes its own XLA:CPU (host.tune_xla_cpu), the CompactNet
  benchmarks did not: their platform processes must run under the same flags."""
  target = platform.get("cpu-b64")
  untuned_parent = platform.environment(target, base={})["XLA_FLAGS"].split()
  tuned_parent = platform.environment(
      target, base={"XLA_FLAGS": " ".join(host.XLA_CPU_FLAGS)})["XLA_FLAGS"].split()
  assert sorted(untuned_parent) == sorted(tuned_parent)
  assert set(host.XLA_CPU_FLAGS) <= set(tuned_parent) and len(set(tuned_parent)) == len(tuned_parent)
  assert "--xla_cpu_multi_thread_eigen=false" in tuned_parent
  system = platform.environment(target, base={host.XLA_CPU_ENV: "system"})["XLA_FLAGS"].split()
  assert not set(host.XLA_CPU_FLAGS) & set(system) and "--xla_cpu_multi_thread_eigen=false" in system


def test_a_cpu_platforms_process_gets_its_threads_cpus_and_a_gpu_one_is_left_alone():
  """A CPU platform's process runs on its ``threads`` CPUs (the CPU set is
  what fixes XLA:CPU's thread count); a GPU platform's keeps its environment."""
  base = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "OTHER": "1"}
  cpus = sorted(os.sched_getaffinity(0))
  for name in ("cpu-b64", "cpu-b1", "cpu-b64-bf16"):
    env = platform.environment(platform.get(name), base=base)
    assert env["DYNSCALE_CPUS"] == str(cpus[0]) and env["JAX_PLATFORMS"] == "cpu", name
    assert env["OTHER"] == "1" and "--xla_dump_to=/tmp/x" in env["XLA_FLAGS"].split(), name
  for name in ("gpu-b64", "gpu-b1", "gpu-b64-bf16"):
    assert platform.environment(platform.get(name), base=base) == base, name


def test_every_entry_of_a_platforms_xla_flags_is_one_xla_reads():
  """XLA stops on an unknown ``--`` flag but ignores a token without the dashes:
  ``intra_op_parallelism_threads=1`` (a TensorFlow setting) sat in the platforms'
  flags, doing nothing, until 2026-12-07. The CPU set fixes the threads."""
  for name, target in platform.PLATFORMS.items():
    flags = platform.environment(target, base={}).get("XLA_FLAGS", "")
    assert host.xla_flags_read(flags) == flags.split(), name


def test_a_table_measured_under_other_xla_flags_is_refused(table):
  target = platform.get("cpu-b64")
  ours = platform.environment(target)["XLA_FLAGS"].split()
  same = dataclasses.replace(table, provenance={**table.provenance,
                                                "xla_flags": " ".join(reversed(ours))})
  latency.check_matches(same, _mobilenet(), target, "tied")  # the order of flags is no matter
  untuned = [flag for flag in ours if flag not in host.XLA_CPU_FLAGS]
  other = dataclasses.replace(table, provenance={**table.provenance,
                                                 "xla_flags": " ".join(untuned)})
  with pytest.raises(ValueError, match="measured under XLA_FLAGS"):
    latency.check_matches(other, _mobilenet(), target, "tied")
  # a table measured with the stray token (XLA ignored it) ran under the same XLA:CPU
  stray = dataclasses.replace(table, provenance={
      **table.provenance, "xla_flags": " ".join([*ours, "intra_op_parallelism_threads=1"])})
  latency.check_matches(stray, _mobilenet(), target, "tied")


def test_a_gpu_table_is_checked_on_the_flags_that_bear_on_the_gpu(table, monkeypatch):
  """A GPU platform's process keeps its parent's ``XLA_FLAGS``, which hold XLA:CPU's
  tuning in a launcher and not in the table benchmark: a GPU table built by
  one is accepted by the other, and refused for another GPU flag. Catches the
  XLA:CPU flags compared on a GPU (the benchmark's table was refused)."""
  target = platform.get("gpu-b64")
  gpu = dataclasses.replace(table, platform=dataclasses.asdict(target),
                            provenance={**table.provenance, "xla_flags": ""})
  monkeypatch.setenv("XLA_FLAGS", " ".join(host.XLA_CPU_FLAGS))
  latency.check_matches(gpu, _mobilenet(), target, "tied")
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
  with pytest.raises(ValueError, match="measured under XLA_FLAGS ''"):
    latency.check_matches(gpu, _mobilenet(), target, "tied")


def test_a_process_not_set_up_for_the_platform_refuses_to_measure():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("from dynscale.compactnet import platform; "
          "platform.check_process(platform.get('cpu-b64'))")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env={**env, "JAX_PLATFORMS": "cpu"})
  assert done.returncode != 0 and "needs 1 thread(s)" in done.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process on 2+ CPUs")
def test_a_process_with_the_flags_but_every_cpu_refuses_to_measure():
  """The flags alone do not make a one-thread process: XLA:CPU's pool follows
  the CPU set, so a process not pinned to its platform's CPUs is refused."""
  env = {k: v for k, v in os.environ.items() if k != "DYNSCALE_CPUS"}
  flags = platform.environment(platform.get("cpu-b64"), base={})["XLA_FLAGS"]
  code = ("from dynscale.compactnet import platform; "
          "platform.check_process(platform.get('cpu-b64'))")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env={**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags})
  assert done.returncode != 0 and "needs 1 thread(s)" in done.stderr
  assert f"this one has {len(os.sched_getaffinity(0))}" in done.stderr


def test_a_measurement_runs_in_a_process_pinned_to_its_platform(tmp_path):
  """``run_isolated`` starts ``measure`` with the platform's environment, which
  pins itself to the platform's CPUs and records where it ran; started
  without that environment, ``measure`` refuses to time anything."""
  target = platform.get("cpu-b1")
  request = {"kind": "networks", "platform": target.name, "warmup": 1, "rounds": 1, "burst": 1,
             "estimator": "min", "networks": {"stem": {"arch": _small(), "prefix": 1}}}
  result = platform.run_isolated(target, "dynscale.compactnet.measure", request, timeout=300)
  assert result["latencies"]["stem"]["latency_s"] > 0
  assert result["provenance"]["cpus"] == sorted(os.sched_getaffinity(0))[:1]
  assert result["provenance"]["xla_flags"] == platform.environment(target)["XLA_FLAGS"]
  (tmp_path / "request.json").write_text(json.dumps(request))
  env = {k: v for k, v in os.environ.items() if k not in ("DYNSCALE_CPUS", "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-m", "dynscale.compactnet.measure",
                         str(tmp_path / "request.json"), str(tmp_path / "result.json")],
                        cwd=ROOT, capture_output=True, text=True,
                        env={**env, "JAX_PLATFORMS": "cpu"})
  assert done.returncode != 0 and "needs 1 thread(s)" in done.stderr
  assert not (tmp_path / "result.json").exists()


@pytest.mark.slow
def test_a_real_table_in_its_own_process_predicts_whole_networks(tmp_path):
  arch = _mobilenet()
  target = platform.get("cpu-b64")
  out = str(tmp_path / "table.json")
  platform.run_isolated(target, "dynscale.compactnet.measure", {
      "kind": "table", "platform": target.name, "arch": arch, "expansion": "tied",
      "grid_points": 3, "min_fraction": 0.5, "round_to": 2, "warmup": 1, "rounds": 3, "burst": 2,
      "estimator": "min", "out": out})
  table = latency.load(out)
  assert table.provenance["xla_flags"].endswith("--xla_cpu_multi_thread_eigen=false")
  assert len(table.provenance["cpus"]) == 1
  result = platform.run_isolated(target, "dynscale.compactnet.measure", {
      "kind": "networks", "platform": target.name, "warmup": 1, "rounds": 3, "burst": 2,
      "estimator": "min", "networks": {"full": {"arch": arch, "widths": list(table.full_widths)}}})
  assert result["latencies"]["full"]["latency_s"] > 0


# --------------------------------------------------------------------------
# The search: a toy network, a fake platform, an accuracy oracle
# --------------------------------------------------------------------------


def _toy():
  return models.architecture("m_cifarnet", num_classes=10, input_shape=[16, 16, 3],
                             idp_layers="none", width_multiplier=1 / 16)


def _toy_table(arch):
  return latency.build(arch, platform.get("cpu-b64"),
                       functools.partial(_flops_timer, overhead=1e-6), grid_points=3,
                       min_fraction=0.25, round_to=1, provenance={"date": "fixed"})


def _oracle(arch, table):
  """Validation accuracy that falls with the channels removed, least for group 2."""
  groups = trimming.trimmable_groups(arch)
  cost = np.array([1.0 if k != 2 else 0.1 for k in range(len(groups))])
  index = [g.index for g in groups]

  def score(variables, core):
    removed = np.array([g.size - core[j] for g, j in zip(groups, index)], float)
    return float(0.9 - 0.01 * np.sum(cost * removed) + 0.001 * variables["tag"])

  def fine_tune(variables, core, seed):
    return {**variables, "tag": np.asarray(seed % 7, np.float32)}
  return score, fine_tune


def _toy_search(workdir, plan: schedule.Schedule, **options) -> search.Result:
  """The search on the toy network's table, scored and fine-tuned by its oracle."""
  arch = _toy()
  table = _toy_table(arch)
  score, fine_tune = _oracle(arch, table)
  return search.search(arch, _variables(arch), table, plan, fine_tune=fine_tune, score=score,
                       workdir=str(workdir), **options)


def test_the_search_meets_every_budget_and_keeps_the_best_candidate(tmp_path):
  arch = _toy()
  table = _toy_table(arch)
  v = {**_variables(arch), "tag": np.asarray(0.0, np.float32)}
  plan = schedule.Schedule.for_final(1.4, 3, 0.9)
  score, fine_tune = _oracle(arch, table)
  result = search.search(arch, v, table, plan, fine_tune=fine_tune, score=score,
                         workdir=str(tmp_path), min_width=0.25)
  budgets = plan.budgets(table.predict(table.full_widths))
  for record, budget in zip(result.history["iterations"], budgets):
    assert record["done"]
    assert table.predict(record["widths"]) <= budget
    if record["chosen"] is not None:
      accuracies = [c["val_accuracy"] for c in record["candidates"]]
      assert record["widths"] == record["candidates"][int(np.argmax(accuracies))]["widths"]
      for c in record["candidates"]:  # each candidate trims one group to meet the budget
        assert c["predicted_s"] <= budget
        changed = [k for k, (a, b) in enumerate(zip(c["widths"], record["start_widths"]))
                   if a != b]
        assert len(changed) == 1
  assert table.speedup(list(result.widths)) >= plan.final_speedup
  # the first iteration trims the original: each candidate keeps its group's largest
  # filters by L2 norm (a conv chain: a group is one layer's outputs), by hand
  for c in result.history["iterations"][0]["candidates"]:
    k = [g.name for g in trimming.trimmable_groups(arch)].index(c["group"])
    kernel = np.asarray(v["layers"][k]["kernel"], np.float64)
    norms = np.sqrt(np.sum(kernel ** 2, axis=(0, 1, 2)))
    assert c["kept"] == sorted(np.argsort(-norms)[:c["widths"][k]].tolist()), c["group"]
    assert c["kept"] != list(range(c["widths"][k])), "the toy's largest filters are not its first"
  # later ones keep channels the earlier ones kept
  chosen = {}
  for record in result.history["iterations"]:
    if record["chosen"] is not None:
      c = record["candidates"][record["chosen"]]
      assert set(c["kept"]) <= set(chosen.get(c["group"], c["kept"]))
      chosen[c["group"]] = c["kept"]
  # group 2 is the cheapest to trim by the oracle, so the search trims it first
  assert result.history["iterations"][0]["candidates"][
      result.history["iterations"][0]["chosen"]]["group"] == trimming.trimmable_groups(arch)[2].name


def test_an_iterations_candidates_are_fine_tuned_in_one_slot_counting_the_choices_before(
    tmp_path):
  """``fine_tune`` gets the same slot for every candidate of an iteration (so
  they are compared on the same batches), the number of fine-tunes the model
  they trim went through: 0, 1, ... over the iterations that chose one."""
  arch = _toy()
  table = _toy_table(arch)
  score, fine_tune = _oracle(arch, table)
  slots = []

  def recorded(variables, core, slot):
    slots.append(slot)
    return fine_tune(variables, core, slot)
  plan = schedule.Schedule.for_final(1.4, 3, 0.9)
  result = search.search(arch, {**_variables(arch), "tag": np.asarray(0.0, np.float32)}, table,
                         plan, fine_tune=recorded, score=score, workdir=str(tmp_path),
                         min_width=0.25)
  expected, chosen = [], 0
  for record in result.history["iterations"]:
    expected += [chosen] * len(record["candidates"])
    chosen += record["chosen"] is not None
  assert slots == expected and len(set(slots)) > 1


def test_a_group_is_trimmed_to_the_largest_multiple_of_round_to_that_meets_the_budget():
  """``trim_group`` tries the multiples of ``round_to`` below a group's width,
  from the largest down, and stops at the first the table says meets the
  budget; a full width that is not one (6 with round_to 4) steps to the
  multiple below it (4), never off the grid (2). Checked against every
  admissible width tried by hand."""
  table = latency.build(_mobilenet(), platform.get("cpu-b64"), _flops_timer, grid_points=3,
                        min_fraction=0.25, round_to=4)
  full = list(table.full_widths)

  def trimmed(k, width):
    return full[:k] + [width] + full[k + 1:]

  k = table.group_names.index("layers.2")
  assert full[k] == 6 and table.grids[k][0] == 4
  assert search.trim_group(table, full, k, table.predict(trimmed(k, 4)), 4) == 4
  assert search.trim_group(table, full, k, 0.999 * table.predict(trimmed(k, 4)), 4) is None
  k = table.group_names.index("layers.11")
  admissible = [w for w in range(full[k] - 1, table.grids[k][0] - 1, -1) if w % 4 == 0]
  for goal in admissible:
    budget = table.predict(trimmed(k, goal))
    largest = next(w for w in admissible if table.predict(trimmed(k, w)) <= budget)
    assert search.trim_group(table, full, k, budget, table.grids[k][0]) == largest == goal


def test_an_unreachable_target_stops_with_the_best_reachable_speedup(tmp_path):
  arch = _toy()
  table = _toy_table(arch)
  score, fine_tune = _oracle(arch, table)
  plan = schedule.Schedule.for_final(5.0, 2, 1.0)
  with pytest.raises(search.UnreachableTarget, match=r"no single group trimmed to its minimum"):
    search.search(arch, {**_variables(arch), "tag": np.asarray(0.0)}, table, plan,
                  fine_tune=fine_tune, score=score, workdir=str(tmp_path), min_width=0.9)


def test_a_correction_takes_its_gap_in_equal_steps_no_deeper_than_the_schedules_last():
  """The corrected budget is reached in the fewest equal steps of at most the
  given size; steps that need two groups are walked when no single group
  could take the whole gap; none when the minimum widths cannot reach it."""
  arch = _toy()
  table = _toy_table(arch)
  widths, start = table.full_widths, table.predict(table.full_widths)
  budget = 0.8 * start
  budgets = search.correction_budgets(table, widths, budget, 0.07 * start, 0.25)
  assert len(budgets) == 3  # 0.2 of the latency in steps of at most 0.07: three
  np.testing.assert_allclose(np.diff([start, *budgets]), -(start - budget) / 3)
  assert budgets[-1] == pytest.approx(budget)
  assert search.correction_budgets(table, widths, budget, start, 0.25) == (
      pytest.approx(budget),)
  # 5% of the latency beyond what any single group at half its width removes
  minimum = search.minimum_widths(table, 0.5)
  one_group = min(table.predict(list(widths[:k]) + [minimum[k]] + list(widths[k + 1:]))
                  for k in range(len(widths)))
  two_groups = one_group - 0.05 * start
  assert search.correction_budgets(table, widths, two_groups, start, 0.5) == ()
  walked = search.correction_budgets(table, widths, two_groups, (start - two_groups) / 2, 0.5)
  assert len(walked) == 2 and walked[-1] == pytest.approx(two_groups)
  every_group = table.predict(list(minimum))
  assert search.correction_budgets(table, widths, 0.99 * every_group, start / 50, 0.5) == ()


def test_a_check_with_stepped_budgets_runs_one_more_iteration_per_step(tmp_path):
  """After a check asking for budgets b1 > b2, the search runs two more
  iterations under them, in order, each met by one group's trim; a history
  written before stepped corrections (one ``next_budget_s``) reads as one step."""
  arch = _toy()
  table = _toy_table(arch)
  v = {**_variables(arch), "tag": np.asarray(0.0, np.float32)}
  plan = schedule.Schedule.for_final(1.4, 3, 0.9)
  score, fine_tune = _oracle(arch, table)

  def run():
    return search.search(arch, v, table, plan, fine_tune=fine_tune, score=score,
                         workdir=str(tmp_path), min_width=0.25)
  found = run()
  start = table.predict(list(found.widths))
  budgets = (0.95 * start, 0.9 * start)
  search.record_check(str(tmp_path), found, 1.0, budgets, 1.5, {})
  extended = run().history["iterations"]
  assert len(extended) == 5
  for record, budget in zip(extended[3:], budgets):
    assert record["budget_s"] == budget and record["done"]
    assert table.predict(record["widths"]) <= budget
    assert sum(a != b for a, b in zip(record["widths"], record["start_widths"])) == 1
  assert search.extra_budgets({"next_budget_s": 0.5}) == [0.5]
  assert search.extra_budgets({"next_budget_s": None}) == []


def test_random_paths_meet_what_the_search_meets_and_stop_where_it_stops(tmp_path):
  table = _toy_table(_toy())
  easy = compactnet_paths.reachability(table, 1.4, 3, decay=0.9, paths=5)
  assert (easy["reached"], easy["stopped_at"]) == (5, [])
  hard = compactnet_paths.reachability(table, 5.0, 2, decay=1.0, min_width=0.9, paths=5)
  assert (hard["reached"], hard["stopped_at"]) == (0, [0] * 5)  # as the search above
  minimum = search.minimum_widths(table, 0.25)
  for k, name in enumerate(table.group_names):
    widths = list(table.full_widths)
    widths[k] = minimum[k]
    assert easy["one_group_at_minimum"][name] == pytest.approx(
        table.predict(table.full_widths) / table.predict(widths), abs=1e-4)
  # a path trims one group per iteration and ends within the last budget
  plan = schedule.Schedule.for_final(1.4, 3, 0.9)
  for seed in range(3):
    done, widths = compactnet_paths.random_path(table, plan, minimum,
                                                np.random.default_rng(seed))
    assert done == 3 and table.speedup(widths) >= plan.final_speedup
    assert 1 <= sum(w < f for w, f in zip(widths, table.full_widths)) <= 3


def test_origins_compose_over_reorders_and_trimmed_channels_stay_trimmed():
  """Two reorders in a row (the first at half widths, which sorts only the
  first half, the second at full widths, which moves the rest): each
  position's origin is the index its channel had in the first variables (its
  importance follows it there, and those variables reordered by the origins
  are the result); and a reorder at widths keeps exactly the channels within
  them in front, however important a channel beyond them is."""
  arch = _toy()
  variables = _variables(arch, seed=3)
  groups = spec.prunable_groups(arch)
  scores = trimming.importance(arch, variables)
  full = [g.size for g in groups]
  widths = [max(1, size // 2) for size in full]
  first = trimming.order_by_importance(arch, variables, widths)
  second = trimming.order_by_importance(arch, first.variables, full, first.origin)
  after = trimming.importance(arch, second.variables)
  for g in groups:
    np.testing.assert_allclose(after[g.id], scores[g.id][second.origin[g.id]], rtol=1e-5)
    assert sorted(second.origin[g.id]) == list(range(g.size))  # a permutation of the first
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               trimming.reorder(arch, variables, second.origin), second.variables)
  # at widths below a group's size, only the channels within them are ranked
  tail = {g.id: scores[g.id][w:].max() > scores[g.id][:w].min() for g, w in zip(groups, widths)}
  assert any(tail.values()), "the check needs an important channel beyond the widths"
  kept = trimming.order_by_importance(arch, variables, widths)
  for g, w in zip(groups, widths):
    assert sorted(kept.origin[g.id][:w]) == list(range(w)), g.name


def test_a_target_is_reachable_up_to_every_group_at_its_minimum():
  """The check reads the schedule's final speed-up, which lies below T_init
  (Table 3's 2.0 / 24 / 0.96 gives 1.48x): a target between the two is met."""
  table = _toy_table(_toy())
  minimum = search.minimum_widths(table, 0.25)
  best = search.best_reachable_speedup(table, minimum)
  below = schedule.Schedule.for_final(best * 0.99, 3, 0.9)
  assert below.final_speedup < best < below.t_init
  search.check_reachable(table, minimum, below)
  with pytest.raises(ValueError, match=rf"min_width: .* predicts {best:.3f}x, below the target"):
    search.check_reachable(table, minimum, schedule.Schedule.for_final(best * 1.01, 3, 0.9))


def test_minimum_widths_must_be_fractions():
  table = _toy_table(_toy())
  with pytest.raises(ValueError, match=r"min_width\['layers.0'\] must be a fraction"):
    search.minimum_widths(table, 0.0)


_RESUME_SCRIPT = """
import sys, time, numpy as np
sys.path.insert(0, {tests!r})
from test_compactnet import _toy, _toy_table, _oracle, _variables
from dynscale.compactnet import schedule, search
arch = _toy(); table = _toy_table(arch)
score, fine_tune = _oracle(arch, table)
def slow(v, core, seed):
  time.sleep(float(sys.argv[2]))
  return fine_tune(v, core, seed)
search.search(arch, {{**_variables(arch), "tag": np.asarray(0.0, np.float32)}}, table,
              schedule.Schedule.for_final(1.4, 3, 0.9), fine_tune=slow, score=score,
              workdir=sys.argv[1])
"""


def test_a_search_killed_mid_way_resumes_to_the_same_history(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_RESUME_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run([sys.executable, str(script), str(straight), "0"], cwd=ROOT, env=env,
                 check=True, capture_output=True)
  process = subprocess.Popen([sys.executable, str(script), str(killed), "0.3"], cwd=ROOT,
                             env=env, stderr=subprocess.DEVNULL)
  history = killed / search.HISTORY_FILE
  deadline = time.time() + 120
  while time.time() < deadline and process.poll() is None:
    if history.exists() and json.loads(history.read_text())["iterations"] and \
        json.loads(history.read_text())["iterations"][0]["candidates"]:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the search finished before it could be killed"
  partial = json.loads(history.read_text())
  assert not all(r["done"] for r in partial["iterations"])
  subprocess.run([sys.executable, str(script), str(killed), "0"], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  assert json.loads(history.read_text()) == json.loads((straight / search.HISTORY_FILE).read_text())


def test_a_search_with_other_settings_is_refused_not_resumed(tmp_path):
  """A workdir holds one search: rerun with another schedule, table or
  minimum width, the search stops, naming the history, instead of resuming
  the other one's iterations."""
  _toy_search(tmp_path, schedule.Schedule.for_final(1.4, 3, 0.9))
  for plan, options in ((schedule.Schedule.for_final(1.4, 4, 0.9), {}),
                        (schedule.Schedule.for_final(1.4, 3, 0.9), {"min_width": 0.5})):
    with pytest.raises(ValueError, match=r"history.json is a search with other settings"):
      _toy_search(tmp_path, plan, **options)


class _Killed(BaseException):
  """A kill at a chosen point of the search (not an Exception: nothing catches it)."""


def test_a_search_killed_between_its_last_two_writes_of_an_iteration_resumes_the_same(
    tmp_path, monkeypatch):
  """The one point the kill above cannot aim at: after an iteration's chosen
  model is saved and before its history says so. Rerun, the search must
  still record the candidate it chose (the catch-up of the retraining
  counts the choices)."""
  plan = schedule.Schedule.for_final(1.4, 3, 0.9)

  def run(workdir):
    return _toy_search(workdir, plan).history

  straight = run(tmp_path / "straight")
  assert straight["iterations"][0]["chosen"] is not None
  real_write = search.write_json_atomic

  def killed_when_done(path, obj):
    if obj["iterations"] and obj["iterations"][0]["done"]:
      raise _Killed
    real_write(path, obj)
  monkeypatch.setattr(search, "write_json_atomic", killed_when_done)
  with pytest.raises(_Killed):
    run(tmp_path / "killed")
  monkeypatch.setattr(search, "write_json_atomic", real_write)
  assert run(tmp_path / "killed") == straight


def test_a_search_resumed_with_other_candidate_settings_is_refused(tmp_path):
  """The candidates' fine-tune and score settings are kept with the history: a
  rerun with other ones (e.g. more fine-tune steps, which the retraining's
  catch-up counts) is refused, the same ones resume, and a history written
  before they were kept resumes. Catches them left out of the settings."""
  plan = schedule.Schedule.for_final(1.4, 3, 0.9)
  first = _toy_search(tmp_path, plan, candidate_settings={"finetune_steps": 5})
  with pytest.raises(ValueError, match=r"search with other settings .*'finetune_steps': 5"):
    _toy_search(tmp_path, plan, candidate_settings={"finetune_steps": 6})
  assert _toy_search(tmp_path, plan,
                     candidate_settings={"finetune_steps": 5}).history == first.history
  path = tmp_path / search.HISTORY_FILE
  older = json.loads(path.read_text())
  del older["settings"]["candidates"]
  path.write_text(json.dumps(older))
  assert _toy_search(tmp_path, plan,
                     candidate_settings={"finetune_steps": 5}).history == first.history


def test_a_rerun_whose_best_candidate_scores_less_continues_from_the_one_it_chose(
    tmp_path, monkeypatch):
  """Killed after the best candidate's variables are saved and before its
  history entry, and rerun with a fine-tune that is not bit-reproducible (on a
  GPU): that candidate now scores less and the history chooses another. The
  run must continue from the candidate it chose, not from the file's (another
  group trimmed). Catches the stale file taken as the chosen model."""
  plan = schedule.Schedule.for_final(1.4, 3, 0.9)
  arch = _toy()
  table = _toy_table(arch)
  groups = trimming.trimmable_groups(arch)
  score, fine_tune = _oracle(arch, table)
  rerun = [False]

  def tuned(variables, core, seed):   # records which candidate a model is
    return {**fine_tune(variables, core, seed), "core": np.asarray(core, np.float32)}

  def scored(variables, core):   # group 2's candidate scores less the second time
    trimmed_2 = core[groups[2].index] != groups[2].size
    return score(variables, core) - (0.02 if rerun[0] and trimmed_2 else 0.0)
  variables = {**_variables(arch), "tag": np.asarray(0.0, np.float32),
               "core": np.zeros(len(spec.prunable_groups(arch)), np.float32)}
  real_write = search.write_json_atomic

  def killed_at_group_2s_entry(path, obj):
    if obj["iterations"] and len(obj["iterations"][0]["candidates"]) == 3:
      raise _Killed
    real_write(path, obj)
  run = lambda: search.search(arch, variables, table, plan, fine_tune=tuned, score=scored,
                              workdir=str(tmp_path))
  monkeypatch.setattr(search, "write_json_atomic", killed_at_group_2s_entry)
  with pytest.raises(_Killed):
    run()
  monkeypatch.setattr(search, "write_json_atomic", real_write)
  rerun[0] = True
  result = run()
  first = result.history["iterations"][0]
  chosen = first["candidates"][first["chosen"]]
  assert chosen["group"] != groups[2].name   # the rerun chose another candidate
  assert first["widths"] == chosen["widths"]
  assert result.history["iterations"][1]["start_widths"] == chosen["widths"]


def test_each_estimator_and_the_spread_by_hand(monkeypatch):
  """Ten runs of 1 to 10 ms (a clock that the runs themselves advance): median
  5.5 ms, minimum 1, 10% quantile 1.9 (between the first two, linearly),
  spread (7.75 - 3.25) / 5.5."""
  clock = [0.0]
  durations = iter([5, 1, 9, 3, 7, 2, 8, 4, 6, 10] * 3)
  monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

  def run():
    clock[0] += next(durations) * 1e-3
  for estimator, expected in (("median", 5.5), ("min", 1.0), ("q10", 1.9)):
    stats = timing.interleaved_latencies({"a": run}, warmup=0, repeats=10, estimator=estimator)
    assert stats["a"]["latency_s"] == pytest.approx(expected * 1e-3), estimator
    assert stats["a"]["median_s"] == pytest.approx(5.5e-3)
    assert stats["a"]["spread"] == pytest.approx((7.75 - 3.25) / 5.5)
  with pytest.raises(ValueError, match="warmup >= 0"):
    timing.interleaved_latencies({"a": run}, warmup=-1)


def test_interleaved_rounds_time_bursts_and_name_their_estimator():
  calls = []

  def candidate(name):
    return lambda: calls.append(name)
  stats = timing.interleaved_latencies({"a": candidate("a"), "b": candidate("b")}, warmup=1,
                                       repeats=2, burst=3, estimator="min")
  # warm-up once each, then per round every candidate `burst` times back to back
  assert calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2
  assert set(stats["a"]) == {"median_s", "latency_s", "spread"}
  assert stats["a"]["latency_s"] <= stats["a"]["median_s"]
  with pytest.raises(ValueError, match="estimator must be one of"):
    timing.interleaved_latencies({"a": candidate("a")}, estimator="mean")
