r"""Where a sliced network's time goes, layer by layer, from a conv_speed sweep.

python -m benchmarks.conv_time_by_layer --sweep=conv_speed.jsonl --model=vgg16 --dps=0.5,0.25
python -m benchmarks.conv_time_by_layer --sweep=S --model=vgg16 --width_multiplier=0.25 --dps=0.7,0.5 --batch=128

Reads the per-shape records of ``benchmarks.conv_speed`` and, for every
convolution of the sliced network at each DP (with repeats, which the
sweep counts once), adds its GFLOPs over the chosen kernel's forward rate.
DPs are of the network at ``--width_multiplier``; the sweep must cover its
widths as fractions of the full network (``conv_speed --widths=0.25,0.175``
for x0.25 at 100% and 70% DP).
Prints one JSON line per DP: the predicted convolution time, its ratio to
100% DP, and the FLOPs ratio of the convolutions. A measured latency ratio
above the predicted one is time outside the convolutions (batch norm,
activations, pooling, dispatch); below it, fusion inside the whole network
that the isolated shapes do not have.
"""

import json

from absl import app, flags

from benchmarks.conv_speed import INPUTS, conv_shapes
from dynscale.nn import models, spec


def _key(record: dict) -> tuple:
  return (tuple(record["input"]), tuple(record["filter"]), tuple(record["strides"]),
          record["groups"])


def predict(sweep: list[dict], model: str, dps: list[float], batch: int,
            width_multiplier: float = 1.0) -> list[dict]:
  """Predicted convolution time and FLOPs at each DP and their ratios to 100%."""
  rates = {_key(r): (r["gflops"], r["chosen_fwd_gflops_per_s"]) for r in sweep
           if r.get("kind") == "conv" and r.get("model") == model}
  arch = models.architecture(model, num_classes=10, input_shape=INPUTS[model],
                             width_multiplier=width_multiplier)
  totals = {}
  for dp in sorted(set(dps) | {1.0}, reverse=True):
    shapes = conv_shapes(arch, spec.widths_at_dp(arch, dp), batch, distinct=False)
    missing = [s for s in shapes if _key(s) not in rates]
    if missing:
      raise ValueError(f"--sweep has no record of {model} convolution {missing[0]} at dp {dp}: "
                       f"run benchmarks.conv_speed at width {width_multiplier * dp:g} and "
                       f"batch {batch} first")
    gflops = sum(rates[_key(s)][0] for s in shapes)
    seconds = sum(rates[_key(s)][0] / rates[_key(s)][1] for s in shapes)
    totals[dp] = (seconds, gflops)
  return [{"model": model, "width_multiplier": width_multiplier, "dp": dp,
           "predicted_conv_ms": round(1e3 * s, 1),
           "predicted_conv_ratio": round(s / totals[1.0][0], 3),
           "conv_flops_ratio": round(g / totals[1.0][1], 3)}
          for dp, (s, g) in totals.items()]


def _define_flags() -> None:
  flags.DEFINE_string("sweep", None, "JSON lines written by benchmarks.conv_speed.")
  flags.DEFINE_string("model", "vgg16", f"A network of the sweep, from {sorted(INPUTS)}.")
  flags.DEFINE_list("dps", ["0.5", "0.25"], "DPs (at widths the sweep covered).")
  flags.DEFINE_integer("batch", 64, "The sweep's batch size.")
  flags.DEFINE_float("width_multiplier", 1.0, "The network's width; DPs are of it.")
  flags.mark_flag_as_required("sweep")


def main(argv):
  del argv
  f = flags.FLAGS
  with open(f.sweep) as lines:
    sweep = [json.loads(line) for line in lines if line.strip()]
  for record in predict(sweep, f.model, [float(dp) for dp in f.dps], f.batch,
                        f.width_multiplier):
    print(json.dumps(record))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
