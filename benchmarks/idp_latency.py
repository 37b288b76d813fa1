r"""Inference latency of an IDP network at several DPs: sliced against masked.

python -m benchmarks.idp_latency --model=vgg16 --batch=64 --dps=1.0,0.75,0.5,0.25

Prints one JSON line per DP with ``sliced_ratio`` and ``masked_ratio`` (the
latency at that DP divided by the same path's latency at 100% DP, measured in
one run with interleaved repeats; ``--estimator`` picks the median, default,
or the minimum, which a busy machine inflates least) and ``flops_ratio`` (analytic,
from :func:`dynscale.nn.costs.flops`). The sliced path is a separate cached
executable per DP over only the kept weights; the masked path is one
executable whose cost does not depend on DP. Untrained weights: latency does
not depend on their values.
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from dynscale import host, timing
from dynscale.nn import costs, models, sliced

MODELS = {"vgg16": (32, 32, 3), "mobilenet": (32, 32, 3), "mlp": (28, 28, 1)}

_MODEL = flags.DEFINE_enum("model", "vgg16", list(MODELS), "Network of the model zoo.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_DPS = flags.DEFINE_list("dps", ["1.0", "0.75", "0.5", "0.25"], "DPs to time.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed rounds (every DP and path once each).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs per candidate (compilation).")
_WIDTH = flags.DEFINE_float("width_multiplier", 1.0, "Scales every hidden width.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_ESTIMATOR = flags.DEFINE_enum("estimator", "median", list(timing.ESTIMATORS),
                               "Latency of a candidate from its timed runs.")


def measure(model_name: str, batch: int, dps: list[float], *, repeats: int, warmup: int,
            width_multiplier: float = 1.0, dtype=jnp.float32, estimator: str = "median"
            ) -> list[dict]:
  """One record per DP: latencies of both paths by ``estimator`` (one of
  :data:`dynscale.timing.ESTIMATORS`), their ratios to 100% DP, FLOPs ratio."""
  timing.check_estimator(estimator)  # before the model is built
  dps = sorted({float(dp) for dp in dps} | {1.0}, reverse=True)
  shape = MODELS[model_name]
  arch = models.architecture(model_name, num_classes=10, input_shape=shape, profile="linear",
                             width_multiplier=width_multiplier)
  model = models.build(arch, rngs=models.init_rngs(0), dtype=dtype)
  sliced_model = sliced.SlicedModel.from_model(model)
  graphdef, state = nnx.split(model)
  masked = jax.jit(lambda state, x, dp: nnx.merge(graphdef, state)(x, dp, train=False))
  x = jax.random.normal(jax.random.key(0), (batch, *shape), jnp.float32)
  candidates = {}
  for dp in dps:
    candidates[("sliced", dp)] = lambda dp=dp: sliced_model(x, dp)
    candidates[("masked", dp)] = lambda dp=dp: masked(state, x, jnp.float32(dp))
  stats = timing.interleaved_latencies(candidates, warmup=warmup, repeats=repeats,
                                       estimator=estimator)
  full_flops = costs.flops(arch, 1.0)
  records = []
  for dp in dps:
    s, m = stats[("sliced", dp)], stats[("masked", dp)]
    records.append({
        "model": model_name, "batch": batch, "dp": dp, "dtype": jnp.dtype(dtype).name,
        "estimator": estimator,
        "sliced_ratio": round(s["latency_s"] / stats[("sliced", 1.0)]["latency_s"], 4),
        "masked_ratio": round(m["latency_s"] / stats[("masked", 1.0)]["latency_s"], 4),
        "flops_ratio": round(costs.flops(arch, dp) / full_flops, 4),
        "sliced_ms": round(1e3 * s["latency_s"], 3), "masked_ms": round(1e3 * m["latency_s"], 3),
        "sliced_spread": round(s["spread"], 3), "masked_spread": round(m["spread"], 3),
        **timing.machine()})
  return records


def main(argv):
  del argv
  tuning = host.tune()
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  for record in measure(_MODEL.value, _BATCH.value, [float(d) for d in _DPS.value],
                        repeats=_REPEATS.value, warmup=_WARMUP.value,
                        width_multiplier=_WIDTH.value, dtype=dtype,
                        estimator=_ESTIMATOR.value):
    print(json.dumps({**record, **tuning}), flush=True)


if __name__ == "__main__":
  app.run(main)
