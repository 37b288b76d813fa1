r"""Builds a CompactNet latency table and validates it on whole networks (paper 004 §3.1, §4.3).

python -m benchmarks.compactnet_table --model=mobilenet_v2_imagenet --platform=cpu-b64 --variants=20 --seed=0 --out=FILE

Builds the platform simulator's table of unit latencies of ``--model`` on
``--platform`` and calibrates it on the original and
``--calibration_variants`` random trims timed whole, in the form
``--calibration_form`` (``auto``: chosen on those networks, each left out
of the fit in turn; :meth:`dynscale.compactnet.latency.Table.with_calibration`)
(:func:`dynscale.compactnet.simulator.build_table`), saved to ``--out``; an
existing ``--out`` is loaded instead when it is a table of this model,
platform and expansion grouping (and refused when it is another's). Then
times, in one interleaved run, the original, ``--variants`` random trims
drawn with ``--seed`` (never the calibration's seed, so they are not the
networks the calibration was fitted on) and the first ``n`` units of the
original for every ``n`` (Fig. 7), in a process set up for the platform
(:func:`dynscale.compactnet.simulator.validate_table`).

The *error* of a network is ``|predicted / measured - 1|`` of its
whole-network latency: ``mean_abs_error`` / ``max_abs_error`` over the
variants with the calibrated table (the raw one with
``--calibration_variants=0``), ``raw_*`` with the raw sum of unit
latencies (§3.1 as published), ``speedup_*`` the same of the speed-up over
the original, ``fig7_*`` of the prefixes against the cumulative raw sum;
``repeat_error`` compares two timings of the original in the same run (the
last prefix is the whole network): the noise floor of the others.
Writes the full report to ``<out>.validation.json``, a plot (predicted
against measured; Fig. 7) to ``<out>.validation.png``, and prints one JSON
line: the errors, the table's build time, platform, model, date and load.

``--model`` is a :data:`dynscale.nn.models.MODELS` network without IDP
layers, on the platform's ``resolution x resolution x 3`` inputs (32x32).
The default ``mobilenet_v2_imagenet`` is MobileNetV2 with the strides of
the paper's Table 1 (the final map is 1x1 at 32x32, as in the CompactNet
authors' code); ``mobilenet_v2`` has the common CIFAR strides (4x4).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import jax
from absl import app, flags

from benchmarks import platform_timing
from dynscale.compactnet import latency, platform, simulator
from dynscale.io import write_json_atomic
from dynscale.nn import models


def check(model: str, platform_name: str, variants: int, seed: int, out: str,
          width_multiplier: float, num_classes: int, settings: simulator.TableSettings
          ) -> tuple[dict, platform.Platform]:
  """``(architecture, platform)`` of the arguments; a ValueError naming the
  first bad one, before anything is measured."""
  if model not in models.MODELS:
    raise ValueError(f"model must be one of {sorted(models.MODELS)}, got {model!r}")
  target = platform.get(platform_name, "platform")
  for field, value, minimum in (("variants", variants, 1), ("seed", seed, 0),
                                ("num_classes", num_classes, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")
  settings.check()
  if seed == settings.calibration_seed:
    raise ValueError(f"seed must differ from calibration_seed {seed}: the validation "
                     "variants must be disjoint from the calibration ones")
  if not out:
    raise ValueError("out must be a file path for the latency table")
  arch = models.architecture(model, num_classes=num_classes,
                             input_shape=[target.resolution, target.resolution, 3],
                             idp_layers="none", width_multiplier=width_multiplier)
  return arch, target


def _existing(out: str, arch: dict, target: platform.Platform,
              settings: simulator.TableSettings) -> latency.Table | None:
  """The table in ``out`` if there is one; refuses one of another model or platform."""
  if not os.path.exists(out):
    return None
  table = latency.load(out)
  try:
    latency.check_matches(table, arch, target, settings.expansion, where=f"out {out!r}")
  except ValueError as e:
    raise ValueError(f"{e}; remove it or choose another --out") from e
  return table


def run(*, model: str, platform_name: str, variants: int, seed: int, out: str,
        width_multiplier: float = 1.0, num_classes: int = 10,
        settings: simulator.TableSettings = simulator.TableSettings(),
        remote: simulator.Remote = simulator.isolated) -> dict:
  """Builds (or loads) and validates the table (module docstring); prints and
  returns the one-line record."""
  arch, target = check(model, platform_name, variants, seed, out, width_multiplier,
                       num_classes, settings)
  table = _existing(out, arch, target, settings)
  source = "built" if table is None else "loaded"
  if table is None:
    table = simulator.build_table(arch, target, settings, out, remote)
  else:
    print(f"loaded the latency table in {out} (measured {table.provenance.get('date')}, "
          f"grid_points={table.provenance.get('grid_points')}): it matches this model and "
          "platform; not measured again", file=sys.stderr)
  start = time.perf_counter()
  report = simulator.validate_table(table, arch, target, variants, seed, remote,
                                    settings=settings)
  validation_s = time.perf_counter() - start
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  summary = {k: v for k, v in report.items() if k not in ("rows", "fig7", "provenance")}
  calibration = table.calibration or {}
  record = {
      "model": model, "width_multiplier": width_multiplier, "num_classes": num_classes,
      "platform": target.name, **summary,
      "calibration_form": calibration.get("form"),
      "calibration_scale": calibration.get("scale"),
      "calibration_per_mib": calibration.get("per_mib"),
      "calibration_offset": calibration.get("offset"),
      "calibration_variants": calibration.get("random_variants"),
      "table": source, "table_path": out, "table_build_s": table.provenance.get("build_s"),
      "table_date": table.provenance.get("date"), "units": len(table.units),
      "entries": table.provenance.get("entries"),
      "grid_points": table.provenance.get("grid_points"),
      "validation_s": round(validation_s, 3),
      "device": report["provenance"].get("device"), "jax": jax.__version__,
      "date": date, "load": [round(x, 2) for x in os.getloadavg()],
      "report": f"{out}.validation.json", "plot": f"{out}.validation.png"}
  write_json_atomic(record["report"], {**record, "rows": report["rows"], "fig7": report["fig7"],
                                       "provenance": report["provenance"],
                                       "table_provenance": table.provenance,
                                       "calibration": table.calibration})
  simulator.plot_validation(report, record["plot"],
                            f"{model} x{width_multiplier:g} on {target.name}")
  print(json.dumps(record), flush=True)
  return record


def _define_flags() -> None:
  """Flags only when run as a script (tests import :func:`run`)."""
  defaults = simulator.TableSettings()
  flags.DEFINE_string("model", "mobilenet_v2_imagenet", "Network of dynscale.nn.models.MODELS.")
  flags.DEFINE_string("platform", "cpu-b64", f"Platform, one of {sorted(platform.PLATFORMS)}.")
  flags.DEFINE_integer("variants", 20, "Random trims to validate on.")
  flags.DEFINE_integer("seed", 0, "Seed of the validation trims (not --calibration_seed).")
  flags.DEFINE_string("out", None, "Latency table JSON: built there, or loaded if it matches.")
  flags.DEFINE_float("width_multiplier", 1.0, "Scales every hidden width.")
  flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
  flags.DEFINE_string("expansion", defaults.expansion, "Expansion grouping: tied, independent.")
  flags.DEFINE_integer("grid_points", defaults.grid_points, "Grid widths per group.")
  flags.DEFINE_float("min_fraction", defaults.min_fraction, "Smallest grid width / full width.")
  flags.DEFINE_integer("round_to", defaults.round_to, "Widths are multiples of this.")
  platform_timing.define_flags()
  flags.adopt_module_key_flags(platform_timing)  # listed by --help
  flags.DEFINE_integer("calibration_variants", defaults.calibration_variants,
                       "Random trims the calibration is fitted on (0: none).")
  flags.DEFINE_integer("calibration_seed", defaults.calibration_seed, "Their seed.")
  flags.DEFINE_integer("calibration_processes", defaults.calibration_processes,
                       "Processes the calibration networks are measured in.")
  flags.DEFINE_string("calibration_form", defaults.calibration_form,
                      f"One of {list(simulator.CALIBRATION_CHOICES)}; auto: the form that "
                      "predicts the calibration network left out best.")
  flags.mark_flag_as_required("out")


def main(argv, remote: simulator.Remote = simulator.isolated) -> None:
  del argv
  f = flags.FLAGS
  kwargs = dict(model=f.model, platform_name=f.platform, variants=f.variants, seed=f.seed,
                out=f.out, width_multiplier=f.width_multiplier, num_classes=f.num_classes,
                settings=simulator.TableSettings(
                    expansion=f.expansion, grid_points=f.grid_points,
                    min_fraction=f.min_fraction, round_to=f.round_to,
                    **platform_timing.flag_values(),
                    calibration_variants=f.calibration_variants,
                    calibration_seed=f.calibration_seed,
                    calibration_processes=f.calibration_processes,
                    calibration_form=f.calibration_form))
  try:  # bad flags, or an --out of another model, fail before anything is measured
    arch, target = check(**kwargs)
    _existing(f.out, arch, target, kwargs["settings"])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  run(**kwargs, remote=remote)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
