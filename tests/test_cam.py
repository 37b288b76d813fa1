"""Class activation maps (dynscale.cam): TESLA §4.2 / Zhou et al. 2016 Eq. 1 under IDP.

The CAM identity is checked against the network's own logits from the sliced
forward (apply_sliced), and the maps against a hand-written numpy sum
``CAM_c(x, y) = sum_{i<k} gamma_i W_ic F_i(x, y)`` with ``k = ceil(dp * C)``
worked out here; the upsampling against a hand-written half-pixel bilinear
interpolation. Variables are random (non-trivial batch-norm statistics,
profile and bias) so every term matters.
"""

import math

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from dynscale import cam
from dynscale.nn import models, sliced, spec

FAST = {"xla_backend_optimization_level": 0}  # compile speed for tests only
NUM_CLASSES = 10
BATCH = 2
LAST_WIDTH = 32  # 512 / 16: channels of the last conv at width_multiplier 1/16

# A small CAM network with a separable conv and a complete (non-IDP) classifier.
SCONV_CAM = {
    "name": "sconv_cam", "input_shape": [8, 8, 3], "num_classes": 5, "profile": "harmonic",
    "layers": [
        {"kind": "conv", "features": 4},
        {"kind": "sconv", "features": 6, "idp": True, "idp_depthwise": True},
        {"kind": "global_avgpool"},
        {"kind": "dense", "features": 5},
    ]}


def _random_variables(arch, seed):
  """Random He-scaled kernels, decreasing profiles, random BN statistics and biases."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = path[-1].key
    if name in ("kernel", "depthwise_kernel"):
      return rng.normal(size=shape) * math.sqrt(2 / np.prod(shape[:-1]))
    if name in ("gamma", "depthwise_gamma"):
      return np.sort(rng.uniform(0.2, 1.0, shape))[::-1]
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0, 0.3, shape)  # bn bias, bn mean, layer bias

  shapes = sliced.variable_shapes(arch)
  tree = jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@pytest.fixture(scope="module")
def vgg():
  arch = models.architecture("vgg16_gap", num_classes=NUM_CLASSES, input_shape=(32, 32, 3),
                             width_multiplier=1 / 16)
  x = jax.random.normal(jax.random.key(1), (BATCH, 32, 32, 3))
  return arch, _random_variables(arch, 0), x


def _jit(fn, *args):
  return jax.jit(fn, compiler_options=FAST)(*args)


def _bilinear_numpy(a, size):
  """Half-pixel-centre bilinear resize of (h, w) -> (size, size), edges clamped."""
  def axis(n_in):
    src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo
  (r0, r1, fr), (c0, c1, fc) = axis(a.shape[0]), axis(a.shape[1])
  out = np.zeros((size, size))
  for i in range(size):
    for j in range(size):
      top = a[r0[i], c0[j]] * (1 - fc[j]) + a[r0[i], c1[j]] * fc[j]
      bottom = a[r1[i], c0[j]] * (1 - fc[j]) + a[r1[i], c1[j]] * fc[j]
      out[i, j] = top * (1 - fr[i]) + bottom * fr[i]
  return out


def test_the_zoo_vgg16_gap_has_a_cam_head():
  arch = models.architecture("vgg16_gap", num_classes=NUM_CLASSES, input_shape=(32, 32, 3),
                             width_multiplier=1 / 16)
  kinds = [layer["kind"] for layer in arch["layers"]]
  assert kinds.count("conv") == 13 and kinds.count("maxpool") == 3
  assert kinds[-2:] == ["global_avgpool", "dense"]
  head = arch["layers"][-1]
  assert head["idp"] and not head["bn"] and head["act"] is None
  assert head["features"] == NUM_CLASSES
  # 32x32 after three 2x2 pools: a 4x4 map of the last conv's 512/16 channels.
  gap = spec.plan(arch, 1.0)[-2]
  assert gap.inputs == spec.Feature(4, 4, LAST_WIDTH, False)
  assert [layer["features"] for layer in arch["layers"] if layer["kind"] == "conv"] == [
      4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]


@pytest.mark.parametrize("dp", [0.1, 0.5, 1.0])
def test_cam_identity_and_eq1_vgg(vgg, dp):
  arch, variables, x = vgg
  k = math.ceil(dp * LAST_WIDTH)
  gap_index = len(arch["layers"]) - 2

  def run(v, x):
    maps, bias = cam.class_maps(arch, v, x, dp)
    features = sliced.features_sliced(arch, v, x, dp, gap_index)
    return maps, bias, features, sliced.apply_sliced(arch, v, x, dp)

  maps, bias, features, logits = map(np.asarray, _jit(run, variables, x))
  assert maps.shape == (BATCH, 4, 4, NUM_CLASSES)
  assert features.shape == (BATCH, 4, 4, k)
  assert np.abs(logits).max() > 0.1  # the identity below is not about zeros
  # CAM identity: mean over (x, y) of the map + bias = the network's logit.
  np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, logits, atol=1e-5, rtol=0)
  # Eq. 1 on the incomplete dot product, by hand with the first k channels.
  head = variables["layers"][len(arch["layers"]) - 1]
  gamma, w = np.asarray(head["gamma"]), np.asarray(head["kernel"])
  expected = np.zeros_like(maps)
  for c in range(NUM_CLASSES):
    for i in range(k):
      expected[..., c] += gamma[i] * w[i, c] * features[..., i]
  np.testing.assert_allclose(maps, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(bias, np.asarray(head["bias"]), atol=0)


# A binarized classifier (CAM reads sign(W)), and an MP-IDP network (each profile
# its own classifier: DP 0.34 reads profile 0's, 1.0 profile 1's).
BINARY_HEAD_CAM = {**SCONV_CAM, "name": "binary_head_cam", "layers": [
    *SCONV_CAM["layers"][:-1], {"kind": "dense", "features": 5, "binary": True}]}
MP_IDP_CAM = {**SCONV_CAM, "name": "mp_idp_cam", "profiles": [[0, 0.5], [0.5, 1]], "layers": [
    *SCONV_CAM["layers"][:-1], {"kind": "dense", "features": 5, "idp": True}]}


@pytest.mark.parametrize("network", [SCONV_CAM, BINARY_HEAD_CAM, MP_IDP_CAM],
                         ids=lambda a: a["name"])
@pytest.mark.parametrize("dp", [0.34, 1.0])
def test_cam_identity_complete_binary_and_mp_idp_classifiers(dp, network):
  arch = spec.validate_architecture(network)
  variables = _random_variables(arch, 3)
  x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))

  def run(v, x):
    return (*cam.class_activation_maps(arch, v, x, dp), *cam.class_maps(arch, v, x, dp),
            sliced.apply_sliced(arch, v, x, dp))

  cams, logits, maps, bias, reference = map(np.asarray, _jit(run, variables, x))
  # Maps at the sconv's resolution; their means plus the bias are the logits.
  assert maps.shape == (3, 8, 8, 5) and cams.shape == (3, 8, 8)
  np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, reference, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0)


def test_class_activation_maps_shapes_classes_and_upsampling(vgg):
  arch, variables, x = vgg
  dp = 0.5

  def run(v, x):
    predicted = cam.class_activation_maps(arch, v, x, dp)
    fixed = cam.class_activation_maps(arch, v, x, dp, classes=[3, 7])
    return (*predicted, *fixed, *cam.class_maps(arch, v, x, dp))

  cams, logits, cams_fixed, logits_fixed, maps, _ = map(np.asarray, _jit(run, variables, x))
  assert cams.shape == (BATCH, 32, 32) and logits.shape == (BATCH, NUM_CLASSES)
  np.testing.assert_array_equal(logits, logits_fixed)
  for b, c in enumerate([3, 7]):
    np.testing.assert_allclose(cams_fixed[b], _bilinear_numpy(maps[b, ..., c], 32),
                               atol=1e-5, rtol=1e-5)
  for b, c in enumerate(np.argmax(logits, axis=-1)):
    np.testing.assert_allclose(cams[b], _bilinear_numpy(maps[b, ..., c], 32),
                               atol=1e-5, rtol=1e-5)


def test_dropped_channels_do_not_contribute(vgg):
  arch, variables, x = vgg
  dp, k = 0.5, math.ceil(0.5 * LAST_WIDTH)
  last_conv, head = len(arch["layers"]) - 3, len(arch["layers"]) - 1
  noise = np.random.default_rng(9)

  def bump(a, index):  # positive, so batch-norm variances stay positive
    a = np.array(a)
    a[index] += noise.uniform(0.5, 1.5, a[index].shape)
    return jnp.asarray(a)

  changed = jax.tree.map(lambda a: a, variables)
  conv = changed["layers"][last_conv]
  conv["kernel"] = bump(conv["kernel"], (..., slice(k, None)))
  conv["bn"] = {name: bump(a, slice(k, None)) for name, a in conv["bn"].items()}
  top = changed["layers"][head]
  top["kernel"] = bump(top["kernel"], slice(k, None))
  top["gamma"] = bump(top["gamma"], slice(k, None))

  def run(v, x):
    return (cam.class_activation_maps(arch, v, x, dp, classes=2)[0],
            cam.class_activation_maps(arch, v, x, 1.0, classes=2)[0])

  before, before_full = map(np.asarray, _jit(run, variables, x))
  after, after_full = map(np.asarray, _jit(run, changed, x))
  np.testing.assert_array_equal(before, after)
  # At DP 1 those channels are used, so the change is visible there.
  assert np.abs(before_full - after_full).max() > 1e-3


def test_features_sliced_to_the_end_is_the_logits(vgg):
  arch, variables, x = vgg
  n = len(arch["layers"])
  np.testing.assert_allclose(
      _jit(lambda v, x: sliced.features_sliced(arch, v, x, 0.5, n), variables, x),
      _jit(lambda v, x: sliced.apply_sliced(arch, v, x, 0.5), variables, x), atol=1e-6)
  with pytest.raises(ValueError, match="upto"):
    sliced.features_sliced(arch, variables, x, 0.5, n + 1)


def _grid_inputs(batch, dps, channels=3):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, 32, 32, channels), dtype=np.uint8)
  return images, {dp: rng.normal(size=(batch, 32, 32)) for dp in dps}


@pytest.mark.parametrize("batch,dps,channels", [(1, (1.0,), 3), (3, (0.1, 0.5, 1.0), 1),
                                                 (2, (0.2, 1.0), 3)])
def test_save_cam_grid_png(tmp_path, batch, dps, channels):
  images, cams = _grid_inputs(batch, dps, channels)
  predictions = {dp: np.arange(batch) % NUM_CLASSES for dp in dps}
  path = tmp_path / "sub" / "grid.png"
  cam.save_cam_grid(images, cams, str(path), predictions_by_dp=predictions,
                    labels=np.zeros(batch, int), class_names=[f"c{i}" for i in range(10)])
  picture = matplotlib.image.imread(path)
  rows, cols = batch, len(dps) + 1
  assert picture.ndim == 3 and picture.shape[2] in (3, 4)
  assert abs(picture.shape[0] * cols - picture.shape[1] * rows) <= cols
  assert picture[..., :3].std() > 0.05  # something was drawn
  assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left


def test_overlay_is_min_max_scaled_per_map(tmp_path):
  """Catches scaling by the span without subtracting the minimum (Zhou et al. scale min-max).

  A map and the same map shifted and stretched (``10 + 3 * cam``) must draw the
  same overlay; one pixel-identical PNG for both.
  """
  images, cams = _grid_inputs(2, (0.5, 1.0))
  moved = {dp: 10.0 + 3.0 * maps for dp, maps in cams.items()}
  for name, maps in (("plain.png", cams), ("moved.png", moved)):
    cam.save_cam_grid(images, maps, str(tmp_path / name))
  np.testing.assert_array_equal(matplotlib.image.imread(tmp_path / "plain.png"),
                                matplotlib.image.imread(tmp_path / "moved.png"))


@pytest.mark.parametrize("guess,title_color", [(3, "green"), (4, "red")])
def test_prediction_titles_green_when_right_red_when_wrong(tmp_path, guess, title_color):
  """Catches Fig. 5's colouring inverted; the titles sit in the top margin, above the maps."""
  images, cams = _grid_inputs(1, (1.0,))
  path = tmp_path / "grid.png"
  cam.save_cam_grid(images, cams, str(path), predictions_by_dp={1.0: [guess]}, labels=[3])
  margin = matplotlib.image.imread(path)[:int(0.45 * cam.DPI), :, :3]  # _TOP_INCHES
  red, green, blue = margin[..., 0], margin[..., 1], margin[..., 2]
  greenish = int(((green - np.maximum(red, blue)) > 0.2).sum())
  reddish = int(((red - np.maximum(green, blue)) > 0.2).sum())
  assert (greenish > 10, reddish > 10) == (title_color == "green", title_color == "red")


def test_cam_figure_end_to_end(tmp_path):
  arch = spec.validate_architecture(SCONV_CAM)
  variables = _random_variables(arch, 4)
  images = np.random.default_rng(5).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  path = tmp_path / "cam.png"
  logits = cam.cam_figure(arch, variables, images, [0.5, 1.0], str(path),
                          normalization=(mean, std), labels=[0, 1])
  x = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
  for dp in (0.5, 1.0):
    np.testing.assert_allclose(logits[dp], sliced.apply_sliced(arch, variables, x, dp),
                               atol=1e-5)
  picture = matplotlib.image.imread(path)
  assert abs(picture.shape[0] * 3 - picture.shape[1] * 2) <= 3


def test_cam_figure_reads_a_dps_own_statistics_keyed_in_float32(tmp_path):
  """Statistics given for a DP (here keyed by ``np.float32(0.3)``, as a sweep
  over a float32 grid gives them) are the ones the CAMs and logits at 0.3 read.
  Catches an exact float lookup, which fell back to the shared statistics."""
  arch = spec.validate_architecture(SCONV_CAM)
  variables = _random_variables(arch, 4)
  stats = jax.tree.map(lambda a: a + 0.5, sliced.bn_stats_of(variables))
  images = np.random.default_rng(5).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  logits = cam.cam_figure(arch, variables, images, [0.3], str(tmp_path / "cam.png"),
                          bn_stats_by_dp={np.float32(0.3): stats})
  x = images / 255.0
  expected = sliced.apply_sliced(arch, sliced.merge_variables(variables, stats), x, 0.3)
  assert not np.allclose(expected, sliced.apply_sliced(arch, variables, x, 0.3), atol=1e-3)
  np.testing.assert_allclose(logits[0.3], expected, atol=1e-5)


@pytest.mark.parametrize("dp", [0.0, 1.5, -0.1])
def test_bad_dp_raises(vgg, dp):
  arch, variables, x = vgg
  message = r"dp must be in \(0, 1\]"
  with pytest.raises(ValueError, match=message):
    cam.class_activation_maps(arch, variables, x, dp)
  with pytest.raises(ValueError, match=message):
    cam.class_maps(arch, variables, x, dp)
  with pytest.raises(ValueError, match=message):
    cam.cam_figure(arch, variables, np.zeros((1, 32, 32, 3), np.uint8), [0.5, dp], "x.png")
  with pytest.raises(ValueError, match=r"cams_by_dp key must be in \(0, 1\]"):
    cam.save_cam_grid(*_grid_inputs(1, (dp,)), "x.png")


def test_bad_inputs_raise(vgg, tmp_path):
  arch, variables, x = vgg
  with pytest.raises(ValueError, match="classes"):
    cam.class_activation_maps(arch, variables, x, 0.5, classes=[0, NUM_CLASSES])
  with pytest.raises(ValueError, match="classes"):
    cam.class_activation_maps(arch, variables, x, 0.5, classes=[1])
  with pytest.raises(ValueError, match="classes"):
    cam.class_activation_maps(arch, variables, x, 0.5, classes=[-1, 0])
  with pytest.raises(ValueError, match="x must have shape"):
    cam.class_activation_maps(arch, variables, x[:, :16], 0.5)
  plain = spec.validate_architecture({**arch, "layers": arch["layers"][:-2] + [
      {"kind": "flatten"}, {"kind": "dense", "features": NUM_CLASSES, "idp": True}]})
  with pytest.raises(ValueError, match="CAM head"):
    cam.class_maps(plain, variables, x, 0.5)
  normalised = spec.validate_architecture({**arch, "layers": arch["layers"][:-1] + [
      {**arch["layers"][-1], "bn": True}]})  # the maps would no longer sum to the logits
  with pytest.raises(ValueError, match="CAM head"):
    cam.class_maps(normalised, variables, x, 0.5)
  images, cams = _grid_inputs(2, (0.5,))
  with pytest.raises(ValueError, match="path must end in .png"):
    cam.save_cam_grid(images, cams, str(tmp_path / "grid.jpg"))
  with pytest.raises(ValueError, match="cams_by_dp"):
    cam.save_cam_grid(images, {0.5: cams[0.5][:1]}, str(tmp_path / "grid.png"))
  with pytest.raises(ValueError, match="images_uint8"):
    cam.save_cam_grid(images.astype(np.float32), cams, str(tmp_path / "grid.png"))
  with pytest.raises(ValueError, match="class_names"):
    cam.save_cam_grid(images, cams, str(tmp_path / "grid.png"),
                      predictions_by_dp={0.5: [0, 3]}, class_names=["a", "b"])
  assert not list(tmp_path.iterdir())
