"""The epoch loop: device-resident data, chunked jitted steps, evaluation,
early stopping, checkpoints that resume exactly, metrics and progress.

One ``Trainer`` binds a model's graph, an optimizer, an objective and a
dataset on a mesh. ``fit`` trains one *stage* (a fixed task pytree, e.g. a
DP or a TESLA coefficient vector) for some epochs; multi-stage schedules
call it once per stage with a different task and a different stage name.
Every random choice derives from the seed and the epoch, and checkpoints
are taken at epoch ends, so a run killed and started again ends with the
same numbers as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from dynscale.data import pipeline
from dynscale.data.datasets import Dataset
from dynscale.train import steps
from dynscale.train.checkpoint import Checkpoints
from dynscale.train.early_stopping import EarlyStopping
from dynscale.train.state import TrainState
from dynscale.train.writers import MetricWriter, Progress

SPLITS = ("train", "val", "test")


class DeviceSplit(NamedTuple):
  """One split on the device: uint8 images NHWC and int32 labels, replicated."""
  images: jax.Array
  labels: jax.Array

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])


def check_origin(stage: str, directory: str, saved: dict | None, expected: dict | None
                 ) -> None:
  """Refuses to resume ``stage`` from the checkpoint in ``directory`` when it
  was started from another state than this run starts it from (``saved`` and
  ``expected`` origins differ), e.g. a checkpoint copied from another run.
  A checkpoint that records no origin (written before origins were kept), or
  a run that gives none, resumes with what is there."""
  if expected is None or saved == expected:
    return
  if saved is None:
    logging.warning("Stage %r: the checkpoint in %s records no origin; resuming it as %s.",
                    stage, directory, expected)
    return
  raise ValueError(
      f"stage {stage!r}: the checkpoint in {directory} started from {saved}, but this run "
      f"starts the stage from {expected}; delete {directory} and {directory}-best to train "
      "the stage again")


def _to_mesh(array, sharding) -> jax.Array:
  """Places an array, identical on every process, on ``sharding`` (as is if already there)."""
  if getattr(array, "sharding", None) == sharding:
    return array
  host = np.asarray(array)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass
class FitResult:
  state: TrainState
  best_state: TrainState
  early_stopping: EarlyStopping | None
  epochs: int  # by this stage in all, resumed epochs included


def check_batch_sizes(batch_size: int, eval_batch_size: int, dataset: Dataset, devices: int,
                      prefix: str = "") -> None:
  """Raises naming the field (``prefix`` and its name): a batch size that does
  not split over ``devices``, or a training batch larger than ``dataset``'s
  training split."""
  for field, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if size % devices:
      raise ValueError(f"{prefix}{field} ({size}) must be a multiple of the number of devices "
                       f"({devices})")
  if batch_size > len(dataset.train_y):
    raise ValueError(f"{prefix}batch_size ({batch_size}) exceeds the {len(dataset.train_y)} "
                     f"training examples of {dataset.name}")


class Trainer:
  """Jitted train/eval functions for one model, optimizer and dataset."""

  def __init__(self, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               loss_fn: steps.LossFn, forward: steps.ForwardFn, dataset: Dataset,
               batch_size: int, eval_batch_size: int, augment: bool, seed: int,
               steps_per_chunk: int = 50, mesh=None, compute_dtype=jnp.float32,
               trainable=nnx.Param):
    self.mesh = steps.data_mesh() if mesh is None else mesh
    check_batch_sizes(batch_size, eval_batch_size, dataset, self.mesh.devices.size)
    self.dataset = dataset
    self.batch_size = batch_size
    self.eval_batch_size = eval_batch_size
    self.steps_per_chunk = steps_per_chunk
    self.graphdef = graphdef
    self._data_key = jax.random.fold_in(jax.random.key(seed), 0)
    self._augment_key = jax.random.fold_in(jax.random.key(seed), 1)
    self._recalibration_key = jax.random.fold_in(jax.random.key(seed), 2)
    self._subset_key = jax.random.fold_in(jax.random.key(seed), 3)
    sharding = steps.replicated(self.mesh)
    self.splits = {
        name: DeviceSplit(_to_mesh(x, sharding), _to_mesh(y.astype(np.int32), sharding))
        for name, (x, y) in zip(SPLITS, ((dataset.train_x, dataset.train_y),
                                         (dataset.val_x, dataset.val_y),
                                         (dataset.test_x, dataset.test_y)))}
    mean, std = pipeline.normalization_stats(dataset.name)

    def batch_fn(data: DeviceSplit, idx, key):
      images, labels = pipeline.make_batch(
          data.images, data.labels, idx, key=key, augment=augment and key is not None,
          mean=mean, std=std)
      return images.astype(compute_dtype), labels

    self._batch_fn = batch_fn
    self._tx, self._trainable = tx, trainable
    self.train_chunk = steps.make_train_chunk(graphdef, tx, loss_fn, batch_fn, self.mesh,
                                              trainable)
    self.eval_totals = steps.make_eval_totals(graphdef, forward, batch_fn, self.mesh)
    self.steps_per_epoch = self.splits["train"].size // batch_size

  def with_loss(self, loss_fn: steps.LossFn) -> Trainer:
    """This trainer with another objective: a new train step (compiled on first
    use); the data on the device, the data order and the evaluation are shared."""
    other = copy.copy(self)
    other.train_chunk = steps.make_train_chunk(self.graphdef, self._tx, loss_fn,
                                               self._batch_fn, self.mesh, self._trainable)
    return other

  def place(self, state: TrainState) -> TrainState:
    """Replicates a train state on the mesh (every process holds the same values)."""
    sharding = steps.replicated(self.mesh)
    return jax.tree.map(functools.partial(_to_mesh, sharding=sharding), state)

  def training_batches(self, num_batches: int) -> list[jax.Array]:
    """The first ``num_batches`` training batches of a fixed order, not
    augmented: one shuffled epoch, then, when more are asked for than an
    epoch holds, the next epochs' (each its own shuffle)."""
    data = self.splits["train"]
    kept, epoch = [], 0
    while len(kept) < num_batches:
      key = self._recalibration_key if epoch == 0 else (  # the first epoch as before
          jax.random.fold_in(self._recalibration_key, epoch))
      kept.extend(pipeline.epoch_permutation(key, data.size, self.batch_size))
      epoch += 1
    return [self._batch_fn(data, idx, None)[0] for idx in kept[:num_batches]]

  def evaluate(self, state: TrainState, split: str, task, *, limit: int = 0
               ) -> dict[str, float]:
    """Means over every example of ``split`` at ``task``, or over ``limit`` of
    them when 0 < ``limit`` < its size: a subset drawn at random with the
    trainer's seed, the same at every call (a split keeps its file's order,
    and the CIFAR files are ordered by class, so its first examples are not a
    sample of it).

    ``accuracy``, ``loss``, and each extra per-example metric the forward
    returns (:func:`dynscale.train.steps.forward_outputs`), e.g. FLOPs per image.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = self.splits[split]
    if data.size == 0:
      return {"accuracy": float("nan"), "loss": float("nan")}
    size = min(limit, data.size) if limit > 0 else data.size
    idx, mask = pipeline.eval_batches(size, self.eval_batch_size)
    if size < data.size:
      idx = jax.random.permutation(self._subset_key, data.size)[:size][idx]
    totals = {name: float(total) for name, total in self.eval_totals(
        state.params, state.model_state, data, jnp.asarray(idx),
        jnp.asarray(mask, jnp.float32), task).items()}
    count, correct = totals.pop("count"), totals.pop("correct")
    return {"accuracy": correct / count, **{name: total / count for name, total in totals.items()}}

  def epoch_chunks(self, epoch: int):
    """(index chunk ``(S, B)``, augmentation key) pairs for one epoch."""
    order = pipeline.epoch_permutation(jax.random.fold_in(self._data_key, epoch),
                                       self.splits["train"].size, self.batch_size)
    epoch_key = jax.random.fold_in(self._augment_key, epoch)
    for start in range(0, order.shape[0], self.steps_per_chunk):
      yield order[start:start + self.steps_per_chunk], jax.random.fold_in(epoch_key, start)

  def train_epoch(self, state: TrainState, epoch: int, task, *, progress: Progress,
                  writer: MetricWriter | None, tag: str) -> TrainState:
    data = self.splits["train"]
    for idx, key in self.epoch_chunks(epoch):
      state, metrics = self.train_chunk(state, data, jnp.asarray(idx), key, task)
      step = int(state.step)
      throughput = progress.update(step, epoch, metrics)
      if writer is not None:
        writer.write(step, {**{f"{tag}/train_{k}": v for k, v in metrics.items()},
                            f"{tag}/images_per_s": throughput["images_per_s"]})
    return state

  def train_steps(self, state: TrainState, task, num_steps: int, epoch: int) -> TrainState:
    """``num_steps`` optimizer steps at ``task`` in the data order and augmentation
    of epochs ``epoch, epoch + 1, ...``: a short fine-tune (no validation, no
    checkpoint), the same for the same arguments."""
    data, done = self.splits["train"], 0
    while done < num_steps:
      for idx, key in self.epoch_chunks(epoch):
        idx = idx[:num_steps - done]
        state, _ = self.train_chunk(state, data, jnp.asarray(idx), key, task)
        done += idx.shape[0]
        if done == num_steps:
          break
      epoch += 1
    return state

  def fit(self, state: TrainState, *, task, num_epochs: int, stage: str,
          checkpoint_dir: str | None = None, writer: MetricWriter | None = None,
          early_stopping: EarlyStopping | None = None,
          validate: Callable[[TrainState], dict[str, float]] | None = None,
          on_epoch_end: Callable[[int, TrainState], dict | None] | None = None,
          origin: dict | None = None, epochs_before: int = 0) -> FitResult:
    """Trains at ``task`` for up to ``num_epochs`` epochs, resuming if possible.

    After every epoch ``validate(state)`` (default: accuracy and loss on the
    validation split at ``task``; never the test split) feeds its accuracy to
    ``early_stopping``, the state is checkpointed under
    ``<checkpoint_dir>/<stage>``, and the best-validation state is kept under
    ``<checkpoint_dir>/<stage>-best`` (without ``early_stopping`` every epoch
    counts as an improvement: the best state is the last). An existing
    checkpoint of this stage is resumed, and what an earlier run of the stage
    logged past the state it starts from (a killed run's epochs, which this
    one logs again) is dropped from ``writer``'s file
    (:meth:`MetricWriter.forget_after`). ``on_epoch_end(epoch, state)`` runs
    before the epoch's checkpoint, so what it saves is never behind the epoch
    a resumed run starts from; the metrics it returns (or ``None``) are logged
    in the epoch's line, so that they are dropped with it.
    ``origin`` (JSON values) says how the stage's starting state was made; it
    is saved with every checkpoint, and one saved with another origin is
    refused (:func:`check_origin`). ``epochs_before``: the epochs a run of
    several stages trained before this one; the stage's epoch ``e`` reads
    the data order and augmentation of the run's epoch ``epochs_before + e``,
    so that no two epochs of the run replay the same batches.
    """
    if validate is None:
      validate = functools.partial(self.evaluate, split="val", task=task)
    with contextlib.ExitStack() as stack:  # the checkpoint managers closed on any exit
      store = best_store = None
      start_epoch, best_state = 0, None
      if checkpoint_dir is not None:
        store = stack.enter_context(Checkpoints(os.path.join(checkpoint_dir, stage)))
        best_store = stack.enter_context(
            Checkpoints(os.path.join(checkpoint_dir, f"{stage}-best"), max_to_keep=1))
        restored = store.restore(state)
        if restored is not None:
          _, state, meta = restored
          check_origin(stage, store.directory, meta.get("origin"), origin)
          start_epoch = meta["epoch"]
          if meta.get("early_stopping") is not None:
            early_stopping = EarlyStopping.from_json(meta["early_stopping"])
          best = best_store.restore(state)
          best_state = self.place(best[1]) if best is not None else None
          logging.info("Resumed stage %r at epoch %d (step %d).", stage, start_epoch,
                       int(state.step))
        state = self.place(state)
      if writer is not None:  # what an earlier, killed run of the stage logged past its start
        writer.forget_after(int(state.step), stage)
      total_steps = int(state.step) + (num_epochs - start_epoch) * self.steps_per_epoch
      progress = Progress(total_steps, self.batch_size, start_step=int(state.step))
      epoch = start_epoch
      while epoch < num_epochs and not (early_stopping and early_stopping.should_stop):
        state = self.train_epoch(state, epochs_before + epoch, task, progress=progress,
                                 writer=writer, tag=stage)
        val = validate(state)
        epoch += 1
        improved = early_stopping is None or early_stopping.improved(val["accuracy"])
        if early_stopping is not None:
          early_stopping = early_stopping.update(val["accuracy"], epoch)
        if improved:
          best_state = jax.tree.map(jnp.copy, state)
          if best_store is not None:
            best_store.save(epoch, best_state, {"epoch": epoch})
        logged = {} if on_epoch_end is None else on_epoch_end(epoch, state) or {}
        if writer is not None:
          writer.write(int(state.step), {f"{stage}/val_accuracy": val["accuracy"],
                                         f"{stage}/val_loss": val["loss"], "epoch": epoch,
                                         **logged})
        logging.info("stage %s epoch %d: val accuracy %.4f", stage, epoch, val["accuracy"])
        if store is not None:
          store.save(epoch, state, {
              "epoch": epoch, "stage": stage, "origin": origin,
              "early_stopping": early_stopping.to_json() if early_stopping else None})
    return FitResult(state=state, best_state=state if best_state is None else best_state,
                     early_stopping=early_stopping, epochs=epoch)

