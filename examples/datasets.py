"""Real datasets for the examples, tests and benchmarks.

`load_mnist` prefers Keras's own download (the full 60,000 / 10,000 MNIST
split). Machines without internet access fall back to the official MNIST test
split stored as IDX files, which it splits deterministically into a train and
a test part.

`load_tiny_shakespeare` reads `tinyshakespeare.txt` from `data_dir` and
downloads it only when that file is missing. `load_financial_phrasebank`
reads the Financial PhraseBank files from `data_dir`: their licence (CC
BY-NC-SA 3.0) does not allow shipping them inside the package.
"""

import dataclasses
import gzip
import warnings
from pathlib import Path

import keras
import numpy as np

MNIST_IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS_FILE = "t10k-labels-idx1-ubyte.gz"

# IDX magic numbers: two zero bytes, the data type (0x08 = uint8) and the
# number of dimensions (3 for images, 1 for labels).
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_MNIST_IMAGE_SIZE = 28


@dataclasses.dataclass(frozen=True)
class MNISTSplits:
    """MNIST train and test arrays, and where they came from.

    Unpacks like `keras.datasets.mnist.load_data()`:
    `(x_train, y_train), (x_test, y_test) = splits`.

    Attributes:
        x_train: float32 images in `[0, 1]`, shape `(n_train, 28, 28, 1)`.
        y_train: int32 labels in `[0, 9]`, shape `(n_train,)`.
        x_test: float32 images in `[0, 1]`, shape `(n_test, 28, 28, 1)`.
        y_test: int32 labels in `[0, 9]`, shape `(n_test,)`.
        source: `"keras.datasets"` for the official 60,000 / 10,000 split,
            or `"idx"` for the local 10,000-image test split divided into
            train and test parts.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def __iter__(self):
        yield self.x_train, self.y_train
        yield self.x_test, self.y_test


def _read_idx(path, magic, header_size):
    """Returns the header fields after the magic number, and the payload."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST file not found: {path}. Pass the folder that holds "
            f"{MNIST_IMAGES_FILE} and {MNIST_LABELS_FILE} with "
            "`--data-dir` (or `data_dir=`)."
        )
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < header_size:
        raise ValueError(
            f"{path} holds {len(data)} bytes, fewer than the "
            f"{header_size}-byte IDX header: the file is truncated or corrupt."
        )
    header = np.frombuffer(data[:header_size], dtype=">u4")
    if header[0] != magic:
        raise ValueError(
            f"{path} is not an IDX file of the expected kind: magic number "
            f"{header[0]:#010x}, expected {magic:#010x}."
        )
    return header[1:], np.frombuffer(data, dtype=np.uint8, offset=header_size)


def read_idx_images(path):
    """Reads uint8 images from a gzipped IDX3 file.

    Args:
        path: Path to the `.gz` file, e.g. `t10k-images-idx3-ubyte.gz` (a
            16-byte header, then one byte per pixel, row by row).

    Returns:
        A uint8 array of shape `(count, rows, columns)`.

    Example:

    >>> images = read_idx_images("../shared/data/t10k-images-idx3-ubyte.gz")
    >>> images.shape
    (10000, 28, 28)
    """
    (count, rows, columns), pixels = _read_idx(path, _IDX_IMAGES_MAGIC, 16)
    if pixels.size != count * rows * columns:
        raise ValueError(
            f"{path} declares {count} images of {rows}x{columns} pixels but "
            f"holds {pixels.size} pixels: the file is truncated or corrupt."
        )
    return pixels.reshape(int(count), int(rows), int(columns))


def read_idx_labels(path):
    """Reads uint8 labels from a gzipped IDX1 file.

    Args:
        path: Path to the `.gz` file, e.g. `t10k-labels-idx1-ubyte.gz` (an
            8-byte header, then one byte per label).

    Returns:
        A uint8 array of shape `(count,)`.

    Example:

    >>> labels = read_idx_labels("../shared/data/t10k-labels-idx1-ubyte.gz")
    >>> labels.shape
    (10000,)
    """
    (count,), labels = _read_idx(path, _IDX_LABELS_MAGIC, 8)
    if labels.size != count:
        raise ValueError(
            f"{path} declares {count} labels but holds {labels.size}: the "
            "file is truncated or corrupt."
        )
    return labels


def _as_model_inputs(images, labels):
    """Scales uint8 images to float32 `[0, 1]` with a channel axis."""
    images = images.astype("float32")[..., np.newaxis] / 255.0
    return images, labels.astype("int32")


def _load_idx_split(data_dir, train_size, seed):
    data_dir = Path(data_dir)
    images = read_idx_images(data_dir / MNIST_IMAGES_FILE)
    labels = read_idx_labels(data_dir / MNIST_LABELS_FILE)
    if len(images) != len(labels):
        raise ValueError(
            f"{data_dir} holds {len(images)} images but {len(labels)} labels."
        )
    if images.shape[1:] != (_MNIST_IMAGE_SIZE, _MNIST_IMAGE_SIZE):
        raise ValueError(
            f"Expected {_MNIST_IMAGE_SIZE}x{_MNIST_IMAGE_SIZE} MNIST images, "
            f"got {images.shape[1]}x{images.shape[2]}."
        )
    if not 0 < train_size < len(images):
        raise ValueError(
            f"`train_size` must be between 1 and {len(images) - 1} (the rest "
            f"is the test part), got {train_size}."
        )
    # A seeded permutation gives the same disjoint split on every machine and
    # backend, independent of Keras's global seed.
    order = np.random.default_rng(seed).permutation(len(images))
    train_indices, test_indices = order[:train_size], order[train_size:]
    x_train, y_train = _as_model_inputs(
        images[train_indices], labels[train_indices]
    )
    x_test, y_test = _as_model_inputs(
        images[test_indices], labels[test_indices]
    )
    return MNISTSplits(x_train, y_train, x_test, y_test, source="idx")


def load_mnist(
    data_dir="../shared/data", train_size=8000, seed=0, download=True
):
    """Loads MNIST as float32 images in `[0, 1]` and int32 labels.

    With `download=True` it first tries `keras.datasets.mnist.load_data()` and,
    if that works, returns the official 60,000 / 10,000 split (`train_size`
    and `seed` are then unused). Otherwise (for example offline) it prints one
    line and reads the official 10,000-image MNIST test split from
    `data_dir/t10k-images-idx3-ubyte.gz` and
    `data_dir/t10k-labels-idx1-ubyte.gz`, then splits it with a permutation
    seeded by `seed` into `train_size` training images and the remaining
    test images (8,000 / 2,000 by default).

    Args:
        data_dir: Folder holding the two IDX files.
        train_size: Number of the 10,000 IDX images used for training.
        seed: Seed of the train/test permutation of the IDX images.
        download: Whether to try `keras.datasets.mnist.load_data()` first.

    Returns:
        An `MNISTSplits` that unpacks as
        `(x_train, y_train), (x_test, y_test)`: images of shape
        `(n, 28, 28, 1)`, labels of shape `(n,)`. Its `source` attribute is
        `"keras.datasets"` or `"idx"`.

    Example:

    >>> splits = load_mnist("../shared/data", download=False)
    >>> (x_train, y_train), (x_test, y_test) = splits
    >>> x_train.shape, x_test.shape, splits.source
    ((8000, 28, 28, 1), (2000, 28, 28, 1), 'idx')
    """
    if download:
        try:
            (x_train, y_train), (x_test, y_test) = (
                keras.datasets.mnist.load_data()
            )
        except Exception as error:
            # `keras.utils.get_file` raises a bare `Exception` when offline.
            print(
                "Could not download MNIST with keras.datasets "
                f"({type(error).__name__}); using the IDX files in {data_dir}."
            )
        else:
            x_train, y_train = _as_model_inputs(x_train, y_train)
            x_test, y_test = _as_model_inputs(x_test, y_test)
            return MNISTSplits(
                x_train, y_train, x_test, y_test, source="keras.datasets"
            )
    return _load_idx_split(data_dir, train_size, seed)


TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
    "tinyshakespeare/input.txt"
)


def load_tiny_shakespeare(data_dir="../shared/data", download=True):
    """Loads Tiny Shakespeare (about 1.1 MB of plain text) as one string.

    Reads `data_dir/tinyshakespeare.txt` when it exists. Otherwise, with
    `download=True`, it downloads the text from `TINY_SHAKESPEARE_URL` with
    `keras.utils.get_file` (cached under `~/.keras/datasets`).

    Args:
        data_dir: Folder that may hold `tinyshakespeare.txt`.
        download: Whether to download the text when the file is missing.

    Returns:
        The text, a `str` of about 1.1 million characters.

    Example:

    >>> text = load_tiny_shakespeare("../shared/data", download=False)
    >>> text[:14], len(text)
    ('First Citizen:', 1115394)
    """
    path = Path(data_dir) / TINY_SHAKESPEARE_FILE
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"Tiny Shakespeare not found: {path}. Pass the folder that "
                f"holds {TINY_SHAKESPEARE_FILE} with `--data-dir` (or "
                "`data_dir=`), or allow the download (`download=True`)."
            )
        try:
            path = keras.utils.get_file(
                "tinyshakespeare.txt", origin=TINY_SHAKESPEARE_URL
            )
        except Exception as error:
            # `keras.utils.get_file` raises a bare `Exception` when offline.
            raise FileNotFoundError(
                f"Tiny Shakespeare is not in {data_dir} and downloading "
                f"{TINY_SHAKESPEARE_URL} failed ({error}). Save that file as "
                f"{Path(data_dir) / TINY_SHAKESPEARE_FILE}, or pass its "
                "folder with `--data-dir` (or `data_dir=`)."
            ) from error
    return Path(path).read_text(encoding="utf-8")


PHRASEBANK_DIR = "financial_phrasebank"
PHRASEBANK_FILES = {
    "50": "Sentences_50Agree.txt",
    "66": "Sentences_66Agree.txt",
    "75": "Sentences_75Agree.txt",
    "all": "Sentences_AllAgree.txt",
}
# A fixed order, so that label ids mean the same in every file and run.
PHRASEBANK_CLASSES = ("negative", "neutral", "positive")
# Beyond this many, a warning gives the count instead of every line.
_MAX_REPORTED_LINES = 10


@dataclasses.dataclass(frozen=True)
class PhraseBank:
    """Financial PhraseBank sentences and labels of one agreement level.

    Unpacks as `sentences, labels = phrasebank`.

    Attributes:
        sentences: The sentences as `str`, in file order (a few occur twice
            in a file).
        labels: int32 label ids of shape `(n,)`, indices into `class_names`.
        class_names: `("negative", "neutral", "positive")`.
        path: The file that was read.
        skipped_lines: 1-based numbers of the malformed lines skipped.
    """

    sentences: list
    labels: np.ndarray
    class_names: tuple
    path: Path
    skipped_lines: tuple

    def __iter__(self):
        yield self.sentences
        yield self.labels


def parse_phrasebank_lines(lines):
    """Parses `sentence@label` lines, splitting each on its last `@`.

    Lines that have no `@`, an empty sentence or a label other than those in
    `PHRASEBANK_CLASSES` are malformed; blank lines are ignored.

    Args:
        lines: An iterable of text lines.

    Returns:
        `(sentences, label_ids, malformed)`: the sentences, their label ids
        (indices into `PHRASEBANK_CLASSES`), and `(line_number, line)` of
        every malformed line, with 1-based line numbers.

    Example:

    >>> parse_phrasebank_lines(["Up 5 % @ EUR 2 .@positive", "1", ""])
    (['Up 5 % @ EUR 2 .'], [2], [(2, '1')])
    """
    sentences, label_ids, malformed = [], [], []
    for line_number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        sentence, separator, label = line.rpartition("@")
        sentence, label = sentence.strip(), label.strip()
        if not separator or not sentence or label not in PHRASEBANK_CLASSES:
            malformed.append((line_number, line))
            continue
        sentences.append(sentence)
        label_ids.append(PHRASEBANK_CLASSES.index(label))
    return sentences, label_ids, malformed


def load_financial_phrasebank(data_dir="../shared/data", agreement="50"):
    """Loads Financial PhraseBank v1.0 (Malo et al., 2014) from local files.

    Reads `data_dir/financial_phrasebank/Sentences_<agreement>Agree.txt`
    (or `data_dir/Sentences_...` directly), decoded as ISO-8859-1, the
    files' encoding, in which every byte is a character, so no file fails
    to decode. Each line is `sentence@label`, split on its last `@`.
    Malformed lines (such as the stray line `1` in the all-agree file) are
    skipped and reported, by line number, in one `UserWarning`.

    The dataset is licensed CC BY-NC-SA 3.0 and is not downloaded here; get
    `FinancialPhraseBank-v1.0.zip` from its authors (or the Hugging Face
    dataset `takala/financial_phrasebank`) and unzip it into `data_dir`.

    Args:
        data_dir: Folder holding `financial_phrasebank/` (or the files).
        agreement: Minimum share of annotators that agreed on the label:
            `"50"`, `"66"`, `"75"` or `"all"`.

    Returns:
        A `PhraseBank` that unpacks as `sentences, labels`; label ids index
        `PHRASEBANK_CLASSES` = `("negative", "neutral", "positive")`.

    Example:

    >>> bank = load_financial_phrasebank("../shared/data", agreement="50")
    >>> len(bank.sentences), bank.class_names
    (4846, ('negative', 'neutral', 'positive'))
    >>> np.bincount(bank.labels).tolist()
    [604, 2879, 1363]
    """
    agreement = str(agreement).lower()
    if agreement not in PHRASEBANK_FILES:
        raise ValueError(
            f"`agreement` must be one of {sorted(PHRASEBANK_FILES)}, got "
            f"{agreement!r}."
        )
    file_name = PHRASEBANK_FILES[agreement]
    candidates = [
        Path(data_dir) / PHRASEBANK_DIR / file_name,
        Path(data_dir) / file_name,
    ]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"Financial PhraseBank file not found: {candidates[0]}. Unzip "
            "FinancialPhraseBank-v1.0.zip into the folder passed as "
            "`--data-dir` (or `data_dir=`), so that it holds "
            f"{PHRASEBANK_DIR}/{file_name}."
        )
    with open(path, encoding="iso-8859-1", newline="") as file:
        sentences, label_ids, malformed = parse_phrasebank_lines(file)
    if malformed:
        reported = "; ".join(
            f"line {number}: {line[:60]!r}"
            for number, line in malformed[:_MAX_REPORTED_LINES]
        )
        more = len(malformed) - _MAX_REPORTED_LINES
        if more > 0:
            reported += f"; and {more} more"
        warnings.warn(
            f"Skipped {len(malformed)} malformed line(s) of {path} (expected "
            f"'sentence@label' with label in {PHRASEBANK_CLASSES}): "
            f"{reported}.",
            UserWarning,
            stacklevel=2,
        )
    if not sentences:
        raise ValueError(
            f"{path} holds no 'sentence@label' lines: it is not a Financial "
            "PhraseBank file."
        )
    return PhraseBank(
        sentences=sentences,
        labels=np.asarray(label_ids, dtype="int32"),
        class_names=PHRASEBANK_CLASSES,
        path=path,
        skipped_lines=tuple(number for number, _ in malformed),
    )
