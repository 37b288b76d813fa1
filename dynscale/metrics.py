"""Accounting: analytic FLOPs and parameter counts, the survey's measures, XLA cross-check.

Per-layer costs
    The FLOPs of a convolutional layer follow SANP (Chen et al., *Self-Adaptive
    Network Pruning*, §4.1.1)::

        FLOPs = H · W · (C_in · k² + 1) · C_out

    where H, W and C_out are the height, width and channel count of the output
    features, C_in the channel count of the input features, k the kernel size,
    and the ``+ 1`` the bias. As in SANP, **one multiply-add counts as one
    FLOP**, and the bias add counts as one more per output element. Every
    function takes the ACTIVE input and output channel counts, so the same
    formula serves a full layer, a sliced (DP) layer, or any channel selection.
    Dense, depthwise and pointwise layers are the same formula specialised
    (``H = W = k = 1``; one filter per channel; ``k = 1``).

Parameter counts
    Weights plus bias. Batch-norm counts its two trainable vectors (scale and
    offset); its running mean and variance are state, not parameters.

Survey measures
    Cheng et al., *Model Compression and Acceleration for Deep Neural Networks*
    (survey), §VII, Eq. 8-10: compression rate, index space saving, speedup rate.

XLA cross-check
    :func:`xla_flops` reads the ``'flops'`` entry of XLA's cost analysis of a
    compiled function. XLA counts a multiply-add in a dot or convolution as
    **2** flops and an elementwise add (the bias) as 1, so for a dense or an
    unpadded ("VALID") convolution::

        xla_flops(layer without bias) == 2 · analytic(bias=False)
        xla_flops(layer with bias)    == 2 · analytic(bias=True) − outputs

    For "SAME" padding XLA skips the taps that land in the zero padding, so it
    reports fewer flops than ``2 · analytic`` by the border fraction (about 16%
    for a 3×3 kernel on an 8×8 map, shrinking as the map grows).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

Kernel = int | tuple[int, int]

# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
  """Returns ``value`` as an int, or raises ValueError naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _check_positive_real(name: str, value: Any) -> float:
  """Returns ``value`` as a float, or raises ValueError naming ``name``."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or
      value <= 0):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return float(value)


def _kernel_area(kernel: Kernel) -> int:
  """k² for an int kernel, kh·kw for a ``(kh, kw)`` pair."""
  if isinstance(kernel, tuple):
    if len(kernel) != 2:
      raise ValueError(f"kernel must be a positive int or a (kh, kw) pair, got {kernel!r}")
    return _check_positive_int("kernel[0]", kernel[0]) * _check_positive_int("kernel[1]", kernel[1])
  return _check_positive_int("kernel", kernel)**2


# --------------------------------------------------------------------------
# Analytic FLOPs (SANP §4.1.1; one multiply-add = one FLOP)
# --------------------------------------------------------------------------


def sanp_flops(h_out, w_out, c_in, c_out, kernel_area, bias):
  """SANP §4.1.1's ``H·W·(C_in·k² + b)·C_out`` with no checks: the one FLOPs formula.

  Every argument may be a Python int or a ``jnp`` array (e.g. per-sample
  active channel counts ``(B,)`` under a gate, traced), so static widths and
  per-sample gating are costed by the same expression. ``b`` is 1 for a
  layer with a bias and 0 without.
  """
  return h_out * w_out * (c_in * kernel_area + int(bias)) * c_out


def conv_flops(h_out: int,
               w_out: int,
               c_in: int,
               c_out: int,
               kernel: Kernel,
               *,
               bias: bool = True) -> int:
  """FLOPs of a convolution, SANP §4.1.1: ``H·W·(C_in·k² + 1)·C_out``.

    Args:
      h_out, w_out: spatial size of the OUTPUT feature map.
      c_in, c_out: active input and output channels.
      kernel: ``k`` (square, counts ``k²``) or ``(kh, kw)`` (counts ``kh·kw``).
      bias: with ``False`` the ``+ 1`` is dropped.

    Returns:
      Multiply-adds (plus one add per output for the bias), as an int.
    """
  h = _check_positive_int("h_out", h_out)
  w = _check_positive_int("w_out", w_out)
  ci = _check_positive_int("c_in", c_in)
  co = _check_positive_int("c_out", c_out)
  return sanp_flops(h, w, ci, co, _kernel_area(kernel), bias)


def dense_flops(c_in: int, c_out: int, *, bias: bool = True) -> int:
  """FLOPs of a dense layer, ``(C_in + 1)·C_out``: :func:`conv_flops` with H = W = k = 1."""
  return conv_flops(1, 1, c_in, c_out, 1, bias=bias)


def depthwise_conv_flops(h_out: int,
                         w_out: int,
                         channels: int,
                         kernel: Kernel,
                         *,
                         bias: bool = True) -> int:
  """FLOPs of a depthwise convolution, ``H·W·(k² + 1)·C``.

    Each of the ``C`` channels has its own ``k×k`` filter over one input
    channel: the SANP formula with ``C_in = 1`` and ``C_out = C``.
    """
  c = _check_positive_int("channels", channels)
  return conv_flops(h_out, w_out, 1, c, kernel, bias=bias)


def pointwise_conv_flops(h_out: int,
                         w_out: int,
                         c_in: int,
                         c_out: int,
                         *,
                         bias: bool = True) -> int:
  """FLOPs of a 1×1 convolution, ``H·W·(C_in + 1)·C_out`` (SANP formula with k = 1)."""
  return conv_flops(h_out, w_out, c_in, c_out, 1, bias=bias)


# --------------------------------------------------------------------------
# Parameter counts (weights + bias)
# --------------------------------------------------------------------------


def conv_params(c_in: int, c_out: int, kernel: Kernel, *, bias: bool = True) -> int:
  """Parameters of a convolution: ``k²·C_in·C_out`` weights ``+ C_out`` biases.

    The weight is ``(kh, kw, C_in, C_out)`` (HWIO), the bias ``(C_out,)``.
    """
  ci = _check_positive_int("c_in", c_in)
  co = _check_positive_int("c_out", c_out)
  area = _kernel_area(kernel)
  return area * ci * co + (co if bias else 0)


def dense_params(c_in: int, c_out: int, *, bias: bool = True) -> int:
  """Parameters of a dense layer: ``C_in·C_out + C_out`` (kernel ``(C_in, C_out)``, bias)."""
  return conv_params(c_in, c_out, 1, bias=bias)


def depthwise_conv_params(channels: int, kernel: Kernel, *, bias: bool = True) -> int:
  """Parameters of a depthwise convolution: ``k²·C + C`` (weight ``(kh, kw, 1, C)``, bias)."""
  c = _check_positive_int("channels", channels)
  return conv_params(1, c, kernel, bias=bias)


def pointwise_conv_params(c_in: int, c_out: int, *, bias: bool = True) -> int:
  """Parameters of a 1×1 convolution: ``C_in·C_out + C_out``."""
  return conv_params(c_in, c_out, 1, bias=bias)


def batchnorm_params(c: int) -> int:
  """Trainable parameters of batch-norm over ``c`` channels: ``2C`` (scale and offset).

    The running mean and variance are statistics, not parameters, and are not
    counted.
    """
  return 2 * _check_positive_int("c", c)


# --------------------------------------------------------------------------
# Per-layer records and whole-model totals
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """The analytic cost of one layer.

    Attributes:
      name: layer name, e.g. ``"conv1"``.
      kind: layer kind, e.g. ``"conv"``, ``"dense"``, ``"depthwise"``, ``"bn"``.
      flops: FLOPs (one multiply-add = one FLOP), a non-negative int.
      params: parameter count, a non-negative int.
    """

  name: str
  kind: str
  flops: int
  params: int

  def __post_init__(self) -> None:
    for field in ("flops", "params"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{field} must be a non-negative integer, got {value!r}")


def total(costs: Iterable[LayerCost]) -> LayerCost:
  """Whole-model totals: a ``LayerCost`` named ``"total"`` summing FLOPs and params."""
  costs = list(costs)
  if not costs:
    raise ValueError("costs must be a non-empty sequence of LayerCost, got an empty one")
  return LayerCost(
      name="total",
      kind="total",
      flops=sum(int(c.flops) for c in costs),
      params=sum(int(c.params) for c in costs),
  )


def format_table(costs: Sequence[LayerCost]) -> str:
  """A per-layer text table (name, kind, FLOPs, params) ending with a totals row."""
  summary = total(costs)
  header = ("layer", "kind", "FLOPs", "params")
  rows = [(c.name, c.kind, f"{c.flops:,}", f"{c.params:,}") for c in costs]
  last = (summary.name, "", f"{summary.flops:,}", f"{summary.params:,}")
  widths = [max(len(r[i]) for r in (header, *rows, last)) for i in range(4)]

  def line(row: tuple[str, str, str, str]) -> str:
    return "  ".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(row, widths))).rstrip()

  rule = "-" * len(line(header))
  return "\n".join([line(header), rule, *map(line, rows), rule, line(last)])


# --------------------------------------------------------------------------
# Survey measures (Cheng et al., §VII, Eq. 8-10)
# --------------------------------------------------------------------------


def compression_rate(params_original: float, params_compressed: float) -> float:
  """Compression rate, survey Eq. 8: ``α(M, M*) = a / a*``.

    Args:
      params_original: ``a``, the number of parameters of the original model M.
      params_compressed: ``a*``, that of the compressed model M*.
    """
  a = _check_positive_real("params_original", params_original)
  a_star = _check_positive_real("params_compressed", params_compressed)
  return a / a_star


def index_space_saving(dims_original: float, dims_compressed: float) -> float:
  """Index space saving, survey Eq. 9: ``β(M, M*) = (a − a*) / a*``.

    Here ``a`` and ``a*`` are the number of dimensions of the index space of the
    original and the compressed model (the survey, after its refs. [30], [71]).
    Equivalently ``β = α − 1`` when both count the same thing.
    """
  a = _check_positive_real("dims_original", dims_original)
  a_star = _check_positive_real("dims_compressed", dims_compressed)
  return (a - a_star) / a_star


def speedup_rate(time_original: float, time_compressed: float) -> float:
  """Speedup rate, survey Eq. 10: ``δ(M, M*) = s / s*``.

    Args:
      time_original: ``s``, the running time of the original model M.
      time_compressed: ``s*``, that of the compressed model M*.
    """
  s = _check_positive_real("time_original", time_original)
  s_star = _check_positive_real("time_compressed", time_compressed)
  return s / s_star


# --------------------------------------------------------------------------
# XLA cross-check
# --------------------------------------------------------------------------


def _cost_entry(cost: Any, key: str) -> float:
  """Entry ``key`` of a cost analysis: a dict, or (older JAX) a list of one dict."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not isinstance(cost, dict) or key not in cost:
    raise RuntimeError(f"XLA cost analysis reported no {key!r} entry, got {cost!r}")
  return float(cost[key])


def _compiled(fn: Callable[..., Any], args: tuple, static_argnums) -> jax.stages.Compiled:
  return jax.jit(fn, static_argnums=static_argnums).lower(*args).compile()


def xla_flops(fn: Callable[..., Any], *args: Any,
              static_argnums: int | Sequence[int] = ()) -> float:
  """XLA's flop count for ``jax.jit(fn, static_argnums=...)(*args)``.

    Reads ``jax.jit(fn).lower(*args).compile().cost_analysis()['flops']``.
    XLA counts a multiply-add in a dot/convolution as 2 flops, so this is about
    ``2 ×`` the analytic multiply-adds of this module (see the module docstring
    for the exact relation and the SAME-padding border effect).

    Raises:
      RuntimeError: if XLA's cost analysis gives no ``'flops'`` entry.
    """
  return _cost_entry(_compiled(fn, args, static_argnums).cost_analysis(), "flops")


def xla_cost(fn: Callable[..., Any], *args: Any,
             static_argnums: int | Sequence[int] = ()) -> dict[str, float]:
  """XLA's ``{"flops", "bytes_accessed"}`` for ``jax.jit(fn)(*args)``, one compile.

    ``flops`` as :func:`xla_flops`. ``bytes_accessed`` is the cost analysis'
    ``'bytes accessed'``: every top-level operation's operand and output bytes
    after fusion, the memory traffic of a program whose every fused kernel
    streams its operands once (caches that serve a repeated read make the real
    traffic smaller). Their ratio is the program's arithmetic intensity.

    Raises:
      RuntimeError: if XLA's cost analysis lacks either entry.
    """
  return compiled_cost(_compiled(fn, args, static_argnums))


def compiled_cost(compiled: jax.stages.Compiled) -> dict[str, float]:
  """:func:`xla_cost` of a program already compiled, e.g.
  ``jitted.lower(*args).compile()`` after ``jitted(*args)`` ran (JAX's cache
  then serves the compile).

    Raises:
      RuntimeError: if XLA's cost analysis lacks either entry.
    """
  cost = compiled.cost_analysis()
  return {"flops": _cost_entry(cost, "flops"),
          "bytes_accessed": _cost_entry(cost, "bytes accessed")}
