"""What hidden-state and attention distillation add over logits-only distillation.

Two real-data comparisons at the same optimizer-step budget per row (same
student, data order, epochs and batch size; only the loss differs), each
row trained once per seed and reported as mean ± std over the seeds:

1. MNIST CNNs (`keras_distill.examples.datasets.load_mnist`): a CNN teacher distilled
   into a 4x narrower CNN student by logits only, and by logits plus the
   hidden states of both convolutions ("linear path": a trainable 1x1
   projection from the student's channels to the teacher's, layer norm,
   MSE). The projections train with the student but are not part of the
   exported student (same parameter count and file as logits-only).
2. BERT-style encoders (KerasHub `BertTextClassifier`, built from configs and
   trained from scratch) on Financial PhraseBank sentiment, with the split of
   `examples/sentiment_distillation.py` (train on the 50%-agreement
   sentences, test on held-out all-agree ones): a 4-block teacher distilled
   into a 2-block student by logits only; plus hidden states with the
   `uniform`, `last` and `attention` layer mappings; plus attention maps
   (cosine of head-averaged attention probabilities, padded tokens masked).

Then the quantization table (`keras_distill.extras.quantize.compare_quantized`) of
the hidden-state-distilled MNIST student: Keras 3.15 quantizes its `Dense`
layers, not its convolutions (see the `quantized layers` column);
`examples/quantize_student.py` has the table for an MLP student, every
weight quantized, and quantization-aware distillation.

Feature weights are fixed beforehand (1.0 for each term), not tuned on the
test split. Writes `results.json` to `--output-dir`.

Run `python examples/feature_distillation.py` (about 20 minutes on 2 CPU
cores) or `--quick` for a smoke test of every path (seed 0, data subsets,
one epoch; one to three minutes, mostly compilation).
"""

import argparse
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

from keras_distill import Distiller
from keras_distill.cli import load_example
from keras_distill.distillers.feature_distillation import FeatureDistillation
from keras_distill.examples import reporting
from keras_distill.examples.datasets import load_mnist
from keras_distill.examples.reporting import format_gains
from keras_distill.examples.reporting import format_mean_std
from keras_distill.examples.reporting import format_rows
from keras_distill.extras.quantize import QUANTIZATION_MODES
from keras_distill.extras.quantize import compare_quantized
from keras_distill.extras.quantize import format_comparison

IMAGE_SHAPE = (28, 28, 1)
MNIST_CLASSES = 10
ALPHA = 0.1
TEMPERATURE = 4.0
# The convolutions whose outputs are matched: same kernels and pooling in
# both models, so each pair has the same spatial size.
MNIST_PAIRS = [("student_conv_1", "teacher_conv_1"), ("student_conv_2", "teacher_conv_2")]
TEXT_ROWS = (
    ("logits only", None),
    ("+ hidden states (uniform)", dict(pairs="uniform")),
    ("+ hidden states (last)", dict(pairs="last")),
    ("+ hidden states (attention)", dict(pairs="attention")),
    ("+ attention maps (uniform)", dict(pairs="uniform", weight=0.0, attention_weight=1.0)),
)


def mnist_cnn(filters, dense_units, name):
    """A two-convolution CNN with named convolutions `{name}_conv_{1,2}`."""
    inputs = keras.Input(IMAGE_SHAPE)
    x = layers.Conv2D(filters, 3, activation="relu", name=f"{name}_conv_1")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(2 * filters, 3, activation="relu", name=f"{name}_conv_2")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    if dense_units:
        x = layers.Dropout(0.5)(x)
        x = layers.Dense(dense_units, activation="relu")(x)
    outputs = layers.Dense(MNIST_CLASSES, name=f"{name}_logits")(x)
    return keras.Model(inputs, outputs, name=name)


def bert_classifier(vocabulary_size, sequence_length, num_layers, hidden_dim, heads):
    """A KerasHub `BertTextClassifier` returning logits, built from a config."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=heads,
        hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        max_sequence_length=sequence_length,
        dropout=0.1,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None, activation=None
    )


def _classifier_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def accuracy_and_macro_f1(model, x, labels, num_classes):
    """Test accuracy and macro-F1 of a logits model."""
    predictions = np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1)
    sentiment = load_example("sentiment_distillation")
    return (
        float(np.mean(predictions == labels)),
        sentiment.macro_f1(labels, predictions, num_classes),
    )


def train_teacher(model, data, epochs, batch_size, learning_rate, seed):
    """Fits a teacher on the labels; returns it."""
    (x_train, y_train), _ = data
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=_classifier_loss(),
        metrics=["accuracy"],
    )
    # Shuffled here, once per epoch: a KerasHub task's `fit` batches its
    # inputs in order (through `tf.data`), and the PhraseBank files are
    # partly grouped by label.
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y_train))
        model.fit(
            keras.tree.map_structure(lambda array: array[order], x_train),
            y_train[order],
            batch_size=batch_size,
            verbose=0,
        )
    return model


def distill(student, teacher, data, features, epochs, batch_size, learning_rate, seed):
    """Distills `teacher` into `student` (logits, plus `features` if given).

    Returns:
        The `Distiller` and the seconds `fit` took.
    """
    (x_train, y_train), _ = data
    feature_distillation = None if features is None else FeatureDistillation(**features)
    distiller = Distiller(student, teacher, feature_distillation=feature_distillation)
    distiller.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        student_loss_fn=_classifier_loss(),
        alpha=ALPHA,
        temperature=TEMPERATURE,
    )
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    distiller.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=0)
    return distiller, time.perf_counter() - start


def exported_parameters(distiller):
    """`(student parameters, projection parameters)`: the projections are
    weights of the Distiller's `FeatureDistillation`, never of the student."""
    student_ids = {id(weight) for weight in distiller.student.weights}
    features = distiller.feature_distillation
    projections = [] if features is None else [p.kernel for p in features.projections]
    assert not any(id(kernel) in student_ids for kernel in projections)
    return distiller.student.count_params(), int(
        sum(np.prod(kernel.shape) for kernel in projections)
    )


# ---- The two comparisons ----


def _progress(task, name, seed, accuracy, seconds):
    print(f"{task} | {name} | seed {seed}: test accuracy {accuracy:.4f} "
          f"({seconds:.0f} s)", flush=True)


def mnist_rows(args, seeds):
    """Logits-only vs logits + hidden states on MNIST CNNs, per seed."""
    splits = load_mnist(args.data_dir, download=False)
    (x_train, y_train), (x_test, y_test) = splits
    if args.quick:
        x_train, y_train = x_train[:512], y_train[:512]
        x_test, y_test = x_test[:512], y_test[:512]
    data = ((x_train, y_train), (x_test, y_test))
    keras.utils.set_random_seed(0)
    teacher = train_teacher(
        mnist_cnn(32, 128, "teacher"), data, 1 if args.quick else 4, 64, 1e-3, seed=0
    )
    teacher_accuracy, _ = accuracy_and_macro_f1(teacher, x_test, y_test, MNIST_CLASSES)
    rows = {"logits only": [], "+ hidden states": []}
    features = {"logits only": None, "+ hidden states": dict(pairs=MNIST_PAIRS)}
    for seed in seeds:
        for name, feature_config in features.items():
            keras.utils.set_random_seed(seed)
            student = mnist_cnn(8, 0, "student")
            distiller, seconds = distill(
                student, teacher, data, feature_config, args.mnist_epochs, 64, 1e-3, seed
            )
            accuracy, macro_f1 = accuracy_and_macro_f1(
                distiller.student, x_test, y_test, MNIST_CLASSES
            )
            params, projection_params = exported_parameters(distiller)
            rows[name].append(
                dict(seed=seed, accuracy=accuracy, macro_f1=macro_f1, params=params,
                     projection_params=projection_params, fit_seconds=seconds,
                     distiller=distiller)
            )
            _progress("MNIST", name, seed, accuracy, seconds)
    return dict(
        teacher=dict(accuracy=teacher_accuracy, params=teacher.count_params()),
        rows=rows, teacher_model=teacher, test=(x_test, y_test),
        train_size=len(x_train), test_size=len(x_test),
    )


def phrasebank_data(args):
    """Token ids, padding masks and labels of the sentiment example's split."""
    sentiment = load_example("sentiment_distillation")
    splits = sentiment.split_phrasebank(args.data_dir)
    vocabulary = sentiment.WordVocabulary.from_sentences(splits.train[0])

    def encode(sentences, labels, limit):
        token_ids = vocabulary.encode(sentences[:limit], args.sequence_length)
        x = {
            "token_ids": token_ids,
            "segment_ids": np.zeros_like(token_ids),
            "padding_mask": (token_ids != sentiment.PAD_ID).astype("int32"),
        }
        return x, np.asarray(labels[:limit], "int32")

    limit = 256 if args.quick else None
    return (encode(*splits.train, limit), encode(*splits.test, limit)), vocabulary.size


def text_rows(args, seeds):
    """Logits-only vs hidden-state and attention terms on BERT encoders."""
    data, vocabulary_size = phrasebank_data(args)
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(0)
    teacher = bert_classifier(vocabulary_size, args.sequence_length, 4, 64, 4)
    train_teacher(teacher, data, 1 if args.quick else 6, 32, 1e-3, seed=0)
    teacher_accuracy, teacher_f1 = accuracy_and_macro_f1(teacher, x_test, y_test, 3)
    # The calibration batch of the `attention` mapping: training sentences.
    calibration = {key: value[:64] for key, value in x_train.items()}
    # A quick run keeps one row per code path: logits, a mapping strategy
    # (attention similarity), attention maps.
    techniques = [TEXT_ROWS[i] for i in (0, 3, 4)] if args.quick else TEXT_ROWS
    rows = {name: [] for name, _ in techniques}
    for seed in seeds:
        for name, features in techniques:
            if features is not None and features["pairs"] == "attention":
                features = dict(features, calibration_data=calibration)
            keras.utils.set_random_seed(seed)
            student = bert_classifier(vocabulary_size, args.sequence_length, 2, 16, 2)
            distiller, seconds = distill(
                student, teacher, data, features, args.text_epochs, 32, 3e-3, seed
            )
            accuracy, macro_f1 = accuracy_and_macro_f1(distiller.student, x_test, y_test, 3)
            params, projection_params = exported_parameters(distiller)
            feature_distillation = distiller.feature_distillation
            rows[name].append(
                dict(seed=seed, accuracy=accuracy, macro_f1=macro_f1, params=params,
                     projection_params=projection_params, fit_seconds=seconds,
                     pairs=None if feature_distillation is None
                     else [list(p) for p in feature_distillation.pairs])
            )
            _progress("PhraseBank", name, seed, accuracy, seconds)
    return dict(
        teacher=dict(accuracy=teacher_accuracy, macro_f1=teacher_f1,
                     params=teacher.count_params()),
        rows=rows, train_size=len(y_train), test_size=len(y_test),
    )


# ---- The table ----


def format_technique_table(results):
    """One table: every technique's test accuracy, macro-F1 and its gain over
    logits-only distillation of the same task, mean ± std over seeds.

    Args:
        results: `{"mnist": mnist_rows(...), "text": text_rows(...)}` (either
            may be missing).

    Returns:
        A multi-line string.
    """
    header = ["task", "student trained with", "pairs", "test accuracy", "macro-F1",
              "Δ accuracy vs logits (points)", "student params", "+ projection params"]
    rows, gain_lines = [], []
    for task, title in (("mnist", "MNIST CNN"), ("text", "PhraseBank BERT")):
        if task not in results:
            continue
        result = results[task]
        teacher = result["teacher"]
        rows.append([title, "(teacher)", "", f"{teacher['accuracy']:.4f}",
                     f"{teacher['macro_f1']:.4f}" if "macro_f1" in teacher else "",
                     "", f"{teacher['params']:,}", ""])
        baseline = [r["accuracy"] for r in result["rows"]["logits only"]]
        for name, per_seed in result["rows"].items():
            accuracies = [r["accuracy"] for r in per_seed]
            gains = [a - b for a, b in zip(accuracies, baseline)]
            pairs = per_seed[0].get("pairs")
            rows.append([
                title, name,
                "" if not pairs else " ".join(f"{s}→{t}" for s, t in pairs),
                format_mean_std(accuracies),
                format_mean_std([r["macro_f1"] for r in per_seed]),
                "" if name == "logits only" else format_mean_std(gains, 2, 100),
                f"{per_seed[0]['params']:,}",
                f"{per_seed[0]['projection_params']:,}",
            ])
            if name != "logits only":
                gain_lines.append(format_gains(
                    f"{title}, {name} - logits only", gains,
                    [r["seed"] for r in per_seed],
                ))
    return "\n".join(format_rows(header, rows) + [""] + gain_lines)


def run(args):
    """Runs the comparisons `args` asks for and writes `results.json`."""
    seeds = [0] if args.quick else args.seeds
    results = {"backend": keras.backend.backend(), "seeds": seeds,
               "quick": args.quick}
    if "mnist" in args.tasks:
        results["mnist"] = mnist_rows(args, seeds)
    if "text" in args.tasks:
        results["text"] = text_rows(args, seeds)
    print(f"What each technique adds over logits-only distillation "
          f"({results['backend']}, seeds {seeds}, mean ± std):")
    print(format_technique_table(results))
    if "mnist" in results:
        mnist = results["mnist"]
        student = mnist["rows"]["+ hidden states"][0]["distiller"].student
        quantized = compare_quantized(
            student, *mnist["test"], teacher=mnist.pop("teacher_model"),
            modes=("int8",) if args.quick else QUANTIZATION_MODES,
            latency_repeats=3 if args.quick else 10,
        )
        print("\nQuantized copies of the hidden-state-distilled MNIST student "
              f"(seed {seeds[0]}); an all-Dense student and quantization-aware "
              "distillation: examples/quantize_student.py")
        print(format_comparison(quantized))
        mnist["quantized"] = [
            {k: v for k, v in row.items() if k != "path"} for row in quantized
        ]
        mnist.pop("test")
        for per_seed in mnist["rows"].values():
            for row in per_seed:
                row.pop("distiller")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reporting.write_results(results, output_dir)
    return results


def parse_args(argv=None):
    """Parses the command line.

    Example:

    ```python
    args = parse_args(["--quick", "--tasks", "mnist"])
    ```
    """
    parser = argparse.ArgumentParser(
        description="Compare logits-only distillation with hidden-state and "
        "attention-map distillation (MNIST CNNs; BERT encoders on Financial "
        "PhraseBank) at the same step budget, over seeds."
    )
    parser.add_argument("--data-dir", default="../shared/data",
                        help="folder with MNIST's IDX files and financial_phrasebank/ "
                        "(default: %(default)s)")
    parser.add_argument("--output-dir", default="runs/features",
                        help="where results.json goes (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one student per row and seed (default: 0 1 2)")
    parser.add_argument("--tasks", nargs="+", choices=("mnist", "text"),
                        default=["mnist", "text"],
                        help="which comparisons to run (default: both)")
    parser.add_argument("--mnist-epochs", type=int, default=2,
                        help="epochs of each MNIST student (default: %(default)s)")
    parser.add_argument("--text-epochs", type=int, default=6,
                        help="epochs of each text student (default: %(default)s)")
    parser.add_argument("--epochs", type=int,
                        help="epochs of every student (sets both of the above)")
    parser.add_argument("--sequence-length", type=int, default=48,
                        help="tokens per sentence (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: seed 0, data subsets, one epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.mnist_epochs = args.text_epochs = 1
        args.sequence_length = min(args.sequence_length, 24)
    if args.epochs is not None:
        args.mnist_epochs = args.text_epochs = args.epochs
    return args


def main(argv=None):
    """Runs the example; returns the results dict."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
