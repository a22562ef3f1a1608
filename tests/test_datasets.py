"""Tests for `keras_distill.examples.datasets` on the real MNIST IDX files."""

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest

from keras_distill.examples import datasets

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


def test_tiny_shakespeare_reads_the_local_file(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the local file must be read without download")

    monkeypatch.setattr(datasets.keras.utils, "get_file", no_download)
    text = datasets.load_tiny_shakespeare(DATA_DIR)
    expected = (DATA_DIR / datasets.TINY_SHAKESPEARE_FILE).read_bytes()
    assert text.encode("utf-8") == expected
    assert text.startswith("First Citizen:\nBefore we proceed any further")
    assert len(text) == 1115394


def test_tiny_shakespeare_downloads_when_the_file_is_missing(
    tmp_path, monkeypatch
):
    downloaded = tmp_path / "cache" / "input.txt"
    downloaded.parent.mkdir()
    downloaded.write_text("ROMEO:\nHello.\n", encoding="utf-8")
    calls = []

    def get_file(fname, origin):
        calls.append(origin)
        return str(downloaded)

    monkeypatch.setattr(datasets.keras.utils, "get_file", get_file)
    assert datasets.load_tiny_shakespeare(tmp_path) == "ROMEO:\nHello.\n"
    assert calls == [datasets.TINY_SHAKESPEARE_URL]


def test_tiny_shakespeare_missing_file_names_the_path_and_the_flag(
    tmp_path, monkeypatch
):
    with pytest.raises(FileNotFoundError) as error:
        datasets.load_tiny_shakespeare(tmp_path, download=False)
    assert str(tmp_path / datasets.TINY_SHAKESPEARE_FILE) in str(error.value)
    assert "--data-dir" in str(error.value)

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(datasets.keras.utils, "get_file", offline)
    with pytest.raises(FileNotFoundError, match="downloading .* failed"):
        datasets.load_tiny_shakespeare(tmp_path)


def _phrasebank_reference(path):
    """Independent parse of a PhraseBank file: (sentences, labels, bad lines)."""
    raw = Path(path).read_bytes().decode("latin-1").split("\n")
    sentences, labels, bad = [], [], []
    for number, line in enumerate(raw, start=1):
        if not line:
            continue
        head, _, tail = line.rpartition("@")
        if tail in ("negative", "neutral", "positive") and head.strip():
            sentences.append(head.strip())
            labels.append(["negative", "neutral", "positive"].index(tail))
        else:
            bad.append(number)
    return sentences, labels, bad


@pytest.mark.parametrize(
    "agreement, count, class_counts",
    [("50", 4846, [604, 2879, 1363]), ("all", 2263, [303, 1390, 570])],
)
def test_phrasebank_matches_the_real_files(agreement, count, class_counts):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = datasets.load_financial_phrasebank(DATA_DIR, agreement)
    sentences, labels = bank
    assert bank.class_names == ("negative", "neutral", "positive")
    assert len(sentences) == len(labels) == count
    assert labels.dtype == np.int32
    assert np.bincount(labels).tolist() == class_counts
    reference = _phrasebank_reference(bank.path)
    assert sentences == reference[0]
    assert labels.tolist() == reference[1]
    assert list(bank.skipped_lines) == reference[2]
    # Non-ASCII bytes decode as ISO-8859-1 characters.
    assert any(any(ord(c) > 127 for c in s) for s in sentences)
    assert all(s == s.strip() for s in sentences)
    if agreement == "all":
        # The stray line "1" of the all-agree file, reported by number.
        assert bank.skipped_lines == (38,)
        assert len(caught) == 1 and "line 38: '1'" in str(caught[0].message)
    else:
        assert bank.skipped_lines == () and not caught


def test_phrasebank_splits_on_the_last_at_and_reports_bad_lines(tmp_path):
    lines = [
        "Shares @ EUR 5 rose .@positive",      # '@' inside the sentence
        "no label at all",                       # no '@'
        "",                                       # blank: ignored
        "Profit fell .@negative\r",             # CRLF line ending
        "Odd label .@bullish",                  # unknown label
        "@neutral",                              # empty sentence
        "Caf\xe9 sales were flat .@neutral",    # a Latin-1 byte
    ]
    path = tmp_path / "Sentences_75Agree.txt"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.warns(UserWarning) as record:
        bank = datasets.load_financial_phrasebank(tmp_path, agreement="75")
    assert bank.sentences == [
        "Shares @ EUR 5 rose .", "Profit fell .", "Caf\xe9 sales were flat .",
    ]
    assert bank.labels.tolist() == [2, 0, 1]
    assert bank.skipped_lines == (2, 5, 6)
    message = str(record[0].message)
    assert "3 malformed line(s)" in message
    for number in (2, 5, 6):
        assert f"line {number}:" in message


def test_phrasebank_never_fails_on_the_encoding(tmp_path):
    folder = tmp_path / datasets.PHRASEBANK_DIR
    folder.mkdir()
    # Every byte value 0x80-0xFF, including ones invalid as UTF-8.
    sentence = bytes(range(0x80, 0x100)) + b" ."
    (folder / "Sentences_66Agree.txt").write_bytes(sentence + b"@neutral\n")
    bank = datasets.load_financial_phrasebank(tmp_path, agreement="66")
    assert bank.sentences == [sentence.decode("latin-1")]


def test_phrasebank_bad_arguments_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="`agreement` must be one of"):
        datasets.load_financial_phrasebank(DATA_DIR, agreement="90")
    with pytest.raises(FileNotFoundError) as error:
        datasets.load_financial_phrasebank(tmp_path, agreement="all")
    message = str(error.value)
    assert "Sentences_AllAgree.txt" in message and "--data-dir" in message
    (tmp_path / "Sentences_50Agree.txt").write_text("nothing here\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no 'sen"):
        datasets.load_financial_phrasebank(tmp_path)
