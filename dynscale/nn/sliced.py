"""Whole-network slicing: the sliced path of an IDP network, and export / load.

McDanel et al. (paper 001) Fig. 1 and §I: at DP ``p`` an IDP layer uses the
first ``p`` of its input channels, "Furthermore, only 50% of these filters are
used since output channels for the other filters will not be utilized in the
next layer", so a middle layer costs about ``p**2``. DESIGN invariants 1-2:
this is the SLICED path. ``dp`` is a static Python float; every layer takes
the kept prefix of its weights (:func:`dynscale.nn.spec.plan` gives the
widths) and computes only the outputs its consumer keeps, with the
``*_sliced`` kernels of :mod:`dynscale.idp`. The masked network
(:class:`dynscale.nn.layers.IDPNet`) computes the same function; the tests
prove it in logits, gradients and batch-norm state.

Variables are the pure nested dict of the model, ``nnx.state(model)
.to_pure_dict()`` (``model.pure_variables()``): ``{'layers': {i: {'kernel',
'bias' | 'bn': {'scale', 'bias', 'mean', 'var'}, 'gamma', ...}}}``, with
``{s: ...}`` one level deeper for the per-profile first and last layers of
MP-IDP. Batch-norm statistics (``bn_stats``) use the same layout restricted to
the ``mean`` / ``var`` leaves.

Everything here needs only JAX, NumPy, :mod:`dynscale.idp` and
:mod:`dynscale.nn.spec`: an exported network reloads without Flax or the
model classes.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynscale import idp
from dynscale.io import write_bytes_atomic
from dynscale.nn import spec

Array = jax.Array
TreePath = tuple[Any, ...]

ARCHITECTURE_FILE = "architecture.json"
PARAMS_FILE = "params.npz"
_STATS_PREFIX = "bn_stats@"
_BN_NAMES = ("bn", "depthwise_bn")


# --------------------------------------------------------------------------
# Variable trees
# --------------------------------------------------------------------------


def _layer_vars(variables: Mapping, index: int, s: int | None) -> Mapping:
  """Variables of layer ``index`` (of profile ``s`` for an MP-IDP separate layer)."""
  v = variables["layers"][index]
  return v if s is None else v[s]


def _leaf_specs(layer: dict, p: spec.LayerPlan) -> dict[str, tuple[tuple[int, ...], dict]]:
  """Full shape and prefix slicing ``{axis: size}`` of every variable of a block.

  Batch-norm leaves are listed by their block-level name (``bn``,
  ``depthwise_bn``) and stand for scale, bias, mean and var.
  """
  k, n = p.in_width, p.out_width
  c, m = p.inputs.channels, p.outputs.channels
  if layer["kind"] == "dense":
    # A map dense kernel is cut per channel by _slice_map_dense_kernel instead.
    main = {"kernel": ((p.inputs.size, m), {0: p.inputs.positions * k, 1: n}),
            "gamma": ((c,), {0: k})}
  elif layer["kind"] == "conv":
    kh = layer["kernel"]
    main = {"kernel": ((kh, kh, c, m), {2: k, 3: n}), "gamma": ((c,), {0: k})}
  else:
    kh = layer["kernel"]
    main = {"depthwise_kernel": ((kh, kh, 1, c), {3: k}), "depthwise_gamma": ((c,), {0: k}),
            "kernel": ((1, 1, c, m), {2: k, 3: n}), "gamma": ((c,), {0: k})}
    main.update({"depthwise_bn": ((c,), {0: k})} if layer["bn"]
                else {"depthwise_bias": ((c,), {0: k})})
    if not layer["idp_depthwise"]:
      del main["depthwise_gamma"]
  if not layer["idp"]:
    del main["gamma"]
  main.update({"bn": ((m,), {0: n})} if layer["bn"] else {"bias": ((m,), {0: n})})
  return main


def _take(a: Array, sizes: Mapping[int, int]) -> Array:
  """The prefix ``a[..., :sizes[axis], ...]`` (a no-op where ``a`` is already that size)."""
  index = [slice(None)] * a.ndim
  for axis, size in sizes.items():
    index[axis] = slice(0, size)
  return a[tuple(index)]


def _slice_map_dense_kernel(w: Array, p: spec.LayerPlan) -> Array:
  """Kernel ``(H*W*C, M)`` of a map dense layer -> ``(H*W*k, n)`` (per-channel prefix)."""
  h, wd = p.inputs.height, p.inputs.width
  w4 = w.reshape(h, wd, -1, w.shape[-1])
  return _take(w4, {2: p.in_width, 3: p.out_width}).reshape(-1, p.out_width)


def _slice_block(layer: dict, p: spec.LayerPlan, v: Mapping) -> dict:
  out = {}
  for name, (_, sizes) in _leaf_specs(layer, p).items():
    if name in _BN_NAMES:
      out[name] = {leaf: _take(a, sizes) for leaf, a in v[name].items()}
    elif name == "kernel" and spec.uses_map_dense(layer, p.inputs):
      out[name] = _slice_map_dense_kernel(v[name], p)
    else:
      out[name] = _take(v[name], sizes)
  return out


def variable_shapes(arch: dict) -> dict:
  """The pure-dict layout of a network's variables with each leaf's full shape.

  The same layout as ``nnx.state(IDPNet(arch)).to_pure_dict()``.
  """
  arch = spec.validate_architecture(arch)
  separate = spec.separate_layers(arch)
  layers = {}
  for p in spec.plan(arch, 1.0):
    layer = arch["layers"][p.index]
    if layer["kind"] not in spec.PARAMETRIC_KINDS:
      continue
    shapes = {}
    for name, (shape, _) in _leaf_specs(layer, p).items():
      shapes[name] = ({leaf: shape for leaf in ("bias", "mean", "scale", "var")}
                      if name in _BN_NAMES else shape)
    layers[p.index] = ({s: shapes for s in range(len(arch["profiles"]))}
                       if p.index in separate else shapes)
  return {"layers": layers}


def check_variables(arch: dict, variables: Mapping) -> None:
  """Raises ValueError unless ``variables`` has exactly the layout and shapes of ``arch``."""
  expected = _flatten(variable_shapes(arch))
  got = _flatten(variables)
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(f"variables do not match the architecture: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  for key, shape in expected.items():
    if tuple(np.shape(got[key])) != shape:
      raise ValueError(f"variable {key} has shape {tuple(np.shape(got[key]))}, the "
                       f"architecture needs {shape}")


def slice_variables(arch: dict, variables: Mapping, dp: float) -> dict:
  """The variables of the network at DP ``dp``: every array cut to the part that is used.

  Conv kernels ``(kh, kw, C, M) -> (kh, kw, k, n)``, profiles ``-> (k,)``,
  biases and batch norm ``-> (n,)`` with ``k`` / ``n`` the kept input /
  computed output widths of :func:`dynscale.nn.spec.plan`. Idempotent:
  :func:`apply_sliced` accepts full or already-sliced variables. MP-IDP
  per-profile layers are sliced for every profile.
  """
  arch = spec.validate_architecture(arch)
  separate = spec.separate_layers(arch)
  layers = {}
  for p in spec.plan(arch, dp):
    layer = arch["layers"][p.index]
    if layer["kind"] not in spec.PARAMETRIC_KINDS:
      continue
    v = variables["layers"][p.index]
    layers[p.index] = ({s: _slice_block(layer, p, vs) for s, vs in v.items()}
                       if p.index in separate else _slice_block(layer, p, v))
  return {**variables, "layers": layers}


def bn_stats_of(variables: Mapping) -> dict:
  """The batch-norm running statistics (``mean``/``var`` leaves) of a variables dict."""
  out = {}
  for key, value in variables.items():
    if isinstance(value, Mapping):
      if key in _BN_NAMES:
        out[key] = {"mean": value["mean"], "var": value["var"]}
      else:
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


# --------------------------------------------------------------------------
# The sliced forward
# --------------------------------------------------------------------------


def _batch_norm(v: Mapping, y: Array, *, train: bool, epsilon: float
                ) -> tuple[Array, tuple[Array, Array] | None]:
  """Batch norm with nnx.BatchNorm's arithmetic; returns the batch moments in train mode.

  Train mode normalises with the batch mean and the biased variance
  ``E[y^2] - E[y]^2`` (at least float32, clipped at 0) and returns ``(E[y], E[y^2])``
  per channel; eval mode uses the running ``mean`` / ``var``.
  """
  yf = y.astype(jnp.promote_types(y.dtype, jnp.float32))
  if train:
    axes = tuple(range(y.ndim - 1))
    mean, mean_sq = yf.mean(axes), (yf * yf).mean(axes)
    var, moments = jnp.maximum(0.0, mean_sq - mean * mean), (mean, mean_sq)
  else:
    mean, var, moments = v["mean"], v["var"], None
  mul = jax.lax.rsqrt(var + epsilon) * v["scale"]
  out = (yf - mean) * mul + v["bias"]
  return out.astype(y.dtype), moments


def _tail(v: Mapping, y: Array, layer: dict, bn: str, bias: str, arch: dict, train: bool,
          moments: dict, path: TreePath) -> Array:
  """act(BN(y)) or act(y + bias); batch moments are recorded under ``path + (bn,)``."""
  if layer["bn"]:
    y, m = _batch_norm(v[bn], y, train=train, epsilon=arch["bn_epsilon"])
    if m is not None:
      moments[path + (bn,)] = m
  else:
    y = y + v[bias].astype(y.dtype)
  return spec.activate(layer["act"], y)


def _weight(v: Mapping, name: str, binary: bool) -> Array:
  return idp.binarize(v[name]) if binary else v[name]


def _gamma(v: Mapping, name: str, n: int) -> Array:
  """A block's profile, or all-one coefficients for a complete (CDP) layer."""
  return v[name] if name in v else jnp.ones((n,), jnp.float32)


def _apply_block(layer: dict, p: spec.LayerPlan, v: Mapping, x: Array, arch: dict,
                 train: bool, moments: dict, path: TreePath) -> Array:
  """One block on sliced variables ``v`` (the ``*_sliced`` kernels with k, n_out)."""
  k, n, kind = p.in_width, p.out_width, layer["kind"]
  w = _weight(v, "kernel", layer["binary"])
  if kind == "dense" and spec.uses_map_dense(layer, p.inputs):
    h, wd = p.inputs.height, p.inputs.width
    y = idp.conv_sliced(x.reshape(-1, h, wd, k), w.reshape(h, wd, k, n), v["gamma"], k, n,
                        padding="VALID").reshape(x.shape[0], n)
  elif kind == "dense":
    rows = p.inputs.positions * k
    y = idp.dense_sliced(x, w, _gamma(v, "gamma", rows), rows, n)
  elif kind == "conv":
    y = idp.conv_sliced(x, w, _gamma(v, "gamma", k), k, n, strides=layer["stride"])
  else:
    f = _weight(v, "depthwise_kernel", layer["binary"])
    h = idp.depthwise_conv_sliced(x, f, _gamma(v, "depthwise_gamma", k), k,
                                  strides=layer["stride"])
    h = _tail(v, h, layer, "depthwise_bn", "depthwise_bias", arch, train, moments, path)
    y = idp.conv_sliced(h, w, _gamma(v, "gamma", k), k, n)
  return _tail(v, y, layer, "bn", "bias", arch, train, moments, path)


def _forward(arch: dict, variables: Mapping, x: Array, dp: float, *, train: bool,
             profile_index: int | None, dtype, upto: int | None = None
             ) -> tuple[Array, dict, dict]:
  """(float32 logits, sliced variables, batch moments by BN path) of the sliced network.

  With ``upto``, only layers ``0 .. upto - 1`` run and the first item is the
  activations entering layer ``upto`` instead of the logits.
  """
  spec.check_input(arch, x)
  s = spec.select_profile(arch, dp, profile_index)
  separate = spec.separate_layers(arch)
  compact = slice_variables(arch, variables, dp)
  moments: dict[TreePath, tuple[Array, Array]] = {}
  y = jnp.asarray(x, dtype)
  for p in spec.plan(arch, dp)[:upto]:
    layer = arch["layers"][p.index]
    if layer["kind"] not in spec.PARAMETRIC_KINDS:
      y = spec.apply_stateless(layer, y)
      continue
    chosen = s if p.index in separate else None
    path = ("layers", p.index) + (() if chosen is None else (chosen,))
    y = _apply_block(layer, p, _layer_vars(compact, p.index, chosen), y, arch, train,
                     moments, path)
  return y.astype(jnp.float32), compact, moments


def _get(tree: Mapping, path: TreePath) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: Mapping, path: TreePath, value: Any) -> dict:
  """A copy of ``tree`` with ``path`` set to ``value`` (copies along the path only)."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set(tree.get(path[0], {}), path[1:], value)
  return out


def _scatter(full: Array, part: Array) -> Array:
  """``full`` with its leading prefix replaced by ``part``."""
  return full.at[tuple(slice(0, d) for d in part.shape)].set(part.astype(full.dtype))


def apply_sliced(arch: dict, variables: Mapping, x: Array, dp: float, *, train: bool = False,
                 bn_stats: Mapping | None = None, profile_index: int | None = None,
                 dtype=jnp.float32) -> Array | tuple[Array, dict]:
  """The network at static DP ``dp``, computing only the kept channels (sliced path).

  Args:
    arch: the architecture dict.
    variables: the model's pure variable dict (full, or already sliced by
      :func:`slice_variables` at this dp).
    x: a batch ``(B, *input_shape)``.
    dp: a static Python float in (0, 1].
    train: False (default) normalises with the running statistics; True uses
      batch statistics and also returns the updated running statistics.
    bn_stats: optional statistics (``bn_stats_of`` layout) used instead of
      the ones in ``variables`` (e.g. recalibrated for this dp).
    profile_index: MP-IDP only: force profile s (else chosen from ``dp``).
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
  dp = idp.check_dp(dp)
  if bn_stats is not None:
    variables = merge_variables(variables, bn_stats)
  logits, compact, moments = _forward(arch, variables, x, dp, train=train,
                                      profile_index=profile_index, dtype=dtype)
  if not train:
    return logits
  m = arch["bn_momentum"]
  stats = bn_stats_of(variables)
  for path, (mean, mean_sq) in moments.items():
    old = _get(compact, path)
    var = jnp.maximum(0.0, mean_sq - mean * mean)
    new = {"mean": m * old["mean"] + (1 - m) * mean, "var": m * old["var"] + (1 - m) * var}
    full = _get(stats, path)
    stats = _set(stats, path, {key: jax.lax.stop_gradient(_scatter(full[key], new[key]))
                               for key in new})
  return logits, stats


def features_sliced(arch: dict, variables: Mapping, x: Array, dp: float, upto: int, *,
                    profile_index: int | None = None, dtype=jnp.float32) -> Array:
  """The activations entering layer ``upto`` of the sliced network at DP ``dp`` (eval mode).

  Layers ``0 .. upto - 1`` run exactly as in :func:`apply_sliced`, so only
  the computed channels are there: ``(B, H, W, k)`` for a map, with ``k =
  plan(arch, dp)[upto].in_width`` (the prefix the consumer keeps); float32.
  ``upto = len(arch["layers"])`` gives the logits. Used for class
  activation maps (:mod:`dynscale.cam`).
  """
  arch = spec.validate_architecture(arch)
  dp = idp.check_dp(dp)
  n = len(arch["layers"])
  if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= n:
    raise ValueError(f"upto must be a layer index in [0, {n}], got {upto!r}")
  y, _, _ = _forward(arch, variables, x, dp, train=False, profile_index=profile_index,
                     dtype=dtype, upto=upto)
  return y


def batch_moments(arch: dict, variables: Mapping, x: Array, dp: float, *,
                  profile_index: int | None = None, dtype=jnp.float32) -> dict:
  """Per batch-norm layer ``(E[y], E[y^2])`` over this batch, in train mode, at ``dp``.

  The layout is that of :func:`bn_stats_of` with leaves ``mean`` (E[y]) and
  ``mean_sq`` (E[y^2]) over the computed channels only (sliced shapes).
  Precise batch-norm recalibration averages these over batches.
  """
  arch = spec.validate_architecture(arch)
  dp = idp.check_dp(dp)
  _, _, moments = _forward(arch, variables, x, dp, train=True, profile_index=profile_index,
                           dtype=dtype)
  out: dict = {}
  for path, (mean, mean_sq) in moments.items():
    out = _set(out, path, {"mean": mean, "mean_sq": mean_sq})
  return out


# --------------------------------------------------------------------------
# SlicedModel: one cached executable per DP
# --------------------------------------------------------------------------


class SlicedModel:
  """A network run by its sliced path, with one jitted executable per DP.

  ``model(x, dp)`` slices the variables for ``dp`` once (so the executable
  receives only the kept weights), jits :func:`apply_sliced` at that static
  dp and caches both in a dict on this instance (no module-level caches).
  ``compiled_dps`` lists the DPs in the cache and ``trace_count`` counts the
  traces, so callers can check that a DP compiles once.

  ``bn_stats_by_dp`` maps a DP (matched by float value after
  :func:`dynscale.idp.check_dp`) to batch-norm statistics used at that DP
  instead of the shared ones, e.g. from
  :func:`dynscale.nn.batchnorm.recalibrate_all`.
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
    self._executables: dict[float, tuple[Callable, dict]] = {}

  @classmethod
  def from_model(cls, model: Any, bn_stats_by_dp: Mapping | None = None, *,
                 dtype=None) -> SlicedModel:
    """From a model with ``arch`` and ``pure_variables()`` (an :class:`IDPNet`)."""
    return cls(model.arch, model.pure_variables(), bn_stats_by_dp,
               dtype=model.dtype if dtype is None else dtype)

  @property
  def compiled_dps(self) -> tuple[float, ...]:
    """The DPs with a cached executable, ascending."""
    return tuple(sorted(self._executables))

  def sliced_variables(self, dp: float) -> dict:
    """The variables used at ``dp`` (per-DP statistics applied), sliced to the kept widths."""
    dp = idp.check_dp(dp)
    variables = self.variables
    if dp in self.bn_stats_by_dp:
      variables = merge_variables(variables, self.bn_stats_by_dp[dp])
    return slice_variables(self.arch, variables, dp)

  def _compile(self, dp: float) -> tuple[Callable, dict]:
    def run(compact: dict, x: Array) -> Array:
      self.trace_count += 1
      return apply_sliced(self.arch, compact, x, dp, dtype=self.dtype)
    return jax.jit(run), self.sliced_variables(dp)

  def __call__(self, x: Array, dp: float) -> Array:
    """Logits ``(B, num_classes)`` float32 of the sliced network at DP ``dp`` (eval mode)."""
    dp = idp.check_dp(dp)
    if dp not in self._executables:
      self._executables[dp] = self._compile(dp)
    run, compact = self._executables[dp]
    return run(compact, x)


# --------------------------------------------------------------------------
# Export / load
# --------------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """``{'a': {0: x}} -> {'a/0': x}``."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`_flatten`; all-digit key parts become ints (nnx list indices)."""
  tree: dict = {}
  for name, value in flat.items():
    path = tuple(int(part) if part.isdigit() else part for part in name.split("/"))
    tree = _set(tree, path, value)
  return tree


def export(model_or_sliced: Any, directory: str | os.PathLike) -> Path:
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

  Returns:
    The directory as a Path.
  """
  sliced = (model_or_sliced if isinstance(model_or_sliced, SlicedModel)
            else SlicedModel.from_model(model_or_sliced))
  arrays = _flatten(sliced.variables)
  for dp, stats in sliced.bn_stats_by_dp.items():
    arrays.update(_flatten(stats, f"{_STATS_PREFIX}{dp!r}/"))
  arrays = {name: np.asarray(value) for name, value in arrays.items()}
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes_atomic(str(directory / PARAMS_FILE), buffer.getvalue())
  write_bytes_atomic(str(directory / ARCHITECTURE_FILE),
                     json.dumps(sliced.arch, indent=2, sort_keys=True).encode())
  return directory


def load(directory: str | os.PathLike, *, dtype=jnp.float32) -> SlicedModel:
  """Rebuilds an exported network as a :class:`SlicedModel` (no Flax, no model classes)."""
  directory = Path(directory)
  for name in (ARCHITECTURE_FILE, PARAMS_FILE):
    if not (directory / name).is_file():
      raise FileNotFoundError(f"{directory / name} not found: an exported network needs "
                              f"{ARCHITECTURE_FILE} and {PARAMS_FILE}")
  arch = json.loads((directory / ARCHITECTURE_FILE).read_text())
  with np.load(directory / PARAMS_FILE) as data:
    arrays = {name: data[name] for name in data.files}
  variables = {k: v for k, v in arrays.items() if not k.startswith(_STATS_PREFIX)}
  by_dp: dict[float, dict] = {}
  for name, value in arrays.items():
    if name.startswith(_STATS_PREFIX):
      dp, rest = name[len(_STATS_PREFIX):].split("/", 1)
      by_dp.setdefault(float(dp), {})[rest] = value
  return SlicedModel(arch, _unflatten(variables),
                     {dp: _unflatten(flat) for dp, flat in by_dp.items()}, dtype=dtype)
