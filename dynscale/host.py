"""The host process, set up for XLA:CPU: its memory allocator and its convolutions.

Each execution of a compiled XLA:CPU program allocates its temporary
buffers and frees them at the end. glibc serves an allocation above its
mmap threshold (at most 32 MiB), or one too large for a worker thread's
arena heap (64 MiB), with a fresh ``mmap`` and returns it with ``munmap``
on free; the next execution touches new pages again, and the kernel
faults in and zeroes every 4 KiB of them. A MobileNetV2 train step at
batch 64 on CIFAR faulted in about 2.5 GB per step that way, and half of
the step was system time (RESULTS.md, issue 9).

:func:`tune_allocator` keeps that memory in the process instead, through
``mallopt`` (glibc only): one arena (so every thread's buffers come from
the main heap, which grows without a size limit), no ``mmap`` for large
blocks, and no trimming of the heap's free top. The price: the process
keeps its peak heap until it exits. Call it before the first XLA
computation (the launcher and the benchmarks do); ``DYNSCALE_ALLOCATOR=system``
leaves glibc's defaults.

XLA:CPU (jax 0.10) hands every convolution to YNNPACK by default, which
ran a 3x3 convolution on 32x32x64 at batch 64 at half the rate of XLA's
own (Eigen) convolution (136 against 269 GFLOP/s; RESULTS.md, issue 9).
:func:`tune_xla_cpu` takes convolutions out of YNNPACK's fusions (its
products and reductions stay) through ``XLA_FLAGS``, which XLA reads when
JAX starts its CPU backend: call it before the first JAX computation.
``DYNSCALE_XLA_CPU=system`` leaves XLA's defaults, and ``XLA_FLAGS`` that
already set YNNPACK's fusion types are left as they are (a process started
with the tuned flags, a tuned parent's child, is recorded as tuned).
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

ALLOCATOR_ENV = "DYNSCALE_ALLOCATOR"
ALLOCATORS = ("tuned", "system")
XLA_CPU_ENV = "DYNSCALE_XLA_CPU"
XLA_CPU_CHOICES = ("tuned", "system")
_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
XLA_CPU_FLAGS = (f"{_YNN_FUSION_FLAG}=-individual_convolution",)
# mallopt parameters (glibc malloc.h) and the values tune_allocator sets
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = {"arena_max": (_M_ARENA_MAX, 1),
            "mmap_max": (_M_MMAP_MAX, 0),
            "trim_threshold": (_M_TRIM_THRESHOLD, -1)}  # -1 reads as SIZE_MAX: never trim


def tune_allocator() -> dict:
  """Applies :data:`SETTINGS` with glibc's ``mallopt``; returns what was done.

  The record (``{"allocator": "tuned", **settings}`` or ``{"allocator":
  "system", "reason": ...}``) belongs in a benchmark's output, since it
  changes what a timing means.
  """
  choice = os.environ.get(ALLOCATOR_ENV, "tuned")
  if choice not in ALLOCATORS:
    raise ValueError(f"{ALLOCATOR_ENV} must be one of {ALLOCATORS}, got {choice!r}")
  if choice == "system":
    return {"allocator": "system", "reason": f"{ALLOCATOR_ENV}=system"}
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return {"allocator": "system", "reason": "not glibc"}
  libc = ctypes.CDLL("libc.so.6")
  for name, (parameter, value) in SETTINGS.items():
    if libc.mallopt(parameter, value) != 1:
      raise OSError(f"mallopt refused {name}={value}")
  return {"allocator": "tuned", **{name: value for name, (_, value) in SETTINGS.items()}}


def xla_cpu_flags(env: Mapping[str, str]) -> tuple[str, dict]:
  """The ``XLA_FLAGS`` of a process started with environment ``env`` once its
  XLA:CPU is tuned (module docstring: :data:`XLA_CPU_FLAGS` added unless
  ``env`` says otherwise), and the record of what was done:
  ``{"xla_cpu": "tuned", "flags": ...}`` or ``{"xla_cpu": "system", "reason": ...}``."""
  choice = env.get(XLA_CPU_ENV, "tuned")
  if choice not in XLA_CPU_CHOICES:
    raise ValueError(f"{XLA_CPU_ENV} must be one of {XLA_CPU_CHOICES}, got {choice!r}")
  current = env.get("XLA_FLAGS", "")
  if choice == "system":
    return current, {"xla_cpu": "system", "reason": f"{XLA_CPU_ENV}=system"}
  if set(XLA_CPU_FLAGS) <= set(current.split()) and not ynnpack_convolutions(current):
    # tuned already (a tuned parent's child)
    return current, {"xla_cpu": "tuned", "flags": " ".join(XLA_CPU_FLAGS)}
  if _YNN_FUSION_FLAG in current:
    return current, {"xla_cpu": "system", "reason": f"XLA_FLAGS sets {_YNN_FUSION_FLAG}"}
  return (" ".join([current, *XLA_CPU_FLAGS]).strip(),
          {"xla_cpu": "tuned", "flags": " ".join(XLA_CPU_FLAGS)})


def tune_xla_cpu() -> dict:
  """Sets this process's ``XLA_FLAGS`` to :func:`xla_cpu_flags` of its
  environment; returns the record, for a benchmark's output."""
  flags, record = xla_cpu_flags(os.environ)
  if flags != os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = flags
  return record


def ynnpack_convolutions(xla_flags: str | None = None) -> bool:
  """Whether XLA:CPU hands convolutions to YNNPACK under ``xla_flags`` (default:
  this process's ``XLA_FLAGS``): its default list does; each
  ``--xla_cpu_experimental_ynn_fusion_type`` given, in order, changes the
  list so far (a list of names replaces it, ``+name`` / ``-name`` entries
  edit it)."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  convolutions = True
  for token in flags.split():
    if not token.startswith(f"{_YNN_FUSION_FLAG}="):
      continue
    entries = [entry for entry in token.split("=", 1)[1].split(",") if entry]
    if entries and all(entry[0] in "+-" for entry in entries):
      for entry in entries:
        if entry[1:] == "individual_convolution":
          convolutions = entry[0] == "+"
    else:
      convolutions = "individual_convolution" in entries
  return convolutions


def xla_flags_read(xla_flags: str) -> list[str]:
  """The entries of ``xla_flags`` that XLA reads: those starting with ``--``
  (XLA stops on an unknown one; it ignores a token without the dashes)."""
  return [token for token in xla_flags.split() if token.startswith("--")]


def tune() -> dict:
  """:func:`tune_allocator` and :func:`tune_xla_cpu`, before the first JAX
  computation; returns ``{"allocator": ..., "xla_cpu": ...}`` ("tuned" or
  "system" each), what a benchmark's record says of its process."""
  return {"allocator": tune_allocator()["allocator"], "xla_cpu": tune_xla_cpu()["xla_cpu"]}
