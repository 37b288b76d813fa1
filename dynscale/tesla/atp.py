"""Trainable profiles (ATP, paper 000 §3.4): non-increasing projections.

TESLA's alternate training procedure (ATP) learns the IDP profile
``gamma = (gamma_1, ..., gamma_N)`` along with the weights: "We initialize
all coefficients as one and as long as any update of profile coefficients, we
manually clip the coefficients to keep the non-increasing property."

This module provides that projection (DESIGN.md invariant 5):

* ``clip_nonincreasing``: the paper's clip, read as a sweep from the first
  coefficient that caps each one at its (already clipped) predecessor,
  ``gamma_i <- min(gamma_i, gamma_{i-1})``, i.e. the running minimum. The
  paper does not spell the clip out; this is the reading that keeps
  ``gamma_1`` (the most important channel) and only ever lowers later ones.
* ``isotonic_nonincreasing``: the exact Euclidean projection onto
  ``{gamma_1 >= gamma_2 >= ... >= gamma_N}`` (isotonic regression), which
  pools violating neighbours to their mean instead of only lowering.

Both act on 1-D arrays and jit. An optional floor ``min_value`` (e.g. to
keep the profile positive) is applied after the projection,
``max(P(gamma), min_value)``; it keeps the order, and for ``isotonic`` the
result is still the exact projection onto the non-increasing vectors that are
``>= min_value`` (clamping an isotonic regression to a bound solves the
bounded problem).

``project_nonincreasing`` wraps them as an optax ``GradientTransformation``
to chain after any optimizer, so the projection composes and checkpoints
with the optimizer state. Since a projection acts on parameters, not on
updates, it rewrites the update ``u`` of each selected leaf ``p`` as
``P(p + u) - p``; ``optax.apply_updates`` then lands on ``P(p + u)`` up to
float rounding (one ulp: ``p + (q - p)`` need not equal ``q`` exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Projection = Callable[[Array], Array]
Mask = Union[Any, Callable[[Any], Any]]


@jax.jit
def clip_nonincreasing(gamma: Array) -> Array:
  """The paper's clip (000 §3.4): ``gamma_i <- min(gamma_i, gamma_{i-1})``.

  Applied in order from ``i = 2``, so each coefficient is capped by its
  clipped predecessor: the result is the running minimum of ``gamma``.
  ``gamma`` has shape ``(N,)``; returns the same shape and dtype.
  """
  _check_vector(gamma)
  return jax.lax.cummin(gamma, axis=0)


@jax.jit
def isotonic_nonincreasing(gamma: Array) -> Array:
  """Euclidean projection of ``gamma`` onto non-increasing vectors.

  Solves ``min_x ||x - gamma||^2`` s.t. ``x_1 >= ... >= x_N`` (isotonic
  regression) with the min-max formula

    x_i = min_{k <= i} max_{l >= i} mean(gamma[k..l]),

  the decreasing counterpart of the classical ``max_{k<=i} min_{l>=i}``
  formula for increasing regression (Barlow et al., 1972), obtained from it
  by negating ``gamma``. It gives the same values as pool-adjacent-violators.
  Vectorised over all blocks ``(k, l)``: O(N^2) time and memory (N = 4096
  takes a few 64 MB float32 buffers), no loops, jittable. Block sums are
  accumulated from each block's start, so a block of one is exact.

  ``gamma`` has shape ``(N,)``; returns the same shape and dtype. Low
  precision inputs (bf16) are computed in float32.
  """
  _check_vector(gamma)
  n = gamma.shape[0]
  dtype = jnp.promote_types(gamma.dtype, jnp.float32)
  y = gamma.astype(dtype)
  k = jnp.arange(n)[:, None]  # block start
  l = jnp.arange(n)[None, :]  # block end
  valid = l >= k
  block_sums = jnp.cumsum(jnp.where(valid, y[None, :], 0), axis=1)
  means = jnp.where(valid, block_sums / jnp.maximum(l - k + 1, 1).astype(dtype), -jnp.inf)
  # upper[k, i] = max_{l >= i} mean(y[k..l]); for i >= k only valid blocks enter.
  upper = jax.lax.cummax(means, axis=1, reverse=True)
  x = jnp.min(jnp.where(valid, upper, jnp.inf), axis=0)
  return x.astype(gamma.dtype)


PROJECTIONS: dict[str, Projection] = {
    "clip": clip_nonincreasing,
    "isotonic": isotonic_nonincreasing,
}


def _check_vector(gamma: Array) -> None:
  if jnp.ndim(gamma) != 1 or jnp.shape(gamma)[0] == 0:
    raise ValueError(
        f"profile must be a non-empty 1-D array (N,), got shape {jnp.shape(gamma)}")


def _check_min_value(min_value: Optional[float]) -> Optional[float]:
  if min_value is None:
    return None
  value = float(min_value)
  if not math.isfinite(value):
    raise ValueError(f"min_value must be a finite number or None, got {min_value}")
  return value


def projection(method: str = "clip", min_value: Optional[float] = None) -> Projection:
  """The profile projection named ``method`` (``PROJECTIONS``), with a floor.

  Returns ``gamma -> max(PROJECTIONS[method](gamma), min_value)`` (no floor
  when ``min_value`` is None), a jittable function on ``(N,)`` arrays.
  """
  if method not in PROJECTIONS:
    raise ValueError(f"method must be one of {tuple(PROJECTIONS)}, got {method!r}")
  base = PROJECTIONS[method]
  floor = _check_min_value(min_value)
  if floor is None:
    return base
  return lambda gamma: jnp.maximum(base(gamma), jnp.asarray(floor, gamma.dtype))


def project_nonincreasing(method: str = "clip", mask: Optional[Mask] = None,
                          min_value: Optional[float] = None
                          ) -> optax.GradientTransformation:
  """An optax transformation keeping selected profile leaves non-increasing.

  Chain it after the optimizer, e.g.
  ``optax.chain(optax.adam(1e-3), project_nonincreasing('isotonic', mask))``:
  for every selected leaf ``p`` (shape ``(N,)``) with incoming update ``u``
  it returns ``projection(method, min_value)(p + u) - p``. Other leaves pass
  through untouched.

  Args:
    method: ``'clip'`` (the paper's clip) or ``'isotonic'`` (exact Euclidean
      projection).
    mask: which leaves are profiles: None (all leaves), a pytree of bools
      matching the parameters, or a callable from parameters to such a
      pytree (see ``name_mask``). As in ``optax.masked``.
    min_value: optional floor applied after the projection.

  Returns:
    A ``GradientTransformation`` whose state is ``optax.EmptyState`` (inside
    ``optax.MaskedState`` with a mask), a pytree that checkpoints with the
    rest of the optimizer state. ``update`` needs ``params``.
  """
  project = projection(method, min_value)

  def project_leaf(path, update: Array, param: Array) -> Array:
    if jnp.ndim(param) != 1:
      raise ValueError(
          f"project_nonincreasing: leaf {jax.tree_util.keystr(path)} must be a 1-D "
          f"profile (N,), got shape {jnp.shape(param)}; select profiles with mask")
    target = project(param + update)
    return (target - param).astype(update.dtype)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "project_nonincreasing needs params: call tx.update(updates, state, params)")
    return jax.tree_util.tree_map_with_path(project_leaf, updates, params), state

  transform = optax.GradientTransformation(init_fn, update_fn)
  return transform if mask is None else optax.masked(transform, mask)


def name_mask(*names: str) -> Callable[[Any], Any]:
  """A mask callable selecting leaves whose path has a key or attribute in ``names``.

  E.g. ``name_mask('gamma')`` selects ``params['layer']['gamma']`` and the
  ``gamma`` attribute of an NNX module's parameter state.
  """
  if not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"names must be one or more non-empty strings, got {names!r}")
  wanted = frozenset(names)

  def selected(path, _) -> bool:
    return any(getattr(entry, "key", getattr(entry, "name", None)) in wanted
               for entry in path)

  return lambda params: jax.tree_util.tree_map_with_path(selected, params)


class AlternatingState(NamedTuple):
  """Step count and the inner optimizer's state."""
  count: Array
  inner: Any


def only_every_other_period(inner: optax.GradientTransformation, period: int,
                            phase: int) -> optax.GradientTransformation:
  """Runs ``inner`` only in periods ``phase, phase + 2, ...`` of ``period`` steps.

  Outside them the update is zero and ``inner``'s state is left untouched
  (no momentum, no decay), so two such transformations with phases 0 and 1
  alternate cleanly (ATP, 000 §3.4).
  """
  if period < 1 or phase not in (0, 1):
    raise ValueError(f"period must be >= 1 and phase 0 or 1, got {period}, {phase}")

  def init_fn(params):
    return AlternatingState(jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    active = (state.count // period) % 2 == phase
    new_updates, new_inner = jax.lax.cond(
        active, lambda: inner.update(updates, state.inner, params),
        lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner))
    return new_updates, AlternatingState(state.count + 1, new_inner)

  return optax.GradientTransformation(init_fn, update_fn)


def steps_in_phase(total_steps: int, period: int, phase: int) -> int:
  """How many of steps ``0 .. total_steps - 1`` fall in periods ``phase, phase
  + 2, ...`` of ``period`` steps: the updates :func:`only_every_other_period`
  hands to its inner optimizer, so the steps its learning-rate schedule counts."""
  cycles, rest = divmod(total_steps, 2 * period)
  return cycles * period + min(max(rest - phase * period, 0), period)


def alternating(weights: optax.GradientTransformation, profile: optax.GradientTransformation,
                *, period: int, is_profile: Mask, method: str = "clip",
                min_value: Optional[float] = None) -> optax.GradientTransformation:
  """ATP's optimizer (000 §3.4): weights and profiles updated in alternate periods.

  With step ``t`` (0-based) in period ``floor(t / period)``:

    even periods:  w <- w + weights(g_w),   gamma unchanged
    odd periods:   gamma <- P(gamma + profile(g_gamma)),   w unchanged

  where ``P`` is the non-increasing projection ``method`` (the paper's clip
  or the isotonic one). Each inner optimizer's state (momentum, ...) moves
  only in its own periods. ``is_profile`` selects the profile leaves: a bool
  pytree shaped like the parameters, or a callable from parameters to one
  (e.g. :func:`name_mask`; for an NNX network,
  :func:`dynscale.tesla.training.profile_mask` selects every profile by
  type). ``period=1`` alternates every step; ``period=steps_per_epoch``
  every epoch.
  """

  def labels(params):
    flags = is_profile(params) if callable(is_profile) else is_profile
    return jax.tree.map(lambda p: "profile" if p else "weights", flags)

  return optax.multi_transform(
      {"weights": only_every_other_period(weights, period, 0),
       "profile": only_every_other_period(
           optax.chain(profile, project_nonincreasing(method, min_value=min_value)), period, 1)},
      labels)
