"""Tests for `keras_distill.datasets` on the real MNIST IDX files."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from keras_distill import datasets

DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def idx_splits():
    return datasets.load_mnist(DATA_DIR, download=False)


def test_idx_split_shapes_dtypes_and_ranges(idx_splits):
    (x_train, y_train), (x_test, y_test) = idx_splits
    assert idx_splits.source == "idx"
    assert x_train.shape == (8000, 28, 28, 1)
    assert x_test.shape == (2000, 28, 28, 1)
    assert y_train.shape == (8000,) and y_test.shape == (2000,)
    assert x_train.dtype == x_test.dtype == np.float32
    assert np.issubdtype(y_train.dtype, np.integer)
    for images in (x_train, x_test):
        assert images.min() == 0.0 and images.max() == 1.0
    for labels in (y_train, y_test):
        assert set(np.unique(labels)) == set(range(10))


def test_idx_split_is_a_disjoint_partition_of_the_file(idx_splits):
    images = datasets.read_idx_images(DATA_DIR / datasets.MNIST_IMAGES_FILE)
    labels = datasets.read_idx_labels(DATA_DIR / datasets.MNIST_LABELS_FILE)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)

    # Map every split image back to its row in the file by its raw bytes.
    row_of = {image.tobytes(): row for row, image in enumerate(images)}
    assert len(row_of) == len(images), "the file has duplicate images"
    rows = {}
    for name, (x, y) in zip(("train", "test"), idx_splits):
        pixels = np.rint(x[..., 0] * 255).astype(np.uint8)
        rows[name] = [row_of[image.tobytes()] for image in pixels]
        np.testing.assert_array_equal(labels[rows[name]], y)
    assert not set(rows["train"]) & set(rows["test"])
    assert len(set(rows["train"]) | set(rows["test"])) == 10000


def test_idx_split_is_deterministic_and_seeded(idx_splits):
    again = datasets.load_mnist(DATA_DIR, download=False)
    np.testing.assert_array_equal(again.x_train, idx_splits.x_train)
    np.testing.assert_array_equal(again.y_test, idx_splits.y_test)
    other = datasets.load_mnist(DATA_DIR, seed=1, download=False)
    assert not np.array_equal(other.y_train, idx_splits.y_train)


def test_train_size_sets_the_split(idx_splits):
    (x_train, _), (x_test, _) = datasets.load_mnist(
        DATA_DIR, train_size=9000, download=False
    )
    assert len(x_train) == 9000 and len(x_test) == 1000
    with pytest.raises(ValueError, match="train_size"):
        datasets.load_mnist(DATA_DIR, train_size=10000, download=False)


def test_missing_file_names_the_path_and_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        datasets.load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path / datasets.MNIST_IMAGES_FILE) in message
    assert "--data-dir" in message


def test_wrong_magic_number_is_rejected(tmp_path):
    # A labels file where an images file is expected.
    labels = (DATA_DIR / datasets.MNIST_LABELS_FILE).read_bytes()
    path = tmp_path / datasets.MNIST_IMAGES_FILE
    path.write_bytes(labels)
    with pytest.raises(ValueError, match="magic number 0x00000801"):
        datasets.read_idx_images(path)


def test_truncated_file_is_rejected(tmp_path):
    with gzip.open(DATA_DIR / datasets.MNIST_LABELS_FILE) as file:
        labels = file.read()
    path = tmp_path / datasets.MNIST_LABELS_FILE
    with gzip.open(path, "wb") as file:
        file.write(labels[:-10])
    with pytest.raises(ValueError, match="truncated"):
        datasets.read_idx_labels(path)


def test_download_failure_falls_back_to_idx(monkeypatch, capsys):
    def offline():
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(datasets.keras.datasets.mnist, "load_data", offline)
    splits = datasets.load_mnist(DATA_DIR)
    assert splits.source == "idx"
    output = capsys.readouterr().out
    assert "Could not download MNIST" in output
    assert len(output.strip().splitlines()) == 1


def test_download_success_uses_the_official_split(monkeypatch):
    images = np.full((6, 28, 28), 255, np.uint8)
    labels = np.arange(6, dtype=np.uint8)

    def online():
        return (images[:4], labels[:4]), (images[4:], labels[4:])

    monkeypatch.setattr(datasets.keras.datasets.mnist, "load_data", online)
    splits = datasets.load_mnist(DATA_DIR)
    (x_train, y_train), (x_test, _) = splits
    assert splits.source == "keras.datasets"
    assert x_train.shape == (4, 28, 28, 1) and x_test.shape == (2, 28, 28, 1)
    assert x_train.dtype == np.float32 and x_train.max() == 1.0
    np.testing.assert_array_equal(y_train, [0, 1, 2, 3])
