"""Runs a benchmark's worker once per Keras backend, each in its own process.

The backend is fixed when Keras is imported, so a side-by-side table over
backends needs one process each. The worker writes JSON to the path given as
`--worker-output`; `run_workers` collects them in backend order.
"""

import argparse
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


def benchmark_parser(description, default_output):
    """An argument parser with the options every benchmark shares.

    Args:
        description: The `--help` description.
        default_output: Default path of the JSON results.

    Returns:
        An `argparse.ArgumentParser` with `--backends`, `--data-dir`,
        `--output` and the internal `--worker-output`.
    """
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--backends", nargs="+", default=["jax", "tensorflow", "torch"]
    )
    parser.add_argument("--data-dir", default=str(root.parent / "shared" / "data"))
    parser.add_argument("--output", default=default_output)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    return parser


def save_results(results, output):
    """Writes the workers' results as JSON to `output` and says where."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"wrote {output}")
