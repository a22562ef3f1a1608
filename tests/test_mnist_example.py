"""Tests for `examples/mnist_distillation.py`, end to end in `--quick` mode."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / ".." / "shared" / "data"


def _load_example():
    path = REPO_ROOT / "examples" / "mnist_distillation.py"
    spec = importlib.util.spec_from_file_location("mnist_distillation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` run shared by the end-to-end tests."""
    output_dir = tmp_path_factory.mktemp("mnist")
    argv = [
        "--quick",
        "--seeds", "0", "1",
        "--output-dir", str(output_dir),
        "--data-dir", str(DATA_DIR),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = example.main(argv)
    return output_dir, results, printed.getvalue()


@pytest.mark.slow
def test_quick_run_prints_the_table(quick_run):
    _, results, printed = quick_run
    table = printed[printed.index("model "):]
    rows = table.splitlines()
    assert rows[0].split() == [
        "model", "test", "accuracy", "params", "size", "on", "disk", "median",
        "s/epoch",
    ]
    assert rows[1].startswith("teacher ")
    assert rows[2].startswith("distilled student ") and "±" in rows[2]
    assert rows[3].startswith("scratch student ") and "±" in rows[3]
    assert rows[4].startswith("distilled - scratch: ")
    assert f"{results['teacher']['params']:,}" in rows[1]


@pytest.mark.slow
def test_quick_run_writes_results_and_models(quick_run):
    output_dir, results, _ = quick_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["backend"] == keras.backend.backend()
    assert saved["seeds"] == [0, 1]
    assert saved["recipe"] == "default"
    assert len(saved["students"]) == 2 and len(saved["gain_per_seed"]) == 2
    for seed, students in zip(saved["seeds"], saved["students"]):
        for kind in ("distilled", "scratch"):
            summary = students[kind]
            assert 0.0 <= summary["test_accuracy"] <= 1.0
            assert len(summary["val_accuracy_per_epoch"]) == 2
            assert len(summary["epoch_seconds"]) == 2
            path = output_dir / f"student_{kind}_seed{seed}.keras"
            assert path.stat().st_size == summary["size_bytes"]
        # Equal architectures, so equal files: no optimizer state is saved.
        assert (
            students["distilled"]["size_bytes"]
            == students["scratch"]["size_bytes"]
        )
    teacher = keras.saving.load_model(output_dir / "teacher.keras")
    assert teacher.count_params() == saved["teacher"]["params"]
    assert results["teacher"]["test_accuracy"] == saved["teacher"][
        "test_accuracy"
    ]


@pytest.mark.slow
def test_quick_run_writes_both_plots(quick_run):
    output_dir, _, _ = quick_run
    for name in ("softened_distributions.png", "learning_curves.png"):
        with open(output_dir / name, "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_random_affine_is_identity_without_transform():
    images = np.random.default_rng(0).random((3, 28, 28, 1), "float32")
    transformed = example.random_affine(
        images, np.random.default_rng(1), 0.0, 0.0, 0.0
    )
    np.testing.assert_allclose(transformed, images, atol=1e-6)


def test_random_affine_shifts_and_keeps_range():
    images = np.zeros((1, 28, 28, 1), "float32")
    images[0, 10:18, 10:18] = 1.0
    transformed = example.random_affine(
        np.repeat(images, 8, axis=0), np.random.default_rng(0)
    )
    assert transformed.shape == (8, 28, 28, 1)
    assert transformed.min() >= 0.0 and transformed.max() <= 1.0 + 1e-6
    assert not np.allclose(transformed, images)


def test_training_batches_cover_each_epoch_and_repeat_with_the_seed():
    images = np.arange(10, dtype="float32").reshape(10, 1, 1, 1)
    labels = np.arange(10)
    batches = example.TrainingBatches(
        images, labels, batch_size=4, epochs=2, seed=3, augment=False
    )
    assert len(batches) == 6 and batches.steps_per_epoch == 3
    for epoch in range(2):
        seen = np.concatenate(
            [batches[epoch * 3 + step][1] for step in range(3)]
        )
        np.testing.assert_array_equal(np.sort(seen), labels)
        # Images stay paired with their labels.
        np.testing.assert_array_equal(
            np.concatenate(
                [batches[epoch * 3 + step][0] for step in range(3)]
            ).ravel(),
            seen,
        )
    assert not np.array_equal(batches[0][1], batches[3][1])
    again = example.TrainingBatches(
        images, labels, batch_size=4, epochs=2, seed=3, augment=False
    )
    np.testing.assert_array_equal(again[4][1], batches[4][1])


def test_seed_recipe_matches_keras_io():
    recipe = example.RECIPES["seed"]
    assert (recipe.teacher_epochs, recipe.student_epochs) == (5, 3)
    assert (recipe.alpha, recipe.temperature, recipe.batch_size) == (
        0.1, 10.0, 64
    )
    teacher, student = recipe.build_teacher(), recipe.build_student()
    # Conv2D(256) + Conv2D(512) + Dense(10) over 7 x 7 x 512 features.
    assert teacher.count_params() == (
        (9 * 256 + 256) + (9 * 256 * 512 + 512) + (7 * 7 * 512 * 10 + 10)
    )
    assert student.count_params() == (
        (9 * 16 + 16) + (9 * 16 * 32 + 32) + (7 * 7 * 32 * 10 + 10)
    )


def test_parse_args_defaults():
    args = example.parse_args([])
    assert args.recipe == "default"
    assert args.seeds == [0, 1, 2]
    assert args.output_dir == "runs/mnist"
    assert args.data_dir == "../shared/data"
    assert not args.quick
    assert args.epochs is None and args.teacher_epochs is None
