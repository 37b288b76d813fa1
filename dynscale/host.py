"""The host process's memory allocator, set for XLA:CPU's large, short-lived buffers.

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
"""

from __future__ import annotations

import ctypes
import os
import platform

ALLOCATOR_ENV = "DYNSCALE_ALLOCATOR"
ALLOCATORS = ("tuned", "system")
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
