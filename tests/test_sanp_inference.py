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


def gated_model(seed=0, gate=None):
  model = models.build(ARCH, rngs=models.init_rngs(0),
                       gate=gate or gates.gate_factory("sanp", reduction=4))
  rng = np.random.default_rng(seed)
  for gate in model.gates.values():  # per-sample decisions, about half the channels open
    w2 = gate.head.w2
    w2.kernel.value = jnp.asarray(rng.standard_normal(w2.kernel.value.shape), jnp.float32)
    w2.bias.value = jnp.asarray(rng.standard_normal(w2.bias.value.shape), jnp.float32)
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
  resnet = models.architecture("resnet18", num_classes=10, input_shape=(32, 32, 3),
                               width_multiplier=1 / 16)
  with pytest.raises(ValueError, match=r"layers\[1\] is a 'resblock'"):
    inference.check_architecture(resnet)
  skip = inference.skipping_forward(gated_model())
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
  rng = np.random.default_rng(0)
  for gate in model.gates.values():
    w2 = gate.head.w2
    w2.kernel.value = jnp.asarray(rng.standard_normal(w2.kernel.value.shape), jnp.float32)
    w2.bias.value = jnp.asarray(rng.standard_normal(w2.bias.value.shape) + 1, jnp.float32)
  skip = inference.skipping_forward(model, buckets=3)
  for image in jax.random.normal(jax.random.key(0), (2, 32, 32, 3)):
    trace = model.run(image[None], 1.0, train=False)
    assert 0 < float(trace.activity["layers.14"].sum()) < 64
    scale = float(jnp.max(jnp.abs(trace.output)))
    assert scale > 1
    np.testing.assert_allclose(skip(image[None]), trace.output, rtol=1e-4, atol=1e-4 * scale)


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
