"""Which channels the gates use on a split (paper 002 §5.2, Figs. 3-4).

For every gated layer, each channel is *never pruned* (open for every
image), *sometimes pruned* (open for some images only) or *always pruned*
(open for none): Fig. 3. Fig. 4 is the distribution over images of the
number of channels open in the last block.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from dynscale import plots
from dynscale.data import pipeline
from dynscale.data.datasets import Dataset
from dynscale.nn import layers

TYPES = ("never", "sometimes", "always")  # pruned


@dataclasses.dataclass
class ChannelUsage:
  """open_counts: ``{gate name: (C,)}`` images in which each channel was open;
  active: ``{gate name: (N,)}`` open channels per image; images: N."""

  open_counts: dict[str, np.ndarray]
  active: dict[str, np.ndarray]
  images: int


def channel_usage(model: nnx.Module, dataset: Dataset, split: str,
                  batch_size: int) -> ChannelUsage:
  """The evaluation-mode gate activity of ``model`` over every image of ``split``,
  gates in network order (a jitted function hands its dicts back sorted by key,
  ``layers.10`` before ``layers.2``)."""
  images = {"train": dataset.train_x, "val": dataset.val_x, "test": dataset.test_x}[split]
  mean, std = pipeline.normalization_stats(dataset.name)
  graphdef, state = nnx.split(model)

  @jax.jit
  def activity(state, x):
    trace = nnx.merge(graphdef, state).run(pipeline.normalize(x, mean, std), 1.0, train=False)
    return trace.activity

  counts, active = {}, {}
  for start in range(0, len(images), batch_size):
    for name, a in activity(state, jnp.asarray(images[start:start + batch_size])).items():
      a = np.asarray(a)
      counts[name] = counts.get(name, 0) + a.sum(axis=0)
      active.setdefault(name, []).append(a.sum(axis=1))
  order = [name for name in layers.gate_points(model.arch) if name in counts]
  return ChannelUsage({name: counts[name] for name in order},
                      {name: np.concatenate(active[name]) for name in order}, len(images))


def channel_types(usage: ChannelUsage) -> dict[str, dict[str, int]]:
  """``{gate name: {'never': n, 'sometimes': n, 'always': n}}`` (pruned), Fig. 3."""
  return {name: {"never": int(np.sum(c == usage.images)), "always": int(np.sum(c == 0)),
                 "sometimes": int(np.sum((c > 0) & (c < usage.images)))}
          for name, c in usage.open_counts.items()}


def last_block(usage: ChannelUsage) -> list[str]:
  """The gates of the network's last gated layer (all of a residual block's)."""
  last = ".".join(list(usage.active)[-1].split(".")[:2])
  return [name for name in usage.active if ".".join(name.split(".")[:2]) == last]


def summary(usage: ChannelUsage) -> dict:
  """Results-file fields: the channel types per layer, the fraction of all gated
  channels that are sometimes pruned, and the open channels of the last block
  per image (mean, min, max)."""
  types = channel_types(usage)
  total = sum(sum(t.values()) for t in types.values())
  last = sum(usage.active[name] for name in last_block(usage))
  return {"channel_types": types,
          "sometimes_pruned_fraction": sum(t["sometimes"] for t in types.values()) / total,
          "last_block_active_channels": {"mean": float(last.mean()), "min": int(last.min()),
                                         "max": int(last.max())}}


def plot(usage: ChannelUsage, workdir: str, title: str) -> None:
  """``channel_types.png`` (Fig. 3) and ``last_block_active_channels.png`` (Fig. 4)."""
  types = channel_types(usage)
  names = list(types)
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
  bottom = np.zeros(len(names))
  for kind in TYPES:
    values = np.array([types[n][kind] / sum(types[n].values()) for n in names])
    ax.bar(range(len(names)), values, bottom=bottom, label=f"{kind} pruned")
    bottom += values
  ax.set_xticks(range(len(names)), [str(i + 1) for i in range(len(names))])
  ax.set_xlabel("gated layer")
  ax.set_ylabel("fraction of channels")
  ax.legend()
  ax.set_title(title)
  plots.save_png(fig, os.path.join(workdir, "channel_types.png"), dpi=100, title=title)
  plt.close(fig)
  last = sum(usage.active[name] for name in last_block(usage))
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(last, bins=min(30, max(1, int(last.max() - last.min()) + 1)))
  ax.set_xlabel("open channels in the last block")
  ax.set_ylabel("images")
  ax.set_title(title)
  plots.save_png(fig, os.path.join(workdir, "last_block_active_channels.png"), dpi=100,
                 title=title)
  plt.close(fig)
