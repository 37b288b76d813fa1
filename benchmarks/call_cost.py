r"""What a call hands the runtime: a zoo network's forward with its arrays passed
one by one, against the same forward with them bound.

python -m benchmarks.call_cost --model=mobilenet_v2_imagenet --batch=1

Times, in one process with interleaved rounds (the estimator and bursts of
the CompactNet tables: :mod:`dynscale.timing`), the sliced forward of the
network at full width jitted over ``(variables, x)`` (``arrays``: every
kernel, bias and batch-norm vector handed to the runtime on every call)
and the same forward from :func:`dynscale.bound.bind` (``bound``: the
small arrays packed into one buffer). Prints one JSON line: both
latencies, their ratio, the number of arrays and the cost per array
handed over. Run it under the platform's threads (e.g.
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" taskset -c 0``)
to read it as CompactNet's ``cpu-b1`` does.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dynscale import bound, host, timing
from dynscale.nn import models, sliced


def measure(model: str, batch: int, *, input_size: int = 32, classes: int = 10,
            width_multiplier: float = 1.0, rounds: int = 25, burst: int = 5) -> dict:
  arch = models.architecture(model, num_classes=classes, input_shape=(input_size, input_size, 3),
                             width_multiplier=width_multiplier)
  variables = models.build(arch, rngs=models.init_rngs(0)).pure_variables()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, input_size, input_size, 3)),
                  jnp.float32)

  def forward(v, x):
    return sliced.apply_sliced(arch, v, x)
  passed, bound_forward = jax.jit(forward), bound.bind(forward, variables)
  np.testing.assert_allclose(bound_forward(x), passed(variables, x), rtol=1e-5, atol=1e-5)
  stats = timing.interleaved_latencies(
      {"arrays": lambda: passed(variables, x), "bound": lambda: bound_forward(x)},
      warmup=2, repeats=rounds, estimator="min", burst=burst)
  ms = {name: 1e3 * s["latency_s"] for name, s in stats.items()}
  leaves = jax.tree.leaves(variables)
  return {
      "model": model, "batch": batch, "width_multiplier": width_multiplier,
      "arrays": len(leaves),
      "arrays_bound_alone": sum(a.size >= bound.SEPARATE_FROM for a in leaves),
      "arrays_ms": round(ms["arrays"], 4), "bound_ms": round(ms["bound"], 4),
      "bound_over_arrays": round(ms["bound"] / ms["arrays"], 3),
      "us_per_array": round(1e3 * (ms["arrays"] - ms["bound"]) / len(leaves), 3),
      "estimator": "min", "rounds": rounds, "burst": burst, **timing.machine()}


def _define_flags() -> None:
  """Flags only when run as a script (tests import :func:`measure`)."""
  flags.DEFINE_enum("model", "mobilenet_v2_imagenet", sorted(models.MODELS), "Network of the zoo.")
  flags.DEFINE_integer("batch", 1, "Batch size.")
  flags.DEFINE_float("width_multiplier", 1.0, "Scales every hidden width.")
  flags.DEFINE_integer("rounds", 25, "Interleaved rounds (the minimum is kept).")
  flags.DEFINE_integer("burst", 5, "Back-to-back runs per network per round.")


def main(argv):
  del argv
  f = flags.FLAGS
  tuning = host.tune()
  print(json.dumps({**measure(f.model, f.batch, width_multiplier=f.width_multiplier,
                              rounds=f.rounds, burst=f.burst), **tuning}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
