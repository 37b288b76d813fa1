"""Measurements in a process set up for a platform (:func:`platform.run_isolated`).

``python -m dynscale.compactnet.measure REQUEST.json RESULT.json`` reads one
request and writes its result atomically:

* ``{"kind": "table", "platform", "arch", "expansion", "grid_points",
  "min_fraction", "round_to", "warmup", "rounds", "estimator", "burst", "out"}``: measures the
  latency table of ``arch`` and saves it to ``out``;
* ``{"kind": "networks", "platform", "networks": {name: spec}, "warmup",
  "rounds", "estimator", "burst"}``: latency of whole networks, interleaved; a spec is
  ``{"export_dir": dir}`` (an exported network, its own variables) or
  ``{"arch": ..., "widths": [...], "expansion": ...}`` (the network trimmed
  to those group widths, timing variables) or ``{"arch": ..., "prefix": n}``
  (its first ``n`` units at full width, Fig. 7).

The process pins itself to the platform's CPUs first (:func:`platform.pin`),
and both kinds check the process (:func:`platform.check_process`).
"""

from __future__ import annotations

import functools
import sys

from dynscale.compactnet import latency, platform, trimming
from dynscale.io import write_json_atomic
from dynscale.nn import sliced, spec


def network(item: dict) -> tuple[dict, dict]:
  """The ``(architecture, variables)`` of one network spec of a "networks" request."""
  if "export_dir" in item:
    model = sliced.load(item["export_dir"])
    return model.arch, model.variables
  arch = spec.validate_architecture(item["arch"])
  groups = trimming.trimmable_groups(arch, item.get("expansion", "tied"))
  if "prefix" in item:
    return latency.prefix_network(arch, latency.units(arch, groups), item["prefix"])
  return latency.trimmed_network(arch, groups, item["widths"])


def serve(request: dict) -> dict:
  """The result of one request (module docstring)."""
  target = platform.get(request["platform"])
  platform.check_process(target)
  timing = {key: request[key] for key in ("warmup", "rounds", "estimator", "burst")}
  measure = functools.partial(latency.measure_networks, target, **timing)
  if request["kind"] == "table":
    table = latency.build(
        request["arch"], target, measure, expansion=request["expansion"],
        grid_points=request["grid_points"], min_fraction=request["min_fraction"],
        round_to=request["round_to"],
        provenance={**platform.describe(target), **timing})
    latency.save(table, request["out"])
    return {"out": request["out"]}
  if request["kind"] == "networks":
    networks = {name: network(item) for name, item in request["networks"].items()}
    return {"latencies": measure(networks), "provenance": platform.describe(target)}
  raise ValueError(f"request kind must be 'table' or 'networks', got {request['kind']!r}")


def main(argv: list[str]) -> None:
  import json

  platform.pin()
  request_path, result_path = argv[1:3]
  with open(request_path) as f:
    request = json.load(f)
  write_json_atomic(result_path, serve(request))


if __name__ == "__main__":
  main(sys.argv)
