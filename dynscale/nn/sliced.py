"""Whole-network slicing at a width vector, and export / load.

McDanel et al. (paper 001) Fig. 1 and §I: at DP ``p`` an IDP layer uses the
first ``p`` of its input channels, "Furthermore, only 50% of these filters are
used since output channels for the other filters will not be utilized in the
next layer", so a middle layer costs about ``p**2``. DESIGN invariants 1-2
and 9: this is the SLICED path. A static width vector (or a DP, which
:func:`dynscale.nn.spec.widths_at_dp` turns into one) cuts every variable to
the kept channels of its groups, and :func:`dynscale.nn.forward.run` computes
only those. The masked network (:class:`dynscale.nn.layers.IDPNet`) runs the
same forward with masks; the tests prove the two equal in logits, gradients
and batch-norm state.

Variables are the pure nested dict of the model, ``model.pure_variables()``:
``{'layers': {i: {'kernel', 'bias' | 'bn': {'scale', 'bias', 'mean', 'var'},
'gamma', ...}}}`` (blocks nest their parts: ``{'conv1': {'kernel'}, 'bn1':
{...}, ...}``), with ``{s: ...}`` one level deeper for the per-profile first
and last layers of MP-IDP. Batch-norm statistics (``bn_stats``) use the same
layout restricted to the ``mean`` / ``var`` leaves.

Everything here needs only JAX, NumPy, the kernels and
:mod:`dynscale.nn.spec` / ``kinds`` / ``forward``: an exported network
reloads without Flax or the model classes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynscale import idp
from dynscale.io import write_bytes_atomic, write_npz_atomic
from dynscale.nn import forward, spec
from dynscale.nn.kinds import KINDS, Var

Array = jax.Array
TreePath = tuple[Any, ...]

ARCHITECTURE_FILE = "architecture.json"
PARAMS_FILE = "params.npz"
_STATS_PREFIX = "bn_stats@"
BN_LEAVES = ("bias", "mean", "scale", "var")


# --------------------------------------------------------------------------
# Variable trees
# --------------------------------------------------------------------------


def layer_variables(arch: dict, node: spec.Node) -> dict:
  """The :class:`~dynscale.nn.kinds.Var` tree of one parametric layer."""
  return KINDS[node.kind].variables(arch["layers"][node.index], node.inputs, node.outputs)


def _map_vars(tree: Mapping, fn: Callable[[Var], Any]) -> dict:
  return {name: fn(v) if isinstance(v, Var) else _map_vars(v, fn) for name, v in tree.items()}


def _per_layer(arch: dict, fn: Callable[[spec.Node], Any]) -> dict:
  """``{'layers': {i: fn(node)}}`` over the parametric layers (per profile under MP-IDP)."""
  separate = spec.separate_layers(arch)
  layers = {}
  for node in spec.graph(arch).nodes:
    if node.kind in spec.PARAMETRIC_KINDS:
      layers[node.index] = ({s: fn(node) for s in range(len(arch["profiles"]))}
                            if node.index in separate else fn(node))
  return {"layers": layers}


def variable_shapes(arch: dict) -> dict:
  """The pure-dict layout of a network's variables with each leaf's full shape.

  The same layout as ``IDPNet(arch).pure_variables()``.
  """
  arch = spec.validate_architecture(arch)

  def shapes(var: Var):
    return {leaf: var.shape for leaf in BN_LEAVES} if var.role == "bn" else var.shape
  return _per_layer(arch, lambda node: _map_vars(layer_variables(arch, node), shapes))


def _take(a: Array, var: Var, widths: Mapping[str, int]) -> Array:
  """The kept prefix of ``a`` along every axis ``var`` ties to a slot."""
  axes = dict(var.axes)
  if var.positions > 1:  # a dense kernel on a flattened map: cut each position's channels
    rows = a.reshape(var.positions, -1, a.shape[-1])[:, :widths[axes[0]], :widths[axes[1]]]
    return rows.reshape(-1, rows.shape[-1])
  index = [slice(None)] * a.ndim
  for axis, slot in axes.items():
    index[axis] = slice(0, widths[slot])
  return a[tuple(index)]


def _slice_tree(specs: Mapping, v: Mapping, widths: Mapping[str, int]) -> dict:
  out = {}
  for name, var in specs.items():
    if not isinstance(var, Var):
      out[name] = _slice_tree(var, v[name], widths)
    elif var.role == "bn":
      out[name] = {leaf: _take(a, var, widths) for leaf, a in v[name].items()}
    else:
      out[name] = _take(v[name], var, widths)
  return out


def gather_layer_variables(arch: dict, index: int, v: Mapping,
                           channels: Mapping[str, Array]) -> dict:
  """The variables ``v`` of layer ``index`` restricted to the given channels of each
  slot (:func:`gather_variables`)."""
  node = spec.graph(arch).nodes[index]
  return gather_variables(layer_variables(arch, node), v, channels, f"layers[{index}]")


def gather_variables(specs: Mapping, v: Mapping, channels: Mapping[str, Array],
                     where: str = "a layer") -> dict:
  """The variables ``v`` of one layer, whose :class:`~dynscale.nn.kinds.Var` tree
  is ``specs``, restricted to the given channels of each slot (``{"in": idx,
  "out": idx}``, index arrays, may be traced): a kernel ``(kh, kw, C, M) ->
  (kh, kw, len(in), len(out))``, profiles, biases and batch norm likewise.
  The channels need not be a prefix (cf. :func:`slice_variables`) but must be
  in range: traced indices cannot be checked, and out-of-range ones are
  clamped. The last axis is gathered first, so the next gathers move whole
  rows of the smaller array (about a third faster on XLA:CPU)."""

  def take(a: Array, var: Var) -> Array:
    if var.positions > 1:
      raise ValueError(f"{where}: a dense kernel on a flattened map cannot be gathered "
                       "by channel")
    for axis, slot in sorted(var.axes, reverse=True):
      if slot in channels:
        a = jnp.take(a, channels[slot], axis=axis, mode="clip")
    return a

  def walk(specs: Mapping, values: Mapping) -> dict:
    out = {}
    for name, var in specs.items():
      if not isinstance(var, Var):
        out[name] = walk(var, values[name])
      elif var.role == "bn":
        out[name] = {leaf: take(a, var) for leaf, a in values[name].items()}
      else:
        out[name] = take(values[name], var)
    return out
  return walk(specs, v)


def check_variables(arch: dict, variables: Mapping) -> None:
  """Raises ValueError unless ``variables`` has exactly the layout and shapes of ``arch``."""
  expected = flatten_tree(variable_shapes(arch))
  got = flatten_tree(variables)
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(f"variables do not match the architecture: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  for key, shape in expected.items():
    if tuple(np.shape(got[key])) != shape:
      raise ValueError(f"variable {key} has shape {tuple(np.shape(got[key]))}, the "
                       f"architecture needs {shape}")


def slice_variables(arch: dict, variables: Mapping, widths: Any) -> dict:
  """The variables of the network at ``widths``: every array cut to the part that is used.

  ``widths``: a DP or a width vector (:func:`dynscale.nn.spec.resolve_widths`).
  A conv kernel ``(kh, kw, C, M) -> (kh, kw, k, n)``, profiles ``-> (k,)``,
  biases and batch norm ``-> (n,)``, with ``k`` / ``n`` the kept widths of its
  input / output groups. Idempotent: :func:`apply_sliced` accepts full or
  already-sliced variables. MP-IDP per-profile layers are cut for every
  profile.
  """
  arch = spec.validate_architecture(arch)
  plans = spec.plan(arch, widths)
  separate = spec.separate_layers(arch)
  layers = {}
  for node in spec.graph(arch).nodes:
    if node.kind not in spec.PARAMETRIC_KINDS:
      continue
    specs, kept, v = layer_variables(arch, node), plans[node.index].widths, \
        variables["layers"][node.index]
    layers[node.index] = ({s: _slice_tree(specs, vs, kept) for s, vs in v.items()}
                          if node.index in separate else _slice_tree(specs, v, kept))
  return {**variables, "layers": layers}


def _is_bn(value: Any) -> bool:
  return isinstance(value, Mapping) and set(value) == set(BN_LEAVES)


def bn_stats_of(variables: Mapping) -> dict:
  """The batch-norm running statistics (``mean``/``var`` leaves) of a variables dict."""
  out = {}
  for key, value in variables.items():
    if _is_bn(value):
      out[key] = {"mean": value["mean"], "var": value["var"]}
    elif isinstance(value, Mapping):
      sub = bn_stats_of(value)
      if sub:
        out[key] = sub
  return out


def merge_variables(base: Mapping, update: Mapping) -> dict:
  """``base`` with the leaves of ``update`` (same nested layout) replacing its own."""
  out = dict(base)
  for key, value in update.items():
    if isinstance(value, Mapping):
      if key not in base:
        raise ValueError(f"merge_variables: key {key!r} of the update is not in the base")
      out[key] = merge_variables(base[key], value)
    else:
      out[key] = value
  return out


def set_path(tree: Mapping, path: TreePath, value: Any) -> dict:
  """A copy of ``tree`` with ``path`` set to ``value`` (copies along the path only)."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else set_path(tree.get(path[0], {}), path[1:], value)
  return out


def running_stats(moments: Mapping, stats: Mapping, momentum: float,
                  keep: Callable[[int, Array, Array], Array]) -> dict:
  """Batch-norm running statistics after one train step, as ``nnx.BatchNorm`` updates them.

  ``m * old + (1 - m) * batch`` for each batch norm in ``moments`` (``{path:
  (group, E[y], E[y^2])}`` from :func:`dynscale.nn.forward.run`), with the
  biased batch variance ``E[y^2] - E[y]^2``; ``keep(group, old, new)``
  returns the full-size leaf (the masked path keeps the channels beyond the
  width, the sliced path writes the computed prefix). Not differentiated.
  """
  for path, (group, mean, mean_sq) in moments.items():
    old = forward.get_path(stats, path)
    var = jnp.maximum(0.0, mean_sq - mean * mean)
    new = {"mean": mean, "var": var}
    stats = set_path(stats, path, {
        key: jax.lax.stop_gradient(keep(group, old[key], momentum * old[key][:new[key].shape[0]]
                                        + (1 - momentum) * new[key]))
        for key in new})
  return stats


# --------------------------------------------------------------------------
# The sliced forward
# --------------------------------------------------------------------------


def _sliced_input(arch: dict, x: Array, widths: tuple[int, ...]) -> Array:
  """``x``, cut to the kept input channels when an IDP first layer trims them."""
  if not spec.graph(arch).groups[0].prunable:
    return x
  return x[..., :spec.plan(arch, widths)[0].in_width]


def _run_sliced(arch: dict, variables: Mapping, x: Array, widths: Any, *, train: bool,
                profile_index: int | None, dtype, upto: int | None = None
                ) -> tuple[forward.Trace, dict, tuple[int, ...]]:
  spec.check_input(arch, x)
  s = spec.select_profile(arch, spec.dp_of(widths), profile_index)
  kept = spec.resolve_widths(arch, widths)
  compact = slice_variables(arch, variables, kept)
  trace = forward.run(arch, compact, _sliced_input(arch, x, kept), widths=None, train=train,
                      profile=s, dtype=dtype, upto=upto)
  return trace, compact, kept


def _scatter(group: int, full: Array, part: Array) -> Array:
  """``full`` with its leading prefix replaced by ``part``."""
  del group
  full = jnp.asarray(full)  # variables read from an .npz are NumPy arrays
  return full.at[:part.shape[0]].set(part.astype(full.dtype))


def apply_sliced(arch: dict, variables: Mapping, x: Array, widths: Any = 1.0, *,
                 train: bool = False, bn_stats: Mapping | None = None,
                 profile_index: int | None = None,
                 dtype=jnp.float32) -> Array | tuple[Array, dict]:
  """The network at static ``widths``, computing only the kept channels (sliced path).

  Args:
    arch: the architecture dict.
    variables: the model's pure variable dict (full, or already sliced by
      :func:`slice_variables` at these widths).
    x: a batch ``(B, *input_shape)``.
    widths: a DP in (0, 1] or a static width vector (any form of
      :func:`dynscale.nn.spec.resolve_widths`).
    train: False (default) normalises with the running statistics; True uses
      batch statistics and also returns the updated running statistics.
    bn_stats: optional statistics (``bn_stats_of`` layout) used instead of
      the ones in ``variables`` (e.g. recalibrated for this dp).
    profile_index: MP-IDP: force profile s (else chosen from a DP; required
      with a width vector).
    dtype: compute dtype (the input is cast; logits are float32).

  Returns:
    Eval: logits ``(B, num_classes)`` float32. Train: ``(logits,
    new_bn_stats)``: the computed channels' running statistics updated with
    the network's batch-norm momentum exactly as ``nnx.BatchNorm`` does
    (``m * old + (1 - m) * batch``), the other channels and profiles
    unchanged, in the layout and shapes of the incoming statistics.
    Differentiable with respect to ``variables``.
  """
  arch = spec.validate_architecture(arch)
  if bn_stats is not None:
    variables = merge_variables(variables, bn_stats)
  trace, compact, _ = _run_sliced(arch, variables, x, widths, train=train,
                                  profile_index=profile_index, dtype=dtype)
  if not train:
    return trace.output
  stats = running_stats(trace.moments, bn_stats_of(variables), arch["bn_momentum"], _scatter)
  return trace.output, stats


def features_sliced(arch: dict, variables: Mapping, x: Array, widths: Any, upto: int, *,
                    profile_index: int | None = None, dtype=jnp.float32) -> Array:
  """The activations entering layer ``upto`` of the sliced network (eval mode).

  Layers ``0 .. upto - 1`` run exactly as in :func:`apply_sliced`, so only
  the computed channels are there: ``(B, H, W, k)`` for a map, with ``k =
  plan(arch, widths)[upto].in_width``; float32. ``upto =
  len(arch["layers"])`` gives the logits. Used for class activation maps
  (:mod:`dynscale.cam`).
  """
  arch = spec.validate_architecture(arch)
  n = len(arch["layers"])
  if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= n:
    raise ValueError(f"upto must be a layer index in [0, {n}], got {upto!r}")
  trace, _, _ = _run_sliced(arch, variables, x, widths, train=False,
                            profile_index=profile_index, dtype=dtype, upto=upto)
  return trace.output


def batch_moments(arch: dict, variables: Mapping, x: Array, widths: Any, *,
                  profile_index: int | None = None, dtype=jnp.float32) -> dict:
  """Per batch-norm layer ``(E[y], E[y^2])`` over this batch, in train mode, at ``widths``.

  The layout is that of :func:`bn_stats_of` with leaves ``mean`` (E[y]) and
  ``mean_sq`` (E[y^2]) over the computed channels only (sliced shapes).
  Precise batch-norm recalibration averages these over batches.
  """
  arch = spec.validate_architecture(arch)
  trace, _, _ = _run_sliced(arch, variables, x, widths, train=True,
                            profile_index=profile_index, dtype=dtype)
  out: dict = {}
  for path, (_, mean, mean_sq) in trace.moments.items():
    out = set_path(out, path, {"mean": mean, "mean_sq": mean_sq})
  return out


# --------------------------------------------------------------------------
# SlicedModel: one cached executable per width vector
# --------------------------------------------------------------------------


class SlicedModel:
  """A network run by its sliced path, with one jitted executable per width vector.

  ``model(x, widths)`` (a DP or a width vector) slices the variables once (so
  the executable receives only the kept weights), jits :func:`apply_sliced`
  at those static widths and caches both on this instance (no module-level
  caches). ``compiled_widths`` lists the cached width vectors and
  ``trace_count`` counts the traces, so callers can check that a width
  vector compiles once.

  ``bn_stats_by_dp`` maps a DP to batch-norm statistics used when the model
  is called at that DP (within float32 rounding: ``np.float32(0.3)`` is 0.3)
  instead of the shared ones, e.g. from
  :func:`dynscale.nn.batchnorm.recalibrate`.
  """

  def __init__(self, arch: dict, variables: Mapping, bn_stats_by_dp: Mapping | None = None,
               *, dtype=jnp.float32):
    self.arch = spec.validate_architecture(arch)
    check_variables(self.arch, variables)
    self.variables = jax.tree.map(jnp.asarray, dict(variables))
    self.bn_stats_by_dp = {}
    for dp, stats in (bn_stats_by_dp or {}).items():
      dp = idp.check_dp(dp, "bn_stats_by_dp key")
      check_variables(self.arch, merge_variables(self.variables, stats))
      self.bn_stats_by_dp[dp] = jax.tree.map(jnp.asarray, dict(stats))
    self.dtype = dtype
    self.trace_count = 0
    self._executables: dict[tuple, tuple[Callable, dict]] = {}

  @classmethod
  def from_model(cls, model: Any, bn_stats_by_dp: Mapping | None = None, *,
                 dtype=None) -> SlicedModel:
    """From a model with ``arch`` and ``pure_variables()`` (an :class:`IDPNet`)."""
    return cls(model.arch, model.pure_variables(), bn_stats_by_dp,
               dtype=model.dtype if dtype is None else dtype)

  @property
  def compiled_widths(self) -> tuple[tuple[int, ...], ...]:
    """The width vectors with a cached executable, sorted."""
    return tuple(sorted(key[0] for key in self._executables))

  def _key(self, widths: Any, profile_index: int | None) -> tuple:
    dp = spec.dp_of(widths)
    s = spec.select_profile(self.arch, dp, profile_index)
    return spec.resolve_widths(self.arch, widths), s, self._stats_dp(dp)

  def _stats_dp(self, dp: float | None) -> float | None:
    """The key of ``bn_stats_by_dp`` that ``dp`` names (:func:`dynscale.idp.matching_dp`)."""
    return None if dp is None else idp.matching_dp(dp, self.bn_stats_by_dp)

  def sliced_variables(self, widths: Any, profile_index: int | None = None) -> dict:
    """The variables used at ``widths`` (per-DP statistics applied), cut to the kept widths."""
    kept, _, stats_dp = self._key(widths, profile_index)
    variables = self.variables
    if stats_dp is not None:
      variables = merge_variables(variables, self.bn_stats_by_dp[stats_dp])
    return slice_variables(self.arch, variables, kept)

  def __call__(self, x: Array, widths: Any = 1.0, *,
               profile_index: int | None = None) -> Array:
    """Logits ``(B, num_classes)`` float32 of the sliced network (eval mode)."""
    key = self._key(widths, profile_index)
    if key not in self._executables:
      kept, s, stats_dp = key

      def run(compact: dict, x: Array) -> Array:
        self.trace_count += 1
        return apply_sliced(self.arch, compact, x, kept, profile_index=s, dtype=self.dtype)
      self._executables[key] = (jax.jit(run), self.sliced_variables(widths, profile_index))
    run, compact = self._executables[key]
    return run(compact, x)


# --------------------------------------------------------------------------
# Export / load
# --------------------------------------------------------------------------


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """``{'a': {0: x}} -> {'a/0': x}``: the '/'-joined leaf paths of a nested dict."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_tree(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten_tree`; all-digit key parts become ints (nnx list indices)."""
  tree: dict = {}
  for name, value in flat.items():
    path = tuple(int(part) if part.isdigit() else part for part in name.split("/"))
    tree = set_path(tree, path, value)
  return tree


def export_digest(directory: str) -> str:
  """A digest of the network exported in ``directory``: its architecture and
  its arrays by name, not the archive's bytes (which follow how NumPy writes
  an archive), so that two exports of one network have one digest."""
  digest = hashlib.sha256()
  with open(os.path.join(directory, ARCHITECTURE_FILE), "rb") as f:
    digest.update(f.read())
  with np.load(os.path.join(directory, PARAMS_FILE)) as arrays:
    for name in sorted(arrays.files):
      array = arrays[name]
      digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def export(model_or_sliced: Any, directory: str | os.PathLike, widths: Any = None) -> Path:
  """Saves a network so that :func:`load` rebuilds it from two files alone.

  ``architecture.json``: the architecture dict (plain JSON). ``params.npz``:
  every variable under its '/'-joined path (``layers/3/kernel``), plus per-DP
  batch-norm statistics under ``bn_stats@<dp>/...``. Each file is written to
  a temporary file and moved into place with ``os.replace`` (parameters
  first), so a reader never sees a partly written file.

  Args:
    model_or_sliced: a :class:`SlicedModel`, or a model with ``arch`` and
      ``pure_variables()`` (an :class:`IDPNet`).
    directory: created if missing.
    widths: optional width vector (or DP): export the network trimmed to it,
      a smaller standalone network (:func:`dynscale.nn.spec.
      trimmed_architecture`) with the kept variables and the batch-norm
      statistics the network uses there (:meth:`SlicedModel.sliced_variables`:
      a DP's own, if it has them), so that it gives the network's logits at
      ``widths``. Single-profile networks only (an MP-IDP network's trimmed
      form would be one profile's network).

  Returns:
    The directory as a Path.
  """
  sliced = (model_or_sliced if isinstance(model_or_sliced, SlicedModel)
            else SlicedModel.from_model(model_or_sliced))
  arch, variables, stats_by_dp = sliced.arch, sliced.variables, sliced.bn_stats_by_dp
  if widths is not None:
    if arch["profiles"]:
      raise ValueError("widths: a trimmed export takes a single-profile network; export this "
                       "MP-IDP network whole (each DP then runs its own profile)")
    variables, stats_by_dp = sliced.sliced_variables(widths), {}
    arch = spec.trimmed_architecture(arch, widths)
  arrays = flatten_tree(variables)
  for dp, stats in stats_by_dp.items():
    arrays.update(flatten_tree(stats, f"{_STATS_PREFIX}{dp!r}/"))
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_npz_atomic(str(directory / PARAMS_FILE), arrays)
  write_bytes_atomic(str(directory / ARCHITECTURE_FILE),
                     json.dumps(arch, indent=2, sort_keys=True).encode())
  return directory


def load_architecture(directory: str | os.PathLike) -> dict:
  """The architecture dict of the network exported to ``directory`` (its weights unread)."""
  return json.loads((Path(directory) / ARCHITECTURE_FILE).read_text())


def load(directory: str | os.PathLike, *, dtype=jnp.float32) -> SlicedModel:
  """Rebuilds an exported network as a :class:`SlicedModel` (no Flax, no model classes)."""
  directory = Path(directory)
  for name in (ARCHITECTURE_FILE, PARAMS_FILE):
    if not (directory / name).is_file():
      raise FileNotFoundError(f"{directory / name} not found: an exported network needs "
                              f"{ARCHITECTURE_FILE} and {PARAMS_FILE}")
  arch = load_architecture(directory)
  with np.load(directory / PARAMS_FILE) as data:
    arrays = {name: data[name] for name in data.files}
  variables = {k: v for k, v in arrays.items() if not k.startswith(_STATS_PREFIX)}
  by_dp: dict[float, dict] = {}
  for name, value in arrays.items():
    if name.startswith(_STATS_PREFIX):
      dp, rest = name[len(_STATS_PREFIX):].split("/", 1)
      by_dp.setdefault(float(dp), {})[rest] = value
  return SlicedModel(arch, unflatten_tree(variables),
                     {dp: unflatten_tree(flat) for dp, flat in by_dp.items()}, dtype=dtype)
