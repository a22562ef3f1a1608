"""Quantized copies of a distilled student and a table comparing them.

`quantize_student` returns an `int8`, `int4` or `float8` copy of a float
model with Keras's own `Model.quantize(mode)`; `compare_quantized` measures
accuracy, size on disk (`.keras` file) and latency per batch of the teacher,
the float student and each quantized copy; `format_comparison` prints the
rows as a Markdown table.

What Keras 3.15 quantizes (checked on the JAX, TensorFlow and PyTorch
backends, on CPU): `Dense`, `EinsumDense` and `ReversibleEmbedding` in all
three modes, `Embedding` in `int8` and `int4` only; convolutions and other
layers stay float. `int8` and `int4` store the kernels as integers with
float scales (int4 packs two values per byte, per-group scales of 128 rows),
so the file shrinks about 4× and 8× for those layers; both quantize the
layer inputs on the fly as well. `float8` is Keras's FP8 *training* scheme:
the kernels stay float32 (and trainable) and are cast to float8 in the
forward pass, with scale and amax-history variables added, so the file grows
slightly; it pays off only on accelerators with float8 matrix units. `"gptq"`
and `"awq"` need calibration data and a config, so they are not offered here.
"""

import os
import tempfile
import time
import warnings

import keras
import numpy as np

from keras_distill.checks import check_positive_int

QUANTIZATION_MODES = ("int8", "int4", "float8")


_CALIBRATED_MODES = ("gptq", "awq")


# Layer types that implement `quantize` in Keras 3.15, by mode.
_SUPPORTED_LAYERS = {
    "int8": ("Dense", "EinsumDense", "Embedding", "ReversibleEmbedding"),
    "int4": ("Dense", "EinsumDense", "Embedding", "ReversibleEmbedding"),
    "float8": ("Dense", "EinsumDense", "ReversibleEmbedding"),
}


def _check_mode(mode):
    if mode in _CALIBRATED_MODES:
        raise ValueError(
            f"mode={mode!r} needs calibration data: call "
            f"`model.quantize(config=keras.quantizers.{mode.upper()}Config("
            "dataset=..., tokenizer=...))` yourself. `quantize_student` "
            f"offers {QUANTIZATION_MODES}."
        )
    if mode not in QUANTIZATION_MODES:
        raise ValueError(
            f"Unknown quantization mode {mode!r}; expected one of "
            f"{QUANTIZATION_MODES}."
        )


def _leaf_layers_with_weights(model):
    """Layers without sublayers that own weights, e.g. Dense, Conv2D."""
    layers = model._flatten_layers(include_self=False, recursive=True)
    return [
        layer
        for layer in layers
        if layer.weights and not layer._flatten_layers(include_self=False)
    ]


def quantized_layers(model):
    """Names of the layers of `model` that are quantized, with their mode.

    Args:
        model: A Keras model.

    Returns:
        A dict `{layer.path: quantization_mode}`, empty for a float model.
        (A model loaded from a file has paths without the model's name.)

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> quantized_layers(model)
    {}
    """
    return {
        layer.path: layer.quantization_mode
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if getattr(layer, "quantization_mode", None) is not None
    }


def _check_float(model, name):
    already = quantized_layers(model)
    if already:
        raise ValueError(
            f"`{name}` is already quantized ({already}); pass the float "
            "model: Keras cannot quantize a layer twice."
        )


def _inference_copy(model):
    """An uncompiled copy of `model` through a `.keras` save and load.

    Uncompiled, so that its file holds no optimizer state.
    """
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        return keras.saving.load_model(path, compile=False)


def quantize_student(model, mode):
    """Returns a quantized copy of a float model; `model` stays unchanged.

    The copy is made through a `.keras` save and load, so it works for any
    serializable model (functional, Sequential, subclassed, KerasHub), then
    quantized with `Model.quantize(mode)`. Layers that do not support `mode`
    stay float (see the module docstring for which do).

    Args:
        model: A built float `keras.Model`, e.g. `distiller.student`.
        mode: `"int8"`, `"int4"` or `"float8"`.

    Returns:
        The quantized copy.

    Raises:
        ValueError: For another mode, an already quantized model, or a model
            none of whose layers supports `mode`.

    Example:

    >>> import numpy as np
    >>> student = keras.Sequential(
    ...     [keras.Input((8,)), keras.layers.Dense(4, name="logits")])
    >>> quantized = quantize_student(student, "int8")
    >>> quantized_layers(quantized)
    {'logits': 'int8'}
    >>> quantized_layers(student)
    {}
    """
    _check_mode(mode)
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model, got {type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            "`model` is not built: call it on a batch (or `model.build(...)`) "
            "before quantizing."
        )
    _check_float(model, "model")
    copy = _inference_copy(model)
    with warnings.catch_warnings():
        # Keras warns once per layer without `quantize` (InputLayer, Conv2D,
        # Flatten...); which layers were quantized is checked below instead.
        warnings.filterwarnings("ignore", message=".*quantiz", category=UserWarning)
        copy.quantize(mode)
    if not quantized_layers(copy):
        kinds = sorted(
            {type(layer).__name__ for layer in _leaf_layers_with_weights(model)}
        )
        raise ValueError(
            f"No layer of `model` supports mode={mode!r}: its layers with "
            f"weights are {kinds}, and Keras quantizes "
            f"{_SUPPORTED_LAYERS[mode]} in this mode."
        )
    return copy


def _accuracy(model, x, y, batch_size, sample_weight):
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    correct = (np.argmax(logits, axis=-1) == np.asarray(y)).astype(np.float64)
    if sample_weight is None:
        return float(correct.mean())
    weights = np.broadcast_to(np.asarray(sample_weight, np.float64), correct.shape)
    return float((correct * weights).sum() / weights.sum())


def _first_batch(x, batch_size):
    return keras.tree.map_structure(lambda array: array[:batch_size], x)


def _latency_ms(model, batch, repeats):
    """Median wall time of `predict_on_batch` in ms, after two warm-up calls."""
    for _ in range(2):
        model.predict_on_batch(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        # predict_on_batch returns NumPy arrays, so the time includes the
        # computation on every backend, not just its dispatch.
        model.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def compare_quantized(
    student,
    x,
    y,
    teacher=None,
    modes=QUANTIZATION_MODES,
    batch_size=128,
    sample_weight=None,
    latency_repeats=10,
    directory=None,
):
    """Accuracy, size on disk and latency of the teacher, student and copies.

    Each model is saved, without optimizer state, as a `.keras` file (its
    size is the "size on disk"),
    evaluated on `(x, y)` by top-1 accuracy of its logits, and timed with
    `predict_on_batch` on the first `batch_size` examples (median of
    `latency_repeats` calls after two warm-up calls).

    Args:
        student: The float student (e.g. `distiller.student`).
        x: Evaluation inputs.
        y: Integer labels, shaped like the logits without the class axis.
        teacher: Optional teacher for a reference row.
        modes: Quantization modes to compare, from `QUANTIZATION_MODES`.
        batch_size: Batch size of evaluation and of the latency measurement.
        sample_weight: Optional weights (or padding mask) for the accuracy.
        latency_repeats: Number of timed calls per model.
        directory: Where to keep the `.keras` files; a temporary folder
            (deleted afterwards) when `None`.

    Returns:
        A list of dicts, one per model, with keys `"model"` (`"teacher"`,
        `"student"`, `"student int8"`...), `"mode"` (`"float"` or the
        quantization mode), `"accuracy"`, `"size_bytes"`, `"latency_ms"`,
        `"quantized_layers"` (`"2/3"`: quantized layers out of the layers
        with weights) and `"path"` (the `.keras` file, `None` when
        `directory` is `None`).

    Example:

    >>> import numpy as np
    >>> student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> x, y = np.ones((16, 8), "float32"), np.zeros((16,), "int32")
    >>> rows = compare_quantized(student, x, y, modes=("int8",))
    >>> [row["model"] for row in rows]
    ['student', 'student int8']
    """
    modes = tuple(modes)
    for mode in modes:
        _check_mode(mode)
    check_positive_int("latency_repeats", latency_repeats)
    _check_float(student, "student")
    models = [("teacher", "float", _inference_copy(teacher))] if teacher is not None else []
    models.append(("student", "float", _inference_copy(student)))
    models += [
        (f"student {mode}", mode, quantize_student(student, mode))
        for mode in modes
    ]
    batch = _first_batch(x, batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = scratch if directory is None else directory
        os.makedirs(folder, exist_ok=True)
        for name, mode, model in models:
            path = os.path.join(folder, name.replace(" ", "_") + ".keras")
            model.save(path)
            layers = _leaf_layers_with_weights(model)
            quantized = sum(
                getattr(layer, "quantization_mode", None) is not None
                for layer in layers
            )
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "accuracy": _accuracy(
                        model, x, y, batch_size, sample_weight
                    ),
                    "size_bytes": os.path.getsize(path),
                    "latency_ms": _latency_ms(model, batch, latency_repeats),
                    "quantized_layers": f"{quantized}/{len(layers)}",
                    "path": None if directory is None else path,
                }
            )
    return rows


def format_comparison(rows):
    """Formats `compare_quantized` rows as a Markdown table.

    Sizes are in kB (1,000 bytes); the last column is each model's size
    relative to the float student's.

    Args:
        rows: The list of dicts `compare_quantized` returns.

    Returns:
        The table as a string.

    Example:

    >>> rows = [
    ...     {"model": "student", "mode": "float", "accuracy": 0.95,
    ...      "size_bytes": 40000, "latency_ms": 1.25, "quantized_layers": "0/2"},
    ...     {"model": "student int8", "mode": "int8", "accuracy": 0.949,
    ...      "size_bytes": 12000, "latency_ms": 1.5, "quantized_layers": "2/2"},
    ... ]
    >>> print(format_comparison(rows))
    | model | mode | accuracy | size (kB) | latency / batch (ms) | quantized layers | size vs student |
    |---|---|---|---|---|---|---|
    | student | float | 0.9500 | 40.0 | 1.25 | 0/2 | 1.00× |
    | student int8 | int8 | 0.9490 | 12.0 | 1.50 | 2/2 | 0.30× |
    """
    student_size = next(
        (row["size_bytes"] for row in rows if row["model"] == "student"), None
    )
    lines = [
        "| model | mode | accuracy | size (kB) | latency / batch (ms) "
        "| quantized layers | size vs student |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = (
            "" if student_size is None
            else f"{row['size_bytes'] / student_size:.2f}×"
        )
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['accuracy']:.4f} "
            f"| {row['size_bytes'] / 1000:.1f} | {row['latency_ms']:.2f} "
            f"| {row['quantized_layers']} | {ratio} |"
        )
    return "\n".join(lines)


def print_comparison(rows):
    """Prints `compare_quantized` rows as a Markdown table.

    Args:
        rows: The list of dicts `compare_quantized` returns.

    Example:

    >>> print_comparison([{"model": "student", "mode": "float",
    ...     "accuracy": 0.95, "size_bytes": 40000, "latency_ms": 1.25,
    ...     "quantized_layers": "0/2"}])
    | model | mode | accuracy | size (kB) | latency / batch (ms) | quantized layers | size vs student |
    |---|---|---|---|---|---|---|
    | student | float | 0.9500 | 40.0 | 1.25 | 0/2 | 1.00× |
    """
    print(format_comparison(rows))
