"""The convolution dispatcher: every implementation equals lax.conv, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynscale import host
from dynscale.kernels import conv

RNG = np.random.default_rng(0)

# (input H, W, C), (kh, kw, C_in per group, M), groups
SHAPES = {
    "dense 3x3": ((7, 5, 3), (3, 3, 3, 4), 1),
    "dense 1x1": ((5, 6, 4), (1, 1, 4, 3), 1),
    "dense 2x3 kernel": ((6, 7, 2), (2, 3, 2, 3), 1),
    "depthwise 3x3": ((7, 5, 4), (3, 3, 1, 4), 4),
    "depthwise on a 16x17 map": ((16, 17, 3), (3, 3, 1, 3), 3),  # stride 1 sums over frames
    "tiny map": ((2, 2, 5), (3, 3, 5, 6), 1),
}
PADDINGS = ["SAME", "VALID", ((1, 2), (0, 1)), ((3, 0), (0, 3))]


def _reference(x, f, strides, padding, groups):
  return jax.lax.conv_general_dilated(x, f, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def _filter_gradient_tolerance(x):
  """A filter gradient sums over batch and positions: its rounding grows with their root
  (1e-5 up to 100 of them, every shape here but the 16x17 map and the forms' 9x8)."""
  return 1e-5 * max(1.0, np.sqrt(x.shape[0] * x.shape[1] * x.shape[2] / 100))


def _arrays(shape, fshape):
  return (jnp.asarray(RNG.standard_normal((2, *shape)), jnp.float32),
          jnp.asarray(RNG.standard_normal(fshape), jnp.float32))


@pytest.mark.parametrize("impl", ["patches", "shifted", "xla_patches_grad", "xla_patches_bwd",
                                  "taps"])
@pytest.mark.parametrize("padding", PADDINGS, ids=["SAME", "VALID", "explicit", "wider than the kernel"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", list(SHAPES))
def test_every_implementation_equals_lax_conv(name, stride, padding, impl):
  shape, fshape, groups = SHAPES[name]
  x, f = _arrays(shape, fshape)
  strides = (stride, stride)
  if conv.output_shape(x.shape, f.shape, strides, padding)[0] < 1:
    pytest.skip("empty output")
  proj = jnp.asarray(RNG.standard_normal(_reference(x, f, strides, padding, groups).shape))

  def loss(fn, x, f):
    return jnp.sum(fn(x, f) * proj)

  with conv.forced(impl):
    got = jax.jit(lambda x, f: conv.conv2d(x, f, strides, padding, groups))(x, f)
    grads = jax.jit(jax.grad(lambda x, f: loss(
        lambda a, b: conv.conv2d(a, b, strides, padding, groups), x, f), argnums=(0, 1)))(x, f)
  want = _reference(x, f, strides, padding, groups)
  want_grads = jax.grad(lambda x, f: loss(
      lambda a, b: _reference(a, b, strides, padding, groups), x, f), argnums=(0, 1))(x, f)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  tol = _filter_gradient_tolerance(x)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl, fshape, groups", [("patches", (3, 3, 1, 4), 4),
                                                  ("shifted", (3, 3, 1, 4), 4),
                                                  ("taps", (3, 3, 4, 5), 1)])
def test_under_vmap_and_bf16(impl, fshape, groups):
  x, f = _arrays((5, 5, 4), fshape)
  xs = jnp.stack([x, 2 * x])
  with conv.forced(impl):
    batched = jax.vmap(lambda x: conv.conv2d(x, f, 2, "SAME", groups))(xs)
    half = conv.conv2d(x.astype(jnp.bfloat16), f, 1, "SAME", groups)
  for i in range(2):
    np.testing.assert_allclose(batched[i], _reference(xs[i], f, (2, 2), "SAME", groups),
                               rtol=1e-5, atol=1e-5)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), _reference(x, f, (1, 1), "SAME", groups),
                             rtol=0.05, atol=0.1)


def test_the_rule(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  dense, depthwise = (3, 3, 64, 64), (3, 3, 1, 64)
  rule = conv.implementation
  assert rule((64, 2, 2, 64), dense, (1, 1), "SAME", 1, "cpu") == "patches"
  assert rule((64, 4, 4, 64), dense, (1, 1), "SAME", 1, "cpu") == "patches"
  assert rule((64, 8, 8, 64), dense, (2, 2), "SAME", 1, "cpu") == "patches"  # 4x4 out
  assert rule((64, 8, 8, 64), dense, (1, 1), "SAME", 1, "cpu") == "xla_patches_grad"
  assert rule((64, 32, 32, 64), dense, (2, 2), "SAME", 1, "cpu") == "xla_patches_grad"
  assert rule((64, 8, 8, 63), (3, 3, 63, 64), (1, 1), "SAME", 1, "cpu") == "xla"
  assert rule((64, 32, 32, 3), (3, 3, 3, 128), (1, 1), "SAME", 1, "cpu") == "patches"
  assert rule((64, 32, 32, 3), (3, 3, 3, 64), (1, 1), "SAME", 1, "cpu") == "taps"
  assert rule((64, 32, 32, 3), (3, 3, 3, 8), (2, 2), "SAME", 1, "cpu") == "taps"
  assert rule((64, 4, 4, 3), (3, 3, 3, 8), (1, 1), "SAME", 1, "cpu") == "patches"  # 4x4 out
  assert rule((64, 32, 32, 3), (1, 1, 3, 8), (1, 1), "SAME", 1, "cpu") == "patches"
  assert rule((64, 32, 32, 8), (3, 3, 8, 64), (1, 1), "SAME", 1, "cpu") == "xla"
  # convolutions out of YNNPACK (host.tune_xla_cpu): XLA's own backward from 64 channels up
  monkeypatch.setenv("XLA_FLAGS", " ".join(host.XLA_CPU_FLAGS))
  assert rule((64, 8, 8, 64), dense, (1, 1), "SAME", 1, "cpu") == "xla"
  assert rule((64, 32, 32, 16), (3, 3, 16, 64), (1, 1), "SAME", 1, "cpu") == "xla"
  assert rule((64, 32, 32, 16), (3, 3, 16, 32), (2, 2), "SAME", 1, "cpu") == "xla_patches_bwd"
  assert rule((64, 32, 32, 64), dense, (1, 2), "SAME", 1, "cpu") == "xla_patches_bwd"
  assert rule((64, 2, 2, 64), dense, (1, 1), "SAME", 1, "cpu") == "patches"
  assert rule((64, 8, 8, 64), dense, (2, 2), "SAME", 1, "cpu") == "patches"  # 4x4 out
  monkeypatch.delenv("XLA_FLAGS")
  assert rule((64, 32, 32, 64), (1, 1, 64, 64), (1, 1), "SAME", 1, "cpu") == "patches"
  assert rule((64, 32, 32, 64), depthwise, (1, 1), "SAME", 64, "cpu") == "shifted"
  for backend in ("gpu", "tpu"):
    assert rule((64, 2, 2, 64), dense, (1, 1), "SAME", 1, backend) == "xla"
    assert rule((64, 8, 8, 64), depthwise, (1, 1), "SAME", 64, backend) == "xla"
  with conv.forced("xla"):
    assert rule((64, 2, 2, 64), dense, (1, 1), "SAME", 1, "cpu") == "xla"
  with conv.forced("shifted"):
    assert rule((64, 8, 8, 64), dense, (1, 1), "SAME", 1, "gpu") == "patches"
  with conv.forced("xla_patches_grad"):
    assert rule((64, 8, 8, 8), (3, 3, 8, 8), (1, 1), "SAME", 1, "gpu") == "xla_patches_grad"
    assert rule((64, 8, 8, 64), depthwise, (1, 1), "SAME", 64, "cpu") == "xla"
  with conv.forced("xla_patches_bwd"):
    assert rule((64, 8, 8, 8), (3, 3, 8, 8), (1, 1), "SAME", 1, "gpu") == "xla_patches_bwd"
    assert rule((64, 8, 8, 64), depthwise, (1, 1), "SAME", 64, "cpu") == "xla"
  with conv.forced("taps"):
    assert rule((64, 8, 8, 8), (3, 3, 8, 8), (1, 1), "SAME", 1, "gpu") == "taps"
    assert rule((64, 8, 8, 64), depthwise, (1, 1), "SAME", 64, "cpu") == "xla"
  with pytest.raises(ValueError, match="implementation must be one of"):
    with conv.forced("winograd"):
      pass


@pytest.mark.parametrize("form", conv.FILTER_GRADIENT_FORMS)
@pytest.mark.parametrize("padding", PADDINGS, ids=["SAME", "VALID", "explicit", "wider than the kernel"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_depthwise_filter_gradient_forms_equal_lax_conv(form, stride, padding):
  x, f = _arrays((9, 8, 3), (3, 2, 1, 3))
  strides = (stride, stride)
  out, vjp = jax.vjp(lambda f: _reference(x, f, strides, padding, 3), f)
  g = jnp.asarray(RNG.standard_normal(out.shape), jnp.float32)
  got = conv.depthwise_filter_gradient(x, g, f.shape, strides, padding, form)
  tol = _filter_gradient_tolerance(x)
  np.testing.assert_allclose(got, vjp(g)[0], rtol=tol, atol=tol)


def test_filter_gradient_form_rule():
  form = conv.filter_gradient_form
  assert form((64, 16, 16, 8), (1, 1)) == "frames"
  assert form((64, 32, 8, 8), (1, 1)) == "frames"      # 256 positions
  assert form((64, 15, 16, 8), (1, 1)) == "windows"    # 240
  assert form((64, 16, 16, 8), (2, 2)) == "windows"
  x, f = _arrays((4, 4, 2), (3, 3, 1, 2))
  with pytest.raises(ValueError, match="form must be one of"):
    conv.depthwise_filter_gradient(x, x, f.shape, (1, 1), "SAME", "im2col")


# implementation -> (input H, W, C), filter, groups: the forms with a backward of their own
OWN_BACKWARD = {"shifted": ((9, 9, 4), (3, 3, 1, 4), 4),
                "xla_patches_grad": ((9, 9, 4), (3, 3, 4, 5), 1),
                "xla_patches_bwd": ((9, 9, 4), (3, 3, 4, 5), 1),
                "taps": ((9, 9, 3), (3, 3, 3, 5), 1)}


@pytest.mark.parametrize("impl", list(OWN_BACKWARD))
@pytest.mark.parametrize("stride", [1, 2])
def test_own_backward_saves_only_its_inputs(impl, stride):
  """The backward keeps x and f: not the kh kw windows of x, which autodiff of
  the multiply-adds or of im2col would save (nine times the input of a 3x3 layer)."""
  shape, fshape, groups = OWN_BACKWARD[impl]
  x, f = _arrays(shape, fshape)
  with conv.forced(impl):
    _, vjp = jax.vjp(lambda x, f: conv.conv2d(x, f, stride, "SAME", groups), x, f)
  saved = sum(leaf.size for leaf in jax.tree.leaves(vjp))
  assert saved == x.size + f.size


@pytest.mark.parametrize("impl", list(OWN_BACKWARD))
def test_own_backward_second_order_and_vmapped_gradients(impl):
  _, fshape, groups = OWN_BACKWARD[impl]
  x, f = _arrays((6, 7, fshape[2] * groups), fshape)
  xs = jnp.stack([x, -0.5 * x])

  def grad_norm(fn, x, f):  # reverse over reverse: the gradient's norm, differentiated
    g = jax.grad(lambda x, f: jnp.sum(jnp.sin(fn(x, f))), argnums=(0, 1))(x, f)
    return sum(jnp.sum(t ** 2) for t in g)

  ours = lambda x, f: conv.conv2d(x, f, 2, "SAME", groups)
  ref = lambda x, f: _reference(x, f, (2, 2), "SAME", groups)
  with conv.forced(impl):
    got = jax.jit(jax.grad(lambda x, f: grad_norm(ours, x, f), argnums=(0, 1)))(x, f)
    batched = jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(ours(x, f)))))(xs)
  want = jax.grad(lambda x, f: grad_norm(ref, x, f), argnums=(0, 1))(x, f)
  for g, w in zip(got, want):  # float32 rounding scales with the largest entries (~250)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=max(1e-4, 2e-6 * float(jnp.abs(w).max())))
  for i in range(2):
    np.testing.assert_allclose(
        batched[i], jax.grad(lambda x: jnp.sum(jnp.sin(ref(x, f))))(xs[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, in_ynnpack", [
    ("", True),
    ("--xla_cpu_multi_thread_eigen=false", True),
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", False),
    ("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", True),
    ("--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_dot", True),
    ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot", True),
    ("--xla_cpu_experimental_ynn_fusion_type=individual_dot", False),
    ("--xla_cpu_experimental_ynn_fusion_type=", False),
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution", True),  # the last wins
])
def test_where_xla_puts_convolutions_is_read_from_its_flags(flags, in_ynnpack):
  assert host.ynnpack_convolutions(flags) is in_ynnpack


def _fusions_reading(hlo: str, parameter: int) -> list[str]:
  """The fusions of a compiled program's entry computation that read its ``parameter``."""
  entry = hlo[hlo.index("\nENTRY"):].splitlines()
  name = next(line.split("=")[0].strip() for line in entry if f"parameter({parameter})" in line)
  return [line.split("=")[0].strip() for line in entry
          if "fusion(" in line and f"{name}," in line.replace(")", ",")]


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the multiply-add forms are the CPU rule's; elsewhere lax.conv")
def test_a_depthwise_conv_reads_its_input_and_never_recomputes_it():
  """XLA reads a padded input's centre window as the input itself and fused the input's
  producer, here an RGB conv as multiply-adds (MobileNetV2's stem), into the depthwise
  loop, which computed it a second time; the windows come from behind a barrier."""
  def stem_then_depthwise(x, stem, depthwise):
    y = jnp.clip(conv.conv2d(x, stem, 2, "SAME"), 0, 6)
    return conv.conv2d(y, depthwise, 1, "SAME", groups=y.shape[-1])
  x, stem, depthwise = jnp.ones((4, 16, 16, 3)), jnp.ones((3, 3, 3, 8)), jnp.ones((3, 3, 1, 8))
  assert conv.implementation(x.shape, stem.shape, (2, 2), "SAME", 1) == "taps"
  hlo = jax.jit(stem_then_depthwise).lower(x, stem, depthwise).compile().as_text()
  assert len(_fusions_reading(hlo, 1)) == 1  # the stem's filters: one loop computes it
