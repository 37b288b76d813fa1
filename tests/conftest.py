"""Shared test helpers."""

import hashlib
import io
import json
import lzma
import os
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the suite, its pytest-xdist workers
# and the launcher runs they start as subprocesses: a kill-and-resume test
# compiles the same train step three times otherwise. Entries are keyed by the
# program, the options and the jax version, so a stale one is never used. Set
# before jax is imported (this module imports it nowhere).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "dynscale-tests-jax-cache-"
    + hashlib.sha256(ROOT.encode()).hexdigest()[:12]))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# LLVM's optimisation of XLA:CPU code costs the tests more compile time than
# their tiny shapes win back at run time (a SANP launcher run: 126 s -> 106 s;
# the suite 16 -> 11 minutes). Only rounding changes.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()


# The modules that take longest (over 50 s each, summed over their tests, in
# a `--junitxml` run of the suite on two cores, 2026-12-07), longest first. A
# worker takes one module at a time (`--dist loadfile`), so a long module
# handed out last keeps one worker busy while the other idles; pytest-xdist
# would order modules by their number of tests (`--no-loadscope-reorder` in
# pyproject.toml keeps this order).
LONGEST_MODULES_FIRST = (
    "test_protocols.py", "test_sanp_training.py", "test_notebooks.py",
    "test_tesla_training.py", "test_train.py", "test_compactnet.py", "test_nn_core.py",
    "test_sanp_inference.py", "test_kernels_conv.py", "test_idp_training.py",
    "test_compactnet_training.py")


def pytest_collection_modifyitems(items):
  """Runs the modules of ``LONGEST_MODULES_FIRST`` first, in that order; the
  others, and the tests inside each module, keep their collection order."""
  missing = [name for name in LONGEST_MODULES_FIRST
             if not os.path.exists(os.path.join(ROOT, "tests", name))]
  if missing:
    raise pytest.UsageError(f"LONGEST_MODULES_FIRST in tests/conftest.py names no module "
                            f"{missing}: rename or remove them there")
  rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _straight_and_resumed(tmp_path, command, checkpoint: str, *also_there: str):
  """Results of ``command`` run straight, and run, SIGKILLed, then run again.

  The kill comes as soon as ``checkpoints/<checkpoint>`` exists (an epoch
  inside some stage); ``also_there``: paths under the killed workdir that must
  exist by then. The rerun must say it resumed that stage.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(command(straight), cwd=ROOT, env=env, check=True, capture_output=True)
  marker = killed / "checkpoints" / checkpoint
  process = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not marker.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  assert not (killed / "results.json").exists()
  for path in also_there:
    assert (killed / path).exists(), path
  rerun = subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True)
  stage = checkpoint.split("/")[0]
  assert f"Resumed stage {stage!r}" in rerun.stderr
  return read_results(straight), read_results(killed)


@pytest.fixture
def straight_and_resumed():
  """``straight_and_resumed(tmp_path, command, checkpoint, *also_there)``: the results
  of a launcher command run straight, and run, SIGKILLed, then run again."""
  return _straight_and_resumed


def write_fake_cifar(directory, name: str, num_classes: int) -> None:
  """Random images in the ``<name>_uint8.npz.xz`` layout: two per class to
  train on plus a few, and a small test split."""
  rng = np.random.default_rng(0)
  num_train, num_test = 2 * num_classes + 24, 20
  arrays = {"x_train": rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
            "y_train": np.arange(num_train) % num_classes,
            "x_test": rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
            "y_test": np.arange(num_test) % num_classes}
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  (directory / f"{name}_uint8.npz.xz").write_bytes(lzma.compress(buffer.getvalue()))


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
  """A directory with small random CIFAR-10 and CIFAR-100 files."""
  directory = tmp_path_factory.mktemp("cifar")
  write_fake_cifar(directory, "cifar10", 10)
  write_fake_cifar(directory, "cifar100", 100)
  return directory

