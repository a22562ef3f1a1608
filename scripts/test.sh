#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend (the backend is fixed at
# import time, so each needs its own process). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
status=0
echo "=== ruff check (lint and import order, configured in pyproject.toml)"
ruff check . || status=1
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend"
  # setup.sh turned on `set -e`; a failing backend must not skip the others.
  code=0
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider \
    --doctest-modules keras_distill tests "$@" || code=$?
  if [ "$code" -eq 5 ]; then
    echo "pytest collected no tests on $backend: check the paths." >&2
  fi
  [ "$code" -eq 0 ] || status=1
done
exit $status
