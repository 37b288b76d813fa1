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
they are, so a call hands over a handful.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SEPARATE_FROM = 4096  # elements: arrays this large are passed as they are


def bind(fn: Callable[..., Any], tree: Any, *,
         separate_from: int = SEPARATE_FROM) -> Callable[..., Any]:
  """``g(*args) = fn(tree, *args)``, jitted, with ``tree``'s arrays of fewer
  than ``separate_from`` elements packed into one buffer per dtype and the
  others passed on their own. The packed arrays are copied once, here."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [jnp.asarray(a) for a in leaves]
  separate = [i for i, a in enumerate(leaves) if a.size >= separate_from]
  packed: dict[str, list[int]] = {}
  for i, a in enumerate(leaves):
    if a.size < separate_from:
      packed.setdefault(str(a.dtype), []).append(i)
  buffers = {dtype: jnp.concatenate([jnp.ravel(leaves[i]) for i in members])
             for dtype, members in packed.items()}
  shapes = [a.shape for a in leaves]

  @jax.jit
  def call(buffers, separate_leaves, *args):
    out = [None] * len(leaves)
    for dtype, members in packed.items():
      start = 0
      for i in members:
        size = int(np.prod(shapes[i], dtype=int))
        out[i] = buffers[dtype][start:start + size].reshape(shapes[i])
        start += size
    for i, a in zip(separate, separate_leaves):
      out[i] = a
    return fn(jax.tree.unflatten(treedef, out), *args)

  separate_leaves = [leaves[i] for i in separate]
  return lambda *args: call(buffers, separate_leaves, *args)
