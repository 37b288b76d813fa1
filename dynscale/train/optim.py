"""Optimizers and learning-rate schedules from a config block, via optax."""

from __future__ import annotations

import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """``config.schedule`` over ``total_steps`` steps (warm-up in steps)."""
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  if config.schedule == "step":  # times step_factor every step_every steps
    return optax.exponential_decay(lr, config.step_every, config.step_factor, staircase=True)
  warmup = min(int(config.get("warmup_steps", 0)), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, 1))


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """The optax transformation named by ``config.name`` (see ``OPTIMIZERS``)."""
  schedule = learning_rate_schedule(config, total_steps)
  weight_decay = config.get("weight_decay", 0.0)
  if config.name == "adam":
    tx = optax.adam(schedule)
  elif config.name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay)
  elif config.name == "rmsprop":
    # TensorFlow 1's RMSPropOptimizer (CompactNet, paper 004, Table 4): ``decay``
    # is RMSProp's rho, eps (TF's default 1e-10) goes inside the square root,
    # and the mean square starts at ones as in TF1 (optax's default is zeros).
    tx = optax.rmsprop(schedule, decay=config.get("decay", 0.9), eps=config.get("eps", 1e-10),
                       initial_scale=1.0, momentum=config.get("momentum", 0.0) or None)
  else:
    tx = optax.sgd(schedule, momentum=config.get("momentum", 0.0) or None,
                   nesterov=config.get("nesterov", False))
  if weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  return tx
