"""Quantize a distilled MNIST student and compare, then distill it quantized.

1. Trains a CNN teacher (or loads one with `--teacher`, e.g. the
   `teacher.keras` that `examples/mnist_distillation.py` writes) and distills
   it into an MLP student with `keras_distill.Distiller`.
2. Prints `keras_distill.extras.quantize.compare_quantized`'s table: test accuracy,
   size of the `.keras` file and latency per batch of the teacher, the float
   student and its `int8`, `int4` and `float8` copies (Keras's own
   `Model.quantize`).
3. Quantization-aware distillation: continues distilling each quantized copy
   for `--qad-epochs` epochs and compares it, at the same extra budget, with
   continuing to distill the float student and quantizing afterwards. In
   `int8` and `int4` copies Keras freezes the integer kernels, so only the
   float parameters (biases) move; `float8` keeps float32 kernels that are
   cast to float8 in the forward pass, so the whole student trains through
   the quantization.

An MLP student is used because Keras 3.15 quantizes `Dense` (and
`EinsumDense`, `Embedding`) layers but not convolutions: every weight of an
MLP is quantized. Writes `results.json` to `--output-dir`.

Run `python examples/quantize_student.py` (a few minutes on 2 CPU cores) or
`--quick` for a smoke test.
"""

import argparse
from pathlib import Path

import keras
import numpy as np

from keras_distill import Distiller
from keras_distill.cli import load_example
from keras_distill.examples import reporting
from keras_distill.examples.datasets import load_mnist
from keras_distill.extras.quantize import QUANTIZATION_MODES
from keras_distill.extras.quantize import compare_quantized
from keras_distill.extras.quantize import format_comparison
from keras_distill.extras.quantize import quantize_student

# The models of `examples/mnist_distillation.py`'s default recipe: a CNN
# teacher with dropout, and an MLP student with 128 hidden units, every
# weight of which sits in a `Dense` layer.
_MNIST_EXAMPLE = load_example("mnist_distillation")
build_teacher = _MNIST_EXAMPLE.build_default_teacher
build_student = _MNIST_EXAMPLE.build_default_student


def accuracy(model, images, labels):
    """Fraction of `images` whose argmax logit is the label.

    Args:
        model: A model returning logits.
        images: Test images.
        labels: Integer labels.

    Returns:
        The accuracy as a Python float.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> 0.0 <= accuracy(model, np.eye(2, dtype="float32"), np.arange(2)) <= 1.0
    True
    """
    logits = model.predict(images, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == labels))


def distill(student, teacher, x, y, epochs, batch_size, seed):
    """Distills `teacher` into `student` in place (alpha 0.1, T 5, Adam).

    Args:
        student: The model to train (float or quantized).
        teacher: The trained teacher.
        x: Training images.
        y: Training labels.
        epochs: Number of epochs.
        batch_size: Batch size.
        seed: Seed of the shuffling.
    """
    keras.utils.set_random_seed(seed)
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        alpha=0.1,
        temperature=5.0,
    )
    distiller.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)


def float_copy(model):
    """A float copy of `model` with the same weights."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def quantization_aware_rows(student, teacher, data, modes, epochs, batch_size, seed):
    """Quantize-then-distill against distill-then-quantize, per mode.

    Args:
        student: The distilled float student.
        teacher: The teacher.
        data: `((x_train, y_train), (x_test, y_test))`.
        modes: Quantization modes.
        epochs: Extra distillation epochs of both variants.
        batch_size: Batch size.
        seed: Seed of the shuffling (the same for both variants).

    Returns:
        A list of dicts with the test accuracy of the post-training quantized
        copy (`"quantized"`), of the quantized copy distilled `epochs` more
        (`"quantized_then_distilled"`), and of the float student distilled
        `epochs` more and then quantized (`"distilled_then_quantized"`).
    """
    (x_train, y_train), (x_test, y_test) = data
    control = float_copy(student)
    distill(control, teacher, x_train, y_train, epochs, batch_size, seed)
    rows = []
    for mode in modes:
        quantized = quantize_student(student, mode)
        before = accuracy(quantized, x_test, y_test)
        distill(quantized, teacher, x_train, y_train, epochs, batch_size, seed)
        rows.append(
            {
                "mode": mode,
                "quantized": before,
                "quantized_then_distilled": accuracy(quantized, x_test, y_test),
                "distilled_then_quantized": accuracy(
                    quantize_student(control, mode), x_test, y_test
                ),
            }
        )
    return rows


def format_qad_table(rows, float_accuracy, epochs):
    """Formats `quantization_aware_rows` as a Markdown table.

    Args:
        rows: The rows `quantization_aware_rows` returns.
        float_accuracy: Test accuracy of the float student.
        epochs: The extra epochs, for the column titles.

    Returns:
        The table as a string.

    Example:

    >>> print(format_qad_table([{"mode": "int8", "quantized": 0.9,
    ...     "quantized_then_distilled": 0.91,
    ...     "distilled_then_quantized": 0.92}], 0.93, 2))
    | mode | quantized | quantized, then distilled 2 epochs | distilled 2 epochs, then quantized |
    |---|---|---|---|
    | float student | 0.9300 |  |  |
    | int8 | 0.9000 | 0.9100 | 0.9200 |
    """
    lines = [
        f"| mode | quantized | quantized, then distilled {epochs} epochs "
        f"| distilled {epochs} epochs, then quantized |",
        "|---|---|---|---|",
        f"| float student | {float_accuracy:.4f} |  |  |",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['quantized']:.4f} "
            f"| {row['quantized_then_distilled']:.4f} "
            f"| {row['distilled_then_quantized']:.4f} |"
        )
    return "\n".join(lines)


def run(args):
    """Trains, quantizes, compares and writes `results.json`.

    Args:
        args: Parsed command-line arguments (see `parse_args`).

    Returns:
        The results dict.
    """
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = load_mnist(args.data_dir)
    (x_train, y_train), (x_test, y_test) = splits
    if args.quick:
        x_train, y_train = x_train[:1024], y_train[:1024]
        x_test, y_test = x_test[:512], y_test[:512]
    data = ((x_train, y_train), (x_test, y_test))
    keras.utils.set_random_seed(args.seed)
    if args.teacher:
        teacher = keras.saving.load_model(args.teacher)
    else:
        teacher = build_teacher()
        teacher.compile(
            optimizer=keras.optimizers.Adam(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        teacher.fit(
            x_train, y_train, epochs=args.teacher_epochs,
            batch_size=args.batch_size, verbose=0,
        )
    student = build_student()
    distill(
        student, teacher, x_train, y_train, args.epochs, args.batch_size, args.seed
    )
    print(
        f"MNIST from {splits.source} on {keras.backend.backend()}: "
        f"{len(x_train)} train / {len(x_test)} test images; student distilled "
        f"{args.epochs} epochs."
    )
    rows = compare_quantized(
        student, x_test, y_test, teacher=teacher, modes=QUANTIZATION_MODES,
        batch_size=args.batch_size, directory=str(output_dir / "models"),
    )
    print(format_comparison(rows))
    float_accuracy = next(r["accuracy"] for r in rows if r["model"] == "student")
    qad_rows = quantization_aware_rows(
        student, teacher, data, QUANTIZATION_MODES, args.qad_epochs,
        args.batch_size, args.seed,
    )
    print(format_qad_table(qad_rows, float_accuracy, args.qad_epochs))
    results = {
        "backend": keras.backend.backend(),
        "data_source": splits.source,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "student_epochs": args.epochs,
        "qad_epochs": args.qad_epochs,
        "comparison": rows,
        "quantization_aware": qad_rows,
    }
    reporting.write_results(results, output_dir)
    return results


def parse_args(argv=None):
    """Parses the command line.

    Args:
        argv: Arguments without the program name; `None` reads `sys.argv`.

    Returns:
        An `argparse.Namespace`.

    Example:

    >>> parse_args(["--quick"]).quick
    True
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", default=None,
        help="a trained teacher `.keras` file (default: train one)",
    )
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10,
                        help="distillation epochs of the float student")
    parser.add_argument("--qad-epochs", type=int, default=2,
                        help="extra distillation epochs of both QAD variants")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/quantize")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test on 1,024 train and 512 test images")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_epochs, args.epochs, args.qad_epochs = 1, 1, 1
    return args


if __name__ == "__main__":
    run(parse_args())
