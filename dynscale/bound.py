"""Jitted functions with their arrays bound, for calls where the host's cost counts.

A jitted function's call hands every array of its arguments to the runtime
one by one (parsing, input handling, buffer preparation): on the 2-core
machine 1-2 us per array (``benchmarks.call_cost``). A network called on one
image pays that for every kernel, bias, batch-norm vector and gate
parameter: MobileNetV2's 297 arrays cost 0.24 ms a call, 40% of its
batch-1 latency, and M-CifarNet's skipping inference hands over 106
(RESULTS.md, issues 12 and 13). :func:`bind` packs the small arrays
of a pytree into one buffer per dtype, sliced back inside the compiled
function (where a static slice costs nothing), and passes the large ones as
they are, so a call hands over a handful. :func:`export` saves such a
function with its arrays (``jax.export``), and :func:`load` calls it again
from the files alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynscale.io import write_bytes_atomic, write_npz_atomic

SEPARATE_FROM = 4096  # elements: arrays this large are passed as they are
FUNCTION_FILE = "function.jax"
ARRAYS_FILE = "arrays.npz"


def _bound_call(fn: Callable[..., Any], tree: Any,
                separate_from: int) -> tuple[list[jax.Array], Callable[..., Any]]:
  """``(arrays, call)`` with ``call(arrays, *args) = fn(tree, *args)``, jitted:
  ``arrays`` holds ``tree``'s arrays of fewer than ``separate_from`` elements
  packed into one buffer per dtype, then the others as they are; ``call``
  rebuilds ``tree`` from them (static slices of the buffers, which cost
  nothing inside the compiled function)."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [jnp.asarray(a) for a in leaves]
  separate = [i for i, a in enumerate(leaves) if a.size >= separate_from]
  packed: dict[str, list[int]] = {}
  for i, a in enumerate(leaves):
    if a.size < separate_from:
      packed.setdefault(str(a.dtype), []).append(i)
  shapes = [a.shape for a in leaves]
  arrays = [jnp.concatenate([jnp.ravel(leaves[i]) for i in members])
            for members in packed.values()] + [leaves[i] for i in separate]

  @jax.jit
  def call(arrays: list[jax.Array], *args):
    out = [None] * len(leaves)
    for buffer, members in zip(arrays, packed.values()):
      start = 0
      for i in members:
        size = int(np.prod(shapes[i], dtype=int))
        out[i] = buffer[start:start + size].reshape(shapes[i])
        start += size
    for i, a in zip(separate, arrays[len(packed):]):
      out[i] = a
    return fn(jax.tree.unflatten(treedef, out), *args)
  return arrays, call


def bind(fn: Callable[..., Any], tree: Any, *,
         separate_from: int = SEPARATE_FROM) -> Callable[..., Any]:
  """``g(*args) = fn(tree, *args)``, jitted, with ``tree``'s arrays of fewer
  than ``separate_from`` elements packed into one buffer per dtype and the
  others passed on their own. The packed arrays are copied once, here."""
  arrays, call = _bound_call(fn, tree, separate_from)
  return lambda *args: call(arrays, *args)


def export(fn: Callable[..., Any], tree: Any, args: Sequence[Any], directory: str | os.PathLike,
           *, separate_from: int = SEPARATE_FROM) -> Path:
  """Saves ``g(*args) = fn(tree, *args)`` so that :func:`load` calls it from two
  files alone, without the code that built ``fn`` (or Flax).

  ``function.jax``: ``g`` serialized by ``jax.export`` (StableHLO for this
  backend, the argument shapes and dtypes of ``args`` fixed). ``arrays.npz``:
  ``tree``'s arrays, packed as :func:`bind` packs them. Each file is written
  to a temporary file and moved into place (the arrays first), so a reader
  never sees a partly written file.

  Args:
    fn: ``fn(tree, *args)``, traceable.
    tree: a pytree of arrays (e.g. a network's variables).
    args: example arguments (arrays or ``jax.ShapeDtypeStruct``): their shapes
      and dtypes are the only ones the saved function takes.
    directory: created if missing.

  Returns:
    The directory as a Path.
  """
  arrays, call = _bound_call(fn, tree, separate_from)
  exported = jax.export.export(call)(
      arrays, *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
  directory = Path(directory)
  write_npz_atomic(str(directory / ARRAYS_FILE), {f"arr_{i}": a for i, a in enumerate(arrays)})
  write_bytes_atomic(str(directory / FUNCTION_FILE), bytes(exported.serialize()))
  return directory


def load(directory: str | os.PathLike) -> Callable[..., Any]:
  """The function :func:`export` saved in ``directory``, jitted, its arrays bound."""
  directory = Path(directory)
  for name in (FUNCTION_FILE, ARRAYS_FILE):
    if not (directory / name).is_file():
      raise FileNotFoundError(f"{directory / name} not found: an exported function needs "
                              f"{FUNCTION_FILE} and {ARRAYS_FILE}")
  exported = jax.export.deserialize(bytearray((directory / FUNCTION_FILE).read_bytes()))
  with np.load(directory / ARRAYS_FILE) as data:
    # NumPy stores bfloat16 as raw 2-byte records: each array is read as the
    # dtype the saved function takes it in
    arrays = [jnp.asarray(data[f"arr_{i}"].view(aval.dtype))
              for i, aval in enumerate(exported.in_avals[:len(data.files)])]
  call = jax.jit(exported.call)
  return lambda *args: call(arrays, *args)
