"""Latency measurement: warm-up, ``block_until_ready``, interleaved repeats.

Candidates are timed in rounds (each round runs every candidate once, in
order), so that slow drifts of a noisy machine hit all of them alike and
the ratios between them stay meaningful.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np


def machine() -> dict:
  """What a benchmark record says of where it ran: the first device, the JAX
  version, ``XLA_FLAGS`` and the 1-minute load average."""
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "cpu_load_1m": round(os.getloadavg()[0], 2)}


def _run_once(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


ESTIMATORS = ("median", "min", "q10")


def check_estimator(estimator: str) -> None:
  """Raises unless ``estimator`` is one of :data:`ESTIMATORS`."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def estimate(times, estimator: str = "median") -> float:
  """One latency from repeated runs: their median, minimum or 10% quantile."""
  check_estimator(estimator)
  quantile = {"median": 50, "min": 0, "q10": 10}[estimator]
  return float(np.percentile(times, quantile))


def interleaved_latencies(candidates: Mapping[str, Callable[[], object]], *, warmup: int = 2,
                          repeats: int = 10, estimator: str = "median", burst: int = 1
                          ) -> dict[str, dict[str, float]]:
  """Median (``median_s``), latency by ``estimator`` (``latency_s``) and spread
  (IQR / median) of each zero-argument candidate, in seconds.

  Every candidate runs ``warmup`` times first (compilation included), then
  ``repeats`` rounds of ``burst`` back-to-back runs each, every run timed: a
  burst > 1 lets a small network find its weights in cache again, as it
  would when called in a loop, whatever ran before it in the round.
  """
  if repeats < 1 or warmup < 0 or burst < 1:
    raise ValueError(f"repeats and burst must be >= 1 and warmup >= 0, got {repeats}, "
                     f"{burst}, {warmup}")
  check_estimator(estimator)
  for fn in candidates.values():
    for _ in range(warmup):
      _run_once(fn)
  samples = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      samples[name].extend(_run_once(fn) for _ in range(burst))
  stats = {}
  for name, times in samples.items():
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    stats[name] = {"median_s": float(median), "latency_s": estimate(times, estimator),
                   "spread": float((q3 - q1) / median)}
  return stats
