"""CompactNet's searching loop (paper 004 §3.2-3.3, Fig. 3).

Iteration ``i`` of ``N`` must bring the model to the latency budget
``targets[i] x L_orig`` of the schedule (:mod:`dynscale.compactnet.schedule`,
Eq. 1-2) as the latency table predicts it. For each trimmable group it
removes channels ``round_to`` at a time, keeping the largest-L2 ones, until
the budget is met (a group that would fall below its minimum width first is
skipped); the network so trimmed is fine-tuned briefly and scored on the
*validation* split (the authors' code scored training accuracy). The best
candidate is the next iteration's model: "in one iteration, we essentially
trim only the one layer that loses the least accuracy" (Fig. 3).

The network stays at full size throughout, with its channels ordered by
importance (:func:`dynscale.compactnet.trimming.order_by_importance`), so a
candidate is a width vector: the caller's ``fine_tune`` and ``score`` run
the masked network at a traced width vector, one compile for all.

Everything the search decides is in an atomically written history
(``history.json``: per iteration the budget, the candidates with their
widths, predicted latency, validation accuracy and kept channel indices,
and the choice) next to the variables of the last chosen model and of the
iteration's best candidate so far, so the same call resumes after the last
finished candidate and ends with the same history.

The table predicts; the platform decides. A caller that measures the
searched model on the platform records it with :func:`record_check`; when
the model measures short of the target, the check carries a corrected
budget (:func:`corrected_budget`), reached in steps no deeper than the
schedule's last (:func:`correction_budgets`), and the next call of
:func:`search` runs one more iteration per step, after the schedule's (an
addition to 004, whose search ends when the table's prediction meets the
target).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dynscale.compactnet import trimming
from dynscale.compactnet.latency import Table
from dynscale.compactnet.schedule import Schedule
from dynscale.io import write_json_atomic, write_npz_atomic
from dynscale.nn import sliced, spec

HISTORY_FILE = "history.json"
_CHOSEN_FILE = "chosen.npz"
_BEST_FILE = "best-candidate.npz"

# (variables, core width vector, slot) -> fine-tuned variables
FineTune = Callable[[dict, tuple[int, ...], int], dict]
# (variables, core width vector) -> validation accuracy
Score = Callable[[dict, tuple[int, ...]], float]


class UnreachableTarget(ValueError):
  """No group can meet an iteration's budget above its minimum width."""


@dataclasses.dataclass(frozen=True)
class Result:
  """widths: the final group widths; variables: ordered, full-size; history:
  the search's record (module docstring)."""

  widths: tuple[int, ...]
  variables: dict
  origin: dict[int, np.ndarray]
  history: dict


def check_min_width(fraction, names: Sequence[str], field: str = "min_width") -> list[float]:
  """One fraction in (0, 1] per group (one for all, or a list): ``fraction`` checked."""
  fractions = [fraction] * len(names) if np.ndim(fraction) == 0 else list(fraction)
  if len(fractions) != len(names):
    raise ValueError(f"{field} must be one fraction or one per trimmable group "
                     f"({len(names)}), got {len(fractions)}")
  for name, f in zip(names, fractions):
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
      raise ValueError(f"{field}[{name!r}] must be a fraction in (0, 1], got {f!r}")
  return fractions


def minimum_widths(table: Table, fraction: float | Sequence[float]) -> tuple[int, ...]:
  """Per group, the smallest on-grid width >= ``fraction x size`` (one fraction
  for all groups, or one per group)."""
  fractions = check_min_width(fraction, table.group_names)
  out = []
  for size, grid, f in zip(table.group_sizes, table.grids, fractions):
    allowed = [w for w in range(grid[0], size + 1) if w == size or w % table.round_to == 0]
    out.append(next(w for w in allowed if w >= f * size))
  return tuple(out)


def check_reachable(table: Table, minimum: Sequence[int], target: Schedule,
                    field: str = "min_width") -> None:
  """Raises unless every group at its minimum width would reach the schedule's
  final speed-up (as the table predicts)."""
  best = best_reachable_speedup(table, minimum)
  if best < target.final_speedup:
    raise ValueError(f"{field}: with every group at its minimum width the table predicts "
                     f"{best:.3f}x, below the target speed-up {target.final_speedup:.3f}x; "
                     "lower the minimum widths or the target")


def trim_group(table: Table, widths: Sequence[int], k: int, budget: float,
               minimum: int) -> int | None:
  """The largest width of group ``k`` (below its current one, ``round_to`` at a
  time) at which the table predicts at most ``budget``; None when it would
  need to go below ``minimum``."""
  r, trial = table.round_to, list(widths)
  width = (widths[k] // r) * r if widths[k] % r else widths[k] - r
  while width >= minimum:
    trial[k] = width
    if table.predict(trial) <= budget:
      return width
    width -= r
  return None


def _unreachable(table: Table, widths: Sequence[int], minimum: Sequence[int], budget: float,
                 iteration: int, target: Schedule) -> str:
  """Why iteration ``iteration`` cannot meet ``budget``: the best single-group trim."""
  full = table.predict(table.full_widths)
  best = min(table.predict(list(widths[:k]) + [minimum[k]] + list(widths[k + 1:]))
             for k in range(len(widths)))
  return (f"iteration {iteration}: no single group trimmed to its minimum width brings the "
          f"predicted latency to the budget, {budget / full:.3f} of the original (the best "
          f"reaches {best / full:.3f}); more iterations make each step smaller, and every "
          f"group at its minimum would give {best_reachable_speedup(table, minimum):.3f}x "
          f"for a target of {target.final_speedup:.3f}x")


def best_reachable_speedup(table: Table, minimum: Sequence[int]) -> float:
  """The predicted speed-up of every group at its minimum width."""
  return table.speedup(list(minimum))


def _save_variables(path: str, variables: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
  flat = {f"v/{k}": np.asarray(v) for k, v in sliced.flatten_tree(variables).items()}
  flat.update({f"a/{k}": np.asarray(v) for k, v in arrays.items()})
  write_npz_atomic(path, flat)


def _load_variables(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  with np.load(path) as data:
    flat = {name: data[name] for name in data.files}
  variables = sliced.unflatten_tree({k[2:]: v for k, v in flat.items() if k.startswith("v/")})
  return variables, {k[2:]: v for k, v in flat.items() if k.startswith("a/")}


def _origin_arrays(origin: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
  return {f"origin/{gid}": np.asarray(o) for gid, o in origin.items()}


def _origin_of(arrays: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
  return {int(k.split("/")[1]): v for k, v in arrays.items() if k.startswith("origin/")}


def corrected_budget(table: Table, widths: Sequence[int], measured_speedup: float,
                     target_speedup: float) -> float:
  """The latency the table must predict for a model that measures ``target_speedup``,
  if the table errs on it as on the model at ``widths``.

  With ``L`` the table's latency of the original and ``p`` its speed-up at
  ``widths``, a measured speed-up ``m`` says the table over-predicts by
  ``p / m``; the budget is ``L m / (T p)``: a predicted speed-up of ``T p / m``.
  """
  predicted = table.speedup(list(widths))
  return table.predict(table.full_widths) * measured_speedup / (target_speedup * predicted)


def correction_budgets(table: Table, widths: Sequence[int], budget: float, step_s: float,
                       min_width: float | Sequence[float]) -> tuple[float, ...]:
  """The budgets of the extra iterations that bring the model at ``widths`` to
  ``budget``: the gap in equal steps of at most ``step_s`` (the schedule's last
  reduction): no step of a correction removes more latency than the schedule's
  last iteration did, and each picks its group by validation.

  Empty when the table finds no walk of the steps, one group's trim each
  (in turn the group that keeps the most of its width above its minimum).
  """
  start = table.predict(list(widths))
  steps = max(1, math.ceil((start - budget) / step_s))
  budgets = tuple(start - (start - budget) * j / steps for j in range(1, steps + 1))
  return budgets if _walkable(table, widths, budgets, minimum_widths(table, min_width)) else ()


def _walkable(table: Table, widths: Sequence[int], budgets: Sequence[float],
              minimum: Sequence[int]) -> bool:
  """Whether one group's trim per budget, in turn, meets every budget."""
  trial = list(widths)
  for budget in budgets:
    options = {k: w for k in range(len(trial))
               if (w := trim_group(table, trial, k, budget, minimum[k])) is not None}
    if not options:
      return False
    k = max(options, key=lambda k: (options[k] - minimum[k]) / table.full_widths[k])
    trial[k] = options[k]
  return True


def record_check(workdir: str, result: Result, measured_speedup: float,
                 next_budgets_s: Sequence[float], goal_speedup: float, conditions: dict) -> dict:
  """Appends to ``result``'s history, and to its file in ``workdir``, a
  measurement of its model (``measured_speedup`` on the platform, taken
  under ``conditions``: date, load, readings), the speed-up it was held to
  and the budgets of the extra iterations it asks for (empty: none);
  returns the check."""
  check = {"after_iterations": len(result.history["iterations"]),
           "measured_speedup": float(measured_speedup), "goal_speedup": float(goal_speedup),
           "next_budgets_s": [float(b) for b in next_budgets_s],
           "conditions": conditions}
  result.history["checks"].append(check)
  write_json_atomic(os.path.join(workdir, HISTORY_FILE), result.history)
  return check


def extra_budgets(check: Mapping) -> list[float]:
  """The budgets of the extra iterations a check asked for (a history written
  before corrections were stepped holds one, as ``next_budget_s``)."""
  if "next_budgets_s" in check:
    return list(check["next_budgets_s"])
  return [] if check["next_budget_s"] is None else [check["next_budget_s"]]


def _slot(history: Mapping, iteration: int) -> int:
  """The fine-tune slot of ``iteration``'s candidates: how many fine-tunes the
  model they trim went through (the iterations before it that chose one)."""
  return sum(record["chosen"] is not None for record in history["iterations"][:iteration])


def _settings(arch: dict, table: Table, schedule: Schedule, minimum: Sequence[int]) -> dict:
  return {"model": arch["name"], "table_sha": table.to_json()["sha256"],
          "schedule": dataclasses.asdict(schedule), "minimum_widths": list(minimum)}


def search(arch: dict, variables: Mapping, table: Table, schedule: Schedule, *,
           fine_tune: FineTune, score: Score, workdir: str, min_width: float | Sequence[float]
           = 0.25, candidate_settings: Mapping | None = None,
           log: Callable[[str], None] = lambda _: None) -> Result:
  """Runs (or resumes, from ``workdir``) the search (module docstring).

  Args:
    arch: the pre-trained network's architecture (its table's model).
    variables: its pure variables.
    table: its latency table on the target platform.
    schedule: N, d and T_init (Eq. 1-2).
    fine_tune: the short fine-tune of a candidate (batch-norm recalibration
      included); called with its *slot*, the number of fine-tunes the model
      it trims went through (the same for every candidate of an iteration,
      so that they are compared on the same batches, and the chosen ones
      count up 0, 1, ... as a retraining's catch-up does).
    score: validation accuracy of a candidate.
    workdir: where the history and variables are kept.
    min_width: the smallest fraction of each group the search may keep.
    candidate_settings: what makes ``fine_tune`` and ``score`` what they are
      (JSON values, e.g. the fine-tune's steps and optimizer), kept with the
      history: a resumed search with other ones is refused, as with other
      settings of its own (a history written before they were kept resumes).

  Raises:
    UnreachableTarget: an iteration where no group can meet the budget; the
      message gives the best reachable speed-up.
  """
  arch = spec.validate_architecture(arch)
  groups = trimming.trimmable_groups(arch, table.expansion)
  minimum = minimum_widths(table, min_width)
  os.makedirs(workdir, exist_ok=True)
  history_path = os.path.join(workdir, HISTORY_FILE)
  settings = {**_settings(arch, table, schedule, minimum),
              "candidates": json.loads(json.dumps(candidate_settings or {}))}
  if os.path.exists(history_path):
    with open(history_path) as f:
      history = json.load(f)
    history["settings"].setdefault("candidates", settings["candidates"])
    if history["settings"] != settings:
      raise ValueError(f"{history_path} is a search with other settings "
                       f"({history['settings']}); use another workdir")
    variables, arrays = _load_variables(os.path.join(workdir, _CHOSEN_FILE))
    widths, origin = tuple(int(w) for w in arrays["widths"]), _origin_of(arrays)
  else:
    history = {"settings": settings, "iterations": [], "checks": []}
    widths = table.full_widths
    origin = {g.id: np.arange(g.size) for g in spec.prunable_groups(arch)}
    _save_variables(os.path.join(workdir, _CHOSEN_FILE), variables,
                    {"widths": np.asarray(widths), **_origin_arrays(origin)})
    write_json_atomic(history_path, history)
  budgets = (*schedule.budgets(table.predict(table.full_widths)),
             *(b for c in history["checks"] for b in extra_budgets(c)))
  for i, budget in enumerate(budgets):
    if i < len(history["iterations"]) and history["iterations"][i]["done"]:
      continue
    ordered = trimming.order_by_importance(arch, variables,
                                           trimming.core_widths(arch, groups, widths), origin)
    if i == len(history["iterations"]):
      history["iterations"].append({"iteration": i, "budget_s": budget,
                                    "start_widths": list(widths), "candidates": [],
                                    "chosen": None, "done": False})
    record = history["iterations"][i]
    best_path = os.path.join(workdir, _BEST_FILE)
    if table.predict(widths) <= budget:
      log(f"iteration {i}: the model already meets the budget")
    for k, group in enumerate(groups):
      if any(c["group"] == group.name for c in record["candidates"]) \
          or table.predict(widths) <= budget:
        continue
      width = trim_group(table, widths, k, budget, minimum[k])
      if width is None:
        continue
      trial = tuple(widths[:k]) + (width,) + tuple(widths[k + 1:])
      core = trimming.core_widths(arch, groups, trial)
      tuned = fine_tune(ordered.variables, core, _slot(history, i))
      accuracy = float(score(tuned, core))
      candidate = {"group": group.name, "widths": list(trial), "predicted_s": table.predict(trial),
                   "val_accuracy": accuracy,
                   "kept": trimming.kept_channels(arch, ordered, core)[group.name]}
      best = max(record["candidates"], key=lambda c: c["val_accuracy"], default=None)
      if best is None or accuracy > best["val_accuracy"]:
        _save_variables(best_path, tuned, {"widths": np.asarray(trial),
                                           **_origin_arrays(ordered.origin)})
      record["candidates"].append(candidate)
      write_json_atomic(history_path, history)
      log(f"iteration {i}: {group.name} -> {width}, val accuracy {accuracy:.4f}")
    if table.predict(widths) > budget:
      if not record["candidates"]:
        raise UnreachableTarget(_unreachable(table, widths, minimum, budget, i, schedule))
      record["chosen"] = int(np.argmax([c["val_accuracy"] for c in record["candidates"]]))
      # the choice is on disk before the chosen model: a run killed between the two
      # saves resumes with a model that meets the budget and keeps the choice it made
      write_json_atomic(history_path, history)
      chosen = record["candidates"][record["chosen"]]
      variables, arrays = _load_variables(best_path)
      if [int(w) for w in arrays["widths"]] != chosen["widths"]:
        # the file holds a candidate saved before a kill whose rerun scored less
        # (a fine-tune that is not bit-reproducible, e.g. on a GPU): the chosen
        # one is fine-tuned again
        core = trimming.core_widths(arch, groups, chosen["widths"])
        variables = fine_tune(ordered.variables, core, _slot(history, i))
        arrays = {"widths": np.asarray(chosen["widths"]), **_origin_arrays(ordered.origin)}
      widths, origin = tuple(int(w) for w in arrays["widths"]), _origin_of(arrays)
    else:
      variables, origin = ordered.variables, ordered.origin
    _save_variables(os.path.join(workdir, _CHOSEN_FILE), variables,
                    {"widths": np.asarray(widths), **_origin_arrays(origin)})
    record["done"] = True
    record["widths"] = list(widths)
    write_json_atomic(history_path, history)
  return Result(widths, variables, origin, history)
