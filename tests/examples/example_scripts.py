"""Import a script of the repository by path: examples/ and benchmarks/ are folders of scripts, not packages."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script(relative: str):
    """The module of ``ROOT / relative``, registered in sys.modules under its stem (dataclasses look it up there)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
