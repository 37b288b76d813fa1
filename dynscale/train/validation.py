"""Config checks that run before any data is read or any array is computed.

Every error names the config field and the values it may take.
"""

from __future__ import annotations

from collections.abc import Iterable

from dynscale import idp
from dynscale.data import DATASETS
from dynscale.nn.models import MODELS
from dynscale.train.optim import OPTIMIZERS, SCHEDULES

DTYPES = ("float32", "bfloat16")
BN_MODES = ("shared", "recalibrated")


def one_of(value, allowed: Iterable, field: str) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


def positive(value, field: str, *, integer: bool = False) -> None:
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
    allowed = "a positive integer" if integer else "a positive number"
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def non_negative_int(value, field: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{field} must be an integer >= 0, got {value!r}")


def dp_value(value, field: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f"{field} must be in (0, 1], got {value!r}")


def dp_list(values, field: str) -> None:
  if not values:
    raise ValueError(f"{field} must be a non-empty list of DPs in (0, 1]")
  for i, value in enumerate(values):
    dp_value(value, f"{field}[{i}]")


def check_data(config) -> None:
  one_of(config.dataset, DATASETS, "data.dataset")
  positive(config.batch_size, "data.batch_size", integer=True)
  positive(config.eval_batch_size, "data.eval_batch_size", integer=True)
  non_negative_int(config.val_size, "data.val_size")
  one_of(config.augment, ("auto", True, False), "data.augment")


def check_model(config) -> None:
  one_of(config.name, MODELS, "model.name")
  # One name for the whole network; per-layer coefficient vectors go in the
  # architecture dict (a layer's "profile"), checked by dynscale.nn.spec.
  one_of(config.profile, idp.PROFILES, "model.profile")
  positive(config.width_multiplier, "model.width_multiplier")
  one_of(config.dtype, DTYPES, "model.dtype")


def check_optimizer(config) -> None:
  one_of(config.name, OPTIMIZERS, "optimizer.name")
  one_of(config.schedule, SCHEDULES, "optimizer.schedule")
  positive(config.learning_rate, "optimizer.learning_rate")
  if config.get("momentum", 0.0) < 0:
    raise ValueError(f"optimizer.momentum must be >= 0, got {config.momentum}")
  if config.get("weight_decay", 0.0) < 0:
    raise ValueError(f"optimizer.weight_decay must be >= 0, got {config.weight_decay}")


def check_train(config) -> None:
  positive(config.num_epochs, "train.num_epochs", integer=True)
  positive(config.steps_per_chunk, "train.steps_per_chunk", integer=True)
  non_negative_int(config.patience, "train.patience")
  dp_value(config.dp, "train.dp")


def check_eval(config) -> None:
  dp_list(config.dps, "eval.dps")
  one_of(config.bn_mode, BN_MODES, "eval.bn_mode")
  positive(config.recalibration_batches, "eval.recalibration_batches", integer=True)


def check_common(config) -> None:
  """Checks the blocks every launcher shares: data, model, optimizer, train, eval."""
  non_negative_int(config.seed, "seed")
  check_data(config.data)
  check_model(config.model)
  check_optimizer(config.optimizer)
  check_train(config.train)
  check_eval(config.eval)
