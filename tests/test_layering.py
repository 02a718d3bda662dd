"""Dependencies point one way between the import packages, and no import is hidden in a function.

    ot_cfm  <-  proximal  <-  manifold_tests  <-  ot_cfm_experiments

A package may import the ones to its left, never one to its right. The check reads every module's
source with ``ast``, so an import placed inside a function (the usual way to dodge a cycle) counts
too, and any such function-level import of another package is refused outright. The ``ot-cfm``
command line (``ot_cfm.cli``) names the experiment modules by string and imports them only when
their command is run: the command line is the one entry point that sits above every layer.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["ot_cfm", "proximal", "manifold_tests", "ot_cfm_experiments"]


def _imports(path: Path):
    """(imported top-level package, line, whether the import sits inside a function) for each import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], node.lineno, id(node) in inside


def _modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_every_layer_exists():
    assert all((ROOT / p / "__init__.py").is_file() for p in LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_imports_point_down_the_layers(package):
    above = set(LAYERS[LAYERS.index(package) + 1:])
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in _modules(package)
           for name, line, _ in _imports(path) if name in above]
    assert not bad, f"{package} may import only {LAYERS[:LAYERS.index(package) + 1]}: " + "; ".join(bad)


@pytest.mark.parametrize("package", LAYERS)
def test_no_other_package_imported_inside_a_function(package):
    others = set(LAYERS) - {package}
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name} inside a function" for path in _modules(package)
           for name, line, lazy in _imports(path) if lazy and name in others]
    assert not bad, "; ".join(bad)


def test_the_checker_sees_a_function_level_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from proximal.field import field_error\n    return field_error\n")
    assert sorted(_imports(module)) == [("os", 1, False), ("proximal", 4, True)]
