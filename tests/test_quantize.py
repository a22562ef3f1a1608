"""Quantized students and their comparison table, on a tiny MNIST model."""

import os

import keras
import numpy as np
import pytest

from keras_distill.examples import datasets
from keras_distill.extras import quantize
from keras_distill.extras.quantize import compare_quantized
from keras_distill.extras.quantize import quantize_student
from keras_distill.extras.quantize import quantized_layers
from tests.conftest import DATA_DIR


def mlp(hidden, name):
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ],
        name=name,
    )


@pytest.fixture(scope="module")
def mnist():
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(
        DATA_DIR, download=False
    )
    return x_train, y_train, x_test[:500], y_test[:500]


@pytest.fixture(scope="module")
def trained(mnist):
    """A student trained briefly on real MNIST and an untrained teacher."""
    x_train, y_train, _, _ = mnist
    keras.utils.set_random_seed(0)
    teacher = mlp(64, "teacher")
    student = mlp(32, "student")
    student.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    student.fit(x_train[:4000], y_train[:4000], batch_size=100, verbose=0)
    return teacher, student


def accuracy(model, x, y):
    return float((model.predict(x, verbose=0).argmax(-1) == y).mean())


@pytest.mark.parametrize("mode", quantize.QUANTIZATION_MODES)
def test_quantized_copy_leaves_the_float_student_unchanged(trained, mnist, mode):
    _, student = trained
    _, _, x_test, _ = mnist
    weights = [w.copy() for w in student.get_weights()]
    float_logits = student.predict(x_test, verbose=0)
    copy = quantize_student(student, mode)
    assert quantized_layers(copy) == {"hidden": mode, "logits": mode}
    assert quantized_layers(student) == {}
    for before, after in zip(weights, student.get_weights()):
        np.testing.assert_array_equal(before, after)
    # The copy computes the same function up to quantization error.
    quantized_logits = copy.predict(x_test, verbose=0)
    agreement = (quantized_logits.argmax(-1) == float_logits.argmax(-1)).mean()
    assert agreement > 0.95


@pytest.mark.slow
def test_comparison_rows_match_independent_measurements(trained, mnist, tmp_path):
    teacher, student = trained
    _, _, x_test, y_test = mnist
    rows = compare_quantized(
        student,
        x_test,
        y_test,
        teacher=teacher,
        latency_repeats=1,
        directory=str(tmp_path),
    )
    by_name = {row["model"]: row for row in rows}
    assert list(by_name) == [
        "teacher",
        "student",
        "student int8",
        "student int4",
        "student float8",
    ]
    for row in rows:
        assert row["size_bytes"] == os.path.getsize(row["path"])
        assert row["latency_ms"] > 0
        # Each file reloads to the model whose accuracy the row reports.
        reloaded = keras.saving.load_model(row["path"])
        assert row["accuracy"] == pytest.approx(
            accuracy(reloaded, x_test, y_test), abs=1e-12
        )
    assert by_name["teacher"]["accuracy"] == pytest.approx(
        accuracy(teacher, x_test, y_test)
    )
    assert by_name["student"]["quantized_layers"] == "0/2"
    assert by_name["student int4"]["quantized_layers"] == "2/2"
    float_size = by_name["student"]["size_bytes"]
    # Integer kernels shrink the file; float8 keeps float32 kernels and adds
    # scaling state, so it grows.
    assert by_name["student int8"]["size_bytes"] < 0.5 * float_size
    assert (
        by_name["student int4"]["size_bytes"]
        < by_name["student int8"]["size_bytes"]
    )
    assert by_name["student float8"]["size_bytes"] > float_size
    # Weight-only damage on MNIST is small for int8, larger for int4.
    float_accuracy = by_name["student"]["accuracy"]
    assert by_name["student int8"]["accuracy"] > float_accuracy - 0.01
    assert by_name["student int4"]["accuracy"] > float_accuracy - 0.03
    table = quantize.format_comparison(rows)
    assert table.count("\n") == len(rows) + 1
    assert "| student int8 | int8 |" in table


def test_sample_weight_masks_the_accuracy(trained, mnist):
    _, student = trained
    _, _, x_test, y_test = mnist
    x, y = x_test[:64], y_test[:64]
    weights = np.zeros(64, "float32")
    weights[:10] = 1.0
    (row,) = compare_quantized(
        student, x, y, modes=(), sample_weight=weights, latency_repeats=1
    )
    assert row["accuracy"] == pytest.approx(accuracy(student, x[:10], y[:10]))


def test_a_quantized_student_keeps_distilling(trained, mnist):
    """Quantization-aware distillation: only float parameters move."""
    from keras_distill import Distiller

    teacher, student = trained
    x_train, y_train, _, _ = mnist
    copy = quantize_student(student, "int8")
    kernels = [
        v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        for v in copy.non_trainable_variables
    ]
    biases = [np.asarray(keras.ops.convert_to_numpy(v)) for v in copy.trainable_variables]
    distiller = Distiller(student=copy, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=0.1,
        temperature=4.0,
    )
    history = distiller.fit(
        x_train[:512], y_train[:512], epochs=1, batch_size=128, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])
    for before, variable in zip(kernels, copy.non_trainable_variables):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(variable))
    moved = [
        not np.array_equal(before, keras.ops.convert_to_numpy(variable))
        for before, variable in zip(biases, copy.trainable_variables)
    ]
    assert all(moved)


@pytest.mark.parametrize(
    "mode, match",
    [
        ("int2", "Unknown quantization mode"),
        ("gptq", "calibration data"),
        ("awq", "calibration data"),
    ],
)
def test_bad_modes(trained, mode, match):
    _, student = trained
    with pytest.raises(ValueError, match=match):
        quantize_student(student, mode)
    with pytest.raises(ValueError, match=match):
        compare_quantized(student, np.zeros((2, 28, 28, 1)), [0, 0], modes=[mode])


def test_layers_that_do_not_support_a_mode_are_named():
    convolutional = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()]
    )
    with pytest.raises(ValueError, match=r"No layer.*\['Conv2D'\].*Dense"):
        quantize_student(convolutional, "int8")
    embedding = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 4)]
    )
    with pytest.raises(ValueError, match=r"mode='float8'.*\['Embedding'\]"):
        quantize_student(embedding, "float8")
    # Embedding does support the integer modes.
    assert set(quantized_layers(quantize_student(embedding, "int4")).values()) == {
        "int4"
    }


def test_already_quantized_unbuilt_and_non_models_are_refused(trained):
    _, student = trained
    copy = quantize_student(student, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_student(copy, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        compare_quantized(copy, np.zeros((2, 28, 28, 1)), [0, 0])
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        quantize_student(unbuilt, "int8")
    with pytest.raises(TypeError, match="keras.Model"):
        quantize_student(keras.layers.Dense(2), "int8")
    with pytest.raises(ValueError, match="latency_repeats"):
        compare_quantized(student, np.zeros((2, 28, 28, 1)), [0, 0], latency_repeats=0)
    with pytest.raises(TypeError, match="latency_repeats"):
        compare_quantized(student, np.zeros((2, 28, 28, 1)), [0, 0], latency_repeats=1.5)
