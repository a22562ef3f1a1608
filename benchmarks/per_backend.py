"""Runs a benchmark's worker once per Keras backend, each in its own process.

The backend is fixed when Keras is imported, so a side-by-side table over
backends needs one process each. The worker writes JSON to the path given as
`--worker-output`; `run_workers` collects them in backend order.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_workers(script, backends, worker_args):
    """Runs `script --worker-output FILE *worker_args` per backend.

    Args:
        script: Path of the benchmark script.
        backends: Backend names, e.g. `["jax", "tensorflow", "torch"]`.
        worker_args: Extra command-line arguments for the worker.

    Returns:
        The list of the workers' JSON results.
    """
    results = []
    for backend in backends:
        with tempfile.NamedTemporaryFile(suffix=".json") as output:
            print(f"running {backend} ...", flush=True)
            subprocess.run(
                [sys.executable, script, "--worker-output", output.name,
                 *worker_args],
                check=True,
                env={**os.environ, "KERAS_BACKEND": backend},
            )
            results.append(json.loads(Path(output.name).read_text()))
    return results
