"""The teacher runs once: online step vs its floor, cached vs online epochs, cache size.

Per backend (one process each), on the MNIST split and the keras.io ("seed")
models of `examples/mnist_distillation.py`, batch 64, Adam, alpha 0.1, T 10:

(a) online step vs the floor: one `Distiller` training step against (teacher
    forward + scratch student training step) on the same batch, each a
    compiled Keras function (`train_on_batch` / `predict_on_batch`), after
    warm-up. The three run in turn, `--repeats` rounds; the table gives the
    median time of each and the median over rounds of each round's ratio,
    which a load change between rounds (the machine is shared) moves less.
(b) `--epochs` MNIST epochs distilled from a `TeacherOutputCache` (building it
    included) against one teacher pass + the same epochs of a scratch student,
    and against `keras.distillation.Distiller` (its documented default
    `LogitsDistillation`) for the same epochs, with the test accuracies of all.
(c) Once (first backend only; the codec is NumPy): bytes per token of top-256
    caches, float16 vs compact, the round trip's total variation against the
    exact top-k distribution (each renormalized over its k entries), whether
    the indices are exact, and the decode time per token, on three kinds of
    teacher outputs:
    - "zipf": synthetic, V = 262,144, log-rank slope plus Gaussian noise;
    - "lm-like": synthetic, V = 262,144, shaped like a language model's
      next-token distributions (a shared Zipf unigram prior, context noise
      of random sharpness, a few lifted candidates: top-1 probability from
      ~0.1 to ~1, top-256 mass ~0.3 to ~1);
    - "tiny-gemma3": real outputs of a 2-layer Gemma 3 (KerasHub) trained
      for `--lm-epochs` on Tiny Shakespeare with an 8,192-piece SentencePiece
      vocabulary, on held-out windows (no 262k-vocabulary model is available
      offline; its smaller V makes its indices cheaper to store).

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
VOCABULARY_SIZE = 262_144
TOP_K = 256


def _warm_up(*functions):
    for function in functions:
        function()  # tracing and compilation
        function()


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
    functions = {
        "distill_step": lambda: distiller.train_on_batch(x, y),
        "teacher_forward": lambda: teacher.predict_on_batch(x),
        "student_step": lambda: scratch.train_on_batch(x, y),
    }
    _warm_up(*functions.values())
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    ratios = [
        step / (forward + student)
        for step, forward, student in zip(*times.values())
    ]
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        **{f"{name}_ms": 1e3 * value for name, value in medians.items()},
        "ratio_of_medians": medians["distill_step"]
        / (medians["teacher_forward"] + medians["student_step"]),
        "median_ratio": statistics.median(ratios),
        "repeats": repeats,
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
    # The teacher runs at the training batch size in all three: XLA's CPU
    # convolutions of these CNNs run slower per example at 256 than at 64.
    cache = TeacherOutputCache.build(
        teacher, x_train, tempfile.mkdtemp(), batch_size=64
    )
    results["cache_build_seconds"] = time.perf_counter() - start
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
    teacher.predict(x_train, batch_size=64, verbose=0)
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
        results[f"{name}_accuracy"] = example.classification_accuracy(
            model, x_test, y_test
        )
    results["teacher_accuracy"] = example.classification_accuracy(
        teacher, x_test, y_test
    )
    results["epochs"] = epochs
    return results


def zipf_logits(rows, tokens_per_row, rng):
    import numpy as np

    ranks = np.arange(1, VOCABULARY_SIZE + 1)
    logits = np.empty((rows * tokens_per_row, VOCABULARY_SIZE), np.float32)
    for token in range(len(logits)):
        logits[token] = rng.permutation(
            -1.1 * np.log(ranks) + rng.normal(size=VOCABULARY_SIZE)
        )
    return logits.reshape(rows, tokens_per_row, VOCABULARY_SIZE)


def language_model_like_logits(rows, tokens_per_row, rng):
    """Logits shaped like a language model's next-token distributions."""
    import numpy as np

    prior = np.empty(VOCABULARY_SIZE)
    prior[rng.permutation(VOCABULARY_SIZE)] = -np.log(
        np.arange(1, VOCABULARY_SIZE + 1)
    )
    logits = np.empty((rows * tokens_per_row, VOCABULARY_SIZE), np.float32)
    for token in range(len(logits)):
        row = 0.6 * prior + rng.uniform(0.6, 3.0) * rng.standard_normal(
            VOCABULARY_SIZE
        )
        candidates = rng.integers(0, VOCABULARY_SIZE, rng.integers(1, 20))
        row[candidates] += rng.exponential(4.0, len(candidates)) + 6
        logits[token] = row
    return logits.reshape(rows, tokens_per_row, VOCABULARY_SIZE)


def train_tiny_gemma(data_dir, epochs, vocabulary_size=8192, sequence_length=128):
    """A 2-layer Gemma 3 trained on Tiny Shakespeare, and held-out windows."""
    import keras
    import keras_hub

    from keras_distill.examples.datasets import load_tiny_shakespeare
    from keras_distill.language_models.hub import language_model_windows
    from keras_distill.language_models.hub import train_gemma3_tokenizer

    text = load_tiny_shakespeare(data_dir, download=False)
    tokenizer = train_gemma3_tokenizer(
        [line for line in text.splitlines() if line.strip()], vocabulary_size
    )
    x, labels, weight = language_model_windows(tokenizer, text, sequence_length)
    held_out = len(labels) // 10
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=vocabulary_size,
        image_size=None,
        vision_encoder=None,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=128,
        intermediate_dim=256,
        head_dim=64,
    )
    model = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    history = model.fit(
        {name: values[held_out:] for name, values in x.items()},
        labels[held_out:],
        sample_weight=weight[held_out:],
        epochs=epochs,
        batch_size=32,
        verbose=0,
    )
    return model, {name: values[:held_out] for name, values in x.items()}, {
        "vocabulary_size": vocabulary_size,
        "sequence_length": sequence_length,
        "epochs": epochs,
        "final_training_loss": history.history["loss"][-1],
    }


def _reference_top_k(logits, k):
    """Float64 top-k log-probabilities and indices of (tokens, V) logits.

    The indices are the ones the cache keeps (`top_k_teacher_targets` on the
    same float32 logits), so ties at the k-th entry are broken alike.
    """
    import keras
    import numpy as np

    from keras_distill.targets.top_k import top_k_teacher_targets

    _, indices = top_k_teacher_targets(logits, k)
    indices = keras.ops.convert_to_numpy(indices)
    logits = logits.astype(np.float64)
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return np.take_along_axis(log_probs, indices, axis=-1), indices, log_probs


def measure_cache(logits, rows_per_batch):
    """Sizes, round-trip error and read time of float16 and compact caches.

    The caches are built by an identity "teacher" from `logits` (rows,
    tokens per row, V), so both formats and the reference see the same
    float32 logits.
    """
    import keras
    import numpy as np

    from keras_distill import TeacherOutputCache
    from keras_distill.targets.codec import top_k_total_variation

    teacher = keras.Sequential([keras.layers.Identity()])
    inputs = logits
    vocabulary_size = logits.shape[-1]
    logits = logits.reshape(-1, vocabulary_size)
    exact_log_probs, exact_indices, log_probs = _reference_top_k(logits, TOP_K)
    probs = np.exp(log_probs)
    measured = {
        "vocabulary_size": int(vocabulary_size),
        "tokens": len(logits),
        "top1_probability_quantiles": np.quantile(
            probs.max(axis=-1), [0.1, 0.5, 0.9]
        ).tolist(),
        "top_k_mass_quantiles": np.quantile(
            np.exp(exact_log_probs).sum(axis=-1), [0.1, 0.5, 0.9]
        ).tolist(),
        "entropy_nats_median": float(
            np.median(-(probs * log_probs).sum(axis=-1))
        ),
    }
    del probs, log_probs
    for format in ("float16", "compact"):
        directory = Path(tempfile.mkdtemp())
        start = time.perf_counter()
        cache = TeacherOutputCache.build(
            teacher, inputs, directory, top_k=TOP_K, format=format,
            batch_size=rows_per_batch,
        )
        build_seconds = time.perf_counter() - start
        files = {path.name: path.stat().st_size for path in directory.glob("*.bin")}
        outputs_bytes = sum(
            size for name, size in files.items()
            if name.startswith(("compact_", "teacher_"))
        )
        rows = cache.rows(inputs)
        cache.targets(rows[:rows_per_batch])  # warm-up: first reads of the files
        decode_seconds, stored = [], []
        for begin in range(0, len(rows), rows_per_batch):
            start = time.perf_counter()
            targets = cache.targets(rows[begin : begin + rows_per_batch])
            decode_seconds.append(time.perf_counter() - start)
            stored.append(targets)
        stored_log_probs = np.concatenate(
            [t["teacher_top_log_probs"] for t in stored]
        ).reshape(-1, TOP_K)
        stored_indices = np.concatenate(
            [t["teacher_top_indices"] for t in stored]
        ).reshape(-1, TOP_K)
        total_variation = top_k_total_variation(
            exact_log_probs, exact_indices, stored_log_probs, stored_indices
        )
        tokens = len(logits)
        measured[format] = {
            "bytes_per_token": outputs_bytes / tokens,
            "all_files_bytes_per_token": sum(files.values()) / tokens,
            "max_total_variation": float(total_variation.max()),
            "mean_total_variation": float(total_variation.mean()),
            "indices_exact": bool(
                np.array_equal(
                    np.sort(stored_indices, axis=-1), np.sort(exact_indices, axis=-1)
                )
            ),
            "read_us_per_token": 1e6 * sum(decode_seconds) / tokens,
            "build_us_per_token": 1e6 * build_seconds / tokens,
        }
    return measured


def top_k_cache_sizes(args):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    results = {}
    rows, tokens_per_row = args.tokens // 16, 16
    for name, make in (("zipf", zipf_logits), ("lm-like", language_model_like_logits)):
        results[name] = measure_cache(make(rows, tokens_per_row, rng), 4)
    model, held_out, description = train_tiny_gemma(args.data_dir, args.lm_epochs)
    batches = [
        {name: values[begin : begin + 16] for name, values in held_out.items()}
        for begin in range(0, args.lm_windows, 16)
    ]
    model.predict_on_batch(batches[0])  # compile
    start = time.perf_counter()
    logits = np.concatenate(
        [keras.ops.convert_to_numpy(model.predict_on_batch(b)) for b in batches]
    )
    teacher_seconds = time.perf_counter() - start
    tokens = logits.shape[0] * logits.shape[1]
    results["tiny-gemma3"] = {
        **measure_cache(logits, 4),
        **description,
        "teacher_forward_us_per_token": 1e6 * teacher_seconds / tokens,
    }
    return results


def run_worker(args):
    sys.path.insert(0, str(ROOT / "examples"))
    import keras
    import mnist_distillation as example

    from keras_distill.examples.datasets import load_mnist

    data = tuple(load_mnist(args.data_dir))
    output = Path(args.worker_output)
    results = {"backend": keras.backend.backend()}
    # Results are written after each part, so a failure keeps the others.
    if args.cache_sizes:
        results["cache_sizes"] = top_k_cache_sizes(args)
        output.write_text(json.dumps(results, indent=2))
    results["online_step"] = online_step_vs_floor(example, data, args.repeats)
    output.write_text(json.dumps(results, indent=2))
    if args.epochs:
        results["epochs"] = cached_vs_online_epochs(example, data, args.epochs)
        output.write_text(json.dumps(results, indent=2))


def format_tables(all_results):
    lines = [
        "(a) online step vs floor (ms, median)",
        "| backend | distill step | teacher forward | student step "
        "| step / floor (medians) | median of per-round ratios |",
        "|---|---|---|---|---|---|",
    ]
    for r in all_results:
        s = r["online_step"]
        lines.append(
            f"| {r['backend']} | {s['distill_step_ms']:.1f} "
            f"| {s['teacher_forward_ms']:.1f} | {s['student_step_ms']:.1f} "
            f"| {s['ratio_of_medians']:.3f} | {s['median_ratio']:.3f} |"
        )
    if all("epochs" in r for r in all_results):
        lines += [
            "",
            "(b) epochs with the cache (s, accuracy)",
            "| backend | epochs | cached (build incl.) | teacher pass + scratch "
            "| keras.distillation | cached / floor | keras / cached | acc cached "
            "| acc scratch | acc keras | acc teacher |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in all_results:
            e = r["epochs"]
            lines.append(
                f"| {r['backend']} | {e['epochs']} | {e['cached_seconds']:.1f} "
                f"({e['cache_build_seconds']:.1f}) "
                f"| {e['teacher_pass_plus_scratch_seconds']:.1f} "
                f"| {e['keras_distillation_seconds']:.1f} "
                f"| {e['cached_seconds'] / e['teacher_pass_plus_scratch_seconds']:.2f} "
                f"| {e['keras_distillation_seconds'] / e['cached_seconds']:.2f} "
                f"| {e['cached_accuracy']:.4f} | {e['scratch_accuracy']:.4f} "
                f"| {e['keras_accuracy']:.4f} | {e['teacher_accuracy']:.4f} |"
            )
    sizes = next((r["cache_sizes"] for r in all_results if "cache_sizes" in r), None)
    if sizes:
        lines += [
            "",
            f"(c) top-{TOP_K} caches: teacher-output bytes per token, round trip "
            "vs the exact top-k distribution",
            "| outputs | V | tokens | median top-1 p | median top-k mass | format "
            "| bytes/token | max TV | mean TV | indices exact | read µs/token "
            "| build µs/token |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in sizes.items():
            for format in ("float16", "compact"):
                f = c[format]
                lines.append(
                    f"| {name} | {c['vocabulary_size']:,} | {c['tokens']} "
                    f"| {c['top1_probability_quantiles'][1]:.2f} "
                    f"| {c['top_k_mass_quantiles'][1]:.2f} | {format} "
                    f"| {f['bytes_per_token']:.0f} | {f['max_total_variation']:.2e} "
                    f"| {f['mean_total_variation']:.2e} | {f['indices_exact']} "
                    f"| {f['read_us_per_token']:.1f} | {f['build_us_per_token']:.0f} |"
                )
        gemma = sizes["tiny-gemma3"]
        lines.append(
            f"\ntiny-gemma3: {gemma['epochs']} epochs, final training loss "
            f"{gemma['final_training_loss']:.2f}, teacher forward "
            f"{gemma['teacher_forward_us_per_token']:.0f} µs/token"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0], "runs/teacher_cache.json")
    parser.add_argument("--epochs", type=int, default=10, help="0 skips (b)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--tokens", type=int, default=128, help="synthetic tokens for (c)"
    )
    parser.add_argument("--lm-epochs", type=int, default=2)
    parser.add_argument("--lm-windows", type=int, default=32)
    parser.add_argument(
        "--no-cache-sizes", dest="cache_sizes", action="store_false",
        help="skip (c)",
    )
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
        "--lm-epochs", str(args.lm_epochs),
        "--lm-windows", str(args.lm_windows),
        "--data-dir", args.data_dir,
        "--no-cache-sizes",
    ]
    # (c) does not depend on the backend: the first one measures it.
    first, *others = args.backends
    all_results = run_workers(
        __file__, [first], worker_args[:-1] if args.cache_sizes else worker_args
    )
    all_results += run_workers(__file__, others, worker_args)
    print(format_tables(all_results))
    save_results(all_results, args.output)


if __name__ == "__main__":
    main()
