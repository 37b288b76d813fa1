"""A fake platform for CompactNet tests: latencies from FLOPs, served in-process."""

import jax
import numpy as np

from dynscale.compactnet import latency, measure, trimming
from dynscale.nn import costs

UNIT_OVERHEAD_S = 1e-4
WHOLE_SCALE = 0.7  # a whole network runs in 0.7 x the sum of its units


def unit_timer(networks):
  """A unit alone: its FLOPs at 1 GFLOP/s plus a dispatch overhead."""
  return {name: {"latency_s": costs.flops(arch) * 1e-9 + UNIT_OVERHEAD_S, "spread": 0.0}
          for name, (arch, _) in networks.items()}


def fake_remote(requests, network_overhead_s=0.0, per_mib_s=0.0):
  """A Remote serving measure.py's requests in this process on the fake platform:
  a whole network (or prefix) of ``n`` units takes ``WHOLE_SCALE x`` the sum of
  its units' latencies, plus ``network_overhead_s`` that no unit shows (so
  the table over-predicts a trim's saving), plus ``per_mib_s`` per MiB of its
  variables (weights streamed at batch 1, which no unit alone shows).
  Appends every request's kind to ``requests``."""

  def remote(target, request):
    requests.append(request["kind"])
    if request["kind"] == "table":
      table = latency.build(
          request["arch"], target, unit_timer, expansion=request["expansion"],
          grid_points=request["grid_points"], min_fraction=request["min_fraction"],
          round_to=request["round_to"],
          provenance={k: request[k] for k in ("warmup", "rounds", "estimator", "burst")})
      latency.save(table, request["out"])
      return {"out": request["out"]}
    out = {}
    for name, item in request["networks"].items():
      arch, variables = measure.network(item)  # an export, a trim or a prefix of the original
      mib = sum(np.asarray(x).nbytes for x in jax.tree.leaves(variables)) / 2**20
      out[name] = {"latency_s": whole_network_latency(arch, item.get("prefix"))
                   + network_overhead_s + per_mib_s * mib, "spread": 0.0}
    return {"latencies": out, "provenance": {"device": "fake", "load_1min": 0.0}}
  return remote


def whole_network_latency(arch, units=None):
  """What the fake platform measures for a whole network ``arch`` of ``units``
  units (default: as many as its table has)."""
  n = units or len(latency.units(arch, trimming.trimmable_groups(arch)))
  return WHOLE_SCALE * (costs.flops(arch) * 1e-9 + UNIT_OVERHEAD_S * n)
