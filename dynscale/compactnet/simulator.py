"""The life of a latency table: build, calibrate, validate (paper 004 §3.1, §4.3, Fig. 7).

:func:`build_table` measures a model's table of unit latencies on a
platform (§3.1, :mod:`dynscale.compactnet.latency`), then times the
original network and ``calibration_variants`` seeded random trims of it as
whole networks, fits the table's calibration (measured ~ ``scale x sum of
units + per_mib x MiB of variables + offset``, in the form that predicts
the network left out best, raw sum included) and saves the calibrated
table atomically, with the wall time of the whole build in its provenance
(``build_s``).

:func:`validate_table` checks the table against whole networks it was not
fitted on: random trims drawn with a seed other than the calibration's,
whose predicted and measured latencies and speed-ups give the relative
errors ``|predicted / measured - 1|`` (calibrated and raw), and §4.3's
Fig. 7: the first ``n`` units of the original network, measured, against
the cumulative sum of their table latencies ("the difference between the
real latency and the simulated one is sufficiently small").
:func:`plot_validation` draws both.

Every measurement is a request of :mod:`dynscale.compactnet.measure` served
by a :data:`Remote`: by default in a process set up for the platform
(:func:`dynscale.compactnet.platform.run_isolated`); tests inject one that
times networks with a formula. All the networks of one step (the
calibration, the validation) go in one request, timed in interleaved rounds;
with ``processes > 1`` the request is served that many times, each in a
fresh process, and :func:`median_over_processes` combines the readings
(the same export measured 1.746x, 1.812x and 1.819x in three processes on
the 2-core machine: a process's own ratios vary by ~4%, RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from dynscale import timing
from dynscale.compactnet import latency, platform, trimming
from dynscale.compactnet.platform import Platform
from dynscale.io import check_writable_dir
from dynscale.nn import spec

# Serves one request of dynscale.compactnet.measure for a platform: (platform, request) -> result.
Remote = Callable[[Platform, dict], dict]


def isolated(target: Platform, request: dict) -> dict:
  """The default :data:`Remote`: the request served in a process set up for ``target``."""
  return platform.run_isolated(target, "dynscale.compactnet.measure", request)


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


CALIBRATION_CHOICES = ("auto", *latency.CALIBRATION_FORMS)
# The settings a table's entries and calibration depend on (``processes`` only
# serves later measurements of whole networks).
TABLE_SHAPING = ("expansion", "grid_points", "min_fraction", "round_to", "warmup", "rounds",
                 "burst", "estimator", "calibration_processes", "calibration_variants",
                 "calibration_seed", "calibration_form")


def _check_int(field: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TableSettings:
  """How a table is measured and calibrated.

  expansion: how expansions are grouped (:data:`trimming.EXPANSIONS`).
  grid_points, min_fraction, round_to: each group's grid
  (:func:`latency.group_grid`). warmup, rounds, estimator, burst: the timing
  (:func:`dynscale.timing.interleaved_latencies`), also of the calibration
  and validation networks. processes: every measurement of whole networks
  (the validation, and the CompactNet run's and benchmarks' measurements)
  is served in this many processes, combined by
  :func:`median_over_processes`; calibration_processes: the same for the
  calibration (one: it fits a few coefficients over many networks, and in
  three processes the ``cpu-b64-bf16`` table took 566 s to build, over the
  8 minutes allowed). The unit table is measured once.
  calibration_variants: random trims timed whole (besides the original) to
  fit the calibration, 0 for none;
  calibration_seed: their seed; calibration_form: one of
  :data:`latency.CALIBRATION_FORMS`, or ``auto`` for the one that predicts
  the network left out best (:meth:`latency.Table.with_calibration`).
  """

  expansion: str = "tied"
  grid_points: int = 7
  min_fraction: float = 0.25
  round_to: int = 8
  warmup: int = 2
  rounds: int = 25
  burst: int = 5
  estimator: str = "min"
  processes: int = 3
  calibration_processes: int = 1
  calibration_variants: int = 10
  calibration_seed: int = 1000
  calibration_form: str = "auto"

  def check(self, field: str = "table") -> TableSettings:
    """Raises a ValueError naming the first bad field (``<field>.<name>``); returns ``self``."""
    if self.expansion not in trimming.EXPANSIONS:
      raise ValueError(f"{field}.expansion must be one of {list(trimming.EXPANSIONS)}, "
                       f"got {self.expansion!r}")
    _check_int(f"{field}.grid_points", self.grid_points, 2)
    if (isinstance(self.min_fraction, bool) or not isinstance(self.min_fraction, (int, float))
        or not 0 < self.min_fraction <= 1):
      raise ValueError(f"{field}.min_fraction must be a number in (0, 1], "
                       f"got {self.min_fraction!r}")
    _check_int(f"{field}.round_to", self.round_to, 1)
    _check_int(f"{field}.warmup", self.warmup, 0)
    _check_int(f"{field}.rounds", self.rounds, 1)
    _check_int(f"{field}.burst", self.burst, 1)
    if self.estimator not in timing.ESTIMATORS:
      raise ValueError(f"{field}.estimator must be one of {list(timing.ESTIMATORS)}, "
                       f"got {self.estimator!r}")
    _check_int(f"{field}.processes", self.processes, 1)
    _check_int(f"{field}.calibration_processes", self.calibration_processes, 1)
    _check_int(f"{field}.calibration_variants", self.calibration_variants, 0)
    _check_int(f"{field}.calibration_seed", self.calibration_seed, 0)
    if self.calibration_form not in CALIBRATION_CHOICES:
      raise ValueError(f"{field}.calibration_form must be one of {list(CALIBRATION_CHOICES)}, "
                       f"got {self.calibration_form!r}")
    fitted_on = self.calibration_variants + 1  # the original network too
    if self.calibration_form not in ("auto", "raw") and self.calibration_variants == 0:
      raise ValueError(f"{field}.calibration_variants must be >= 1 for calibration_form "
                       f"{self.calibration_form!r} (the networks it is fitted on), got 0")
    if self.calibration_form.startswith("affine") and fitted_on < latency.AFFINE_MIN_NETWORKS:
      raise ValueError(f"{field}.calibration_variants must be >= "
                       f"{latency.AFFINE_MIN_NETWORKS - 1} for calibration_form "
                       f"{self.calibration_form!r} (an offset fitted on fewer networks "
                       f"extrapolates badly), got {self.calibration_variants}")
    return self

  def check_built_with(self, table: latency.Table, path: str, field: str = "table") -> None:
    """Raises a ValueError naming the first setting that shapes a table
    (:data:`TABLE_SHAPING`) which ``table`` (at ``path``) was built with
    otherwise; one its provenance does not record is taken as agreeing."""
    built = table.provenance.get("settings", {})
    for name in TABLE_SHAPING:
      if name in built and built[name] != getattr(self, name):
        raise ValueError(f"{field}.{name}: the table in {path} was built with {built[name]!r}, "
                         f"this config asks for {getattr(self, name)!r}; delete {path} to "
                         "measure it again, or ask for what it was built with")

  def calibration_forms(self) -> tuple[str, ...]:
    """The forms :meth:`latency.Table.with_calibration` chooses among."""
    if self.calibration_form == "auto":
      return latency.CALIBRATION_FORMS
    return (self.calibration_form,)

  def timing(self) -> dict:
    """The timing fields of a measure request."""
    return {"warmup": self.warmup, "rounds": self.rounds, "estimator": self.estimator,
            "burst": self.burst}

  def timing_record(self) -> dict:
    """How a measurement of whole networks was timed, as records state it:
    :meth:`timing` and ``processes``."""
    return {**self.timing(), "processes": self.processes}


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------


def median_over_processes(readings: Sequence[dict[str, float]]) -> dict[str, float]:
  """One latency per network from several processes' ``{name: latency_s}``.

  Within a process the networks are timed interleaved, so their ratios are
  what a process measures best; between processes whole readings shift. The
  first network is the reference: it gets its median latency, every other
  network the median over processes of its ratio to the reference, times
  that. A speed-up over the reference is thus the median of the processes'
  own speed-ups (with one process, the reading itself).
  """
  reference = next(iter(readings[0]))
  base = statistics.median(r[reference] for r in readings)
  return {name: base * statistics.median(r[name] / r[reference] for r in readings)
          for name in readings[0]}


def measure_networks(remote: Remote, target: Platform, networks: dict, settings: TableSettings
                      ) -> tuple[dict[str, float], dict]:
  """``({name: latency_s}, provenance)`` of whole networks: one interleaved
  request in each of ``settings.processes`` processes, combined by
  :func:`median_over_processes` (the first of ``networks`` is the reference);
  the provenance is the last process's, with every process's ``readings``."""
  request = {"kind": "networks", "platform": target.name, "networks": networks,
             **settings.timing()}
  readings, provenance = [], {}
  for _ in range(settings.processes):
    result = remote(target, request)
    readings.append({name: float(result["latencies"][name]["latency_s"]) for name in networks})
    provenance = result.get("provenance", {})
  return median_over_processes(readings), {**provenance, "readings": readings}


def conditions(provenance: dict) -> dict:
  """What a measurement of :func:`measure_networks` ran under, to keep beside its
  result: the measuring process's date and load average and every process's
  readings."""
  return {k: provenance.get(k) for k in ("date", "load_1min", "readings")}


def _trimmed(arch: dict, expansion: str, widths: Sequence[int]) -> dict:
  return {"arch": arch, "widths": [int(w) for w in widths], "expansion": expansion}


def _name(kind: str, k: int) -> str:
  return f"{kind}-{k:03d}"


def build_table(arch: dict, target: Platform, settings: TableSettings, out: str,
                remote: Remote = isolated) -> latency.Table:
  """Measures, calibrates and saves (atomically, to ``out``) the table of ``arch``.

  The unit table is measured first (one "table" request, written to a
  temporary file: ``out`` only ever holds a finished table); then, when
  ``settings.calibration_variants > 0``, the original and that many random
  trims (:func:`latency.random_widths` with ``settings.calibration_seed``)
  in one "networks" request, and the table gets the fitted calibration with
  these networks' widths, raw sums and measurements.
  """
  settings.check()
  arch = spec.validate_architecture(arch)
  trimming.trimmable_groups(arch, settings.expansion)
  if not out:
    raise ValueError("out must be a non-empty file path")
  check_writable_dir(os.path.dirname(os.path.abspath(out)), "out's directory")
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp:
    raw_path = os.path.join(tmp, "table.json")
    remote(target, {"kind": "table", "platform": target.name, "arch": arch,
                    "expansion": settings.expansion, "grid_points": settings.grid_points,
                    "min_fraction": settings.min_fraction, "round_to": settings.round_to,
                    **settings.timing(), "out": raw_path})
    table = latency.load(raw_path)
  if settings.calibration_variants > 0:
    table = calibrate(table, arch, target, settings, remote)
  table = dataclasses.replace(table, provenance={
      **table.provenance, "build_s": round(time.perf_counter() - start, 3),
      "settings": dataclasses.asdict(settings)})
  latency.save(table, out)
  return table


def calibrate(table: latency.Table, arch: dict, target: Platform, settings: TableSettings,
              remote: Remote = isolated) -> latency.Table:
  """``table`` calibrated on the original and ``settings.calibration_variants``
  random trims of ``arch``, timed whole in one request in each of
  ``settings.calibration_processes`` processes (module docstring)."""
  widths = [list(table.full_widths)] + latency.random_widths(
      table, settings.calibration_variants, settings.calibration_seed)
  names = ["original"] + [_name("variant", k) for k in range(len(widths) - 1)]
  measured, provenance = measure_networks(
      remote, target, {n: _trimmed(arch, table.expansion, w) for n, w in zip(names, widths)},
      dataclasses.replace(settings, processes=settings.calibration_processes))
  raw = [table.raw(w) for w in widths]
  weight_mib = None if table.weight_bytes is None else [table.weight_mib(w) for w in widths]
  return table.with_calibration(
      raw, [measured[n] for n in names], weight_mib, settings.calibration_forms(),
      seed=settings.calibration_seed,
      random_variants=settings.calibration_variants, load_1min=provenance.get("load_1min"),
      networks=[{"widths": w, "raw_s": r, "measured_s": measured[n]}
                for n, w, r in zip(names, widths, raw)])


# --------------------------------------------------------------------------
# Validation (§4.3, Fig. 7)
# --------------------------------------------------------------------------


def raw_errors(table: latency.Table, variants: Sequence[Sequence[int]],
               measured: Sequence[float], measured_original: float) -> dict:
  """:func:`latency.validation_report`'s errors of the raw, uncalibrated sum of
  units (§3.1's simulator as published), keys prefixed ``raw_``."""
  report = latency.validation_report(dataclasses.replace(table, calibration=None), variants,
                                     measured, measured_original)
  return {f"raw_{key}": report[key] for key in (
      "mean_abs_error", "max_abs_error", "speedup_mean_abs_error", "speedup_max_abs_error")}


def fig7_rows(table: latency.Table, measured_prefixes: Sequence[float]) -> list[dict]:
  """Fig. 7: per ``n``, the first ``n`` units measured and the cumulative sum of
  their raw table latencies at full width."""
  predicted = np.cumsum(table.unit_latencies(table.full_widths))
  return [{"units": n, "measured_s": float(m), "predicted_s": float(p),
           "error": abs(float(p) / float(m) - 1)}
          for n, (m, p) in enumerate(zip(measured_prefixes, predicted), start=1)]


def validate_table(table: latency.Table, arch: dict, target: Platform, variants: int,
                   seed: int, remote: Remote = isolated, *,
                   settings: TableSettings | None = None) -> dict:
  """Predicted against measured latency of ``variants`` random trims (seed
  ``seed``, never the calibration's) and of Fig. 7's prefixes.

  A "networks" request in each of ``settings.processes`` processes times
  the original, the variants and the first ``n`` units of the original for
  every ``n``, interleaved, with the timing of ``settings`` (default: the
  settings the table was built with, :func:`_table_timing`). Returns
  :func:`latency.validation_report` (calibrated prediction) with
  :func:`raw_errors`, ``fig7`` (:func:`fig7_rows`),
  ``overlap_with_calibration`` (variants whose widths the calibration was
  fitted on), ``repeat_error`` (the last prefix is the original network:
  ``|its latency / the original's - 1|``, the noise of this measurement) and
  the measurement's provenance.
  """
  settings = (settings or _table_timing(table)).check()
  _check_int("variants", variants, 1)
  _check_int("seed", seed, 0)
  calibration = table.calibration or {}
  if "seed" in calibration and seed == calibration["seed"]:
    raise ValueError(f"seed must differ from the table's calibration seed {seed}: the "
                     "validation variants must be disjoint from the calibration ones")
  latency.check_matches(table, arch, target, table.expansion)
  widths = latency.random_widths(table, variants, seed)
  networks = {"original": _trimmed(arch, table.expansion, table.full_widths)}
  networks.update({_name("variant", k): _trimmed(arch, table.expansion, w)
                   for k, w in enumerate(widths)})
  prefixes = range(1, len(table.units) + 1)
  networks.update({_name("prefix", n): {"arch": arch, "prefix": n, "expansion": table.expansion}
                   for n in prefixes})
  measured, provenance = measure_networks(remote, target, networks, settings)
  variant_s = [measured[_name("variant", k)] for k in range(variants)]
  report = latency.validation_report(table, widths, variant_s, measured["original"])
  for row, w in zip(report["rows"], widths):
    row["raw_predicted_s"] = table.raw(w)
  fig7 = fig7_rows(table, [measured[_name("prefix", n)] for n in prefixes])
  fitted = {tuple(n["widths"]) for n in calibration.get("networks", [])}
  return {**report, **raw_errors(table, widths, variant_s, measured["original"]),
          "seed": seed, "original_measured_s": measured["original"],
          "original_predicted_s": table.predict(table.full_widths),
          "overlap_with_calibration": sum(tuple(w) in fitted for w in widths),
          "fig7": fig7, "fig7_mean_abs_error": float(np.mean([r["error"] for r in fig7])),
          "fig7_max_abs_error": float(np.max([r["error"] for r in fig7])),
          "repeat_error": abs(fig7[-1]["measured_s"] / measured["original"] - 1),
          "timing": settings.timing_record(), "provenance": provenance}


def _table_timing(table: latency.Table) -> TableSettings:
  """The settings the table was built with (:func:`build_table` records them),
  else the defaults with the timing its units were measured with."""
  known = {field.name for field in dataclasses.fields(TableSettings)}
  built = {k: v for k, v in table.provenance.get("settings", {}).items() if k in known}
  timed = {k: table.provenance[k] for k in TableSettings().timing() if k in table.provenance}
  return dataclasses.replace(TableSettings(), **(built or timed))


def plot_validation(report: dict, path: str, title: str = "") -> None:
  """Two panels, written atomically as PNG: predicted (calibrated and raw)
  against measured latency of the validation variants, with ``y = x``; and
  Fig. 7, measured and simulated latency of the first ``n`` units against ``n``."""
  from dynscale import plots  # selects the headless backend first

  plt = plots.plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  rows = report["rows"]
  measured = [1e3 * r["measured_s"] for r in rows]
  if report.get("calibrated"):
    left.scatter(measured, [1e3 * r["predicted_s"] for r in rows], label="calibrated")
  left.scatter(measured, [1e3 * r["raw_predicted_s"] for r in rows], marker="x",
               label="sum of units (raw)")
  every = measured + [1e3 * r["predicted_s"] for r in rows] + [
      1e3 * r["raw_predicted_s"] for r in rows]
  low, high = min(every), max(every)
  left.plot([low, high], [low, high], color="gray", linestyle="--", label="y = x")
  left.set_xlabel("measured latency (ms)")
  left.set_ylabel("predicted latency (ms)")
  raw = f"raw {report['raw_mean_abs_error']:.1%}" if "raw_mean_abs_error" in report else ""
  left.set_title(f"{len(rows)} random trims, mean |error|: "
                 f"{report['mean_abs_error']:.1%} {raw}".strip())
  left.legend()
  fig7 = report["fig7"]
  units = [r["units"] for r in fig7]
  right.plot(units, [1e3 * r["measured_s"] for r in fig7], marker="o", label="measured")
  right.plot(units, [1e3 * r["predicted_s"] for r in fig7], marker="x",
             label="simulated (sum of units)")
  right.set_xlabel("units executed")
  right.set_ylabel("latency (ms)")
  right.set_title("Fig. 7: first units of the original")
  right.legend()
  for ax in (left, right):
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  plots.save_png(fig, path, dpi=110, title=title)
  plt.close(fig)
