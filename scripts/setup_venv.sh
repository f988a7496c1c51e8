#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it, editable, with
# the given extras (default: dev). Reinstalls only when pyproject.toml or the
# extras change: a stamp file .venv/.installed-<extras>-<hash> records the
# last install, so a repeated run takes a fraction of a second.
#
# Usage: scripts/setup_venv.sh [EXTRAS]     e.g. dev, docs, "dev,docs"
# Environment: PYTHON (default python3, must be 3.10+), VENV (default .venv).
set -euo pipefail

cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"
venv="${VENV:-.venv}"

if [ ! -x "$venv/bin/python" ]; then
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "error: '$python' not found. Install Python 3.10+ or run: PYTHON=/path/to/python3 make ..." >&2
        exit 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        version="$("$python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo unknown)"
        echo "error: keras-peft needs Python 3.10+; '$python' is version $version." >&2
        echo "       Run with: PYTHON=/path/to/python3.x make ..." >&2
        exit 1
    fi
    echo ">> creating $venv with $("$python" --version 2>&1)"
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "error: '$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)." >&2
        exit 1
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

hash="$("$venv/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()[:16])')"
stamp="$venv/.installed-${extras//,/+}-$hash"
if [ ! -f "$stamp" ]; then
    echo ">> installing keras-peft[$extras] into $venv"
    "$venv/bin/python" -m pip install --quiet -e ".[$extras]"
    rm -f "$venv/.installed-${extras//,/+}-"*
    touch "$stamp"
fi
