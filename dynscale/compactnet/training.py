"""CompactNet end to end (paper 004): pretrain, measure, search, retrain, measure again.

1. ``pretrain``: the original network, ``train.num_epochs`` epochs (skipped
   when ``model.init_from`` names a trained one, e.g. a shared pretraining).
2. The latency table of ``compactnet.platform`` (§3.1): ``compactnet.table``,
   or one measured now into ``<workdir>/latency-table.json`` in a process
   set up for the platform (:mod:`dynscale.compactnet.simulator`).
3. The search (§3.2-3.3, :mod:`dynscale.compactnet.search`): each candidate
   has its batch norm recalibrated on ``compactnet.recalibration_batches``
   training batches (without it every trimmed network falls to chance), is
   fine-tuned for ``compactnet.finetune_steps`` steps with
   ``compactnet.finetune_optimizer`` (Table 4: RMSProp) and scored on the
   validation split, all on the masked network (one compile). The searched
   model is then measured against the original on the platform; while it
   measures short of ``compactnet.t_final`` (times 1 +
   ``compactnet.speedup_margin``), up to ``compactnet.corrections`` more
   rounds of iterations run toward the budget the table's error on the
   current model asks for
   (:func:`dynscale.compactnet.search.corrected_budget`), in steps no
   deeper than the schedule's last
   (:func:`dynscale.compactnet.search.correction_budgets`).
4. The *uniform* baseline: every group cut by one multiplier, L2-trimmed
   from the same pretrained network; the largest of
   ``compactnet.uniform_multipliers`` whose measured latency is at most the
   searched model's (the table guesses where; a few around the guess are
   measured, :func:`choose_uniform`), chosen once per run and kept in
   ``<workdir>/uniform-choice.json`` (:func:`kept_uniform_choice`); its
   batch norm is recalibrated after the trim, as every candidate's is.
5. Retraining, once per ``compactnet.retrain_seeds``: the original, the
   searched and the uniform network each train ``compactnet.retrain_epochs``
   epochs with ``compactnet.retrain_optimizer``; the uniform and original
   ones first train as many steps as the searched model's chosen fine-tunes,
   so that all three see the same number of training images after the
   pretraining. With ``compactnet.distill.weight`` > 0 (beyond the paper)
   the searched and uniform networks also learn the original's predictions
   as retrained with the same seed (:func:`dynscale.train.steps.distillation_loss`).
   Selection reads the validation split; the test split is read once per
   final model.
6. Export (the trimmed network reloads without Flax) and the measured
   latencies of the original, searched and uniform exports, interleaved, on
   the platform and on each of ``compactnet.measure_on`` (Table 7's
   exchange), once per run (:func:`kept_measurements`). Speed-up is the
   survey's Eq. 10, ``s / s*``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dynscale import io, plots
from dynscale.compactnet import latency, platform, schedule, search, simulator, trimming
from dynscale.nn import batchnorm, models, sliced, spec
from dynscale.train import runs, steps, validation
from dynscale.train.checkpoint import has_checkpoint
from dynscale.train.optim import make_optimizer
from dynscale.train.state import create_train_state, merge_model

CONFIG_BLOCKS = ("compactnet",)
"""The config blocks CompactNet reads beyond the core ones (a resumed run is checked on them)."""
TABLE_FILE = "latency-table.json"
ORIGINAL_EXPORT = "original-export"
UNIFORM_EXPORT = "uniform-export"
UNIFORM_CHOICE = "uniform-choice.json"
FINAL_LATENCIES = "final-latencies.json"
SEARCHED_PROBE = "searched-before-retrain"
UNIFORM_WINDOW = 5  # uniform multipliers measured at a time around the table's guess


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def _prefixed(check, field: str) -> None:
  """Runs ``check()``; its errors name ``field.<name>`` instead of ``<name>``."""
  try:
    check()
  except ValueError as error:
    message = str(error)
    raise ValueError(message if message.startswith(field) else f"{field}.{message}") from error


def table_settings(config) -> simulator.TableSettings:
  return simulator.TableSettings(**config.compactnet.table_settings.to_dict())


def plan(config) -> schedule.Schedule:
  """The schedule whose final speed-up is ``compactnet.t_final`` (Eq. 1-2)."""
  c = config.compactnet
  return schedule.Schedule.for_final(c.t_final, c.iterations, c.decay)


def last_step_s(config, table: latency.Table) -> float:
  """The latency the schedule's last iteration removes, ``T_sub,N L_orig`` as the
  table predicts it: the deepest step a correction takes."""
  return plan(config).reductions[-1] * table.predict(table.full_widths)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first bad field, before any compute."""
  validation.check_core(config)
  validation.needs_validation(config, "the search keeps each iteration's candidate by "
                              "validation accuracy")
  c = config.compactnet
  target = platform.get(c.platform, "compactnet.platform")
  for name in c.measure_on:
    platform.get(name, "compactnet.measure_on")
  table_settings(config).check("compactnet.table_settings")
  _prefixed(lambda: plan(config), "compactnet")
  validation.positive(c.finetune_steps, "compactnet.finetune_steps", integer=True)
  validation.positive(c.recalibration_batches, "compactnet.recalibration_batches", integer=True)
  validation.non_negative_int(c.score_examples, "compactnet.score_examples")
  validation.non_negative_int(c.retrain_epochs, "compactnet.retrain_epochs")
  validation.non_negative_int(c.corrections, "compactnet.corrections")
  margin = c.speedup_margin
  if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
    raise ValueError(f"compactnet.speedup_margin must be a number in [0, 1), got {margin!r}")
  validation.fraction(c.distill.weight, "compactnet.distill.weight")
  validation.positive(c.distill.temperature, "compactnet.distill.temperature")
  if not c.retrain_seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                for s in c.retrain_seeds):
    raise ValueError(f"compactnet.retrain_seeds must be a non-empty list of integers >= 0, "
                     f"got {c.retrain_seeds!r}")
  for name in ("finetune_optimizer", "retrain_optimizer"):
    _prefixed(lambda name=name: validation.check_optimizer(c[name]), f"compactnet.{name}")
  if not c.uniform_multipliers or any(
      isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1
      for m in c.uniform_multipliers):
    raise ValueError(f"compactnet.uniform_multipliers must be fractions in (0, 1], "
                     f"got {c.uniform_multipliers!r}")
  arch = runs.planned_architecture(config)
  if tuple(arch["input_shape"][:2]) != (target.resolution, target.resolution):
    raise ValueError(f"compactnet.platform {target.name!r} measures "
                     f"{target.resolution}x{target.resolution} inputs, the data has "
                     f"{arch['input_shape'][:2]}")
  groups = trimming.trimmable_groups(arch, table_settings(config).expansion)
  search.check_min_width(c.min_width, [g.name for g in groups], "compactnet.min_width")
  if c.table:
    table = latency.load(c.table)
    latency.check_matches(table, arch, target, table_settings(config).expansion,
                          "compactnet.table")
    search.check_reachable(table, search.minimum_widths(table, c.min_width), plan(config),
                           "compactnet.min_width")


# --------------------------------------------------------------------------
# The masked network at a width vector
# --------------------------------------------------------------------------


def masked_loss(model, images, labels, widths):
  """Cross-entropy of the masked network at the width vector ``widths`` (traced)."""
  logits = model(images, widths=widths, train=True)
  loss = jnp.mean(steps.cross_entropy(logits, labels))
  return loss, {"loss": loss, "accuracy": steps.accuracy(logits, labels)}


def masked_forward(model, images, widths):
  return model(images, widths=widths, train=False)


def set_variables(model: nnx.Module, variables: dict) -> None:
  """Sets ``model``'s layers to copies of the pure ``variables`` (same shapes): the
  train steps donate their state, and ``variables`` may be needed again."""
  state = nnx.state(model.layers)
  state.replace_by_pure_dict(jax.tree.map(jnp.array, variables["layers"]))
  nnx.update(model.layers, state)


def candidate_settings(c: ml_collections.ConfigDict) -> dict:
  """The ``compactnet`` settings a candidate's fine-tune and score depend on,
  which a resumed search must share (the retraining's catch-up counts its
  fine-tune steps)."""
  return {"finetune_steps": c.finetune_steps, "finetune_optimizer": c.finetune_optimizer.to_dict(),
          "recalibration_batches": c.recalibration_batches, "score_examples": c.score_examples,
          "data_order": "slots"}  # fine_tune_epoch's (a search before them read others)


def fine_tune_epoch(run: runs.Run, slot: int) -> int:
  """The first epoch of the data order that fine-tune slot ``slot`` reads: the
  slots follow the pretraining's ``train.num_epochs``, each of
  ``ceil(finetune_steps / steps per epoch)`` epochs. Every candidate of a
  search iteration reads its slot (they are compared on the same batches),
  the original and uniform models' catch-up reads the chosen ones' slots in
  turn (the images the searched model was fine-tuned on), and the
  retrainings start after them: no stage reads another's batches, nor the
  pretraining's."""
  each = math.ceil(run.config.compactnet.finetune_steps / runs.total_steps(run, 1))
  return run.config.train.num_epochs + slot * each


@dataclasses.dataclass
class Candidates:
  """Fine-tunes and scores candidates on one masked network (one compile)."""

  run: runs.Run
  model: nnx.Module
  trainer: object
  tx: object

  @classmethod
  def create(cls, run: runs.Run, variables: dict) -> Candidates:
    c = run.config.compactnet
    model = models.build(run.arch, rngs=models.init_rngs(run.config.seed),
                         dtype=runs.compute_dtype(run.config))
    set_variables(model, variables)
    tx = make_optimizer(c.finetune_optimizer, c.finetune_steps)
    graphdef, _ = create_train_state(model, tx)
    return cls(run, model, runs.make_trainer(run, graphdef, tx, masked_loss, masked_forward),
               tx)

  def _state(self, variables: dict, widths) -> object:
    set_variables(self.model, variables)
    stats = batchnorm.recalibrate_masked(
        self.model, widths, self.trainer.training_batches(
            self.run.config.compactnet.recalibration_batches))
    set_variables(self.model, sliced.merge_variables(variables, stats))
    return self.trainer.place(create_train_state(self.model, self.tx)[1])

  def fine_tune(self, variables: dict, widths, slot: int) -> dict:
    """Recalibrated batch norm, then ``finetune_steps`` steps at ``widths`` in
    fine-tune slot ``slot``'s data order (:func:`fine_tune_epoch`)."""
    widths = jnp.asarray(widths, jnp.int32)
    state = self.trainer.train_steps(self._state(variables, widths), widths,
                                     self.run.config.compactnet.finetune_steps,
                                     fine_tune_epoch(self.run, slot))
    return merge_model(self.trainer.graphdef, state.params, state.model_state).pure_variables()

  def score(self, variables: dict, widths) -> float:
    """Validation accuracy at ``widths`` (batch norm as given), on
    ``compactnet.score_examples`` validation images drawn with the run's seed,
    the same for every candidate (0: all; :meth:`dynscale.train.loop.Trainer.evaluate`)."""
    set_variables(self.model, variables)
    state = self.trainer.place(create_train_state(self.model, self.tx)[1])
    return self.trainer.evaluate(state, "val", jnp.asarray(widths, jnp.int32),
                                 limit=self.run.config.compactnet.score_examples)["accuracy"]


# --------------------------------------------------------------------------
# The uniform baseline and measurements
# --------------------------------------------------------------------------


def uniform_widths(table: latency.Table, multiplier: float) -> list[int]:
  """Every group at ``multiplier`` of its size, on the table's grid."""
  r = table.round_to
  return [size if multiplier == 1 else int(np.clip(round(multiplier * size / r) * r,
                                                   grid[0], grid[-1]))
          for size, grid in zip(table.group_sizes, table.grids)]


def distinct_uniform(table: latency.Table, multipliers) -> dict[float, list[int]]:
  """Multiplier -> widths (:func:`uniform_widths`), widest first, one multiplier
  (the largest) per distinct width vector."""
  options = {}
  for m in sorted({float(m) for m in multipliers}, reverse=True):
    widths = uniform_widths(table, m)
    if widths not in options.values():
      options[m] = widths
  return options


def choose_uniform(table: latency.Table, arch: dict, multipliers, searched_widths,
                   searched_export: str, target: platform.Platform,
                   settings: simulator.TableSettings, remote: simulator.Remote,
                   window: int = UNIFORM_WINDOW) -> tuple[float, list[int], list[dict]]:
  """The largest multiplier whose network measures at most the searched model's
  latency (the smallest one when none does), its widths, and the
  measurements that chose it (per window: its latencies and
  :func:`simulator.conditions`).

  The table predicts where the boundary lies (the first multiplier predicted
  at most the searched model's latency); ``window`` multipliers around it
  are measured, interleaved with the searched model, and the window moves
  on until it holds the boundary (consecutive windows share one multiplier,
  so ``window`` is at least 2).
  """
  if isinstance(window, bool) or not isinstance(window, int) or window < 2:
    raise ValueError(f"window must be an integer >= 2 (consecutive windows share a "
                     f"multiplier), got {window!r}")
  options = distinct_uniform(table, multipliers)
  ms = list(options)
  budget = table.predict(list(searched_widths))
  first = next((i for i, m in enumerate(ms) if table.predict(options[m]) <= budget), len(ms) - 1)
  lo = max(0, min(first - window // 2, len(ms) - window))
  direction, wider_fast = 0, None  # -1: moving to wider windows, +1: to narrower
  measurements = []
  while True:
    part = ms[lo:lo + window]
    networks = {"searched": {"export_dir": searched_export},
                **{f"uniform-{m:g}": {"arch": arch, "widths": options[m],
                                      "expansion": table.expansion} for m in part}}
    measured, provenance = simulator.measure_networks(remote, target, networks, settings)
    measurements.append({"latency_s": measured, **simulator.conditions(provenance)})
    fast = [m for m in part if measured[f"uniform-{m:g}"] <= measured["searched"]]
    if direction >= 0 and not fast:  # the boundary lies below the window
      if lo + window >= len(ms):
        logging.warning("no uniform multiplier is as fast as the searched model; using %g",
                        ms[-1])
        return ms[-1], options[ms[-1]], measurements
      lo, direction = lo + window - 1, 1
    elif direction <= 0 and fast and fast[0] == part[0] and lo > 0:  # it lies above
      lo, direction, wider_fast = max(0, lo - window + 1), -1, fast[0]
    else:
      choice = fast[0] if fast else wider_fast
      return choice, options[choice], measurements


def kept_uniform_choice(workdir: str, table: latency.Table, arch: dict, multipliers,
                        searched_widths, searched_export: str, target: platform.Platform,
                        settings: simulator.TableSettings, remote: simulator.Remote
                        ) -> tuple[float, list[int]]:
  """:func:`choose_uniform`, measured once per run: the choice is written to
  ``<workdir>/uniform-choice.json`` and a rerun for the same searched widths,
  multipliers and platform reads it back instead of measuring again, so that
  a resumed run retrains, and resumes the checkpoints of, the model it
  started with. (Measured again, a boundary within the measurements'
  spread can move: a 1.8x run rerun for a second retraining seed chose
  another multiplier and retrained the first seed's uniform model anew.)"""
  path = os.path.join(workdir, UNIFORM_CHOICE)
  key = {"platform": target.name, "searched_widths": [int(w) for w in searched_widths],
         "multipliers": [float(m) for m in multipliers]}
  if os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)
    if {k: kept.get(k) for k in key} == key:
      return kept["multiplier"], kept["widths"]
  multiplier, widths, measurements = choose_uniform(table, arch, multipliers, searched_widths,
                                                    searched_export, target, settings, remote)
  io.write_json_atomic(path, {**key, "multiplier": multiplier,
                              "widths": [int(w) for w in widths],
                              "measurements": measurements})
  return multiplier, widths


def kept_measurements(workdir: str, remote: simulator.Remote, target: platform.Platform,
                      networks: dict[str, str], settings: simulator.TableSettings
                      ) -> tuple[dict[str, float], dict]:
  """:func:`dynscale.compactnet.simulator.measure_networks` of the exports
  ``networks`` (name -> directory) on ``target``, measured once per run: kept
  in ``<workdir>/final-latencies.json`` under the platform's name with the
  exports' digests (:func:`dynscale.nn.sliced.export_digest`) and the timing settings, and read
  back by a rerun for the same networks, so that rerunning a finished run
  (or a figure, which reruns its finished variants) reports what it
  measured. (Measured again, the same 1.8x model read 1.72x to 1.84x.)"""
  path = os.path.join(workdir, FINAL_LATENCIES)
  key = {"networks": {name: sliced.export_digest(d) for name, d in networks.items()},
         "settings": dataclasses.asdict(settings)}
  kept = {}
  if os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)
    if kept.get(target.name, {}).get("key") == key:
      return kept[target.name]["latency_s"], kept[target.name]["provenance"]
  latencies, provenance = simulator.measure_networks(
      remote, target, {name: {"export_dir": d} for name, d in networks.items()}, settings)
  io.write_json_atomic(path, {**kept, target.name: {"key": key, "latency_s": latencies,
                                                    "provenance": provenance}})
  return latencies, provenance


# --------------------------------------------------------------------------
# Retraining
# --------------------------------------------------------------------------


def _network(run: runs.Run, arch: dict, variables: dict) -> nnx.Module:
  model = models.build(arch, rngs=models.init_rngs(run.config.seed),
                       dtype=runs.compute_dtype(run.config))
  set_variables(model, variables)
  return model


class Teacher(NamedTuple):
  """The network the trimmed ones distill from, and its retraining's origin."""
  arch: dict
  variables: dict
  origin: dict


def retrain_origin(catch_up_steps: int, teacher: Teacher | None = None,
                   recalibration_batches: int = 0) -> dict:
  """How a retraining stage starts (its checkpoints' origin): the catch-up
  steps it trained first, when it distills its teacher's origin, and the
  training batches its batch norm was recalibrated on after a trim (the key
  only when it was, so that the untrimmed and searched models' origins are
  those recorded before the uniform model was recalibrated)."""
  recalibrated = {"recalibration_batches": recalibration_batches} if recalibration_batches else {}
  return {"catch_up_steps": catch_up_steps, "catch_up_order": "fine-tune slots",
          "teacher": None if teacher is None else teacher.origin, **recalibrated}


def retrain(run: runs.Run, name: str, arch: dict, variables: dict, seed: int,
            catch_up_steps: int, teacher: Teacher | None = None,
            recalibration_batches: int = 0) -> runs.Fitted:
  """``name`` retrained with data order ``seed`` (first ``catch_up_steps`` steps
  with the fine-tune optimizer when it has no checkpoint yet), distilled from
  ``teacher`` when given (``compactnet.distill``); ``recalibration_batches``:
  how ``variables`` had their batch norm recalibrated (:func:`retrain_origin`).
  A checkpoint of the stage
  started otherwise (:func:`retrain_origin`; e.g. one copied from a run whose
  search chose another number of candidates) is refused, not resumed.

  The catch-up reads the fine-tune slots a searched model's chosen
  fine-tunes read, one slot of ``finetune_steps`` each, and the retraining
  the epochs after them (:func:`fine_tune_epoch`): a retraining seeded as
  the pretraining was replays none of its batches, and the original and
  uniform models catch up on the images the searched one was fine-tuned on."""
  c = run.config.compactnet
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.seed = seed
  seeded = dataclasses.replace(run, config=config, arch=arch)
  model = _network(seeded, arch, variables)
  stage = f"retrain-{name}-seed{seed}"
  started = run.checkpoint_dir and has_checkpoint(os.path.join(run.checkpoint_dir, stage))
  slots, rest = divmod(catch_up_steps, c.finetune_steps)
  if rest:
    raise ValueError(f"catch_up_steps must be a multiple of compactnet.finetune_steps "
                     f"({c.finetune_steps}: one per fine-tune), got {catch_up_steps}")
  if catch_up_steps and not started:
    tx = make_optimizer(c.finetune_optimizer, catch_up_steps)
    graphdef, state = create_train_state(model, tx)
    trainer = runs.make_trainer(seeded, graphdef, tx, steps.classification_loss,
                                steps.eval_forward)
    state = trainer.place(state)
    for slot in range(slots):
      state = trainer.train_steps(state, jnp.float32(1.0), c.finetune_steps,
                                  fine_tune_epoch(seeded, slot))
    set_variables(model, merge_model(graphdef, state.params, state.model_state).pure_variables())
  loss_fn, forward, task = steps.classification_loss, steps.eval_forward, None
  if teacher is not None:
    loss_fn = steps.distillation_loss(teacher.arch, c.distill.weight, c.distill.temperature)
    forward, task = steps.full_width_forward, teacher.variables
  return runs.fit_stage(seeded, model, runs.Stage(
      stage, c.retrain_epochs, nnx.Param, loss_fn, forward, task=task,
      optimizer=c.retrain_optimizer,
      origin=retrain_origin(catch_up_steps, teacher, recalibration_batches),
      epochs_before=fine_tune_epoch(seeded, slots)))


def _accuracies(fitted: runs.Fitted) -> dict[str, float]:
  task = jnp.float32(1.0)
  return {"val": fitted.trainer.evaluate(fitted.state, "val", task)["accuracy"],
          "test": fitted.trainer.evaluate(fitted.state, "test", task)["accuracy"]}


def plot_widths(names, by_model: dict[str, list[int]], path: str, title: str) -> None:
  """Fig. 4: channels per trimmable group of each model."""
  fig, ax = plots.plt.subplots(figsize=(max(6, len(names) * 0.7), 3.5))
  x = np.arange(len(names))
  width = 0.8 / len(by_model)
  for k, (label, widths) in enumerate(by_model.items()):
    ax.bar(x + k * width, widths, width, label=label)
  ax.set_xticks(x + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=7)
  ax.set_ylabel("channels")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  plots.save_png(fig, path, dpi=120, title=title)
  plots.plt.close(fig)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def load_or_build_table(config, arch: dict, workdir: str,
                        remote: simulator.Remote = simulator.isolated) -> tuple[str,
                                                                                      latency.Table]:
  """The run's latency table: ``compactnet.table`` as given, else the workdir's
  own, measured on the first call; a rerun refuses its own table when the
  config now asks for other table settings."""
  c = config.compactnet
  target = platform.get(c.platform, "compactnet.platform")
  settings = table_settings(config)
  path = c.table or os.path.join(workdir, TABLE_FILE)
  if not os.path.exists(path):
    logging.info("Measuring the latency table of %s on %s", arch["name"], target.name)
    simulator.build_table(arch, target, settings, path, remote=remote)
  table = latency.load(path)
  latency.check_matches(table, arch, target, settings.expansion, path)
  if not c.table:
    settings.check_built_with(table, path, "compactnet.table_settings")
  return path, table


def trimmed_searched(arch: dict, found: search.Result, expansion: str) -> tuple[dict, dict]:
  """The searched model trimmed to its widths: architecture and variables."""
  groups = trimming.trimmable_groups(arch, expansion)
  return trimming.trim(arch, found.variables, trimming.core_widths(arch, groups, found.widths))


def trimmed_recalibrated(arch: dict, variables: dict, widths, batches, dtype
                         ) -> tuple[dict, dict]:
  """:func:`dynscale.compactnet.trimming.trim` of the ordered ``variables`` to core
  ``widths``, the batch-norm statistics then measured again over ``batches``
  (a trimmed layer's inputs are not those its statistics were measured on)."""
  trimmed_arch, trimmed = trimming.trim(arch, variables, widths)
  stats = batchnorm.recalibrate((trimmed_arch, trimmed), 1.0, batches, dtype=dtype)
  return trimmed_arch, sliced.merge_variables(trimmed, stats)


def search_on_platform(run: runs.Run, original: dict, original_export: str,
                       table: latency.Table, candidates: Candidates,
                       remote: simulator.Remote) -> search.Result:
  """The search, then its model measured against the original on the platform
  (exported to ``<workdir>/searched-before-retrain``), with up to
  ``compactnet.corrections`` extra iterations while it measures short of
  ``compactnet.t_final`` x (1 + ``compactnet.speedup_margin``). Every
  measurement is a check in the search's history, with the speed-up it was
  held to, so a rerun resumes without measuring again (and refuses a history
  checked against another goal)."""
  c = run.config.compactnet
  target, workdir = platform.get(c.platform), os.path.join(run.workdir, "search")
  goal = c.t_final * (1 + c.speedup_margin)
  probe = os.path.join(run.workdir, SEARCHED_PROBE)
  while True:
    found = search.search(run.arch, original, table, plan(run.config),
                          fine_tune=candidates.fine_tune, score=candidates.score,
                          workdir=workdir, min_width=c.min_width,
                          candidate_settings=candidate_settings(c), log=logging.info)
    checks = found.history["checks"]
    checked = checks[-1].get("goal_speedup", c.t_final) if checks else goal
    if checked != goal:
      raise ValueError(
          f"compactnet.speedup_margin: the search in {workdir} was checked against a "
          f"speed-up of {checked:g}, this config asks for {goal:g}; use another workdir")
    sliced.export(_network(run, *trimmed_searched(run.arch, found, table.expansion)), probe)
    if checks and checks[-1]["after_iterations"] == len(found.history["iterations"]):
      return found  # measured by an earlier call
    measured, provenance = simulator.measure_networks(remote, target, {
        "original": {"export_dir": original_export}, "searched": {"export_dir": probe}},
        table_settings(run.config))
    speedup = measured["original"] / measured["searched"]
    budgets = ()
    if speedup < goal and len(checks) < c.corrections:
      budgets = search.correction_budgets(
          table, found.widths, search.corrected_budget(table, found.widths, speedup, goal),
          last_step_s(run.config, table), c.min_width)
      if not budgets:
        logging.warning("the searched model measures %.3fx; no trims above the minimum "
                        "widths reach the corrected budget", speedup)
    logging.info("searched model on %s: %.3fx measured (goal %.3fx), %.3fx predicted%s",
                 target.name, speedup, goal, table.speedup(list(found.widths)),
                 f"; {len(budgets)} more iteration(s)" if budgets else "")
    check = search.record_check(workdir, found, speedup, budgets, goal,
                                simulator.conditions(provenance))
    if not check["next_budgets_s"]:
      return found


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       remote: simulator.Remote = simulator.isolated) -> dict:
  """The whole method (module docstring); writes and returns ``results.json``."""
  run = runs.start(config, workdir, check=check_config, blocks=CONFIG_BLOCKS)
  c = config.compactnet
  target = platform.get(c.platform)
  settings = table_settings(config)
  arch = run.arch
  table_path, table = load_or_build_table(config, arch, run.workdir, remote)
  schedule_ = plan(config)
  search.check_reachable(table, search.minimum_widths(table, c.min_width), schedule_,
                         "compactnet.min_width")  # before the pretraining: it needs the table
  if run.init_from:
    original_export = run.init_from
  else:
    runs.fit_stage(run, run.model, runs.Stage("pretrain", config.train.num_epochs, nnx.Param,
                                              steps.classification_loss, steps.eval_forward))
    original_export = os.path.join(run.workdir, ORIGINAL_EXPORT)
    sliced.export(run.model, original_export)
  original = run.model.pure_variables()
  candidates = Candidates.create(run, original)
  found = search_on_platform(run, original, original_export, table, candidates, remote)
  searched_arch, searched_vars = trimmed_searched(arch, found, table.expansion)
  groups = trimming.trimmable_groups(arch, table.expansion)
  chosen = sum(r["chosen"] is not None for r in found.history["iterations"])
  catch_up = chosen * c.finetune_steps
  multiplier, uniform = kept_uniform_choice(run.workdir, table, arch, c.uniform_multipliers,
                                             found.widths,
                                             os.path.join(run.workdir, SEARCHED_PROBE),
                                             target, settings, remote)
  ordered = trimming.order_by_importance(arch, original, [g.size for g in
                                                          spec.prunable_groups(arch)])
  uniform_arch, uniform_vars = trimmed_recalibrated(
      arch, ordered.variables, trimming.core_widths(arch, groups, uniform),
      candidates.trainer.training_batches(c.recalibration_batches), runs.compute_dtype(config))
  accuracy: dict[str, dict[str, list[float]]] = {}
  final = {}
  for seed in c.retrain_seeds:
    teacher = None
    for name, (a, v, extra, recalibrated) in {
        "original": (arch, original, catch_up, 0),
        "searched": (searched_arch, searched_vars, 0, 0),
        "uniform": (uniform_arch, uniform_vars, catch_up, c.recalibration_batches)}.items():
      fitted = retrain(run, name, a, v, seed, extra, teacher, recalibrated)
      if name == "original" and c.distill.weight > 0:
        teacher = Teacher(arch, merge_model(fitted.graphdef, fitted.state.params,
                                            fitted.state.model_state).pure_variables(),
                          retrain_origin(extra))
      for split, value in _accuracies(fitted).items():
        accuracy.setdefault(name, {}).setdefault(split, []).append(value)
      final.setdefault(name, fitted)
  uniform_export = os.path.join(run.workdir, UNIFORM_EXPORT)
  u = final["uniform"]
  sliced.export(merge_model(u.graphdef, u.state.params, u.state.model_state), uniform_export)
  s = final["searched"]
  export_dir = runs.export(run, s.graphdef, s.state)
  latencies, conditions = {}, {}
  for name in dict.fromkeys((target.name, *c.measure_on)):  # the target first, once
    latencies[name], provenance = kept_measurements(run.workdir, remote, platform.get(name), {
        "original": original_export, "searched": export_dir, "uniform": uniform_export},
        settings)
    conditions[name] = simulator.conditions(provenance)
  on_target = latencies[target.name]
  names = list(table.group_names)
  plot_widths(names, {"original": list(table.group_sizes), "searched": list(found.widths),
                      f"uniform x{multiplier:g}": uniform},
              os.path.join(run.workdir, "widths_per_layer.png"),
              runs.title("compactnet", arch["name"], run.dataset.name))

  def mean(name, split):
    return float(np.mean(accuracy[name][split]))
  metrics = {
      "platform": target.name,
      "target_speedup": schedule_.final_speedup,
      "t_init": schedule_.t_init,
      "predicted_speedup": table.speedup(list(found.widths)),
      "measured_speedup": on_target["original"] / on_target["searched"],
      "uniform_measured_speedup": on_target["original"] / on_target["uniform"],
      "uniform_multiplier": multiplier,
      "test_accuracy": mean("searched", "test"),
      "val_accuracy": mean("searched", "val"),
      "original_test_accuracy": mean("original", "test"),
      "uniform_test_accuracy": mean("uniform", "test"),
      "accuracy_by_seed": accuracy,
      "latency_s": latencies,
      "latency_conditions": conditions,
      "speedup_by_platform": {p: lat["original"] / lat["searched"] for p, lat in latencies.items()},
      "widths": dict(zip(names, (int(w) for w in found.widths))),
      "uniform_widths": dict(zip(names, uniform)),
      "layer_widths": [layer.get("features") for layer in searched_arch["layers"]],
      "iterations_trimmed": chosen,
      "search_checks": found.history["checks"],
      "table": table_path,
      "table_calibration": table.calibration,
      "export_dir": export_dir,
      "original_export_dir": original_export,
      "uniform_export_dir": uniform_export,
  }
  io.write_json_atomic(os.path.join(run.workdir, "search-summary.json"), found.history)
  return runs.finish(run, s.graphdef, s.state, metrics, exported=export_dir)
