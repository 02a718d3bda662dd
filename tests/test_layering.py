"""Dependencies point one way, between the import packages and between the parts of ``ot_cfm``, and no import
is hidden in a function.

    ot_cfm  <-  proximal  <-  manifold_tests  <-  ot_cfm_experiments

A package may import the ones to its left, never one to its right. Inside ``ot_cfm`` each part (a subpackage or a
top-level module) may import only the parts ``OT_CFM_PARTS`` lists for it and what those may import in turn:

    utils  <-  data, couplers, paths, models, solvers
    couplers, paths, models  <-  matcher  <-  training
    couplers, solvers  <-  evaluation  <-  images (with data, models)
    training, images  <-  the ``ot_cfm`` facade (its ``__init__``)  <-  compat  <-  cli
 The check reads every module's
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
# part of ot_cfm -> the parts it may import directly (and, through them, what they may import)
OT_CFM_PARTS = {
    "utils": set(),
    "data": {"utils"},
    "couplers": {"utils"},
    "paths": {"utils"},
    "models": {"utils"},
    "solvers": {"utils"},
    "matcher": {"couplers", "paths", "models"},
    "training": {"matcher"},
    "evaluation": {"couplers", "solvers"},
    "images": {"data", "evaluation", "models"},
    "ot_cfm": {"training", "images"},  # the facade: the package's __init__, the public API
    "compat": {"ot_cfm"},
    "cli": {"compat"},
}
FACADE = "ot_cfm"


def _allowed(part: str) -> set[str]:
    """The parts ``part`` may import: its own, those OT_CFM_PARTS lists, and theirs in turn."""
    seen, todo = {part}, [part]
    while todo:
        for other in OT_CFM_PARTS[todo.pop()]:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def _ot_cfm_parts_imported(path: Path):
    """(part of ot_cfm, line) for each import of ot_cfm in ``path``: ``ot_cfm.<part>...``, or ``from ot_cfm
    import <part>``, or the facade itself (``import ot_cfm``, ``from ot_cfm import Name``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in modules:
            parts = module.split(".")
            if parts[0] != "ot_cfm":
                continue
            if len(parts) > 1:
                yield parts[1], node.lineno
            elif names is None:
                yield FACADE, node.lineno
            else:
                for name in names:
                    yield (name if name in OT_CFM_PARTS else FACADE), node.lineno


def _part_of(path: Path) -> str:
    """The part of ot_cfm a module belongs to: its subpackage, or its own name for a top-level module."""
    inside = path.relative_to(ROOT / "ot_cfm").parts
    return FACADE if inside == ("__init__.py",) else inside[0].removesuffix(".py")


def _part_violations(path: Path, part: str) -> list[str]:
    allowed = _allowed(part)
    return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line} ({part}) imports {other}"
            for other, line in _ot_cfm_parts_imported(path) if other not in allowed]


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


def test_every_part_of_ot_cfm_has_a_rule():
    parts = {_part_of(p) for p in _modules("ot_cfm")}
    assert parts == set(OT_CFM_PARTS), f"parts without a rule: {parts - set(OT_CFM_PARTS)}; rules without a part: " \
                                       f"{set(OT_CFM_PARTS) - parts}"


def test_parts_of_ot_cfm_import_only_the_parts_below_them():
    bad = [v for path in _modules("ot_cfm") for v in _part_violations(path, _part_of(path))]
    assert not bad, "; ".join(bad)


def test_the_part_checker_sees_an_import_that_points_up(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import torch\nfrom ot_cfm.utils.validation import check_batch\nfrom ot_cfm.training import Trainer\n"
                      "from ot_cfm import evaluation, sample\n")
    assert _part_violations(module, "matcher") == ["m.py:3 (matcher) imports training", "m.py:4 (matcher) imports evaluation",
                                                   "m.py:4 (matcher) imports ot_cfm"]
    assert _part_violations(module, "cli") == []
    assert "cli" not in _allowed(FACADE) and "compat" not in _allowed(FACADE)
    assert _allowed("images") == {"images", "data", "evaluation", "models", "couplers", "solvers", "utils"}
