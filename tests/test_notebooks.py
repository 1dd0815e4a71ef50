"""Every notebook in colab/ runs top to bottom without an error, with small CI settings.

Notebooks are discovered by glob, so a new colab/*.ipynb is tested as soon as it is added. Each may have one cell
tagged `parameters` (papermill's convention); the test inserts a cell right after it with the overrides of
`OVERRIDES[name]` on top of `COMMON` (INSTALL = False: CI tests the checkout, it never pip-installs from GitHub).
The kernel is this interpreter (`sys.executable`), registered in a temporary kernelspec directory, so the notebook
sees the same virtualenv as pytest whatever kernels the machine has installed.
"""

import glob
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))

COMMON = {"INSTALL": False}
# Per-notebook settings that keep the run short on a CPU (name -> {parameter: value}).
OVERRIDES = {
  "quickstart.ipynb": {"MAX_TURNS": 2, "MAX_TOKENS_PER_TURN": 8},
  "synthetic_training.ipynb": {"REPO_DIR": ROOT, "VARIANT": "ci"},
}
CELL_TIMEOUT_S = 300


def inject_parameters(nb, params: dict) -> None:
  """Inserts `NAME = value` assignments after the cell tagged `parameters` (or first, if there is none)."""
  src = "# Parameters injected by tests/test_notebooks.py\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
  nb.cells.insert(tagged[0] + 1 if tagged else 0, cell)


def kernel_manager(tmp_path):
  """A kernel manager whose only kernel runs `sys.executable -m ipykernel_launcher` (this virtualenv)."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  spec_dir = tmp_path / "kernels" / "deepeyes-test"
  spec_dir.mkdir(parents=True)
  env = {
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "",
    "IPYTHONDIR": str(tmp_path / "ipython"),  # no profile written to (or read from) the home directory
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "deepeyes-test",
    "language": "python",
    "env": env,
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name="deepeyes-test", kernel_spec_manager=ksm)


def test_notebooks_are_found():
  assert any(p.endswith("quickstart.ipynb") for p in NOTEBOOKS), NOTEBOOKS
  unknown = set(OVERRIDES) - {os.path.basename(p) for p in NOTEBOOKS}
  assert not unknown, f"OVERRIDES names notebooks that do not exist: {unknown}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_cells_parse(path):
  """Every code cell (including those CI skips, like the install cell) is valid IPython: it transforms and
  compiles, so a syntax error in a cell that only runs on Colab is still caught."""
  from IPython.core.inputtransformer2 import TransformerManager

  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  tm = TransformerManager()
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      compile(tm.transform_cell(cell.source), f"{os.path.basename(path)}[cell {i}]", "exec")
    assert not cell.get("outputs"), f"{path}: cell {i} has saved outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files: not in $HOME
  name = os.path.basename(path)
  nb = nbformat.read(path, as_version=4)
  inject_parameters(nb, {**COMMON, "WORKDIR": str(tmp_path / "work"), **OVERRIDES.get(name, {})})
  client = nbclient.NotebookClient(
    nb,
    km=kernel_manager(tmp_path),
    timeout=CELL_TIMEOUT_S,
    resources={"metadata": {"path": str(tmp_path)}},  # the notebook's working directory
  )
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{name} failed:\n{str(e)[-4000:]}")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  if name == "quickstart.ipynb":
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert "[tool] image_zoom_in_tool: ok" in text and "answer: '42'" in text, text[-2000:]
    assert len(images) >= 3  # the question image and two zoom figures, rendered inline
    html_out = [
      o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})
    ]
    assert any("Turn 2" in h and "data:image/png;base64," in h for h in html_out)
    assert os.path.exists(tmp_path / "work" / "trajectories" / "trajectories.jsonl")
  if name == "synthetic_training.ipynb":
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert "warm start" in text and "RL gain" in text, text[-2000:]
    assert len(images) >= 2  # the report's curves and at least one trajectory figure, inline
    assert os.path.exists(tmp_path / "work" / "final_eval.json")
