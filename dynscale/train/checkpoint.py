"""Orbax checkpoints of the train state plus JSON run metadata.

Saves are atomic (orbax writes to a temporary directory and renames it). If
the newest checkpoint cannot be read, restore warns and falls back to the
one before it, so a run killed while writing, or a disk that corrupted the
last save, still resumes; one of another network (a workdir reused with
another config) is refused.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging



def _flat(tree) -> dict[str, tuple[int, ...]]:
  """Leaf path -> shape of a pytree of arrays or of orbax's array metadata."""
  return {".".join(map(str, path)): tuple(leaf.shape)
          for path, leaf in ocp.tree.to_flat_dict(tree).items()}


def _difference(stored: dict, wanted: dict) -> str | None:
  """How a checkpoint's leaves and shapes (``stored``) differ from the state
  restoring it (``wanted``), in a few words; None if they match."""
  missing, extra = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
  if missing or extra:
    return (f"leaves only in this run's state: {missing[:3]}, only in the checkpoint: "
            f"{extra[:3]}")
  for name in sorted(wanted):
    if stored[name] != wanted[name]:
      return f"{name} has shape {stored[name]} there, {wanted[name]} here"
  return None


def has_checkpoint(directory: str) -> bool:
  """Whether ``directory`` holds a finished checkpoint: a stage killed before
  its first save leaves the directory (created when its manager opens) empty,
  or holding an unfinished temporary one."""
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


class Checkpoints:
  """Numbered checkpoints of ``(state pytree, metadata dict)`` in ``directory``."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, metadata: dict) -> None:
    """Saves ``state`` (arrays) and ``metadata`` (JSON) as checkpoint ``step``,
    replacing one already there: a run killed between an epoch's best-state
    save and its own resumes before that epoch, trains it again (the same
    steps, the same result) and saves its best state again."""
    if step in self._manager.all_steps():
      self._manager.delete(step)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
        force=True)
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, template: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint (or ``step``), shaped like ``template``.

    Returns ``(step, state, metadata)``, or None when there is no checkpoint.
    A checkpoint that fails to load is skipped with a warning; one that holds
    another network (other shapes or leaves: the workdir of another config)
    raises a ValueError naming the directory, so that nothing is trained over it.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for candidate in candidates:
      try:
        difference = _difference(_flat(self._manager.item_metadata(candidate)["state"]),
                                 _flat(abstract))
        if difference is None:
          restored = self._manager.restore(
              candidate,
              args=ocp.args.Composite(
                  state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        logging.warning("Checkpoint %d in %s is unreadable (%s: %s); trying an older one.",
                        candidate, self.directory, type(e).__name__, e)
        continue
      if difference is not None:  # checked before reading: orbax would fail part-way
        raise ValueError(
            f"checkpoint {candidate} in {self.directory} holds another network than this "
            f"run's ({difference}); delete {self.directory} to train this stage from "
            "scratch, or use another workdir")
      return candidate, restored["state"], dict(restored["metadata"])
    if candidates:
      logging.warning("No readable checkpoint in %s; starting from scratch.", self.directory)
    return None

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
