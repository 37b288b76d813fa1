"""The model zoo (001 Fig. 6, 000 Fig. 2), architecture validation, MP-IDP, and
masked == sliced for VGG-16 at tiny width."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynscale.nn import models, sliced, spec

FAST = {"xla_backend_optimization_level": 0}  # compile speed for tests only
DPS = (0.1, 0.25, 0.5, 1.0)


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _params(arch):
  return [layer for layer in arch["layers"] if layer["kind"] in ("conv", "sconv", "dense")]


# --------------------------------------------------------------------------
# Registry and the figures' layer lists
# --------------------------------------------------------------------------


def test_registry_names():
  assert set(models.MODELS) == {"mlp", "tesla_mlp", "vgg16", "vgg16_gap", "mobilenet",
                                "binary_net", "resnet18", "mobilenet_v2",
                                "mobilenet_v2_imagenet", "m_cifarnet", "vgg19"}


def test_unknown_model_lists_models():
  with pytest.raises(ValueError, match="binary_net.*mlp.*vgg16"):
    models.architecture("resnet", num_classes=10, input_shape=[32, 32, 3])


def test_vgg16_layers():
  arch = models.architecture("vgg16", num_classes=10, input_shape=[32, 32, 3])
  convs = [l for l in arch["layers"] if l["kind"] == "conv"]
  assert [l["features"] for l in convs] == [64, 64, 128, 128, 256, 256, 256,
                                            512, 512, 512, 512, 512, 512]
  assert all(l["kernel"] == 3 and l["bn"] and l["act"] == "relu" for l in convs)
  assert sum(l["kind"] == "maxpool" for l in arch["layers"]) == 5
  dense = [l for l in arch["layers"] if l["kind"] == "dense"]
  assert [(l["features"], l["bn"], l["act"]) for l in dense] == [(512, True, "relu"),
                                                                 (10, False, None)]
  # The first layer is complete (CDP), every other layer is IDP.
  assert [l["idp"] for l in _params(arch)] == [False] + [True] * 14
  # 32 / 2**5 = 1: the flatten sees 1 x 1 x 512.
  flatten = next(p for p in spec.plan(arch, 1.0) if p.kind == "flatten")
  assert (flatten.inputs.height, flatten.inputs.width, flatten.inputs.channels) == (1, 1, 512)


def test_mlp_and_tesla_mlp_layers():
  mlp = models.architecture("mlp", num_classes=10, input_shape=[28, 28, 1])
  assert [(l["features"], l["idp"]) for l in _params(mlp)] == [(100, False), (10, True)]
  tesla = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1])
  # 000: IDP on the first hidden layer's outputs = the second FC layer's inputs.
  assert [(l["features"], l["idp"]) for l in _params(tesla)] == [(100, False), (100, True),
                                                                 (10, False)]
  assert mlp["layers"][0]["kind"] == tesla["layers"][0]["kind"] == "flatten"


def test_mobilenet_layers():
  arch = models.architecture("mobilenet", num_classes=10, input_shape=[32, 32, 3])
  sconvs = [l for l in arch["layers"] if l["kind"] == "sconv"]
  assert [l["features"] for l in sconvs] == [64, 128, 128, 256, 256] + [512] * 6 + [1024] * 2
  assert [l["stride"] for l in sconvs].count(2) == 4
  assert all(l["idp"] and not l["idp_depthwise"] for l in sconvs)
  assert arch["layers"][0]["kind"] == "conv" and not arch["layers"][0]["idp"]
  assert [l["kind"] for l in arch["layers"][-2:]] == ["global_avgpool", "dense"]


def test_binary_net_layers():
  arch = models.architecture("binary_net", num_classes=10, input_shape=[28, 28, 1])
  assert all(l["binary"] for l in _params(arch))
  assert [l["idp"] for l in _params(arch)] == [False] + [True] * 6
  last = spec.plan(arch, 1.0)[-1]
  assert (last.inputs.height, last.inputs.width, last.inputs.channels) == (3, 3, 64)


def test_width_multiplier_scales_hidden_widths_only():
  arch = models.architecture("vgg16", num_classes=7, input_shape=[32, 32, 3],
                             width_multiplier=0.25)
  assert [l["features"] for l in _params(arch)] == [16, 16, 32, 32, 64, 64, 64] + [128] * 7 + [7]


def test_idp_layers_override():
  kw = dict(num_classes=10, input_shape=[28, 28, 1])
  assert all(l["idp"] for l in _params(models.architecture("mlp", idp_layers="all", **kw)))
  assert not any(l["idp"] for l in _params(models.architecture("mlp", idp_layers="none", **kw)))
  arch = models.architecture("tesla_mlp", idp_layers=[1, 3], **kw)
  assert [l["idp"] for l in _params(arch)] == [True, False, True]


@pytest.mark.parametrize("bad", ["some", [0], [1, 7], [True], ["1"]])
def test_bad_idp_layers(bad):
  with pytest.raises(ValueError, match="idp_layers"):
    models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1], idp_layers=bad)


def test_architecture_is_json_and_idempotent():
  arch = models.architecture("mobilenet", num_classes=10, input_shape=[32, 32, 3],
                             mp_profiles=[[0, 0.5], [0.5, 1]])
  assert json.loads(json.dumps(arch)) == arch
  assert spec.validate_architecture(arch) == arch


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _tiny(**layer):
  return {"name": "t", "input_shape": [4], "num_classes": 3,
          "layers": [{"kind": "dense", "features": 3, **layer}]}


@pytest.mark.parametrize("arch,match", [
    (_tiny(kind="lstm"), r"kind must be one of \('dense', 'conv', 'sconv', 'resblock'"),
    (_tiny(featurs=3), "unknown keys"),
    (_tiny(act="gelu"), "act must be one of"),
    (_tiny(idp="yes"), "idp must be true or false"),
    (_tiny(features=0), "features must be a positive int"),
    (_tiny(profile="cubic", idp=True), "profile must be one of"),
    (_tiny(profile=[1.0, 2.0, 0.5, 0.1], idp=True), "non-increasing"),
    (_tiny(profile=[1.0, 0.5], idp=True), "has 2 coefficients"),
    (_tiny(profile="linear"), "not IDP"),
    (_tiny(features=4), "must end in 3 logits"),
    ({**_tiny(), "input_shape": [8, 8, 3]}, "needs a flat input"),
    ({**_tiny(), "profile": "cubic"}, "profile must be one of"),
    ({**_tiny(), "profiles": [[0, 0.5], [0.6, 1]]}, "contiguous"),
    ({**_tiny(), "profiles": [[0, 0.5]]}, "end at 1.0"),
    ({**_tiny(), "layer": []}, "unknown keys"),
    ({"name": "t", "input_shape": [4], "num_classes": 3, "layers": [{"kind": "flatten"}]},
     "at least one of"),
    ({"name": "t", "input_shape": [2, 2, 1], "num_classes": 3,
      "layers": [{"kind": "maxpool", "window": 3}, {"kind": "flatten"},
                 {"kind": "dense", "features": 3}]}, "larger than"),
    ({"name": "t", "input_shape": [4, 4, 1], "num_classes": 3,
      "layers": [{"kind": "maxpool", "window": 2, "stride": 0}, {"kind": "flatten"},
                 {"kind": "dense", "features": 3}]}, "stride must be a positive int or null, got 0"),
])
def test_validation_errors(arch, match):
  with pytest.raises(ValueError, match=match):
    spec.validate_architecture(arch)


def test_missing_input_dims():
  x = jnp.zeros((2, 5))
  model = models.build(_tiny(), rngs=_rngs())
  with pytest.raises(ValueError, match=r"x must have shape \(batch, 4\)"):
    model(x, 1.0, train=False)


# --------------------------------------------------------------------------
# MP-IDP (001 §III)
# --------------------------------------------------------------------------


def _mp_mlp():
  return models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1],
                             width_multiplier=0.2, mp_profiles=[[0, 0.2], [0.2, 0.4],
                                                                [0.4, 1.0]])


def test_mp_idp_profile_selection():
  arch = _mp_mlp()
  assert [spec.select_profile(arch, dp, None) for dp in (0.1, 0.2, 0.3, 0.4, 0.41, 1.0)] == \
      [0, 0, 1, 1, 2, 2]
  assert spec.select_profile(arch, 0.9, 0) == 0
  with pytest.raises(ValueError, match="profile_index"):
    spec.select_profile(arch, 0.5, 3)
  single = models.architecture("mlp", num_classes=10, input_shape=[28, 28, 1])
  with pytest.raises(ValueError, match="only for MP-IDP"):
    spec.select_profile(single, 0.5, 0)


@pytest.mark.parametrize("name, idp_layers", [("mlp", None), ("tesla_mlp", [1, 3])])
def test_mp_idp_needs_an_idp_layer_the_profiles_share(name, idp_layers):
  # mlp's only IDP layer is its classifier, tesla_mlp's here its first and last layers:
  # each profile holds those on its own (001 §III), so the profiles would share nothing.
  with pytest.raises(ValueError, match="IDP layer shared between its profiles"):
    models.architecture(name, num_classes=10, input_shape=[28, 28, 1],
                        idp_layers=idp_layers, mp_profiles=[[0, 0.5], [0.5, 1]])
  models.architecture(name, num_classes=10, input_shape=[28, 28, 1], idp_layers=idp_layers)


def test_mp_idp_separate_first_and_last_layers():
  arch = _mp_mlp()
  model = models.build(arch, rngs=_rngs())
  layers = model.pure_variables()["layers"]
  # The first (layer 1) and last (layer 3) layers exist once per profile; layer 2 is shared.
  assert sorted(layers[1]) == sorted(layers[3]) == [0, 1, 2]
  assert layers[1][0]["kernel"].shape == (784, 20)
  assert "kernel" in layers[2]
  assert not np.allclose(layers[1][0]["kernel"], layers[1][1]["kernel"])


def test_mp_idp_uses_the_profile_of_the_dp():
  arch = _mp_mlp()
  model = models.build(arch, rngs=_rngs())
  variables = model.pure_variables()
  x = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype(np.float32)
  run = nnx.jit(lambda m, x, dp, s: m(x, dp, train=False, profile_index=s),
                static_argnums=(3,))
  for dp, s in ((0.1, 0), (0.3, 1), (0.8, 2)):
    y_auto = model(x, dp, train=False)
    np.testing.assert_allclose(y_auto, run(model, x, dp, s), rtol=1e-6)
    np.testing.assert_allclose(y_auto, sliced.apply_sliced(arch, variables, x, dp),
                               rtol=1e-5, atol=1e-6)
    # By hand: relu(x W1_s) -> first k units (gamma-scaled) -> relu(. W2) -> W3_s.
    v = jax.tree.map(np.asarray, variables["layers"])
    k = int(np.ceil(round(dp * 20, 6)))
    h = np.maximum(x.reshape(3, -1) @ v[1][s]["kernel"] + v[1][s]["bias"], 0)
    h = np.maximum((h[:, :k] * v[2]["gamma"][:k]) @ v[2]["kernel"][:k] + v[2]["bias"], 0)
    np.testing.assert_allclose(y_auto, h @ v[3][s]["kernel"] + v[3][s]["bias"], rtol=1e-4,
                               atol=1e-5)
  # Training stage s forces its profile whatever the dp.
  np.testing.assert_allclose(run(model, x, 1.0, 0),
                             sliced.apply_sliced(arch, variables, x, 1.0, profile_index=0),
                             rtol=1e-5, atol=1e-6)


def test_mp_idp_traced_dp_needs_profile_index():
  model = models.build(_mp_mlp(), rngs=_rngs())
  x = jnp.zeros((1, 28, 28, 1))
  with pytest.raises(ValueError, match="concrete dp or an explicit profile_index"):
    nnx.jit(lambda m, dp: m(x, dp, train=False))(model, 0.5)
  nnx.jit(lambda m, dp: m(x, dp, train=False, profile_index=1))(model, 0.5)


# --------------------------------------------------------------------------
# Masked == sliced for the deep networks
# --------------------------------------------------------------------------


def _agree(model, x, *, train, dps, grads):
  """Masked (dp traced, one compile) vs apply_sliced (one compile per dp) at ``dps``."""
  arch, variables = model.arch, model.pure_variables()
  graphdef, state = nnx.split(model)
  proj = np.random.default_rng(3).standard_normal((x.shape[0], 10)).astype(np.float32)

  def masked(state, dp):
    m = nnx.merge(graphdef, state)
    y = m(x, dp, train=train)
    return jnp.sum(y * proj), (y, nnx.state(m, nnx.BatchStat).to_pure_dict())

  def fast(f, *static):
    return jax.jit(jax.grad(f, has_aux=True) if grads else f, compiler_options=FAST,
                   static_argnums=static)

  def in_slices(v, dp):
    out = sliced.apply_sliced(arch, v, x, dp, train=train)
    y = out[0] if train else out
    return jnp.sum(y * proj), (y, out[1] if train else {})

  run_masked, run_sliced = fast(masked), fast(in_slices, 1)
  for dp in dps:
    (a, (y_m, st_m)), (b, (y_s, st_s)) = run_masked(state, dp), run_sliced(variables, dp)
    # Train-mode batch norm over few samples amplifies float32 rounding.
    scale = float(jnp.max(jnp.abs(y_m))) * (1e-4 if train else 1e-5)
    np.testing.assert_allclose(y_m, y_s, rtol=1e-4, atol=scale)
    if train:
      for key, value in sliced.flatten_tree(st_s).items():
        np.testing.assert_allclose(sliced.flatten_tree(st_m)[key], value, rtol=1e-4, atol=1e-5)
    if grads:
      flat_m, flat_s = sliced.flatten_tree(a.to_pure_dict()), sliced.flatten_tree(b)
      g_scale = max(float(np.max(np.abs(g))) for g in flat_m.values())
      for key, value in flat_s.items():
        np.testing.assert_allclose(flat_m[key], value, rtol=1e-3, atol=1e-4 * g_scale,
                                   err_msg=key)


def test_vgg16_masked_equals_sliced():
  """Logits at every DP in eval mode; in train mode at DP 0.5 the logits, the updated
  running statistics and the gradients. (MobileNet: test_nn_layers; every block kind at
  every DP: test_nn_sliced.)"""
  arch = models.architecture("vgg16", num_classes=10, input_shape=[32, 32, 3],
                             width_multiplier=1 / 16)
  model = models.build(arch, rngs=_rngs())
  x = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
  _agree(model, x, train=False, dps=DPS, grads=False)
  _agree(model, x, train=True, dps=(0.5,), grads=True)
