r"""dynscale against PyTorch on the same cores: train step and inference, whole networks.

python -m benchmarks.torch_side_by_side --models=vgg16,mobilenet_v2 --batch=64 --rounds=3

For each network, one JSON line with images/s of dynscale's train step and
sliced inference at 100% DP (:func:`benchmarks.conv_speed.network_programs`,
under the convolution rule) and of the same network in PyTorch
(:mod:`benchmarks.torch_reference`, run by ``--torch_python`` in its own
process, NCHW and channels-last), and their ratios (``train_over_torch``,
``infer_over_torch``: dynscale over the faster PyTorch layout). The two
frameworks take turns: each round times dynscale in this process, then
PyTorch in a fresh one; the figures are medians over rounds, so both see
the machine in the same states. The PyTorch network must have dynscale's
parameter count and multiply-adds, or the run stops. PyTorch is never a
dependency of dynscale: Debian's ``python3-torch`` serves (``apt-get
install python3-torch``; then ``--torch_python=/usr/bin/python3``).
"""

import json
import os
import statistics
import subprocess
import tempfile

from absl import app, flags

from benchmarks import conv_speed
from dynscale import host, timing
from dynscale.nn import costs, models

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
LAYOUTS = {"nchw": [], "channels_last": ["--channels_last"]}


def check_torch(python: str) -> str:
  """The PyTorch version ``python`` imports; a ValueError naming ``--torch_python`` if none."""
  try:
    done = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True, check=False)
  except OSError as error:
    raise ValueError(f"--torch_python {python!r} cannot be run: {error}") from error
  if done.returncode:
    raise ValueError(f"--torch_python {python!r} cannot import torch (apt-get install "
                     f"python3-torch gives /usr/bin/python3 one): {done.stderr.strip()[-300:]}")
  return done.stdout.strip()


def torch_record(python: str, arch_file: str, batch: int, repeats: int, layout: str) -> dict:
  """One run of :mod:`benchmarks.torch_reference` in its own process."""
  done = subprocess.run([python, REFERENCE, f"--arch={arch_file}", f"--batch={batch}",
                         f"--repeats={repeats}", *LAYOUTS[layout]],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"torch_reference failed on {arch_file}: {done.stderr.strip()[-500:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def check_same_network(name: str, arch: dict, record: dict) -> None:
  """PyTorch's network has dynscale's parameters and multiply-adds, or a RuntimeError."""
  ours = {"params": costs.params(arch), "flops": costs.flops(arch)}
  theirs = {key: record[key] for key in ours}
  if ours != theirs:
    raise RuntimeError(f"{name}: the PyTorch network differs from dynscale's "
                       f"(dynscale {ours}, PyTorch {theirs})")


def side_by_side(name: str, batch: int, rounds: int, repeats: int, python: str) -> dict:
  """The record of one network (module docstring)."""
  arch = models.architecture(name, num_classes=10, input_shape=conv_speed.INPUTS[name])
  programs = conv_speed.network_programs(arch, batch, names=("train", "infer"))
  per_s = {f"{framework}_{program}": [] for framework in ("dynscale", *LAYOUTS)
           for program in programs}
  with tempfile.TemporaryDirectory() as tmp:
    arch_file = os.path.join(tmp, f"{name}.json")
    with open(arch_file, "w") as f:
      json.dump(arch, f)
    for _ in range(rounds):
      stats = timing.interleaved_latencies(programs, warmup=1, repeats=repeats)
      for program, s in stats.items():
        per_s[f"dynscale_{program}"].append(batch / s["median_s"])
      for layout in LAYOUTS:
        record = torch_record(python, arch_file, batch, repeats, layout)
        check_same_network(name, arch, record)
        for program in programs:
          per_s[f"{layout}_{program}"].append(record[f"{program}_images_per_s"])
  median = {key: statistics.median(values) for key, values in per_s.items()}
  out = {"kind": "side_by_side", "model": name, "batch": batch, "rounds": rounds,
         "multiply_adds": costs.flops(arch), "params": costs.params(arch),
         "torch": record["torch"], "torch_threads": record["threads"]}
  for program in programs:
    best = max(median[f"{layout}_{program}"] for layout in LAYOUTS)
    out[f"dynscale_{program}_images_per_s"] = round(median[f"dynscale_{program}"], 1)
    for layout in LAYOUTS:
      out[f"torch_{layout}_{program}_images_per_s"] = round(median[f"{layout}_{program}"], 1)
    out[f"{program}_over_torch"] = round(median[f"dynscale_{program}"] / best, 3)
  return {**out, **timing.machine()}


def _define_flags() -> None:
  """Defines the command-line flags; only when run as a script."""
  flags.DEFINE_list("models", ["vgg16", "resnet18", "mobilenet", "mobilenet_v2"],
                    f"Networks, from {sorted(conv_speed.INPUTS)}.")
  flags.DEFINE_integer("batch", 64, "Batch size.")
  flags.DEFINE_integer("rounds", 3, "Turns each framework takes.")
  flags.DEFINE_integer("repeats", 5, "Timed calls per program and turn.")
  flags.DEFINE_string("torch_python", "/usr/bin/python3", "A Python that imports torch.")


def main(argv):
  del argv
  f = flags.FLAGS
  for name in f.models:
    if name not in conv_speed.INPUTS:
      raise app.UsageError(f"--models entries must be in {sorted(conv_speed.INPUTS)}, "
                           f"got {name!r}")
  for flag in ("batch", "rounds", "repeats"):
    if getattr(f, flag) < 1:
      raise app.UsageError(f"--{flag} must be at least 1, got {getattr(f, flag)}")
  try:
    check_torch(f.torch_python)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  tuning = host.tune()
  for name in f.models:
    print(json.dumps({**side_by_side(name, f.batch, f.rounds, f.repeats, f.torch_python),
                      **tuning}), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
