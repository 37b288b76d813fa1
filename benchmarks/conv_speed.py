r"""Convolution speed against the machine: every conv shape of a network, and whole steps.

python -m benchmarks.conv_speed --models=vgg16,resnet18,mobilenet_v2 --widths=1.0,0.5,0.25 --batch=64

For every distinct convolution of each network's sliced form at each IDP
width (the shapes of its jaxpr), prints one JSON line (``"kind":
"conv"``) with the forward and forward+backward (gradients of input and
filter) rates in GFLOP/s of

* ``chosen``: :func:`dynscale.kernels.conv.conv2d` under the backend's rule
  (``implementation`` names what it picked);
* ``xla``: ``lax.conv_general_dilated`` itself;
* ``dot``: one ``jnp.dot`` of the same FLOPs, ``(B H_out W_out, kh kw C_in)
  x (kh kw C_in, C_out)``: the machine's attainable rate for this size
  (for a depthwise filter, the same number of multiply-adds as one
  elementwise product and sum over taps);
* for a first layer on RGB (a dense, non-1x1 filter on at most 4 input
  channels), also ``patches`` and ``taps``, the two forms the rule chooses
  between (:data:`FIRST_LAYER_FORMS`).

and ``chosen_over_dot``; for a depthwise filter also the milliseconds of its
filter gradient alone in each of :data:`dynscale.kernels.conv.FILTER_GRADIENT_FORMS`
(``filter_grad_frames_over_windows``) and the form the rule takes
(``filter_grad_form``). FLOPs count 2 per multiply-add over every tap
(padding included); forward+backward counts 3x the forward. Then one line
per network (``"kind": "network"``): images/s of a plain train step (SGD,
masked network at 100% DP), of sliced inference at 100% DP, and of a
program that returns gradients alone (``grad``: ``jit(grad(loss))`` of the
sliced network at 100% DP, as a user's own training loop computes them),
with every convolution under the rule (``chosen``) and forced to
``lax.conv`` (``xla``), measured in one run with interleaved rounds, and
their ratios (``train_speedup``, ``infer_speedup``, ``grad_speedup``);
and the gradient program's roofline: XLA's flops and bytes accessed
(``grad_gflop``, ``grad_gb_accessed``, ``grad_flops_per_byte``), the
machine's streaming bandwidth and matmul rate measured in the same run,
the images/s those two alone would allow (``grad_roofline_images_per_s``)
and the measured share of it (``grad_chosen_over_roofline``).
"""

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from dynscale import host, metrics, timing
from dynscale.kernels import conv
from dynscale.nn import models, sliced, spec
from dynscale.train import steps
from dynscale.train.state import create_train_state

# ``mobilenet_v2_imagenet`` at 32x32 is MobileNetV2 with Table 1's strides (final map
# 1x1, 6 M multiply-adds), the network CompactNet trims; ``mobilenet_v2`` has
# the CIFAR strides (final map 4x4, 88 M).
INPUTS = {"vgg16": (32, 32, 3), "resnet18": (32, 32, 3), "mobilenet_v2": (32, 32, 3),
          "mobilenet_v2_imagenet": (32, 32, 3), "mobilenet": (32, 32, 3),
          "m_cifarnet": (32, 32, 3)}



def conv_shapes(arch: dict, widths, batch: int, *, distinct: bool = True) -> list[dict]:
  """The convolutions of the sliced network of ``arch`` at ``widths``, in order.

  With ``distinct``, each shape once (what the sweep times).
  """
  variables = jax.eval_shape(lambda: models.build(arch, rngs=models.init_rngs(0))
                             .pure_variables())
  x = jax.ShapeDtypeStruct((batch, *arch["input_shape"]), jnp.float32)
  with conv.forced("xla"):
    jaxpr = jax.make_jaxpr(lambda v, x: sliced.apply_sliced(arch, v, x, widths))(variables, x)
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      record = {"input": list(eqn.invars[0].aval.shape),
                "filter": list(eqn.invars[1].aval.shape),
                "strides": list(eqn.params["window_strides"]),
                "padding": [list(p) for p in eqn.params["padding"]],
                "groups": int(eqn.params["feature_group_count"])}
      if not distinct or record not in shapes:
        shapes.append(record)
  return shapes


def _conv_flops(shape: dict) -> int:
  """2 x multiply-adds over every tap (padding included)."""
  b, kh, kw, c_group, m = (shape["input"][0], *shape["filter"])
  h, w = conv.output_shape(shape["input"], shape["filter"], shape["strides"],
                           shape["padding"])
  return 2 * b * h * w * kh * kw * c_group * m


def time_shape(shape: dict, repeats: int) -> dict:
  """Forward and forward+backward GFLOP/s of the chosen kernel, lax.conv and a dot."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape["input"]), jnp.float32)
  f = jnp.asarray(rng.standard_normal(shape["filter"]), jnp.float32)
  strides, padding, groups = tuple(shape["strides"]), [tuple(p) for p in shape["padding"]], \
      shape["groups"]
  flops = _conv_flops(shape)
  chosen = conv.implementation(x.shape, f.shape, strides, padding, groups)

  def fns(impl):
    def run(x, f):
      with conv.forced(impl):
        return conv.conv2d(x, f, strides, padding, groups)
    forward = jax.jit(run)
    backward = jax.jit(jax.grad(lambda x, f: jnp.sum(run(x, f)), argnums=(0, 1)))
    return (lambda: forward(x, f)), (lambda: backward(x, f))

  kh, kw, c_group, m = shape["filter"]
  h, w = conv.output_shape(x.shape, f.shape, strides, padding)
  a = jnp.asarray(rng.standard_normal((x.shape[0] * h * w, kh * kw * c_group)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((kh * kw * c_group, m)), jnp.float32)
  dot = jax.jit(lambda a, b: jnp.dot(a, b))
  dot_grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.dot(a, b)), argnums=(0, 1)))
  chosen_fwd, chosen_bwd = fns(chosen)
  xla_fwd, xla_bwd = fns("xla")
  candidates = {
      "chosen_fwd": chosen_fwd, "chosen_bwd": chosen_bwd, "xla_fwd": xla_fwd,
      "xla_bwd": xla_bwd, "dot_fwd": lambda: dot(a, b), "dot_bwd": lambda: dot_grad(a, b)}
  depthwise = chosen == "shifted"
  first_layer_forms = _first_layer_forms(f.shape, groups)
  for form in first_layer_forms:
    candidates[f"{form}_fwd"], candidates[f"{form}_bwd"] = fns(form)
  if depthwise:
    g = jnp.asarray(rng.standard_normal((x.shape[0], h, w, m)), jnp.float32)
    candidates.update({
        f"filter_grad_{form}": _filter_gradient_program(x, g, f.shape, strides, padding, form)
        for form in conv.FILTER_GRADIENT_FORMS})
  stats = timing.interleaved_latencies(candidates, warmup=1, repeats=repeats)
  timed = ("chosen", "xla", "dot", *first_layer_forms)
  rate = {f"{name}_{way}": (flops if way == "fwd" else 3 * flops)
          / stats[f"{name}_{way}"]["median_s"] / 1e9 for name in timed for way in ("fwd", "bwd")}
  record = {"kind": "conv", **shape, "implementation": chosen, "gflops": flops / 1e9,
            **{f"{name}_gflops_per_s": round(r, 3) for name, r in rate.items()},
            "chosen_over_dot_fwd": round(rate["chosen_fwd"] / rate["dot_fwd"], 3),
            "chosen_over_dot_bwd": round(rate["chosen_bwd"] / rate["dot_bwd"], 3)}
  if depthwise:
    ms = {form: stats[f"filter_grad_{form}"]["median_s"] * 1e3
          for form in conv.FILTER_GRADIENT_FORMS}
    record.update({f"filter_grad_{form}_ms": round(t, 3) for form, t in ms.items()},
                  filter_grad_frames_over_windows=round(ms["frames"] / ms["windows"], 3),
                  filter_grad_form=conv.filter_gradient_form(g.shape, strides))
  return record


FIRST_LAYER_FORMS = ("patches", "taps")


def _first_layer_forms(f_shape, groups: int) -> tuple[str, ...]:
  """The forms the rule chooses between for a first layer on RGB
  (:func:`dynscale.kernels.conv.first_layer_on_rgb`), each timed beside the
  chosen one; none for other filters."""
  return FIRST_LAYER_FORMS if conv.first_layer_on_rgb(f_shape, groups) else ()


def _filter_gradient_program(x, g, f_shape, strides, padding, form: str):
  """A zero-argument call of the depthwise filter gradient in ``form``, jitted."""
  program = jax.jit(lambda x, g: conv.depthwise_filter_gradient(
      x, g, f_shape, strides, padding, form))
  return lambda: program(x, g)


def _synthetic_batch(data, idx, key):
  """``batch_fn`` of the train chunk: a gather from resident (images, labels)."""
  del key
  images, labels = data
  return images[idx], labels[idx]


PROGRAMS = ("train", "infer", "grad")


def _sliced_loss(arch: dict):
  """``loss(variables, x, y)``: mean cross-entropy of the sliced network at 100% DP."""
  return lambda v, x, y: jnp.mean(steps.cross_entropy(sliced.apply_sliced(arch, v, x, 1.0), y))


def network_programs(arch: dict, batch: int, impl: str | None = None,
                     names: tuple[str, ...] = PROGRAMS) -> dict:
  """``{name: zero-argument call}`` for ``names`` of :data:`PROGRAMS`, the network
  of ``arch`` at ``batch`` on synthetic data, each traced (its first call) inside
  ``conv.forced(impl)`` when ``impl`` is given, else under the rule.

  ``train`` is the trainer's own step (:func:`dynscale.train.steps.make_train_chunk`,
  classification loss at 100% DP, SGD with momentum), ``infer`` the sliced
  network at 100% DP, ``grad`` ``jit(grad(loss))`` of the sliced network, a
  ``functools.partial`` of the jitted function (:func:`program_cost` reads it).
  """
  shape = tuple(arch["input_shape"])
  model = models.build(arch, rngs=models.init_rngs(0))
  tx = optax.sgd(0.01, momentum=0.9)
  graphdef, state = create_train_state(model, tx)
  data = (jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32),
          jax.random.randint(jax.random.key(2), (batch,), 0, arch["num_classes"]))
  idx = jnp.arange(batch).reshape(1, batch)
  variables = model.pure_variables()
  mesh = steps.data_mesh()
  chunk = steps.make_train_chunk(graphdef, tx, steps.classification_loss, _synthetic_batch, mesh)
  infer = jax.jit(lambda v, x: sliced.apply_sliced(arch, v, x, 1.0))
  grad = jax.jit(jax.grad(_sliced_loss(arch)))
  # the chunk donates it (variables share its buffers); placed as the chunk hands it
  # back, so that the chunk is traced once, under the block below
  holder = [steps.replicate(jax.tree.map(jnp.copy, state), mesh)]

  def train():
    holder[0], metrics = chunk(holder[0], data, idx, jax.random.key(3), jnp.float32(1.0))
    return metrics

  programs = {"train": train, "infer": lambda: infer(variables, data[0]),
              "grad": functools.partial(grad, variables, *data)}
  programs = {name: programs[name] for name in names}  # the others never compile
  with conv.forced(impl) if impl else contextlib.nullcontext():
    jax.block_until_ready([run() for run in programs.values()])  # traced under the block
  return programs


STREAM_FLOATS = 1 << 26  # 256 MiB: beyond any cache
MATMUL_SIZE = 2048


def machine_rates(repeats: int) -> dict:
  """The machine now: ``stream_gb_per_s``, one elementwise kernel over 256 MiB
  (read and write counted), and ``matmul_gflops_per_s``, a 2048^3 float32
  product, interleaved."""
  x = jnp.ones((STREAM_FLOATS,), jnp.float32)
  a = jnp.ones((MATMUL_SIZE, MATMUL_SIZE), jnp.float32)
  stream, product = jax.jit(lambda x: x * 1.5 + 1.0), jax.jit(jnp.matmul)
  stats = timing.interleaved_latencies({"stream": lambda: stream(x),
                                        "matmul": lambda: product(a, a)},
                                       warmup=1, repeats=repeats)
  return {"stream_gb_per_s": 2 * x.nbytes / stats["stream"]["median_s"] / 1e9,
          "matmul_gflops_per_s": 2 * MATMUL_SIZE ** 3 / stats["matmul"]["median_s"] / 1e9}


def program_cost(program: functools.partial) -> dict:
  """XLA's flops and bytes accessed of a program of :func:`network_programs` that
  has run (``grad``: a jitted function bound to its arguments), per call, from
  the compile it ran (no second compile)."""
  return metrics.compiled_cost(program.func.lower(*program.args).compile())


def roofline_images_per_s(batch: int, cost: dict, rates: dict) -> float:
  """Images/s of a program bound only by the machine's memory bandwidth and
  matmul rate: ``batch / max(bytes / bandwidth, flops / matmul rate)``."""
  return batch / max(cost["bytes_accessed"] / (rates["stream_gb_per_s"] * 1e9),
                     cost["flops"] / (rates["matmul_gflops_per_s"] * 1e9))


def _significant(value: float) -> float:
  """``value`` to 4 significant digits (a record of small and large networks alike)."""
  return float(f"{value:.4g}")


def time_network(name: str, batch: int, repeats: int, width_multiplier: float = 1.0) -> dict:
  """Train-step, inference and gradient images/s (:func:`network_programs`) with
  the rule and with every convolution forced to ``lax.conv``, in one run of
  interleaved rounds; then the gradient program's roofline: its XLA flops and
  bytes accessed against the machine's rates measured in the same run."""
  arch = models.architecture(name, num_classes=10, input_shape=INPUTS[name],
                             width_multiplier=width_multiplier)
  chosen, xla = network_programs(arch, batch), network_programs(arch, batch, "xla")
  stats = timing.interleaved_latencies(
      {f"{program}_{impl}": run for impl, programs in (("chosen", chosen), ("xla", xla))
       for program, run in programs.items()}, warmup=1, repeats=repeats)
  per_s = {k: batch / s["median_s"] for k, s in stats.items()}
  cost, rates = program_cost(chosen["grad"]), machine_rates(repeats)
  roofline = roofline_images_per_s(batch, cost, rates)
  return {"kind": "network", "model": name, "batch": batch,
          **{f"{k}_images_per_s": round(v, 1) for k, v in per_s.items()},
          **{f"{k}_spread": round(s["spread"], 3) for k, s in stats.items()},
          **{f"{program}_speedup": round(per_s[f"{program}_chosen"] / per_s[f"{program}_xla"], 2)
             for program in ("train", "infer", "grad")},
          "grad_gflop": _significant(cost["flops"] / 1e9),
          "grad_gb_accessed": _significant(cost["bytes_accessed"] / 1e9),
          "grad_flops_per_byte": round(cost["flops"] / cost["bytes_accessed"], 2),
          **{k: _significant(v) for k, v in rates.items()},
          "grad_roofline_images_per_s": _significant(roofline),
          "grad_chosen_over_roofline": round(per_s["grad_chosen"] / roofline, 3),
          **timing.machine()}


def _define_flags() -> None:
  """Defines the command-line flags; only when run as a script, so that tests can
  import this module next to other benchmarks with flags of the same names."""
  flags.DEFINE_list("models", ["vgg16", "resnet18", "mobilenet_v2"],
                    f"Networks, from {sorted(INPUTS)}.")
  flags.DEFINE_list("widths", ["1.0", "0.5", "0.25"], "IDP widths (DPs) of the shapes.")
  flags.DEFINE_integer("batch", 64, "Batch size.")
  flags.DEFINE_integer("repeats", 5, "Timed rounds.")
  flags.DEFINE_bool("networks", True, "Also time whole train steps and inference.")
  flags.DEFINE_bool("shapes", True, "Time every convolution shape.")


def main(argv):
  del argv
  f = flags.FLAGS
  for name in f.models:
    if name not in INPUTS:
      raise app.UsageError(f"--models entries must be in {sorted(INPUTS)}, got {name!r}")
  tuning = host.tune()
  for name in f.models:
    arch = models.architecture(name, num_classes=10, input_shape=INPUTS[name])
    if f.shapes:
      for width in f.widths:
        widths = spec.widths_at_dp(arch, float(width))
        for shape in conv_shapes(arch, widths, f.batch):
          print(json.dumps({"model": name, "width": float(width),
                            **time_shape(shape, f.repeats), **tuning}), flush=True)
    if f.networks:
      print(json.dumps({**time_network(name, f.batch, f.repeats), **tuning}),
            flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
