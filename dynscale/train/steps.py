"""Jitted train and eval steps over a data-parallel mesh.

A train *chunk* runs ``S`` optimizer steps inside one ``lax.scan`` (one
dispatch per chunk, not per step). Data stays on the device: each step
gathers its batch by index from the resident dataset, augments it in jnp,
and constrains it to the batch axis of the mesh, so XLA inserts the
gradient all-reduce. The objective is a ``LossFn`` of (model, images,
labels, task), where ``task`` is an array pytree (a DP, or TESLA's
coefficient vector): changing it changes data, not code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dynscale.nn import sliced
from dynscale.train.state import TrainState, merge_model, model_state_of

# (model, images, labels, task) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, jax.Array, jax.Array, Any], tuple[jax.Array, dict]]
# (model, images, task) -> logits, or (logits, {name: per-example values (B,)}),
# in evaluation mode (see forward_outputs)
ForwardFn = Callable[[nnx.Module, jax.Array, Any], Any]
# (data, idx, key or None) -> (images float, labels int)
BatchFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, jax.Array]]

BATCH_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all visible devices (every host's, under jax.distributed)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(list(devices), (BATCH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """``tree``'s arrays placed on ``mesh``, replicated: where a train chunk
  (:func:`make_train_chunk`) hands its state back, so that a state placed so
  first compiles the chunk once, not again at its second call."""
  return jax.device_put(tree, replicated(mesh))


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXIS))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def classification_loss(model: nnx.Module, images, labels, dp) -> tuple[jax.Array, dict]:
  """Cross-entropy of the masked model at DP ``dp`` (train mode)."""
  logits = model(images, dp, train=True)
  loss = jnp.mean(cross_entropy(logits, labels))
  return loss, {"loss": loss, "accuracy": accuracy(logits, labels)}


def distillation(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """``T^2 KL(softmax(t / T) || softmax(s / T))``, the batch mean: Hinton et al.'s
  soft-target term, scaled by ``T^2`` so its gradient keeps the size of the
  cross-entropy's; no gradient reaches the teacher's logits ``t``."""
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
                           / temperature)
  student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
  return temperature**2 * jnp.mean(optax.kl_divergence(student, teacher))


def distillation_loss(teacher_arch: dict, weight: float, temperature: float) -> LossFn:
  """``(1 - weight) CE + weight distillation`` of the model at full width against a
  fixed teacher network, whose variables are the task: it runs in evaluation
  mode (running statistics) on the same augmented batch."""
  def loss_fn(model, images, labels, teacher_variables):
    logits = model(images, 1.0, train=True)
    teacher = sliced.apply_sliced(teacher_arch, teacher_variables, images, 1.0)
    ce = jnp.mean(cross_entropy(logits, labels))
    soft = distillation(logits, teacher, temperature)
    loss = (1 - weight) * ce + weight * soft
    return loss, {"loss": loss, "cross_entropy": ce, "distillation": soft,
                  "accuracy": accuracy(logits, labels)}
  return loss_fn


def full_width_forward(model: nnx.Module, images, task) -> jax.Array:
  """The model at full width in evaluation mode, whatever the task (a teacher's
  variables under :func:`distillation_loss`)."""
  del task
  return model(images, 1.0, train=False)


def eval_forward(model: nnx.Module, images, dp) -> jax.Array:
  """The masked model at DP ``dp`` in evaluation mode (running statistics)."""
  return model(images, dp, train=False)


def nested_control_flow_is_slow() -> bool:
  """True on XLA:CPU, where convolution gradients inside ``lax.scan`` bodies or
  ``lax.cond`` branches take a layout path 10-30x slower than at top level
  (jax-ml/jax#12868; measured here on VGG-16, and again with the
  per-shape convolution kernels: ``benchmarks.nested_control_flow``).
  Callers then keep such gradients at the top level of the jitted function.
  """
  return jax.default_backend() == "cpu"


def make_train_chunk(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                     loss_fn: LossFn, batch_fn: BatchFn, mesh: Mesh, trainable=nnx.Param,
                     *, scan: bool | None = None):
  """Returns ``train_chunk(state, data, idx, key, task) -> (state, mean metrics)``.

  ``idx`` is an int array ``(S, B)`` of example indices: the chunk runs ``S``
  steps of batch ``B``. ``key`` seeds augmentation (one split per step). The
  state buffers are donated. ``trainable`` is the filter the state was split
  with (see ``dynscale.train.state.split_model``).

  With ``scan`` (the default on accelerators) the ``S`` steps run in one
  ``lax.scan``: one dispatch per chunk. Without it (the default on CPU, see
  :func:`nested_control_flow_is_slow`) a jitted single step runs ``S``
  times from Python. Both give the same steps.
  """
  scan = not nested_control_flow_is_slow() if scan is None else scan
  sharding = batch_sharded(mesh)

  def one_step(task, data, state: TrainState, inputs):
    idx, key = inputs
    images, labels = batch_fn(data, idx, key)
    images = jax.lax.with_sharding_constraint(images, sharding)
    labels = jax.lax.with_sharding_constraint(labels, sharding)

    def objective(params):
      model = merge_model(graphdef, params, state.model_state)
      loss, metrics = loss_fn(model, images, labels, task)
      return loss, (metrics, model_state_of(model, trainable))

    (_, (metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                           opt_state=opt_state)
    return new_state, metrics

  @functools.partial(jax.jit, donate_argnums=(0,))
  def scanned_chunk(state: TrainState, data, idx, key, task):
    keys = jax.random.split(key, idx.shape[0])
    state, metrics = jax.lax.scan(functools.partial(one_step, task, data), state, (idx, keys))
    return state, jax.tree.map(jnp.mean, metrics)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def single_step(state: TrainState, data, idx, key, task):
    return one_step(task, data, state, (idx, key))

  def looped_chunk(state: TrainState, data, idx, key, task):
    keys = jax.random.split(key, idx.shape[0])
    metrics = []
    for step_idx, step_key in zip(idx, keys):
      state, step_metrics = single_step(state, data, step_idx, step_key, task)
      metrics.append(step_metrics)
    return state, jax.tree.map(lambda *m: jnp.mean(jnp.stack(m)), *metrics)

  return scanned_chunk if scan else looped_chunk


RESERVED_METRICS = ("accuracy", "loss", "correct", "count")


def forward_outputs(output, batch: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``(logits, extra metrics)`` of a ``ForwardFn``'s output.

  A forward returns logits, or ``(logits, {name: per-example values (B,)})``.
  """
  logits, extras = output if isinstance(output, tuple) else (output, {})
  for name, values in extras.items():
    if name in RESERVED_METRICS:
      raise ValueError(f"the forward's extra metric may not be named {name!r} "
                       f"(reserved: {RESERVED_METRICS})")
    if jnp.shape(values) != (batch,):
      raise ValueError(f"the forward's extra metric {name!r} must have one value per "
                       f"example, shape ({batch},), got {jnp.shape(values)}")
  return logits, dict(extras)


def make_eval_totals(graphdef: nnx.GraphDef, forward: ForwardFn, batch_fn: BatchFn,
                     mesh: Mesh):
  """Returns ``eval_totals(params, model_state, data, idx, mask, task) -> dict of sums``.

  ``idx`` ``(S, B)`` with a 0/1 ``mask`` of the same shape covers every example
  exactly once (padding masked out). The sums over the unmasked examples:
  ``correct`` (exact count), ``loss`` (cross-entropy), ``count``, and each
  extra per-example metric the forward returns (:func:`forward_outputs`).
  """
  sharding = batch_sharded(mesh)

  @jax.jit
  def eval_totals(params, model_state, data, idx, mask, task) -> dict[str, jax.Array]:
    model = merge_model(graphdef, params, model_state)

    def body(carry, inputs):
      batch_idx, batch_mask = inputs
      images, labels = batch_fn(data, batch_idx, None)
      images = jax.lax.with_sharding_constraint(images, sharding)
      logits, extras = forward_outputs(forward(model, images, task), labels.shape[0])
      per_example = {"correct": jnp.argmax(logits, -1) == labels,
                     "loss": cross_entropy(logits, labels),
                     "count": jnp.ones_like(batch_mask), **extras}
      sums = {name: jnp.sum(jnp.asarray(values, jnp.float32) * batch_mask)
              for name, values in per_example.items()}
      return carry, sums

    _, sums = jax.lax.scan(body, None, (idx, mask))
    return {name: jnp.sum(batch_sums) for name, batch_sums in sums.items()}

  return eval_totals
