"""The teacher runs once: online step vs its floor, cached vs online epochs, cache size.

Per backend (one process each), on the MNIST split and the keras.io ("seed")
models of `examples/mnist_distillation.py`, batch 64, Adam, alpha 0.1, T 10:

(a) online step vs the floor: the median time of one `Distiller` training step
    against (teacher forward + scratch student training step) on the same
    batch, each a compiled Keras function (`train_on_batch` /
    `predict_on_batch`), after warm-up.
(b) `--epochs` MNIST epochs distilled from a `TeacherOutputCache` (building it
    included) against one teacher pass + the same epochs of a scratch student,
    and against `keras.distillation.Distiller` (its documented default
    `LogitsDistillation`) for the same epochs, with the test accuracies of all.
(c) bytes per token of a top-256 cache at vocabulary 262,144 and the round
    trip's total-variation error against the exact top-k distribution. No real
    262k-vocabulary teacher is available offline; the logits are a Zipf-like
    synthetic distribution (log-rank slope plus Gaussian noise), which only
    the compression ratio and the quantization error depend on.

    python benchmarks/teacher_cache.py                      # all backends
    python benchmarks/teacher_cache.py --backends jax --epochs 3
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from per_backend import benchmark_parser
from per_backend import run_workers
from per_backend import save_results

ROOT = Path(__file__).resolve().parents[1]


def _median_seconds(function, repeats):
    function()  # warm-up: tracing and compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def online_step_vs_floor(example, data, repeats):
    import keras

    from keras_distill import Distiller

    (x_train, y_train), _ = data
    x, y = x_train[:64], y_train[:64]
    keras.utils.set_random_seed(0)
    teacher = example.build_seed_teacher()
    student = example.build_seed_student()
    scratch = keras.models.clone_model(student)
    hard_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer="adam", student_loss_fn=hard_loss, alpha=0.1, temperature=10
    )
    scratch.compile(optimizer="adam", loss=hard_loss)
    teacher.compile()
    distill_step = _median_seconds(lambda: distiller.train_on_batch(x, y), repeats)
    teacher_forward = _median_seconds(lambda: teacher.predict_on_batch(x), repeats)
    student_step = _median_seconds(lambda: scratch.train_on_batch(x, y), repeats)
    return {
        "distill_step_ms": 1e3 * distill_step,
        "teacher_forward_ms": 1e3 * teacher_forward,
        "student_step_ms": 1e3 * student_step,
        "ratio_to_floor": distill_step / (teacher_forward + student_step),
    }


def cached_vs_online_epochs(example, data, epochs):
    import keras

    from keras_distill import Distiller
    from keras_distill import TeacherOutputCache

    (x_train, y_train), (x_test, y_test) = data
    recipe = example.RECIPES["seed"]
    teacher, _ = example.train_teacher(
        recipe, data, recipe.teacher_epochs, 64, 0, Path(tempfile.mkdtemp())
    )
    keras.utils.set_random_seed(0)
    student = recipe.build_student()
    copies = {}
    for name in ("cached", "keras", "scratch"):
        copies[name] = keras.models.clone_model(student)
        copies[name].set_weights(student.get_weights())
    hard_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {}

    start = time.perf_counter()
    cache = TeacherOutputCache.build(teacher, x_train, tempfile.mkdtemp())
    distiller = Distiller(student=copies["cached"], teacher=None)
    distiller.compile(
        optimizer="adam", student_loss_fn=hard_loss, alpha=0.1, temperature=10
    )
    distiller.fit(
        cache.dataset(x_train, y_train, batch_size=64, seed=0),
        epochs=epochs,
        verbose=0,
    )
    results["cached_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    teacher.predict(x_train, batch_size=256, verbose=0)
    scratch = copies["scratch"]
    scratch.compile(optimizer="adam", loss=hard_loss)
    scratch.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    results["teacher_pass_plus_scratch_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    keras_distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=copies["keras"],
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=10
        ),
        student_loss_weight=0.1,
    )
    keras_distiller.compile(optimizer="adam", loss=hard_loss)
    keras_distiller.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    results["keras_distillation_seconds"] = time.perf_counter() - start

    for name, model in copies.items():
        results[f"{name}_accuracy"] = example.classification_accuracy(model, x_test, y_test)
    results["teacher_accuracy"] = example.classification_accuracy(teacher, x_test, y_test)
    results["epochs"] = epochs
    return results


def top_k_cache_size(tokens, vocabulary_size, k):
    import keras
    import numpy as np

    from keras_distill import TeacherOutputCache
    from keras_distill.sparse import top_k_teacher_targets

    rng = np.random.default_rng(0)
    ranks = np.arange(1, vocabulary_size + 1)
    logits = -1.1 * np.log(ranks)[None, :] + rng.normal(
        scale=1.0, size=(tokens, vocabulary_size)
    )
    logits = np.stack([rng.permutation(row) for row in logits]).astype("float32")
    teacher = keras.Sequential([keras.layers.Identity()])
    directory = Path(tempfile.mkdtemp())
    cache = TeacherOutputCache.build(teacher, logits, directory, top_k=k)
    stored_bytes = sum(
        (directory / f"{name}.npy").stat().st_size for name in cache.arrays
    )
    targets = cache.targets(slice(None))
    exact_log_probs, exact_indices = top_k_teacher_targets(logits, k)
    exact = keras.ops.convert_to_numpy(exact_log_probs).astype("float64")
    exact = np.exp(exact - np.logaddexp.reduce(exact, axis=-1, keepdims=True))
    stored = targets["teacher_top_log_probs"].astype("float64")
    stored = np.exp(stored - np.logaddexp.reduce(stored, axis=-1, keepdims=True))
    return {
        "tokens": tokens,
        "vocabulary_size": vocabulary_size,
        "k": k,
        "bytes_per_token": stored_bytes / tokens,
        "indices_exact": bool(
            np.array_equal(
                targets["teacher_top_indices"],
                keras.ops.convert_to_numpy(exact_indices),
            )
        ),
        "max_total_variation": float(
            0.5 * np.abs(stored - exact).sum(axis=-1).max()
        ),
    }


def run_worker(args):
    sys.path.insert(0, str(ROOT / "examples"))
    import keras
    import mnist_distillation as example

    from keras_distill.datasets import load_mnist

    data = tuple(load_mnist(args.data_dir))
    results = {
        "backend": keras.backend.backend(),
        "online_step": online_step_vs_floor(example, data, args.repeats),
        "epochs": cached_vs_online_epochs(example, data, args.epochs),
        "cache_size": top_k_cache_size(args.tokens, 262_144, 256),
    }
    Path(args.worker_output).write_text(json.dumps(results, indent=2))


def format_tables(all_results):
    lines = [
        "(a) online step vs floor (ms, median)",
        "| backend | distill step | teacher forward | student step | step / floor |",
        "|---|---|---|---|---|",
    ]
    for r in all_results:
        s = r["online_step"]
        lines.append(
            f"| {r['backend']} | {s['distill_step_ms']:.1f} "
            f"| {s['teacher_forward_ms']:.1f} | {s['student_step_ms']:.1f} "
            f"| {s['ratio_to_floor']:.2f} |"
        )
    lines += [
        "",
        "(b) epochs with the cache (s, accuracy)",
        "| backend | epochs | cached | teacher pass + scratch | keras.distillation "
        "| cached / floor | keras / cached | acc cached | acc scratch "
        "| acc keras | acc teacher |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in all_results:
        e = r["epochs"]
        lines.append(
            f"| {r['backend']} | {e['epochs']} | {e['cached_seconds']:.1f} "
            f"| {e['teacher_pass_plus_scratch_seconds']:.1f} "
            f"| {e['keras_distillation_seconds']:.1f} "
            f"| {e['cached_seconds'] / e['teacher_pass_plus_scratch_seconds']:.2f} "
            f"| {e['keras_distillation_seconds'] / e['cached_seconds']:.2f} "
            f"| {e['cached_accuracy']:.4f} | {e['scratch_accuracy']:.4f} "
            f"| {e['keras_accuracy']:.4f} | {e['teacher_accuracy']:.4f} |"
        )
    c = all_results[0]["cache_size"]
    lines += [
        "",
        f"(c) top-{c['k']} cache at V = {c['vocabulary_size']:,} "
        f"({c['tokens']} synthetic Zipf-like tokens): "
        f"{c['bytes_per_token']:.0f} bytes/token, indices exact: "
        f"{c['indices_exact']}, max total variation "
        f"{c['max_total_variation']:.2e}",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0], "runs/teacher_cache.json")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker_output:
        run_worker(args)
        return
    worker_args = [
        "--epochs", str(args.epochs),
        "--repeats", str(args.repeats),
        "--tokens", str(args.tokens),
        "--data-dir", args.data_dir,
    ]
    all_results = run_workers(__file__, args.backends, worker_args)
    print(format_tables(all_results))
    save_results(all_results, args.output)


if __name__ == "__main__":
    main()
