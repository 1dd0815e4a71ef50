"""The layering of docs/architecture.md holds: every import in the package points to an earlier layer (or the same
package), and no module imports another package of ours inside a function (the usual way to hide a cycle)."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "deepeyes_jax"

# Earlier layers first; a module may import from its own layer's package and from earlier layers only.
LAYERS = [
  {"registry", "config_args", "config_check", "cli_env"},
  {"parallel"},
  {"processing"},
  {"kernels"},
  {"models"},
  {"sampling"},
  {"agent"},
  {"data"},
  {"reward"},
  {"eval"},
  {"run_setup"},
  {"rl"},
  {"train", "evaluate", "select", "infer", "export", "aot", "config_reference", "perf", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
  """deepeyes_jax.eval.loop -> eval; deepeyes_jax.run_setup -> run_setup."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path):
  """(imported module, at module level?) for every import of deepeyes_jax in the file."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] if node.module != "deepeyes_jax" else [f"deepeyes_jax.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      continue
    out += [(n, id(node) in top) for n in names if n.startswith("deepeyes_jax.")]
  return out


def _modules():
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    yield path, ".".join(rel.parts)


def test_every_unit_has_a_layer():
  units = {_unit(m) for _, m in _modules()}
  assert units <= set(RANK), f"not in a layer of docs/architecture.md: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path,module", list(_modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_point_to_earlier_layers(path, module):
  unit = _unit(module)
  for target, at_top in _imports(path):
    dest = _unit(target)
    if dest == unit:
      continue
    assert RANK[dest] <= RANK[unit], f"{module} imports {target}: {dest} is a later layer than {unit}"
    assert at_top or RANK[unit] == len(LAYERS) - 1, (
      f"{module} imports {target} inside a function (imports between packages belong at the top)"
    )


def test_architecture_doc_lists_the_layers_in_this_order():
  doc = (ROOT / "docs" / "architecture.md").read_text()
  table = re.findall(r"^\| `([a-z_]+)(?:/|\.py)` \|", doc, flags=re.M)
  expected = [n for layer in LAYERS[1:-1] for n in sorted(layer)]
  assert table == expected
