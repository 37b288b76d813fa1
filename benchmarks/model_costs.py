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

_MODEL = flags.DEFINE_enum("model", "resnet18", sorted(models.MODELS), "Network of the zoo.")
_INPUT = flags.DEFINE_integer("input", 32, "Input height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Input channels.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Classifier outputs.")
_DPS = flags.DEFINE_list("dps", ["1.0", "0.5", "0.25"], "DPs (IDP widths) to count.")


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


def main(argv):
  del argv
  for record in records(_MODEL.value, _INPUT.value, _CHANNELS.value, _CLASSES.value,
                        [float(dp) for dp in _DPS.value]):
    print(json.dumps(record))


if __name__ == "__main__":
  app.run(main)
