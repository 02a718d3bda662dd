"""Sphinx configuration of the ot-cfm documentation site.

Build it with ``bash run.sh docs`` (strict: every warning is an error, and a tutorial that raises fails the
build). The API reference is generated here from the code: one page per public module, that is every module of
the four packages that declares ``__all__``, documenting exactly the names in ``__all__``. A name added to an
``__all__`` therefore appears without editing the docs, and ``tests/test_docs.py`` checks that every one of them
reaches the built inventory. The tutorials (``tutorials/*.md``, MyST notebooks) are executed by myst-nb at
every build, in a temporary folder, with one torch thread.
"""

from __future__ import annotations

import builtins
import importlib
import os
import pkgutil
import re
import types
from pathlib import Path

from sphinx.domains.python import ObjectEntry
from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.util import logging

import ot_cfm

project = "ot-cfm"
author = "the ot-cfm authors"
copyright = "2026, the ot-cfm authors"
release = version = ot_cfm.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.viewcode", "myst_nb"]
exclude_patterns = ["_build", "jupyter_execute", ".gitignore"]
html_theme = "furo"
html_title = f"ot-cfm {release}"

# MyST: $...$ and $$...$$ math, ::: fences, and links to headings within and across pages.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Tutorials run at every build ("force": no cache that could hide a broken one); any error fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 180  # seconds per cell; each tutorial takes well under a minute on two cores
nb_execution_in_temp = True  # files a tutorial writes go to a temporary folder, not into docs/
nb_merge_streams = True

# Docstrings are plain text with ``literal`` spans and Google-style sections; see read_docstring below.
default_role = "code"  # a single `x` renders as code too
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False  # torch.nn.Module's forward docstring is torch's, not ours
# Cross-references must resolve (nitpicky): inside the packages every one does. References to Python's builtins
# and to other libraries' types in signatures (torch.Tensor, numpy.ndarray, ...) cannot resolve offline (no
# intersphinx inventories are fetched when the site is built), so those, and only those, are exempt.
nitpicky = True
nitpick_ignore = [(role, name) for name in dir(builtins) for role in ("py:class", "py:exc", "py:func", "py:obj")]
EXTERNAL = ("torch", "numpy", "np", "scipy", "matplotlib", "torchcfm", "torchdyn", "torchsde", "ot", "sklearn", "PIL", "tqdm",
            "argparse", "collections", "typing", "os", "pathlib", "concurrent", "multiprocessing", "threading", "enum",
            "dataclasses", "abc", "types", "io", "contextlib")
nitpick_ignore_regex = [(r"py:.*", rf"({'|'.join(EXTERNAL)})(\..*)?")]

PACKAGES = ("ot_cfm", "proximal", "manifold_tests", "ot_cfm_experiments")
HERE = Path(__file__).parent
API = HERE / "api"
ALIASES: dict[str, str] = {}
logger = logging.getLogger(__name__)


def public_modules() -> list[str]:
    """The modules the reference documents: each package, and every submodule that declares ``__all__``."""
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            if any(part.startswith("_") for part in info.name.split(".")):  # private modules; __main__ runs the CLI
                continue
            if hasattr(importlib.import_module(info.name), "__all__"):
                names.append(info.name)
    return names


def _key(name: str, obj) -> tuple:
    """What makes two exports the same object: identity, and for data (numbers, strings, tuples) also the name."""
    return (id(obj), name if _kind(obj) == "data" else None)


def module_page(name: str, home: dict) -> str:
    """A MyST page for module ``name``: its docstring, then each name of its ``__all__``.

    An object exported by several modules is documented in full once, at its home (the first module in
    ``public_modules`` order that exports it: the package before its submodules). The other modules list it with
    a link, and ``register_aliases`` enters their names into the inventory as aliases of the home's entry, as
    Sphinx does for the module that defines a class. Exported submodules link to their own page.
    """
    module = importlib.import_module(name)
    lines = [f"# `{name}`", "", "```{eval-rst}", f".. automodule:: {name}", "```", ""]
    exported = list(getattr(module, "__all__", []))
    submodules = [n for n in exported if isinstance(getattr(module, n), types.ModuleType)]
    here = [n for n in exported if n not in submodules and home[_key(n, getattr(module, n))] == name]
    elsewhere = [n for n in exported if n not in submodules and n not in here]
    if submodules:
        lines += ["Submodules: " + ", ".join(f"{{py:mod}}`{n} <{getattr(module, n).__name__}>`" for n in submodules), ""]
    if here:
        lines += ["```{eval-rst}"] + [_directive(name, n, getattr(module, n)) + "\n" for n in here] + ["```", ""]
    if elsewhere:
        lines += ["Also exported here, documented where the link leads: " + ", ".join(
            f"{{py:obj}}`{n} <{home[_key(n, getattr(module, n))]}.{n}>`" for n in elsewhere) + ".", ""]
    return "\n".join(lines)


def aliases(modules: list[str], home: dict) -> dict[str, str]:
    """Each exported name that is documented at another module's page: ``module.name`` -> ``home.name``; and each
    exported module kept under another name (``ot_cfm.metrics`` for ``ot_cfm.evaluation.metrics``) -> its own name."""
    result = {}
    for name in modules:
        module = importlib.import_module(name)
        for n in getattr(module, "__all__", []):
            obj = getattr(module, n)
            if isinstance(obj, types.ModuleType):
                if obj.__name__ != f"{name}.{n}":
                    result[f"{name}.{n}"] = obj.__name__
            elif home[_key(n, obj)] != name:
                result[f"{name}.{n}"] = f"{home[_key(n, obj)]}.{n}"
    return result


def register_aliases(app, env) -> None:
    """Enter every ``aliases()`` name into the Python domain as an alias of its documented object, so that it
    is in the inventory and resolves, without a second description of the object."""
    objects, modules = env.domains["py"].objects, env.domains["py"].modules
    for alias, target in ALIASES.items():
        if target in modules:  # a module exported under another name: an alias of its page
            modules.setdefault(alias, modules[target])
        elif target not in objects:
            logger.warning("%s is exported but its documentation %s was not generated", alias, target)
        elif alias not in objects:  # the defining module's name is already an alias (autodoc's :canonical:)
            entry = objects[target]
            objects[alias] = ObjectEntry(entry.docname, entry.node_id, entry.objtype, aliased=True)


def _kind(obj) -> str:
    if isinstance(obj, type):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function" if callable(obj) else "data"


def _directive(module: str, name: str, obj) -> str:
    """The autodoc directive for ``module.name``: classes with their documented members, functions, or data."""
    kind = _kind(obj)
    if kind in ("class", "exception"):
        return f".. auto{kind}:: {module}.{name}\n   :members:\n   :show-inheritance:"
    return f".. auto{kind}:: {module}.{name}"


def write_api_pages() -> None:
    """Write api/<module>.md for every public module and api/index.md listing them; only changed files are touched."""
    API.mkdir(exist_ok=True)
    modules = public_modules()
    home = {}
    for name in modules:
        module = importlib.import_module(name)
        for n in getattr(module, "__all__", []):
            home.setdefault(_key(n, getattr(module, n)), name)
    pages = {f"{name}.md": module_page(name, home) for name in modules}
    ALIASES.update(aliases(modules, home))
    pages["index.md"] = ("# API reference\n\nGenerated from the code: one page per public module (a package, or a "
                         "module that declares `__all__`), documenting the names in its `__all__`.\n\n"
                         "```{toctree}\n:maxdepth: 1\n\n" + "\n".join(modules) + "\n```\n")
    for stale in {p.name for p in API.glob("*.md")} - set(pages):
        (API / stale).unlink()
    for file, text in pages.items():
        path = API / file
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


_LITERAL = re.compile(r"(``.+?``)", re.DOTALL)
_MARKUP = re.compile(r"([\\*|]|(?<=\w)_(?!\w))")
_SECTION = re.compile(r"\s*(args|arguments|attributes|examples?|keyword args|keyword arguments|methods|notes?|"
                      r"other parameters|parameters|raises?|references|returns?|see also|todo|warnings?|warns?|yields?):\s*$",
                      re.IGNORECASE)
_ITEM = re.compile(r"\s*[A-Za-z_]\w*(, [A-Za-z_]\w*)*: \S")  # "name: description", "atol, rtol: ..."
_BULLET = re.compile(r"\s*- ")
# "Attributes:" as a list like "Args:" (names in bold), not as objects that would clash with autodoc's fields
_NAPOLEON = NapoleonConfig(napoleon_numpy_docstring=False, napoleon_custom_sections=[("Attributes", "params_style")])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape(text: str) -> str:
    """Escape what reStructuredText would read as markup (``*`` in ``(B, *shape)``, ``|`` in ``|x - y|^2``, a
    backslash, a word-final ``_``) outside the ``literal`` spans, so that it prints as written."""
    parts = _LITERAL.split(text)
    return "".join(part if i % 2 else _MARKUP.sub(r"\\\1", part) for i, part in enumerate(parts))


def plain_text_to_rst(lines: list[str]) -> list[str]:
    """reStructuredText for a docstring in the packages' plain-text style.

    The style: paragraphs; ``name: description`` lines and ``- `` bullets, each continued by more indented
    lines; displays (formulas) as indented blocks after a blank line; Google-style sections (``Args:``,
    ``Returns:``, ...) left for napoleon. Each ``name: description`` line becomes its own paragraph with its
    continuation lines, a display becomes a literal block, and markup characters are escaped outside ``literal``
    spans and displays.
    """
    out: list[tuple[str, bool]] = []  # (line, is literal text)
    section = display = None  # indentation of the open section header / display block
    item = body = 0  # indentation of the current paragraph, item or bullet line, and of its text
    bullet = False  # whether the current line block is a bullet item
    blank = True
    for line in lines:
        if not line.strip():
            out.append(("", False))
            blank = True
            continue
        indent = _indent(line)
        if section is not None and indent > section:
            out.append((line, False))
        elif display is not None and indent > display:
            out.append((line, True))
        elif blank and out and indent > item:  # an indented block after a blank line: a display
            display = item
            out += [(" " * item + ".. code-block:: text", True), ("", True), (line, True)]
        elif not blank and indent > item:  # a continuation line: same paragraph as the line it continues
            out.append((" " * body + line.strip(), False))
        else:
            section = display = None
            is_bullet = _BULLET.match(line) is not None
            if not blank and (bullet and not is_bullet or not is_bullet and _ITEM.match(line)):
                out.append(("", False))
            if _SECTION.match(line):
                section = indent
            out.append((line, False))
            item, bullet = indent, is_bullet
            body = indent + (len(_BULLET.match(line).group(0)) if is_bullet else 0)
        blank = False
    result, chunk = [], []
    for line, literal in out + [("", True)]:
        if literal:
            result += _escape("\n".join(chunk)).split("\n") if chunk else []
            chunk = []
            result.append(line)
        else:
            chunk.append(line)
    return result[:-1]


def read_docstring(app, what, name, obj, options, lines) -> None:
    """autodoc hook: plain text to reStructuredText, then napoleon for the Google-style sections.

    Attribute and property docstrings are prose, not napoleon's ``type: description`` form, so napoleon reads
    them as plain objects.
    """
    rst = plain_text_to_rst(lines)
    kind = "object" if what in ("attribute", "data", "property") else what
    lines[:] = GoogleDocstring(rst, _NAPOLEON, app, kind, name, obj, options).lines()


def public_bases(app, name, obj, options, bases) -> None:
    """Show a class's public ancestors instead of a private base class (which the reference does not document)."""
    resolved = []
    for base in bases:
        while base.__name__.startswith("_") and base.__bases__:
            base = base.__bases__[0]
        resolved.append(base)
    bases[:] = resolved


def setup(app):
    # The tutorials' kernels inherit this: one torch thread, as the package recommends on small shared machines.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    app.connect("builder-inited", lambda app: write_api_pages())  # before Sphinx lists the source files
    app.connect("autodoc-process-docstring", read_docstring)
    app.connect("autodoc-process-bases", public_bases)
    app.connect("env-updated", register_aliases)
