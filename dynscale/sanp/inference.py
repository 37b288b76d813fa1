"""Inference that skips what the gates close (paper 002 Eq. 4), one image at a time.

The masked network computes every channel and multiplies the closed ones by
zero. Here a gated convolution reads only its open input channels and
computes only its open output channels: it gathers those filters, batch-norm
entries and gate values (:func:`dynscale.nn.sliced.gather_variables`)
and runs the core's own layer on them. Between layers the activations stay
in the gates' order, open channels first and the rest zeros, so the next
layer reads a prefix of them (a slice, not a gather) and pooling runs on
them as they are; the next gate reads its pooled descriptor put back in
channel order, and a layer that mixes channel positions (flatten, dense,
an ungated convolution) gets the channel order back first. What every
layer sees is what the masked network gives it. The permutation comes from
cumulative sums of the decisions (:func:`open_first`), not a sort: at batch
1 every operation's fixed cost counts.

A gated convolution that reads the image (the first) computes all its
output channels, as the masked network does, with its filters and
batch-norm entries taken in the open-first order, so that its output comes
out in that order. It is the cheapest layer (1% of M-CifarNet's
multiply-adds), and skipping its closed channels cost more than it saved:
XLA:CPU fused its multiply-adds over taps into the zero padding of a
bucket's output, one loop 7x the time of the same layer's loop in the plain
network (RESULTS.md, issue 12).

Shapes must be static, so open-channel counts are rounded up to
``buckets`` sizes per layer (the padded slots are closed channels, which
read zeros and are multiplied by zero): each layer picks its (input bucket,
output bucket) pair with ``lax.switch`` inside one jitted function, with no
host round trip. The returned function takes the image alone: the
variables are bound (:func:`dynscale.bound.bind`: plain arrays, the small
ones packed into one buffer), so a call flattens no Flax objects and hands
the runtime a handful of arrays instead of a hundred. Convolution chains
(``m_cifarnet``, ``vgg16``, ``vgg19``) and ResNets of basic blocks
(``resnet18``): a block runs as the convolutions its apply is made of
(:meth:`dynscale.nn.kinds.ResBlock.convolutions`), ``conv1`` from the block's input in channel
order, ``conv2`` from ``conv1``'s open channels. ``conv2`` computes every
output channel, in channel order, where the shortcut meets it at the add (the
gate zeroes the closed ones): computing only its open outputs and gathering
them back into channel order cost more at batch 1 (RESULTS.md, issue 12).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynscale import bound
from dynscale.nn import sliced, spec
from dynscale.nn.kinds import KINDS, Context, Feature, activate, gate_name
from dynscale.sanp.gates import descriptor

SUPPORTED = ("conv", "resblock", "maxpool", "global_avgpool", "flatten", "dense")
CHANNELWISE = ("maxpool", "global_avgpool")  # run on channels in any order


def bucket_sizes(channels: int, buckets: int) -> tuple[int, ...]:
  """The channel counts a layer of ``channels`` compiles for: ``ceil(channels i / buckets)``."""
  return tuple(sorted({math.ceil(channels * i / buckets) for i in range(1, buckets + 1)}))


def bucket_index(sizes: tuple[int, ...], count: jax.Array) -> jax.Array:
  """The index of the smallest of the sorted ``sizes`` that holds ``count``
  channels: one comparison per size, where ``jnp.searchsorted`` compiles to a
  loop that XLA:CPU steps from the host."""
  return jnp.sum(jnp.asarray(sizes) < count)


def check_architecture(arch: dict) -> None:
  """Raises unless every layer of ``arch`` is of a kind this executor runs."""
  if arch.get("profiles"):
    raise ValueError("skipping inference runs single-profile networks, not MP-IDP")
  for i, layer in enumerate(arch["layers"]):
    if layer["kind"] not in SUPPORTED:
      raise ValueError(f"skipping inference runs layers of kinds {SUPPORTED}; layers[{i}] "
                       f"is a {layer['kind']!r}")


def open_first(is_open: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The permutation that puts the open channels of ``is_open`` ``(C,)`` first, each
  part in channel order: ``(order, slot)`` with ``order[j]`` the channel at slot
  ``j`` and ``slot[c]`` the slot of channel ``c`` (its inverse).

  An open channel's slot is the number of open channels before it; a closed
  one's is the open total plus the closed channels before it. The running
  count is one product with a triangular matrix: XLA:CPU lowers a
  cumulative sum to a chain of window reductions, each a dispatch that
  counts at batch 1."""
  channels = is_open.shape[0]
  opened = is_open.astype(jnp.float32)
  upto = np.triu(np.ones((channels, channels), np.float32))  # a constant of the program
  before = (opened @ upto).astype(jnp.int32) - is_open  # open channels before each
  position = jnp.arange(channels)
  slot = jnp.where(is_open, before, jnp.sum(is_open) + position - before)
  order = jnp.zeros_like(slot).at[slot].set(position, unique_indices=True)
  return order, slot


def _ignore(*_):
  return None


def skipping_forward(model: nnx.Module, buckets: int = 4) -> Callable[[jax.Array], jax.Array]:
  """``logits = f(image)`` for one image ``(1, H, W, C)`` of the gated ``model``,
  computing only the open channels of every gated convolution (jitted)."""
  compiled = bound.bind(*_skipping(model, buckets))

  def run(image: jax.Array) -> jax.Array:
    if image.shape[0] != 1:
      raise ValueError(f"skipping inference takes one image (1, H, W, C), got {image.shape}")
    return compiled(image)
  return run


def export_skipping(model: nnx.Module, directory: str | os.PathLike,
                    buckets: int = 4) -> Path:
  """Saves :func:`skipping_forward` of ``model`` (``jax.export``, with its
  variables) so that ``dynscale.bound.load(directory)`` gives ``logits =
  f(image)`` for one image ``(1, H, W, C)`` from the files alone, without
  Flax or the model's code (:func:`dynscale.bound.export`)."""
  forward, values = _skipping(model, buckets)
  image = jax.ShapeDtypeStruct((1, *model.arch["input_shape"]), jnp.float32)
  return bound.export(forward, values, [image], directory)


@dataclasses.dataclass(frozen=True)
class _Convolution:
  """One convolution as the executor runs it: a ``conv`` layer dict, its
  variables, its full input and output shapes and the path of its gate point
  (the gate's name)."""

  layer: dict
  variables: Mapping
  inputs: Feature
  outputs: Feature
  path: str


def _block_convolutions(node: spec.Node, layer: dict, v: Mapping) -> tuple[_Convolution, ...]:
  """A block's convolutions (:meth:`dynscale.nn.kinds.ResBlock.convolutions`)
  as ``conv`` layers, in the order its apply runs them, each with its
  variables and its input and output shapes by slot."""
  kind, path = KINDS[layer["kind"]], f"layers.{node.index}"
  shapes = kind.slot_maps(layer, node.inputs)
  return tuple(
      _Convolution(conv.as_layer(shapes[conv.slots[1]].channels),
                   {**v[conv.name], "bn": v[conv.norm]}, shapes[conv.slots[0]],
                   shapes[conv.slots[1]],
                   gate_name(path, conv.name) if conv.gated else f"{path}.{conv.name}")
      for conv in kind.convolutions(layer, node.inputs))


def _natural(y: jax.Array, placed) -> jax.Array:
  """``y`` in channel order, from the order ``placed`` = ``(order, slot)`` of
  :func:`open_first` (``None``: it is in channel order)."""
  return y if placed is None else y[..., placed[1]]


def _skipping(model: nnx.Module, buckets: int) -> tuple[Callable, tuple]:
  """``(forward, values)``: ``forward(values, image)`` is the skipping forward
  of the gated ``model``, ``values`` its variables and gate parameters."""
  if buckets < 1:
    raise ValueError(f"buckets must be >= 1, got {buckets}")
  arch = model.arch
  check_architecture(arch)
  graph = spec.graph(arch)
  gate_graph, gate_state = nnx.split(model.gates)
  gate_values = gate_state.to_pure_dict()
  variables = model.pure_variables()["layers"]

  def context(path: str, gates=None) -> Context:
    return Context(train=False, epsilon=arch["bn_epsilon"], masks={}, gates=gates, path=path,
                   record=_ignore)

  def apply(conv: _Convolution, y, cut=None, gate=None):
    """``conv`` on ``y`` (its variables, or ``cut``: them cut to the kept channels),
    its gate point multiplying by ``gate`` if given."""
    layer = conv.layer if cut is None else {**conv.layer, "features": gate.shape[-1]}
    ctx = context(conv.path, None if gate is None else {conv.path: lambda x, y, train: gate})
    return KINDS["conv"].apply(layer, conv.variables if cut is None else cut, y, ctx,
                               conv.inputs, conv.outputs)

  def gated_conv(conv: _Convolution, y, placed, count_in, gate, reads_image,
                 every_output=False):
    """``y`` holds the input channels placed by ``placed`` = ``(order, slot)`` of
    :func:`open_first` (open first, the rest zeros; ``None``: the natural order);
    returns the output the same way, with the open output count. With
    ``every_output``, every output channel, in channel order, from the open
    inputs (closed outputs are zeros: the gate multiplies them by zero)."""
    channels = conv.inputs.channels
    if placed is None:
      order_in, count_in, sizes_in = jnp.arange(channels), channels, (channels,)
      descriptor_map = y
    else:  # Eq. 5's pooled descriptor, put back in channel order: a 1x1 map pools to itself
      order_in, slot_in = placed
      sizes_in = bucket_sizes(channels, buckets)
      descriptor_map = descriptor(y)[:, slot_in][:, None, None, :]
    multiplier = gate(descriptor_map, None, False)[0]
    specs = KINDS["conv"].variables(conv.layer, conv.inputs, conv.outputs)

    def on_channels(kept, y):
      """The layer computing only the ``kept`` channels (``"in"``: those ``y``
      holds; ``"out"``, else all) of each slot."""
      sub = sliced.gather_variables(specs, conv.variables, kept, conv.path)
      picked = multiplier[kept["out"]] if "out" in kept else multiplier
      return apply(conv, y, sub, picked[None])

    if every_output:
      def from_inputs(k_in):
        return lambda y: on_channels({"in": order_in[:k_in]}, y[..., :k_in])
      y = jax.lax.switch(bucket_index(sizes_in, count_in), [from_inputs(k) for k in sizes_in], y)
      return y, None, None

    is_open = multiplier != 0
    order_out, slot_out = open_first(is_open)
    if reads_image:  # every output, the open ones first (module docstring)
      return on_channels({"out": order_out}, y), (order_out, slot_out), jnp.sum(is_open)

    features = conv.layer["features"]

    def branch(k_in, k_out):
      def run(y):
        out = on_channels({"in": order_in[:k_in], "out": order_out[:k_out]}, y[..., :k_in])
        return jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, features - k_out)])
      return run

    sizes_out = bucket_sizes(features, buckets)
    pairs = list(itertools.product(sizes_in, sizes_out))
    which_in = bucket_index(sizes_in, count_in)
    which_out = bucket_index(sizes_out, jnp.sum(is_open))
    y = jax.lax.switch(which_in * len(sizes_out) + which_out,
                       [branch(k_in, k_out) for k_in, k_out in pairs], y)
    return y, (order_out, slot_out), jnp.sum(is_open)

  def convolution(conv: _Convolution, y, placed, count, gates, reads_image,
                  every_output=False):
    """``conv`` on ``y`` placed by ``placed``: its open channels only if it is
    gated (:func:`gated_conv`); returns the output, its placement and open count."""
    if conv.path not in gates:
      return apply(conv, _natural(y, placed)), None, None
    return gated_conv(conv, y, placed, count, gates[conv.path], reads_image, every_output)

  def residual_block(node, layer, v, x, gates, reads_image):
    """A basic block on ``x`` in channel order; its output in channel order
    (the residual add mixes the two branches' channels): ``conv2`` computes
    every output from its open inputs (module docstring)."""
    first, second, *shortcut = _block_convolutions(node, layer, v)
    h, placed, count = convolution(first, x, None, None, gates, reads_image)
    y, placed, _ = convolution(second, h, placed, count, gates, False, every_output=True)
    shortcut = apply(shortcut[0], x) if shortcut else x
    return activate(layer["act"], _natural(y, placed) + shortcut)

  def forward(bound_values, image):
    variables, gate_values = bound_values
    gates = nnx.merge(gate_graph, nnx.State(gate_values))
    y, placed, count = image, None, None
    for node in graph.nodes:
      layer = arch["layers"][node.index]
      v = variables[node.index] if node.kind in spec.PARAMETRIC_KINDS else {}
      if node.kind == "conv":
        conv = _Convolution(layer, v, node.inputs, node.outputs, f"layers.{node.index}")
        y, placed, count = convolution(conv, y, placed, count, gates, y is image)
      elif node.kind == "resblock":
        y, placed, count = residual_block(node, layer, v, _natural(y, placed), gates,
                                          y is image), None, None
      else:
        if node.kind not in CHANNELWISE:  # back to channel order
          y, placed, count = _natural(y, placed), None, None
        y = KINDS[layer["kind"]].apply(layer, v, y, context(f"layers.{node.index}"),
                                       node.inputs, node.outputs)
    return _natural(y, placed).astype(jnp.float32)

  return forward, (variables, gate_values)
