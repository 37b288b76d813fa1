"""Analytic per-layer costs of the sliced network (SANP formula H W (C_in k^2 + 1) C_out)."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from dynscale import metrics
from dynscale.nn import costs, models, sliced

# 8x8x3 -> Conv 4 (BN) -> Conv 6 /2 (IDP, bias) -> S-Conv 8 (IDP, BN) -> pool 2 -> flatten
# (2x2x8) -> FC 5 (IDP on the 8 channels, bias).
TINY = {"name": "tiny", "input_shape": [8, 8, 3], "num_classes": 5, "profile": "linear",
        "layers": [{"kind": "conv", "features": 4},
                   {"kind": "conv", "features": 6, "stride": 2, "idp": True, "bn": False},
                   {"kind": "sconv", "features": 8, "idp": True},
                   {"kind": "maxpool", "window": 2},
                   {"kind": "flatten"},
                   {"kind": "dense", "features": 5, "idp": True}]}


def _by_name(arch, dp):
  return {c.name: (c.kind, c.flops, c.params) for c in costs.layer_costs(arch, dp)}


def test_tiny_network_at_full_width():
  assert _by_name(TINY, 1.0) == {
      "layers.0.conv": ("conv", 8 * 8 * (3 * 9) * 4, 9 * 3 * 4),
      "layers.0.bn": ("bn", 0, 2 * 4),
      "layers.1.conv": ("conv", 4 * 4 * (4 * 9 + 1) * 6, 9 * 4 * 6 + 6),
      "layers.2.depthwise": ("depthwise", 4 * 4 * 9 * 6, 9 * 6),
      "layers.2.depthwise_bn": ("bn", 0, 2 * 6),
      "layers.2.pointwise": ("pointwise", 4 * 4 * 6 * 8, 6 * 8),
      "layers.2.bn": ("bn", 0, 2 * 8),
      "layers.5.dense": ("dense", (2 * 2 * 8 + 1) * 5, 2 * 2 * 8 * 5 + 5),
  }


def test_tiny_network_at_half_dp():
  # Each layer computes only what the next IDP layer keeps: ceil(C / 2) channels.
  assert _by_name(TINY, 0.5) == {
      "layers.0.conv": ("conv", 8 * 8 * (3 * 9) * 2, 9 * 3 * 2),
      "layers.0.bn": ("bn", 0, 2 * 2),
      "layers.1.conv": ("conv", 4 * 4 * (2 * 9 + 1) * 3, 9 * 2 * 3 + 3),
      "layers.2.depthwise": ("depthwise", 4 * 4 * 9 * 3, 9 * 3),
      "layers.2.depthwise_bn": ("bn", 0, 2 * 3),
      "layers.2.pointwise": ("pointwise", 4 * 4 * 3 * 4, 3 * 4),
      "layers.2.bn": ("bn", 0, 2 * 4),
      "layers.5.dense": ("dense", (2 * 2 * 4 + 1) * 5, 2 * 2 * 4 * 5 + 5),
  }
  assert costs.flops(TINY, 0.5) == 3456 + 912 + 432 + 192 + 85
  assert costs.params(TINY, 0.5) == 54 + 4 + 57 + 27 + 6 + 12 + 8 + 85


def test_vgg16_middle_layers_cost_a_quarter():
  arch = models.architecture("vgg16", num_classes=10, input_shape=[32, 32, 3])
  full, half = _by_name(arch, 1.0), _by_name(arch, 0.5)
  convs = [name for name in full if name.endswith(".conv")]
  assert len(convs) == 13
  assert full[convs[0]][1] == 32 * 32 * 27 * 64
  assert half[convs[0]][1] == full[convs[0]][1] // 2  # complete inputs, half the outputs
  for name in convs[1:]:  # half the inputs and half the outputs: p^2 (001 §I)
    assert half[name][1] * 4 == full[name][1], name
  ratio = costs.flops(arch, 0.5) / costs.flops(arch, 1.0)
  assert 0.25 <= ratio < 0.26
  assert costs.flops(arch, 1.0) == sum(c.flops for c in costs.layer_costs(arch, 1.0))


def test_params_match_the_model():
  arch = models.architecture("binary_net", num_classes=10, input_shape=[28, 28, 1],
                             width_multiplier=0.5)
  model = nnx.eval_shape(lambda: models.build(arch, rngs=nnx.Rngs(0)))
  trainable = sum(int(np.prod(a.shape)) for a in
                  jax.tree.leaves(nnx.state(model, nnx.Param).to_pure_dict()))
  assert costs.params(arch, 1.0) == trainable


def test_mp_idp_counts_one_profile():
  single = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1])
  multi = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1],
                              mp_profiles=[[0, 0.5], [0.5, 1]])
  assert costs.layer_costs(single, 0.3) == costs.layer_costs(multi, 0.3)


def test_stored_params_count_every_profiles_own_layers():
  # tesla_mlp: FC 784->100, FC 100->100 (IDP, shared), FC 100->10, each with a bias.
  first, middle, last = 784 * 100 + 100, 100 * 100 + 100, 100 * 10 + 10
  single = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1])
  three = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1],
                              mp_profiles=[[0, 0.2], [0.2, 0.4], [0.4, 1]])
  assert costs.stored_params(single) == costs.params(single) == first + middle + last
  assert costs.params(three) == first + middle + last  # one profile runs at a time
  assert costs.stored_params(three) == 3 * first + middle + 3 * last
  # VGG-16 with a second profile: one more first conv (64 3x3x3 filters, its BN) and
  # classifier (512 -> 10): the layers 001 §III names.
  vgg = models.architecture("vgg16", num_classes=10, input_shape=[32, 32, 3],
                            mp_profiles=[[0, 0.3], [0.3, 1]])
  extra = (3 * 3 * 3 * 64 + 2 * 64) + (512 * 10 + 10)
  assert costs.stored_params(vgg) - costs.params(vgg) == extra
  assert metrics.compression_rate(costs.stored_params(vgg), costs.params(vgg)) == pytest.approx(
      (costs.params(vgg) + extra) / costs.params(vgg))


def test_dense_costs_match_xla():
  # XLA counts 2 flops per multiply-add plus elementwise ops (bias, ReLU, profile scaling),
  # so the sliced executable reports about twice the analytic count.
  arch = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1])
  variables = jax.tree.map(lambda s: np.zeros(s, np.float32), sliced.variable_shapes(arch),
                           is_leaf=lambda s: isinstance(s, tuple))
  for dp in (0.3, 1.0):
    compact = sliced.slice_variables(arch, variables, dp)
    xla = metrics.xla_flops(functools.partial(sliced.apply_sliced, arch, widths=dp), compact,
                            np.zeros((1, 28, 28, 1), np.float32))
    analytic = costs.flops(arch, dp)
    assert abs(xla - 2 * analytic) / (2 * analytic) < 0.01, (dp, xla, analytic)


@pytest.mark.parametrize("dp", [0.0, 1.2])
def test_bad_dp(dp):
  with pytest.raises(ValueError, match="dp must be in"):
    costs.layer_costs(TINY, dp)


def test_a_separable_blocks_pointwise_reads_every_channel_of_an_ungated_depthwise():
  """§4.1.1's FLOPs under a gate before an ``sconv``: the depthwise computes
  only the open inputs, but its batch norm turns a closed channel into a
  constant map, which the (ungated) pointwise reads: the pointwise counts
  every channel of the width, 6 x 6 x (4 x 5 + 5) (it counted the 2 open
  ones), as an inverted residual's projection does."""
  import jax.numpy as jnp
  from dynscale.nn import spec
  arch = spec.validate_architecture({"name": "g", "input_shape": [6, 6, 3], "num_classes": 3,
                                     "layers": [{"kind": "conv", "features": 4},
                                                {"kind": "sconv", "features": 5},
                                                {"kind": "global_avgpool"},
                                                {"kind": "dense", "features": 3}]})

  class HalfOpen(nnx.Module):  # the stem's channels 2 and 3 closed for every image
    def __call__(self, x, y, train):
      return jnp.ones((y.shape[0], y.shape[-1]), y.dtype).at[:, 2:].set(0.0)
  model = models.build(arch, rngs=models.init_rngs(0),
                       gate=lambda name, c_in, c_out, rngs: HalfOpen() if name == "layers.0"
                       else None)
  images = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
  activity = model.run(jnp.asarray(images), 1.0, train=False).activity
  gated = costs.sample_flops(arch, 1.0, activity)
  # by hand, against every channel open: the stem (its gated convolution counts
  # its open outputs, C_out,act) saves 6x6x(3x9)x2 and the depthwise over the
  # open inputs 6x6x9x2; the pointwise and its input's batch norm save nothing
  ungated = costs.sample_flops(arch, 1.0, {"layers.0": jnp.ones((2, 4))})
  saved = 36 * 27 * 2 + 36 * 9 * 2
  np.testing.assert_allclose(np.asarray(ungated - gated), saved)
