"""benchmarks.torch_side_by_side and its PyTorch network (run where a Python with torch exists)."""

import json
import shutil
import subprocess
import sys

import pytest

from benchmarks import torch_side_by_side
from dynscale.nn import costs, models

TORCH_PYTHON = shutil.which("python3", path="/usr/bin") or ""


def _imports_torch(python: str) -> bool:
  if not python:
    return False
  return subprocess.run([python, "-c", "import torch"], capture_output=True,
                        check=False).returncode == 0


needs_torch = pytest.mark.skipif(not _imports_torch(TORCH_PYTHON),
                                 reason="no /usr/bin/python3 with torch (python3-torch)")


@pytest.mark.skipif(_imports_torch(sys.executable), reason="this Python imports torch")
def test_a_python_without_torch_is_refused_naming_the_flag():
  with pytest.raises(ValueError, match="--torch_python .* cannot import torch"):
    torch_side_by_side.check_torch(sys.executable)
  with pytest.raises(ValueError, match="--torch_python .* cannot be run"):
    torch_side_by_side.check_torch("/nonexistent/python")


def test_a_different_network_stops_the_comparison():
  arch = models.architecture("m_cifarnet", num_classes=10, input_shape=(32, 32, 3))
  same = {"params": costs.params(arch), "flops": costs.flops(arch)}
  torch_side_by_side.check_same_network("m_cifarnet", arch, same)
  for key in same:
    with pytest.raises(RuntimeError, match="differs from dynscale's"):
      torch_side_by_side.check_same_network("m_cifarnet", arch, {**same, key: same[key] + 1})


@needs_torch
@pytest.mark.parametrize("name", ["vgg16", "resnet18", "mobilenet", "mobilenet_v2",
                                  "mobilenet_v2_imagenet", "m_cifarnet"])
def test_the_pytorch_network_has_the_zoos_parameters_and_multiply_adds(tmp_path, name):
  # every kind the zoo uses: conv (SAME, VALID), dense, flatten, maxpool, global pool,
  # separable convs, residual blocks with and without projections, inverted residuals
  arch = models.architecture(name, num_classes=10, input_shape=(32, 32, 3),
                             width_multiplier=0.25)
  path = tmp_path / "arch.json"
  path.write_text(json.dumps(arch))
  record = torch_side_by_side.torch_record(TORCH_PYTHON, str(path), batch=2, repeats=1,
                                           layout="nchw")
  assert (record["params"], record["flops"]) == (costs.params(arch), costs.flops(arch))
  assert record["train_images_per_s"] > 0 and record["infer_images_per_s"] > 0
