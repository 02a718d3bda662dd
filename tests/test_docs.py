"""The documentation site: its API reference covers every exported name, and the docstring reader is faithful.

The full build (``bash run.sh docs``, run by ``.ci/run``) also executes every tutorial; here the site is built
without executing them, in strict mode, from a copy of ``docs/`` (the build writes the generated API pages
beside its sources).
"""

import importlib
import importlib.util
import pkgutil
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["ot_cfm", "proximal", "manifold_tests", "ot_cfm_experiments"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_modules() -> list[str]:
    """tests/test_public_api.py's MODULES, the packages, and every non-private submodule that declares __all__."""
    names = set(_load(ROOT / "tests" / "test_public_api.py", "public_api_modules").MODULES) | set(PACKAGES)
    for package in PACKAGES:
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                if hasattr(importlib.import_module(info.name), "__all__"):
                    names.add(info.name)
    return sorted(names)


def read_inventory(path: Path) -> dict[str, str]:
    """Sphinx's objects.inv (version 2): four header lines, then zlib-compressed 'name domain:role ...' lines."""
    raw = path.read_bytes()
    end = 0
    for _ in range(4):
        end = raw.index(b"\n", end) + 1
    assert raw.startswith(b"# Sphinx inventory version 2"), raw[:40]
    entries = {}
    for line in zlib.decompress(raw[end:]).decode().splitlines():
        name, role = line.split(" ")[:2]
        entries[name] = role
    return entries


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site built with -W -n (strict) and the tutorials not executed; returns (html dir, sphinx output)."""
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("myst_nb", reason="the docs extra is not installed: pip install -e '.[docs]'")
    work = tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT / "docs", work / "docs", ignore=shutil.ignore_patterns("_build", "api", "jupyter_execute"))
    (work / "README.md").symlink_to(ROOT / "README.md")  # index.md includes the README's quickstart
    (work / "examples").symlink_to(ROOT / "examples")  # results.md shows the committed result figures
    out = work / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-E", "-q", "-b", "html",
                           "-D", "nb_execution_mode=off", str(work / "docs"), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=work)
    return out, done


@pytest.mark.slow
def test_site_builds_in_strict_mode(built_site):
    out, done = built_site
    assert done.returncode == 0, f"sphinx-build -W -n failed:\n{done.stderr[-5000:]}"
    for page in ["index", "install", "concepts", "cli", "results", "testing", "api/index", "tutorials/index",
                 "tutorials/toy_2d", "tutorials/own_data", "tutorials/images", "tutorials/exact_field",
                 "tutorials/hyperbolicity", "tutorials/batch_size", "tutorials/torchcfm_migration"]:
        assert (out / f"{page}.html").exists(), page


@pytest.mark.slow
def test_api_reference_covers_every_exported_name(built_site):
    out, done = built_site
    assert (out / "objects.inv").exists(), done.stderr[-3000:]
    inventory = read_inventory(out / "objects.inv")
    modules = expected_modules()
    missing_modules = [m for m in modules if inventory.get(m) != "py:module"]
    assert not missing_modules, f"modules without a page in the API reference: {missing_modules}"
    missing = [f"{m}.{n}" for m in modules for n in getattr(importlib.import_module(m), "__all__", [])
               if f"{m}.{n}" not in inventory]
    assert not missing, f"exported names missing from the API reference's inventory: {missing}"
    # each object is described once: re-exports are aliases of one entry, not copies
    page = (out / "api" / "ot_cfm.couplers.html").read_text()
    assert 'id="ot_cfm.couplers.ExactOTCoupler"' not in page and "ot_cfm.html#ot_cfm.ExactOTCoupler" in page


def test_read_inventory_reports_what_is_missing(tmp_path):
    """The inventory reader sees exactly the names written, so a name left out is reported."""
    lines = "ot_cfm py:module 0 api/ot_cfm.html#module-$ -\not_cfm.sample py:function 1 api/ot_cfm.html#$ -\n"
    (tmp_path / "objects.inv").write_bytes(b"# Sphinx inventory version 2\n# Project: x\n# Version: 0\n"
                                           b"# The remainder of this file is compressed using zlib.\n"
                                           + zlib.compress(lines.encode()))
    inventory = read_inventory(tmp_path / "objects.inv")
    assert inventory == {"ot_cfm": "py:module", "ot_cfm.sample": "py:function"}
    assert [n for n in ["sample", "Trainer"] if f"ot_cfm.{n}" not in inventory] == ["Trainer"]


@pytest.fixture(scope="module")
def conf():
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")
    return _load(ROOT / "docs" / "conf.py", "docs_conf")


def _render(rst: list[str]) -> tuple[str, list[str]]:
    """reStructuredText -> (plain text of the document, docutils' warnings and errors)."""
    from docutils.core import publish_doctree
    from docutils.utils import Reporter

    messages = []
    doctree = publish_doctree("\n".join(rst), settings_overrides={"report_level": Reporter.SEVERE_LEVEL + 1,
                                                                   "halt_level": Reporter.SEVERE_LEVEL + 1})
    for node in doctree.findall():
        if node.tagname == "system_message" and node["level"] >= Reporter.WARNING_LEVEL:
            messages.append(node.astext())
    return doctree.astext(), messages


def test_plain_text_docstrings_render_as_written(conf):
    """Formulas with * | _ and backslashes print as written; ``literal`` spans stay literal."""
    doc = ["x0 (B, *shape) and |x - y|^2 per pair_ of rows, a\\b, with ``x[*idx]`` unchanged."]
    text, messages = _render(conf.plain_text_to_rst(doc))
    assert messages == []
    assert text.strip() == "x0 (B, *shape) and |x - y|^2 per pair_ of rows, a\\b, with x[*idx] unchanged."
    # without the reader, reStructuredText reads * and | as markup and warns
    assert _render(doc)[1]


def test_plain_text_items_displays_and_bullets(conf):
    doc = ["Outcome of a fit.", "",
           "tv: TV error of the duals, measured",
           "    on fresh samples (``|x|`` spans",
           "    lines).",
           "cost: deprecated alias.",
           "",
           "    min_P  sum_ij P_ij |x0_i - x1_j|^2   s.t.  P 1 = 1/B0",
           "",
           "- a bullet whose text",
           "  goes on here;",
           "- and a second one.",
           "After the list."]
    rst = conf.plain_text_to_rst(doc)
    text, messages = _render(rst)
    assert messages == [], messages
    # each "name: description" item is its own paragraph, continued by its indented lines
    assert "tv: TV error of the duals, measured\non fresh samples (|x| spans\nlines)." in text
    assert "\n\ncost: deprecated alias." in text
    # the display is a literal block, printed verbatim (no escapes)
    assert ".. code-block:: text" in rst and "min_P  sum_ij P_ij |x0_i - x1_j|^2   s.t.  P 1 = 1/B0" in text
    assert "a bullet whose text\ngoes on here;" in text and "and a second one." in text


def test_google_sections_reach_napoleon(conf):
    """Args/Returns sections become field lists; an attribute's prose is not read as 'type: description'."""
    lines = ["Sample a batch.", "", "Args:", "    x0: initial states (B, *shape).", "    atol, rtol: tolerances.",
             "", "Returns:", "    SampleResult: the samples."]
    conf.read_docstring(None, "function", "f", None, {}, lines)
    joined = "\n".join(lines)
    assert ":param x0: initial states (B, \\*shape)." in joined
    assert ":param atol:" in joined and ":param rtol:" in joined
    prose = ["As its base coupler: True for the exact solvers."]
    conf.read_docstring(None, "property", "p", None, {}, prose)
    assert prose[0] == "As its base coupler: True for the exact solvers."
    assert not any(":type:" in line for line in prose)


def test_public_modules_cover_the_public_api_list(conf):
    assert set(expected_modules()) <= set(conf.public_modules())
