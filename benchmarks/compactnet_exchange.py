r"""CompactNet's exchange (paper 004, Table 7): each platform's searched model run on the others.

python -m benchmarks.compactnet_exchange --results=W/b64-1_5x/results.json,W/b1-1_5x/results.json

Takes finished CompactNet runs that trimmed the same original network,
each for its own platform (``results.json``: ``platform``, ``export_dir``,
``original_export_dir``), and times, on every one of those platforms in
one interleaved run (a process set up for it, as the runs' own
measurements), the original and every run's searched export. Table 7's
question is whether a model searched on a platform is the better one
there: for each platform the record gives every model's speed-up over the
original (003 Eq. 10, ``s / s*``) and ``home_advantage``, the latency of
the fastest model searched for another platform over the latency of the
platform's own, minus one (positive: the platform's own model is faster
there; the issue asks for at least 5%) and ``pairs``: the same for every
two platforms, each against the other alone (with two platforms, the same
numbers as ``home_advantage``).

Prints a table to stderr and one JSON line (also written to ``--out`` when
given) to stdout: latencies, speed-ups, ``home_advantage``, the runs,
timing, date and load.
"""

from __future__ import annotations

import itertools
import os
import sys

from absl import app, flags

from benchmarks import platform_timing
from dynscale.compactnet import platform, simulator


def check(results_paths: list[str], settings: simulator.TableSettings) -> dict[str, dict]:
  """``{platform name: results}`` of the runs; a ValueError naming the first bad
  argument, before anything is measured."""
  if len(results_paths) < 2:
    raise ValueError(f"results must name at least two runs (one per platform), "
                     f"got {results_paths}")
  runs: dict[str, dict] = {}
  for path in results_paths:
    results = platform_timing.load_results(path, ("platform", "export_dir", "original_export_dir"))
    name = platform.get(results["platform"], f"results {path}'s platform").name
    if name in runs:
      raise ValueError(f"results name two runs for platform {name!r}: one run per platform")
    runs[name] = results
  originals = {os.path.realpath(r["original_export_dir"]) for r in runs.values()}
  if len(originals) > 1:
    raise ValueError(f"results must trim the same original network; their "
                     f"original_export_dir differ: {sorted(originals)}")
  settings.check()
  return runs


def home_advantage(latency_s: dict[str, float], home: str) -> float:
  """The fastest other platform's model over ``home``'s own, minus one."""
  others = [s for name, s in latency_s.items() if name not in (home, "original")]
  return min(others) / latency_s[home] - 1


def pair_advantages(latencies: dict[str, dict[str, float]]) -> list[dict]:
  """Table 7 pair by pair: for every two platforms ``a``, ``b``, each one's
  :func:`home_advantage` with the other's model as the only other,
  ``{"platforms": [a, b], "advantage": {a: ..., b: ...}}``."""
  return [{"platforms": [a, b],
           "advantage": {p: home_advantage({m: latencies[p][m] for m in (a, b)}, p)
                         for p in (a, b)}}
          for a, b in itertools.combinations(latencies, 2)]


def _report(latencies: dict[str, dict[str, float]]) -> None:
  models = list(next(iter(latencies.values())))
  print(f"{'model':12s}" + "".join(f"{'on ' + p + ' ms (speed-up)':>28s}" for p in latencies),
        file=sys.stderr)
  for model in models:
    cells = [f"{lat[model] * 1e3:.3f} ({lat['original'] / lat[model]:.2f}x)"
             for lat in latencies.values()]
    print(f"{model:12s}" + "".join(f"{c:>28s}" for c in cells), file=sys.stderr)
  for p, lat in latencies.items():
    print(f"on {p}: its own model is {100 * home_advantage(lat, p):+.1f}% faster than the "
          "best other", file=sys.stderr)
  for pair in pair_advantages(latencies):
    print(f"{' / '.join(pair['platforms'])}: " + ", ".join(
        f"on {p} its own {100 * a:+.1f}%" for p, a in pair["advantage"].items()), file=sys.stderr)


def run(*, results_paths: list[str],
        settings: simulator.TableSettings = simulator.TableSettings(), out: str = "",
        remote: simulator.Remote = simulator.isolated) -> dict:
  """Measures and reports (module docstring); prints and returns the record."""
  runs = check(results_paths, settings)
  platform_timing.check_out(out)
  original = next(iter(runs.values()))["original_export_dir"]
  specs = {"original": {"export_dir": original},
           **{name: {"export_dir": r["export_dir"]} for name, r in runs.items()}}
  latencies = {name: simulator.measure_networks(remote, platform.get(name), specs, settings)[0]
               for name in runs}
  _report(latencies)
  return platform_timing.emit({
      "results": results_paths, "latency_s": latencies,
      "speedup": platform_timing.speedups(latencies),
      "home_advantage": {p: home_advantage(lat, p) for p, lat in latencies.items()},
      "pairs": pair_advantages(latencies)},
      settings, out)


def _define_flags() -> None:
  """Flags only when run as a script (tests import :func:`run`)."""
  flags.DEFINE_list("results", None, "Finished CompactNet runs' results.json, one per platform.")
  platform_timing.define_flags()
  flags.adopt_module_key_flags(platform_timing)  # listed by --help
  flags.DEFINE_string("out", "", "Also write the JSON record here (atomically).")
  flags.mark_flag_as_required("results")


def main(argv, remote: simulator.Remote = simulator.isolated) -> None:
  del argv
  f = flags.FLAGS
  settings = simulator.TableSettings(**platform_timing.flag_values())
  try:
    check(f.results, settings)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  run(results_paths=f.results, settings=settings, out=f.out, remote=remote)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
