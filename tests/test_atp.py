"""Tests for dynscale.tesla.atp: ATP profile projections (TESLA paper 000, §3.4)."""

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dynscale.tesla import atp


def clip_by_hand(gamma):
  """The paper's clip as a loop: cap each coefficient by its predecessor."""
  out = [float(gamma[0])]
  for value in gamma[1:]:
    out.append(min(float(value), out[-1]))
  return np.array(out)


def brute_force_projection(y):
  """Exact non-increasing isotonic regression by enumerating contiguous blocks.

  The optimum is constant on contiguous blocks and equal to the block mean
  there, so trying every partition into blocks and keeping the best feasible
  candidate is exact.
  """
  y = np.asarray(y, dtype=np.float64)
  n = y.size
  best, best_cost = None, np.inf
  for cuts in itertools.product([False, True], repeat=n - 1):
    bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
    candidate = np.concatenate([
        np.full(b - a, y[a:b].mean()) for a, b in zip(bounds, bounds[1:])])
    if np.all(np.diff(candidate) <= 1e-12):
      cost = np.sum((candidate - y) ** 2)
      if cost < best_cost:
        best, best_cost = candidate, cost
  return best


def pava_by_hand(y):
  """Pool-adjacent-violators for a non-increasing fit, as a plain loop."""
  blocks = []  # [sum, count]
  for value in np.asarray(y, dtype=np.float64):
    blocks.append([value, 1])
    while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
      total, count = blocks.pop()
      blocks[-1][0] += total
      blocks[-1][1] += count
  return np.concatenate([np.full(c, s / c) for s, c in blocks])


def assert_nonincreasing(x, atol=0.0):
  assert np.all(np.diff(np.asarray(x, dtype=np.float64)) <= atol), x


# --------------------------------------------------------------------------
# Pure projections
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_clip_matches_hand_loop(n):
  gamma = np.random.default_rng(n).normal(size=n).astype(np.float32)
  out = atp.clip_nonincreasing(jnp.asarray(gamma))
  np.testing.assert_array_equal(np.asarray(out), clip_by_hand(gamma).astype(np.float32))


@pytest.mark.parametrize("method", ["clip", "isotonic"])
@pytest.mark.parametrize("seed", range(5))
def test_projections_are_nonincreasing(method, seed):
  rng = np.random.default_rng(seed)
  gamma = jnp.asarray(rng.normal(size=64) + np.linspace(-2.0, 2.0, 64), jnp.float32)
  out = atp.projection(method)(gamma)
  assert out.shape == gamma.shape and out.dtype == gamma.dtype
  assert_nonincreasing(out)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_isotonic_matches_brute_force(n):
  rng = np.random.default_rng(10 + n)
  for trial in range(40):
    # Half the trials draw small integers so ties and equal blocks occur.
    y = rng.integers(-2, 3, size=n) if trial % 2 else rng.normal(size=n)
    y = np.asarray(y, np.float64)
    out = atp.isotonic_nonincreasing(jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), brute_force_projection(y), atol=1e-5)


@pytest.mark.parametrize("n", [17, 64])
def test_isotonic_matches_pava(n):
  y = np.random.default_rng(n).normal(size=n) + np.linspace(-1.0, 1.0, n)
  out = atp.isotonic_nonincreasing(jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(np.asarray(out), pava_by_hand(y), atol=1e-5)


def test_isotonic_is_idempotent_and_fixes_feasible_profiles():
  y = jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)
  once = atp.isotonic_nonincreasing(y)
  np.testing.assert_allclose(atp.isotonic_nonincreasing(once), once, atol=1e-6)
  harmonic = 1.0 / jnp.arange(1, 65, dtype=jnp.float32)
  np.testing.assert_allclose(atp.isotonic_nonincreasing(harmonic), harmonic, rtol=1e-6)
  np.testing.assert_array_equal(atp.clip_nonincreasing(harmonic), harmonic)


def test_isotonic_is_closer_than_clip():
  y = np.random.default_rng(3).normal(size=64)
  iso = np.asarray(atp.isotonic_nonincreasing(jnp.asarray(y, jnp.float32)))
  clip = np.asarray(atp.clip_nonincreasing(jnp.asarray(y, jnp.float32)))
  assert np.sum((iso - y) ** 2) <= np.sum((clip - y) ** 2) + 1e-6


def dykstra_with_floor(y, floor, iterations=300):
  """Projection onto {non-increasing} ∩ {x >= floor} by Dykstra's algorithm."""
  x = np.asarray(y, np.float64)
  p = np.zeros_like(x)
  q = np.zeros_like(x)
  for _ in range(iterations):
    z = brute_force_projection(x + p)
    p = x + p - z
    x = np.maximum(z + q, floor)
    q = z + q - x
  return x


@pytest.mark.parametrize("seed", range(4))
def test_isotonic_with_floor_is_exact_bounded_projection(seed):
  y = np.random.default_rng(seed).normal(size=4)
  out = atp.projection("isotonic", min_value=0.1)(jnp.asarray(y, jnp.float32))
  assert np.all(np.asarray(out) >= np.float32(0.1))
  np.testing.assert_allclose(np.asarray(out), dykstra_with_floor(y, 0.1), atol=1e-5)


def test_clip_with_floor():
  y = np.array([1.0, 1.2, 0.5, -0.3, 0.4], np.float32)
  out = atp.projection("clip", min_value=0.0)(jnp.asarray(y))
  np.testing.assert_array_equal(np.asarray(out), np.maximum(clip_by_hand(y), 0.0))


@pytest.mark.parametrize("method", ["clip", "isotonic"])
def test_projection_jits(method):
  y = jnp.asarray(np.random.default_rng(5).normal(size=64), jnp.float32)
  project = atp.projection(method, min_value=-0.5)
  np.testing.assert_allclose(jax.jit(project)(y), project(y), atol=1e-6)


def test_isotonic_keeps_low_precision_dtype():
  y = jnp.asarray([0.5, 1.0, 0.25], jnp.bfloat16)
  out = atp.isotonic_nonincreasing(y)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), [0.75, 0.75, 0.25])


def test_projection_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"one of \('clip', 'isotonic'\)"):
    atp.projection("sort")
  with pytest.raises(ValueError, match=r"one of \('clip', 'isotonic'\)"):
    atp.project_nonincreasing("sort")
  with pytest.raises(ValueError, match="min_value"):
    atp.projection("clip", min_value=float("nan"))
  with pytest.raises(ValueError, match="1-D"):
    atp.isotonic_nonincreasing(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="1-D"):
    atp.clip_nonincreasing(jnp.ones(()))
  with pytest.raises(ValueError, match="names"):
    atp.name_mask()
  with pytest.raises(ValueError, match="min_value"):
    atp.projection("clip", min_value=float("inf"))
  with pytest.raises(ValueError, match="1-D"):
    atp.isotonic_nonincreasing(jnp.ones((0,)))
  for period in (0, -1):
    with pytest.raises(ValueError, match=f"period must be >= 1 and phase 0 or 1, got {period}"):
      atp.alternating(optax.sgd(0.1), optax.sgd(0.1), period=period, is_profile={"g": True})


def test_alternating_floors_the_profile_at_min_value():
  """ATP's profiles stay at or above ``min_value`` through the alternation: a
  profile step that would push them below lands on the floor."""
  params = {"w": jnp.asarray([0.5]), "g": jnp.asarray([1.0, 0.5, 0.2])}
  tx = atp.alternating(optax.sgd(1.0), optax.sgd(1.0), period=1, min_value=0.1,
                       is_profile={"w": False, "g": True})
  state = tx.init(params)
  grads = {"w": jnp.asarray([0.0]), "g": jnp.asarray([0.0, 0.0, 1.0])}
  for _ in range(2):  # a weights step, then a profile step
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["g"], [1.0, 0.5, 0.1], rtol=1e-6)


Layer = collections.namedtuple("Layer", ["gamma", "kernel"])  # fields: attribute path keys


def test_name_mask_selects_a_named_leaf_at_any_depth_by_key_or_attribute():
  params = {"block": {"inner": {"gamma": jnp.ones(3), "kernel": jnp.ones(2)}},
            "gamma": jnp.ones(2), "layer": Layer(jnp.ones(2), jnp.ones(3))}
  assert atp.name_mask("gamma")(params) == {
      "block": {"inner": {"gamma": True, "kernel": False}}, "gamma": True,
      "layer": Layer(True, False)}


# --------------------------------------------------------------------------
# optax transformation
# --------------------------------------------------------------------------


def make_params():
  rng = np.random.default_rng(7)
  return {
      "gamma": jnp.asarray(np.linspace(0.2, 1.0, 6), jnp.float32),  # increasing
      "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
  }


def make_grads(step):
  rng = np.random.default_rng(100 + step)
  return {"gamma": jnp.asarray(rng.normal(size=6), jnp.float32),
          "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}


@pytest.mark.parametrize("mask", [{"gamma": True, "w": False}, atp.name_mask("gamma")])
def test_chain_with_adam_projects_only_gamma(mask):
  params = make_params()
  tx = optax.chain(optax.adam(0.1), atp.project_nonincreasing("isotonic", mask))
  state = tx.init(params)
  reference = optax.adam(0.1)
  ref_params = make_params()
  ref_state = reference.init(ref_params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(4):
    grads = make_grads(t)
    # Reference: plain adam on grads, then the hand-written PAVA on gamma.
    # Adam's moments do not depend on params, so its updates are the same.
    ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
    expected_gamma = pava_by_hand(np.asarray(params["gamma"]) + np.asarray(ref_updates["gamma"]))
    expected_w = np.asarray(params["w"]) + np.asarray(ref_updates["w"])
    params, state = step(params, state, grads)
    np.testing.assert_allclose(params["gamma"], expected_gamma, atol=1e-6)
    np.testing.assert_allclose(params["w"], expected_w, rtol=1e-6, atol=1e-7)
    assert_nonincreasing(params["gamma"], atol=1e-6)


def test_clip_transformation_without_mask():
  params = {"a": jnp.array([1.0, 0.8, 0.6]), "b": jnp.array([0.3, 0.2])}
  grads = {"a": jnp.array([0.0, -0.5, 0.0]), "b": jnp.array([0.1, -0.4])}
  tx = optax.chain(optax.sgd(1.0), atp.project_nonincreasing("clip"))
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # sgd: a -> [1.0, 1.3, 0.6] -> clip [1.0, 1.0, 0.6]; b -> [0.2, 0.6] -> [0.2, 0.2].
  np.testing.assert_allclose(new["a"], [1.0, 1.0, 0.6], atol=1e-7)
  np.testing.assert_allclose(new["b"], [0.2, 0.2], atol=1e-7)


def test_transformation_needs_params_and_1d_leaves():
  params = make_params()
  tx = atp.project_nonincreasing("clip", mask={"gamma": True, "w": False})
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)
  unmasked = atp.project_nonincreasing("clip")
  with pytest.raises(ValueError, match=r"\['w'\] must be a 1-D profile"):
    unmasked.update(params, unmasked.init(params), params)


def test_state_round_trips_as_a_pytree():
  params = make_params()
  tx = optax.chain(optax.adam(0.1),
                   atp.project_nonincreasing("isotonic", {"gamma": True, "w": False},
                                             min_value=0.05))
  state = tx.init(params)
  updates, state = tx.update(make_grads(0), state, params)
  params = optax.apply_updates(params, updates)
  # What a checkpoint does: leaves out to numpy and back into the structure.
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(leaf, jax.Array) for leaf in leaves)
  restored = jax.tree.unflatten(treedef, [np.asarray(leaf) for leaf in leaves])
  a, _ = tx.update(make_grads(1), state, params)
  b, _ = tx.update(make_grads(1), restored, params)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert np.all(np.asarray(optax.apply_updates(params, a)["gamma"]) >= 0.05 - 1e-7)


def test_nnx_optimizer_projects_profile():
  class Layer(nnx.Module):

    def __init__(self):
      self.gamma = nnx.Param(jnp.ones(5))
      self.w = nnx.Param(jnp.ones((5, 2)))

  model = Layer()
  tx = optax.chain(optax.sgd(1.0), atp.project_nonincreasing("isotonic", atp.name_mask("gamma")))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  direction = jnp.array([0.4, 0.0, -0.4, 0.0, 0.0])
  loss = lambda m: jnp.sum(m.gamma[...] * direction) + 0.5 * jnp.sum(m.w[...])
  optimizer.update(model, nnx.grad(loss)(model))
  # sgd: gamma -> [0.6, 1.0, 1.4, 1.0, 1.0] -> isotonic [1.0, 1.0, 1.0, 1.0, 1.0].
  np.testing.assert_allclose(model.gamma[...], np.ones(5), atol=1e-6)
  np.testing.assert_allclose(model.w[...], np.full((5, 2), 0.5), atol=1e-7)


# --------------------------------------------------------------------------
# ATP's alternation (000 §3.4)
# --------------------------------------------------------------------------


def test_alternating_updates_weights_and_profiles_only_in_their_periods():
  """Period 2, SGD with momentum on each side, the paper's clip, checked by hand.

  Step t is in period t // 2: even periods update the weights (and their
  momentum) only, odd periods the profile (and its momentum) only, and each
  profile update lands on the running minimum of (profile + update).
  """
  lr, beta, period = 0.1, 0.9, 2
  params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "g": jnp.asarray([1.0, 0.9, 0.8, 0.7])}
  tx = atp.alternating(optax.sgd(lr, momentum=beta), optax.sgd(lr, momentum=beta),
                       period=period, is_profile={"w": False, "g": True}, method="clip")
  state = tx.init(params)
  w, g = np.asarray(params["w"], np.float64), np.asarray(params["g"], np.float64)
  trace_w, trace_g = np.zeros(3), np.zeros(4)
  rng = np.random.default_rng(3)
  clipped = 0
  for t in range(10):
    grads = {"w": jnp.asarray(rng.normal(size=3), jnp.float32),
             "g": jnp.asarray(3 * rng.normal(size=4), jnp.float32)}
    before = jax.tree.map(np.asarray, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if (t // period) % 2 == 0:
      trace_w = beta * trace_w + np.asarray(grads["w"], np.float64)
      w = w - lr * trace_w
      np.testing.assert_array_equal(params["g"], before["g"])
    else:
      trace_g = beta * trace_g + np.asarray(grads["g"], np.float64)
      moved = g - lr * trace_g
      g = np.minimum.accumulate(moved)
      clipped += int(np.any(np.diff(moved) > 0))
      np.testing.assert_array_equal(params["w"], before["w"])
    np.testing.assert_allclose(params["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["g"], g, rtol=1e-5, atol=1e-6)
  assert clipped >= 2, "the gradients must make the projection act"


@pytest.mark.parametrize("total, period", [(10, 2), (11, 2), (12, 3), (7, 1), (1, 4)])
def test_steps_in_phase_counts_each_sides_steps(total, period):
  by_hand = collections.Counter((t // period) % 2 for t in range(total))
  assert atp.steps_in_phase(total, period, 0) == by_hand[0]
  assert atp.steps_in_phase(total, period, 1) == by_hand[1]


def test_under_atp_the_weights_cosine_schedule_ends_with_the_run():
  """TESLA's optimizer with ATP, plain SGD under a cosine schedule, unit
  gradients: each weight update is minus the learning rate at that weight
  step, which falls as a cosine over the run's weight steps (every other
  period) and reaches zero at the last. Catches a schedule sized for every
  step of the run, which the alternation leaves half-way (lr/2 at the end)."""
  from dynscale.nn import models
  from dynscale.tesla import training
  from experiments.configs import tesla_main
  config = tesla_main.get_config()
  config.atp.enabled, config.atp.period_steps = True, 3
  config.optimizer.update(name="sgd", schedule="cosine", learning_rate=0.1, momentum=0.0,
                          weight_decay=0.0)
  arch = models.architecture("tesla_mlp", num_classes=10, input_shape=(4, 4, 1),
                             profile="all-one", width_multiplier=0.1)
  model = models.build(arch, rngs=models.init_rngs(0))
  params = nnx.state(model, training.ATP_TRAINABLE).to_pure_dict()
  total = 20
  tx = training.optimizer(config, total, model)
  state = tx.init(params)
  weight_lrs = []
  for t in range(total):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    kernel = -float(np.asarray(updates["layers"][1]["kernel"]).flat[0])
    if (t // 3) % 2 == 0:
      weight_lrs.append(kernel)
    else:
      assert kernel == 0.0
  n = len(weight_lrs)
  by_hand = [0.05 * (1 + np.cos(np.pi * j / n)) for j in range(n)]
  np.testing.assert_allclose(weight_lrs, by_hand, rtol=1e-5, atol=1e-7)
