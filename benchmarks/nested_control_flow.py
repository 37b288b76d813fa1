r"""Do convolution gradients still slow down inside lax.scan and lax.cond on this backend?

python -m benchmarks.nested_control_flow --model=vgg16 --batch=16 --width_multiplier=0.5

Times, in one run with interleaved rounds, the trainer's train chunk of two
steps (:func:`dynscale.train.steps.make_train_chunk`) looped from Python
and inside one ``lax.scan``, and a TESLA stage-0 step over {100, 50, 20}%
(:func:`dynscale.tesla.multitask.sliced_loss`) that computes every task or
skips the inactive ones with ``lax.cond``. Prints one JSON line with the
step times and ``scan_over_loop`` and ``cond_over_all``: on XLA:CPU
(jax-ml/jax#12868) these decide
:func:`dynscale.train.steps.nested_control_flow_is_slow`.
"""

import json

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from dynscale import host, tesla, timing
from dynscale.nn import models
from dynscale.tesla import multitask
from dynscale.train import steps
from dynscale.train.state import create_train_state

TASKS = (1.0, 0.5, 0.2)
STEPS = 2


def _synthetic_batch(data, idx, key):
  del key
  images, labels = data
  return images[idx], labels[idx]


def measure(model_name: str, batch: int, width_multiplier: float, repeats: int) -> dict:
  """Step times of looped / scanned chunks and of all-task / cond-skipping TESLA steps."""
  arch = models.architecture(model_name, num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=width_multiplier)
  tx = optax.sgd(0.01, momentum=0.9)
  graphdef, state = create_train_state(models.build(arch, rngs=models.init_rngs(0)), tx)
  mesh = steps.data_mesh()
  data = (jax.random.normal(jax.random.key(1), (batch * STEPS, 32, 32, 3)),
          jax.random.randint(jax.random.key(2), (batch * STEPS,), 0, 10))
  idx = jnp.arange(batch * STEPS).reshape(STEPS, batch)
  stage0 = jnp.asarray(tesla.stage_coefficients(len(TASKS), 0, 0.5), jnp.float32)

  def candidate(loss_fn, task, scan):
    chunk = steps.make_train_chunk(graphdef, tx, loss_fn, _synthetic_batch, mesh, scan=scan)
    holder = [steps.replicate(jax.tree.map(jnp.copy, state), mesh)]  # compiles once

    def run():
      holder[0], metrics = chunk(holder[0], data, idx, jax.random.key(3), task)
      return metrics
    return run

  stats = timing.interleaved_latencies({
      "loop": candidate(steps.classification_loss, jnp.float32(1.0), False),
      "scan": candidate(steps.classification_loss, jnp.float32(1.0), True),
      "tesla_all": candidate(multitask.sliced_loss(TASKS, skip_inactive=False), stage0, False),
      "tesla_cond": candidate(multitask.sliced_loss(TASKS, skip_inactive=True), stage0, False),
  }, warmup=2, repeats=repeats)
  ms = {name: 1e3 * s["median_s"] / STEPS for name, s in stats.items()}
  return {"model": model_name, "batch": batch, "width_multiplier": width_multiplier,
          **{f"{name}_ms_per_step": round(v, 1) for name, v in ms.items()},
          "scan_over_loop": round(ms["scan"] / ms["loop"], 2),
          "cond_over_all": round(ms["tesla_cond"] / ms["tesla_all"], 2),
          "backend": jax.default_backend(), **timing.machine()}


def _define_flags() -> None:
  flags.DEFINE_string("model", "vgg16", "A 32x32 network of the zoo.")
  flags.DEFINE_integer("batch", 16, "Batch size.")
  flags.DEFINE_float("width_multiplier", 0.5, "Scales every hidden width.")
  flags.DEFINE_integer("repeats", 3, "Timed rounds.")


def main(argv):
  del argv
  f = flags.FLAGS
  tuning = host.tune()
  print(json.dumps({**measure(f.model, f.batch, f.width_multiplier, f.repeats),
                    **tuning}), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
