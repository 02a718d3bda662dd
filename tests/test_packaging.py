"""The wheel holds every module of the import packages, with subpackages, and nothing of tests, examples or benchmarks.

CI (.ci/wheel_check) also installs the wheel into a fresh venv and runs the command line from outside the
repository; this test catches a packaging mistake in seconds, without an install.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMPORT_PACKAGES = ["ot_cfm", "proximal", "manifold_tests", "ot_cfm_experiments"]
NEVER_INSTALLED = ["tests", "examples", "benchmarks"]


def _source_tree(dest: Path) -> None:
    """Copy what the build reads (no build/ or egg-info folder that could leak stale files into the wheel)."""
    for name in ["pyproject.toml", "README.md", "LICENSE"]:
        if (REPO / name).exists():
            shutil.copy(REPO / name, dest / name)
    for name in IMPORT_PACKAGES + NEVER_INSTALLED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    _source_tree(src)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"pip wheel failed:\n{build.stderr[-3000:]}"
    wheels = list(out.glob("ot_cfm-*.whl"))
    assert len(wheels) == 1, f"expected one ot_cfm wheel, found {[w.name for w in out.iterdir()]}"
    return set(zipfile.ZipFile(wheels[0]).namelist())


def test_wheel_holds_every_module_of_the_import_packages_and_nothing_else(wheel_names):
    packages = [p.parent.relative_to(REPO).as_posix() for name in IMPORT_PACKAGES if (REPO / name).is_dir()
                for p in sorted((REPO / name).rglob("__init__.py")) if "__pycache__" not in p.parts]
    assert "ot_cfm/couplers" in packages
    modules = [p.relative_to(REPO).as_posix() for package in packages for p in sorted((REPO / package).glob("*.py"))]
    missing = [m for m in modules if m not in wheel_names]
    missing += [f"{name}/py.typed" for name in ["ot_cfm", "proximal", "manifold_tests"]
                if f"{name}/py.typed" not in wheel_names]
    assert not missing, f"missing from the wheel: {missing}"
    tops = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert tops <= set(IMPORT_PACKAGES), f"unexpected top-level entries in the wheel: {sorted(tops - set(IMPORT_PACKAGES))}"
    entry_points = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    assert len(entry_points) == 1, f"expected the ot-cfm command's entry_points.txt in the wheel, found {entry_points}"
