"""Runs the study notebooks top to bottom and checks their outputs.

colabs/tesla.ipynb retells IDP (paper 001) and TESLA (paper 000, §3, Fig. 3)
with a tiny CPU run: every code cell runs without error; the Eq. 3
coefficient table it prints matches the recursion written out here; the
VGG-16 FLOPs fall as about DP**2 (001 §I); the learned ATP profile is
non-increasing (000 §3.4); and the closing cell's mean accuracy of each of
IDP, TESLA and TESLA + ATP is the mean of the curve it prints above.

colabs/sanp.ipynb retells SANP (paper 002) with a tiny run: a freshly gated
network costs its backbone's FLOPs on every image, and the per-image FLOPs
and accuracy it recomputes from the gates are the run's results.

colabs/compactnet.ipynb retells CompactNet (paper 004) with a tiny run of
MobileNetV2 x 0.5 on the cpu-b64 platform: the Table 3 rows it prints are
Eq. 1-2 read as latency reductions, recomputed here; its trimmable groups are
the stem, the stages (blocks tied by their residual adds, each expansion
following t x its block's input) and the head, found here from the layers and
equal to Table 1's output channels x 0.5; the validation errors it prints are
the saved table's predictions against the saved measurements; the search
meets every iteration's Eq. 1-2 budget by the saved table, trimming one group
per iteration, and ends at or above 1.3x as that table predicts; and the
measured speed-up line carries the search's prediction.

Each runs in a fresh kernel of this interpreter, with the repo root as
working directory.
"""

import json
import pathlib
import re

import nbformat
import numpy as np
import pytest
from ipykernel import kernelspec
from nbclient import NotebookClient

from dynscale.compactnet import latency
from dynscale.nn import models

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colabs" / "tesla.ipynb"
SANP_NOTEBOOK = REPO / "colabs" / "sanp.ipynb"
COMPACTNET_NOTEBOOK = REPO / "colabs" / "compactnet.ipynb"
# It measures a real latency table in a pinned process (about 100 s on two
# cores), which would push the default suite past 15 minutes: run with -m slow.
COMPACTNET_SLOW = pytest.mark.slow
KERNEL = "dynscale-notebook-test"
CELL_TIMEOUT_S = 300


def execute(path, tmp_path_factory):
  """The notebook at ``path``, executed with a kernelspec that runs ``sys.executable``.

  The venv's default ``python3`` kernelspec launches whichever ``python`` is
  first on PATH, so this module installs its own kernelspec in a tmp dir.
  """
  prefix = tmp_path_factory.mktemp("kernels")
  kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
  nb = nbformat.read(path, as_version=4)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(REPO)}}).execute()
  return nb


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
  return execute(NOTEBOOK, tmp_path_factory)


@pytest.fixture(scope="module")
def sanp_notebook(tmp_path_factory):
  return execute(SANP_NOTEBOOK, tmp_path_factory)


@pytest.fixture(scope="module")
def compactnet_notebook(tmp_path_factory):
  return execute(COMPACTNET_NOTEBOOK, tmp_path_factory)


def tagged_stdout(nb, tag: str) -> str:
  """The stdout text of the one code cell tagged ``tag``."""
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return "".join(o.get("text", "") for o in cells[0].outputs
                 if o.output_type == "stream" and o.name == "stdout")


def json_line(text: str) -> dict:
  """The last line of ``text`` that is a JSON object, parsed."""
  lines = [line for line in text.splitlines() if line.startswith("{")]
  assert lines, text
  return json.loads(lines[-1])


def number_rows(text: str) -> list[list[float]]:
  """The rows of ``text`` that consist of numbers only, parsed."""
  rows = []
  for line in text.splitlines():
    fields = line.split()
    if fields and all(re.fullmatch(r"-?\d+(\.\d+)?", f) for f in fields):
      rows.append([float(f) for f in fields])
  return rows


@pytest.mark.parametrize("path", [NOTEBOOK, SANP_NOTEBOOK, COMPACTNET_NOTEBOOK],
                         ids=lambda p: p.name)
def test_saved_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", [NOTEBOOK, SANP_NOTEBOOK, COMPACTNET_NOTEBOOK],
                         ids=lambda p: p.name)
def test_first_cell_only_hints_at_install(path):
  first = nbformat.read(path, as_version=4).cells[0]
  assert first.cell_type == "code"
  assert "# !pip install -e ." in first.source
  assert all(line.startswith("#") for line in first.source.splitlines() if line.strip())


def images_of_a_clean_run(nb) -> list:
  """The PNG outputs of an executed notebook whose every code cell ran without error."""
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  return [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]


def test_runs_without_error(notebook):
  # profiles, IDP curve, coefficient heatmap, IDP vs TESLA, learned profile, all curves
  assert len(images_of_a_clean_run(notebook)) >= 6


def test_coefficient_table_is_eq3(notebook):
  tasks, alpha = 4, 0.5
  expected, objective = [], [1.0] + [0.0] * (tasks - 1)   # L_1^obj = L_1
  for stage in range(tasks):
    if stage:
      objective = [(1 - alpha) * c for c in objective]    # (1 - alpha) L_i^obj
      objective[stage] += alpha                           # + alpha L_{i+1}
    expected.append([stage + 1] + objective)
  np.testing.assert_allclose(number_rows(tagged_stdout(notebook, "coefficients")), expected,
                             atol=1e-4)


def test_vgg16_flops_fall_as_dp_squared(notebook):
  rows = number_rows(tagged_stdout(notebook, "flops"))
  assert [r[0] for r in rows] == [0.1, 0.25, 0.5, 0.75, 1.0]
  for dp, _, vgg_ratio, _ in rows:
    assert abs(vgg_ratio - dp * dp) < 0.01, (dp, vgg_ratio)


def test_learned_profile_is_nonincreasing(notebook):
  (gamma,) = number_rows(tagged_stdout(notebook, "learned-profile"))
  assert len(gamma) == 25   # width_multiplier 0.25 of 100 hidden units
  assert all(a >= b for a, b in zip(gamma, gamma[1:]))
  assert max(abs(g - 1.0) for g in gamma) > 1e-3, "ATP must move the profile from all-one"


def test_summary_means_are_the_means_of_the_printed_curves(notebook):
  text = tagged_stdout(notebook, "summary")
  rows = number_rows(text)  # dp, IDP, TESLA, TESLA + ATP: test accuracy at each DP
  assert [r[0] for r in rows] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
  means = dict(re.findall(r"^(IDP|TESLA|TESLA \+ ATP)\s+(\S+)$", text, flags=re.M))
  assert set(means) == {"IDP", "TESLA", "TESLA + ATP"}, text
  for column, name in enumerate(("IDP", "TESLA", "TESLA + ATP"), start=1):
    # Every printed value is rounded to 4 decimals: 1e-4 covers both roundings.
    assert float(means[name]) == pytest.approx(np.mean([r[column] for r in rows]),
                                               abs=1.1e-4), name


def test_sanp_notebook_runs_without_error(sanp_notebook):
  # binarization, channel types, last block's open channels, gates / FLOPs / accuracy
  assert len(images_of_a_clean_run(sanp_notebook)) >= 4


def test_a_freshly_gated_network_costs_its_backbone_on_every_image(sanp_notebook):
  text = tagged_stdout(sanp_notebook, "cost")
  full = float(re.search(r"backbone: (\S+) M FLOPs", text).group(1))
  per_image = [float(v) for v in re.search(r"per image: \[([^\]]+)\]", text).group(1).split()]
  assert len(per_image) == 4 and all(v == pytest.approx(full, abs=1e-2) for v in per_image)


def test_the_per_image_numbers_recomputed_from_the_gates_are_the_runs(sanp_notebook):
  run = tagged_stdout(sanp_notebook, "train")
  accuracy = float(re.search(r"test accuracy (\S+);", run).group(1))
  flops = float(re.search(r"FLOPs per image (\S+) of", run).group(1))
  per_image = tagged_stdout(sanp_notebook, "per_image")
  mean_flops, recomputed = map(float, re.search(r"mean FLOPs (\S+), accuracy (\S+)",
                                                per_image).groups())
  assert mean_flops == pytest.approx(flops, abs=6e-4)   # printed to 3 and 4 decimals
  assert recomputed == pytest.approx(accuracy, abs=6e-4)


def test_the_exported_skipping_function_gives_the_masked_networks_logits(sanp_notebook):
  text = tagged_stdout(sanp_notebook, "skipping")
  assert "['arrays.npz', 'function.jax']" in text
  difference = float(re.search(r"logits on 8 test images: (\S+)", text).group(1))
  assert difference <= 1e-4



# Output channels of Table 1's rows (first conv, the seven bottleneck stages, last conv).
TABLE_1_OUTPUTS = (32, 16, 24, 32, 64, 96, 160, 320, 1280)


@COMPACTNET_SLOW
def test_compactnet_notebook_runs_without_error(compactnet_notebook):
  # schedules, importance, a unit's latency surface, validation / Fig. 7, widths per layer
  assert len(images_of_a_clean_run(compactnet_notebook)) >= 5


@COMPACTNET_SLOW
def test_compactnet_schedule_rows_are_table_3_by_eq_1_and_2(compactnet_notebook):
  rows = number_rows(tagged_stdout(compactnet_notebook, "schedule"))
  assert [r[:4] for r in rows] == [[2.0, 24, 0.96, 1.5], [2.5, 30, 0.98, 1.8],
                                   [1.5, 36, 0.96, 1.3], [2.0, 48, 0.98, 1.5]]
  for t_init, n, d, _, t_final in rows:
    r = 1 - 1 / t_init                                   # the undecayed total reduction
    removed = sum(r / n * d**i for i in range(int(n)))   # sum of T_sub,i (Eq. 1)
    assert t_final == pytest.approx(1 / (1 - removed), abs=6e-5)   # Eq. 2, printed to 4 places
  assert round(rows[2][4], 2) == 1.22   # the NPU row: not the 1.3x the paper lists


@COMPACTNET_SLOW
def test_compactnet_groups_are_the_stem_the_stages_and_the_head(compactnet_notebook):
  text = tagged_stdout(compactnet_notebook, "groups")
  width = float(re.search(r"MobileNetV2 x (\S+):", text).group(1))
  listed = [(name, int(size), followers) for name, size, followers in re.findall(
      r"^group (\S+)\s+size\s+(\d+)\s+expansions following: (.*)$", text, flags=re.M)]
  arch = models.architecture("mobilenet_v2_imagenet", num_classes=10, input_shape=[32, 32, 3],
                             idp_layers="none", width_multiplier=width)
  # A conv or block writes a new group unless its output is added to its input
  # (a block of stride 1 keeping its input's width); a block's expansion
  # follows the group of its input. The classifier's outputs are the classes.
  expected = []
  for i, layer in enumerate(arch["layers"]):
    if layer["kind"] not in ("conv", "invres"):
      continue
    if layer["kind"] == "invres" and layer["expansion"] != 1:
      expected[-1][2].append(f"layers.{i}.mid ({layer['expansion']}x)")
    residual = (layer["kind"] == "invres" and layer.get("stride", 1) == 1
                and layer["features"] == expected[-1][1])
    if not residual:
      expected.append((f"layers.{i}", layer["features"], []))
  assert listed == [(name, size, ", ".join(f) or "-") for name, size, f in expected]
  assert [size for _, size, _ in listed] == [int(c * width) for c in TABLE_1_OUTPUTS]


@COMPACTNET_SLOW
def test_compactnet_validation_errors_are_the_saved_tables(compactnet_notebook):
  line = json_line(tagged_stdout(compactnet_notebook, "validation"))
  table = latency.load(line["table"])
  report = json.loads(pathlib.Path(line["report"]).read_text())
  rows = report["rows"]
  assert line["variants"] == len(rows) == 3 and line["overlap_with_calibration"] == 0
  for key, predict in (("", table.predict), ("raw_", table.raw)):
    errors = [abs(predict(r["widths"]) / r["measured_s"] - 1) for r in rows]
    assert line[f"{key}mean_abs_error"] == pytest.approx(np.mean(errors), rel=1e-9)
    assert line[f"{key}max_abs_error"] == pytest.approx(np.max(errors), rel=1e-9)
  assert len(report["fig7"]) == len(table.units)   # Fig. 7: one row per unit


@COMPACTNET_SLOW
def test_compactnet_search_meets_every_budget_by_the_saved_table(compactnet_notebook):
  found = json_line(tagged_stdout(compactnet_notebook, "search"))
  table = latency.load(found["table"])
  assert found["predicted_speedup"] == pytest.approx(table.speedup(found["widths"]), rel=1e-12)
  assert found["predicted_speedup"] >= 1.3 - 1e-9
  n, d = found["iterations"], found["decay"]
  r = 1 - 1 / found["t_init"]
  sub = [r / n * d**i for i in range(n)]                 # Eq. 1, as reductions
  assert 1 / (1 - sum(sub)) == pytest.approx(1.3)        # T_init solved for T_final = 1.3
  history = json.loads((pathlib.Path(found["workdir"]) / "history.json").read_text())
  full = table.predict(table.full_widths)
  assert len(history["iterations"]) == n
  for i, record in enumerate(history["iterations"]):
    assert record["done"]
    assert record["budget_s"] == pytest.approx(full * (1 - sum(sub[:i + 1])), rel=1e-9)
    assert table.predict(record["widths"]) <= record["budget_s"]
    assert sum(a != b for a, b in zip(record["widths"], record["start_widths"])) <= 1  # Fig. 3
  assert history["iterations"][-1]["widths"] == found["widths"]


@COMPACTNET_SLOW
def test_compactnet_measured_speedup_carries_the_searchs_prediction(compactnet_notebook):
  found = json_line(tagged_stdout(compactnet_notebook, "search"))
  line = json_line(tagged_stdout(compactnet_notebook, "speedup"))
  assert line["predicted"] == found["predicted_speedup"]
  assert line["measured"] == pytest.approx(line["original_s"] / line["searched_s"], rel=1e-12)
  assert line["measured"] > 1.0   # a network predicted 1.3x faster is faster
