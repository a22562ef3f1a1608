#!/usr/bin/env bash
# Runs the MNIST teacher / distilled / scratch comparison (default recipe, 3
# seeds) on the backend in KERAS_BACKEND (jax unless set). Extra arguments go
# to examples/mnist_distillation.py, e.g. --recipe seed or --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
KERAS_BACKEND=${KERAS_BACKEND:-jax} python examples/mnist_distillation.py "$@"
