"""Inference that skips closed channels equals the masked network."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynscale.nn import models
from dynscale.sanp import gates, inference

ARCH = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3),
                           width_multiplier=0.125)


def decide_per_image(model, seed, bias_shift=0.0):
  """Random SPM output layers: each gate's decisions depend on the image, about
  half the channels open (more with a positive ``bias_shift``)."""
  rng = np.random.default_rng(seed)
  for gate in model.gates.values():
    w2 = gate.head.w2
    w2.kernel.value = jnp.asarray(rng.standard_normal(w2.kernel.value.shape), jnp.float32)
    w2.bias.value = jnp.asarray(rng.standard_normal(w2.bias.value.shape) + bias_shift,
                                jnp.float32)


def gated_model(seed=0, gate=None):
  model = models.build(ARCH, rngs=models.init_rngs(0),
                       gate=gate or gates.gate_factory("sanp", reduction=4))
  decide_per_image(model, seed)
  return model


def test_bucket_sizes_round_channel_counts_up():
  assert inference.bucket_sizes(16, 4) == (4, 8, 12, 16)
  assert inference.bucket_sizes(6, 4) == (2, 3, 5, 6)
  assert inference.bucket_sizes(3, 1) == (3,)


@pytest.mark.parametrize("layer", ["layers.0", "layers.4"])  # the first reads the image
def test_skipping_equals_the_masked_network_with_an_all_off_layer(layer):
  model = gated_model()
  closed = model.gates[layer]
  closed.head.w2.kernel.value = jnp.zeros_like(closed.head.w2.kernel.value)
  closed.head.w2.bias.value = jnp.full_like(closed.head.w2.bias.value, -5.0)  # all off
  skip = inference.skipping_forward(model, buckets=3)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) + jnp.asarray(
      [[[[1.0, -1.0, 0.5]]]])
  for image in images:
    trace = model.run(image[None], 1.0, train=False)
    assert float(trace.activity[layer].sum()) == 0
    np.testing.assert_allclose(skip(image[None]), trace.output, rtol=1e-4, atol=1e-4)
  model.gates[layer].head.w2.bias.value = jnp.full_like(closed.head.w2.bias.value, 5.0)
  reopened = inference.skipping_forward(model, buckets=3)
  trace = model.run(images[:1], 1.0, train=False)
  np.testing.assert_allclose(reopened(images[:1]), trace.output, rtol=1e-4, atol=1e-4)


def test_skipping_equals_the_masked_network_after_an_ungated_convolution():
  """layers.2 reads layers.1's output in channel order, not the image: it picks
  its input bucket as a whole layer, unlike the first, which computes every
  output."""
  sanp = gates.gate_factory("sanp", reduction=4)
  model = gated_model(gate=lambda name, *shape: None if name == "layers.1" else sanp(name, *shape))
  assert "layers.1" not in model.gates
  skip = inference.skipping_forward(model, buckets=3)
  for image in jax.random.normal(jax.random.key(5), (2, 1, 32, 32, 3)):
    trace = model.run(image, 1.0, train=False)
    assert 0 < float(trace.activity["layers.2"].mean()) < 1
    np.testing.assert_allclose(skip(image), trace.output, rtol=1e-4, atol=1e-4)


def test_skipping_equals_the_masked_network_under_per_channel_decision_points():
  model = models.build(ARCH, rngs=models.init_rngs(0), gate=gates.gate_factory(
      "sanp", reduction=4, decision_point="channel"))
  rng = np.random.default_rng(1)
  for gate in model.gates.values():  # each channel its own threshold and spread
    w2 = gate.head.w2
    w2.kernel.value = jnp.asarray(rng.standard_normal(w2.kernel.value.shape), jnp.float32)
    w2.bias.value = jnp.asarray(rng.standard_normal(w2.bias.value.shape), jnp.float32)
    channels = gate.threshold.value.shape[0]
    gate.threshold.value = jnp.asarray(rng.standard_normal(channels), jnp.float32)
    gate.temperature.value = jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)
  skip = inference.skipping_forward(model, buckets=3)
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  for image in images:
    trace = model.run(image[None], 1.0, train=False)
    assert 0 < float(trace.activity["layers.4"].mean()) < 1
    np.testing.assert_allclose(skip(image[None]), trace.output, rtol=1e-4, atol=1e-4)


def test_skipping_refuses_what_it_cannot_run():
  mobilenet = models.architecture("mobilenet_v2", num_classes=10, input_shape=(32, 32, 3),
                                  width_multiplier=1 / 8)
  with pytest.raises(ValueError, match=r"layers\[1\] is a 'invres'"):
    inference.check_architecture(mobilenet)
  mp_idp = models.architecture("tesla_mlp", num_classes=10, input_shape=(28, 28, 1),
                                mp_profiles=[[0, 0.5], [0.5, 1]])
  with pytest.raises(ValueError, match="single-profile networks, not MP-IDP"):
    inference.check_architecture(mp_idp)
  model = gated_model()
  with pytest.raises(ValueError, match="buckets must be >= 1, got 0"):
    inference.skipping_forward(model, buckets=0)
  skip = inference.skipping_forward(model)
  with pytest.raises(ValueError, match=r"takes one image \(1, H, W, C\), got \(2, 32, 32, 3\)"):
    skip(jnp.zeros((2, 32, 32, 3)))


def test_open_first_places_open_channels_first_in_channel_order():
  order, slot = inference.open_first(jnp.asarray([False, True, False, True, True]))
  np.testing.assert_array_equal(order, [1, 3, 4, 0, 2])
  np.testing.assert_array_equal(slot, [3, 0, 4, 1, 2])
  is_open = jax.random.bernoulli(jax.random.key(3), 0.4, (97,))
  order, slot = inference.open_first(is_open)
  np.testing.assert_array_equal(order, np.argsort(~np.asarray(is_open), kind="stable"))
  np.testing.assert_array_equal(order[slot], np.arange(97))


def test_skipping_equals_the_masked_network_through_max_pooling():
  """VGG-16 pools between gated convolutions: the pooled maps stay in the gates'
  order. Gates open about two thirds, varying per image, and rescale (s up to
  about 3), so the logits are far from zero."""
  arch = models.architecture("vgg16", num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=0.125)
  model = models.build(arch, rngs=models.init_rngs(0), gate=gates.gate_factory("sanp",
                                                                              reduction=4))
  decide_per_image(model, 0, bias_shift=1.0)
  skip = inference.skipping_forward(model, buckets=3)
  for image in jax.random.normal(jax.random.key(0), (2, 32, 32, 3)):
    trace = model.run(image[None], 1.0, train=False)
    assert 0 < float(trace.activity["layers.14"].sum()) < 64
    scale = float(jnp.max(jnp.abs(trace.output)))
    assert scale > 1
    np.testing.assert_allclose(skip(image[None]), trace.output, rtol=1e-4, atol=1e-4 * scale)


RESNET = models.architecture("resnet18", num_classes=10, input_shape=(16, 16, 3),
                             width_multiplier=1 / 16)


def gated_resnet(closed=(), ungated=()):
  """A gated ResNet-18 whose gates open part of the channels, per image; the
  gates named in ``closed`` close every channel, the points in ``ungated``
  have none."""
  sanp = gates.gate_factory("sanp", reduction=4)
  model = models.build(RESNET, rngs=models.init_rngs(0),
                       gate=lambda name, *shape: None if name in ungated else sanp(name, *shape))
  decide_per_image(model, 0, bias_shift=0.5)
  for name in closed:
    w2 = model.gates[name].head.w2
    w2.kernel.value = jnp.zeros_like(w2.kernel.value)
    w2.bias.value = jnp.full_like(w2.bias.value, -5.0)
  return model


def resnet_images(count):
  """Images whose colour shifts make the gates decide differently per image."""
  return (jax.random.normal(jax.random.key(0), (count, 1, 16, 16, 3))
          + 2 * jax.random.normal(jax.random.key(1), (count, 1, 1, 1, 3)))


def test_skipping_equals_the_masked_network_through_residual_blocks():
  """ResNet-18's blocks: conv1 reads the block input in channel order, conv2 the
  open-first output of conv1, and the add meets the shortcut (the identity, or
  a projection in the first block of stages 2-4) in channel order. Catches a
  branch added in the gates' order, a shortcut left out or gated, and conv2
  reading conv1's channels in the wrong order or ungated (it computes every
  output, the gate zeroes the closed ones)."""
  model = gated_resnet()
  skip = inference.skipping_forward(model, buckets=2)
  decisions = []
  for image in resnet_images(4):
    trace = model.run(image, 1.0, train=False)
    decisions.append(np.concatenate([np.asarray(trace.activity[f"layers.{i}.{conv}"][0])
                                     for i in range(1, 9) for conv in ("conv1", "conv2")]))
    scale = float(jnp.max(jnp.abs(trace.output)))
    np.testing.assert_allclose(skip(image), trace.output, rtol=1e-4, atol=1e-4 * scale)
  decisions = np.stack(decisions)
  assert 0.3 < decisions.mean() < 0.8
  assert (decisions != decisions[0]).any(axis=1)[1:].all()  # every image decides its own way


def test_skipping_equals_the_masked_network_with_all_off_and_ungated_block_convolutions():
  """A block whose conv2 is all off outputs ReLU of its shortcut alone; one whose
  conv1 is all off gives conv2 zeros to read (its batch norm's offset remains);
  an ungated conv1 hands conv2 every channel, an ungated conv2 reads conv1's
  open channels back in channel order."""
  closed = ("layers.2.conv2", "layers.3.conv1")
  model = gated_resnet(closed, ungated=("layers.5.conv1", "layers.6.conv2"))
  assert "layers.5.conv1" not in model.gates and "layers.6.conv1" in model.gates
  skip = inference.skipping_forward(model, buckets=2)
  for image in resnet_images(2):
    trace = model.run(image, 1.0, train=False)
    assert all(float(trace.activity[name].sum()) == 0 for name in closed)
    scale = float(jnp.max(jnp.abs(trace.output)))
    np.testing.assert_allclose(skip(image), trace.output, rtol=1e-4, atol=1e-4 * scale)


def test_exported_skipping_runs_without_flax_and_equals_the_masked_network(tmp_path):
  """The saved function is the skipping forward with this model's variables: it
  runs in a process where Flax cannot be imported, and gives the masked path's
  logits (a gate, filter or batch-norm entry lost or misplaced would not)."""
  model = gated_model(seed=2)
  inference.export_skipping(model, tmp_path / "skip", buckets=3)
  images = np.asarray(jax.random.normal(jax.random.key(4), (2, 1, 32, 32, 3)))
  np.save(tmp_path / "images.npy", images)
  script = ("import sys; sys.modules['flax'] = None\n"
            "import numpy as np\n"
            "from dynscale import bound\n"
            f"f = bound.load({str(tmp_path / 'skip')!r})\n"
            f"images = np.load({str(tmp_path / 'images.npy')!r})\n"
            f"np.save({str(tmp_path / 'logits.npy')!r}, np.stack([f(x) for x in images]))\n")
  subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
  logits = np.load(tmp_path / "logits.npy")
  for image, got in zip(images, logits):
    trace = model.run(image, 1.0, train=False)
    assert 0 < float(trace.activity["layers.4"].mean()) < 1
    np.testing.assert_allclose(got, trace.output, rtol=1e-4, atol=1e-4)
