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

Each runs in a fresh kernel of this interpreter, with the repo root as
working directory.
"""

import pathlib
import re

import nbformat
import numpy as np
import pytest
from ipykernel import kernelspec
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colabs" / "tesla.ipynb"
SANP_NOTEBOOK = REPO / "colabs" / "sanp.ipynb"
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


def tagged_stdout(nb, tag: str) -> str:
  """The stdout text of the one code cell tagged ``tag``."""
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return "".join(o.get("text", "") for o in cells[0].outputs
                 if o.output_type == "stream" and o.name == "stdout")


def number_rows(text: str) -> list[list[float]]:
  """The rows of ``text`` that consist of numbers only, parsed."""
  rows = []
  for line in text.splitlines():
    fields = line.split()
    if fields and all(re.fullmatch(r"-?\d+(\.\d+)?", f) for f in fields):
      rows.append([float(f) for f in fields])
  return rows


@pytest.mark.parametrize("path", [NOTEBOOK, SANP_NOTEBOOK], ids=lambda p: p.name)
def test_saved_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", [NOTEBOOK, SANP_NOTEBOOK], ids=lambda p: p.name)
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

