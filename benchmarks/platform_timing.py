"""What the CompactNet benchmarks share: how they time networks on a platform
(:class:`dynscale.compactnet.simulator.TableSettings`, :mod:`dynscale.timing`)
and how their records end."""

import datetime
import json
import os

import jax
from absl import flags

from dynscale.compactnet import simulator
from dynscale.io import check_writable_dir, write_json_atomic


def define_flags() -> None:
  """``--warmup``, ``--rounds``, ``--burst``, ``--estimator`` and
  ``--processes``, defaulting to the tables' settings."""
  defaults = simulator.TableSettings()
  flags.DEFINE_integer("warmup", defaults.warmup, "Untimed runs per network (compilation).")
  flags.DEFINE_integer("rounds", defaults.rounds, "Timed interleaved rounds.")
  flags.DEFINE_integer("burst", defaults.burst,
                       "Back-to-back timed runs of a network in each round (warm cache).")
  flags.DEFINE_string("estimator", defaults.estimator, "Latency estimator: median, min, q10.")
  flags.DEFINE_integer("processes", defaults.processes,
                       "Processes each measurement is repeated in; per network, the median "
                       "of its ratio to the first network (simulator.median_over_processes).")


def flag_values() -> dict:
  """The flags' values, as :class:`~dynscale.compactnet.simulator.TableSettings` fields."""
  f = flags.FLAGS
  return {"warmup": f.warmup, "rounds": f.rounds, "burst": f.burst, "estimator": f.estimator,
          "processes": f.processes}


def load_results(path: str, keys) -> dict:
  """A finished CompactNet run's ``results.json`` at ``path``; a ValueError naming
  ``results`` if it cannot be read or lacks any of ``keys``."""
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"results must be a CompactNet run's results.json: {e}") from e
  missing = [k for k in keys if k not in results]
  if missing:
    raise ValueError(f"results {path} is not a finished CompactNet run's: it has no {missing}")
  return results


def speedups(latency_s: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
  """Per platform, every network's speed-up over ``original`` (003 Eq. 10, ``s / s*``)."""
  return {p: {n: lat["original"] / lat[n] for n in lat} for p, lat in latency_s.items()}


def check_out(out: str) -> None:
  """Raises a ValueError naming ``out`` unless a record can be written there
  (called before anything is measured); "" writes none."""
  if not out:
    return
  if os.path.isdir(out):
    raise ValueError(f"out {out!r} is a directory; it must name the JSON file to write")
  check_writable_dir(os.path.dirname(os.path.abspath(out)), "out's directory")


def emit(record: dict, settings: simulator.TableSettings, out: str = "") -> dict:
  """``record`` with the timing, date, load and JAX version; printed as one
  JSON line, then written atomically to ``out`` when given; returned."""
  record = {**record, "timing": settings.timing_record(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load": [round(x, 2) for x in os.getloadavg()], "jax": jax.__version__}
  print(json.dumps(record), flush=True)
  if out:
    write_json_atomic(out, record)
  return record
