"""Named platforms: where a latency table is measured and a model deployed (paper 004 §3.1).

A :class:`Platform` fixes everything that changes a latency: the backend,
the batch, the input resolution, the compute dtype and, on a CPU, the
number of intra-op threads. Threads are a property of the process (XLA's
thread pools are made when JAX starts), so measurements run in a process
started for the platform: :func:`environment` gives its ``XLA_FLAGS`` and
CPU set (which the process applies to itself first thing, :func:`pin`),
:func:`check_process` refuses to measure in any other, and
:func:`run_isolated` starts such a process for a measurement module.

The flags are the platform's whichever process starts it: XLA:CPU tuned as
the launcher tunes it (:func:`dynscale.host.xla_cpu_flags`: convolutions
out of YNNPACK), then the thread flags. Until 2026-12-06 a platform's
process took its parent's ``XLA_FLAGS``, so what the launcher measured
(tuned) and what the CompactNet benchmarks measured (which did not tune:
YNNPACK's convolutions) ran under two XLA:CPUs; a table records its flags
(:func:`describe`) and one measured under others is refused
(:func:`dynscale.compactnet.latency.check_matches`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile

from dynscale import host

DTYPES = ("float32", "bfloat16")
_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"
_CPUS_VARIABLE = "DYNSCALE_CPUS"


@dataclasses.dataclass(frozen=True)
class Platform:
  """backend: ``jax.default_backend()``; batch, resolution (``H = W``), dtype:
  of the measured forward; threads: intra-op CPU threads (None: the
  backend's default)."""

  name: str
  backend: str
  batch: int
  resolution: int
  dtype: str
  threads: int | None


PLATFORMS: dict[str, Platform] = {p.name: p for p in (
    Platform("cpu-b64", "cpu", 64, 32, "float32", 1),
    Platform("cpu-b1", "cpu", 1, 32, "float32", 1),
    Platform("cpu-b64-bf16", "cpu", 64, 32, "bfloat16", 1),
    Platform("gpu-b64", "gpu", 64, 32, "float32", None),
    Platform("gpu-b1", "gpu", 1, 32, "float32", None),
    Platform("gpu-b64-bf16", "gpu", 64, 32, "bfloat16", None),
)}


def get(name: str, field: str = "platform") -> Platform:
  """The platform called ``name``; the error names ``field`` and the known names."""
  if name not in PLATFORMS:
    raise ValueError(f"{field} must be one of {sorted(PLATFORMS)}, got {name!r}")
  return PLATFORMS[name]


def environment(platform: Platform, base: dict | None = None) -> dict:
  """The environment variables of a process for ``platform``.

  On a CPU with ``threads`` set: XLA:CPU tuned (:func:`dynscale.host.xla_cpu_flags`
  of ``base``) with single-threaded Eigen, on the first ``threads`` CPUs this
  process may use (applied by :func:`pin` in the new process). XLA:CPU sizes
  its intra-op thread pool by the CPUs its process may use, so the CPU set
  is what fixes the thread count; no flag does. (Until 2026-12-07 the flags
  also held ``intra_op_parallelism_threads=1``, a TensorFlow setting without
  ``--`` that XLA took for a stray argument and ignored:
  :func:`dynscale.host.xla_flags_read`.)
  """
  env = dict(os.environ if base is None else base)
  if platform.backend != "cpu" or platform.threads is None:
    return env
  env["XLA_FLAGS"] = f"{host.xla_cpu_flags(env)[0]} {_THREAD_FLAGS}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env[_CPUS_VARIABLE] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:platform.threads])
  return env


def pin() -> None:
  """Restricts this process to the CPUs :func:`environment` chose, if any; call it
  before JAX computes anything (its thread pools start on the first use)."""
  cpus = os.environ.get(_CPUS_VARIABLE)
  if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def check_process(platform: Platform) -> None:
  """Raises unless this process is set up for ``platform`` (:func:`environment`)."""
  import jax  # here, so that importing this module never starts JAX

  if jax.default_backend() != platform.backend:
    raise ValueError(f"platform {platform.name!r} runs on {platform.backend!r}, this process "
                     f"on {jax.default_backend()!r}")
  if platform.backend == "cpu" and platform.threads is not None:
    cpus = len(os.sched_getaffinity(0))
    if _THREAD_FLAGS not in os.environ.get("XLA_FLAGS", "") or cpus != platform.threads:
      raise ValueError(
          f"platform {platform.name!r} needs {platform.threads} thread(s): start the process "
          f"with XLA_FLAGS containing {_THREAD_FLAGS!r} on {platform.threads} CPU(s) "
          f"(this one has {cpus}); run_isolated does this")


def describe(platform: Platform) -> dict:
  """Provenance of the current process for ``platform``: device, versions, flags,
  date and load."""
  import jax
  import jaxlib

  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "platform": dataclasses.asdict(platform), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "cpus": sorted(os.sched_getaffinity(0)), "load_1min": os.getloadavg()[0]}


def run_isolated(platform: Platform, module: str, request: dict, *, timeout: float = 3600.0
                 ) -> dict:
  """Runs ``python -m module REQUEST.json RESULT.json`` in a process set up for
  ``platform`` and returns the result it wrote (a JSON object)."""
  env = environment(platform)
  with tempfile.TemporaryDirectory() as tmp:
    request_path, result_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
    with open(request_path, "w") as f:
      json.dump(request, f)
    done = subprocess.run(
        [sys.executable, "-m", module, request_path, result_path], env=env,
        capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
      raise RuntimeError(f"{module} on platform {platform.name!r} failed "
                         f"(exit {done.returncode}):\n{done.stderr[-4000:]}")
    with open(result_path) as f:
      return json.load(f)
