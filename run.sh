#!/usr/bin/env bash
# The project's two commands:
#   bash run.sh train   trains OT-CFM on the default toy task (8gaussians -> moons), writes a figure and metrics
#   bash run.sh test    runs the test suite
# Either one first creates .venv and installs the package with the CPU torch 2.13.0 pinned.
#   bash run.sh docs    builds the documentation site into docs/_build/html (strict; runs every tutorial),
#                       after installing the package's docs extra into .venv
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.ot-cfm-installed"

setup() {
    if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt constraints.txt ]; then
        return
    fi
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # The constraints file pins torch==2.13.0 (the local CPU wheel); unpinned, torchcfm or torchdyn
    # would pull a several-GB CUDA build.
    # torchdyn also pulls torchvision, whose registry wheel does not load with the CPU torch; nothing
    # imports it (sampling uses torchdyn's functional solver, not NeuralODE), so it stays installed.
    "$PY" -m pip install -q -c constraints.txt -e ".[test]"
    touch "$STAMP"
}

DOCS_STAMP="$VENV/.ot-cfm-docs-installed"

setup_docs() {
    setup
    if [ -f "$DOCS_STAMP" ] && [ "$DOCS_STAMP" -nt pyproject.toml ] && [ "$DOCS_STAMP" -nt constraints.txt ]; then
        return
    fi
    "$PY" -m pip install -q -c constraints.txt -e ".[docs]"
    touch "$DOCS_STAMP"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    train)
        setup
        # --workers and --threads default to auto: on 2 cores, 2 worker processes couple batches while the
        # model trains on one torch thread (same weights as without workers).
        exec "$VENV/bin/ot-cfm" train --source 8gaussians --target moons --out runs/default "$@"
        ;;
    test)
        setup
        exec "$PY" -m pytest -q "$@"
        ;;
    docs)
        setup_docs
        # -W: every warning is an error (a broken reference, a docstring reStructuredText cannot read, a tutorial
        # that raises); -n: every cross-reference must resolve; -E: read every page again, so every tutorial runs.
        start=$SECONDS
        "$PY" -m sphinx -W --keep-going -n -E -q -b html docs docs/_build/html "$@"
        echo "docs: built docs/_build/html in $((SECONDS - start)) s (serve it: python -m http.server -d docs/_build/html 8000)"
        ;;
    *)
        echo "usage: bash run.sh train [ot-cfm train options] | bash run.sh test [pytest options] | bash run.sh docs [sphinx options]" >&2
        exit 2
        ;;
esac
