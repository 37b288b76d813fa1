"""The tuned allocator keeps large freed blocks: reusing them faults in no new pages."""

import json
import os
import subprocess
import sys

import pytest

from dynscale import host

# In a worker thread (as XLA:CPU's), allocate, touch and free 64 MiB blocks; print the
# page faults of the last rounds. glibc's defaults map and unmap each block afresh.
PROBE = """
import ctypes, json, resource, sys, threading
from dynscale import host
record = host.tune_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size, faults = 64 << 20, []
def rounds():
  for i in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start(); worker.join()
print(json.dumps({"record": record, "faults": faults[1:]}))
"""


def _probe(allocator: str) -> dict:
  env = {**os.environ, host.ALLOCATOR_ENV: allocator}
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_tuned_allocator_reuses_large_blocks():
  pages = (64 << 20) // 4096
  tuned, system = _probe("tuned"), _probe("system")
  assert tuned["record"] == {"allocator": "tuned", "arena_max": 1, "mmap_max": 0,
                             "trim_threshold": -1}
  assert system["record"]["allocator"] == "system"
  assert max(tuned["faults"]) < pages // 100
  assert min(system["faults"]) > pages // 2  # the probe can tell the two apart


def test_unknown_allocator_is_refused(monkeypatch):
  monkeypatch.setenv(host.ALLOCATOR_ENV, "jemalloc")
  with pytest.raises(ValueError, match="DYNSCALE_ALLOCATOR must be one of"):
    host.tune_allocator()
