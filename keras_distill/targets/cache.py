"""A teacher-output cache: run the teacher once, distill from disk every epoch.

Online distillation runs the teacher on every batch of every epoch. When the
inputs are the same each epoch (no random augmentation), the teacher's outputs
are too, so they can be computed once, stored next to the data and read back:

    cache = TeacherOutputCache.build(teacher, x_train, "runs/teacher_cache")
    distiller = Distiller(student=student, teacher=None)
    distiller.compile(...)
    distiller.fit(cache.dataset(x_train, y_train, batch_size=64), epochs=10)

Inputs. `build` takes NumPy arrays (one row per example), a `tf.data.Dataset`,
a `keras.utils.PyDataset` or any iterable of batches (a Python generator),
each batch `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)` as `fit` takes
them; only `x` reaches the teacher. `dataset` joins the teacher's outputs to
NumPy arrays (and batches and shuffles them) or to a pipeline of the same
kinds, which keeps its own batching and shuffling.

Matching examples to outputs. Every example is hashed as it streams (BLAKE2b,
128 bits, over its bytes, dtypes and shapes), and the cache keeps a sorted
index from these digests to its rows. An example's row is found from the
example itself, so any order, batching or shuffling of the inputs (a
shuffled `tf.data` pipeline, a `PyDataset` that reshuffles every epoch, a
subset of the arrays) keeps each example with its own teacher outputs, and an
example the cache has never seen is refused by name rather than given another
example's outputs.

Data augmentation changes the inputs every epoch, which a cache cannot follow:
the teacher would label images the student never sees. Such examples are not
in the cache, so the first one stops training with an error. `build` also
refuses pipelines it can tell are random: a `tf.data.Dataset` or `PyDataset`
whose first batch differs between two reads, and Keras random preprocessing
layers (anything holding a `keras.random.SeedGenerator`, e.g. `RandomFlip`)
passed as `preprocessing`. Use online distillation (a `Distiller` with a
teacher) for augmented pipelines.

Storage. One directory holds `manifest.json` and flat binary files with one
row per example, appended batch by batch and read memory-mapped
(`np.memmap`), so a cache larger than RAM works and a batch reads only its
own rows. Formats:

- `"float16"` (default) or `"float32"` dense logits: `teacher_logits.bin`
  holds each row's logits minus the row's largest one, and
  `teacher_logit_offsets.bin` (float32) that largest logit; `targets` adds
  them back. Relative to its maximum, a logit keeps float16's 1e-3 relative
  precision where the probability is, whatever the logits' scale (logits
  near 1,000, or beyond float16's 65,504, come back to float32 precision of
  the offset). float16 halves float32; a row whose logits span more than
  65,504 is refused, naming `format="float32"`.
- top-k (`top_k=k`): `teacher_top_log_probs.bin` (log-probabilities at T = 1
  in the chosen float type) and `teacher_top_indices.bin` (the smallest
  unsigned integer type that holds the vocabulary), the format
  `keras_distill.losses.sparse` trains on.
- compact top-k (`top_k=k, format="compact"`): `keras_distill.targets.codec`'s
  records, about a third of the float16 top-k size (k = 256 at V = 262,144:
  about 520 bytes per token instead of 1,536), indices exact and each
  position's distribution over its k entries within 1e-3 total variation of
  the teacher's. `compact_payload.bin` holds the records, `compact_token_bytes`
  their sizes and `compact_row_ends` where each example's records end, so a
  batch reads and decodes only its own rows.

Safety. The manifest records a fingerprint of the teacher's weights, of the
`preprocessing` (a JSON description, or the Keras layers themselves: their
configs and weights), of the storage format and of the data (the sorted
example digests). `build` and `open` refuse a cache whose fingerprint does not
match, naming the part that differs. Rows are appended and `rows_written` is
committed to the manifest after each batch (by an atomic rename, after the
data is flushed to disk), so a build interrupted half-way is detected
(`complete: false`), never read, and resumed by the next `build` with the same
teacher: examples already stored are skipped, the teacher runs on the rest.

Integrity. The manifest also records every file's size and a 64-bit BLAKE2b
checksum of each 4 MiB block of it, computed from the bytes as they are
written, and a checksum of itself. Opening a cache (`open`, and `build` when
it returns a complete cache) checks every size, and with `verify="full"`
(default) every block: a short, missing or changed file is a
`DamagedCacheError` naming the file (and the block and rows), never
training data. Checking reads the whole cache once (BLAKE2b on one core:
about 500 MiB/s from the page cache, i.e. 20 s for 10 GB; a cold read is
bounded by the disk); `verify="sample"` checks the digest and index files
whole (40 bytes per example) and 64 random blocks (256 MiB, about 0.6 s) of
every other file, `verify="none"` sizes only. A damaged cache is
rebuilt by `build(..., overwrite=True)`. Builds take a lock on the directory
(`fcntl.flock` on the file `build.lock`, released by the system however the
process ends): a second `build` into the same directory waits, warning which
process it waits for, then reuses or resumes what the first one wrote. On
systems without `fcntl` (Windows) builds are not locked: give each process
its own directory there.
"""

import concurrent.futures
import hashlib
import json
import os
import socket
import sys
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: builds are not locked (see the module docstring).
    fcntl = None
import keras
import numpy as np

from keras_distill import backend
from keras_distill.checks import check_positive_int
from keras_distill.targets import codec
from keras_distill.targets.keys import LABELS
from keras_distill.targets.keys import TEACHER_LOGITS
from keras_distill.targets.keys import TEACHER_TOP_INDICES
from keras_distill.targets.keys import TEACHER_TOP_LOG_PROBS
from keras_distill.targets.top_k import top_k_teacher_targets

MANIFEST = "manifest.json"


# 3: logits relative to each row's maximum, per-block checksums, build.lock.
FORMAT_VERSION = 3


LOCK = "build.lock"


FORMATS = ("float16", "float32", "compact")


# The compact format's files: the token records (variable size), each row's
# token record sizes, and where each row's records end in the payload.
COMPACT_PAYLOAD = "compact_payload"


COMPACT_TOKEN_BYTES = "compact_token_bytes"


COMPACT_ROW_ENDS = "compact_row_ends"


DIGESTS = "example_digests"


DIGEST_INDEX = "digest_index"


DIGEST_ROWS = "digest_rows"


# 128-bit digests: a collision among 1e12 examples has probability ~1e-15.
DIGEST_BYTES = 16


DIGEST_DTYPE = np.dtype(f"S{DIGEST_BYTES}")


# Each dense-logits row's largest logit (float32); `teacher_logits` holds the
# logits minus it.
LOGIT_OFFSETS = "teacher_logit_offsets"


# Checksums: 64-bit BLAKE2b per block of each file. Corruption is not
# adversarial, so a 2^-64 chance of missing a damaged block is plenty, and a
# 1 TB cache's checksums stay about 4 MB of manifest.
CHECKSUM_BLOCK_BYTES = 1 << 22


CHECKSUM_BYTES = 8


VERIFY_MODES = ("full", "sample", "none")


# verify="sample": blocks checked per file outside the digest and index files.
SAMPLE_BLOCKS = 64


# The files that decide which example gets which row: checked whole by
# verify="sample" too (40 bytes per example).
_INDEX_FILES = (DIGESTS, DIGEST_INDEX, DIGEST_ROWS)


class DamagedCacheError(ValueError):
    """A cache file is missing, short, or differs from its checksum.

    Raised by `TeacherOutputCache` (`open`, `build`) instead of reading wrong
    teacher outputs; `TeacherOutputCache.build(..., overwrite=True)` rebuilds
    the cache.
    """


def _hash_arrays(arrays):
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        # ml_dtypes' bfloat16 is a structured "V2" to NumPy, which neither
        # names it nor lets a memoryview read it; its bytes are viewed.
        dtype = array.dtype.name if array.dtype.kind == "V" else array.dtype.str
        digest.update(str((dtype, array.shape)).encode())
        digest.update(memoryview(array.reshape(-1).view(np.uint8)))
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
    # `np.asarray` reads a host-resident weight in place (the bytes
    # `convert_to_numpy` would copy), so only the hashing costs: about 0.6 s
    # for a 1 GB teacher instead of 1.6 s.
    return _hash_arrays(np.asarray(weight) for weight in teacher.weights)


def _random_layers(layers):
    """Names of the layers (and sublayers) that draw random numbers."""
    names = []
    for layer in layers:
        for sublayer in layer._flatten_layers(include_self=True):
            if any(
                isinstance(value, keras.random.SeedGenerator)
                for value in vars(sublayer).values()
            ):
                names.append(f"{sublayer.name} ({type(sublayer).__name__})")
    return names


def preprocessing_fingerprint(preprocessing):
    """A string identifying how the inputs were made, for the fingerprint.

    Args:
        preprocessing: `None`, a JSON-serializable description (tokenizer,
            sequence length, ...), or the Keras layers the pipeline applies
            (a layer or a list of layers); layers are identified by their
            configs and weights.

    Returns:
        A string.

    Raises:
        ValueError: If a layer draws random numbers (random augmentation).

    Example:

    >>> preprocessing_fingerprint({"sequence_length": 64})
    '{"sequence_length": 64}'
    """
    layers = preprocessing
    if isinstance(layers, keras.layers.Layer):
        layers = [layers]
    if isinstance(layers, (list, tuple)) and layers and all(
        isinstance(layer, keras.layers.Layer) for layer in layers
    ):
        random_layers = _random_layers(layers)
        if random_layers:
            raise ValueError(
                "`preprocessing` holds random layers "
                f"{random_layers}: random augmentation changes the inputs "
                "every epoch, which a teacher-output cache cannot follow. "
                "Cache the unaugmented inputs, or distill online (a "
                "`Distiller` with a teacher) for augmented pipelines."
            )
        description = {
            "layers": [
                keras.saving.serialize_keras_object(layer) for layer in layers
            ],
            "weights": _hash_arrays(
                keras.ops.convert_to_numpy(weight)
                for layer in layers
                for weight in layer.weights
            ),
        }
        return json.dumps(description, sort_keys=True, default=str)
    try:
        return json.dumps(preprocessing, sort_keys=True)
    except TypeError as error:
        raise TypeError(
            "`preprocessing` must be JSON-serializable (a description such as "
            '`{"tokenizer": "gemma3", "sequence_length": 512}`) or Keras '
            f"preprocessing layers, got {type(preprocessing).__name__}: {error}"
        ) from None


# Inputs: NumPy arrays or a stream of batches.


def _tf_dataset_class():
    # A tf.data.Dataset exists only if TensorFlow was imported by its maker.
    tensorflow = sys.modules.get("tensorflow")
    return getattr(getattr(tensorflow, "data", None), "Dataset", None)


def _is_stream(data):
    if isinstance(data, keras.utils.PyDataset):
        return True
    dataset_class = _tf_dataset_class()
    if dataset_class is not None and isinstance(data, dataset_class):
        return True
    if isinstance(data, (dict, list, tuple, str, bytes)):
        return False
    return hasattr(data, "__iter__") and not hasattr(data, "__array__")


def _to_numpy(structure):
    def convert(value):
        array = np.asarray(keras.ops.convert_to_numpy(value))
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            raise TypeError(
                "The inputs must be numeric arrays with one row per example "
                f"(first axis), got an array of dtype {array.dtype} and shape "
                f"{array.shape}."
            )
        return array

    return keras.tree.map_structure(convert, structure)


def _batch_inputs(batch):
    """The `x` of a batch given as `x`, `(x,)`, `(x, y)` or `(x, y, w)`."""
    inputs, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
    return _to_numpy(inputs)


def _num_examples(inputs):
    lengths = {len(array) for array in keras.tree.flatten(inputs)}
    if len(lengths) != 1:
        raise ValueError(
            "Every input array must have the same number of examples (first "
            f"axis), got lengths {sorted(lengths)}."
        )
    return lengths.pop()


def _slice_inputs(inputs, rows):
    return keras.tree.map_structure(lambda array: array[rows], inputs)


def _check_arrays(inputs):
    """NumPy inputs, converted and checked, or a clear error."""
    if isinstance(inputs, (str, bytes)) or inputs is None:
        raise TypeError(
            "`inputs` must be NumPy arrays (an array or a dict/list of arrays "
            "with one row per example), a tf.data.Dataset, a "
            "keras.utils.PyDataset or an iterable of batches, got "
            f"{type(inputs).__name__}."
        )
    inputs = _to_numpy(inputs)
    if _num_examples(inputs) == 0:
        raise ValueError("`inputs` holds no examples.")
    return inputs


def _first_batch(data):
    if isinstance(data, keras.utils.PyDataset):
        return data[0]
    return next(data.take(1).as_numpy_iterator())


def _check_deterministic(data):
    """Refuses a re-readable pipeline whose first batch differs between reads."""
    if not isinstance(data, keras.utils.PyDataset) and not (
        isinstance(data, _tf_dataset_class() or ())
    ):
        return
    if isinstance(data, keras.utils.PyDataset) and not data.num_batches:
        raise ValueError(
            "`inputs` is an infinite (or empty) PyDataset; a cache needs "
            "every example once: give it a finite `num_batches`."
        )
    first, second = (
        keras.tree.flatten(_batch_inputs(_first_batch(data))) for _ in range(2)
    )
    if len(first) != len(second) or any(
        a.shape != b.shape or not np.array_equal(a, b, equal_nan=True)
        for a, b in zip(first, second)
    ):
        raise ValueError(
            "`inputs` is random: two reads of its first batch differ. A "
            "teacher-output cache is built from the exact examples the "
            "student will see, so build it from the pipeline without random "
            "augmentation or shuffling (shuffle when training: the cache "
            "finds each example's outputs by content, in any order), or "
            "distill online (a `Distiller` with a teacher)."
        )


def _input_batches(inputs, batch_size):
    """Yields the `x` of each batch as NumPy structures."""
    if not _is_stream(inputs):
        inputs = _check_arrays(inputs)
        num_examples = _num_examples(inputs)
        for begin in range(0, num_examples, batch_size):
            yield _slice_inputs(inputs, slice(begin, begin + batch_size))
        return
    if isinstance(inputs, keras.utils.PyDataset):
        for index in range(inputs.num_batches):
            yield _batch_inputs(inputs[index])
        return
    if isinstance(inputs, _tf_dataset_class() or ()):
        inputs = inputs.as_numpy_iterator()
    for batch in inputs:
        yield _batch_inputs(batch)


def example_digests(inputs):
    """128-bit BLAKE2b digests of each example (row) of NumPy inputs.

    Two examples get the same digest exactly when their arrays have the same
    structure, dtypes, shapes and bytes.

    Args:
        inputs: An array or a dict/list of arrays with one row per example.

    Returns:
        A NumPy array of dtype `S16`, one digest per example.

    Example:

    >>> digests = example_digests(np.array([[1, 2], [3, 4], [1, 2]]))
    >>> digests.shape, bool(digests[0] == digests[2]), bool(digests[0] == digests[1])
    ((3,), True, False)
    """
    leaves = keras.tree.flatten_with_path(inputs)
    num_examples = _num_examples([array for _, array in leaves])
    hashers = [hashlib.blake2b(digest_size=DIGEST_BYTES) for _ in range(num_examples)]
    for path, array in leaves:
        array = np.ascontiguousarray(array)
        spec = f"{path}:{array.dtype.str}:{array.shape[1:]};".encode()
        row_bytes = array.nbytes // max(num_examples, 1)
        view = memoryview(array.reshape(-1)).cast("B")
        for row, hasher in enumerate(hashers):
            hasher.update(spec)
            hasher.update(view[row * row_bytes : (row + 1) * row_bytes])
    return np.array([hasher.digest() for hasher in hashers], DIGEST_DTYPE)


def _data_fingerprint(digests):
    unique = np.unique(np.asarray(digests, DIGEST_DTYPE))
    return hashlib.sha256(unique.tobytes()).hexdigest()


# Storage.


def _manifest_checksum(manifest):
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    text = json.dumps(body, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).hexdigest()


def _write_manifest(directory, manifest):
    # Write-then-rename: a crash leaves either the old or the new manifest.
    manifest["checksum"] = _manifest_checksum(manifest)
    temporary = directory / (MANIFEST + ".tmp")
    with open(temporary, "w") as file:
        file.write(json.dumps(manifest, indent=2))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, directory / MANIFEST)


def _damaged(directory, problem):
    return DamagedCacheError(
        f"The teacher-output cache in {directory} {problem}. Rebuild it with "
        "`TeacherOutputCache.build(..., overwrite=True)`, or restore the "
        "directory from an intact copy."
    )


def _read_manifest(directory):
    """The manifest, `None` if there is none; any other version as it is.

    Raises:
        DamagedCacheError: If it is not a manifest this module wrote
            (truncated, overwritten, or not matching its checksum).
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # Not JSON, or not UTF-8.
        manifest = None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise _damaged(
            directory, f"is damaged: {MANIFEST} is unreadable (truncated or "
            "overwritten)"
        )
    if manifest["format_version"] == FORMAT_VERSION and manifest.get(
        "checksum"
    ) != _manifest_checksum(manifest):
        raise _damaged(
            directory, f"is damaged: {MANIFEST} does not match its checksum"
        )
    return manifest


def _check_version(directory, manifest):
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(
            f"The cache in {directory} was written in format {version} by "
            "another version of keras_distill; this one reads format "
            f"{FORMAT_VERSION} (logits relative to each row's maximum, "
            "checksummed blocks). Rebuild it with "
            "`TeacherOutputCache.build(..., overwrite=True)`."
        )


def _describe_mismatch(expected, found):
    parts = [key for key in expected if expected[key] != found.get(key)]
    names = {
        "teacher": "teacher weights",
        "data": "inputs",
        "preprocessing": "preprocessing",
        "format": "storage format (top_k / format)",
    }
    return ", ".join(names.get(part, part) for part in parts)


def _plan(directory, fingerprint, overwrite):
    """What `build` does with `directory`: `(plan, manifest)`.

    `"reuse"` a complete cache of this fingerprint (read only), `"resume"`
    (or extend) the committed rows of `manifest`, or start `"fresh"`.

    Raises:
        ValueError: Unless `overwrite`, for a complete cache of another
            fingerprint or format version, or a damaged manifest.
    """
    try:
        manifest = _read_manifest(directory)
    except DamagedCacheError:
        if overwrite:
            return "fresh", None
        raise
    if manifest is None:
        return "fresh", None
    complete = manifest.get("complete", False)
    if manifest["format_version"] != FORMAT_VERSION:
        if complete and not overwrite:
            _check_version(directory, manifest)
        return "fresh", None  # Rows of another format cannot be resumed.
    if manifest["fingerprint"] != fingerprint:
        if complete and not overwrite:
            raise ValueError(
                f"The cache in {directory} was built with different "
                f"{_describe_mismatch(fingerprint, manifest['fingerprint'])}"
                "; refusing to use or replace stale teacher outputs. Pass "
                "`overwrite=True` to rebuild it, or use another directory."
            )
        # An incomplete cache of another teacher was never usable.
        return "fresh", None
    if complete and not overwrite:
        return "reuse", manifest
    return "resume", manifest


def _check_verify(verify):
    if verify not in VERIFY_MODES:
        raise ValueError(
            f"`verify` must be one of {VERIFY_MODES}, got {verify!r}."
        )


def _checksum(data):
    return hashlib.blake2b(data, digest_size=CHECKSUM_BYTES).hexdigest()


def _row_bytes(manifest, name):
    """Bytes per example of the file `name`; `None` for variable-size rows."""
    if name in (DIGESTS, DIGEST_INDEX):
        return DIGEST_BYTES
    if name == DIGEST_ROWS:
        return np.dtype(np.int64).itemsize
    if name == COMPACT_PAYLOAD:
        return None
    spec = manifest["arrays"][name]
    return np.dtype(spec["dtype"]).itemsize * int(np.prod(spec["shape"]))


def _describe_size(manifest, name, size):
    expected = manifest["files"][name]["bytes"]
    if size > expected:
        return f"{name}.bin has {size - expected:,} bytes more than {MANIFEST} records"
    row_bytes = _row_bytes(manifest, name)
    held = f"{size:,} of the {expected:,} bytes {MANIFEST} records"
    if row_bytes:
        held = (
            f"{size // row_bytes:,} of the {expected // row_bytes:,} rows "
            f"{MANIFEST} records ({size:,} of {expected:,} bytes)"
        )
    return f"{name}.bin holds {held}: a partial copy, or a full disk?"


def _describe_block(manifest, name, index, start, end):
    where = f"{name}.bin block {index} (bytes {start}-{end})"
    row_bytes = _row_bytes(manifest, name)
    if row_bytes:
        where += f", rows {start // row_bytes}-{(end - 1) // row_bytes}"
    return where


def _check_files(directory, manifest, verify, names=None):
    """Checks the cache's files (or `names`) against the manifest.

    Sizes always (a complete cache's exactly; an incomplete one may hold
    uncommitted bytes after its committed ones), and with `verify="full"`
    every block's checksum, with `"sample"` those of the digest and index
    files and up to `SAMPLE_BLOCKS` random blocks of each other file.

    Raises:
        DamagedCacheError: Naming the first missing, short or changed file
            (and block).
    """
    block_bytes = manifest["block_bytes"]
    rng = np.random.default_rng()
    for name, entry in manifest["files"].items():
        if names is not None and name not in names:
            continue
        path = Path(directory) / f"{name}.bin"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise _damaged(directory, f"lacks {path.name}") from None
        expected = entry["bytes"]
        if size < expected or (manifest["complete"] and size != expected):
            raise _damaged(
                directory, f"is damaged: {_describe_size(manifest, name, size)}"
            )
        if verify == "none":
            continue
        checksums = entry["blocks"]
        digits = 2 * CHECKSUM_BYTES  # hex digits per block
        blocks = range(len(checksums) // digits)
        if (
            verify == "sample"
            and name not in _INDEX_FILES
            and len(blocks) > SAMPLE_BLOCKS
        ):
            blocks = np.sort(rng.choice(len(blocks), SAMPLE_BLOCKS, replace=False))
        with open(path, "rb") as file:
            for index in map(int, blocks):
                start = index * block_bytes
                file.seek(start)
                data = file.read(min(block_bytes, expected - start))
                stored = checksums[index * digits : (index + 1) * digits]
                if _checksum(data) != stored:
                    where = _describe_block(
                        manifest, name, index, start, start + len(data)
                    )
                    raise _damaged(
                        directory,
                        f"is damaged: {where} does not match its checksum",
                    )


def _memmap(path, dtype, rows, row_shape, mode="r"):
    if rows == 0:
        return np.zeros((0, *row_shape), dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=(rows, *row_shape))


_OUTPUT_NAMES = (
    TEACHER_LOGITS,
    LOGIT_OFFSETS,
    TEACHER_TOP_LOG_PROBS,
    TEACHER_TOP_INDICES,
)


def _remove_cache_files(directory):
    """Removes this module's files (and only those) from `directory`.

    `build.lock` stays: removing it while another process waits on it would
    let a third lock a new file while the second locks the old one.
    """
    names = [MANIFEST, MANIFEST + ".tmp"]
    for name in (
        DIGESTS,
        DIGEST_INDEX,
        DIGEST_ROWS,
        COMPACT_PAYLOAD,
        COMPACT_TOKEN_BYTES,
        COMPACT_ROW_ENDS,
        *_OUTPUT_NAMES,
    ):
        names += [f"{name}.bin", f"{name}.bin.tmp", f"{name}.npy"]  # .npy: format 1
    for name in names:
        (Path(directory) / name).unlink(missing_ok=True)


class _DirectoryLock:
    """A lock on a cache directory: one writer, or any number of readers.

    `fcntl.flock` on the directory's `build.lock`, which the system releases
    when its holder exits however it exits, so a killed build leaves no stale
    lock. A writer records who it is in the file for the processes that
    wait. A reader locks only an existing lock file and writes nothing, so a
    complete cache in a read-only directory opens. Without `fcntl` (Windows)
    nothing is locked.

    Args:
        directory: The cache directory (it must exist for a writer).
        exclusive: Whether to lock for writing.
    """

    def __init__(self, directory, exclusive):
        self.directory = Path(directory)
        self.exclusive = exclusive
        self.descriptor = None

    def __enter__(self):
        path = self.directory / LOCK
        if fcntl is None or not (self.exclusive or path.exists()):
            return self  # Without a lock file, no build has run here.
        flags = os.O_RDWR | os.O_CREAT if self.exclusive else os.O_RDONLY
        self.descriptor = os.open(path, flags, 0o666)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        if not self._try_lock(mode):
            holder = os.pread(self.descriptor, 256, 0).decode(errors="replace")
            warnings.warn(
                f"Waiting for {holder or 'another process'} to finish with "
                f"the teacher-output cache in {self.directory} (it holds "
                f"{LOCK}).",
                stacklevel=3,
            )
            fcntl.flock(self.descriptor, mode)
        if self.exclusive:
            holder = f"pid {os.getpid()} on {socket.gethostname()} (building it)"
            os.ftruncate(self.descriptor, 0)
            os.pwrite(self.descriptor, holder.encode(), 0)
        return self

    def _try_lock(self, mode):
        try:
            fcntl.flock(self.descriptor, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __exit__(self, *exc_info):
        if self.descriptor is None:
            return
        if self.exclusive:
            os.ftruncate(self.descriptor, 0)
        os.close(self.descriptor)  # Releases the lock.
        self.descriptor = None


class _Writer:
    """Appends rows to a cache directory and commits them to its manifest.

    Each file's block checksums are computed from the bytes as they are
    written (a running hash of the last, open block), so what `open`
    verifies is what the teacher produced, not what the disk gave back.
    """

    def __init__(self, directory, manifest):
        self.directory = directory
        self.manifest = manifest
        self._open_blocks = {}  # name: hasher of its last, partial block
        if manifest["rows_written"] == 0:
            _remove_cache_files(directory)
            _write_manifest(directory, manifest)
            return
        block_bytes = manifest["block_bytes"]
        for name, entry in manifest["files"].items():
            path = self._path(name)
            # Bytes appended after the last committed manifest are dropped;
            # the caller checked that the committed ones are all there.
            os.truncate(path, entry["bytes"])
            tail = entry["bytes"] % block_bytes
            if tail:
                with open(path, "rb") as file:
                    file.seek(entry["bytes"] - tail)
                    self._open_blocks[name] = hashlib.blake2b(
                        file.read(tail), digest_size=CHECKSUM_BYTES
                    )

    def _path(self, name):
        return self.directory / f"{name}.bin"

    def _add_checksums(self, name, data):
        """Extends `name`'s size and block checksums by the bytes `data`."""
        entry = self.manifest["files"].setdefault(name, {"bytes": 0, "blocks": ""})
        block_bytes = self.manifest["block_bytes"]
        size, checksums = entry["bytes"], entry["blocks"]
        hasher = self._open_blocks.pop(name, None)
        if hasher is None:
            hasher = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
        else:
            checksums = checksums[: -2 * CHECKSUM_BYTES]  # The open block's.
        data = memoryview(data)
        while data:
            chunk = data[: block_bytes - size % block_bytes]
            hasher.update(chunk)
            size += len(chunk)
            data = data[len(chunk) :]
            if size % block_bytes == 0:
                checksums += hasher.hexdigest()
                hasher = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
        if size % block_bytes:
            checksums += hasher.hexdigest()
            self._open_blocks[name] = hasher
        entry.update(bytes=size, blocks=checksums)

    def _append(self, name, data):
        with open(self._path(name), "ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        self._add_checksums(name, data)

    def _replace(self, name, data):
        # Write-then-rename: a process reading the old file keeps it whole.
        temporary = self.directory / f"{name}.bin.tmp"
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self._path(name))
        self.manifest["files"].pop(name, None)
        self._open_blocks.pop(name, None)
        self._add_checksums(name, data)

    def append(self, digests, outputs):
        outputs = dict(outputs)
        if COMPACT_PAYLOAD in outputs:
            # Rows of variable size: record where each one ends.
            row_bytes = outputs[COMPACT_TOKEN_BYTES].reshape(len(digests), -1)
            outputs[COMPACT_ROW_ENDS] = (
                self.manifest["payload_bytes"] + np.cumsum(row_bytes.sum(axis=1))
            ).astype(np.uint64)
        arrays = self.manifest["arrays"]
        if not arrays:
            self.manifest["arrays"] = arrays = {
                name: {"dtype": values.dtype.str, "shape": list(values.shape[1:])}
                for name, values in outputs.items()
            }
        for name, values in outputs.items():
            if name == COMPACT_PAYLOAD:
                continue
            if list(values.shape[1:]) != arrays[name]["shape"]:
                raise ValueError(
                    f"The teacher's outputs ({name}) have shape "
                    f"{values.shape[1:]} per example in this batch but "
                    f"{tuple(arrays[name]['shape'])} in earlier ones: every "
                    "example must give outputs of one shape (pad sequences to "
                    "one length)."
                )
        for name, values in [(DIGESTS, digests), *outputs.items()]:
            self._append(name, np.ascontiguousarray(values).tobytes())
        self.manifest["rows_written"] += len(digests)
        if COMPACT_PAYLOAD in outputs:
            self.manifest["payload_bytes"] += len(outputs[COMPACT_PAYLOAD])
        _write_manifest(self.directory, self.manifest)

    def finish(self, data_fingerprint):
        rows = self.manifest["rows_written"]
        # The index is made from the stored digests: they must be intact.
        _check_files(self.directory, self.manifest, "full", names=[DIGESTS])
        digests = np.fromfile(self._path(DIGESTS), DIGEST_DTYPE, count=rows)
        order = np.argsort(digests, kind="stable")
        self._replace(DIGEST_INDEX, digests[order].tobytes())
        self._replace(DIGEST_ROWS, order.astype(np.int64).tobytes())
        self.manifest.update(complete=True, data=data_fingerprint, index_rows=rows)
        _write_manifest(self.directory, self.manifest)


class _TopKTeacher(keras.Model):
    """The teacher followed by `top_k_teacher_targets`, one compiled step.

    Its `predict_on_batch` returns only the top-k log-probabilities and
    indices: the dense logits, `(batch, ..., V)` floats (8 GB for 8,192
    tokens of Gemma 3's 262,144 entries), never leave the device and the
    top-k runs inside the teacher's compiled function. It follows the
    teacher's `jit_compile` and `run_eagerly`, and is kept with the teacher
    (`_top_k_teacher`) so that later builds reuse its compiled function.
    """

    def __init__(self, teacher, top_k):
        super().__init__(name=f"{teacher.name}_top_{top_k}")
        self.teacher = teacher
        self.top_k = top_k
        self.num_classes = None
        self.jit_compile = teacher.jit_compile
        self.run_eagerly = teacher.run_eagerly

    def call(self, inputs):
        logits = self.teacher(inputs, training=False)
        # Static at trace time: the codec needs V, which the indices lack.
        self.num_classes = int(logits.shape[-1])
        return top_k_teacher_targets(logits, self.top_k)


def _top_k_teacher(teacher, top_k):
    """The teacher's `_TopKTeacher` for `top_k`, made once per teacher."""
    # Kept in the teacher's `__dict__`, past Keras's attribute tracking: a
    # tracked model attribute would become a sublayer of the teacher (and
    # change its weights); this way it lives exactly as long as the teacher.
    predictors = teacher.__dict__.setdefault("_keras_distill_top_k", {})
    if top_k not in predictors:
        predictors[top_k] = _TopKTeacher(teacher, top_k)
    return predictors[top_k]


def _relative_to_row_max(logits):
    """Each row's logits minus its largest finite logit, and those maxima.

    Every loss on the cached logits goes through a softmax, which a per-row
    shift does not change; stored relative to its maximum, a logit keeps the
    storage type's relative precision where the probability mass is,
    whatever the logits' scale. Non-finite logits stay as they are (a row
    with no finite one is stored unshifted).
    """
    logits = np.asarray(logits, np.float32)
    maxima = np.max(np.where(np.isfinite(logits), logits, -np.inf), axis=-1)
    maxima = np.where(np.isfinite(maxima), maxima, np.float32(0))
    return logits - maxima[..., None], maxima


def _stored(teacher_outputs, format):
    """The arrays a cache stores for `_teacher_outputs` in `format`."""
    if TEACHER_LOGITS in teacher_outputs:
        relative, maxima = _relative_to_row_max(teacher_outputs[TEACHER_LOGITS])
        return {
            TEACHER_LOGITS: _storable(
                relative, format, "logits (relative to each row's largest)"
            ),
            LOGIT_OFFSETS: maxima,
        }
    log_probs = teacher_outputs[TEACHER_TOP_LOG_PROBS]
    indices = teacher_outputs[TEACHER_TOP_INDICES]
    vocabulary_size = teacher_outputs["num_classes"]
    top_k = log_probs.shape[-1]
    if format == "compact":
        payload, token_bytes = codec.encode_top_k(
            log_probs.reshape(-1, top_k),
            indices.reshape(-1, top_k),
            vocabulary_size,
        )
        size_dtype = np.uint16 if top_k <= 5000 else np.uint32
        return {
            COMPACT_PAYLOAD: payload,
            COMPACT_TOKEN_BYTES: token_bytes.astype(size_dtype).reshape(
                log_probs.shape[:-1]
            ),
        }
    index_dtype = np.min_scalar_type(vocabulary_size - 1)
    return {
        TEACHER_TOP_LOG_PROBS: _storable(
            log_probs, format, "top-k log-probabilities"
        ),
        TEACHER_TOP_INDICES: indices.astype(index_dtype),
    }


def _storable(values, format, what):
    """`values` as `format`, refusing finite values it would make infinite."""
    stored = values.astype(format)
    overflow = np.isfinite(values) & ~np.isfinite(stored)
    if overflow.any():
        raise ValueError(
            f"The teacher's {what} reach {values[overflow][0]:,.0f}, beyond "
            f"what {format} holds (±{np.finfo(format).max:,.0f}): stored as "
            f"{format} they would become infinite. Build the cache with "
            'format="float32".'
        )
    return stored


class TeacherOutputCache:
    """Teacher outputs stored once on disk, found by each example's content.

    Build one with `TeacherOutputCache.build`, reopen it with
    `TeacherOutputCache.open`, and train from it with `dataset`.

    Args:
        directory: A directory written by `build`.
        verify: How much of the cache to check against the checksums it
            was written with: `"full"` (default) every block, `"sample"` the
            digest and index files and a random sample of blocks of the
            others, `"none"` only the files' sizes.

    Raises:
        DamagedCacheError: If a file is missing, short or changed.

    Example:

    >>> import tempfile
    >>> teacher = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    >>> x = np.arange(30, dtype="float32").reshape(10, 3)
    >>> cache = TeacherOutputCache.build(teacher, x, tempfile.mkdtemp())
    >>> cache.num_examples, cache.arrays[TEACHER_LOGITS].shape
    (10, (10, 4))
    >>> cache.rows(x[[7, 2]]).tolist()
    [7, 2]
    """

    def __init__(self, directory, verify="full"):
        _check_verify(verify)
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(
                f"No teacher-output cache in {self.directory} ({MANIFEST} is "
                "missing). Create one with `TeacherOutputCache.build`."
            )
        _check_version(self.directory, manifest)
        if not manifest["complete"]:
            raise ValueError(
                f"The cache in {self.directory} is incomplete "
                f"({manifest['rows_written']} rows committed): its build was "
                "interrupted. Call `TeacherOutputCache.build` with the same "
                "teacher and inputs to resume it."
            )
        _check_files(self.directory, manifest, verify)
        self.manifest = manifest
        self.num_examples = manifest["index_rows"]
        self.arrays = {
            name: _memmap(
                self.directory / f"{name}.bin",
                spec["dtype"],
                manifest["payload_bytes"] if name == COMPACT_PAYLOAD else self.num_examples,
                [] if name == COMPACT_PAYLOAD else spec["shape"],
            )
            for name, spec in manifest["arrays"].items()
        }
        self.compact = COMPACT_PAYLOAD in self.arrays
        self._digest_index = _memmap(
            self.directory / f"{DIGEST_INDEX}.bin", DIGEST_DTYPE, self.num_examples, ()
        )
        self._digest_rows = _memmap(
            self.directory / f"{DIGEST_ROWS}.bin", np.int64, self.num_examples, ()
        )

    def __reduce__(self):
        # Worker processes (PyDataset multiprocessing) reopen the memory maps;
        # this process verified them.
        return (type(self), (str(self.directory), "none"))

    @classmethod
    def build(
        cls,
        teacher,
        inputs,
        directory,
        batch_size=256,
        top_k=None,
        format="float16",
        preprocessing=None,
        overwrite=False,
        verify="full",
    ):
        """Runs `teacher` once over `inputs` and stores its outputs.

        Examples already in a cache with the same teacher, preprocessing and
        format are not run again: a complete cache of the same data is
        returned as is (after one pass that hashes the inputs, and without
        writing to the directory, which may be read-only), and an interrupted
        build is resumed. A build that finds another one running in
        `directory` waits for it (with a warning naming its process), then
        reuses or resumes its work.

        Args:
            teacher: A Keras model returning logits.
            inputs: The inputs exactly as the student will receive them:
                NumPy arrays (an array or a dict/list of arrays, one row per
                example), a `tf.data.Dataset`, a `keras.utils.PyDataset` or an
                iterable of batches (e.g. a generator); each batch is `x`,
                `(x,)`, `(x, y)` or `(x, y, sample_weight)`, and only `x` is
                used. A pipeline must give the same examples on every pass
                (no random augmentation); its order does not matter.
            directory: Where to store the cache; created if needed.
            batch_size: Examples per teacher call for NumPy inputs (a
                pipeline keeps its own batches).
            top_k: Store the `top_k` largest teacher log-probabilities and
                their indices instead of dense logits.
            format: `"float16"` (default) or `"float32"` stored values, or
                `"compact"` for top-k targets in `keras_distill.targets.codec`'s
                format (needs `top_k`). float16 refuses a teacher whose
                logits span more than 65,504 within a row.
            preprocessing: A JSON-serializable description of how `inputs`
                were made (tokenizer, sequence length, ...) or the Keras
                preprocessing layers applied; part of the fingerprint.
                Layers that draw random numbers are refused.
            overwrite: Replace a complete cache built with another teacher,
                preprocessing or format, or a damaged one, or extend one
                built from other inputs, instead of raising.
            verify: How much of an existing cache to check against its
                checksums before it is returned or extended (`"full"`,
                `"sample"` or `"none"`, as for `TeacherOutputCache`).

        Returns:
            The `TeacherOutputCache`.

        Raises:
            DamagedCacheError: If the cache in `directory` is damaged and
                `overwrite` is false.
        """
        if not isinstance(teacher, keras.layers.Layer):
            raise TypeError(
                f"`teacher` must be a Keras model, got {type(teacher).__name__}."
            )
        if format not in FORMATS:
            raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
        check_positive_int("top_k", top_k, allow_none=True)
        if format == "compact" and top_k is None:
            raise ValueError(
                'format="compact" stores top-k targets: pass `top_k` (e.g. '
                "256 for a language model), or use float16 dense logits."
            )
        check_positive_int("batch_size", batch_size)
        _check_verify(verify)
        if not _is_stream(inputs):
            inputs = _check_arrays(inputs)
        _check_deterministic(inputs)
        directory = Path(directory)
        fingerprint = {
            "teacher": teacher_fingerprint(teacher),
            "preprocessing": preprocessing_fingerprint(preprocessing),
            "format": json.dumps({"top_k": top_k, "format": format}),
        }
        # The inputs may be a generator, read once: each path below reads
        # them once, after the last decision about the directory.
        if _plan(directory, fingerprint, overwrite)[0] == "reuse":
            with _DirectoryLock(directory, exclusive=False):
                if _plan(directory, fingerprint, overwrite)[0] == "reuse":
                    return cls._reuse(directory, inputs, batch_size, verify)
        directory.mkdir(parents=True, exist_ok=True)
        with _DirectoryLock(directory, exclusive=True):
            # Decided again: another build may have run while this one waited.
            plan, manifest = _plan(directory, fingerprint, overwrite)
            if plan == "reuse":
                return cls._reuse(directory, inputs, batch_size, verify)
            if plan == "resume":
                try:
                    _check_files(directory, manifest, verify)
                except DamagedCacheError:
                    if not overwrite:
                        raise
                    manifest = None
            return cls._write(
                teacher, inputs, directory, batch_size, top_k, format,
                fingerprint, manifest,
            )

    @classmethod
    def _reuse(cls, directory, inputs, batch_size, verify):
        """The complete cache in `directory` if it holds exactly `inputs`."""
        cache = cls(directory, verify=verify)
        seen = []
        for batch in _input_batches(inputs, batch_size):
            digests = example_digests(batch)
            if not _contains(cache._digest_index, digests).all():
                raise ValueError(
                    f"The cache in {directory} was built from different "
                    "inputs (this example is not in it); refusing to mix "
                    "them. Pass `overwrite=True` to add the new examples, or "
                    "use another directory."
                )
            seen.append(digests)
        if not seen:
            raise ValueError("`inputs` holds no examples.")
        if _data_fingerprint(np.concatenate(seen)) != cache.manifest["data"]:
            raise ValueError(
                f"The cache in {directory} was built from different inputs "
                "(it holds examples these inputs lack); refusing to use stale "
                "teacher outputs. Pass `overwrite=True` to record these "
                "inputs, or use another directory."
            )
        return cache

    @classmethod
    def _write(
        cls, teacher, inputs, directory, batch_size, top_k, format,
        fingerprint, manifest,
    ):
        """Runs the teacher on the examples `manifest` lacks (all if `None`)."""
        if manifest is None:
            manifest = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "rows_written": 0,
                "complete": False,
                "data": None,
                "arrays": {},
                "top_k": top_k,
                "payload_bytes": 0,
                "block_bytes": CHECKSUM_BLOCK_BYTES,
                "files": {},
            }
        writer = _Writer(directory, manifest)
        rows = manifest["rows_written"]
        stored = np.sort(
            np.fromfile(directory / f"{DIGESTS}.bin", DIGEST_DTYPE, count=rows)
            if rows
            else np.zeros(0, DIGEST_DTYPE)
        )

        def store(digests, teacher_outputs):
            manifest["complete"] = False
            writer.append(digests, _stored(teacher_outputs, format))

        seen = []
        # A worker thread encodes, checksums and writes each batch while the
        # teacher runs on the next, so the device (or the compiled step's
        # threads) does not wait on the host. Leaving the `with` waits for the
        # last write, also when the teacher raises: an interrupted build keeps
        # every batch the teacher finished.
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="teacher_cache_writer"
        ) as pool:
            writing = None
            for batch in _input_batches(inputs, batch_size):
                digests = example_digests(batch)
                seen.append(digests)
                new = ~_contains(stored, digests)
                if not new.any():
                    continue
                new_rows = np.flatnonzero(new)
                teacher_outputs = cls._teacher_outputs(
                    teacher, _slice_inputs(batch, new_rows), top_k
                )
                if writing is not None:
                    writing.result()
                writing = pool.submit(store, digests[new_rows], teacher_outputs)
            if writing is not None:
                writing.result()
        if not seen:
            raise ValueError("`inputs` holds no examples.")
        data = _data_fingerprint(np.concatenate(seen))
        if not manifest["complete"] or data != manifest["data"]:
            writer.finish(data)
        # Its rows were checked before they were extended, or checksummed
        # from memory as they were written: sizes are enough here.
        return cls(directory, verify="none")

    @staticmethod
    def _teacher_outputs(teacher, batch, top_k):
        """The teacher's outputs on `batch` as NumPy arrays, before encoding.

        A compiled inference step, as `predict` runs it: the dense logits, or
        the top-k taken inside the step (see `_TopKTeacher`).
        """
        if top_k is None:
            return {TEACHER_LOGITS: teacher.predict_on_batch(batch)}
        predictor = _top_k_teacher(teacher, top_k)
        log_probs, indices = predictor.predict_on_batch(batch)
        return {
            TEACHER_TOP_LOG_PROBS: log_probs,
            TEACHER_TOP_INDICES: indices,
            "num_classes": predictor.num_classes,
        }

    @classmethod
    def open(
        cls, directory, teacher=None, inputs=None, preprocessing=None,
        verify="full",
    ):
        """Opens a complete cache, checking what you pass against it.

        Waits for a build running in `directory` to finish.

        Args:
            directory: The cache directory.
            teacher: If given, its weights must match the cache's.
            inputs: If given (any kind `build` takes), they must be the
                cached inputs.
            preprocessing: If `teacher` or `inputs` is given, the
                preprocessing must match too.
            verify: How much of the cache to check against its checksums:
                `"full"` (default), `"sample"` or `"none"` (see
                `TeacherOutputCache`).

        Returns:
            The `TeacherOutputCache`.

        Raises:
            DamagedCacheError: If a file is missing, short or changed.
        """
        with _DirectoryLock(directory, exclusive=False):
            cache = cls(directory, verify=verify)
        stored = {"data": cache.manifest["data"], **cache.manifest["fingerprint"]}
        given = {}
        if teacher is not None:
            given["teacher"] = teacher_fingerprint(teacher)
        if inputs is not None:
            digests = [example_digests(b) for b in _input_batches(inputs, 4096)]
            given["data"] = _data_fingerprint(np.concatenate(digests))
        if given:
            given["preprocessing"] = preprocessing_fingerprint(preprocessing)
        mismatch = _describe_mismatch(given, stored)
        if mismatch:
            raise ValueError(
                f"The cache in {directory} is stale: it was built with "
                f"different {mismatch}. Rebuild it with "
                "`TeacherOutputCache.build(..., overwrite=True)`."
            )
        return cache

    def rows(self, inputs):
        """The cache rows of the examples `inputs`, found by their content.

        Args:
            inputs: NumPy inputs, one row per example (an array or a
                dict/list of arrays).

        Returns:
            An int64 array of rows, one per example.

        Raises:
            KeyError: If an example is not in the cache.
        """
        digests = example_digests(inputs)
        positions = np.searchsorted(self._digest_index, digests)
        positions = np.minimum(positions, self.num_examples - 1)
        found = self._digest_index[positions] == digests
        if not found.all():
            missing = int(np.flatnonzero(~found)[0])
            raise KeyError(
                f"Example {missing} of this batch is not in the teacher-output "
                f"cache in {self.directory}: the pipeline changes its inputs "
                "between passes (random augmentation?) or differs from the "
                "one the cache was built from. Build the cache from these "
                "inputs, or distill online (a `Distiller` with a teacher)."
            )
        return np.asarray(self._digest_rows[positions])

    def targets(self, rows):
        """Teacher outputs of the cache rows `rows`, as the Distiller reads them.

        Args:
            rows: Integer row indices or a slice.

        Returns:
            A dict of float32 (values) and int32 (indices) arrays. Dense
            logits come back as the teacher gave them, up to the storage
            type's rounding of each logit's difference from its row's
            largest. Compact top-k targets come back with each position's
            entries sorted by index.
        """
        if self.compact:
            return self._compact_targets(np.arange(self.num_examples)[rows])
        targets = {}
        for name, array in self.arrays.items():
            if name == LOGIT_OFFSETS:
                continue
            values = np.asarray(array[rows])
            kind = "int32" if name == TEACHER_TOP_INDICES else "float32"
            targets[name] = values.astype(kind)
        if TEACHER_LOGITS in targets:
            offsets = np.asarray(self.arrays[LOGIT_OFFSETS][rows])
            targets[TEACHER_LOGITS] += offsets[..., None]
        return targets

    def _compact_targets(self, rows):
        ends = self.arrays[COMPACT_ROW_ENDS]
        payload = self.arrays[COMPACT_PAYLOAD]
        row_ends = np.asarray(ends[rows], np.int64)
        row_starts = np.where(rows > 0, np.asarray(ends[np.maximum(rows - 1, 0)], np.int64), 0)
        records = np.concatenate(
            [payload[start:end] for start, end in zip(row_starts, row_ends)]
            or [np.zeros(0, np.uint8)]
        )
        token_bytes = np.asarray(self.arrays[COMPACT_TOKEN_BYTES][rows])
        k = self.manifest["top_k"]
        log_probs, indices = codec.decode_top_k(records, token_bytes.reshape(-1), k)
        shape = (*token_bytes.shape, k)
        return {
            TEACHER_TOP_LOG_PROBS: log_probs.reshape(shape),
            TEACHER_TOP_INDICES: indices.reshape(shape),
        }

    def _target_specs(self):
        """`{name: (dtype, per-example shape)}` of what `targets` returns."""
        if self.compact:
            shape = (*self.manifest["arrays"][COMPACT_TOKEN_BYTES]["shape"], self.manifest["top_k"])
            return {
                TEACHER_TOP_LOG_PROBS: ("float32", shape),
                TEACHER_TOP_INDICES: ("int32", shape),
            }
        return {
            name: (
                "int32" if name == TEACHER_TOP_INDICES else "float32",
                tuple(spec["shape"]),
            )
            for name, spec in self.manifest["arrays"].items()
            if name != LOGIT_OFFSETS
        }

    def batch_targets(self, inputs, labels=None):
        """The `y` of a training batch: labels and the examples' teacher outputs.

        Args:
            inputs: The batch's inputs (NumPy, one row per example).
            labels: The batch's labels, or `None`.

        Returns:
            A dict `{"labels": labels, teacher outputs...}` for `Distiller`.
        """
        inputs = _to_numpy(inputs)
        rows = self.rows(inputs)
        targets = self.targets(rows)
        if labels is not None:
            targets[LABELS] = labels
        return targets

    def dataset(
        self,
        inputs,
        labels=None,
        sample_weight=None,
        batch_size=None,
        shuffle=None,
        seed=None,
    ):
        """Training data whose `y` carries the examples' teacher outputs.

        For NumPy inputs, batches of `(inputs, {"labels", teacher
        outputs}[, sample_weight])`, shuffled every epoch. For a pipeline
        (`tf.data.Dataset`, `PyDataset`, iterable of batches), the same
        pipeline with each batch's `y` replaced by that dict; it keeps its own
        batching, order and shuffling.

        Args:
            inputs: NumPy inputs whose examples are in the cache (any order,
                any subset), or a pipeline of such batches.
            labels: NumPy inputs only: optional labels, one row per example.
            sample_weight: NumPy inputs only: optional per-example weights.
            batch_size: NumPy inputs only: examples per batch (default 32).
            shuffle: NumPy inputs only: reshuffle the examples every epoch
                (default `True`).
            seed: NumPy inputs only: seed of the shuffling.

        Returns:
            A `keras.utils.PyDataset`, or for a pipeline one of its kind (a
            `tf.data.Dataset`, a `PyDataset`, or a generator).

        Raises:
            KeyError: When a batch holds an example the cache lacks (NumPy
                inputs: at once; pipelines: when that batch is read).
        """
        if _is_stream(inputs):
            given = {
                "labels": labels,
                "sample_weight": sample_weight,
                "batch_size": batch_size,
                "shuffle": shuffle,
                "seed": seed,
            }
            extra = [name for name, value in given.items() if value is not None]
            if extra:
                raise ValueError(
                    f"{extra} apply to NumPy inputs only: a pipeline carries "
                    "its own labels and sample weights and does its own "
                    "batching and shuffling."
                )
            if isinstance(inputs, keras.utils.PyDataset):
                return CachedTeacherPyDataset(self, inputs)
            if isinstance(inputs, _tf_dataset_class() or ()):
                return self._tf_dataset(inputs)
            return self._generator(inputs)
        inputs = _check_arrays(inputs)
        return CachedTeacherDataset(
            self,
            inputs,
            labels,
            sample_weight,
            32 if batch_size is None else batch_size,
            True if shuffle is None else shuffle,
            seed,
        )

    def _attach(self, batch):
        inputs, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(
            batch
        )
        joined = (inputs, self.batch_targets(inputs, labels))
        return joined if sample_weight is None else joined + (sample_weight,)

    def _generator(self, batches):
        for batch in batches:
            yield self._attach(batch)

    def _tf_dataset(self, dataset):
        specs = self._target_specs()
        names = sorted(specs)

        def lookup(*leaves):
            targets = self.batch_targets(
                keras.tree.pack_sequence_as(structure, list(leaves))
            )
            return [targets[name] for name in names]

        def attach(*element):
            element = element[0] if len(element) == 1 else element
            inputs, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(
                element
            )
            values = backend.tf_numpy_function(
                lookup,
                keras.tree.flatten(inputs),
                [(specs[name][0], (None, *specs[name][1])) for name in names],
            )
            targets = dict(zip(names, values))
            if labels is not None:
                targets[LABELS] = labels
            joined = (inputs, targets)
            return joined if sample_weight is None else joined + (sample_weight,)

        structure, _, _ = keras.utils.unpack_x_y_sample_weight(
            dataset.element_spec
        )
        return backend.map_tf_dataset(dataset, attach)


def _contains(sorted_digests, digests):
    """Whether each of `digests` is in the sorted array `sorted_digests`."""
    if len(sorted_digests) == 0:
        return np.zeros(len(digests), bool)
    positions = np.searchsorted(sorted_digests, digests)
    positions = np.minimum(positions, len(sorted_digests) - 1)
    return sorted_digests[positions] == digests


class CachedTeacherDataset(keras.utils.PyDataset):
    """NumPy training batches joined with their cached teacher outputs.

    Made by `TeacherOutputCache.dataset`; see there for the arguments.
    """

    def __init__(
        self, cache, inputs, labels, sample_weight, batch_size, shuffle, seed
    ):
        super().__init__()
        check_positive_int("batch_size", batch_size)
        num_examples = _num_examples(inputs)
        for name, values in (("labels", labels), ("sample_weight", sample_weight)):
            if values is not None and len(values) != num_examples:
                raise ValueError(
                    f"`{name}` has {len(values)} rows but `inputs` has "
                    f"{num_examples} examples: give one per example."
                )
        self.cache = cache
        self.inputs = inputs
        self.labels = None if labels is None else np.asarray(labels)
        self.sample_weight = (
            None if sample_weight is None else np.asarray(sample_weight)
        )
        self.batch_size = batch_size
        self.shuffle = shuffle
        # Found once, by content: the inputs may be any order or subset.
        self._cache_rows = np.concatenate(
            [
                cache.rows(_slice_inputs(inputs, slice(begin, begin + 4096)))
                for begin in range(0, num_examples, 4096)
            ]
        )
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(num_examples)
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self._order) // self.batch_size)

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(len(self._cache_rows))

    def __getitem__(self, index):
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        # Reading the memory map in row order is sequential; the order of the
        # examples inside a batch does not matter to the loss.
        rows = rows[np.argsort(self._cache_rows[rows])]
        targets = self.cache.targets(self._cache_rows[rows])
        if self.labels is not None:
            targets[LABELS] = self.labels[rows]
        batch = (_slice_inputs(self.inputs, rows), targets)
        if self.sample_weight is not None:
            batch += (self.sample_weight[rows],)
        return batch


class CachedTeacherPyDataset(keras.utils.PyDataset):
    """A `PyDataset`'s batches with their cached teacher outputs in `y`.

    Made by `TeacherOutputCache.dataset`. It reads the same batches as the
    wrapped dataset (and forwards `on_epoch_end`, so a dataset that reshuffles
    itself keeps doing so) and looks each example's outputs up by content.

    Args:
        cache: The `TeacherOutputCache`.
        py_dataset: The wrapped `keras.utils.PyDataset`.
    """

    def __init__(self, cache, py_dataset):
        super().__init__(
            workers=getattr(py_dataset, "_workers", 1),
            use_multiprocessing=getattr(py_dataset, "_use_multiprocessing", False),
            max_queue_size=getattr(py_dataset, "_max_queue_size", 10),
        )
        self.cache = cache
        self.py_dataset = py_dataset

    def __len__(self):
        return len(self.py_dataset)

    @property
    def num_batches(self):
        return self.py_dataset.num_batches

    def on_epoch_end(self):
        self.py_dataset.on_epoch_end()

    def __getitem__(self, index):
        return self.cache._attach(self.py_dataset[index])
