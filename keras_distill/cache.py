"""A teacher-output cache: run the teacher once, distill from disk every epoch.

Online distillation runs the teacher on every batch of every epoch. When the
inputs are the same each epoch (no random augmentation), the teacher's outputs
are too, so they can be computed once, stored next to the data and read back:

    cache = TeacherOutputCache.build(teacher, x_train, "runs/teacher_cache")
    distiller = Distiller(student=student, teacher=None)
    distiller.compile(...)
    distiller.fit(cache.dataset(x_train, y_train, batch_size=64), epochs=10)

Storage. One directory holds `manifest.json` and `.npy` arrays with one row
per example, read memory-mapped (`np.load(mmap_mode="r")`), so a cache larger
than RAM works and a batch reads only its own rows. Two formats:

- dense: `teacher_logits.npy`, float16 by default (halves float32; logits are
  distilled at temperatures where float16's 1e-3 relative precision is far
  below the teacher's own noise). float32 is available.
- top-k (`top_k=k`): `teacher_top_log_probs.npy` (float16 log-probabilities at
  T = 1) and `teacher_top_indices.npy` (the smallest unsigned integer type that
  holds the vocabulary), the format `keras_distill.sparse` trains on.

Safety. The manifest records a fingerprint of the teacher's weights, of the
inputs and of a user-given `preprocessing` description; `build` and `open`
refuse a cache whose fingerprint does not match, naming the part that differs.
Rows are written in order and `rows_written` is committed to the manifest
after each batch (by an atomic rename), so a build interrupted half-way is
detected (`complete: false`) and resumed from the last committed row by the
next `build` with the same teacher and data.

Data augmentation changes the inputs every epoch, which a cache cannot follow:
the teacher would label images the student never sees. Use online
distillation (a `Distiller` with a teacher) for augmented pipelines. For the
same reason the cache takes the inputs as NumPy arrays, one row per example,
exactly as the student will see them, and refuses pipeline objects.
"""

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np

from keras_distill.distiller import LABELS
from keras_distill.distiller import TEACHER_LOGITS
from keras_distill.distiller import TEACHER_TOP_INDICES
from keras_distill.distiller import TEACHER_TOP_LOG_PROBS
from keras_distill.sparse import top_k_teacher_targets

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")


def _hash_arrays(arrays):
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def teacher_fingerprint(teacher):
    """SHA-256 of the teacher's weights (trainable and not), in order.

    Args:
        teacher: A Keras model.

    Returns:
        A hex digest string.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> len(teacher_fingerprint(model))
    64
    """
    return _hash_arrays(
        keras.ops.convert_to_numpy(weight) for weight in teacher.weights
    )


def _flat_inputs(inputs):
    """The arrays of NumPy inputs (an array, or a dict/list of arrays)."""
    return [np.asarray(array) for array in keras.tree.flatten(inputs)]


def _num_examples(inputs):
    lengths = {len(array) for array in _flat_inputs(inputs)}
    if len(lengths) != 1:
        raise ValueError(
            "Every input array must have the same number of examples (first "
            f"axis), got lengths {sorted(lengths)}."
        )
    return lengths.pop()


def _slice_inputs(inputs, rows):
    return keras.tree.map_structure(lambda array: np.asarray(array)[rows], inputs)


def _check_inputs(inputs):
    if isinstance(inputs, keras.utils.PyDataset):
        raise TypeError(
            "`inputs` must be NumPy arrays (an array or a dict/list of arrays "
            "with one row per example), got a PyDataset: a cache maps each "
            "example to its teacher outputs by row. Materialize the inputs "
            "with `np.concatenate` over the dataset's batches."
        )
    for array in _flat_inputs(inputs):
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            raise TypeError(
                "`inputs` must be numeric NumPy arrays with one row per "
                f"example, got an array of dtype {array.dtype} and shape "
                f"{array.shape}."
            )


def _write_manifest(directory, manifest):
    # Write-then-rename: a crash leaves either the old or the new manifest.
    temporary = directory / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, directory / MANIFEST)


def _read_manifest(directory):
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _describe_mismatch(expected, found):
    parts = [key for key in expected if expected[key] != found.get(key)]
    names = {
        "teacher": "teacher weights",
        "data": "inputs",
        "preprocessing": "preprocessing",
        "format": "storage format (top_k / dtype)",
    }
    return ", ".join(names.get(part, part) for part in parts)


class TeacherOutputCache:
    """Teacher outputs stored once on disk, one row per example.

    Build one with `TeacherOutputCache.build`, reopen it with
    `TeacherOutputCache.open`, and train from it with `dataset`.

    Args:
        directory: A directory written by `build`.

    Example:

    >>> import tempfile
    >>> teacher = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    >>> x = np.ones((10, 3), "float32")
    >>> cache = TeacherOutputCache.build(teacher, x, tempfile.mkdtemp())
    >>> cache.num_examples, cache.arrays[TEACHER_LOGITS].shape
    (10, (10, 4))
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(
                f"No teacher-output cache in {self.directory} ({MANIFEST} is "
                "missing). Create one with `TeacherOutputCache.build`."
            )
        if not manifest["complete"]:
            raise ValueError(
                f"The cache in {self.directory} is incomplete "
                f"({manifest['rows_written']} of {manifest['num_examples']} "
                "rows): its build was interrupted. Call "
                "`TeacherOutputCache.build` with the same teacher and inputs "
                "to resume it."
            )
        self.manifest = manifest
        self.num_examples = manifest["num_examples"]
        self.arrays = {
            name: np.load(self.directory / f"{name}.npy", mmap_mode="r")
            for name in manifest["arrays"]
        }

    @classmethod
    def build(
        cls,
        teacher,
        inputs,
        directory,
        batch_size=256,
        top_k=None,
        dtype="float16",
        preprocessing=None,
        overwrite=False,
    ):
        """Runs `teacher` once over `inputs` and stores its outputs.

        An existing complete cache with the same fingerprint is returned as
        is (the teacher is not run); an incomplete one is resumed.

        Args:
            teacher: A Keras model returning logits.
            inputs: NumPy inputs: an array or a dict/list of arrays, one row
                per example, exactly as the student will receive them.
            directory: Where to store the cache; created if needed.
            batch_size: Examples per teacher call.
            top_k: Store the `top_k` largest teacher log-probabilities and
                their indices instead of dense logits.
            dtype: `"float16"` (default) or `"float32"` for stored values.
            preprocessing: Any JSON-serializable description of how `inputs`
                were made (tokenizer, sequence length, ...); part of the
                fingerprint.
            overwrite: Replace a complete cache whose fingerprint differs
                instead of raising.

        Returns:
            The `TeacherOutputCache`.
        """
        if not isinstance(teacher, keras.layers.Layer):
            raise TypeError(
                f"`teacher` must be a Keras model, got {type(teacher).__name__}."
            )
        _check_inputs(inputs)
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {DTYPES}, got {dtype!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
            batch_size < 1
        ):
            raise ValueError(
                f"`batch_size` must be a positive int, got {batch_size!r}."
            )
        directory = Path(directory)
        num_examples = _num_examples(inputs)
        if num_examples == 0:
            raise ValueError("`inputs` holds no examples.")
        fingerprint = {
            "teacher": teacher_fingerprint(teacher),
            "data": _hash_arrays(_flat_inputs(inputs)),
            "preprocessing": json.dumps(preprocessing, sort_keys=True),
            "format": json.dumps(
                {"version": FORMAT_VERSION, "top_k": top_k, "dtype": dtype}
            ),
        }
        manifest = _read_manifest(directory)
        if manifest is not None and manifest["fingerprint"] == fingerprint:
            if manifest["complete"]:
                return cls(directory)
            start = manifest["rows_written"]  # resume an interrupted build
        elif manifest is not None and manifest["complete"] and not overwrite:
            raise ValueError(
                f"The cache in {directory} was built with different "
                f"{_describe_mismatch(fingerprint, manifest['fingerprint'])}; "
                "refusing to use or replace stale teacher outputs. Pass "
                "`overwrite=True` to rebuild it, or use another directory."
            )
        else:
            manifest = None
            start = 0

        directory.mkdir(parents=True, exist_ok=True)
        arrays = None
        if manifest is not None:
            arrays = {
                name: np.load(directory / f"{name}.npy", mmap_mode="r+")
                for name in manifest["arrays"]
            }
        for begin in range(start, num_examples, batch_size):
            rows = slice(begin, min(begin + batch_size, num_examples))
            outputs = cls._teacher_outputs(
                teacher, _slice_inputs(inputs, rows), top_k, dtype
            )
            if arrays is None:
                arrays = {
                    name: np.lib.format.open_memmap(
                        directory / f"{name}.npy",
                        mode="w+",
                        dtype=values.dtype,
                        shape=(num_examples, *values.shape[1:]),
                    )
                    for name, values in outputs.items()
                }
                manifest = {
                    "fingerprint": fingerprint,
                    "num_examples": num_examples,
                    "rows_written": 0,
                    "complete": False,
                    "arrays": sorted(arrays),
                }
            for name, values in outputs.items():
                arrays[name][rows] = values
                arrays[name].flush()
            manifest["rows_written"] = rows.stop
            _write_manifest(directory, manifest)
        manifest["complete"] = True
        _write_manifest(directory, manifest)
        del arrays
        return cls(directory)

    @staticmethod
    def _teacher_outputs(teacher, batch, top_k, dtype):
        # A compiled inference step, as `predict` runs it.
        logits = teacher.predict_on_batch(batch)
        if top_k is None:
            return {TEACHER_LOGITS: np.asarray(logits).astype(dtype)}
        log_probs, indices = top_k_teacher_targets(logits, top_k)
        indices = keras.ops.convert_to_numpy(indices)
        vocabulary_size = logits.shape[-1]
        index_dtype = np.min_scalar_type(vocabulary_size - 1)
        return {
            TEACHER_TOP_LOG_PROBS: keras.ops.convert_to_numpy(log_probs).astype(
                dtype
            ),
            TEACHER_TOP_INDICES: indices.astype(index_dtype),
        }

    @classmethod
    def open(cls, directory, teacher=None, inputs=None, preprocessing=None):
        """Opens a complete cache, checking what you pass against it.

        Args:
            directory: The cache directory.
            teacher: If given, its weights must match the cache's.
            inputs: If given, they must match the cached inputs.
            preprocessing: If `teacher` or `inputs` is given, the
                preprocessing description must match too.

        Returns:
            The `TeacherOutputCache`.
        """
        cache = cls(directory)
        stored = cache.manifest["fingerprint"]
        given = {}
        if teacher is not None:
            given["teacher"] = teacher_fingerprint(teacher)
        if inputs is not None:
            given["data"] = _hash_arrays(_flat_inputs(inputs))
        if given:
            given["preprocessing"] = json.dumps(preprocessing, sort_keys=True)
        mismatch = _describe_mismatch(given, stored)
        if mismatch:
            raise ValueError(
                f"The cache in {directory} is stale: it was built with "
                f"different {mismatch}. Rebuild it with "
                "`TeacherOutputCache.build(..., overwrite=True)`."
            )
        return cache

    def targets(self, rows):
        """Teacher outputs of the examples `rows`, as the Distiller reads them.

        Args:
            rows: Integer indices or a slice of examples.

        Returns:
            A dict of float32 (values) and int32 (indices) arrays.
        """
        targets = {}
        for name, array in self.arrays.items():
            values = np.asarray(array[rows])
            kind = "int32" if name == TEACHER_TOP_INDICES else "float32"
            targets[name] = values.astype(kind)
        return targets

    def dataset(
        self,
        inputs,
        labels=None,
        sample_weight=None,
        batch_size=32,
        shuffle=True,
        seed=None,
    ):
        """Batches of `(inputs, {"labels", teacher outputs}[, sample_weight])`.

        Args:
            inputs: The NumPy inputs the cache was built from (same rows).
            labels: Optional labels, one row per example.
            sample_weight: Optional per-example weights.
            batch_size: Examples per batch.
            shuffle: Reshuffle the examples every epoch; each example keeps
                its own teacher outputs.
            seed: Seed of the shuffling.

        Returns:
            A `keras.utils.PyDataset` for `Distiller.fit` / `evaluate`.
        """
        if _num_examples(inputs) != self.num_examples:
            raise ValueError(
                f"`inputs` has {_num_examples(inputs)} examples but the cache "
                f"holds {self.num_examples}: pass the inputs it was built from."
            )
        return CachedTeacherDataset(
            self, inputs, labels, sample_weight, batch_size, shuffle, seed
        )


class CachedTeacherDataset(keras.utils.PyDataset):
    """Training batches joined with their cached teacher outputs.

    Made by `TeacherOutputCache.dataset`; see there for the arguments.
    """

    def __init__(
        self, cache, inputs, labels, sample_weight, batch_size, shuffle, seed
    ):
        super().__init__()
        self.cache = cache
        self.inputs = inputs
        self.labels = labels
        self.sample_weight = sample_weight
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(cache.num_examples)
        self.on_epoch_end()

    def __len__(self):
        return -(-self.cache.num_examples // self.batch_size)

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(self.cache.num_examples)

    def __getitem__(self, index):
        # Sorted rows read the memory map sequentially; the batch's order
        # inside itself does not matter to the loss.
        rows = np.sort(
            self._order[index * self.batch_size : (index + 1) * self.batch_size]
        )
        targets = self.cache.targets(rows)
        if self.labels is not None:
            targets[LABELS] = np.asarray(self.labels)[rows]
        batch = (_slice_inputs(self.inputs, rows), targets)
        if self.sample_weight is not None:
            batch += (np.asarray(self.sample_weight)[rows],)
        return batch
