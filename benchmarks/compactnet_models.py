r"""Where a CompactNet run's speed-ups come from: FLOPs, weight bytes, and how often each weight is used.

python -m benchmarks.compactnet_models --results=WORKDIR/results.json --platforms=cpu-b1,cpu-b64

Times, in one interleaved run per platform (a process set up for it, as
the run's own measurements), the run's three exports (``original``,
``searched``, ``uniform``) and the original uniformly narrowed to each of
``--multipliers`` (widths on the run's table grid, timing variables). For
every network it reports multiply-adds, parameters and the bytes of its
variables; for every platform the latency and the speed-up over the
original (003 Eq. 10, ``s / s*``, both from the same run), and a
least-squares fit ``latency = a + b MFLOPs + c MiB`` over all the
networks: ``c`` is what a MiB of weights costs beyond its arithmetic.

The uniform multipliers move FLOPs and weight bytes together; the searched
and uniform models of a run have about the same FLOPs and different
weight bytes, which is what separates ``b`` from ``c``.

``layers`` splits the original's and the searched model's multiply-adds
and parameters by *weight reuse*: the multiply-adds each weight takes part
in per image (``H x W`` of the layer's output map; batch norm apart). At
batch 1 a layer of reuse 1 (a 1x1 map) is a matrix-vector product that
reads every weight once per image; a reuse of 256 (16x16) amortises it.

Prints the tables to stderr and one JSON line (also written to ``--out``
when given) to stdout: the networks, the latencies, the fits, ``layers``,
platform names, date and load.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags

from benchmarks import platform_timing
from dynscale.compactnet import latency, measure, platform, simulator, training
from dynscale.nn import costs, sliced

EXPORTS = {"original": "original_export_dir", "searched": "export_dir",
           "uniform": "uniform_export_dir"}
DEFAULT_MULTIPLIERS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def check(results_path: str, platforms: list[str], multipliers: list[float],
          settings: simulator.TableSettings) -> tuple[dict, list[platform.Platform]]:
  """``(results, platforms)``; a ValueError naming the first bad argument,
  before anything is measured."""
  results = platform_timing.load_results(results_path, (*EXPORTS.values(), "table"))
  if not platforms:
    raise ValueError(f"platforms must name at least one of {sorted(platform.PLATFORMS)}")
  targets = [platform.get(name, "platforms") for name in platforms]
  for m in multipliers:
    if not 0 < m < 1:
      raise ValueError(f"multipliers must lie in (0, 1), got {m!r}")
  settings.check()
  return results, targets


def networks(results: dict, multipliers: list[float]) -> dict[str, dict]:
  """measure.py's network specs: the run's exports, then the original
  narrowed to each multiplier (one per distinct width vector)."""
  specs = {name: {"export_dir": results[key]} for name, key in EXPORTS.items()}
  table = latency.load(results["table"])
  arch = sliced.load(results["original_export_dir"]).arch
  seen = [list(table.group_sizes)]
  for m in sorted(set(multipliers), reverse=True):
    widths = training.uniform_widths(table, m)
    if widths not in seen:
      seen.append(widths)
      specs[f"x{m:g}"] = {"arch": arch, "widths": widths, "expansion": table.expansion}
  return specs


def sizes(arch: dict, variables: dict) -> dict:
  """Multiply-adds, parameters and the bytes of the variables of one network."""
  return {"multiply_adds": costs.flops(arch), "params": costs.params(arch),
          "weight_mib": sum(np.asarray(x).nbytes for x in jax.tree.leaves(variables)) / 2**20}


def by_reuse(arch: dict) -> dict[str, dict[str, int]]:
  """Multiply-adds and parameters by weight reuse (module docstring)."""
  rows: dict[str, dict[str, int]] = {}
  for c in costs.layer_costs(arch):
    key = "bn" if c.flops == 0 else str(round(c.flops / c.params))
    row = rows.setdefault(key, {"multiply_adds": 0, "params": 0})
    row["multiply_adds"] += c.flops
    row["params"] += c.params
  return dict(sorted(rows.items(), key=lambda kv: -float(kv[0]) if kv[0] != "bn" else 1))


def fit(sized: dict[str, dict], latency_s: dict[str, float]) -> dict[str, float]:
  """Least squares ``latency_ms = a + b MFLOPs + c MiB`` over the networks."""
  names = list(latency_s)
  x = np.array([[1.0, sized[n]["multiply_adds"] / 1e6, sized[n]["weight_mib"]] for n in names])
  y = np.array([latency_s[n] * 1e3 for n in names])
  (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
  residual = y - x @ np.array([a, b, c])
  return {"intercept_ms": float(a), "ms_per_mflop": float(b), "ms_per_mib": float(c),
          "max_abs_residual_ms": float(np.abs(residual).max())}


def _report(sized, latencies, fits, layers) -> None:
  print(f"{'network':10s} {'MFLOPs':>7s} {'params':>9s} {'MiB':>6s}  "
        + "  ".join(f"{p + ' ms (speed-up)':>24s}" for p in latencies), file=sys.stderr)
  for name, s in sized.items():
    cells = [f"{lat[name] * 1e3:12.3f} ({lat['original'] / lat[name]:5.2f}x)"
             for lat in latencies.values()]
    print(f"{name:10s} {s['multiply_adds'] / 1e6:7.2f} {s['params']:9d} "
          f"{s['weight_mib']:6.2f}  " + "  ".join(f"{c:>24s}" for c in cells), file=sys.stderr)
  for name, f in fits.items():
    print(f"{name}: latency = {f['intercept_ms']:.3f} ms + {f['ms_per_mflop']:.4f} ms/MFLOP "
          f"+ {f['ms_per_mib']:.4f} ms/MiB (max |residual| {f['max_abs_residual_ms']:.3f} ms)",
          file=sys.stderr)
  print("reuse   original MACs / params   searched MACs / params   kept", file=sys.stderr)
  for key, o in layers["original"].items():
    s = layers["searched"].get(key, {"multiply_adds": 0, "params": 0})
    kept = f"{s['multiply_adds'] / max(o['multiply_adds'], 1):.2f} / {s['params'] / o['params']:.2f}"
    print(f"{key:>5s}   {o['multiply_adds']:>12d} / {o['params']:>8d}   "
          f"{s['multiply_adds']:>12d} / {s['params']:>8d}   {kept}", file=sys.stderr)


def run(*, results_path: str, platforms: list[str], multipliers: list[float] = DEFAULT_MULTIPLIERS,
        settings: simulator.TableSettings = simulator.TableSettings(), out: str = "",
        remote: simulator.Remote = simulator.isolated) -> dict:
  """Measures and reports (module docstring); prints and returns the record."""
  results, targets = check(results_path, platforms, list(multipliers), settings)
  platform_timing.check_out(out)
  specs = networks(results, list(multipliers))
  built = {name: measure.network(item) for name, item in specs.items()}
  sized = {name: sizes(*built[name]) for name in specs}
  latencies = {t.name: simulator.measure_networks(remote, t, specs, settings)[0]
               for t in targets}
  fits = {name: fit(sized, lat) for name, lat in latencies.items()}
  layers = {name: by_reuse(built[name][0]) for name in ("original", "searched")}
  _report(sized, latencies, fits, layers)
  return platform_timing.emit({
      "results": results_path, "networks": sized, "latency_s": latencies,
      "speedup": platform_timing.speedups(latencies), "fits": fits, "layers": layers},
      settings, out)


def _define_flags() -> None:
  """Flags only when run as a script (tests import :func:`run`)."""
  flags.DEFINE_string("results", None, "A finished CompactNet run's results.json.")
  flags.DEFINE_list("platforms", ["cpu-b1", "cpu-b64"],
                    f"Platforms, of {sorted(platform.PLATFORMS)}.")
  flags.DEFINE_list("multipliers", [str(m) for m in DEFAULT_MULTIPLIERS],
                    "Uniform width multipliers of the original, in (0, 1).")
  platform_timing.define_flags()
  flags.adopt_module_key_flags(platform_timing)  # listed by --help
  flags.DEFINE_string("out", "", "Also write the JSON record here (atomically).")
  flags.mark_flag_as_required("results")


def main(argv, remote: simulator.Remote = simulator.isolated) -> None:
  del argv
  f = flags.FLAGS
  settings = simulator.TableSettings(**platform_timing.flag_values())
  try:
    try:
      multipliers = [float(m) for m in f.multipliers]
    except ValueError:
      raise ValueError(f"multipliers must be numbers in (0, 1), got {f.multipliers}") from None
    check(f.results, f.platforms, multipliers, settings)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  run(results_path=f.results, platforms=f.platforms, multipliers=multipliers,
      settings=settings, out=f.out, remote=remote)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
