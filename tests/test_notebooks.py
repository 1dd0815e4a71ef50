"""Every notebook in colab/ runs top to bottom without an error, with small CI settings; the install cells' logic
(placeholder refused, import without a restart) and the quoted run time are checked too.

Notebooks are discovered by glob, so a new colab/*.ipynb is tested as soon as it is added. Each may have one cell
tagged `parameters` (papermill's convention); the test inserts a cell right after it with the overrides of
`OVERRIDES[name]` on top of `COMMON` (INSTALL = False: CI tests the checkout, it never pip-installs from GitHub).
The kernel is this interpreter (`sys.executable`), registered in a temporary kernelspec directory, so the notebook
sees the same virtualenv as pytest whatever kernels the machine has installed.
"""

import glob
import json
import os
import re
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


# ----------------------------------------------------------------------------------------------------------------
# The install cells (CI never runs pip: these check the logic around it)


def _install_cell(nb) -> int:
  (i,) = [i for i, c in enumerate(nb.cells) if "install" in c.get("metadata", {}).get("tags", [])]
  return i


def _install_helpers(path) -> str:
  """The install cell's definitions (everything before `before = {}`, where the install itself starts)."""
  nb = nbformat.read(path, as_version=4)
  src = nb.cells[_install_cell(nb)].source
  assert "\nbefore = {}\n" in src, src
  return src.split("\nbefore = {}\n")[0]


def _run_cells(nb, cells, tmp_path, monkeypatch):
  """Executes `cells` (a new notebook with nb's metadata) in the test kernel, working directory tmp_path."""
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  small = nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)
  client = nbclient.NotebookClient(
    small, km=kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  return small


def test_install_cells_share_one_install_logic():
  """Both notebooks install the same way: one tagged install cell each, the same helpers (placeholder check,
  import without a restart, restart only when pip replaced an imported package)."""
  helpers = {os.path.basename(p): _install_helpers(p) for p in NOTEBOOKS}
  assert len(set(helpers.values())) == 1, sorted(helpers)


def test_install_cell_helpers(capsys):
  """The helpers themselves, in this process: the placeholder is refused naming the parameter to set; a package
  that pip replaced after this process imported it asks for a restart; a checkout is imported from its path."""
  scope = {}
  exec(_install_helpers(NOTEBOOKS[0]), scope)
  with pytest.raises(ValueError, match=r"REPO_URL = 'https://github.com/ORG/deepeyes_jax.git' is a placeholder.*"
                     r"Set REPO_URL in the parameters cell to your fork"):  # fmt: skip
    scope["check_source"]("REPO_URL", "https://github.com/ORG/deepeyes_jax.git")
  scope["check_source"]("REPO", "git+https://github.com/someone/deepeyes_jax.git")  # a real URL passes
  scope["check_source"]("REPO", "/content/drive/MyDrive/deepeyes_jax")  # and so does a path
  assert "numpy" in scope["installed_versions"]()  # numpy is imported here
  with pytest.raises(RuntimeError, match=r"pip replaced .*numpy 0\.0\.1 -> .*restart the runtime.*INSTALL = False"):
    scope["make_importable"]({"numpy": "0.0.1"})  # as if pip had upgraded numpy after it was imported
  scope["make_importable"](scope["installed_versions"](), checkout=ROOT)
  assert f"from {os.path.join(ROOT, 'deepeyes_jax')}" in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="not a deepeyes_jax checkout"):
    scope["make_importable"]({}, checkout=os.path.join(ROOT, "docs"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_install_cell_stops_on_the_placeholder_before_installing(path, tmp_path, monkeypatch):
  """INSTALL = True with REPO / REPO_URL as shipped: the install cell fails with the message that says what to set,
  before git or pip run (nothing is cloned)."""
  nb = nbformat.read(path, as_version=4)
  params = {"INSTALL": True, "REPO_DIR": str(tmp_path / "clone"), "WORKDIR": str(tmp_path / "work")}
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
  injected = nbformat.v4.new_code_cell("".join(f"{k} = {v!r}\n" for k, v in params.items()))
  with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
    _run_cells(nb, [nb.cells[tagged[0]], injected, nb.cells[_install_cell(nb)]], tmp_path, monkeypatch)
  name = "REPO_URL" if "REPO_URL" in nb.cells[tagged[0]].source else "REPO"
  assert "is a placeholder, not a real repository" in str(e.value) and f"Set {name} in the parameters" in str(e.value)
  assert not (tmp_path / "clone").exists()


def test_install_cell_imports_a_fresh_editable_checkout_without_a_restart(tmp_path, monkeypatch):
  """The state right after `pip install -e` on Colab: the package's editable finder is not active in the running
  kernel (pip registers it in a .pth file read at start-up only) and the clone sits in the working directory
  (/content/deepeyes_jax), so `import deepeyes_jax.rl` fails. After the install cell it imports, from the checkout
  (the real sequence, `pip install -e` of a package not yet imported and then the import in the same process, was
  run by hand in a fresh virtualenv with the clone in the working directory: the import works)."""
  path = next(p for p in NOTEBOOKS if p.endswith("synthetic_training.ipynb"))
  nb = nbformat.read(path, as_version=4)
  (tmp_path / "deepeyes_jax").symlink_to(ROOT)  # the clone, in the kernel's working directory
  params = nbformat.v4.new_code_cell(f"INSTALL = False\nREPO_DIR = {str(tmp_path / 'deepeyes_jax')!r}\n")
  forget = nbformat.v4.new_code_cell(
    "import os, sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
    "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in repr(h)]\n"
    f"sys.path[:] = [p for p in sys.path if '__editable__' not in p and os.path.abspath(p or '.') != {ROOT!r}]\n"
    "sys.path_importer_cache.clear()\n"
    "try:\n  import deepeyes_jax.rl\n  print('BEFORE: imported')\nexcept ModuleNotFoundError as e:\n"
    "  print('BEFORE:', e)\n"
  )
  check = nbformat.v4.new_code_cell("import deepeyes_jax.rl\nprint('AFTER:', deepeyes_jax.rl.__file__)")
  out = _run_cells(nb, [params, forget, nb.cells[_install_cell(nb)], check], tmp_path, monkeypatch)
  text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
  assert "BEFORE: No module named 'deepeyes_jax.rl'" in text, text
  assert f"AFTER: {tmp_path / 'deepeyes_jax' / 'deepeyes_jax' / 'rl' / '__init__.py'}" in text, text


# ----------------------------------------------------------------------------------------------------------------
# Numbers quoted in several places


def _words(text: str) -> str:
  return " ".join(text.split())


def test_the_embedded_defaults_time_is_one_sentence_everywhere():
  """docs/synthetic.md makes the sentence (**Time:** ...); README.md and the training notebook quote it verbatim."""
  source = _words(open(os.path.join(ROOT, "docs", "synthetic.md")).read())
  m = re.search(r"\*\*Time:\*\* (13-17 minutes end to end[^;]*;[^.]*)\.", source)
  assert m, "docs/synthetic.md lost its **Time:** sentence"
  sentence = m.group(1)
  nb = nbformat.read(os.path.join(ROOT, "colab", "synthetic_training.ipynb"), as_version=4)
  quoting = {
    "README.md": open(os.path.join(ROOT, "README.md")).read(),
    "colab/synthetic_training.ipynb": "\n".join(c.source for c in nb.cells if c.cell_type == "markdown"),
  }
  for name, text in quoting.items():
    assert sentence in _words(text), f"{name} does not quote docs/synthetic.md's time: {sentence!r}"
    assert not re.search(r"(About|~) ?13 min", text), name  # the old, different quotes
