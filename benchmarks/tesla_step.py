r"""Cost of one TESLA train step (000 Eq. 3): sliced multi-task against one task.

python -m benchmarks.tesla_step --model=vgg16 --batch=256 --tasks=1.0,0.5,0.2 [--stage=0]

Times four jitted train steps (forward, backward and SGD-momentum update,
buffers donated), each built by :func:`dynscale.train.steps.make_train_chunk`
over synthetic device-resident data exactly as the trainer runs them:

* ``single``: :func:`dynscale.train.steps.classification_loss` at DP 1.0,
  the plain train step of one task;
* ``tesla_sliced``: :func:`dynscale.tesla.multitask.sliced_loss` with the
  coefficients of TESLA stage ``stage`` (by default the last, where every
  task is active), each task at its sliced size: the run-time step, which
  on XLA:CPU computes every task, active or not (below);
* ``tesla_stage``: the same loss built for the stage's active tasks only
  (``sliced_loss(..., active=...)``), the step
  :func:`dynscale.tesla.training.stage_trainer` trains with on XLA:CPU;
  at the last stage it is ``tesla_sliced``;
* ``tesla_masked``: :func:`dynscale.tesla.multitask.masked_loss` with the
  same coefficients, every task through the full masked network.

They are measured in one run with interleaved rounds
(:func:`dynscale.timing.interleaved_latencies`). Prints one JSON line with
images per second of each, ``tesla_over_single``, ``stage_over_single`` and
``masked_over_single`` (median step time over that of ``single``),
``flops_over_single``, the analytic forward cost ``sum_k flops(p_k) /
flops(1)`` over every task (:func:`dynscale.nn.costs.flops`), the ideal the
sliced step approaches, and ``stage_flops_over_single``, the same sum over
the stage's active tasks.

On XLA:CPU, convolution gradients inside a nested computation (a
``lax.scan`` body, a ``lax.cond`` branch) run many times slower
(jax-ml/jax#12868), so there the trainer, and this benchmark with it, loops
over single steps and computes every TESLA task instead of skipping inactive
ones (:func:`dynscale.train.steps.nested_control_flow_is_slow`); ``tesla_stage``
measures what leaving the inactive tasks out of the step saves there.
"""

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from dynscale import host, tesla, timing
from dynscale.nn import costs, models
from dynscale.tesla import multitask
from dynscale.train import steps
from dynscale.train.state import create_train_state

MODELS = {"vgg16": (32, 32, 3), "mobilenet": (32, 32, 3), "tesla_mlp": (28, 28, 1),
          "mlp": (28, 28, 1)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ALPHA = 0.5  # TESLA's aggregation coefficient; any value in (0, 1) makes every task active
CANDIDATES = ("single", "tesla_sliced", "tesla_stage", "tesla_masked")


def flops_over_single(arch: dict, tasks: Sequence[float]) -> float:
  """``sum_k flops(arch, p_k) / flops(arch, 1)``: the ideal cost of a TESLA step."""
  return sum(costs.flops(arch, dp) for dp in tasks) / costs.flops(arch, 1.0)


def _check(model_name: str, batch: int, steps_per_call: int) -> None:
  if model_name not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {model_name!r}")
  for field, value in (("batch", batch), ("steps_per_call", steps_per_call)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{field} must be a positive int, got {value!r}")


def _synthetic_batch(data, idx, key):
  """``batch_fn`` of the train chunk: a gather from resident (images, labels)."""
  del key
  images, labels = data
  return images[idx], labels[idx]


def measure(model_name: str, batch: int, tasks: Sequence[float], *, repeats: int,
            warmup: int, width_multiplier: float = 1.0, dtype=jnp.float32,
            steps_per_call: int = 1, stage: int | None = None) -> dict:
  """One record: step times of the single, sliced-TESLA (run-time and per-stage)
  and masked-TESLA train steps at TESLA stage ``stage`` (default: the last).

  Every step is ``steps_per_call`` optimizer steps of ``batch`` synthetic
  examples in one jitted call; each candidate trains its own copy of the
  state (donated, so it is threaded from call to call).
  """
  _check(model_name, batch, steps_per_call)
  tasks = tesla.check_tasks(tasks)
  stage = len(tasks) - 1 if stage is None else stage
  coefficients = jnp.asarray(tesla.stage_coefficients(len(tasks), stage, ALPHA), jnp.float32)
  active = tesla.active_tasks(coefficients)
  shape = MODELS[model_name]
  arch = models.architecture(model_name, num_classes=10, input_shape=shape, profile="linear",
                             width_multiplier=width_multiplier)
  model = models.build(arch, rngs=models.init_rngs(0), dtype=dtype)
  tx = optax.sgd(0.01, momentum=0.9)
  graphdef, state = create_train_state(model, tx)
  mesh = steps.data_mesh()
  image_key, label_key = jax.random.split(jax.random.key(1))
  num_examples = batch * steps_per_call
  data = (jax.random.normal(image_key, (num_examples, *shape), jnp.float32).astype(dtype),
          jax.random.randint(label_key, (num_examples,), 0, arch["num_classes"]))
  idx = jnp.arange(num_examples).reshape(steps_per_call, batch)
  setups = {"single": (steps.classification_loss, jnp.float32(1.0)),
            "tesla_sliced": (multitask.sliced_loss(tasks), coefficients),
            "tesla_stage": (multitask.sliced_loss(tasks, active=active), coefficients),
            "tesla_masked": (multitask.masked_loss(tasks), coefficients)}

  def candidate(loss_fn, task):
    chunk = steps.make_train_chunk(graphdef, tx, loss_fn, _synthetic_batch, mesh)
    holder = [steps.replicate(jax.tree.map(jnp.copy, state), mesh)]  # compiles once
    key = jax.random.key(2)

    def run():
      holder[0], metrics = chunk(holder[0], data, idx, key, task)
      return holder[0], metrics
    return run

  stats = timing.interleaved_latencies(
      {name: candidate(*setups[name]) for name in CANDIDATES}, warmup=warmup, repeats=repeats)
  step_s = {name: stats[name]["median_s"] / steps_per_call for name in CANDIDATES}
  record = {"model": model_name, "batch": batch, "tasks": list(tasks), "stage": stage,
            "coefficients": [round(float(c), 4) for c in coefficients],
            "dtype": jnp.dtype(dtype).name, "width_multiplier": width_multiplier,
            "steps_per_call": steps_per_call}
  for name in CANDIDATES:
    record[f"{name}_images_per_s"] = round(batch / step_s[name], 2)
  for name in CANDIDATES:
    record[f"{name}_ms"] = round(1e3 * step_s[name], 3)
  record.update({
      "tesla_over_single": round(step_s["tesla_sliced"] / step_s["single"], 4),
      "stage_over_single": round(step_s["tesla_stage"] / step_s["single"], 4),
      "masked_over_single": round(step_s["tesla_masked"] / step_s["single"], 4),
      "flops_over_single": round(flops_over_single(arch, tasks), 4),
      "stage_flops_over_single": round(
          flops_over_single(arch, [tasks[k] for k in active]), 4),
      **{f"{name}_spread": round(stats[name]["spread"], 3) for name in CANDIDATES},
      **timing.machine(), "cpu_count": os.cpu_count(),
  })
  return record


def _define_flags() -> None:
  """Defines the command-line flags; only when run as a script, so that tests can
  import :func:`measure` next to other benchmarks with flags of the same names."""
  flags.DEFINE_enum("model", "vgg16", list(MODELS), "Network of the model zoo.")
  flags.DEFINE_integer("batch", 256, "Batch size.")
  flags.DEFINE_list("tasks", ["1.0", "0.5", "0.2"], "TESLA task DPs, decreasing.")
  flags.DEFINE_integer("repeats", 10, "Timed rounds (every step once each).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls per step (compilation).")
  flags.DEFINE_float("width_multiplier", 1.0, "Scales every hidden width.")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype.")
  flags.DEFINE_integer("steps_per_call", 1, "Train steps per jitted call (lax.scan).")
  flags.DEFINE_integer("stage", None, "0-based TESLA stage whose coefficients the steps "
                       "use; default the last (every task active).")


def main(argv):
  del argv
  f = flags.FLAGS
  tuning = host.tune()
  record = measure(f.model, f.batch, [float(t) for t in f.tasks], repeats=f.repeats,
                   warmup=f.warmup, width_multiplier=f.width_multiplier,
                   dtype=DTYPES[f.dtype], steps_per_call=f.steps_per_call,
                   stage=f.stage)
  print(json.dumps({**record, **tuning}), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
