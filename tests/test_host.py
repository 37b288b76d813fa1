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


# In a fresh process: tune, then compile a 3x3 convolution and say whether XLA:CPU put it
# in a YNNPACK fusion (its default) or emitted its own.
XLA_PROBE = """
import json, os
from dynscale import host
record = host.tune_xla_cpu()
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 64))).compile().as_text()
print(json.dumps({"record": record, "flags": os.environ.get("XLA_FLAGS", ""),
                  "conv_in_ynn": "ynn_fusion" in hlo}))
"""


def _xla_probe(**env) -> dict:
  env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", host.XLA_CPU_ENV)},
         "JAX_PLATFORMS": "cpu", **env}
  out = subprocess.run([sys.executable, "-c", XLA_PROBE], env=env, capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_xla_cpu_takes_convolutions_out_of_ynnpack():
  tuned, system = _xla_probe(), _xla_probe(**{host.XLA_CPU_ENV: "system"})
  assert tuned["record"] == {"xla_cpu": "tuned", "flags": " ".join(host.XLA_CPU_FLAGS)}
  assert system["record"]["xla_cpu"] == "system" and system["flags"] == ""
  assert system["conv_in_ynn"] and not tuned["conv_in_ynn"]  # the probe tells them apart
  for probe in (tuned, system):  # the convolution rule's reading of the flags agrees with XLA
    assert host.ynnpack_convolutions(probe["flags"]) == probe["conv_in_ynn"]


def test_xla_flags_that_set_ynn_fusions_are_left_alone():
  own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  probe = _xla_probe(XLA_FLAGS=own)
  assert probe["record"]["xla_cpu"] == "system" and probe["flags"] == own
  assert not probe["conv_in_ynn"] and not host.ynnpack_convolutions(own)


@pytest.mark.parametrize("edits", [("-individual_convolution", "+individual_dot"),
                                   ("-individual_convolution", "individual_dot")])
def test_the_reading_of_repeated_ynn_fusion_flags_agrees_with_xla(edits):
  """Each repeated ``--xla_cpu_experimental_ynn_fusion_type`` edits the list left
  by the ones before it: after ``-individual_convolution``, ``+individual_dot``
  keeps convolutions out of YNNPACK. Catches the last flag read alone (it
  said they were in)."""
  flags = " ".join(f"--xla_cpu_experimental_ynn_fusion_type={edit}" for edit in edits)
  probe = _xla_probe(XLA_FLAGS=flags)
  assert host.ynnpack_convolutions(flags) == probe["conv_in_ynn"] is False


def test_a_process_started_with_the_tuned_flags_records_them_as_tuned():
  """A tuned parent's child inherits its ``XLA_FLAGS``: its record says tuned,
  and the flags are not added twice. Catches it recorded as the system's."""
  parent = _xla_probe()
  child = _xla_probe(XLA_FLAGS=parent["flags"])
  assert child["record"] == parent["record"] and child["record"]["xla_cpu"] == "tuned"
  assert child["flags"] == parent["flags"] and not child["conv_in_ynn"]
  undone = f"{parent['flags']} --xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  assert host.xla_cpu_flags({"XLA_FLAGS": undone}) == (
      undone, {"xla_cpu": "system",
               "reason": "XLA_FLAGS sets --xla_cpu_experimental_ynn_fusion_type"})


def test_a_ynn_fusion_flag_anywhere_in_xla_flags_is_left_alone():
  """Without starting XLA: the flags of a process whose ``XLA_FLAGS`` set the
  fusion types after other flags are those flags, untouched."""
  own = "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type=individual_dot"
  flags, record = host.xla_cpu_flags({"XLA_FLAGS": own})
  assert flags == own and record["xla_cpu"] == "system"
  flags, record = host.xla_cpu_flags({"XLA_FLAGS": "--xla_dump_to=/tmp/x"})
  assert flags.split() == ["--xla_dump_to=/tmp/x", *host.XLA_CPU_FLAGS]
  assert record["xla_cpu"] == "tuned"


def test_only_double_dash_entries_are_flags_xla_reads():
  assert host.xla_flags_read("--a=1 -b=2 c=3 --d") == ["--a=1", "--d"]


def test_unknown_xla_cpu_choice_is_refused(monkeypatch):
  monkeypatch.setenv(host.XLA_CPU_ENV, "fast")
  with pytest.raises(ValueError, match="DYNSCALE_XLA_CPU must be one of"):
    host.tune_xla_cpu()
