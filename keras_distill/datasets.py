"""Real datasets for the examples, tests and benchmarks.

`load_mnist` prefers Keras's own download (the full 60,000 / 10,000 MNIST
split). Machines without internet access fall back to the official MNIST test
split stored as IDX files, which it splits deterministically into a train and
a test part.
"""

import dataclasses
import gzip
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
