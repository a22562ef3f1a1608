"""Distill an MNIST teacher into a small student and compare with scratch.

Trains a teacher once, then, for each seed, a distilled student (with
`keras_distill.Distiller`) and a scratch student that starts from the same
initial weights and sees the same batches for the same number of epochs. It
prints one table (test accuracy as mean ± std over seeds, parameter count,
size of the saved `.keras` file, median training seconds per epoch) and writes
`results.json`, `softened_distributions.png` and `learning_curves.png` to
`--output-dir`.

Offline, `keras_distill.examples.datasets.load_mnist` falls back to the official MNIST
test split (10,000 images) split into 8,000 train / 2,000 test images; the
learning curves are accuracies on those 2,000 test images after each epoch,
used for plotting only (no early stopping or model selection).

Recipes (`--recipe`):

- `seed`: keras.io's "Knowledge Distillation" example, except that the
  scratch student starts from the distilled one's initial weights (keras.io
  clones it with fresh ones): the Conv2D(256)/Conv2D(512) teacher and its
  16/32-filter student, Adam,
  alpha 0.1, temperature 10, `KLDivergence()`, teacher 5 epochs, students 3
  epochs, batch size 64 (keras.io defines `batch_size = 64` but never passes
  it to `fit`, so its own runs use 32; pass `--batch-size 32` to match that).
  On the 8,000-image split 3 epochs show no gain (jax, seeds 0-2: teacher
  0.969, distilled 0.910 ± 0.013, scratch 0.925 ± 0.007), and its teacher
  costs about a minute per epoch on 2 CPU cores.
- `default`: a recipe where distillation pays off on 8,000 images:
    - Teacher: a small CNN with dropout, trained on randomly rotated, zoomed
      and shifted images for 12 epochs (0.989 test accuracy on jax). Without
      that regularization a teacher overfits 8,000 images (the `seed`
      teacher reaches 0.969), and a teacher that is not clearly better
      than the student has little to teach.
    - Student: an MLP with one hidden layer of 128 units: 45% of the
      teacher's parameters and 1/25 of its multiply-adds per image. Trained
      on the 8,000 images as they are, its test accuracy stops improving
      after about 10 epochs, near 0.95: the hard labels have nothing left
      to teach, while the teacher's soft targets keep teaching.
    - Temperature 5, alpha 0.1: at T = 1 the teacher's confident outputs are
      nearly one-hot (see `softened_distributions.png`), so they carry little
      more than the labels. In one-seed trials T = 5 and T = 10 did equally
      well, T = 20 slightly worse and T = 2 clearly worse (tried on 64- and
      256-unit students); alpha 0.1 (keras.io's) lets the soft targets
      dominate.
    - 20 student epochs: scratch stalls after about 10 epochs while the
      distilled student keeps improving, so the gain grows with training
      (mean over seeds 0-2 on jax: -0.6 points at 5 epochs, +1.0 at 10,
      +2.0 at 20, +1.8 at 30; on tensorflow +1.2 at 20, +1.4 at 30). Going
      past 20 epochs costs time without adding to the gain.
    - The students see no augmentation, so both train on identical batches
      (same order, same initial weights). Giving both students the teacher's
      augmentation ("function matching", Beyer et al., 2022) was tried too:
      it lifts the scratch MLP to the distilled one's accuracy (64 hidden
      units: 0.970 vs 0.969 at 30 epochs and 0.976 vs 0.976 at 80, one
      seed), so on this data augmentation replaces the teacher rather than
      adding to it. The distilled student's gain here is over a scratch
      student without augmentation.
    - Augmentation is a random affine transform in NumPy, in the input
      pipeline: Keras's `RandomRotation`/`RandomTranslation`/`RandomZoom`
      layers called eagerly per batch cost 4 to 30 seconds per epoch on 2 CPU
      cores (torch the slowest), the NumPy transform about 0.4.

The distilled student's seconds per epoch include the teacher's forward pass.

Run `python examples/mnist_distillation.py` (4 to 6 minutes on 2 CPU cores:
jax is the fastest, then torch, then tensorflow) or `--quick` for a
smoke test (about 20 seconds).
"""

import argparse
import dataclasses
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

from keras_distill import Distiller
from keras_distill.examples import reporting
from keras_distill.examples.datasets import load_mnist

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
PLOTTED_TEMPERATURES = (1.0, 3.0, 10.0)


def build_seed_teacher():
    """keras.io's teacher: two strided convolutions, about 1.4M parameters."""
    return _keras_io_cnn(256, 512, name="teacher")


def build_seed_student():
    """keras.io's student: the teacher's architecture with 16 and 32 filters."""
    return _keras_io_cnn(16, 32, name="student")


def _keras_io_cnn(filters_1, filters_2, name):
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            layers.Conv2D(filters_1, 3, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.MaxPooling2D((2, 2), strides=(1, 1), padding="same"),
            layers.Conv2D(filters_2, 3, strides=2, padding="same"),
            layers.Flatten(),
            layers.Dense(NUM_CLASSES),
        ],
        name=name,
    )


def build_default_teacher():
    """A two-convolution CNN with dropout, the `default` recipe's teacher."""
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(NUM_CLASSES),
        ],
        name="teacher",
    )


def build_default_student():
    """An MLP with 128 hidden units, the `default` recipe's student."""
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(NUM_CLASSES),
        ],
        name="student",
    )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Models and hyperparameters of one teacher/student comparison.

    Attributes:
        build_teacher: Returns a new teacher that outputs logits.
        build_student: Returns a new student that outputs logits.
        teacher_epochs: Epochs of teacher training.
        student_epochs: Epochs of each student, distilled and scratch.
        batch_size: Batch size of every `fit`.
        alpha: Weight of the hard-label loss in the distillation loss.
        temperature: Softening temperature of the distillation loss.
        augment_teacher: Whether the teacher's training batches are
            randomly transformed with `random_affine`.
    """

    build_teacher: object
    build_student: object
    teacher_epochs: int
    student_epochs: int
    batch_size: int
    alpha: float
    temperature: float
    augment_teacher: bool


RECIPES = {
    "default": Recipe(
        build_teacher=build_default_teacher,
        build_student=build_default_student,
        teacher_epochs=12,
        student_epochs=20,
        batch_size=64,
        alpha=0.1,
        temperature=5.0,
        augment_teacher=True,
    ),
    "seed": Recipe(
        build_teacher=build_seed_teacher,
        build_student=build_seed_student,
        teacher_epochs=5,
        student_epochs=3,
        batch_size=64,
        alpha=0.1,
        temperature=10.0,
        augment_teacher=False,
    ),
}


def random_affine(
    images, rng, max_rotation_degrees=10.0, max_zoom=0.1, max_shift=2.0
):
    """Rotates, zooms and shifts each image by a random amount.

    Each output pixel is bilinearly interpolated from the input; pixels that
    come from outside the image are 0 (MNIST's background).

    Args:
        images: float array of shape `(n, height, width, 1)`.
        rng: A `np.random.Generator`.
        max_rotation_degrees: Rotations are uniform in `±max_rotation_degrees`.
        max_zoom: Scale factors are uniform in `1 ± max_zoom`.
        max_shift: Shifts are uniform in `±max_shift` pixels on each axis.

    Returns:
        A float32 array of the shape of `images`.

    Example:

    >>> images = np.zeros((2, 28, 28, 1), "float32")
    >>> random_affine(images, np.random.default_rng(0)).shape
    (2, 28, 28, 1)
    """
    count, height, width, _ = images.shape
    angle = np.deg2rad(
        rng.uniform(-max_rotation_degrees, max_rotation_degrees, count)
    )
    scale = rng.uniform(1.0 - max_zoom, 1.0 + max_zoom, count)
    shift = rng.uniform(-max_shift, max_shift, (count, 2))

    # Each output pixel reads from the inverse-transformed position.
    center_row, center_col = (height - 1) / 2, (width - 1) / 2
    rows, cols = np.meshgrid(
        np.arange(height) - center_row, np.arange(width) - center_col,
        indexing="ij",
    )
    cos = (np.cos(angle) / scale)[:, None, None]
    sin = (np.sin(angle) / scale)[:, None, None]
    source_rows = cos * rows - sin * cols + center_row - shift[:, 0, None, None]
    source_cols = sin * rows + cos * cols + center_col - shift[:, 1, None, None]

    # A one-pixel zero border makes every out-of-image read a background 0.
    padded = np.pad(images[..., 0], ((0, 0), (1, 1), (1, 1)))
    top, left = np.floor(source_rows), np.floor(source_cols)
    row_weight, col_weight = source_rows - top, source_cols - left
    top = np.clip(top.astype(int) + 1, 0, height)
    left = np.clip(left.astype(int) + 1, 0, width)
    batch = np.arange(count)[:, None, None]
    transformed = (
        padded[batch, top, left] * (1 - row_weight) * (1 - col_weight)
        + padded[batch, top + 1, left] * row_weight * (1 - col_weight)
        + padded[batch, top, left + 1] * (1 - row_weight) * col_weight
        + padded[batch, top + 1, left + 1] * row_weight * col_weight
    )
    return transformed[..., np.newaxis].astype("float32")


class TrainingBatches(keras.utils.PyDataset):
    """Shuffled, optionally augmented training batches for every epoch.

    The dataset holds `epochs * steps_per_epoch` batches and batch `i` depends
    only on `(seed, i)`, so two `fit` calls with the same seed (the distilled
    and the scratch student) see identical batches on every backend,
    whatever order or thread Keras reads them in. Pass
    `steps_per_epoch=dataset.steps_per_epoch` and `shuffle=False` to `fit`.

    Args:
        images: float32 images of shape `(n, 28, 28, 1)`.
        labels: int labels of shape `(n,)`.
        batch_size: Images per batch; the last batch of an epoch is smaller.
        epochs: Number of epochs the dataset covers.
        seed: Seed of the shuffling and the augmentation.
        augment: Whether to apply `random_affine` to each batch.

    Example:

    >>> batches = TrainingBatches(np.zeros((10, 28, 28, 1)), np.zeros(10), 4,
    ...                           epochs=2, seed=0, augment=True)
    >>> len(batches), batches.steps_per_epoch, batches[2][0].shape
    (6, 3, (2, 28, 28, 1))
    """

    def __init__(self, images, labels, batch_size, epochs, seed, augment):
        super().__init__()
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.steps_per_epoch = -(-len(images) // batch_size)
        self.epochs = epochs
        self.seed = seed
        self.augment = augment

    def __len__(self):
        return self.epochs * self.steps_per_epoch

    def __getitem__(self, index):
        epoch, step = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(
            len(self.images)
        )
        batch = order[step * self.batch_size : (step + 1) * self.batch_size]
        images = self.images[batch]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, step])
            images = random_affine(images, rng)
        return images, self.labels[batch]


class EpochTimer(keras.callbacks.Callback):
    """Records each epoch's training time, excluding validation.

    Example:

    >>> timer = EpochTimer()
    >>> timer.epoch_seconds
    []
    """

    def __init__(self):
        super().__init__()
        self.epoch_seconds = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        # `fit` validates after the epoch's last step; stop the clock there.
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def _stop(self):
        if self._start is not None:
            self.epoch_seconds.append(time.perf_counter() - self._start)
            self._start = None


def _fit(model, data, epochs, batch_size, seed, augment):
    """Fits `model` (a compiled classifier or Distiller) on the train split.

    Returns:
        `(val_accuracies, epoch_seconds)`: test accuracy after each epoch and
        training seconds of each epoch.
    """
    (x_train, y_train), (x_test, y_test) = data
    # Same seed, same batches: the two students differ only in their loss.
    keras.utils.set_random_seed(seed)
    batches = TrainingBatches(
        x_train, y_train, batch_size, epochs, seed, augment
    )
    timer = EpochTimer()
    history = model.fit(
        batches,
        epochs=epochs,
        steps_per_epoch=batches.steps_per_epoch,
        # `TrainingBatches` shuffles within each epoch; Keras's own shuffle
        # would reorder batches across epochs.
        shuffle=False,
        validation_data=(x_test, y_test),
        callbacks=[timer],
        verbose=0,
    )
    return history.history["val_accuracy"], timer.epoch_seconds


def _compile_classifier(model):
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def classification_accuracy(model, images, labels):
    """Fraction of `images` whose argmax logit is the label.

    Args:
        model: A model returning logits.
        images: Test images.
        labels: Integer labels.

    Returns:
        The accuracy as a Python float.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), layers.Dense(2)])
    >>> 0.0 <= classification_accuracy(model, np.eye(2), np.arange(2)) <= 1.0
    True
    """
    # Calling the model directly avoids tracing a new `predict` function for
    # every model.
    correct = 0
    for start in range(0, len(images), 500):
        logits = model(images[start : start + 500], training=False)
        predictions = keras.ops.convert_to_numpy(keras.ops.argmax(logits, -1))
        correct += int(np.sum(predictions == labels[start : start + 500]))
    return correct / len(images)


def saved_size_bytes(model, path):
    """Saves `model` without optimizer state and returns the file's size.

    Args:
        model: A Keras model.
        path: Destination ending in `.keras`.

    Returns:
        The size in bytes.

    Example:

    ```python
    model = keras.Sequential([keras.Input((2,)), layers.Dense(2)])
    size = saved_size_bytes(model, "runs/tiny.keras")
    ```
    """
    # A compiled model's file also holds its optimizer's state (Adam keeps two
    # slots per weight); an uncompiled copy (`clone_model` would compile it)
    # holds what one deploys.
    inference_model = model.__class__.from_config(model.get_config())
    inference_model.set_weights(model.get_weights())
    inference_model.save(path)
    return Path(path).stat().st_size


def train_teacher(recipe, data, epochs, batch_size, seed, output_dir):
    """Trains, evaluates and saves the teacher.

    Args:
        recipe: The `Recipe` whose teacher to train.
        data: `((x_train, y_train), (x_test, y_test))`.
        epochs: Training epochs.
        batch_size: Batch size.
        seed: Seed of the initial weights, shuffling and augmentation.
        output_dir: Folder that receives `teacher.keras`.

    Returns:
        `(teacher, summary)`; the summary holds the test accuracy, the test
        accuracy after each epoch, the parameter count, the saved size and
        the training seconds of each epoch.

    Example:

    ```python
    teacher, summary = train_teacher(
        RECIPES["default"], load_mnist(), 12, 64, 0, Path("runs/mnist")
    )
    ```
    """
    keras.utils.set_random_seed(seed)
    teacher = recipe.build_teacher()
    _compile_classifier(teacher)
    val_accuracies, epoch_seconds = _fit(
        teacher, data, epochs, batch_size, seed, recipe.augment_teacher
    )
    (_, _), (x_test, y_test) = data
    summary = {
        "test_accuracy": classification_accuracy(teacher, x_test, y_test),
        "val_accuracy_per_epoch": val_accuracies,
        "params": teacher.count_params(),
        "size_bytes": saved_size_bytes(teacher, output_dir / "teacher.keras"),
        "epoch_seconds": epoch_seconds,
    }
    return teacher, summary


def train_students(recipe, teacher, data, epochs, batch_size, seed, output_dir):
    """Trains a distilled and a scratch student from the same initial weights.

    Both students see the same batches for the same number of epochs; only
    the distilled one learns from the teacher.

    Args:
        recipe: The `Recipe` giving the student and distillation settings.
        teacher: The trained teacher.
        data: `((x_train, y_train), (x_test, y_test))`.
        epochs: Training epochs of each student.
        batch_size: Batch size.
        seed: Seed of the initial weights and the shuffling.
        output_dir: Folder that receives `student_{kind}_seed{seed}.keras`.

    Returns:
        `{"distilled": summary, "scratch": summary}`, each summary as in
        `train_teacher`.

    Example:

    ```python
    summaries = train_students(
        RECIPES["default"], teacher, load_mnist(), 20, 64, 0,
        Path("runs/mnist"),
    )
    ```
    """
    keras.utils.set_random_seed(seed)
    student = recipe.build_student()
    scratch = keras.models.clone_model(student)
    scratch.set_weights(student.get_weights())

    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(),
        metrics=["accuracy"],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=recipe.alpha,
        temperature=recipe.temperature,
    )
    _compile_classifier(scratch)

    (_, _), (x_test, y_test) = data
    summaries = {}
    for kind, trained, model in (
        ("distilled", distiller, student),
        ("scratch", scratch, scratch),
    ):
        val_accuracies, epoch_seconds = _fit(
            trained, data, epochs, batch_size, seed, augment=False
        )
        path = output_dir / f"student_{kind}_seed{seed}.keras"
        summaries[kind] = {
            "test_accuracy": classification_accuracy(model, x_test, y_test),
            "val_accuracy_per_epoch": val_accuracies,
            "params": model.count_params(),
            "size_bytes": saved_size_bytes(model, path),
            "epoch_seconds": epoch_seconds,
        }
    return summaries


def plot_softened_distributions(teacher, image, label, path):
    """Bar charts of the teacher's softmax(logits / T) for one image.

    Args:
        teacher: A model returning logits.
        image: One image of shape `(28, 28, 1)`.
        label: Its true label.
        path: Destination PNG.

    Example:

    ```python
    plot_softened_distributions(teacher, x_test[0], y_test[0], "t.png")
    ```
    """
    plt = reporting.pyplot()
    logits = teacher(image[np.newaxis], training=False)[0]
    figure, axes = plt.subplots(
        1, len(PLOTTED_TEMPERATURES), figsize=(12, 3.2), sharey=True
    )
    for axis, temperature in zip(axes, PLOTTED_TEMPERATURES):
        probabilities = keras.ops.convert_to_numpy(
            keras.ops.softmax(logits / temperature)
        )
        axis.bar(range(NUM_CLASSES), probabilities, color="tab:blue")
        axis.set_xticks(range(NUM_CLASSES))
        axis.set_title(f"T = {temperature:g}")
        axis.set_xlabel("class")
    axes[0].set_ylabel("teacher probability")
    figure.suptitle(f"Teacher's softened distribution for a test '{label}'")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_learning_curves(curves, path):
    """Test accuracy per epoch of distilled vs scratch students.

    Args:
        curves: `{"distilled": per_seed_curves, "scratch": per_seed_curves}`,
            each a list (one per seed) of per-epoch accuracies.
        path: Destination PNG.

    Example:

    ```python
    plot_learning_curves(
        {"distilled": [[0.9, 0.95]], "scratch": [[0.9, 0.93]]}, "curves.png"
    )
    ```
    """
    reporting.plot_curves(
        {kind: curves[kind] for kind in ("distilled", "scratch")},
        path,
        "test accuracy",
        f"Student accuracy, mean ± std over {len(curves['distilled'])} seeds",
    )


def format_table(results):
    """The results table as text: one row per model, plus the gain.

    Args:
        results: The dict `run` returns.

    Returns:
        A multi-line string.

    Example:

    ```python
    print(format_table(run(parse_args(["--quick"]))))
    ```
    """
    def size(num_bytes):
        return f"{num_bytes / 1024:,.0f} KiB"

    teacher = results["teacher"]
    rows = [
        (
            "teacher",
            f"{teacher['test_accuracy']:.4f}",
            f"{teacher['params']:,}",
            size(teacher["size_bytes"]),
            f"{np.median(teacher['epoch_seconds']):.2f}",
        )
    ]
    for kind in ("distilled", "scratch"):
        per_seed = [seed_result[kind] for seed_result in results["students"]]
        epoch_seconds = [s for r in per_seed for s in r["epoch_seconds"]]
        rows.append(
            (
                f"{kind} student",
                reporting.format_mean_std([r["test_accuracy"] for r in per_seed]),
                f"{per_seed[0]['params']:,}",
                size(per_seed[0]["size_bytes"]),
                f"{np.median(epoch_seconds):.2f}",
            )
        )
    header = (
        "model", "test accuracy", "params", "size on disk", "median s/epoch"
    )
    lines = reporting.format_rows(header, rows)
    lines.append(
        reporting.format_gains(
            "distilled - scratch", results["gain_per_seed"], results["seeds"]
        )
    )
    return "\n".join(lines)


def run(args):
    """Trains every model `args` asks for and writes the outputs.

    Args:
        args: Parsed command-line arguments (see `parse_args`).

    Returns:
        The results dict also written to `results.json`.

    Example:

    ```python
    results = run(parse_args(["--quick", "--output-dir", "runs/quick"]))
    ```
    """
    recipe = RECIPES[args.recipe]
    # `--quick` shortens the recipe's epochs; explicit epoch flags still win.
    teacher_epochs = args.teacher_epochs or (
        1 if args.quick else recipe.teacher_epochs
    )
    student_epochs = args.epochs or (2 if args.quick else recipe.student_epochs)
    batch_size = args.batch_size or recipe.batch_size
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    splits = load_mnist(args.data_dir)
    (x_train, y_train), (x_test, y_test) = splits
    if args.quick:
        # A subset keeps the smoke test to seconds; the split stays disjoint.
        x_train, y_train = x_train[:1024], y_train[:1024]
        x_test, y_test = x_test[:512], y_test[:512]
    data = ((x_train, y_train), (x_test, y_test))
    print(
        f"Recipe '{args.recipe}' on {keras.backend.backend()}: MNIST from "
        f"{splits.source}, {len(x_train)} train / {len(x_test)} test images; "
        f"teacher {teacher_epochs} epochs, students {student_epochs} epochs, "
        f"seeds {' '.join(map(str, args.seeds))}."
    )

    start = time.perf_counter()
    teacher, teacher_summary = train_teacher(
        recipe, data, teacher_epochs, batch_size, args.seeds[0], output_dir
    )
    print(f"Teacher test accuracy: {teacher_summary['test_accuracy']:.4f}")
    students = []
    for seed in args.seeds:
        summaries = train_students(
            recipe, teacher, data, student_epochs, batch_size, seed, output_dir
        )
        print(
            f"Seed {seed}: "
            f"distilled {summaries['distilled']['test_accuracy']:.4f}, "
            f"scratch {summaries['scratch']['test_accuracy']:.4f}"
        )
        students.append(summaries)

    results = {
        "recipe": args.recipe,
        "backend": keras.backend.backend(),
        "data_source": splits.source,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "teacher_epochs": teacher_epochs,
        "student_epochs": student_epochs,
        "batch_size": batch_size,
        "alpha": recipe.alpha,
        "temperature": recipe.temperature,
        "augment_teacher": recipe.augment_teacher,
        "seeds": list(args.seeds),
        "teacher": teacher_summary,
        "students": students,
        "gain_per_seed": [
            s["distilled"]["test_accuracy"] - s["scratch"]["test_accuracy"]
            for s in students
        ],
        "wall_seconds": time.perf_counter() - start,
    }
    reporting.write_results(results, output_dir)
    plot_softened_distributions(
        teacher, x_test[0], int(y_test[0]),
        output_dir / "softened_distributions.png",
    )
    plot_learning_curves(
        {
            kind: [s[kind]["val_accuracy_per_epoch"] for s in students]
            for kind in ("distilled", "scratch")
        },
        output_dir / "learning_curves.png",
    )
    return results


def parse_args(argv=None):
    """Parses the command line.

    Args:
        argv: Arguments without the program name; `None` reads `sys.argv`.

    Returns:
        An `argparse.Namespace`.

    Example:

    >>> parse_args(["--recipe", "seed"]).recipe
    'seed'
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default="default",
        help="models and hyperparameters (default: default)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None,
        help="epochs of each student (default: the recipe's)",
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None,
        help="epochs of the teacher (default: the recipe's)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="batch size of every model (default: the recipe's)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2],
        help="one distilled and one scratch student per seed (default: 0 1 2)",
    )
    parser.add_argument(
        "--output-dir", default="runs/mnist",
        help="where models, results.json and plots go (default: runs/mnist)",
    )
    parser.add_argument(
        "--data-dir", default="../shared/data",
        help="folder with the MNIST IDX files, read when the download fails "
        "(default: ../shared/data)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: 1 teacher epoch, 2 student epochs, 1,024 train and "
        "512 test images",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Runs the comparison and prints the results table.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The results dict.

    Example:

    ```python
    results = main(["--quick", "--seeds", "0", "--output-dir", "runs/quick"])
    ```
    """
    results = run(parse_args(argv))
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
