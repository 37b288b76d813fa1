"""Batch norm at reduced width: a named choice (DESIGN invariant 3).

A network trained at several DPs shares one set of batch-norm running
statistics, but the activations at DP ``p`` differ from those at 100%: a
channel of a middle layer sums only the first ``p`` of its inputs. Two modes:

* ``"shared"``: evaluate with the trained running statistics, the
  behaviour of papers 001 and 000.
* ``"recalibrated"``: "precise batch norm" per DP: run the network in train
  mode at that DP over N batches and set every batch-norm mean / variance to
  the exact average over those batches:

      mean = sum_b n_b E_b[y] / sum_b n_b
      var  = sum_b n_b E_b[y^2] / sum_b n_b - mean^2

  (``n_b`` the batch sizes; with equal batches the plain average of per-batch
  means and of per-batch E[y^2]). This is the population variance of all the
  samples seen, whereas the mean of per-batch variances would be biased low
  by the spread of the batch means. As in training, each layer's input is
  normalised with its batch's own statistics. Only the channels computed at
  that DP change; the model's own statistics are never touched.

Evaluation with given statistics: :func:`dynscale.nn.sliced.apply_sliced`
takes ``bn_stats=`` and :class:`~dynscale.nn.sliced.SlicedModel` takes
``bn_stats_by_dp``; a training state takes them with
:func:`dynscale.nn.sliced.merge_variables`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dynscale.nn import forward, sliced, spec
from dynscale.nn.kinds import Var
from dynscale.nn.layers import IDPNet, masked_keep

BN_MODES = ("shared", "recalibrated")


def _arch_and_variables(model: Any) -> tuple[dict, dict]:
  """(arch, variables) of an IDPNet, a SlicedModel or an ``(arch, variables)`` pair."""
  if isinstance(model, tuple) and len(model) == 2:
    return spec.validate_architecture(model[0]), model[1]
  if isinstance(model, sliced.SlicedModel):
    return model.arch, model.variables
  if isinstance(model, IDPNet):
    return model.arch, model.pure_variables()
  raise ValueError("model must be an IDPNet, a SlicedModel or an (arch, variables) pair, "
                   f"got {type(model).__name__}")


def _inputs(batch: Any) -> jax.Array:
  """The input array of a batch given as ``x`` or as ``(x, labels, ...)``."""
  return jnp.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _finish(stats: Mapping, sums: Mapping, count: int) -> dict:
  """Statistics with each recalibrated channel prefix set from summed moments."""
  out = dict(stats)
  for key, value in sums.items():
    if "mean_sq" in value:
      mean = value["mean"] / count
      var = jnp.maximum(0.0, value["mean_sq"] / count - mean * mean)
      out[key] = {"mean": jnp.asarray(stats[key]["mean"]).at[:mean.shape[0]].set(mean),
                  "var": jnp.asarray(stats[key]["var"]).at[:var.shape[0]].set(var)}
    else:
      out[key] = _finish(stats[key], value, count)
  return out


def recalibrate(model: Any, widths: Any, batches: Iterable[Any], *,
                profile_index: int | None = None, dtype=jnp.float32) -> dict:
  """Precise batch-norm statistics of ``model`` at ``widths`` over ``batches``.

  Args:
    model: an IDPNet, a SlicedModel or an ``(arch, variables)`` pair.
    widths: a DP (static float in (0, 1]) or a width vector.
    batches: input batches ``x`` (or ``(x, labels)`` tuples); labels unused.
    profile_index: MP-IDP only: the profile (else chosen from ``dp``).
    dtype: compute dtype of the forward.

  Returns:
    Full statistics in the ``bn_stats_of`` layout: the channels computed at
    ``widths`` recalibrated (module docstring), all others as in the model. The
    model is not modified.
  """
  arch, variables = _arch_and_variables(model)
  dp = spec.dp_of(widths)
  if profile_index is None and dp is not None:
    profile_index = spec.select_profile(arch, dp, None)
  widths = spec.resolve_widths(arch, widths)
  compact = sliced.slice_variables(arch, variables, widths)
  moments = _sliced_moments(json.dumps(arch, sort_keys=True), widths, profile_index,
                            jnp.dtype(dtype).name)
  sums, count = None, 0
  for batch in batches:
    x = _inputs(batch)
    weighted = jax.tree.map(functools.partial(jnp.multiply, x.shape[0]), moments(compact, x))
    sums = weighted if sums is None else jax.tree.map(jnp.add, sums, weighted)
    count += x.shape[0]
  if sums is None:
    raise ValueError("batches is empty: recalibration needs at least one batch")
  return _finish(sliced.bn_stats_of(variables), sums, count)


def _bn_groups(arch: dict) -> dict[tuple, int]:
  """``{variables path of a batch norm: the group it normalises}``."""
  out = {}

  def walk(specs: Mapping, path: tuple, slots: Mapping[str, int]) -> None:
    for name, var in specs.items():
      if not isinstance(var, Var):
        walk(var, path + (name,), slots)
      elif var.role == "bn":
        out[path + (name,)] = slots[dict(var.axes)[0]]

  for node in spec.graph(arch).nodes:
    if node.kind in spec.PARAMETRIC_KINDS:
      walk(sliced.layer_variables(arch, node), ("layers", node.index), node.slots)
  return out


@functools.lru_cache(maxsize=32)
def _sliced_moments(arch_json: str, widths: tuple[int, ...], profile_index: int | None,
                    dtype_name: str):
  """A jitted ``(compact variables, x) -> moments`` of the sliced network at
  ``widths``, compiled once per network, widths and dtype (validation
  recalibrates at every task's DP after every epoch)."""
  return jax.jit(functools.partial(sliced.batch_moments, json.loads(arch_json), widths=widths,
                                   profile_index=profile_index, dtype=jnp.dtype(dtype_name)))


@functools.lru_cache(maxsize=8)
def _masked_moments(arch_json: str, dtype_name: str):
  """A jitted ``(variables, x, widths) -> [(E[y], E[y^2]) per batch norm]``
  of the masked network, the widths traced."""
  arch = json.loads(arch_json)
  paths = list(_bn_groups(arch))

  def moments(variables, x, widths):
    trace = forward.run(arch, variables, x, widths=widths, train=True, profile=None,
                        dtype=jnp.dtype(dtype_name))
    return [trace.moments[path][1:] for path in paths]
  return jax.jit(moments), paths


def recalibrate_masked(model: IDPNet, widths: jax.Array, batches: Iterable[Any]) -> dict:
  """:func:`recalibrate` of the masked ``model`` at a width vector ``widths``
  (ints over :func:`~dynscale.nn.spec.prunable_groups`): the same statistics,
  but the widths are traced, so one compile serves every width vector (e.g.
  every candidate of a channel search). The channels beyond the widths keep
  their statistics. Single-profile networks only.
  """
  arch = model.arch
  if arch["profiles"] is not None:
    raise ValueError("recalibrate_masked needs a single-profile network (profiles: null)")
  widths = jnp.asarray(spec.width_array(arch, widths), jnp.int32)  # checked before compute
  fn, paths = _masked_moments(json.dumps(arch, sort_keys=True), jnp.dtype(model.dtype).name)
  variables = model.pure_variables()
  sums, count = None, 0
  for batch in batches:
    x = _inputs(batch)
    weighted = jax.tree.map(functools.partial(jnp.multiply, x.shape[0]), fn(variables, x, widths))
    sums = weighted if sums is None else jax.tree.map(jnp.add, sums, weighted)
    count += x.shape[0]
  if sums is None:
    raise ValueError("batches is empty: recalibration needs at least one batch")
  groups = _bn_groups(arch)
  moments = {path: (groups[path], mean / count, mean_sq / count)
             for path, (mean, mean_sq) in zip(paths, sums)}
  return sliced.running_stats(moments, sliced.bn_stats_of(variables), 0.0,
                              masked_keep(arch, widths))
