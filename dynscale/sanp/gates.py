"""SANP's gates: saliency, binarization and the gated layer (paper 002, §3.1-3.3).

A gate sits on a convolution's output through the core's gate hook
(:mod:`dynscale.nn.layers`) and returns Eq. 3's per-sample, per-channel
multiplier ``s * b``: the saliency ``s`` rescales the channels it keeps and
the decision ``b`` zeroes the others exactly, so a closed channel costs
nothing (Eq. 4) and :func:`dynscale.nn.costs.sample_flops` counts it out.

* :class:`SPM` (the paper's Saliency-and-Pruning Module, Eq. 1, 5-6):
  ``s = W2 ReLU(W1 GAP(x))`` from the layer's input ``x``, then ``b`` by
  :func:`binarize` (Eq. 7-8). Eq. 2 writes ``b^l = Binarize(s^{l-1})``; the
  decision of layer ``l`` must come from the saliency of layer ``l``'s own
  channels, so it is read as ``s^l``.
* :class:`StaticSaliency` (§5.1's STATIC ablation): ``s`` is one learned
  vector per layer, the same for every sample; same binarization.
* :class:`FixedK` (§5.1's FIXED-K ablation): ``s`` from an SPM, ``b`` keeps
  the ``k`` channels of highest saliency per sample, ``k`` fixed per layer.

Every gate starts at ``s = 1`` (``W2 = 0``, bias one), where the
evaluation-mode decision keeps every channel: inserting gates into a
trained backbone leaves its evaluation-mode function unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dynscale.train import validation

Array = jax.Array

MIX_PER = ("sample", "step")


@dataclasses.dataclass(frozen=True)
class Binarization:
  """Improved semantic hashing (Kaiser & Bengio 2018), 002 Eq. 7-8.

  a, b: the saturating sigmoid ``max(0, min(1, a sigma(s + xi) - b))``.
  sigma: standard deviation of the training noise ``xi`` (the paper: 1).
  mix: probability that the forward uses the hard code ``s2`` rather than
    ``s1`` (the paper: half the time).
  mix_per: ``'sample'`` draws that choice per sample, ``'step'`` once per call.
  """

  a: float = 1.2
  b: float = 0.1
  sigma: float = 1.0
  mix: float = 0.5
  mix_per: str = "sample"

  def __post_init__(self):
    if not self.a > 0:
      raise ValueError(f"binarization.a must be > 0, got {self.a}")
    if not 0 <= self.b < self.a:
      raise ValueError(f"binarization.b must be in [0, a) = [0, {self.a}), got {self.b}")
    if not self.a / (1 + math.exp(-1)) - self.b > 0.5:
      raise ValueError(
          "binarization.a and binarization.b must open a gate at s = 1 (a sigmoid(1) - b > "
          "0.5), where every gate starts so that inserting it keeps the backbone's function; "
          f"got a={self.a}, b={self.b}")
    if not self.sigma >= 0:
      raise ValueError(f"binarization.sigma must be >= 0, got {self.sigma}")
    validation.fraction(self.mix, "binarization.mix")
    if self.mix_per not in MIX_PER:
      raise ValueError(f"binarization.mix_per must be one of {MIX_PER}, got {self.mix_per!r}")

  @property
  def opens_at(self) -> float:
    """The value of the binarized input (``z = (s - tau) / rho``; ``s`` itself
    before a calibration) above which the evaluation code opens: ``a sigma(z)
    - b = 0.5`` at ``z = logit((0.5 + b) / a)``, zero for the paper's ``a =
    1.2, b = 0.1`` (any ``a = 1 + 2b``)."""
    p = (0.5 + self.b) / self.a
    return math.log(p / (1 - p))


def saturating_sigmoid(s: Array, a: float, b: float) -> Array:
  """``max(0, min(1, a sigma(s) - b))`` (002 Eq. 7 without the noise)."""
  return jnp.clip(a * jax.nn.sigmoid(s) - b, 0.0, 1.0)


class Code(NamedTuple):
  """A binarization's output: the decision ``b`` the forward uses, and the relaxed
  code ``s1`` the cost loss reads (``sat(s)`` in evaluation)."""

  decision: Array
  relaxed: Array


def binarize(s: Array, key: Array | None, config: Binarization, *, train: bool) -> Code:
  """The pruning decision ``b`` of saliency ``s`` ``(B, C)``, 002 Eq. 7-8.

  Training: ``s1 = sat(s + xi)`` with ``xi ~ N(0, sigma^2)``, ``s2 = 1(s1 > 0.5)``;
  the forward uses ``s2`` with probability ``mix`` (per sample or per call)
  and ``s1`` otherwise, and the gradient always flows through ``s1``
  (``s1 + stop_gradient(s2 - s1)``). Evaluation: ``s2`` of ``sat(s)``, no noise.
  A code of 0 is an exact zero either way.
  """
  if not train:
    s1 = saturating_sigmoid(s, config.a, config.b)
    return Code((s1 > 0.5).astype(s.dtype), s1)
  noise_key, mix_key = jax.random.split(key)
  xi = config.sigma * jax.random.normal(noise_key, s.shape, s.dtype)
  s1 = saturating_sigmoid(s + xi, config.a, config.b)
  s2 = (s1 > 0.5).astype(s.dtype)
  hard = s1 + jax.lax.stop_gradient(s2 - s1)
  draws = (s.shape[0], 1) if config.mix_per == "sample" else (1, 1)
  use_hard = jax.random.bernoulli(mix_key, config.mix, draws)
  return Code(jnp.where(use_hard, hard, s1), s1)


def top_k_mask(s: Array, k: int) -> Array:
  """1 at the ``k`` largest entries of each row of ``s`` ``(B, C)``, else 0 (FIXED-K)."""
  _, index = jax.lax.top_k(s, k)
  return jnp.sum(jax.nn.one_hot(index, s.shape[-1], dtype=s.dtype), axis=-2)


def floored(decision: Array, mask: Array) -> Array:
  """``decision`` with the channels of ``mask`` open too (a layer's floor), the
  gradient still flowing through ``decision`` alone, as through a hard code
  (Eq. 8's straight-through): ``jnp.maximum`` would halve it where the code is
  1 already (a tie) and drop it where the soft code was raised to 1."""
  return decision + jax.lax.stop_gradient(jnp.maximum(decision, mask) - decision)


def kept_channels(keep: float, channels: int) -> int:
  """FIXED-K's ``k`` of a layer: ``keep`` of its channels, rounded, at least one."""
  return max(1, min(channels, round(keep * channels)))


def check_floor_fraction(floor_fraction: float) -> None:
  """Raises unless ``floor_fraction`` is a number (not a bool) in [0, 1]."""
  validation.fraction(floor_fraction, "sanp.floor_fraction", of="FIXED-K's k")


def layer_floor(channels: int, *, floor: int = 0, floor_fraction: float = 0.0,
                keep: float | None = None) -> int:
  """The channels a binarized gate over ``channels`` outputs keeps open for every
  sample: ``floor``, or ``floor_fraction`` of the layer's FIXED-K ``k`` at the
  budget (``kept_channels(keep, channels)``, rounded up) where that is larger
  (not in 002: a per-sample gate may otherwise starve a layer the budget gives
  ``k`` channels on average)."""
  check_floor_fraction(floor_fraction)
  if isinstance(floor, bool) or not isinstance(floor, int) or not 0 <= floor <= channels:
    raise ValueError(f"sanp.floor must be an integer in [0, {channels}] (the layer's "
                     f"channels), got {floor!r}")
  if not floor_fraction:
    return floor
  if keep is None:
    raise ValueError("sanp.floor_fraction needs FIXED-K's keep fraction at the budget")
  # the slack keeps a product such as 0.28 * 25 = 7.000000000000001 at 7
  return max(floor, math.ceil(floor_fraction * kept_channels(keep, channels) - 1e-9))


class NoiseKey(nnx.Variable):
  """A gate's noise stream: the raw data of its next PRNG key (uint32, so it
  checkpoints as a plain array and a resumed run draws what it would have)."""


class _Gate(nnx.Module):
  """Eq. 3's multiplier ``s * b`` from a saliency and a decision rule.

  ``deterministic``: decide as in evaluation even when the network runs in
  train mode (batch statistics), e.g. to estimate batch-norm statistics
  and costs under the gates the network will have at inference
  (:func:`set_deterministic`).
  """

  deterministic: bool = False

  def saliency(self, x: Array) -> Array:
    raise NotImplementedError

  def decide(self, s: Array, train: bool) -> Code:
    raise NotImplementedError

  def __call__(self, x: Array, y: Array, train: bool) -> Array:
    """Eq. 3's ``s * b``. In (stochastic) training, sows the saliency and the
    relaxed code as ``nnx.Intermediate`` ``saliency_out`` / ``relaxed_out`` for
    the cost loss (:mod:`dynscale.sanp.objective`), which pops them."""
    stochastic = train and not self.deterministic
    s = self.saliency(x).astype(jnp.float32)
    code = self.decide(s, stochastic)
    if stochastic:
      self.sow(nnx.Intermediate, "saliency_out", s)
      self.sow(nnx.Intermediate, "relaxed_out", code.relaxed)
    return s * code.decision


def set_deterministic(model: nnx.Module, value: bool) -> None:
  """Makes every gate of ``model`` decide as in evaluation (``True``) or not."""
  for gate in model.gates.values():
    gate.deterministic = value


class DecisionPoint(nnx.Variable):
  """Where a binarized gate's decision reads its saliency: ``threshold`` (``tau``)
  and ``temperature`` (``rho``), set by calibration, never trained."""


DECISION_POINTS = ("layer", "channel")


def _opening_ties(s: Array, tau: Array, rho: Array, target: Array) -> Array:
  """``tau``, or a point below the saliencies tied at it (halfway to the next
  lower one, or ``rho`` below) where opening the tie brings the open fraction
  along axis 0 closer to ``target`` than leaving it shut. A FIXED-K warm-up
  leaves the channels it never kept at exactly ``s = 1``: a split on that
  value shut all of them."""
  shut = jnp.mean(s > tau, axis=0)
  opened = jnp.mean(s >= tau, axis=0)
  below = jnp.max(jnp.where(s < tau, s, -jnp.inf), axis=0)
  lower = jnp.where(jnp.isfinite(below), (below + tau) / 2, tau - rho)
  return jnp.where(jnp.abs(opened - target) < jnp.abs(shut - target), lower, tau)


def decision_point(s: Array, open_fraction: float) -> tuple[Array, Array]:
  """The ``(tau, rho)`` under which ``(s - tau) / rho > 0`` for ``open_fraction``
  of the entries of the saliencies ``s`` ``(N, C)`` (as near as ties allow),
  with unit spread (``rho`` the standard deviation of ``s``), so the training
  noise ``sigma`` is measured against how far apart the channels' saliencies
  are."""
  if not 0 < open_fraction <= 1:
    raise ValueError(f"open_fraction must be in (0, 1], got {open_fraction}")
  s = jnp.asarray(s, jnp.float32)
  rho = jnp.maximum(jnp.std(s), 1e-6)
  return _opening_ties(s.ravel(), jnp.quantile(s, 1.0 - open_fraction), rho, open_fraction), rho


def channel_decision_points(s: Array, open_rates: Array) -> tuple[Array, Array]:
  """Per channel ``c`` of the saliencies ``s`` ``(N, C)``: ``rho_c``, the spread of
  ``s[:, c]`` over the samples, and ``tau_c``, halfway between the sample values
  around which ``s[:, c] > tau_c`` holds for ``round(open_rates[c] N)`` samples
  (half a spread beyond the extremes for a channel always or never open; a
  tie there opens or shuts whole, whichever is nearer the rate). So
  ``z = (s - tau) / rho`` measures each channel against how much its own
  saliency moves from image to image, not against how far apart the channels
  sit (:func:`decision_point`)."""
  s = jnp.asarray(s, jnp.float32)
  open_rates = jnp.asarray(open_rates, jnp.float32)
  if open_rates.shape != s.shape[-1:]:
    raise ValueError(f"open_rates must have shape ({s.shape[-1]},), got {open_rates.shape}")
  samples = s.shape[0]
  rho = jnp.maximum(jnp.std(s, axis=0), 1e-6)
  ordered = jnp.concatenate([s.min(0, keepdims=True) - rho, jnp.sort(s, axis=0),
                             s.max(0, keepdims=True) + rho])
  below = samples - jnp.round(open_rates * samples).astype(jnp.int32)  # closed samples
  lower = jnp.take_along_axis(ordered, below[None], axis=0)[0]
  upper = jnp.take_along_axis(ordered, below[None] + 1, axis=0)[0]
  return _opening_ties(s, (lower + upper) / 2, rho, open_rates), rho


class _BinarizedGate(_Gate):
  """A gate whose decision is :func:`binarize` of its saliency read at its
  decision point, ``z = (s - tau) / rho`` (``tau = 0``, ``rho = 1``, the paper's,
  until calibrated), with its own noise stream; the ``floor`` most salient
  channels of each sample stay open. The multiplier is still ``s * b``.

  The learned saliency is parametrized in decision units: a subclass learns
  ``z`` and the saliency is ``s = tau + rho z`` (:meth:`in_saliency_units`), so
  a calibration that narrows ``rho`` does not make every update of ``z``
  ``1 / rho`` times larger in the decisions (see
  :func:`dynscale.sanp.training.hand_off`).
  """

  def __init__(self, binarization: Binarization, floor: int, rngs: nnx.Rngs,
               points: tuple[int, ...] = ()):
    self.binarization = binarization
    self.floor = floor
    key = rngs.params()
    self.key_impl = str(jax.random.key_impl(key))
    self.noise = NoiseKey(jax.random.key_data(key))
    self.threshold = DecisionPoint(jnp.zeros(points, jnp.float32))
    self.temperature = DecisionPoint(jnp.ones(points, jnp.float32))

  def in_saliency_units(self, z: Array) -> Array:
    """``s = tau + rho z`` of the learned decision-unit output ``z``."""
    return self.threshold.value + self.temperature.value * z

  def split_at(self, split: Array, rho: Array) -> tuple[Array, Array]:
    """The decision point ``(tau, rho)`` that opens a saliency exactly where it
    is above ``split``: the code opens at ``z = opens_at``
    (:attr:`Binarization.opens_at`), so ``tau = split - rho opens_at``."""
    return split - rho * self.binarization.opens_at, rho

  def hand_off(self, source: FixedK, saliencies: Array, open_fraction: float) -> None:
    """Takes over the warmed-up FIXED-K gate ``source``, whose saliencies over
    some batches are ``saliencies`` ``(N, C)``: the decision point opens
    ``open_fraction`` of them, and what this gate learns is re-expressed in
    decision units, so its saliencies stay ``source``'s."""
    self.threshold.value, self.temperature.value = self.adopt(source, saliencies,
                                                              open_fraction)

  def adopt(self, source: FixedK, saliencies: Array, open_fraction: float
            ) -> tuple[Array, Array]:
    """Sets the learned part from ``source`` in decision units; returns ``(tau, rho)``."""
    raise NotImplementedError

  def next_key(self) -> Array:
    key, draw = jax.random.split(jax.random.wrap_key_data(self.noise.value, impl=self.key_impl))
    self.noise.value = jax.random.key_data(key)
    return draw

  def decide(self, s, train):
    z = (s - self.threshold.value) / self.temperature.value
    code = binarize(z, self.next_key() if train else None, self.binarization, train=train)
    if not self.floor:
      return code
    return code._replace(decision=floored(code.decision, top_k_mask(s, self.floor)))


def descriptor(x: Array) -> Array:
  """Eq. 5: the channel descriptor, global average pooling of ``x`` ``(B, H, W, C)``.

  Written as a product with a constant row of ``1 / HW``, not ``jnp.mean``:
  XLA:CPU fuses a reduction into the loop of whatever reads it (the gate's
  gather at inference) and then sums the strided map once per output
  element, 30-60 us per gate at batch 1; a product is its own kernel, one
  pass (RESULTS.md, issue 12)."""
  batch, height, width, channels = x.shape
  positions = x.astype(jnp.float32).reshape(batch, height * width, channels)
  # one row per image, a batched product that reads the map as laid out (one row
  # shared by the batch would make XLA transpose the map first)
  weights = jnp.full((batch, 1, height * width), 1.0 / (height * width), jnp.float32)
  return jnp.matmul(weights, positions)[:, 0]


class _SPMHead(nnx.Module):
  """Eq. 6's ``W2 ReLU(W1 d)``, ``W1: C_in -> C_out / r``, starting at ``s = 1``
  (``W2 = 0``, bias 1: its gradient is not zero, so the head learns from there)."""

  def __init__(self, c_in: int, c_out: int, reduction: int, rngs: nnx.Rngs):
    if not 1 <= reduction <= c_out:
      raise ValueError(f"sanp.reduction must be in [1, {c_out}] (the layer's output "
                       f"channels), got {reduction}")
    hidden = max(1, c_out // reduction)
    self.w1 = nnx.Linear(c_in, hidden, rngs=rngs)
    self.w2 = nnx.Linear(hidden, c_out, kernel_init=nnx.initializers.zeros,
                         bias_init=nnx.initializers.ones, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.w2(jax.nn.relu(self.w1(descriptor(x))))


class SPM(_BinarizedGate):
  """The Saliency-and-Pruning Module (002 Eq. 1-8): per-sample saliency from the
  layer's input, binarized.

  ``decision_point``: ``'layer'``, one ``(tau, rho)`` for the layer
  (:func:`decision_point`), or ``'channel'``, one per channel
  (:func:`channel_decision_points`; not in 002), both placed by a hand-off.
  """

  def __init__(self, c_in: int, c_out: int, *, reduction: int, binarization: Binarization,
               floor: int = 0, decision_point: str = "layer", rngs: nnx.Rngs):
    if decision_point not in DECISION_POINTS:
      raise ValueError(f"sanp.decision_point must be one of {DECISION_POINTS}, got "
                       f"{decision_point!r}")
    super().__init__(binarization, floor, rngs,
                     points=(c_out,) if decision_point == "channel" else ())
    self.head = _SPMHead(c_in, c_out, reduction, rngs)

  def saliency(self, x):
    return self.in_saliency_units(self.head(x))

  def adopt(self, source, saliencies, open_fraction):
    """``source``'s head with ``W2 / rho`` and ``(b2 - tau) / rho``. Per-channel
    decision points open each channel on as many of the samples as ``source``
    (FIXED-K's top ``k``) did, which over the layer is ``open_fraction``."""
    if self.threshold.value.ndim:
      rates = jnp.mean(top_k_mask(saliencies, source.k), axis=0)
      tau, rho = self.split_at(*channel_decision_points(saliencies, rates))
    else:
      tau, rho = self.split_at(*decision_point(saliencies, open_fraction))
    nnx.update(self.head, nnx.state(source.head, nnx.Param))
    self.head.w2.kernel.value = self.head.w2.kernel.value / rho
    self.head.w2.bias.value = (self.head.w2.bias.value - tau) / rho
    return tau, rho


class StaticSaliency(_BinarizedGate):
  """STATIC (002 §5.1): one learned saliency vector for every sample, binarized."""

  def __init__(self, c_out: int, *, binarization: Binarization, floor: int = 0,
               rngs: nnx.Rngs):
    super().__init__(binarization, floor, rngs)
    self.vector = nnx.Param(jnp.ones((c_out,), jnp.float32))

  def saliency(self, x):
    z = jnp.broadcast_to(self.vector.value, (x.shape[0], self.vector.value.shape[0]))
    return self.in_saliency_units(z)

  def adopt(self, source, saliencies, open_fraction):
    """Each channel's mean saliency, the ``open_fraction`` highest open."""
    del source
    mean = jnp.mean(saliencies, axis=0)
    tau, rho = self.split_at(*decision_point(mean[None], open_fraction))
    self.vector.value = (mean - tau) / rho
    return tau, rho


class FixedK(_Gate):
  """FIXED-K (002 §5.1): SPM saliency, keep the ``k`` most salient channels per sample."""

  def __init__(self, c_in: int, c_out: int, *, reduction: int, keep: float, rngs: nnx.Rngs):
    self.head = _SPMHead(c_in, c_out, reduction, rngs)
    self.k = kept_channels(keep, c_out)

  def saliency(self, x):
    return self.head(x)

  def decide(self, s, train):
    del train
    mask = top_k_mask(s, self.k)
    return Code(mask, mask)


VARIANTS = ("sanp", "static", "fixed_k")

GateFactory = Callable[[str, int, int, nnx.Rngs], nnx.Module]


def gate_factory(variant: str, *, reduction: int = 16,
                 binarization: Binarization = Binarization(),
                 keep: float | None = None, floor: int = 0,
                 floor_fraction: float = 0.0, decision_point: str = "layer") -> GateFactory:
  """The ``gate=`` factory of :func:`dynscale.nn.models.build` for ``variant``
  (one of :data:`VARIANTS`); ``keep`` is FIXED-K's fraction of channels at the
  budget (FIXED-K keeps it; the binarized gates' ``floor_fraction`` reads it),
  ``floor`` and ``floor_fraction`` what a binarized gate keeps open at least
  (:func:`layer_floor`), ``decision_point`` the SPMs' (:class:`SPM`)."""
  if variant not in VARIANTS:
    raise ValueError(f"sanp.variant must be one of {VARIANTS}, got {variant!r}")
  if variant == "fixed_k" and not (keep is not None and 0 < keep <= 1):
    raise ValueError(f"sanp.keep must be in (0, 1] for fixed_k, got {keep}")
  check_floor_fraction(floor_fraction)

  def factory(name: str, c_in: int, c_out: int, rngs: nnx.Rngs) -> nnx.Module:
    del name
    least = layer_floor(c_out, floor=floor, floor_fraction=floor_fraction, keep=keep)
    if variant == "sanp":
      return SPM(c_in, c_out, reduction=reduction, binarization=binarization, floor=least,
                 decision_point=decision_point, rngs=rngs)
    if variant == "static":
      return StaticSaliency(c_out, binarization=binarization, floor=least, rngs=rngs)
    return FixedK(c_in, c_out, reduction=reduction, keep=keep, rngs=rngs)
  return factory
