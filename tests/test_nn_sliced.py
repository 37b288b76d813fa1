"""Masked network == sliced network (DESIGN invariant 1), and SlicedModel caching.

The masked IDPNet (dp traced, all channels computed, the rest multiplied by
zero) and apply_sliced (dp static, only the kept channels computed) must give
the same logits, the same gradients, and the same batch-norm running state.
The zero pattern of the masked gradients outside the kept slice is checked
against widths worked out by hand: k = ceil(dp * C) channels (001 §II-A).
"""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynscale.kernels import conv
from dynscale.nn import models, sliced, spec

DPS = (0.1, 0.25, 0.5, 1.0)
FAST = {"xla_backend_optimization_level": 0}  # compile speed for tests only

SCONV_NET = {
    "name": "sconv_net", "input_shape": [8, 8, 3], "num_classes": 5, "profile": "harmonic",
    "layers": [
        {"kind": "conv", "features": 4},
        {"kind": "sconv", "features": 6, "idp": True, "idp_depthwise": True},
        {"kind": "sconv", "features": 8, "stride": 2, "idp": True, "bn": False},
        {"kind": "global_avgpool"},
        {"kind": "dense", "features": 5, "idp": True},
    ]}

# An IDP first layer: at DP d it reads the first ceil(d C) of the image's C channels.
RGB_FIRST_IDP = {
    "name": "rgb_first_idp", "input_shape": [6, 6, 5], "num_classes": 4, "profile": "linear",
    "layers": [
        {"kind": "conv", "features": 6, "idp": True},
        {"kind": "global_avgpool"},
        {"kind": "dense", "features": 4, "idp": True},
    ]}


def _arch(name):
  if name in ("sconv_net", "rgb_first_idp"):
    return {"sconv_net": SCONV_NET, "rgb_first_idp": RGB_FIRST_IDP}[name]
  shape = [28, 28, 1] if name in ("mlp", "tesla_mlp", "binary_net") else [32, 32, 3]
  wm = {"mlp": 0.2, "tesla_mlp": 0.2, "binary_net": 0.5}.get(name, 1 / 16)
  return models.architecture(name, num_classes=10, input_shape=shape, width_multiplier=wm)


def _rngs(seed=0):
  """RBG keys: the same statistics as threefry, far quicker to compile on CPU."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.lru_cache(maxsize=None)
def _setup(name, batch=8):
  arch = _arch(name)
  model = models.build(arch, rngs=_rngs())
  # Non-trivial running statistics so eval mode exercises them.
  stats = jax.tree.map(
      lambda a: (np.asarray(a) + 0.1 * np.arange(a.shape[0]) / a.shape[0]).astype(np.float32),
      sliced.bn_stats_of(model.pure_variables()))
  state = nnx.state(model, nnx.BatchStat)
  state.replace_by_pure_dict(stats)
  nnx.update(model, state)
  shape = tuple(model.arch["input_shape"])
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, *shape)).astype(np.float32)
  proj = rng.standard_normal((batch, model.arch["num_classes"])).astype(np.float32)
  return model, x, proj


def _masked_fn(model, train, proj, grads=True):
  """jit(x, dp) -> (grads or None, logits, new BN stats) of the masked model, dp traced."""
  graphdef, state = nnx.split(model)

  def loss(state, x, dp):
    m = nnx.merge(graphdef, state)
    y = m(x, dp, train=train)
    return jnp.sum(y * proj), (y, nnx.state(m, nnx.BatchStat))

  def run(state, x, dp):
    if not grads:
      return (None, *loss(state, x, dp)[1])
    g, (y, stats) = jax.grad(loss, has_aux=True)(state, x, dp)
    return g, y, stats

  jitted = jax.jit(run, compiler_options=FAST)
  return lambda x, dp: jitted(state, x, dp)


def _sliced(arch, variables, x, dp, train, proj, grads=True):
  """(grads or None, logits, new BN stats or None) of apply_sliced at static dp."""
  def loss(v):
    out = sliced.apply_sliced(arch, v, x, dp, train=train)
    y = out[0] if train else out
    return jnp.sum(y * proj), out
  if grads:
    g, out = jax.jit(jax.grad(loss, has_aux=True), compiler_options=FAST)(variables)
  else:
    g, out = None, jax.jit(lambda v: loss(v)[1], compiler_options=FAST)(variables)
  return (g, out[0], out[1]) if train else (g, out, None)


def _assert_trees_close(a, b, *, rtol, atol_scale):
  """Leaves equal to rtol, with an absolute floor relative to the tree's largest entry.

  In train mode batch norm makes some gradients exactly zero in exact
  arithmetic (a single kept channel: rescaling it leaves the normalised
  output unchanged), which float32 gives as noise near 1e-6 of the scale.
  """
  fa, fb = sliced.flatten_tree(a), sliced.flatten_tree(b)
  assert fa.keys() == fb.keys()
  scale = max(float(np.max(np.abs(v))) for v in fa.values())
  for key in fa:
    np.testing.assert_allclose(np.asarray(fa[key]), np.asarray(fb[key]), rtol=rtol,
                               atol=atol_scale * scale, err_msg=key)


def _kept(c, dp):
  """Channels kept by hand: the first ceil(dp * C) (rounded against float noise)."""
  return max(1, math.ceil(round(dp * c, 6)))


def _check_zero_outside_slice(arch, grads, dp):
  """Masked gradients vanish on inputs beyond k and on outputs beyond the next layer's k."""
  layers = arch["layers"]
  params = [i for i, l in enumerate(layers) if l["kind"] in ("conv", "sconv", "dense")]
  for pos, i in enumerate(params):
    g = grads["layers"][i]
    if arch["profiles"] is not None and i in (params[0], params[-1]):
      continue
    kernel = np.asarray(g["kernel"])
    c_in = kernel.shape[-2] if kernel.ndim == 4 else None
    if layers[i]["idp"] and c_in is not None:
      k = _kept(c_in, dp)
      assert not kernel[..., k:, :].any(), (i, "inputs beyond k")
      assert not np.asarray(g["gamma"])[k:].any(), (i, "gamma beyond k")
    nxt = params[pos + 1] if pos + 1 < len(params) else None
    if nxt is not None and layers[nxt]["idp"]:
      n = _kept(kernel.shape[-1], dp)
      assert not kernel[..., n:].any(), (i, "outputs beyond the next layer's k")
      if "bn" in g:
        assert not np.asarray(g["bn"]["scale"])[n:].any(), (i, "bn scale beyond n")


# (model, train mode, DPs whose gradients are compared); logits at every DP in DPS.
# Eval mode of the conv blocks at depth: test_nn_models (VGG-16), test_nn_layers (MobileNet).
CASES = [("mlp", False, DPS), ("mlp", True, DPS), ("tesla_mlp", False, DPS),
         ("tesla_mlp", True, DPS), ("sconv_net", False, ()), ("sconv_net", True, (0.25,)),
         ("binary_net", True, (0.5,)), ("rgb_first_idp", True, (0.25, 0.5))]


@pytest.mark.parametrize("name,train,grad_dps", CASES)
def test_masked_equals_sliced(name, train, grad_dps):
  model, x, proj = _setup(name)
  arch, variables = model.arch, model.pure_variables()
  masked = _masked_fn(model, train, proj, grads=bool(grad_dps))
  for dp in DPS:
    g_m, y_m, stats_m = masked(x, dp)
    g_s, y_s, stats_s = _sliced(arch, variables, x, dp, train, proj, grads=dp in grad_dps)
    rtol = 1e-4 if train else 1e-5
    np.testing.assert_allclose(y_m, y_s, rtol=rtol, atol=1e-5 * float(jnp.max(jnp.abs(y_m))))
    if train and stats_s:
      _assert_trees_close(stats_m.to_pure_dict(), stats_s, rtol=1e-4, atol_scale=1e-5)
    if g_s is not None:
      _check_zero_outside_slice(arch, g_m.to_pure_dict(), dp)
      _assert_trees_close(g_m.to_pure_dict(), g_s, rtol=1e-3, atol_scale=1e-4)


def test_train_mode_updates_only_computed_channels():
  _, x, _ = _setup("tesla_mlp")
  arch = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1],
                             width_multiplier=0.2)
  # Hidden layers of 20 units with batch norm; IDP on the second dense layer.
  arch["layers"][1].update(bn=True)
  model = models.build(arch, rngs=_rngs())
  variables = model.pure_variables()
  _, stats = jax.jit(lambda v: sliced.apply_sliced(arch, v, x, 0.25, train=True))(variables)
  before = np.asarray(variables["layers"][1]["bn"]["mean"])
  after = np.asarray(stats["layers"][1]["bn"]["mean"])
  k = _kept(20, 0.25)
  assert k == 5
  np.testing.assert_array_equal(after[k:], before[k:])
  # Computed channels: m * old + (1 - m) * batch mean of the pre-BN activations.
  h = x.reshape(x.shape[0], -1) @ np.asarray(variables["layers"][1]["kernel"])[:, :k]
  np.testing.assert_allclose(after[:k], 0.9 * before[:k] + 0.1 * h.mean(0), rtol=1e-5,
                             atol=1e-6)


def test_sliced_graph_has_kept_weight_shapes():
  arch = _arch("vgg16")  # widths 4, 4 | 8, 8 | 16 x3 | 32 x3 | 32 x3, FC 32
  abstract = nnx.eval_shape(lambda: models.build(arch, rngs=_rngs()))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  with conv.forced("xla"):  # every convolution as one lax.conv, to read its filter shape
    jaxpr = jax.make_jaxpr(lambda v, x: sliced.apply_sliced(arch, v, x, 0.5))(
        abstract.pure_variables(), x)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 13
  filters = [tuple(e.invars[1].aval.shape) for e in convs]
  # Conv 1 (complete) keeps its 3 inputs and computes the 2 of 4 outputs conv 2 keeps;
  # every IDP conv sees ceil(C/2) inputs and computes ceil(M/2) outputs.
  expected = [(3, 3, 3, 2), (3, 3, 2, 2), (3, 3, 2, 4), (3, 3, 4, 4), (3, 3, 4, 8),
              (3, 3, 8, 8), (3, 3, 8, 8), (3, 3, 8, 16)] + [(3, 3, 16, 16)] * 5
  assert filters == expected
  dots = [tuple(e.invars[1].aval.shape) for e in jaxpr.eqns
          if e.primitive.name == "dot_general"]
  assert dots == [(16, 16), (16, 10)]


def test_sliced_model_compiles_once_per_dp():
  model, x, _ = _setup("tesla_mlp", batch=4)
  runner = sliced.SlicedModel.from_model(model)
  y1 = runner(x, 0.5)
  y2 = runner(x + 1.0, 0.5)
  half, quarter = spec.widths_at_dp(model.arch, 0.5), spec.widths_at_dp(model.arch, 0.25)
  assert runner.trace_count == 1 and runner.compiled_widths == (half,)
  runner(x, 0.25)
  assert runner.trace_count == 2 and runner.compiled_widths == (quarter, half)
  runner(x, list(half))  # the same widths given as a vector reuse the executable
  runner(x, 0.5)
  assert runner.trace_count == 2
  np.testing.assert_allclose(y1, model(x, 0.5, train=False), rtol=1e-5, atol=1e-6)
  assert not np.allclose(y1, y2)
  assert sliced.SlicedModel.from_model(model).trace_count == 0  # the cache is per instance


def test_sliced_variables_are_small():
  model, _, _ = _setup("tesla_mlp", batch=4)
  runner = sliced.SlicedModel.from_model(model)
  compact = runner.sliced_variables(0.25)
  # 784 -> 20 (complete) -> 20 (IDP, keeps 5) -> 10.
  assert compact["layers"][1]["kernel"].shape == (784, 5)
  assert compact["layers"][2]["kernel"].shape == (5, 20)
  assert compact["layers"][2]["gamma"].shape == (5,)
  assert compact["layers"][3]["kernel"].shape == (20, 10)


@pytest.mark.parametrize("dp", [0.0, -0.5, 1.5])
def test_sliced_model_rejects_bad_dp(dp):
  model, x, _ = _setup("mlp", batch=2)
  runner = sliced.SlicedModel.from_model(model)
  with pytest.raises(ValueError, match="dp must be in"):
    runner(x, dp)
  with pytest.raises(ValueError, match="dp must be in"):
    sliced.apply_sliced(model.arch, model.pure_variables(), x, dp)


def test_sliced_model_rejects_mismatched_variables():
  model, _, _ = _setup("mlp", batch=2)
  variables = model.pure_variables()
  other = models.architecture("mlp", num_classes=10, input_shape=[28, 28, 1],
                              width_multiplier=0.3)
  with pytest.raises(ValueError, match="shape"):
    sliced.SlicedModel(other, variables)
  del variables["layers"][2]["gamma"]
  with pytest.raises(ValueError, match="missing"):
    sliced.SlicedModel(model.arch, variables)


def test_variable_shapes_match_the_module():
  for name in ("mlp", "binary_net", "sconv_net"):
    model = models.build(_arch(name), rngs=_rngs())
    got = jax.tree.map(lambda a: tuple(a.shape), model.pure_variables())
    assert got == sliced.variable_shapes(model.arch)


def test_bf16_compute_float32_logits():
  model32, x, _ = _setup("sconv_net")
  arch = model32.arch
  model16 = models.build(arch, rngs=_rngs(), dtype=jnp.bfloat16)
  nnx.update(model16, nnx.state(model32))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(model16.pure_variables()))
  run = nnx.jit(lambda m, x: m(x, 0.5, train=False))
  y16, y32 = run(model16, x), run(model32, x)
  ys = jax.jit(lambda v, x: sliced.apply_sliced(arch, v, x, 0.5, dtype=jnp.bfloat16))(
      model16.pure_variables(), x)
  assert y16.dtype == ys.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(y32)))
  np.testing.assert_allclose(y16, y32, atol=0.05 * scale)
  np.testing.assert_allclose(ys, y32, atol=0.05 * scale)


# --------------------------------------------------------------------------
# Export / load
# --------------------------------------------------------------------------

_LOAD_ALONE = """
import json, sys
import numpy as np
from dynscale.nn import sliced
model = sliced.load(sys.argv[1])
x = np.load(sys.argv[2])
out = {str(dp): np.asarray(model(x, dp)).tolist() for dp in (0.25, 0.5)}
print(json.dumps({"out": out, "flax": "flax" in sys.modules,
                  "layers": "dynscale.nn.layers" in sys.modules}))
"""


def test_export_load_reproduces_the_masked_model(tmp_path):
  model, x, _ = _setup("sconv_net")
  directory = sliced.export(model, tmp_path / "net")
  assert sorted(p.name for p in directory.iterdir()) == ["architecture.json", "params.npz"]
  with open(directory / "architecture.json") as f:
    assert json.load(f) == model.arch
  with np.load(directory / "params.npz") as params:
    assert "layers/1/depthwise_kernel" in params.files
    np.testing.assert_array_equal(params["layers/1/kernel"],
                                  model.pure_variables()["layers"][1]["kernel"])
  loaded = sliced.load(directory)
  masked = nnx.jit(lambda m, x, dp: m(x, dp, train=False))
  for dp in (0.25, 0.5, 1.0):
    np.testing.assert_allclose(loaded(x, dp), masked(model, x, dp), rtol=1e-5, atol=1e-6)
  # A fresh interpreter loads it with dynscale.nn.sliced alone: no Flax, no model classes.
  np.save(tmp_path / "x.npy", x)
  result = subprocess.run([sys.executable, "-c", _LOAD_ALONE, str(directory),
                           str(tmp_path / "x.npy")], capture_output=True, text=True,
                          check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert not report["flax"] and not report["layers"]
  for dp, out in report["out"].items():
    np.testing.assert_allclose(out, masked(model, x, float(dp)), rtol=1e-5, atol=1e-6)


def test_an_exports_digest_is_its_network(tmp_path):
  """Two exports of one network have one digest; a network with one weight
  changed, or a weight renamed, has another. Catches a digest of the
  architecture alone, or of the values without their names."""
  model, _, _ = _setup("sconv_net")
  first = sliced.export(model, tmp_path / "first")
  second = sliced.export(model, tmp_path / "second")
  assert sliced.export_digest(first) == sliced.export_digest(second)
  variables = model.pure_variables()
  variables["layers"][1]["kernel"] = variables["layers"][1]["kernel"].at[0, 0].add(1.0)
  changed = sliced.export(sliced.SlicedModel(model.arch, variables), tmp_path / "changed")
  assert sliced.export_digest(changed) != sliced.export_digest(first)
  with np.load(first / "params.npz") as params:
    arrays = dict(params)
  arrays["renamed"] = arrays.pop("layers/1/kernel")
  np.savez(second / "params.npz", **arrays)
  assert sliced.export_digest(second) != sliced.export_digest(first)


def test_export_mp_idp_network(tmp_path):
  arch = models.architecture("tesla_mlp", num_classes=10, input_shape=[28, 28, 1],
                             width_multiplier=0.2, mp_profiles=[[0, 0.3], [0.3, 1]])
  model = models.build(arch, rngs=_rngs())
  loaded = sliced.load(sliced.export(model, tmp_path))
  x = _setup("tesla_mlp")[1]
  for dp in (0.2, 0.7):
    np.testing.assert_allclose(loaded(x, dp), model(x, dp, train=False), rtol=1e-5,
                               atol=1e-6)
  # trimmed, it would be one profile's network, not the one its DP selects at load
  with pytest.raises(ValueError, match="widths: a trimmed export takes a single-profile"):
    sliced.export(model, tmp_path / "trimmed", widths=0.2)


def test_load_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="architecture.json"):
    sliced.load(tmp_path)
