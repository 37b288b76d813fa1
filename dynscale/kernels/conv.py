"""2-D convolution that picks its implementation per shape and backend (DESIGN invariant 11).

XLA:CPU runs some convolutions far below the machine's rate: a 3x3
convolution on a 2x2 map at batch 64 reached 2 GFLOP/s where the same
arithmetic as one matrix product reached 280, 1x1 convolutions and the
gradient of a 3-channel first layer ran at a third of a matmul, and
depthwise convolutions (``feature_group_count``) are slow at every size
(``benchmarks.conv_speed`` measures each shape). :func:`conv2d` computes
the same function, NHWC input and HWIO filters, with one of:

* ``"xla"``: ``lax.conv_general_dilated``;
* ``"patches"``: the ``kh x kw`` shifted, strided windows of the padded
  input concatenated along channels and multiplied by the reshaped filter
  in ONE ``dot`` (im2col); for a 1x1 kernel this is the plain matrix
  product over the (strided) pixels;
* ``"shifted"``: for a depthwise filter, the sum over taps of each shifted
  window times that tap's per-channel weights (multiply-adds, no dot), with
  a backward of its own that keeps only the input and the filter (its filter
  gradient: :func:`depthwise_filter_gradient`);
* ``"xla_patches_grad"``: ``lax.conv`` forward and input gradient, and the
  filter gradient as ONE im2col matrix product (the patches' transpose
  times the output gradient). XLA:CPU computes a dense convolution's
  filter gradient far below the matmul rate: 5 GFLOP/s for a 3x3
  convolution on 32x32x64 at batch 64, 6-7x slower than the product.
* ``"xla_patches_bwd"``: ``lax.conv`` forward, and both gradients those of
  the im2col product (the input gradient added back over the windows).
* ``"taps"``: for a dense filter on few input channels, the sum over taps
  and input channels of each shifted window's channel times that filter
  row (``kh kw C`` multiply-adds per output, one fused loop, no copy of the
  windows), with the im2col product's gradients.

:func:`implementation` is the rule: on GPU and TPU always ``"xla"``; on
CPU ``"shifted"`` for depthwise filters, ``"patches"`` for 1x1 kernels, for
outputs of at most 4x4 positions and for at most 4 input channels (a first
layer on RGB images) but ``"taps"`` for such a layer with at most 64 output
channels (the zoo's widest first layer; its forward ran 1.3-4x the product
form's up to 32 outputs and 1.1-1.5x at 64, where the product spends most
of its time writing the windows side by side), ``"xla_patches_grad"`` for at least 64 input channels
while XLA:CPU hands convolutions to YNNPACK (its default; the product
computed the filter gradient 1.1-7x faster there; below 64, 0.8-1.1x),
``"xla"`` otherwise (where XLA:CPU's forward and input gradient are at or
near the matmul rate). With convolutions out of YNNPACK, as
:func:`dynscale.host.tune_xla_cpu` sets, XLA's own backward ran 1.2-1.8x
the product form from 64 channels up, so ``"xla"`` there too, except for
strided convolutions: ``"xla_patches_bwd"`` (XLA's input gradient of a
stride-2 3x3 convolution ran at 0.41-0.68 of a matmul on 16-128 channels,
the product's at 0.60-0.77). The measurements behind it are in
docs/RESULTS.md (issue 9). Every implementation gives the same values and
gradients up to float rounding (tested against ``lax.conv`` for every kind,
stride, padding and odd size). :func:`forced` overrides the rule inside a
``with`` block, for benchmarks and tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Union

import jax
import jax.numpy as jnp

from dynscale import host

Array = jax.Array
Padding = Union[str, Sequence[tuple[int, int]]]

IMPLEMENTATIONS = ("xla", "patches", "shifted", "xla_patches_grad", "xla_patches_bwd", "taps")
# The most output positions (H_out * W_out) at which a CPU convolution is
# computed as one matrix product (RESULTS.md, issue 9: 4x4 and below).
CPU_PATCHES_MAX_POSITIONS = 16
# ... and with at most this many input channels (a first layer on RGB: XLA:CPU's
# filter gradient for it ran at a third of a matmul, im2col's at full rate).
CPU_PATCHES_MAX_INPUT_CHANNELS = 4
# ... of which those with at most this many output channels are computed as
# multiply-adds over taps (``"taps"``; measured up to 64, the zoo's widest).
CPU_TAPS_MAX_OUTPUT_CHANNELS = 64
# The fewest input channels at which a CPU convolution's filter gradient is one
# im2col matrix product while XLA:CPU runs convolutions in YNNPACK (RESULTS.md,
# issue 9: 1.1-7x faster than XLA:CPU's from 64 input channels up, 0.8-1.1x below).
CPU_PATCHES_GRAD_MIN_INPUT_CHANNELS = 64
# The fewest output positions at which a stride-1 depthwise filter gradient is summed
# over zero frames instead of windows (:func:`filter_gradient_form`).
CPU_FRAMED_FILTER_GRADIENT_MIN_POSITIONS = 256

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("conv_implementation",
                                                                     default=None)


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
  """Within the block, every convolution traced uses implementation ``name``.

  ``"patches"`` and ``"shifted"`` both mean the matmul-free-of-XLA-conv
  forms: ``"shifted"`` for depthwise filters, ``"patches"`` for the others.
  ``"xla_patches_grad"``, ``"xla_patches_bwd"`` and ``"taps"`` apply to dense
  convolutions; depthwise ones use ``"xla"`` under them. Grouped convolutions
  other than depthwise always use ``"xla"``. Functions already traced and
  cached by ``jit`` keep their implementation.
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
  token = _FORCED.set(name)
  try:
    yield
  finally:
    _FORCED.reset(token)


def _pads(size: int, k: int, stride: int, padding) -> tuple[int, int, int]:
  """(pad before, pad after, output size) along one spatial axis."""
  if padding == "VALID":
    return 0, 0, (size - k) // stride + 1
  if padding == "SAME":
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2, out
  lo, hi = padding
  return lo, hi, (size + lo + hi - k) // stride + 1


def _axis_padding(padding: Padding) -> tuple:
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), "
                       f"got {padding!r}")
    return padding, padding
  return tuple(tuple(p) for p in padding)


def output_shape(x_shape, f_shape, strides, padding: Padding) -> tuple[int, int]:
  """(H_out, W_out) of a convolution."""
  ph, pw = _axis_padding(padding)
  return (_pads(x_shape[1], f_shape[0], strides[0], ph)[2],
          _pads(x_shape[2], f_shape[1], strides[1], pw)[2])


def first_layer_on_rgb(f_shape, groups: int) -> bool:
  """A dense filter larger than 1x1 on at most ``CPU_PATCHES_MAX_INPUT_CHANNELS``
  input channels: on CPU computed by ``"taps"`` or ``"patches"``, by its outputs."""
  kh, kw, c_in, _ = f_shape
  return groups == 1 and kh * kw > 1 and c_in <= CPU_PATCHES_MAX_INPUT_CHANNELS


def implementation(x_shape, f_shape, strides, padding: Padding, groups: int,
                   backend: str | None = None) -> str:
  """The implementation :func:`conv2d` uses for these shapes (module docstring)."""
  channels = x_shape[3]
  depthwise = groups == channels and f_shape[2] == 1 and groups > 1
  forced_name = _FORCED.get()
  if forced_name is not None or groups not in (1, channels):
    if forced_name == "xla" or not (groups == 1 or depthwise):
      return "xla"
    if forced_name in ("xla_patches_grad", "xla_patches_bwd", "taps"):
      return "xla" if depthwise else forced_name
    return "shifted" if depthwise else "patches"
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  if depthwise:
    return "shifted"
  h, w = output_shape(x_shape, f_shape, strides, padding)
  if f_shape[0] * f_shape[1] == 1 or h * w <= CPU_PATCHES_MAX_POSITIONS:
    return "patches"
  if first_layer_on_rgb(f_shape, groups):
    return "taps" if f_shape[3] <= CPU_TAPS_MAX_OUTPUT_CHANNELS else "patches"
  if host.ynnpack_convolutions():
    return "xla_patches_grad" if f_shape[2] >= CPU_PATCHES_GRAD_MIN_INPUT_CHANNELS else "xla"
  return "xla_patches_bwd" if max(strides) > 1 else "xla"


def _padded(x: Array, f_shape, strides, padding: Padding) -> tuple[Array, int, int]:
  """``x`` zero-padded as the convolution pads it, and the output's ``(H_out, W_out)``."""
  (ph, pw), (sh, sw) = _axis_padding(padding), strides
  lh, rh, oh = _pads(x.shape[1], f_shape[0], sh, ph)
  lw, rw, ow = _pads(x.shape[2], f_shape[1], sw, pw)
  if lh or rh or lw or rw:
    x = jnp.pad(x, ((0, 0), (lh, rh), (lw, rw), (0, 0)))
  return x, oh, ow


def _windows(x: Array, f_shape, strides, padding: Padding) -> list[Array]:
  """The ``kh * kw`` shifted, strided windows ``(B, H_out, W_out, C)`` of padded ``x``."""
  (sh, sw), kh, kw = strides, f_shape[0], f_shape[1]
  x, oh, ow = _padded(x, f_shape, strides, padding)
  b, c = x.shape[0], x.shape[3]
  return [jax.lax.slice(x, (0, u, v, 0), (b, u + (oh - 1) * sh + 1, v + (ow - 1) * sw + 1, c),
                        (1, sh, sw, 1))
          for u in range(kh) for v in range(kw)]


def _im2col(x: Array, f_shape, strides, padding: Padding) -> Array:
  """The windows side by side along channels: ``(B H_out W_out, kh kw C)``."""
  windows = _windows(x, f_shape, strides, padding)
  cols = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
  return cols.reshape(-1, cols.shape[-1])


def _patches(x: Array, f: Array, strides, padding: Padding) -> Array:
  """im2col: the windows side by side along channels, times the ``(kh kw C, M)`` filter."""
  b, (oh, ow) = x.shape[0], output_shape(x.shape, f.shape, strides, padding)
  y = _im2col(x, f.shape, strides, padding) @ f.reshape(-1, f.shape[3])
  return y.reshape(b, oh, ow, f.shape[3])


def _xla_conv(x: Array, f: Array, strides, padding: Padding, groups: int = 1) -> Array:
  return jax.lax.conv_general_dilated(
      x, f, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv_patches_grad(x: Array, f: Array, strides, padding: Padding) -> Array:
  """``lax.conv`` whose filter gradient is one im2col matrix product.

  The backward keeps ``x`` and ``f`` (as autodiff of ``lax.conv`` does):
  the input gradient is ``lax.conv``'s own transpose, the filter gradient
  ``im2col(x)^T g``.
  """
  return _xla_conv(x, f, strides, padding)


def _xla_conv_patches_grad_fwd(x, f, strides, padding):
  return _xla_conv(x, f, strides, padding), (x, f)


def _xla_conv_patches_grad_bwd(strides, padding, residuals, g):
  x, f = residuals
  dx, = jax.linear_transpose(lambda x: _xla_conv(x, f, strides, padding), x)(g)
  df = _im2col(x, f.shape, strides, padding).T @ g.reshape(-1, g.shape[-1])
  return dx, df.reshape(f.shape).astype(f.dtype)


_xla_conv_patches_grad.defvjp(_xla_conv_patches_grad_fwd, _xla_conv_patches_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv_patches_bwd(x: Array, f: Array, strides, padding: Padding) -> Array:
  """``lax.conv`` whose gradients are those of the im2col product.

  The backward keeps ``x`` and ``f``, cuts the windows of ``x`` again and
  takes both gradients of ``im2col(x) f``: the filter gradient one product,
  the input gradient ``g f^T`` added back over the windows. XLA:CPU's own
  input gradient of a strided convolution (a convolution over a dilated
  input) ran at 0.4-0.5 of a matmul's rate on 16-32 input channels.
  """
  return _xla_conv(x, f, strides, padding)


def _xla_conv_patches_bwd_fwd(x, f, strides, padding):
  return _xla_conv(x, f, strides, padding), (x, f)


def _patches_gradients(strides, padding, residuals, g):
  """Both gradients of the im2col product at the saved ``(x, f)``."""
  x, f = residuals
  _, vjp = jax.vjp(lambda x, f: _patches(x, f, strides, padding), x, f)
  return vjp(g)


_xla_conv_patches_bwd.defvjp(_xla_conv_patches_bwd_fwd, _patches_gradients)


def _dense_multiply_add_taps(x: Array, f: Array, strides, padding: Padding) -> Array:
  """``sum_{u,v,c} window_{u,v}(x)[..., c] * f[u, v, c, :]``: a dense conv as multiply-adds."""
  windows = _windows(x, f.shape, strides, padding)
  rows = f.reshape(len(windows), f.shape[2], f.shape[3])
  y = None
  for window, taps in zip(windows, rows):
    for c in range(f.shape[2]):
      term = window[..., c:c + 1] * taps[c]
      y = term if y is None else y + term
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _taps_patches_bwd(x: Array, f: Array, strides, padding: Padding) -> Array:
  """A dense conv on few input channels as multiply-adds over taps and channels,
  whose gradients are those of the im2col product (differentiated as written,
  the multiply-adds would keep every window and sum the filter gradient in
  ``kh kw C`` separate reductions)."""
  return _dense_multiply_add_taps(x, f, strides, padding)


def _taps_patches_bwd_fwd(x, f, strides, padding):
  return _dense_multiply_add_taps(x, f, strides, padding), (x, f)


_taps_patches_bwd.defvjp(_taps_patches_bwd_fwd, _patches_gradients)


def _multiply_add_taps(x: Array, f: Array, strides, padding: Padding) -> Array:
  """``sum_{u,v} window_{u,v}(x) * f[u, v, 0, :]``: a depthwise conv as multiply-adds."""
  windows = _windows(x, f.shape, strides, padding)
  taps = f.reshape(-1, f.shape[3])
  y = windows[0] * taps[0]
  for window, tap in zip(windows[1:], taps[1:]):
    y = y + window * tap
  return y


def _multiply_add_taps_once(x: Array, f: Array, strides, padding: Padding) -> Array:
  """:func:`_multiply_add_taps` with the windows cut from the padded input behind an
  optimization barrier, so that the input is computed once.

  Without it XLA reads the centre window of a padded input as the input
  itself (a slice of a pad) and fuses the input's producer into the
  multiply-add loop, which computes it again: in MobileNetV2 the first
  block's depthwise computed the RGB stem (a multiply-add conv) a second
  time. With the barrier MobileNetV2's inference ran 2-13% faster, its
  train steps 0.5-2.5% slower (RESULTS.md, CompactNet), so only inference
  takes it.
  """
  padded, _, _ = _padded(x, f.shape, strides, padding)
  return _multiply_add_taps(jax.lax.optimization_barrier(padded), f, strides, "VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x: Array, f: Array, strides, padding: Padding) -> Array:
  """A depthwise conv as multiply-adds over taps, with a backward that keeps only ``x``, ``f``.

  Differentiated as written, the multiply-adds would save all ``kh kw``
  windows of ``x`` for the backward pass (nine copies of the input of a 3x3
  layer) and build the input gradient as nine zero-padded tensors summed;
  on CPU that memory traffic, not the arithmetic, was the time of
  MobileNetV2's train step (RESULTS.md, issue 9). Outside differentiation
  (inference) it is :func:`_multiply_add_taps_once`.
  """
  return _multiply_add_taps_once(x, f, strides, padding)


def _shifted_depthwise_fwd(x, f, strides, padding):
  return _multiply_add_taps(x, f, strides, padding), (x, f)


def _shifted_depthwise_bwd(strides, padding, residuals, g):
  """Input gradient: the output gradient, dilated by the stride and padded so that
  its stride-1 VALID windows line up with ``x``, correlated with the flipped filter
  (the transposed convolution); filter gradient: :func:`depthwise_filter_gradient`."""
  x, f = residuals
  (ph, pw), (sh, sw) = _axis_padding(padding), strides
  kh, kw = f.shape[0], f.shape[1]
  lh, rh, oh = _pads(x.shape[1], kh, sh, ph)
  lw, rw, ow = _pads(x.shape[2], kw, sw, pw)
  # dx[i] = sum_u g[(i + lh - u) / s] f[u]: pad so that window v of the result reads
  # position i + v of it, i.e. g's entry for tap u = kh - 1 - v (negative pads crop)
  dilated = jax.lax.pad(g, jnp.zeros((), g.dtype), (
      (0, 0, 0),
      (kh - 1 - lh, x.shape[1] + lh - (oh - 1) * sh - 1, sh - 1),
      (kw - 1 - lw, x.shape[2] + lw - (ow - 1) * sw - 1, sw - 1),
      (0, 0, 0)))
  dx = _multiply_add_taps(dilated, f[::-1, ::-1], (1, 1), "VALID")
  return dx, depthwise_filter_gradient(x, g, f.shape, strides, padding).astype(f.dtype)


FILTER_GRADIENT_FORMS = ("windows", "frames")


def depthwise_filter_gradient(x: Array, g: Array, f_shape, strides, padding: Padding,
                              form: str | None = None) -> Array:
  """The gradient of a depthwise convolution's filter ``f_shape`` ``(kh, kw, 1, C)``.

  ``df[u, v, 0, c] = sum_{n,i,j} x_pad[n, s i + u, s j + v, c] g[n, i, j, c]``, with
  ``g`` the output gradient ``(B, H_out, W_out, C)``. Per tap, either the tap's
  window of padded ``x`` times ``g`` (``form="windows"``), or padded ``x`` times
  ``g`` placed at the tap's offset in a zero frame the size of padded ``x``
  (``"frames"``): the same sum, as the frame is zero wherever the window does not
  reach. XLA:CPU's YNNPACK reduction reads a padded operand in place but copies
  a sliced one out first, so frames avoid writing ``kh kw`` windows of ``x`` at
  the price of summing over the frame's border and, at stride ``s``, its
  interleaved zeros. ``form=None`` takes :func:`filter_gradient_form`'s.
  """
  form = filter_gradient_form(g.shape, strides) if form is None else form
  if form not in FILTER_GRADIENT_FORMS:
    raise ValueError(f"form must be one of {FILTER_GRADIENT_FORMS} or None, got {form!r}")
  strides, kh, kw = tuple(strides), f_shape[0], f_shape[1]
  if form == "windows":
    taps = [jnp.sum(window * g, axis=(0, 1, 2))
            for window in _windows(x, f_shape, strides, padding)]
  else:
    sh, sw = strides
    x_pad, oh, ow = _padded(x, f_shape, strides, padding)
    height, width = x_pad.shape[1], x_pad.shape[2]
    zero = jnp.zeros((), g.dtype)

    def frame(u: int, v: int) -> Array:
      return jax.lax.pad(g, zero, ((0, 0, 0), (u, height - u - (oh - 1) * sh - 1, sh - 1),
                                   (v, width - v - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))

    taps = [jnp.sum(x_pad * frame(u, v), axis=(0, 1, 2)) for u in range(kh) for v in range(kw)]
  return jnp.stack(taps).reshape(f_shape)


def filter_gradient_form(g_shape, strides) -> str:
  """The form :func:`depthwise_filter_gradient` takes by default: ``"frames"`` at
  stride 1 with at least :data:`CPU_FRAMED_FILTER_GRADIENT_MIN_POSITIONS` output
  positions, ``"windows"`` otherwise (``benchmarks.conv_speed``'s depthwise
  records, RESULTS.md issue 9: at batch 64, stride 1, frames took 0.58-0.75 of
  the windows' time on 32x32 and 16x16 maps; on 8x8 the two traded places from
  one run to the next, on 4x4 frames took 1.27x; at stride 2, whose frames are
  four times the output, 3-4x)."""
  positions = g_shape[1] * g_shape[2]
  if tuple(strides) == (1, 1) and positions >= CPU_FRAMED_FILTER_GRADIENT_MIN_POSITIONS:
    return "frames"
  return "windows"


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def conv2d(x: Array, f: Array, strides=1, padding: Padding = "SAME",
           groups: int = 1) -> Array:
  """``lax.conv_general_dilated(x, f, ...)`` (NHWC, HWIO), computed the fastest way here.

  Args:
    x: ``(B, H, W, C)``.
    f: ``(kh, kw, C // groups, M)``, cast to ``x``'s dtype.
    strides: an int or ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"`` or ``((lo, hi), (lo, hi))``.
    groups: ``feature_group_count``; ``groups == C`` with ``f.shape[2] == 1``
      is a depthwise convolution.

  Returns:
    ``(B, H_out, W_out, M)`` in ``x``'s dtype.
  """
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  f = f.astype(x.dtype)
  name = implementation(x.shape, f.shape, strides, padding, groups)
  hashable = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  if name == "shifted":
    return _shifted_depthwise(x, f, strides, hashable)
  if name == "xla_patches_grad":
    return _xla_conv_patches_grad(x, f, strides, hashable)
  if name == "xla_patches_bwd":
    return _xla_conv_patches_bwd(x, f, strides, hashable)
  if name == "taps":
    return _taps_patches_bwd(x, f, strides, hashable)
  if name == "patches":
    return _patches(x, f, strides, padding)
  return _xla_conv(x, f, strides, padding, groups)
