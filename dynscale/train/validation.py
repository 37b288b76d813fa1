"""Core config checks, run before any data is read or any array is computed.

The blocks every method shares: ``seed``, ``data``, ``model``, ``optimizer``
and the generic ``train`` fields (``num_epochs``, ``steps_per_chunk``,
``patience``). A method package adds the checks of its own fields (e.g. the
DP checks of :mod:`dynscale.idp.validation`). Every error names the config
field and the values it may take.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from dynscale.kernels import idp
from dynscale.data import DATASETS
from dynscale.nn.models import MODELS
from dynscale.train import protocols
from dynscale.train.optim import OPTIMIZERS, SCHEDULES

DTYPES = ("float32", "bfloat16")
AUGMENT = ("auto", "on", "off")
"""``data.augment``: the dataset's standard recipe (crop and flip for CIFAR,
nothing for MNIST), or crop and flip on or off (strings, so that the command
line's ``--config.data.augment=off`` means what it says)."""
# What dynscale.nn.sliced.export writes, and where a run puts it.
EXPORT_FILES = ("architecture.json", "params.npz")
EXPORT_DIR = "export"


def one_of(value, allowed: Iterable, field: str) -> None:
  """Raises unless ``value`` is one of ``allowed``."""
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


def positive(value, field: str, *, integer: bool = False) -> None:
  """Raises unless ``value`` is a number (an int if ``integer``) above zero."""
  kind = int if integer else (int, float)
  if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
      or value <= 0):
    allowed = "a positive integer" if integer else "a positive number"
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def non_negative(value, field: str) -> None:
  """Raises unless ``value`` is a finite number (not a bool) >= 0."""
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or value < 0):
    raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")


def fraction(value, field: str, *, of: str = "") -> None:
  """Raises unless ``value`` is a number (not a bool) in [0, 1]; ``of`` says what
  it is a fraction of, in the message."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    what = f"a fraction of {of} in [0, 1]" if of else "a number in [0, 1]"
    raise ValueError(f"{field} must be {what}, got {value!r}")


def non_negative_int(value, field: str) -> None:
  """Raises unless ``value`` is an int >= 0."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{field} must be an integer >= 0, got {value!r}")


def check_data(config) -> None:
  one_of(config.dataset, DATASETS, "data.dataset")
  positive(config.batch_size, "data.batch_size", integer=True)
  positive(config.eval_batch_size, "data.eval_batch_size", integer=True)
  non_negative_int(config.val_size, "data.val_size")
  non_negative_int(config.train_examples, "data.train_examples")
  one_of(config.augment, AUGMENT, "data.augment")


def check_model(config) -> None:
  one_of(config.name, MODELS, "model.name")
  # One name for the whole network; per-layer coefficient vectors go in the
  # architecture dict (a layer's "profile"), checked by dynscale.nn.spec.
  one_of(config.profile, idp.PROFILES, "model.profile")
  positive(config.width_multiplier, "model.width_multiplier")
  one_of(config.dtype, DTYPES, "model.dtype")
  if config.init_from:
    exported_network(config.init_from)


def exported_network(path: str) -> str:
  """The directory of the exported network ``model.init_from`` names.

  ``path`` holds ``architecture.json`` and ``params.npz`` itself, or is a run
  directory whose ``export/`` does. Returns the absolute directory.
  """
  for candidate in (path, os.path.join(path, EXPORT_DIR)):
    if all(os.path.isfile(os.path.join(candidate, name)) for name in EXPORT_FILES):
      return os.path.abspath(candidate)
  raise ValueError(f"model.init_from must name an exported network (a directory with "
                   f"{' and '.join(EXPORT_FILES)}) or a run directory with {EXPORT_DIR}/ "
                   f"holding them, got {path!r}")


def check_optimizer(config) -> None:
  one_of(config.name, OPTIMIZERS, "optimizer.name")
  one_of(config.schedule, SCHEDULES, "optimizer.schedule")
  positive(config.learning_rate, "optimizer.learning_rate")
  non_negative_int(config.get("warmup_steps", 0), "optimizer.warmup_steps")
  non_negative(config.get("momentum", 0.0), "optimizer.momentum")
  non_negative(config.get("weight_decay", 0.0), "optimizer.weight_decay")
  if not 0 < config.get("decay", 0.9) < 1:  # RMSProp's rho
    raise ValueError(f"optimizer.decay must be in (0, 1), got {config.decay}")
  if config.schedule == "step":
    positive(config.step_every, "optimizer.step_every", integer=True)
    if not 0 < config.step_factor <= 1:
      raise ValueError(f"optimizer.step_factor must be in (0, 1], got {config.step_factor}")


def check_train(config) -> None:
  positive(config.num_epochs, "train.num_epochs", integer=True)
  positive(config.steps_per_chunk, "train.steps_per_chunk", integer=True)
  non_negative_int(config.patience, "train.patience")


def check_core(config) -> None:
  """Checks the blocks every method shares: protocol, seed, data, model, optimizer, train."""
  protocols.check_applied(config)
  non_negative_int(config.seed, "seed")
  check_data(config.data)
  check_model(config.model)
  check_optimizer(config.optimizer)
  check_train(config.train)
  if config.train.patience:
    needs_validation(config, "train.patience > 0 stops early on validation accuracy (or set "
                     "train.patience 0)")


def needs_validation(config, why: str) -> None:
  """Raises unless ``config`` holds out a validation split (``data.val_size`` >= 1),
  saying ``why`` the run needs one."""
  if config.data.val_size == 0:
    raise ValueError(f"data.val_size must be >= 1: {why}; got data.val_size 0")
