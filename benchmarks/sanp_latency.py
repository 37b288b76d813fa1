r"""Batch-1 latency of SANP inference: skipping closed channels, against dense and masked.

python -m benchmarks.sanp_latency --model=m_cifarnet --batch=1 --flops=0.5,0.25

For each target FLOPs fraction, the gates of every convolution are set to
open the same fraction ``k`` of its channels (FIXED-K's pattern, ``k`` from
:func:`dynscale.sanp.budget.fixed_k_keep`; which ones: a seeded random
subset per layer, as trained gates open, or with ``--open_channels=first``
the first ones, whose filters are contiguous), so the network costs about the
target; then one run times, with interleaved rounds, the backbone without
gates (``dense``), the gated network's masked path (``masked``: computes
every channel, multiplies the closed ones by zero) and
:func:`dynscale.sanp.inference.skipping_forward` (``skip``). All are called
the same way, as functions of the image with their variables bound by
:func:`dynscale.bound.bind` (plain arrays, the small ones in one buffer;
the dense backbone through :func:`dynscale.nn.sliced.apply_sliced`): at
batch 1 flattening Flax objects, or handing the runtime a hundred arrays,
costs a few tenths of a millisecond per call, which would otherwise count
against whichever path pays it. A fourth path,
``thin``, is the plain backbone at the widths skipping computes (each
layer's open count rounded up to its bucket), without gates: the floor any
skipping can reach, so ``skip_over_thin`` is what the gates, the filter
gathers and the bucket switches cost. In ResNet-18 only the blocks' inner
widths narrow in ``thin`` (outputs that meet at a residual add stay whole,
:func:`bucketed_widths`), so there ``thin`` is no floor
(``thin_flops_ratio``). Prints one JSON
line per target: ``skip_over_dense``, ``masked_over_dense``, the analytic
``flops_ratio`` (§4.1.1's formula), the gates' own cost and the XLA flags.
Untrained weights: latency does not depend on their values.

The dense baseline depends on XLA:CPU's library fusions: by default XLA
compiles the backbone's chain of convolutions, batch norms and ReLUs into
one YNNPACK subgraph, which runs M-CifarNet at batch 1 about 1.7x slower
than the same convolutions as separate fusions (the gates' reductions break
the chain in the masked network). Run it also with
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot``
and compare skipping against the faster dense network.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from dynscale import bound, host, timing
from dynscale.nn import costs, layers, models, sliced
from dynscale.sanp import budget, gates, inference

MODELS = {"m_cifarnet": (32, 32, 3), "vgg16": (32, 32, 3), "vgg19": (32, 32, 3),
          "resnet18": (32, 32, 3)}


OPEN_CHANNELS = ("random", "first")


def open_fraction(model, keep: float, channels: str = "random", seed: int = 0) -> None:
  """Sets every SPM to open ``kept_channels(keep, C)`` of its channels for any
  input: a random subset drawn per gate from ``seed`` (``channels='random'``,
  as trained gates open them, so skipping gathers scattered filters), or its
  first ones (``'first'``: contiguous filters, the cheapest gathers)."""
  if channels not in OPEN_CHANNELS:
    raise ValueError(f"channels must be one of {OPEN_CHANNELS}, got {channels!r}")
  rng = np.random.default_rng(seed)
  for gate in model.gates.values():
    size = gate.head.w2.bias.value.shape[0]
    k = gates.kept_channels(keep, size)
    order = rng.permutation(size) if channels == "random" else np.arange(size)
    is_open = np.zeros(size, bool)
    is_open[order[:k]] = True
    gate.head.w2.bias.value = jnp.where(jnp.asarray(is_open), 3.0, -3.0)


def bucketed_widths(model, keep: float, buckets: int) -> dict[str, int]:
  """Each gated group's width as skipping computes it under :func:`open_fraction`:
  its open count rounded up to a bucket size, by group name. Tied groups
  (outputs that meet at a residual add) keep their full width: the add with
  the shortcut makes every channel active again, and a narrower tied group
  would cut the shortcut too."""
  widths = {}
  for group in layers.gated_groups(model.arch).values():
    if len(group.members) == 1:
      opened = gates.kept_channels(keep, group.size)
      widths[group.name] = min(k for k in inference.bucket_sizes(group.size, buckets)
                               if k >= opened)
  return widths


def masked_forward(model):
  """``(logits, activity) = f(image)`` of the gated ``model``'s masked path, its
  variables bound."""
  graph, state = nnx.split(model)

  def run(values, image):
    trace = nnx.merge(graph, nnx.State(values)).run(image, 1.0, train=False)
    return trace.output, trace.activity
  return bound.bind(run, state.to_pure_dict())


def measure(model_name: str, targets, *, width_multiplier: float, buckets: int,
            repeats: int, warmup: int, open_channels: str = "random") -> list[dict]:
  arch = models.architecture(model_name, num_classes=10, input_shape=MODELS[model_name],
                             profile="all-one", width_multiplier=width_multiplier)
  dense_variables = models.build(arch, rngs=models.init_rngs(0)).pure_variables()
  image = jax.random.normal(jax.random.key(1), (1, *MODELS[model_name]))
  dense = bound.bind(lambda v, x: sliced.apply_sliced(arch, v, x, 1.0), dense_variables)
  records = []
  for target in targets:
    keep = budget.fixed_k_keep(arch, target)
    gated = models.build(arch, rngs=models.init_rngs(0), gate=gates.gate_factory("sanp"))
    open_fraction(gated, keep, open_channels)
    widths = bucketed_widths(gated, keep, buckets)
    thin = bound.bind(lambda v, x, widths=widths: sliced.apply_sliced(arch, v, x, widths),
                      sliced.slice_variables(arch, dense_variables, widths))
    masked = masked_forward(gated)
    skip = inference.skipping_forward(gated, buckets)
    logits, activity = masked(image)
    np.testing.assert_allclose(skip(image), logits, rtol=1e-4, atol=1e-4)
    stats = timing.interleaved_latencies({
        "dense": lambda: dense(image), "masked": lambda: masked(image),
        "skip": lambda: skip(image), "thin": lambda: thin(image)},
        warmup=warmup, repeats=repeats)
    median = {name: s["median_s"] for name, s in stats.items()}
    records.append({
        "model": model_name, "width_multiplier": width_multiplier, "batch": 1,
        "target_flops": target, "keep": round(keep, 4), "buckets": buckets,
        "open_channels": open_channels,
        "flops_ratio": round(float(costs.sample_flops(arch, 1.0, activity)[0])
                             / costs.flops(arch), 4),
        "skip_over_dense": round(median["skip"] / median["dense"], 3),
        "masked_over_dense": round(median["masked"] / median["dense"], 3),
        "thin_over_dense": round(median["thin"] / median["dense"], 3),
        "skip_over_thin": round(median["skip"] / median["thin"], 3),
        "thin_flops_ratio": round(costs.flops(arch, widths) / costs.flops(arch), 4),
        **{f"{name}_ms": round(1e3 * s, 4) for name, s in median.items()},
        **{f"{name}_spread": round(s["spread"], 3) for name, s in stats.items()},
        "gate_flops": budget.spm_flops(arch, 16),
        **timing.machine()})
  return records


def _define_flags() -> None:
  """Flags only when run as a script (tests import :func:`measure`)."""
  flags.DEFINE_enum("model", "m_cifarnet", list(MODELS), "Network of the model zoo.")
  flags.DEFINE_integer("batch", 1, "Batch size; skipping inference takes one image.")
  flags.DEFINE_list("flops", ["0.5", "0.25"], "Target FLOPs fractions.")
  flags.DEFINE_float("width_multiplier", 1.0, "Scales every hidden width.")
  flags.DEFINE_integer("buckets", 4, "Channel-count buckets per layer.")
  flags.DEFINE_integer("repeats", 30, "Timed rounds.")
  flags.DEFINE_integer("warmup", 3, "Untimed runs per candidate (compilation).")
  flags.DEFINE_enum("open_channels", "random", list(OPEN_CHANNELS),
                    "Which channels the gates open: a random subset per layer (as trained "
                    "gates do) or the first ones (contiguous filters to gather).")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.batch != 1:
    raise app.UsageError(f"--batch must be 1 (skipping inference runs one image), got {f.batch}")
  tuning = host.tune()
  for record in measure(f.model, [float(t) for t in f.flops],
                        width_multiplier=f.width_multiplier, buckets=f.buckets,
                        repeats=f.repeats, warmup=f.warmup, open_channels=f.open_channels):
    print(json.dumps({**record, **tuning}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
