"""Experiment protocols: the papers' settings, or a size that finishes on two CPU cores.

Every config has a ``protocol`` field, and every ``results.json`` records it
(:func:`record`).

* ``'paper'``: the config file's own settings, as close to the paper as the
  paper says (meant for a GPU on CIFAR).
* ``'cpu'``: the same method, network family, data and comparisons at a size
  where an IDP or MP-IDP run trains in 15-30 minutes on 2 cores and a TESLA
  run of three or four tasks in 55-100 (:data:`CPU`):
  the full CIFAR training split with 5,000 of its images held out for
  validation (drawn with the run's seed), always the full test split; every
  hidden width x 0.25; at most 10 epochs per training stage; one optimizer
  recipe for every method, from scratch (the papers start VGG-16 from
  ImageNet weights, which cannot be had here): SGD, momentum 0.9, batch 128,
  learning rate 0.05 with cosine decay over the run, weight decay 5e-4,
  random crop and flip; R-TESLA's total budget 20 epochs, its stages
  capped at 10 like every other stage. An experiment may add settings of its
  own (:func:`apply`'s ``sizes``): the CIFAR DP curves read batch norm
  recalibrated at each DP, SANP trains on 10,000 images.

:func:`apply` sets a protocol's settings on a config (before command-line
overrides); :func:`deviations` lists the fields a run changed afterwards, so
that a shortened smoke run never passes for the protocol itself.
"""

from __future__ import annotations

import copy
import ml_collections

NAMES = ("paper", "cpu")

CPU = {
    "data.train_examples": 0,
    "data.val_size": 5000,
    "data.batch_size": 128,
    "data.augment": "auto",
    "model.width_multiplier": 0.25,
    "train.num_epochs": 10,
    "optimizer.name": "sgd",
    "optimizer.learning_rate": 0.05,
    "optimizer.momentum": 0.9,
    "optimizer.nesterov": False,
    "optimizer.schedule": "cosine",
    "optimizer.weight_decay": 5e-4,
    "optimizer.warmup_steps": 0,
    "schedule.epoch_budget": 20,  # R-TESLA's total epochs (TESLA configs only)
    "schedule.stage_epochs": 10,  # ... and the most of one R-TESLA stage
}
"""The ``cpu`` protocol's settings: dotted config path -> value."""


def name_of(config: ml_collections.ConfigDict) -> str:
  """The protocol ``config`` runs under: its ``protocol`` field, ``'paper'`` without one."""
  return config.get("protocol", "paper")


def check(name) -> None:
  """Raises unless ``name`` is a protocol, naming the allowed values."""
  if name not in NAMES:
    raise ValueError(f"protocol must be one of {NAMES}, got {name!r}")


def check_applied(config: ml_collections.ConfigDict) -> None:
  """Raises unless ``config.protocol`` names a protocol and the one the config
  was built under (:func:`apply`; only ``cpu`` sets ``protocol_sizes``): the
  field changed on the command line would change the label, not the settings."""
  name = name_of(config)
  check(name)
  if (name == "cpu") != ("protocol_sizes" in config):
    raise ValueError(
        f"protocol: this config was built under the {'paper' if name == 'cpu' else 'cpu'!r} "
        f"protocol, not {name!r}; choose the protocol with the config argument "
        "(--config=FILE:<choice>,<protocol>), not --config.protocol")


def settings(name: str, config: ml_collections.ConfigDict) -> dict[str, object]:
  """The fields protocol ``name`` fixes in ``config``, as ``{dotted path: value}``
  (none for ``'paper'``: the config file's own values are the paper's), with
  the experiment's own sizes (``config.protocol_sizes``, see :func:`apply`)."""
  check(name)
  if name == "paper":
    return {}
  sizes = config.get("protocol_sizes") or {}
  fixed = {**CPU, **{f"{block}.{leaf}": value for block, leaves in sizes.items()
                     for leaf, value in leaves.items()}}
  return {path: value for path, value in fixed.items() if path.split(".")[0] in config}


def _parent(config: ml_collections.ConfigDict, path: str) -> tuple[ml_collections.ConfigDict, str]:
  block, leaf = path.split(".")
  return config[block], leaf


def editable_copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A deep copy of ``config`` that can be edited (unlocked: the command line's
  configs are locked), each field keeping its type (a field typed to take a
  name or a tuple, such as ``schedule.distribution``, still takes either)."""
  config = copy.deepcopy(config)
  config.unlock()
  return config


def apply(config: ml_collections.ConfigDict, name: str,
          sizes: dict[str, dict] | None = None) -> ml_collections.ConfigDict:
  """A copy of ``config`` under protocol ``name``: its settings applied and
  ``config.protocol`` set.

  ``sizes`` (``cpu`` only): settings an experiment fixes differently as part of
  its protocol, nested as ``{"data": {"train_examples": 10000}}`` (e.g. SANP's
  10,000-image training set); kept in ``config.protocol_sizes`` (set, maybe
  empty, under ``cpu`` only: :func:`check_applied`) and recorded.
  """
  config = editable_copy(config)
  if sizes and name != "cpu":
    raise ValueError(f"protocol sizes apply to the cpu protocol only, got {name!r}")
  if name == "cpu":
    config.protocol_sizes = sizes or {}
  elif "protocol_sizes" in config:
    del config["protocol_sizes"]
  for path, value in settings(name, config).items():
    node, leaf = _parent(config, path)
    node[leaf] = value
  config.protocol = name
  return config


def deviations(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The fields of ``config`` that differ from its protocol's settings:
  ``{path: {"protocol": value, "run": value}}`` (empty when the run is the protocol)."""
  found = {}
  for path, value in settings(name_of(config), config).items():
    node, leaf = _parent(config, path)
    if node[leaf] != value:
      found[path] = {"protocol": value, "run": node[leaf]}
  return found


def record(config: ml_collections.ConfigDict) -> dict:
  """What ``results.json`` says of the protocol: its name, the settings it fixes
  and the fields this run changed."""
  name = name_of(config)
  return {"name": name, "settings": settings(name, config),
          "deviations": deviations(config)}
