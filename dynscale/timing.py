"""Latency measurement: warm-up, ``block_until_ready``, interleaved repeats.

Candidates are timed in rounds (each round runs every candidate once, in
order), so that slow drifts of a noisy machine hit all of them alike and
the ratios between them stay meaningful.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import jax
import numpy as np


def _run_once(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleaved_latencies(candidates: Mapping[str, Callable[[], object]], *, warmup: int = 2,
                          repeats: int = 10) -> dict[str, dict[str, float]]:
  """Median and spread (IQR / median) of each zero-argument candidate, in seconds.

  Every candidate runs ``warmup`` times first (compilation included), then
  ``repeats`` rounds of one run each.
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
  for fn in candidates.values():
    for _ in range(warmup):
      _run_once(fn)
  samples = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      samples[name].append(_run_once(fn))
  stats = {}
  for name, times in samples.items():
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    stats[name] = {"median_s": float(median), "spread": float((q3 - q1) / median)}
  return stats
