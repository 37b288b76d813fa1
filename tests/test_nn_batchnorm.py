"""Batch norm at reduced width: shared vs recalibrated statistics (DESIGN invariant 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynscale.nn import batchnorm, models, sliced, spec

EPS = 1e-5

ARCH = {"name": "bn_mlp", "input_shape": [6], "num_classes": 3, "profile": "linear",
        "layers": [{"kind": "dense", "features": 8, "bn": True, "act": "relu"},
                   {"kind": "dense", "features": 8, "bn": True, "act": "relu", "idp": True},
                   {"kind": "dense", "features": 3, "idp": True}]}


def _model():
  model = models.build(ARCH, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  rng = np.random.default_rng(5)
  for i in (0, 1):  # non-trivial affine parameters
    model.layers[i].bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    model.layers[i].bn.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
  return model


def _batches(sizes=(5, 3, 4)):
  rng = np.random.default_rng(1)
  return [rng.standard_normal((n, 6)).astype(np.float32) + 0.5 for n in sizes]


def _linear(n):
  return np.array([1 - i / n for i in range(1, n + 1)])


def _by_hand(model, dp, batches):
  """Precise BN by hand: pool E[h] and E[h^2] of every BN input over all samples."""
  v = jax.tree.map(lambda a: np.asarray(a, np.float64), model.pure_variables())["layers"]
  k = max(1, int(np.ceil(round(dp * 8, 6))))
  sums = {0: [0, 0], 1: [0, 0]}
  for x in batches:
    h0 = x @ v[0]["kernel"][:, :k]
    a0 = (h0 - h0.mean(0)) / np.sqrt(h0.var(0) + EPS)  # train mode: batch statistics
    a0 = np.maximum(a0 * v[0]["bn"]["scale"][:k] + v[0]["bn"]["bias"][:k], 0)
    h1 = (a0 * _linear(8)[:k]) @ v[1]["kernel"][:k, :k]
    for i, h in ((0, h0), (1, h1)):
      sums[i][0] = sums[i][0] + h.sum(0)
      sums[i][1] = sums[i][1] + (h * h).sum(0)
  count = sum(len(x) for x in batches)
  out = {}
  for i in (0, 1):
    mean = sums[i][0] / count
    out[i] = (mean, sums[i][1] / count - mean ** 2)
  return out, k


def _assert_recalibrated(stats, expected, k, own):
  """The first ``k`` channels of both batch norms hold the precise statistics
  ``expected``; the channels not computed keep the model's own ``own``."""
  for i in (0, 1):
    mean, var = expected[i]
    bn = stats["layers"][i]["bn"]
    np.testing.assert_allclose(bn["mean"][:k], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn["var"][:k], var, rtol=1e-4, atol=1e-5)
    for leaf in ("mean", "var"):
      np.testing.assert_array_equal(bn[leaf][k:], own["layers"][i]["bn"][leaf][k:])


@pytest.mark.parametrize("dp", [0.25, 0.5, 1.0])
def test_recalibrate_is_precise_batch_norm(dp):
  model = _model()
  own = jax.tree.map(np.asarray, sliced.bn_stats_of(model.pure_variables()))
  batches = _batches()
  stats = batchnorm.recalibrate(model, dp, batches)
  expected, k = _by_hand(model, dp, batches)
  _assert_recalibrated(stats, expected, k, own)
  # The first layer's inputs do not depend on batch norm: its statistics are the
  # population mean / variance of x W over all samples.
  h0 = np.concatenate(batches) @ np.asarray(model.pure_variables()["layers"][0]["kernel"])
  np.testing.assert_allclose(stats["layers"][0]["bn"]["var"][:k], h0.var(0)[:k], rtol=1e-4)
  # The model itself is untouched.
  for a, b in zip(jax.tree.leaves(sliced.bn_stats_of(model.pure_variables())),
                  jax.tree.leaves(own), strict=True):
    np.testing.assert_array_equal(a, b)


def test_recalibrated_statistics_differ_by_dp():
  model = _model()
  by_dp = {dp: batchnorm.recalibrate(model, dp, [(x, None) for x in _batches()])
           for dp in (0.25, 1.0)}
  a = by_dp[0.25]["layers"][1]["bn"]["mean"][:2]
  b = by_dp[1.0]["layers"][1]["bn"]["mean"][:2]
  assert np.max(np.abs(a - b)) > 1e-3
  own = model.pure_variables()["layers"][1]["bn"]["mean"][:2]
  assert np.max(np.abs(a - own)) > 1e-3


def test_per_dp_statistics_are_used():
  model = _model()
  x = _batches((4,))[0]
  stats = batchnorm.recalibrate(model, 0.5, _batches())
  arch, variables = model.arch, model.pure_variables()
  shared = sliced.apply_sliced(arch, variables, x, 0.5)
  recal = sliced.apply_sliced(arch, variables, x, 0.5, bn_stats=stats)
  assert np.max(np.abs(shared - recal)) > 1e-3
  # By hand, eval mode with the recalibrated statistics.
  v = jax.tree.map(np.asarray, variables)["layers"]
  s = jax.tree.map(np.asarray, stats)["layers"]
  h = x @ v[0]["kernel"][:, :4]
  h = (h - s[0]["bn"]["mean"][:4]) / np.sqrt(s[0]["bn"]["var"][:4] + EPS)
  h = np.maximum(h * v[0]["bn"]["scale"][:4] + v[0]["bn"]["bias"][:4], 0)
  h = (h * _linear(8)[:4]) @ v[1]["kernel"][:4, :4]
  h = (h - s[1]["bn"]["mean"][:4]) / np.sqrt(s[1]["bn"]["var"][:4] + EPS)
  h = np.maximum(h * v[1]["bn"]["scale"][:4] + v[1]["bn"]["bias"][:4], 0)
  logits = (h * _linear(8)[:4]) @ v[2]["kernel"][:4] + v[2]["bias"]
  np.testing.assert_allclose(recal, logits, rtol=1e-4, atol=1e-5)
  # The same statistics through a SlicedModel, and a masked copy carrying them.
  runner = sliced.SlicedModel(arch, variables, {0.5: stats})
  np.testing.assert_allclose(runner(x, 0.5), recal, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(runner(x, 1.0), sliced.apply_sliced(arch, variables, x, 1.0),
                             rtol=1e-5, atol=1e-6)
  masked = models.build(arch, rngs=models.init_rngs(1))
  nnx.update(masked.layers, nnx.State(sliced.merge_variables(variables, stats)["layers"]))
  np.testing.assert_allclose(masked(x, 0.5, train=False), recal, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model(x, 0.5, train=False), shared, rtol=1e-5, atol=1e-6)


def test_bad_batches():
  model = _model()
  with pytest.raises(ValueError, match="empty"):
    batchnorm.recalibrate(model, 0.5, [])
  with pytest.raises(ValueError, match="IDPNet, a SlicedModel"):
    batchnorm.recalibrate("model", 0.5, _batches())


def test_recalibrated_statistics_survive_export(tmp_path):
  model = _model()
  stats = {dp: batchnorm.recalibrate(model, dp, _batches()) for dp in (0.25, 0.5)}
  runner = sliced.SlicedModel.from_model(model, stats)
  sliced.export(runner, tmp_path / "net")
  loaded = sliced.load(tmp_path / "net")
  assert sorted(loaded.bn_stats_by_dp) == [0.25, 0.5]
  x = _batches((3,))[0]
  for dp in (0.25, 0.5, 1.0):
    np.testing.assert_allclose(loaded(x, dp), runner(x, dp), rtol=1e-6)


def test_variables_held_as_numpy_arrays_recalibrate_as_the_model():
  """An ``(arch, variables)`` pair whose variables are NumPy arrays (e.g. read
  from an ``.npz``) recalibrates to the model's statistics. Catches the
  statistics updated with JAX's ``.at`` on NumPy arrays (it raised)."""
  model = _model()
  held = (model.arch, jax.tree.map(np.asarray, model.pure_variables()))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               batchnorm.recalibrate(held, 0.5, _batches()),
               batchnorm.recalibrate(model, 0.5, _batches()))


def test_numpy_variables_train_through_the_sliced_path_as_device_arrays():
  """``apply_sliced(..., train=True)`` on variables held as NumPy arrays (an
  ``.npz``) gives the logits and running statistics it gives on device
  arrays. Catches the statistics scattered back with ``.at`` on a NumPy
  array (it raised AttributeError)."""
  model = _model()
  variables = model.pure_variables()
  x = _batches((3,))[0]
  on_device = sliced.apply_sliced(model.arch, variables, x, 0.5, train=True)
  held = sliced.apply_sliced(model.arch, jax.tree.map(np.asarray, variables), x, 0.5,
                             train=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), held, on_device)


def test_a_trimmed_export_at_a_dp_runs_with_that_dps_statistics(tmp_path):
  """``export(widths=dp)`` of a network with recalibrated statistics gives its
  logits at that DP, read with that DP's statistics. Catches the trimmed
  network carrying the shared statistics (0.57 off at 50% on a probe)."""
  model = _model()
  runner = sliced.SlicedModel.from_model(model, {0.5: batchnorm.recalibrate(model, 0.5,
                                                                            _batches())})
  x = _batches((3,))[0]
  trimmed = sliced.load(sliced.export(runner, tmp_path / "half", widths=0.5))
  assert not np.allclose(runner(x, 0.5), sliced.SlicedModel.from_model(model)(x, 0.5),
                         atol=1e-3)   # the statistics matter here
  np.testing.assert_allclose(trimmed(x, 1.0), runner(x, 0.5), rtol=1e-5, atol=1e-6)


def test_masked_recalibration_is_precise_batch_norm_with_one_compile():
  model = _model()
  own = jax.tree.map(np.asarray, sliced.bn_stats_of(model.pure_variables()))
  batches = _batches()
  for dp in (0.25, 0.5, 1.0):
    widths = jnp.asarray(spec.widths_at_dp(model.arch, dp))
    stats = batchnorm.recalibrate_masked(model, widths, batches)
    expected, k = _by_hand(model, dp, batches)
    _assert_recalibrated(stats, expected, k, own)
  moments, _ = batchnorm._masked_moments(model.arch_json, "float32")
  # the widths are traced: one executable per batch shape, whatever the widths
  assert moments._cache_size() == len({len(x) for x in batches})


def test_a_numpy_float_dp_is_a_dp():
  """A DP given as a NumPy float (what a config or a sweep over ``np.linspace``
  gives) picks the per-DP statistics and the MP-IDP profile as a Python float
  does. Catches a DP test of ``isinstance(widths, float)`` (``np.float32`` is
  none), which ran the shared statistics, or raised on an MP-IDP network, and
  statistics looked up by exact value (``float(np.float32(0.3))`` is not 0.3)."""
  model = _model()
  stats = {0.3: batchnorm.recalibrate(model, 0.3, _batches())}
  runner = sliced.SlicedModel.from_model(model, stats)
  x = _batches((3,))[0]
  assert not np.allclose(runner(x, 0.3), model(x, 0.3, train=False), atol=1e-3)
  for dp in (np.float32(0.3), np.float64(0.3)):
    np.testing.assert_allclose(runner(x, dp), runner(x, 0.3), rtol=1e-6)
  arch = {**ARCH, "profiles": [[0, 0.5], [0.5, 1]]}
  mp = models.build(arch, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  variables = mp.pure_variables()
  for dp in (0.25, 0.75):
    expected = sliced.apply_sliced(arch, variables, x, dp)
    np.testing.assert_allclose(sliced.apply_sliced(arch, variables, x, np.float32(dp)),
                               expected, rtol=1e-6)
    np.testing.assert_allclose(mp(x, dp, train=False), expected, rtol=1e-5, atol=1e-6)
    by_float = batchnorm.recalibrate(mp, dp, _batches())
    by_numpy = batchnorm.recalibrate(mp, np.float32(dp), _batches())
    jax.tree.map(np.testing.assert_array_equal, by_numpy, by_float)
