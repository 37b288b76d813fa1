"""The platform simulator: a table of measured unit latencies (paper 004 §3.1, Fig. 2).

The network is cut into *units*, each a run of consecutive layers writing
one trimmable group (:mod:`dynscale.compactnet.trimming`): the first conv, a
MobileNetV2 stage (all its blocks: their outputs are one tied group), the
last conv with the pooling and classifier after it. A unit's latency
depends on the widths of the trimmable groups it reads and writes (a stage:
its input and output width; its expansions follow them). Each group has a
*grid* of widths; the table holds every unit's latency at every point of
the grid of its groups, measured on the platform, and predicts a trimmed
network's latency as the sum over units of the multilinear interpolation
(§3.1: "by simply summing up the latency of each layer with the trimmed
number of input and output channels"). A width off a group's grid is an
error, never an extrapolation.

Measuring: every entry is its unit built alone (:func:`unit_architecture`)
at the platform's batch, resolution and dtype, compiled, warmed up and run
in interleaved rounds with ``block_until_ready`` (:mod:`dynscale.timing`);
the estimator (median, min or 10% quantile) is named in the table.
Per-unit sums count each unit's dispatch and memory traffic once per unit,
which a whole network does not; and a unit timed alone finds its weights
in cache, which in a whole network at batch 1 the other units' weights
have pushed out (RESULTS.md: about 0.12 ms per MiB of weights on the
2-core machine). So the table also holds the bytes of every unit's
variables over the same grid (counted, not measured), and an optional
*calibration* (measured ~ ``scale x sum + per_mib x MiB + offset``, the
MiB of the network's variables), fitted on whole-network variants disjoint
from the ones the table is validated on, is stored with the table.

A table is JSON with its provenance (platform, device, JAX versions, XLA
flags, date, load, warm-up, rounds, estimator, spread per entry) and a
SHA-256 of its contents: :func:`load` refuses a truncated or edited file,
and :func:`check_matches` a table of another model, platform, batch, dtype
or thread count.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import interpolate

from dynscale import bound, host, timing
from dynscale.compactnet import platform as platforms
from dynscale.compactnet import trimming
from dynscale.compactnet.platform import Platform
from dynscale.io import write_json_atomic
from dynscale.nn import sliced, spec

FORMAT = "dynscale.compactnet.latency_table/1"
# A unit's grid may not have more points than this (a unit reading many
# independent expansion groups would take hours to measure).
MAX_UNIT_ENTRIES = 400

# The forms of a calibration and the terms each fits, fewer terms first: the
# raw sum of units; a scale; scale and offset; and a term per MiB of the
# network's variables.
_FORM_TERMS = {"raw": (), "scale": ("scale",), "affine": ("scale", "offset"),
               "affine+weights": ("scale", "per_mib", "offset")}
CALIBRATION_FORMS = tuple(_FORM_TERMS)
# Calibrations on fewer whole networks fit no offset.
AFFINE_MIN_NETWORKS = 8
# Held-out errors closer than this are a tie (float rounding of exact fits).
_FLOAT_TIE = 1e-9

# {name: (architecture, variables)} -> {name: {"latency_s": ..., "spread": ...}}
Measure = Callable[[Mapping[str, tuple[dict, dict]]], dict[str, dict[str, float]]]


# --------------------------------------------------------------------------
# Units and grids
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
  """Layers ``start .. stop - 1`` of the network; ``dims``: the trimmable
  groups (indices into the group tuple) its latency depends on."""

  name: str
  start: int
  stop: int
  dims: tuple[int, ...]


def _controller(groups: Sequence[trimming.TrimGroup]) -> dict[int, int]:
  """``{core width-vector index: trimmable group}`` for every group and follower."""
  out = {}
  for k, g in enumerate(groups):
    out[g.index] = k
    out.update({j: k for j, _ in g.followers})
  return out


def units(arch: dict, groups: Sequence[trimming.TrimGroup]) -> tuple[Unit, ...]:
  """The units of ``arch`` (module docstring): a new unit starts at each
  layer writing a trimmable group other than the current unit's."""
  arch = spec.validate_architecture(arch)
  g = spec.graph(arch)
  position = {grp.id: j for j, grp in enumerate(g.prunable)}
  controller = _controller(groups)
  starts, writes = [], None
  for node in g.nodes:
    out = controller.get(position.get(node.slots["out"], -1))
    if node.kind in spec.PARAMETRIC_KINDS and out is not None and out != writes:
      starts.append(node.index)
      writes = out
  if not starts:
    raise ValueError("the network has no trimmable layer")
  starts[0] = 0
  bounds = list(zip(starts, starts[1:] + [len(arch["layers"])]))
  out = []
  for start, stop in bounds:
    dims = sorted({controller[position[gid]] for node in g.nodes[start:stop]
                   for gid in node.slots.values()
                   if gid in position and position[gid] in controller})
    out.append(Unit(f"layers.{start}-{stop - 1}", start, stop, tuple(dims)))
  return tuple(out)


def group_grid(size: int, points: int, min_fraction: float, round_to: int = 1
               ) -> tuple[int, ...]:
  """About ``points`` widths from ``min_fraction x size`` to ``size``, each a
  multiple of ``round_to`` (or ``size`` itself), evenly spread."""
  if isinstance(points, bool) or not isinstance(points, int) or points < 2:
    raise ValueError(f"grid_points must be an int >= 2, got {points!r}")
  if not 0 < min_fraction <= 1:
    raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
  if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
    raise ValueError(f"round_to must be a positive int, got {round_to!r}")
  values = np.linspace(min_fraction * size, size, points) / round_to
  rounded = {max(1, int(v)) * round_to for v in np.round(values)}
  return tuple(sorted({min(w, size) for w in rounded} | {size}))


def on_grid(width: int, size: int, round_to: int) -> bool:
  """True when ``width`` is a width the search may choose: a multiple of
  ``round_to``, or the full ``size``."""
  return width == size or width % round_to == 0


def unit_architecture(arch: dict, unit: Unit, core: Sequence[int]) -> dict:
  """Unit ``unit`` of ``arch`` alone, trimmed to the core width vector ``core``:
  its input is the trimmed tensor entering layer ``unit.start``; a map
  output is flattened to make it a valid network (not timed:
  :func:`timed_forward`)."""
  trimmed = spec.trimmed_architecture(arch, list(core))
  nodes = spec.graph(trimmed).nodes
  layers = [dict(layer) for layer in trimmed["layers"][unit.start:unit.stop]]
  out = nodes[unit.stop - 1].outputs
  if not out.flat:
    layers.append({"kind": "flatten"})
  return spec.validate_architecture({
      **{k: trimmed[k] for k in ("profile", "bn_momentum", "bn_epsilon")},
      "name": f"{arch['name']}/{unit.name}", "profiles": None,
      "input_shape": list(nodes[unit.start].inputs.shape()), "num_classes": out.size,
      "layers": layers})


def random_variables(arch: dict, seed: int = 0) -> dict:
  """Variables of ``arch`` for timing: kernels ~ N(0, 0.1^2), identity batch norm."""
  shapes = sliced.variable_shapes(arch)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32)
                                      for s in leaves])


def _identity_bn(variables: dict) -> dict:
  """``variables`` with every batch norm's running variance set to one (positive)."""
  if isinstance(variables, Mapping):
    if set(variables) == set(sliced.BN_LEAVES):
      return {**variables, "var": jnp.ones_like(variables["var"])}
    return {k: _identity_bn(v) for k, v in variables.items()}
  return variables


# --------------------------------------------------------------------------
# Measuring on the platform
# --------------------------------------------------------------------------


def measure_networks(platform: Platform, networks: Mapping[str, tuple[dict, dict]], *,
                     warmup: int = 2, rounds: int = 25, estimator: str = "min", burst: int = 1
                     ) -> dict[str, dict[str, float]]:
  """Latency of each ``(architecture, variables)`` network's sliced forward on
  ``platform`` (this process must be set up for it), interleaved. Each runs
  as a deployed network would, its variables bound (:func:`dynscale.bound.bind`):
  handed to the runtime one by one, MobileNetV2's 297 arrays cost 0.24 ms a
  call, 40% of its batch-1 latency on the 2-core machine (RESULTS.md)."""
  platforms.check_process(platform)
  dtype = jnp.dtype(platform.dtype)
  candidates = {}
  for name, (arch, variables) in networks.items():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(
        (platform.batch, *arch["input_shape"])), jnp.float32)
    fn = bound.bind(timed_forward(arch, dtype), variables)
    candidates[name] = lambda fn=fn, x=x: fn(x)
  stats = timing.interleaved_latencies(candidates, warmup=warmup, repeats=rounds,
                                       estimator=estimator, burst=burst)
  return {name: {"latency_s": s["latency_s"], "spread": s["spread"]}
          for name, s in stats.items()}


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def timed_forward(arch: dict, dtype=jnp.float32) -> Callable[[Mapping, jax.Array], jax.Array]:
  """``f(variables, x)``, the forward :func:`measure_networks` times: the sliced
  network in evaluation mode, without the ``flatten`` that
  :func:`unit_architecture` appends to a unit ending in a map. That reshape
  is free as an operation but not inside XLA:CPU's fusion: fused into the
  loop that computes the unit's last layer, it made that loop index the
  flat output: MobileNetV2's first convolution at batch 64 measured 5.92 ms
  as a unit with it and 0.64 ms without on a Zen 4 core (RESULTS.md,
  CompactNet), so the table charged the first conv nine times its cost in
  the network, where its output feeds the next layer."""
  layers = arch["layers"]
  upto = len(layers) - 1 if layers[-1]["kind"] == "flatten" else len(layers)
  return lambda v, x: sliced.features_sliced(arch, v, x, 1.0, upto, dtype=dtype)


def fingerprint(arch: dict) -> str:
  """A short hash of what the (validated) architecture computes.

  The network's ``profile`` is left out when no layer is IDP: nothing reads
  it then, and a table built by ``benchmarks.compactnet_table`` (the models'
  default profile) serves a run whose config names another, as CompactNet's
  (``all-one``, from its IDP pretraining config)."""
  arch = spec.validate_architecture(arch)
  if not any(layer.get("idp") for layer in arch["layers"]):
    arch = {k: v for k, v in arch.items() if k != "profile"}
  return _digest(arch)[:16]


def _whole_fingerprint(arch: dict) -> str:
  """The hash of the whole validated architecture, ``profile`` included: the
  fingerprint of tables written before 2026-12-06, still accepted for the
  architecture they were built for."""
  return _digest(spec.validate_architecture(arch))[:16]


@dataclasses.dataclass(frozen=True)
class Table:
  """Measured unit latencies of one model on one platform (module docstring).

  grids: per trimmable group, its widths. round_to: the widths a network may
  have are multiples of it (or a group's full size). latencies / spreads:
  per unit, an array over the product of its dims' grids. weight_bytes:
  the same for the bytes of each unit's variables (None in tables built
  before they were counted). calibration: ``{"form", "scale", "per_mib",
  "offset", ...}`` (:meth:`with_calibration`) or None.
  """

  model: str
  model_fingerprint: str
  expansion: str
  platform: dict
  group_names: tuple[str, ...]
  group_sizes: tuple[int, ...]
  grids: tuple[tuple[int, ...], ...]
  round_to: int
  units: tuple[Unit, ...]
  latencies: tuple[np.ndarray, ...]
  spreads: tuple[np.ndarray, ...]
  provenance: dict
  calibration: dict | None = None
  weight_bytes: tuple[np.ndarray, ...] | None = None

  def check_widths(self, widths: Sequence[int]) -> None:
    """Raises unless ``widths`` (one per group) all lie within their grids
    and are multiples of ``round_to`` (or the full size)."""
    if len(widths) != len(self.grids):
      raise ValueError(f"widths must have one entry per trimmable group "
                       f"({list(self.group_names)}), got {len(widths)}")
    for name, grid, w in zip(self.group_names, self.grids, widths):
      if not grid[0] <= w <= grid[-1]:
        raise ValueError(f"widths[{name!r}] = {w} is off the latency table's grid "
                         f"[{grid[0]}, {grid[-1]}]: the table does not extrapolate")
      if not on_grid(w, grid[-1], self.round_to):
        raise ValueError(f"widths[{name!r}] = {w} is off the latency table's grid: widths "
                         f"must be multiples of round_to={self.round_to} or {grid[-1]}")

  def unit_latencies(self, widths: Sequence[int]) -> np.ndarray:
    """Interpolated latency of every unit at group ``widths``, seconds (uncalibrated)."""
    return self._interpolate(self.latencies, widths)

  def weight_mib(self, widths: Sequence[int]) -> float:
    """MiB of the variables of the network at group ``widths`` (interpolated
    between grid points, exact on them)."""
    if self.weight_bytes is None:
      raise ValueError("this latency table has no weight bytes (built before they were "
                       "counted); build it again")
    return float(np.sum(self._interpolate(self.weight_bytes, widths))) / 2**20

  def _interpolate(self, per_unit: Sequence[np.ndarray], widths: Sequence[int]) -> np.ndarray:
    """Every unit's grid array multilinearly interpolated at group ``widths``."""
    self.check_widths(widths)
    out = []
    for unit, values in zip(self.units, per_unit):
      axes = [(np.asarray(self.grids[d], float), float(widths[d])) for d in unit.dims]
      varying = [k for k, (grid, _) in enumerate(axes) if grid.shape[0] > 1]
      values = values.reshape([a[0].shape[0] for a in axes])
      values = values[tuple(slice(None) if k in varying else 0 for k in range(len(axes)))]
      if not varying:
        out.append(float(values))
        continue
      out.append(float(interpolate.interpn([axes[k][0] for k in varying], values,
                                           [axes[k][1] for k in varying], method="linear")[0]))
    return np.asarray(out)

  def raw(self, widths: Sequence[int]) -> float:
    """The sum of the units' latencies (§3.1), seconds."""
    return float(np.sum(self.unit_latencies(widths)))

  def predict(self, widths: Sequence[int]) -> float:
    """Predicted latency of the network at group ``widths`` (calibrated if the table is)."""
    raw = self.raw(widths)
    if self.calibration is None:
      return raw
    c = self.calibration
    return _calibrated(c, raw, self.weight_mib(widths) if c.get("per_mib") else 0.0)

  @property
  def full_widths(self) -> tuple[int, ...]:
    return self.group_sizes

  def speedup(self, widths: Sequence[int]) -> float:
    """Predicted speed-up over the original (survey 003 Eq. 10: s / s*)."""
    return self.predict(self.full_widths) / self.predict(widths)

  def with_calibration(self, raw: Sequence[float], measured: Sequence[float],
                       weight_mib: Sequence[float] | None = None,
                       forms: Sequence[str] = CALIBRATION_FORMS, **provenance) -> Table:
    """This table calibrated on whole networks: ``measured ~ scale x raw +
    per_mib x weight_mib + offset`` in a form of ``forms``
    (:data:`CALIBRATION_FORMS`) chosen by leaving each network out in turn.

    Each form is fitted by least squares on the relative errors (the ones a
    table is validated on) and scored by the mean ``|predicted / measured -
    1|`` of the networks it did not see; the form kept is the one with the
    fewest terms whose score is within one standard error of the best
    (the one-standard-error rule, Hastie et al., *Elements of Statistical
    Learning* §7.10). Held-out networks are the test because a form with
    more terms always fits its own networks better: on a quiet platform
    whose units add up (batch 64) the extra terms fit the timing noise and
    predict new trims worse than the raw sum (RESULTS.md, "Which
    calibration"). The affine forms need :data:`AFFINE_MIN_NETWORKS`
    networks (an offset fitted on a few close points extrapolates badly),
    ``affine+weights`` needs ``weight_mib``. The calibration records every
    admissible form's score and its standard error.
    """
    raw, measured = np.asarray(raw, float), np.asarray(measured, float)
    if raw.shape != measured.shape or raw.shape[0] < 2:
      raise ValueError("calibration needs matching raw and measured latencies of at least 2 "
                       "networks (its form is chosen by leaving one out)")
    if weight_mib is not None and np.shape(weight_mib) != raw.shape:
      raise ValueError("calibration needs one weight_mib per network")
    unknown = [f for f in forms if f not in CALIBRATION_FORMS]
    if not forms or unknown:
      raise ValueError(f"calibration forms must be a non-empty subset of "
                       f"{list(CALIBRATION_FORMS)}, got {list(forms)}")
    weights = np.zeros_like(raw) if weight_mib is None else np.asarray(weight_mib, float)
    admissible = [f for f in forms if _form_admissible(f, raw.shape[0], weight_mib is not None)]
    if not admissible:
      raise ValueError(f"none of the calibration forms {list(forms)} can be fitted on "
                       f"{raw.shape[0]} networks (the affine forms need {AFFINE_MIN_NETWORKS}, "
                       "affine+weights needs weight_mib)")
    held_out = {f: _held_out_errors(f, raw, weights, measured) for f in admissible}
    score = {f: float(np.mean(e)) for f, e in held_out.items()}
    best = min(admissible, key=score.get)
    standard_error = {f: float(np.std(e, ddof=1) / np.sqrt(e.shape[0]))
                      for f, e in held_out.items()}
    # _FLOAT_TIE: exact fits differ by float rounding only
    form = next(f for f in admissible
                if score[f] <= score[best] + standard_error[best] + _FLOAT_TIE)
    return dataclasses.replace(self, calibration={
        "form": form, **_fit_calibration(form, raw, weights, measured),
        "leave_one_out_mean_abs_error": score, "leave_one_out_standard_error": standard_error,
        "variants": int(raw.shape[0]), **provenance})

  def to_json(self) -> dict:
    body = {
        "format": FORMAT, "model": self.model, "model_fingerprint": self.model_fingerprint,
        "expansion": self.expansion, "platform": self.platform,
        "groups": [{"name": n, "size": s, "grid": list(g)} for n, s, g in
                   zip(self.group_names, self.group_sizes, self.grids)],
        "round_to": self.round_to,
        "units": [{"name": u.name, "start": u.start, "stop": u.stop,
                   "dims": [self.group_names[d] for d in u.dims],
                   "latency_s": [float(v) for v in lat.ravel()],
                   "spread": [float(v) for v in spr.ravel()]}
                  for u, lat, spr in zip(self.units, self.latencies, self.spreads)],
        "provenance": self.provenance, "calibration": self.calibration}
    if self.weight_bytes is not None:
      for unit, counted in zip(body["units"], self.weight_bytes):
        unit["weight_bytes"] = [int(v) for v in counted.ravel()]
    return {**body, "sha256": _digest(body)}


def _form_admissible(form: str, networks: int, has_weights: bool) -> bool:
  if form.startswith("affine") and networks < AFFINE_MIN_NETWORKS:
    return False
  return has_weights or form != "affine+weights"


def _calibrated(c: Mapping[str, float], raw, weight_mib):
  """``scale x raw + per_mib x weight_mib + offset`` of calibration ``c``."""
  return c["scale"] * raw + c.get("per_mib", 0.0) * weight_mib + c["offset"]


def _fit_calibration(form: str, raw: np.ndarray, weight_mib: np.ndarray,
                     measured: np.ndarray) -> dict[str, float]:
  """``{"scale", "per_mib", "offset"}`` of ``form``, its terms minimising the
  squared relative errors ``(predicted / measured - 1)^2`` over the networks
  (the raw sum: a scale of 1 and nothing else)."""
  terms = _FORM_TERMS[form]
  fitted = {"scale": 1.0, "per_mib": 0.0, "offset": 0.0}
  if terms:
    columns = {"scale": raw, "per_mib": weight_mib, "offset": np.ones_like(raw)}
    design = np.stack([columns[t] for t in terms], axis=1) / measured[:, None]
    solution = np.linalg.lstsq(design, np.ones_like(raw), rcond=None)[0]
    fitted.update({t: float(v) for t, v in zip(terms, solution)})
  return fitted


def _held_out_errors(form: str, raw: np.ndarray, weight_mib: np.ndarray,
                     measured: np.ndarray) -> np.ndarray:
  """``|predicted / measured - 1|`` of each network predicted by ``form``
  fitted on the others."""
  errors = []
  for k in range(raw.shape[0]):
    rest = np.arange(raw.shape[0]) != k
    fitted = _fit_calibration(form, raw[rest], weight_mib[rest], measured[rest])
    errors.append(abs(_calibrated(fitted, raw[k], weight_mib[k]) / measured[k] - 1))
  return np.asarray(errors)


def _digest(body: dict) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save(table: Table, path: str) -> None:
  """Writes ``table`` as JSON, atomically."""
  write_json_atomic(path, table.to_json())


def load(path: str) -> Table:
  """The table in ``path``; refuses a truncated, edited or foreign file."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"latency table {path} cannot be read (truncated or not JSON): {e}") from e
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise ValueError(f"latency table {path} is not a {FORMAT} file")
  digest = data.pop("sha256", None)
  if digest != _digest(data):
    raise ValueError(f"latency table {path} was edited or corrupted: its sha256 does not "
                     "match its contents; build it again")
  names = tuple(g["name"] for g in data["groups"])
  unit_list = tuple(Unit(u["name"], u["start"], u["stop"],
                         tuple(names.index(n) for n in u["dims"])) for u in data["units"])
  grids = tuple(tuple(g["grid"]) for g in data["groups"])
  return Table(
      model=data["model"], model_fingerprint=data["model_fingerprint"],
      expansion=data["expansion"], platform=data["platform"], group_names=names,
      group_sizes=tuple(g["size"] for g in data["groups"]), grids=grids,
      round_to=data["round_to"], units=unit_list,
      latencies=tuple(np.asarray(u["latency_s"], float) for u in data["units"]),
      spreads=tuple(np.asarray(u["spread"], float) for u in data["units"]),
      provenance=data["provenance"], calibration=data["calibration"],
      weight_bytes=(tuple(np.asarray(u["weight_bytes"], float) for u in data["units"])
                    if all("weight_bytes" in u for u in data["units"]) else None))


def _flags_bearing_on(platform: platforms.Platform, xla_flags: str) -> list[str]:
  """The entries of ``xla_flags`` XLA reads (:func:`dynscale.host.xla_flags_read`)
  that bear on ``platform``'s backend, sorted: on another backend than the
  CPU, not XLA:CPU's (``--xla_cpu_*``), which a process tunes or not."""
  read = host.xla_flags_read(xla_flags)
  return sorted(read if platform.backend == "cpu"
                else [flag for flag in read if not flag.startswith("--xla_cpu_")])


def check_matches(table: Table, arch: dict, platform: Platform, expansion: str,
                  where: str = "latency table") -> None:
  """Raises unless ``table`` was measured for this model, platform and grouping,
  under the XLA flags a process for ``platform`` runs with (those XLA reads
  that bear on its backend, in any order: :func:`_flags_bearing_on`)."""
  ours = fingerprint(arch)
  if table.model_fingerprint not in (ours, _whole_fingerprint(arch)):
    raise ValueError(f"{where} is for model {table.model!r} (fingerprint "
                     f"{table.model_fingerprint}), not this {arch['name']!r} ({ours})")
  expected = dataclasses.asdict(platform)
  for field in ("name", "backend", "batch", "resolution", "dtype", "threads"):
    if table.platform.get(field) != expected[field]:
      raise ValueError(f"{where} was measured with platform {field} "
                       f"{table.platform.get(field)!r}, this run needs {expected[field]!r}")
  if table.expansion != expansion:
    raise ValueError(f"{where} groups expansions as {table.expansion!r}, this run as "
                     f"{expansion!r}")
  measured_under = table.provenance.get("xla_flags")
  runs_under = platforms.environment(platform).get("XLA_FLAGS", "")
  if measured_under is not None and (_flags_bearing_on(platform, measured_under)
                                     != _flags_bearing_on(platform, runs_under)):
    raise ValueError(f"{where} was measured under XLA_FLAGS {measured_under!r}; a "
                     f"{platform.name} process here runs under {runs_under!r}: build the "
                     "table again (it holds the latencies of the XLA:CPU it ran on)")


def unit_entries(arch: dict, groups: Sequence[trimming.TrimGroup],
                 grids: Sequence[Sequence[int]], unit: Unit
                 ) -> list[tuple[tuple[int, ...], dict]]:
  """``(grid point, unit architecture)`` of every entry of ``unit``'s table, in
  row-major order; the groups the unit does not read stay at full width."""
  entries = []
  for point in itertools.product(*(grids[d] for d in unit.dims)):
    widths = [g.size for g in groups]
    for d, w in zip(unit.dims, point):
      widths[d] = w
    entries.append((point, unit_architecture(arch, unit,
                                             trimming.core_widths(arch, groups, widths))))
  return entries


def build(arch: dict, platform: Platform, measure: Measure, *, expansion: str = "tied",
          grid_points: int = 7, min_fraction: float = 0.25, round_to: int = 8,
          provenance: Mapping | None = None) -> Table:
  """Measures the table of ``arch`` on ``platform`` (module docstring).

  ``measure`` times a dict of networks (:func:`measure_networks` bound to the
  platform, or an injected one in tests); every entry of every unit is
  measured in the same interleaved rounds.
  """
  arch = spec.validate_architecture(arch)
  groups = trimming.trimmable_groups(arch, expansion)
  grids = [group_grid(g.size, grid_points, min_fraction, round_to) for g in groups]
  unit_list = units(arch, groups)
  networks, keys, shapes, counted = {}, [], [], {}
  for unit in unit_list:
    entries = unit_entries(arch, groups, grids, unit)
    if len(entries) > MAX_UNIT_ENTRIES:
      raise ValueError(f"unit {unit.name} has {len(entries)} grid entries (more than "
                       f"{MAX_UNIT_ENTRIES}); lower grid_points or use expansion='tied'")
    shapes.append([len(grids[d]) for d in unit.dims] or [1])
    keys.append([f"{unit.name}@{point}" for point, _ in entries])
    for key, (_, unit_arch) in zip(keys[-1], entries):
      networks[key] = (unit_arch, _identity_bn(random_variables(unit_arch)))
      counted[key] = sum(x.nbytes for x in jax.tree.leaves(networks[key][1]))
  stats = measure(networks)
  latencies, spreads, weight_bytes = [], [], []
  for unit_keys, shape in zip(keys, shapes):
    latencies.append(np.asarray([stats[k]["latency_s"] for k in unit_keys]).reshape(shape))
    spreads.append(np.asarray([stats[k]["spread"] for k in unit_keys]).reshape(shape))
    weight_bytes.append(np.asarray([counted[k] for k in unit_keys], float).reshape(shape))
  return Table(
      model=arch["name"], model_fingerprint=fingerprint(arch), expansion=expansion,
      platform=dataclasses.asdict(platform), group_names=tuple(g.name for g in groups),
      group_sizes=tuple(g.size for g in groups), grids=tuple(tuple(g) for g in grids),
      round_to=round_to, units=unit_list, latencies=tuple(latencies), spreads=tuple(spreads),
      weight_bytes=tuple(weight_bytes),
      provenance={"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"), "grid_points": grid_points, "min_fraction": min_fraction,
          "entries": len(networks), **(provenance or {})})


# --------------------------------------------------------------------------
# Whole networks: variants, prefixes, validation
# --------------------------------------------------------------------------


def trimmed_network(arch: dict, groups: Sequence[trimming.TrimGroup], widths: Sequence[int],
                    seed: int = 0) -> tuple[dict, dict]:
  """A whole network trimmed to group ``widths``, with timing variables."""
  trimmed = spec.trimmed_architecture(arch, list(trimming.core_widths(arch, groups, widths)))
  return trimmed, _identity_bn(random_variables(trimmed, seed))


def prefix_network(arch: dict, unit_list: Sequence[Unit], n: int) -> tuple[dict, dict]:
  """The first ``n`` units of ``arch`` at full width, as a network (Fig. 7)."""
  unit = Unit(f"first-{n}", 0, unit_list[n - 1].stop, ())
  prefix = unit_architecture(arch, unit, [g.size for g in spec.prunable_groups(arch)])
  return prefix, _identity_bn(random_variables(prefix))


def random_widths(table: Table, count: int, seed: int, low: float = 0.3) -> list[list[int]]:
  """``count`` seeded variants: each group's width uniform in [low, 1] x its
  size, rounded to a multiple of the table's ``round_to`` within its grid and
  not below ``low`` x its size (rounded down, a 32-channel group in steps of 8
  drew 8, a quarter, whenever the draw was under 0.375)."""
  rng = np.random.default_rng(seed)
  r = table.round_to
  lowest = [max(grid[0], r * math.ceil(round(low * size / r, 9)))
            for size, grid in zip(table.group_sizes, table.grids)]
  return [[int(np.clip(round(rng.uniform(low, 1.0) * size / r) * r, least, grid[-1]))
           for size, grid, least in zip(table.group_sizes, table.grids, lowest)]
          for _ in range(count)]


def validation_report(table: Table, variants: Sequence[Sequence[int]],
                      measured: Sequence[float], measured_original: float) -> dict:
  """Predicted vs measured latency and speed-up of ``variants``: relative errors
  ``|predicted / measured - 1|`` (mean and max) and one row per variant."""
  rows = []
  for widths, latency in zip(variants, measured):
    predicted = table.predict(widths)
    speedup, predicted_speedup = measured_original / latency, table.speedup(widths)
    rows.append({"widths": list(widths), "measured_s": latency, "predicted_s": predicted,
                 "error": abs(predicted / latency - 1),
                 "measured_speedup": speedup, "predicted_speedup": predicted_speedup,
                 "speedup_error": abs(predicted_speedup / speedup - 1)})
  errors = [r["error"] for r in rows]
  speedup_errors = [r["speedup_error"] for r in rows]
  return {"variants": len(rows), "mean_abs_error": float(np.mean(errors)),
          "max_abs_error": float(np.max(errors)),
          "speedup_mean_abs_error": float(np.mean(speedup_errors)),
          "speedup_max_abs_error": float(np.max(speedup_errors)),
          "calibrated": table.calibration is not None, "rows": rows}
