r"""Where a trimmed network's time goes, unit by unit: measured prefixes against the table.

python -m benchmarks.compactnet_prefixes --results=WORKDIR/results.json \
    [--widths=24,16,16,32,48,32,40,88,1280 --widths=16,16,16,32,48,32,40,88,1280]

A latency table prices each unit alone (paper 004 §3.1) and sums the
units; in a whole network a unit runs after the one before it, with that
unit's output in cache or not. This benchmark times, for each network,
every prefix of its first ``n`` units (Fig. 7's curve, for a trimmed
network as well as the original) in one interleaved run in a process set
up for the platform, as the run's own measurements, so the increment of
prefix ``n`` over prefix ``n - 1`` is what unit ``n`` costs inside the
network; beside it, the table's raw latency of the same unit at the same
widths. The networks are the run's original network trimmed to each
``--widths`` (group widths on the run's table grid, timing variables; by
default the original's and the searched model's), so a cut whose measured
saving differs from the table's is traced to the units that differ.

Everything is timed on the run's own platform, the table's. Prints a table per
network to stderr and one JSON line (also written to ``--out`` when
given): per network its group widths and, per unit, the unit's name, the
prefix's latency, the increment and the table's unit latency (ms), the
whole network measured and predicted (calibrated), with date and load.
"""

from __future__ import annotations

import sys

from absl import app, flags

from benchmarks import platform_timing
from dynscale.compactnet import latency, platform, simulator, trimming
from dynscale.nn import sliced, spec


def check(results_path: str, widths: list[list[int]],
          settings: simulator.TableSettings) -> tuple[dict, latency.Table, platform.Platform]:
  """``(results, table, platform)``; a ValueError naming the first bad argument,
  before anything is measured."""
  results = platform_timing.load_results(results_path, ("table", "original_export_dir", "widths"))
  table = latency.load(results["table"])
  target = platform.get(table.platform["name"])
  for w in widths:
    table.check_widths(w)
  settings.check()
  return results, table, target


def network_widths(results: dict, table: latency.Table, widths: list[list[int]]
                   ) -> dict[str, list[int]]:
  """The networks to trace, by label: ``widths`` as given, or the original's
  and the searched model's."""
  if not widths:
    widths = [list(table.full_widths), [int(w) for w in results["widths"].values()]]
  return {",".join(map(str, w)): list(w) for w in widths}


def prefix_specs(arch: dict, expansion: str, widths: list[int]) -> tuple[dict, list[str]]:
  """measure.py's specs of every prefix of ``arch`` trimmed to ``widths``
  (the last prefix is the whole network), and the units' names."""
  groups = trimming.trimmable_groups(arch, expansion)
  trimmed = spec.trimmed_architecture(arch, list(trimming.core_widths(arch, groups, widths)))
  units = latency.units(trimmed, trimming.trimmable_groups(trimmed, expansion))
  specs = {n: {"arch": trimmed, "prefix": n, "expansion": expansion}
           for n in range(1, len(units) + 1)}
  return specs, [u.name for u in units]


def unit_rows(names: list[str], prefix_s: list[float], table_s: list[float]) -> list[dict]:
  """Per unit: the prefix ending with it, its increment over the prefix before,
  and the table's latency of the unit alone (ms)."""
  rows, before = [], 0.0
  for name, measured, alone in zip(names, prefix_s, table_s, strict=True):
    rows.append({"unit": name, "prefix_ms": 1e3 * measured,
                 "increment_ms": 1e3 * (measured - before), "table_ms": 1e3 * alone})
    before = measured
  return rows


def _report(traced: dict) -> None:
  for label, t in traced.items():
    print(f"widths {label}: measured {t['measured_ms']:.3f} ms, predicted "
          f"{t['predicted_ms']:.3f} ms", file=sys.stderr)
    print(f"  {'unit':24s} {'prefix ms':>10s} {'increment':>10s} {'table':>8s}", file=sys.stderr)
    for r in t["units"]:
      print(f"  {r['unit']:24s} {r['prefix_ms']:10.3f} {r['increment_ms']:10.3f} "
            f"{r['table_ms']:8.3f}", file=sys.stderr)


def run(*, results_path: str, widths: list[list[int]] = (),
        settings: simulator.TableSettings = simulator.TableSettings(), out: str = "",
        remote: simulator.Remote = simulator.isolated) -> dict:
  """Measures and reports (module docstring); prints and returns the record."""
  results, table, target = check(results_path, list(widths), settings)
  platform_timing.check_out(out)
  arch = sliced.load(results["original_export_dir"]).arch
  traced_widths = network_widths(results, table, list(widths))
  networks, units = {}, {}
  for label, w in traced_widths.items():
    specs, units[label] = prefix_specs(arch, table.expansion, w)
    networks.update({f"{label}/{n}": s for n, s in specs.items()})
  measured, provenance = simulator.measure_networks(remote, target, networks, settings)
  traced = {}
  for label, w in traced_widths.items():
    prefix_s = [measured[f"{label}/{n}"] for n in range(1, len(units[label]) + 1)]
    traced[label] = {"widths": w, "measured_ms": 1e3 * prefix_s[-1],
                     "predicted_ms": 1e3 * table.predict(w),
                     "units": unit_rows(units[label], prefix_s, list(table.unit_latencies(w)))}
  _report(traced)
  return platform_timing.emit({"results": results_path, "platform": target.name,
                               "networks": traced, "readings": provenance["readings"]},
                              settings, out)


def _define_flags() -> None:
  """Flags only when run as a script (tests import :func:`run`)."""
  flags.DEFINE_string("results", None, "A finished CompactNet run's results.json.")
  flags.DEFINE_multi_string("widths", [], "Group widths of a network to trace, comma-separated "
                            "(repeat the flag; default: the original and the searched model).")
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
      widths = [[int(w) for w in item.split(",")] for item in f.widths]
    except ValueError:
      raise ValueError(f"widths must be comma-separated integers, got {f.widths}") from None
    check(f.results, widths, settings)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  run(results_path=f.results, widths=widths, settings=settings, out=f.out, remote=remote)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
