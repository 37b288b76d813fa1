"""Incomplete blocks (001 §II-C/D) against the paper's sums written out in NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dynscale.nn import layers, models, sliced
from dynscale.nn.kinds import activate

RNG = np.random.default_rng(0)


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _kept(n, dp):
  return max(1, int(np.ceil(round(dp * n, 6))))


def _linear(n):
  """001 §II-B linear profile, gamma_i = 1 - i/N for i = 1..N."""
  return np.array([1 - i / n for i in range(1, n + 1)], np.float32)


def _sign(w):
  return np.where(w >= 0, 1.0, -1.0).astype(np.float32)


def _conv_same(x, f, stride=1):
  """y[b, p, q, j] = sum_{u, v, i} f[u, v, i, j] x[b, s p + u - pad, s q + v - pad, i]."""
  b, h, w, _ = x.shape
  kh, kw, _, m = f.shape
  ho, wo = -(-h // stride), -(-w // stride)
  pad_h = max((ho - 1) * stride + kh - h, 0)
  pad_w = max((wo - 1) * stride + kw - w, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  y = np.zeros((b, ho, wo, m), np.float64)
  for p in range(ho):
    for q in range(wo):
      patch = xp[:, p * stride:p * stride + kh, q * stride:q * stride + kw, :]
      y[:, p, q, :] = np.einsum("buvi,uvij->bj", patch, f)
  return y


@pytest.mark.parametrize("dp", [0.1, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("binary", [False, True])
def test_dense_block_is_the_incomplete_sum(dp, binary):
  block = layers.IDPDense(10, 4, idp=True, binary=binary, act="relu", rngs=_rngs())
  block.bias[...] = jnp.asarray(RNG.standard_normal(4), jnp.float32)
  x = RNG.standard_normal((3, 10)).astype(np.float32)
  w = np.asarray(block.kernel[...])
  w = _sign(w) if binary else w
  gamma, k = _linear(10), _kept(10, dp)
  expected = np.zeros((3, 4))
  for j in range(4):  # y_j = sum_{i<=k} gamma_i w_ji x_i (001 §II-C)
    for i in range(k):
      expected[:, j] += gamma[i] * w[i, j] * x[:, i]
  expected = np.maximum(expected + np.asarray(block.bias[...]), 0)
  np.testing.assert_allclose(block(x, dp, train=False), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dp", [0.25, 0.5, 1.0])
def test_conv_block_is_the_incomplete_sum_with_batch_norm(dp):
  block = layers.IDPConv(4, 3, 3, stride=2, idp=True, bn=True, act=None,
                         profile="harmonic", rngs=_rngs())
  mean = RNG.standard_normal(3).astype(np.float32)
  var = RNG.uniform(0.5, 2.0, 3).astype(np.float32)
  block.bn.mean[...], block.bn.var[...] = jnp.asarray(mean), jnp.asarray(var)
  x = RNG.standard_normal((2, 5, 5, 4)).astype(np.float32)
  f = np.asarray(block.kernel[...])
  k = _kept(4, dp)
  gamma = np.array([1 / i for i in range(1, 5)], np.float32)  # harmonic, 001 §II-B
  # y_j = sum_{i<=k} gamma_i (f_ji * x_i), then BN with the running statistics.
  y = sum(gamma[i] * _conv_same(x[..., i:i + 1], f[:, :, i:i + 1, :], 2) for i in range(k))
  expected = (y - mean) / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(block(x, dp, train=False), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dp", [0.34, 0.5, 1.0])
@pytest.mark.parametrize("idp_depthwise", [False, True])
def test_separable_block(dp, idp_depthwise):
  """Six channels, linear profile: the channels past k have gamma > 0 and a
  depthwise bias, so a dropped channel leaking into the pointwise sum (relu(b_i)
  of a zeroed input) shows."""
  block = layers.IDPSeparableConv(6, 5, 3, idp=True, idp_depthwise=idp_depthwise, bn=False,
                                  act="relu", rngs=_rngs())
  block.depthwise_bias[...] = jnp.asarray(np.abs(RNG.standard_normal(6)) + 0.5, jnp.float32)
  x = RNG.standard_normal((2, 4, 4, 6)).astype(np.float32)
  f = np.asarray(block.depthwise_kernel[...])
  g = np.asarray(block.kernel[...])[0, 0]
  k, gamma = _kept(6, dp), _linear(6)
  # Depthwise: h_i = relu(gamma_i (f_i * x_i) + b_i) (gamma only if idp_depthwise); then
  # IDP on the pointwise sum over i <= k.
  scale = gamma if idp_depthwise else np.ones(6)
  h = [np.maximum(scale[i] * _conv_same(x[..., i:i + 1], f[..., i:i + 1])
                  + block.depthwise_bias[i], 0) for i in range(6)]
  y = sum(gamma[i] * h[i] * g[i] for i in range(k))
  np.testing.assert_allclose(block(x, dp, train=False), np.maximum(y, 0), rtol=1e-4,
                             atol=1e-4)


def _bn(y, stats):
  """Batch norm with running statistics, eps 1e-5."""
  return ((y - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"]
          + stats["bias"])


@pytest.mark.parametrize("dp", [1.0, 0.5])
@pytest.mark.parametrize("stride, features", [(2, 5), (1, 4)])
def test_residual_block_is_he_et_als_basic_block(dp, stride, features):
  """relu(BN2(conv2(relu(BN1(conv1_s(x))))) + shortcut(x)), the 1x1 projection
  with BN when stride or width changes, else the identity; IDP's profile on
  the inputs of both 3x3 convs (catches a wrong stride, activation, batch
  norm or profile in the block's convolutions, which the masked, sliced and
  skipping paths all read from one description)."""
  arch = {"name": "one-block", "input_shape": [6, 6, 4], "num_classes": 2, "layers": [
      {"kind": "resblock", "features": features, "stride": stride, "mid_features": 3,
       "idp": True}, {"kind": "flatten"}, {"kind": "dense", "features": 2}]}
  model = models.build(arch, rngs=models.init_rngs(0))
  v = jax.tree.map(np.asarray, model.pure_variables())
  block = v["layers"][0]
  for name in [n for n in block if n.startswith(("bn", "shortcut_bn"))]:
    c = block[name]["mean"].shape[0]
    block[name] = {"mean": RNG.standard_normal(c), "var": RNG.uniform(0.5, 2.0, c),
                   "scale": RNG.uniform(0.5, 1.5, c), "bias": RNG.standard_normal(c)}
  assert ("shortcut" in block) == (stride != 1 or features != 4)
  x = RNG.standard_normal((2, 6, 6, 4)).astype(np.float32)
  k_in, k_mid = _kept(4, dp), _kept(3, dp)
  g_in, g_mid = _linear(4), _linear(3)  # the network's default profile
  f1, f2 = block["conv1"]["kernel"], block["conv2"]["kernel"]
  h = sum(g_in[i] * _conv_same(x[..., i:i + 1], f1[:, :, i:i + 1, :k_mid], stride)
          for i in range(k_in))
  h = np.maximum(_bn(h, {k: a[:k_mid] for k, a in block["bn1"].items()}), 0)
  y = _bn(sum(g_mid[j] * _conv_same(h[..., j:j + 1], f2[:, :, j:j + 1, :], 1)
              for j in range(k_mid)), block["bn2"])
  if "shortcut" in block:
    shortcut = _bn(_conv_same(x[..., :k_in], block["shortcut"]["kernel"][:, :, :k_in], stride),
                   block["shortcut_bn"])
  else:
    shortcut = x
  expected = np.maximum(y + shortcut, 0)
  out = sliced.features_sliced(arch, v, x, dp, upto=1)
  if "shortcut" not in block:  # the tied group: the add keeps the input's k_in channels
    expected = expected[..., :k_in]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_dense_on_a_map_has_a_per_channel_profile():
  block = layers.IDPDense(2 * 2 * 4, 3, idp=True, map_shape=(2, 2, 4), rngs=_rngs())
  assert block.gamma[...].shape == (4,)
  x = RNG.standard_normal((2, 16)).astype(np.float32)
  w = np.asarray(block.kernel[...])
  k, gamma = _kept(4, 0.5), _linear(4)
  expected = np.zeros((2, 3))
  for pos in range(4):  # HWC layout: feature pos * C + c
    for c in range(k):
      expected += gamma[c] * np.outer(x[:, pos * 4 + c], w[pos * 4 + c])
  np.testing.assert_allclose(block(x, 0.5, train=False), expected, rtol=1e-5, atol=1e-5)


def test_train_mode_updates_running_stats_of_kept_channels_only():
  # flatten -> FC 6 (BN) -> IDP FC 3: at DP 0.5 the hidden group keeps 3 of 6 channels.
  arch = {"name": "t", "input_shape": [5], "num_classes": 3, "layers": [
      {"kind": "dense", "features": 6, "bn": True},
      {"kind": "dense", "features": 3, "idp": True}]}
  model = models.build(arch, rngs=_rngs())
  x = RNG.standard_normal((8, 5)).astype(np.float32)
  model(x, 0.5, train=True)
  bn = model.layers[0].bn
  h = x @ np.asarray(model.layers[0].kernel[...])
  k = _kept(6, 0.5)
  np.testing.assert_allclose(bn.mean[...][:k], 0.1 * h.mean(0)[:k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...][:k], 0.9 + 0.1 * h.var(0)[:k], rtol=1e-5)
  np.testing.assert_array_equal(bn.mean[...][k:], 0.0)
  np.testing.assert_array_equal(bn.var[...][k:], 1.0)


def _net():
  arch = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1],
                             width_multiplier=0.1)
  return models.build(arch, rngs=_rngs())


def test_train_is_a_required_keyword():
  model = _net()
  x = jnp.zeros((2, 28, 28, 1))
  with pytest.raises(TypeError, match="train"):
    model(x, 0.5)
  with pytest.raises(ValueError, match="train must be True or False"):
    model(x, 0.5, train=None)


def test_profile_is_not_a_param():
  model = _net()
  gamma = model.layers[2].gamma
  assert isinstance(gamma, layers.Profile)
  before = np.asarray(gamma[...])
  np.testing.assert_allclose(before, _linear(10))
  x = RNG.standard_normal((4, 28, 28, 1)).astype(np.float32)
  labels = jnp.arange(4)

  def loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x, 0.5, train=True), labels).mean()

  weights = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  weights.update(model, nnx.grad(loss)(model))
  np.testing.assert_array_equal(gamma[...], before)  # wrt=nnx.Param leaves gamma alone
  profile = nnx.Optimizer(model, optax.sgd(0.1), wrt=layers.Profile)
  profile.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, layers.Profile))(model))
  changed = np.asarray(gamma[...]) != before
  k = _kept(10, 0.5)
  assert changed[:k].any() and not changed[k:].any()  # ATP trains only the kept coefficients


def test_dp_is_traced_without_recompiling():
  model = _net()
  x = jnp.zeros((2, 28, 28, 1))
  traces = []

  @nnx.jit
  def run(m, dp):
    traces.append(1)
    return m(x, dp, train=False)

  for dp in (0.1, 0.5, 1.0):
    run(model, jnp.float32(dp))
  assert len(traces) == 1
  with pytest.raises(ValueError, match="dp must be in"):
    model(x, 1.5, train=False)


def test_mobilenet_masked_equals_sliced():
  """S-Conv blocks at depth: the masked MobileNet (dp traced) and its sliced form give
  the same logits at every DP in eval mode, and the same logits and running statistics
  in train mode. (Gradients of S-Conv blocks: test_nn_sliced.)"""
  arch = models.architecture("mobilenet", num_classes=10, input_shape=[32, 32, 3],
                             width_multiplier=1 / 16)
  model = models.build(arch, rngs=_rngs())
  variables = model.pure_variables()
  x = RNG.standard_normal((8, 32, 32, 3)).astype(np.float32)
  fast = {"xla_backend_optimization_level": 0}
  graphdef, state = nnx.split(model)

  def masked(state, dp, train):
    m = nnx.merge(graphdef, state)
    return m(x, dp, train=train), nnx.state(m, nnx.BatchStat).to_pure_dict()

  run = jax.jit(masked, static_argnums=2, compiler_options=fast)
  for dp, train in [(0.1, False), (0.25, False), (0.5, False), (1.0, False), (0.25, True)]:
    y_m, stats_m = run(state, dp, train)
    out = jax.jit(functools.partial(sliced.apply_sliced, arch, widths=dp, train=train),
                  compiler_options=fast)(variables, x)
    y_s = out[0] if train else out
    atol = float(jnp.max(jnp.abs(y_m))) * (1e-4 if train else 1e-5)
    np.testing.assert_allclose(y_m, y_s, rtol=1e-4, atol=atol)
    if train:
      flat_m = sliced.flatten_tree(stats_m)
      for key, value in sliced.flatten_tree(out[1]).items():
        np.testing.assert_allclose(flat_m[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_block_activations_by_hand():
  y = jnp.asarray([-2.0, 0.5, 3.0, 7.5])
  np.testing.assert_array_equal(activate("relu", y), [0.0, 0.5, 3.0, 7.5])
  np.testing.assert_array_equal(activate("relu6", y), [0.0, 0.5, 3.0, 6.0])  # MobileNetV2's
  np.testing.assert_array_equal(activate(None, y), y)
