"""The backend package: the only code per backend, and imports that need none.

`keras_distill.backend` is the one place that imports jax, tensorflow or
torch or asks `keras.backend.backend()` (the CLI's `--backend` switch
aside); `import keras_distill` works without the `resource` module, which
Windows lacks.
"""

import ast
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_distill import backend
from keras_distill.backend import common

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "keras_distill"
FRAMEWORKS = {"jax", "jaxlib", "tensorflow", "torch"}
# The package's modules allowed to import the frameworks or ask the backend.
ALLOWED = (PACKAGE / "backend", PACKAGE / "cli.py")


def _dotted_name(node):
    """`"a.b.c"` for the expression `a.b.c`, else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(names)])


def backend_branches(source):
    """`(line, what)` for each framework import or backend query in `source`.

    Finds `import jax`, `from torch import ...`, `import_module("tensorflow")`
    and `__import__("jaxlib")` (and their submodules), the calls
    `keras.backend.backend()` and `keras.config.backend()`, and imports of
    those two functions by name.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {alias.name}")
                for alias in node.names
                if alias.name.split(".")[0] in FRAMEWORKS
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            names = {alias.name for alias in node.names}
            if module.split(".")[0] in FRAMEWORKS or (
                module in ("keras.backend", "keras.config") and "backend" in names
            ):
                found.append((node.lineno, f"from {module} import ..."))
        elif isinstance(node, ast.Call):
            name = _dotted_name(node.func)
            if name in ("keras.backend.backend", "keras.config.backend"):
                found.append((node.lineno, f"{name}()"))
            elif (
                name in ("importlib.import_module", "import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] in FRAMEWORKS
            ):
                found.append((node.lineno, f"{name}({node.args[0].value!r})"))
    return sorted(found)


def test_the_scanner_finds_every_kind_of_backend_branch():
    source = textwrap.dedent(
        """
        import os
        import jax.numpy as jnp
        import tensorflow as tf
        from torch import nn
        from jaxlib import xla_client
        from keras.config import backend
        import importlib
        importlib.import_module("torch.cuda")
        __import__("tensorflow")
        if keras.backend.backend() == "jax":
            pass
        keras.config.backend()
        keras.backend.floatx()
        from keras_distill import backend
        from . import torch
        """
    )
    assert [line for line, _ in backend_branches(source)] == [
        3, 4, 5, 6, 7, 9, 10, 11, 13,
    ]


def test_only_the_backend_package_branches_on_the_backend():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "callbacks.py" in modules and PACKAGE / "targets" / "cache.py" in modules
    branches = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in modules
        if not any(path == allowed or allowed in path.parents for allowed in ALLOWED)
        for line, what in backend_branches(path.read_text(encoding="utf-8"))
    ]
    assert branches == [], (
        "move these into keras_distill/backend/ (an entry point in "
        "backend/__init__.py, the code in the backend's module):\n" + "\n".join(branches)
    )


def test_the_running_backend_module_has_every_hook():
    module = backend._running_backend
    expected = {
        "jax": "keras_distill.backend.jax",
        "tensorflow": "keras_distill.backend.tensorflow",
        "torch": "keras_distill.backend.torch",
    }.get(keras.backend.backend(), "keras_distill.backend.common")
    assert module.__name__ == expected
    assert sorted(module.__all__) == sorted(common.__all__)
    assert all(callable(getattr(module, name)) for name in common.__all__)


def test_host_peak_memory_is_getrusage_max_rss():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = backend.host_peak_memory_bytes()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # `ru_maxrss` is in kilobytes on Linux, in bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    assert before * unit <= peak <= after * unit


# Run in a fresh interpreter where `import resource` fails as on Windows.
_WITHOUT_RESOURCE = """
import collections
import json
import sys
import types


class NoResource:
    def find_spec(self, name, path=None, target=None):
        if name == "resource":
            raise ModuleNotFoundError("No module named 'resource'", name=name)
        return None


sys.modules.pop("resource", None)
sys.meta_path.insert(0, NoResource())
import keras

frameworks_with_keras = sorted(m for m in ("jax", "tensorflow", "torch") if m in sys.modules)
import keras_distill
from keras_distill import backend
from keras_distill import callbacks


def fake_psutil(**memory_info):
    info = collections.namedtuple("pmem", sorted(memory_info))(**memory_info)
    process = types.SimpleNamespace(memory_info=lambda: info)
    return types.SimpleNamespace(Process=lambda: process)


def probe():
    logs = {}
    callbacks.PeakMemory().on_epoch_end(0, logs)
    return {"host": backend.host_peak_memory_bytes(), "logs": logs}


results = {
    "resource_imported": "resource" in sys.modules,
    "frameworks_with_keras": frameworks_with_keras,
    "frameworks": sorted(m for m in ("jax", "tensorflow", "torch") if m in sys.modules),
    "backend_modules": sorted(
        m for m in sys.modules if m.startswith("keras_distill.backend.")
    ),
}
sys.modules["psutil"] = None  # not installed: `import psutil` fails
results["no_psutil"] = probe()
# psutil on Windows reports the peak working set, elsewhere no peak.
sys.modules["psutil"] = fake_psutil(rss=1000, peak_wset=123456789)
results["windows_psutil"] = probe()
sys.modules["psutil"] = fake_psutil(rss=1000)
results["psutil_without_peak"] = probe()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def without_resource():
    """What a fresh `import keras_distill` sees with `resource` blocked."""
    completed = subprocess.run(
        [sys.executable, "-c", _WITHOUT_RESOURCE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_works_without_resource(without_resource):
    assert without_resource["resource_imported"] is False
    # Only the running backend's module (and what it shares) was imported.
    expected = {
        "jax": ["keras_distill.backend.common", "keras_distill.backend.jax"],
        "tensorflow": ["keras_distill.backend.common", "keras_distill.backend.tensorflow"],
        "torch": ["keras_distill.backend.common", "keras_distill.backend.torch"],
    }[keras.backend.backend()]
    assert without_resource["backend_modules"] == expected
    # No framework beyond those Keras itself imported.
    assert without_resource["frameworks"] == without_resource["frameworks_with_keras"]


def test_host_peak_memory_falls_back_to_psutil_then_none(without_resource):
    assert without_resource["no_psutil"] == {"host": None, "logs": {}}
    assert without_resource["windows_psutil"] == {
        "host": 123456789,
        "logs": {"peak_host_memory_mb": 123456789 / 2**20},
    }
    assert without_resource["psutil_without_peak"] == {"host": None, "logs": {}}


def test_tf_numpy_function_and_map_tf_dataset():
    tf = pytest.importorskip("tensorflow")
    rows = np.arange(12, dtype="float32").reshape(6, 2)
    dataset = tf.data.Dataset.from_tensor_slices(rows).batch(4)
    shapes = []

    def attach(batch):
        doubled, sums = backend.tf_numpy_function(
            lambda x: [2 * x, x.sum(1).astype("int32")],
            [batch],
            [("float32", (None, 2)), ("int32", (None,))],
        )
        shapes.append((tuple(doubled.shape), tuple(sums.shape)))
        return batch, doubled, sums

    batches = list(backend.map_tf_dataset(dataset, attach).as_numpy_iterator())
    assert shapes == [((None, 2), (None,))]
    assert [len(batch) for batch, _, _ in batches] == [4, 2]
    for batch, expected in zip(batches, (rows[:4], rows[4:])):
        np.testing.assert_array_equal(batch[0], expected)
        np.testing.assert_array_equal(batch[1], 2 * expected)
        np.testing.assert_array_equal(batch[2], expected.sum(1).astype("int32"))
