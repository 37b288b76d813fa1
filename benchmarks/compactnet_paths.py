r"""Can a CompactNet search reach its target on a latency table? Random paths, no training.

python -m benchmarks.compactnet_paths --table=FILE --t_final=1.5 --iterations=6,12,24

The search (:func:`dynscale.compactnet.search.search`) keeps, in each of N
iterations, one group trimmed (``round_to`` at a time, as
:func:`~dynscale.compactnet.search.trim_group`) until the table predicts
the iteration's budget (Eq. 1-2, :class:`~dynscale.compactnet.schedule.Schedule`);
which group depends on the candidates' validation accuracy. This walks
``--paths`` seeded paths that choose uniformly among the groups able to
meet each budget, for every N of ``--iterations``, and prints one JSON
line per N: the paths that met every budget, the iteration where the
others stopped, and the table's speed-up with every group at its minimum
width and with each group alone at it (how much one step can take). It
decides a config's N before any training is spent on it.
"""

import json

import numpy as np
from absl import app, flags

from dynscale.compactnet import latency, schedule, search


def random_path(table: latency.Table, plan: schedule.Schedule, minimum: tuple[int, ...],
                rng: np.random.Generator) -> tuple[int, list[int]]:
  """``(iterations, widths)``: how many iterations a path of uniformly chosen
  feasible groups completes (N when it meets every budget), and where it ends."""
  widths = list(table.full_widths)
  for i, budget in enumerate(plan.budgets(table.predict(table.full_widths))):
    feasible = [(k, w) for k in range(len(widths))
                if (w := search.trim_group(table, widths, k, budget, minimum[k])) is not None]
    if not feasible:
      return i, widths
    k, w = feasible[rng.integers(len(feasible))]
    widths[k] = w
  return plan.iterations, widths


def reachability(table: latency.Table, t_final: float, iterations: int, *, decay: float = 0.96,
                 min_width: float = 0.25, paths: int = 20, seed: int = 0) -> dict:
  """One N's record (module docstring)."""
  plan = schedule.Schedule.for_final(t_final, iterations, decay)
  minimum = search.minimum_widths(table, min_width)
  rng = np.random.default_rng(seed)
  walked = [random_path(table, plan, minimum, rng) for _ in range(paths)]
  completed = [n for n, _ in walked]
  alone = {}
  for k, name in enumerate(table.group_names):
    widths = list(table.full_widths)
    widths[k] = minimum[k]
    alone[name] = round(table.speedup(widths), 4)
  return {"t_final": t_final, "iterations": iterations, "decay": decay, "min_width": min_width,
          "paths": paths, "seed": seed, "reached": sum(c == iterations for c in completed),
          "stopped_at": sorted(c for c in completed if c < iterations),
          "every_group_at_minimum": round(search.best_reachable_speedup(table, minimum), 4),
          "one_group_at_minimum": alone, "first_reduction": round(plan.reductions[0], 4),
          "table_platform": table.platform.get("name"), "table_date": table.provenance.get("date")}


def _define_flags() -> None:
  """Flags only when run as a script (tests import :func:`reachability`)."""
  flags.DEFINE_string("table", None, "A latency table (benchmarks.compactnet_table --out).")
  flags.DEFINE_float("t_final", 1.5, "Target speed-up.")
  flags.DEFINE_list("iterations", ["6", "12", "24"], "The N's to try.")
  flags.DEFINE_float("decay", 0.96, "d of Eq. 1.")
  flags.DEFINE_float("min_width", 0.25, "Smallest fraction of a group the search keeps.")
  flags.DEFINE_integer("paths", 20, "Random paths per N.")
  flags.DEFINE_integer("seed", 0, "Their seed.")
  flags.mark_flag_as_required("table")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:  # bad flags fail before any path is walked
    if not f.iterations or not all(n.isdigit() for n in f.iterations):
      raise ValueError(f"--iterations must be a comma-separated list of positive integers, "
                       f"got {f.iterations}")
    iterations = [int(n) for n in f.iterations]
    table = latency.load(f.table)
    for n in iterations:
      schedule.Schedule.for_final(f.t_final, n, f.decay)
    search.check_min_width(f.min_width, table.group_names)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for n in iterations:
    print(json.dumps(reachability(table, f.t_final, n, decay=f.decay, min_width=f.min_width,
                                  paths=f.paths, seed=f.seed)))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
