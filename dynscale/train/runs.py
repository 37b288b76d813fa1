"""What every method does around training: check the config, load the data,
build the model, open writers and checkpoints, and write ``results.json``.

``results.json`` holds the resolved config, the dataset, the model, the
devices and the method's metrics. Metrics that vary along an axis are
*curves* under ``results["curves"][name]``: ``{"x": x-axis name, "y":
metric name, "points": [[x, y], ...]}`` (:func:`curve`); every curve is
also logged as a table and plotted to ``<workdir>/<name>.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from dynscale import data, io, plots
from dynscale.data.datasets import dataset_spec
from dynscale.nn import models, sliced
from dynscale.train import loop, protocols, steps, sweep, validation
from dynscale.train.checkpoint import has_checkpoint
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.optim import make_optimizer
from dynscale.train.state import TrainState, create_train_state, merge_model
from dynscale.train.writers import MetricWriter


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: str
  dataset: data.Dataset
  arch: dict
  model: nnx.Module
  writer: MetricWriter | None
  checkpoint_dir: str | None
  init_from: str | None  # the exported network the model started from

  @property
  def is_main_process(self) -> bool:
    return jax.process_index() == 0


def compute_dtype(config) -> jnp.dtype:
  return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def architecture(config, num_classes: int, input_shape) -> dict:
  """The architecture dict ``config.model`` names, for data of these classes and shape."""
  return models.architecture(
      config.model.name, num_classes=num_classes, input_shape=tuple(input_shape),
      profile=config.model.profile, idp_layers=config.model.idp_layers,
      width_multiplier=config.model.width_multiplier, mp_profiles=config.model.get("mp_profiles"))


def planned_architecture(config) -> dict:
  """The architecture a run of ``config`` trains, read before any data or
  compute (for a method's config checks): the exported network's that
  ``model.init_from`` names, else the one ``config.model`` builds for the
  dataset's classes and image shape. :func:`architecture_field` names where
  it came from."""
  if config.model.init_from:
    return sliced.load_architecture(validation.exported_network(config.model.init_from))
  spec = dataset_spec(config.data.dataset)
  return architecture(config, spec.num_classes, spec.image_shape)


def architecture_field(config) -> str:
  """The config field :func:`planned_architecture` follows, for errors."""
  return "model.init_from" if config.model.init_from else "model.name"


def build_model(config, dataset: data.Dataset) -> tuple[dict, nnx.Module]:
  """The architecture dict and NNX model named by ``config.model``."""
  arch = architecture(config, dataset.num_classes, dataset.train_x.shape[1:])
  model = models.build(arch, rngs=models.init_rngs(config.seed), dtype=compute_dtype(config))
  return arch, model


def load_exported(directory: str, config, dataset: data.Dataset
                  ) -> tuple[dict, nnx.Module]:
  """The network exported in ``directory``: its architecture, and its variables set
  into a freshly built NNX model, so a later stage continues from it."""
  exported = sliced.load(directory)
  arch = exported.arch
  needs = (tuple(arch["input_shape"]), arch["num_classes"])
  has = (tuple(dataset.train_x.shape[1:]), dataset.num_classes)
  if needs != has:
    raise ValueError(f"model.init_from: the exported network takes inputs {needs[0]} with "
                     f"{needs[1]} classes; {dataset.name} has {has[0]} with {has[1]}")
  model = models.build(arch, rngs=models.init_rngs(config.seed), dtype=compute_dtype(config))
  state = nnx.state(model.layers)
  if jax.tree.structure(state.to_pure_dict()) != jax.tree.structure(exported.variables["layers"]):
    raise ValueError(f"model.init_from: the variables in {directory!r} do not match its "
                     "architecture")
  state.replace_by_pure_dict(exported.variables["layers"])
  nnx.update(model.layers, state)
  return arch, model


CONFIG_FILE = "config.json"
CORE_BLOCKS = ("method", "seed", "protocol", "protocol_sizes", "data", "model", "optimizer",
               "train", "eval")
"""The config blocks every method reads (its own add theirs: ``runs.start``'s ``blocks``)."""
NOT_TRAINING = ("data.data_dir", "data.eval_batch_size")
"""Fields of those blocks that do not change what a run trains."""
INIT_FROM_FILE = "init_from.json"
"""Where a run started from an exported network records its digest (:func:`start`)."""
COMPILATION_CACHE = "compilation-cache"
"""The launcher's default directory for JAX's compiled programs, in the workdir."""


def _started(workdir: str) -> bool:
  """Whether ``workdir`` holds anything a run made beyond its config: not its
  TensorBoard directory, an empty log, the compiled programs' cache, or
  checkpoint directories without a finished checkpoint, which a run that
  failed before its first save leaves."""
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if name == "checkpoints":
      if any(has_checkpoint(os.path.join(path, stage)) for stage in os.listdir(path)):
        return True
    elif name not in (CONFIG_FILE, INIT_FROM_FILE, COMPILATION_CACHE, "tensorboard") and not (
        name == "metrics.jsonl" and os.path.getsize(path) == 0):
      return True
  return False


def _recorded_start(workdir: str) -> str | None:
  """The digest of the network the run in ``workdir`` started from, as
  :func:`start` recorded it (``None``: from scratch, or recorded before)."""
  path = os.path.join(workdir, INIT_FROM_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["digest"]


def check_same_run(config: ml_collections.ConfigDict, workdir: str,
                   blocks: tuple[str, ...] = (), start_digest: str | None = None) -> None:
  """Raises if ``workdir`` holds a started run (:func:`_started`) whose config
  differs from ``config`` in a field the method reads (:data:`CORE_BLOCKS`
  and ``blocks``, but :data:`NOT_TRAINING`): resuming it would give the old
  run's numbers under the new config. Fields in one config only (a field
  added to the code since) are not compared, nor other methods' blocks (a
  figure's backbone is not refused for a change of its gated variants').
  ``model.init_from`` is compared by the network it names, ``start_digest``
  (:func:`dynscale.nn.sliced.export_digest`) against the one :func:`start`
  recorded: a moved figure's variants name their backbones by new paths and
  resume, and a backbone trained again in its place is a change."""
  saved_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(saved_path) or not _started(workdir):
    return
  with open(saved_path) as f:
    saved = sweep.flat_fields(json.load(f))
  now = sweep.flat_fields(json.loads(json.dumps(config.to_dict())))
  recorded = _recorded_start(workdir)
  same_start = None if recorded is None or start_digest is None else recorded == start_digest
  read = (*CORE_BLOCKS, *blocks)
  differ = sorted(key for key in saved.keys() & now.keys()
                  if saved[key] != now[key] and key.split(".")[0] in read
                  and not key.startswith(NOT_TRAINING)
                  and not (key == "model.init_from" and same_start))
  changes = [f"{key}: {saved[key]!r} there, {now[key]!r} now" for key in differ]
  if same_start is False and "model.init_from" not in differ:
    changes.append(f"model.init_from: {now['model.init_from']!r} holds another network than "
                   "the one the run started from")
  if changes:
    raise ValueError(f"workdir {workdir!r} holds a run of another config "
                     f"({'; '.join(changes)}); rerun it with its own config to resume it, "
                     "or use another workdir")


def start(config: ml_collections.ConfigDict, workdir: str, *, check=validation.check_core,
          blocks: tuple[str, ...] = ()) -> Run:
  """Validates ``config`` (via ``check``), loads data, builds the model, then
  checks ``workdir`` (creating it; a started run there must be of the same
  config in the blocks the method reads, the core ones and ``blocks``:
  :func:`check_same_run`): a config refused leaves nothing behind.

  With ``model.init_from`` the model is the exported network it names
  (:func:`load_exported`), and the other model fields are not used.
  """
  check(config)
  init_from = (validation.exported_network(config.model.init_from)
               if config.model.init_from else None)
  try:
    dataset = data.load(config.data.dataset, data_dir=config.data.data_dir or None,
                        val_size=config.data.val_size, seed=config.seed,
                        train_examples=config.data.train_examples)
  except ValueError as error:  # the checks that need the data: name the config field
    if str(error).startswith(("val_size ", "train_examples ")):
      raise ValueError(f"data.{error}") from error
    raise
  loop.check_batch_sizes(config.data.batch_size, config.data.eval_batch_size, dataset,
                         steps.data_mesh().devices.size, prefix="data.")
  arch, model = (load_exported(init_from, config, dataset) if init_from
                 else build_model(config, dataset))
  workdir = io.check_writable_dir(workdir)  # created once the config is known good
  start_digest = sliced.export_digest(init_from) if init_from else None
  check_same_run(config, workdir, blocks, start_digest)
  main = jax.process_index() == 0
  if main:
    io.write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())
    if init_from:
      io.write_json_atomic(os.path.join(workdir, INIT_FROM_FILE),
                           {"path": init_from, "digest": start_digest})
  writer = MetricWriter(workdir, tensorboard=config.tensorboard) if main else None
  checkpoint_dir = os.path.join(workdir, "checkpoints") if config.train.checkpoint else None
  return Run(config, workdir, dataset, arch, model, writer, checkpoint_dir, init_from)


def augment(config, dataset_name: str) -> bool:
  """Whether training batches of ``dataset_name`` are cropped and flipped
  (``data.augment``, :data:`dynscale.train.validation.AUGMENT`)."""
  if config.data.augment == "auto":
    return data.uses_augmentation(dataset_name)
  return config.data.augment == "on"


def make_trainer(run: Run, graphdef, tx, loss_fn: steps.LossFn,
                 forward: steps.ForwardFn = steps.eval_forward, *,
                 trainable=nnx.Param) -> loop.Trainer:
  config = run.config
  return loop.Trainer(
      graphdef=graphdef, tx=tx, loss_fn=loss_fn, forward=forward, dataset=run.dataset,
      batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size,
      augment=augment(config, run.dataset.name), seed=config.seed,
      steps_per_chunk=config.train.steps_per_chunk, compute_dtype=compute_dtype(config),
      trainable=trainable)


def total_steps(run: Run, epochs: int | None = None) -> int:
  """Optimizer steps in ``epochs`` epochs (default ``train.num_epochs``), for schedules."""
  epochs = run.config.train.num_epochs if epochs is None else epochs
  return (len(run.dataset.train_y) // run.config.data.batch_size) * epochs


@dataclasses.dataclass
class Stage:
  """A training stage: its checkpoint name, epochs, what learns, its objective,
  its evaluation forward, which state it hands on (``'best'`` validation
  accuracy, or ``'final'``), the task it trains at, its optimizer block
  (default ``config.optimizer``), how its starting state was made
  (``origin``: a checkpoint with another one is not resumed,
  :func:`dynscale.train.loop.check_origin`), and the epochs the run trained
  before it (``epochs_before``: the stage reads the data order of the run's
  later epochs, :meth:`dynscale.train.loop.Trainer.fit`)."""

  name: str
  epochs: int
  trainable: Any  # an nnx filter
  loss_fn: steps.LossFn
  forward: steps.ForwardFn
  keep: str = "best"
  task: Any = None  # None: the constant 1.0
  optimizer: ml_collections.ConfigDict | None = None
  origin: dict | None = None
  epochs_before: int = 0


@dataclasses.dataclass
class Fitted:
  """A stage's outcome: its trainer, the model's graph, the state handed on and
  the epochs the stage trained (resumed ones included)."""

  trainer: loop.Trainer
  graphdef: nnx.GraphDef
  state: TrainState
  epochs: int


def fit_stage(run: Run, model: nnx.Module, stage: Stage) -> Fitted:
  """Trains ``model`` through ``stage``, resuming its checkpoint, and sets
  ``model``'s variables to the state the stage hands on (early stopping on
  validation accuracy with ``train.patience``)."""
  optimizer = run.config.optimizer if stage.optimizer is None else stage.optimizer
  tx = make_optimizer(optimizer, total_steps(run, stage.epochs))
  graphdef, state = create_train_state(model, tx, stage.trainable)
  trainer = make_trainer(run, graphdef, tx, stage.loss_fn, stage.forward,
                         trainable=stage.trainable)
  patience = run.config.train.patience
  task = jnp.float32(1.0) if stage.task is None else stage.task
  fit = trainer.fit(trainer.place(state), task=task, num_epochs=stage.epochs,
                    stage=stage.name, checkpoint_dir=run.checkpoint_dir, writer=run.writer,
                    early_stopping=EarlyStopping(patience) if patience else None,
                    origin=stage.origin, epochs_before=stage.epochs_before)
  state = fit.best_state if stage.keep == "best" else fit.state
  nnx.update(model, nnx.state(merge_model(graphdef, state.params, state.model_state)))
  return Fitted(trainer, graphdef, state, fit.epochs)


def curve(x: str, y: str, points) -> dict:
  """A results-file curve: metric ``y`` against ``x`` at ``points`` ``[(x, y), ...]``."""
  return {"x": x, "y": y, "points": [[float(a), float(b)] for a, b in points]}


def title(method: str, model: str, dataset: str, protocol: str = "paper") -> str:
  """A plot title naming what ran: ``'<method>: <model> on <dataset>'``, and the
  protocol unless it is the paper's."""
  return f"{method}: {model} on {dataset}" + ("" if protocol == "paper" else f", {protocol} protocol")


def report_curves(run: Run, curves: dict) -> None:
  """Logs each curve as a table and plots it to ``<workdir>/<name>.png`` (process 0),
  titled with the method, model and dataset that ran."""
  heading = title(run.config.method, run.arch["name"], run.dataset.name,
                  protocols.name_of(run.config))
  for name, c in curves.items():
    labelled = {run.config.method: c}
    logging.info("%s, %s:\n%s", heading, name, plots.format_curves_table(labelled))
    if run.is_main_process:
      plots.plot_curves(labelled, os.path.join(run.workdir, f"{name}.png"), title=heading)


def export(run: Run, graphdef: nnx.GraphDef, state: TrainState) -> str:
  """Exports the network of ``state`` to ``<workdir>/export`` (process 0); returns the path.

  ``architecture.json`` and ``params.npz``, each written atomically
  (:func:`dynscale.nn.sliced.export`); ``model.init_from`` reads them.
  """
  path = os.path.join(run.workdir, validation.EXPORT_DIR)
  if run.is_main_process:
    sliced.export(merge_model(graphdef, state.params, state.model_state), path)
  return path


def finish(run: Run, graphdef: nnx.GraphDef, state: TrainState, metrics: dict, *,
           exported: str | None = None) -> dict:
  """Exports the final (best) ``state`` (unless ``exported`` says where it already
  is), reports the curves, writes ``results.json``.

  ``results.json`` is written atomically, last; the results are returned.
  """
  exported = export(run, graphdef, state) if exported is None else exported
  report_curves(run, metrics.get("curves", {}))
  d = run.dataset
  results = {
      "config": run.config.to_dict(),
      "protocol": protocols.record(run.config),
      "dataset": {"name": d.name, "source": d.source, "num_classes": d.num_classes,
                  "train": len(d.train_y), "val": len(d.val_y), "test": len(d.test_y)},
      "model": {"name": run.arch["name"], "architecture": run.arch,
                "init_from": run.init_from},
      "export": exported,
      "devices": {"count": jax.device_count(), "platform": jax.devices()[0].platform},
      **metrics,
  }
  if run.is_main_process:
    io.write_json_atomic(os.path.join(run.workdir, "results.json"), results)
  if run.writer is not None:
    run.writer.close()
  return results
