r"""Analytic FLOPs and parameters of a zoo network, at full width and at DPs.

python -m benchmarks.model_costs --model=resnet18
python -m benchmarks.model_costs --model=mobilenet_v2_imagenet --input=224 --classes=1000

Prints one JSON line per DP: multiply-adds (one multiply-add = one FLOP,
SANP's ``H W (C_in k^2 + b) C_out``, :func:`dynscale.nn.costs.flops`), the
parameters the sliced network uses, and both as ratios to 100% DP. Counts,
not timings: they do not depend on the machine.
"""

import json

from absl import app, flags

from dynscale.nn import costs, models



def records(model: str, input_size: int, channels: int, classes: int,
            dps: list[float]) -> list[dict]:
  """One record per DP: FLOPs and parameters, and their ratios to 100% DP."""
  arch = models.architecture(model, num_classes=classes,
                             input_shape=(input_size, input_size, channels))
  full_flops, full_params = costs.flops(arch), costs.params(arch)
  out = []
  for dp in dps:
    f, p = costs.flops(arch, float(dp)), costs.params(arch, float(dp))
    out.append({"model": model, "input": [input_size, input_size, channels], "dp": float(dp),
                "flops": f, "params": p, "flops_ratio": f / full_flops,
                "params_ratio": p / full_params})
  return out


def _define_flags() -> None:
  """Defines the command-line flags; only when run as a script, so that tests can
  import :func:`records` next to other benchmarks with flags of the same names."""
  flags.DEFINE_enum("model", "resnet18", sorted(models.MODELS), "Network of the zoo.")
  flags.DEFINE_integer("input", 32, "Input height and width.")
  flags.DEFINE_integer("channels", 3, "Input channels.")
  flags.DEFINE_integer("classes", 10, "Classifier outputs.")
  flags.DEFINE_list("dps", ["1.0", "0.5", "0.25"], "DPs (IDP widths) to count.")


def main(argv):
  del argv
  f = flags.FLAGS
  for record in records(f.model, f.input, f.channels, f.classes, [float(dp) for dp in f.dps]):
    print(json.dumps(record))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
