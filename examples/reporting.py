"""Tables and plots of results over seeds, shared by the examples.

Every example reports mean ± std over seeds, per-seed gains over a baseline,
aligned text tables and learning curves; these helpers are the one
implementation of each. Plotting needs matplotlib (the `examples` extra),
imported on first use.
"""

import json
import os
from pathlib import Path

import numpy as np


def write_results(results, output_dir):
    """Writes `results` as `output_dir/results.json`, atomically.

    The JSON goes to a temporary file in the same folder, then replaces
    `results.json` in one rename, so an interrupted run never leaves a half
    written or a stale-looking new file: either the old one or the new one.

    Args:
        results: A JSON-serializable dict.
        output_dir: The folder (created if needed).

    Returns:
        The path of `results.json`.

    Example:

    >>> import tempfile
    >>> path = write_results({"accuracy": 0.9}, tempfile.mkdtemp())
    >>> json.loads(path.read_text())
    {'accuracy': 0.9}
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    temporary = output_dir / f".results.json.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(results, indent=2))
    os.replace(temporary, path)
    return path


def mean_std(values):
    """Mean and (population) standard deviation of `values`, as floats.

    Args:
        values: A sequence of numbers, e.g. one per seed.

    Returns:
        `(mean, std)`.

    Example:

    >>> mean_std([0.5, 0.7])
    (0.6, 0.09999999999999998)
    """
    return float(np.mean(values)), float(np.std(values))


def format_mean_std(values, digits=4, scale=1.0):
    """`"mean ± std"` of `values` (times `scale`) with `digits` decimals.

    Args:
        values: A sequence of numbers, e.g. one per seed.
        digits: Decimals of both numbers.
        scale: Factor applied first (100 for percentage points).

    Returns:
        A string.

    Example:

    >>> format_mean_std([0.5, 0.7], digits=3)
    '0.600 ± 0.100'
    """
    mean, std = mean_std(np.asarray(values, "float64") * scale)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_rows(header, rows):
    """Aligns a header and rows of strings into text columns.

    Args:
        header: The column titles.
        rows: Lists of cells (strings), as many as `header`.

    Returns:
        A list of lines.

    Example:

    >>> print("\\n".join(format_rows(["model", "acc"], [["teacher", "0.9"]])))
    model    acc
    teacher  0.9
    """
    table = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in table
    ]


def format_gains(label, gains, seeds):
    """One line: the mean ± std of per-seed gains in points, and each seed's.

    Args:
        label: What the gain is, e.g. `"distilled - scratch"`.
        gains: Per-seed differences of fractions (0.01 is one point).
        seeds: The seeds, in the order of `gains`.

    Returns:
        A string.

    Example:

    >>> format_gains("distilled - scratch", [0.01, 0.03], [0, 1])
    'distilled - scratch: +2.00 ± 1.00 points (per seed: 0: +1.00, 1: +3.00)'
    """
    mean, std = mean_std(np.asarray(gains, "float64") * 100)
    per_seed = ", ".join(
        f"{seed}: {gain * 100:+.2f}" for seed, gain in zip(seeds, gains)
    )
    return f"{label}: {mean:+.2f} ± {std:.2f} points (per seed: {per_seed})"


def pyplot():
    """matplotlib's `pyplot` on the Agg backend (PNGs without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_curves(curves, path, ylabel, title):
    """Per-epoch mean ± std bands of several runs, one line per kind.

    Args:
        curves: `{kind: per_seed_curves}`, each a list (one per seed) of
            per-epoch values; the line of `kind` is labelled
            `"{kind} student"`.
        path: Destination PNG.
        ylabel: Label of the y axis, e.g. `"test accuracy"`.
        title: Figure title.

    Example:

    ```python
    plot_curves({"distilled": [[0.9, 0.95]], "scratch": [[0.9, 0.93]]},
                "curves.png", "test accuracy", "Students")
    ```
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for (kind, per_seed), color in zip(curves.items(), colors):
        per_seed = np.asarray(per_seed)
        epochs = np.arange(1, per_seed.shape[1] + 1)
        mean, std = per_seed.mean(axis=0), per_seed.std(axis=0)
        axis.plot(epochs, mean, color=color, label=f"{kind} student")
        axis.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
