#!/usr/bin/env bash
# Creates (or reuses) the virtual environment in $VENV (default .venv) with all
# three backends. Sourced by the other scripts.
set -euo pipefail
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # The CPU build first: an unpinned torch pulls gigabytes of CUDA wheels.
  "$VENV/bin/pip" install --quiet torch==2.13.0
  "$VENV/bin/pip" install --quiet -e ".[all]"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
