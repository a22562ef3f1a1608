"""A real teacher's overheads: cache build vs plain predict, distillation step vs plain step.

Per backend (one process each), with the real-teacher recipe of
`examples/gemma_distillation.py --teacher gemma3-270m` (Gemma 3 270M, read
through `pruning.VocabularySubsetTeacher` over Tiny Shakespeare's 13,610
tokens; a 6-block student cut from it), on the first `--tokens` training
tokens in windows of 128:

(a) the teacher-output cache build (`TeacherOutputCache.build`, compact
    top-256, into a fresh directory each round: hashing, the teacher's
    forward, top-k, encoding, writing) against a plain `predict` of the same
    teacher on the same windows at the same batch size; the teacher's
    fingerprint (a SHA-256 of its weights, a cost per build that does not
    grow with the tokens) is also timed alone, and the build less it is
    compared with the predict;
(b) one distillation training step from the cache (`CausalLMDistiller`,
    teacher=None, alpha 0.1, T 1) against the same student's plain
    crossentropy step (the floor: its own forward and backward) on the same
    batch, each a compiled `train_on_batch` after warm-up, with and without
    reading the batch (decoding its cached targets is part of a cached step).

Each measurement runs `--repeats` rounds, in turn; the table gives medians and
the median of each round's ratio (a load change between rounds moves that
less).

    python benchmarks/real_teacher_steps.py --backends jax tensorflow torch
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
TOP_K = 256


def _seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def worker(args):
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from keras_distill import TeacherOutputCache
    from keras_distill import distillers
    from keras_distill import language_models
    from keras_distill.cli import load_example
    from keras_distill.examples import datasets
    from keras_distill.language_models import pruning
    from keras_distill.targets.cache import teacher_fingerprint

    pretrained_gemma = load_example("pretrained_gemma")
    keras.utils.set_random_seed(0)
    teacher, source = pretrained_gemma.load_teacher(args.teacher, args.sequence_length)
    tokenizer = teacher.preprocessor.tokenizer
    text = datasets.load_tiny_shakespeare(args.data_dir)
    mapping = pruning.corpus_vocabulary(keras.ops.convert_to_numpy(tokenizer(text)))
    student_id = np.full(teacher.backbone.vocabulary_size, -1, "int32")
    student_id[mapping] = np.arange(len(mapping), dtype="int32")
    windows = pretrained_gemma._first_windows(
        language_models.language_model_windows(
            tokenizer, text[: int(0.9 * len(text))], args.sequence_length
        ),
        args.tokens // args.sequence_length,
    )
    x, labels, weight = pretrained_gemma._to_student(windows, student_id)
    teacher_view = pruning.VocabularySubsetTeacher(teacher, mapping)
    tokens = labels.size

    # (a) cache build vs plain predict.
    def predict():
        teacher_view.predict(x, batch_size=args.batch_size, verbose=0)

    scratch_root = Path(tempfile.mkdtemp(prefix="real_teacher_steps_"))
    builds = iter(range(10_000))

    def build():
        return TeacherOutputCache.build(
            teacher_view, x, scratch_root / f"cache_{next(builds)}",
            batch_size=args.batch_size, top_k=TOP_K, format="compact",
        )

    predict()  # compilation
    cache = build()
    predict_times, build_times, fingerprint_times = [], [], []
    for _ in range(args.repeats):
        predict_times.append(_seconds(predict))
        build_times.append(_seconds(build))
        fingerprint_times.append(_seconds(lambda: teacher_fingerprint(teacher_view)))
    per_token_times = [b - f for b, f in zip(build_times, fingerprint_times)]

    # (b) a distillation step from the cache vs the plain crossentropy step.
    student = pruning.student_from_teacher(
        teacher, num_layers=args.student_layers, vocabulary_mapping=mapping
    )
    twin = pruning.student_from_teacher(
        teacher, num_layers=args.student_layers, vocabulary_mapping=mapping
    )
    distiller = distillers.CausalLMDistiller(student=student, teacher=None)
    distiller.compile(
        optimizer=keras.optimizers.AdamW(1e-5),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=0.1,
        temperature=1.0,
    )
    plain = keras.Model(twin.inputs, twin.outputs)
    plain.compile(
        optimizer=keras.optimizers.AdamW(1e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batches = pretrained_gemma.WindowBatches((x, labels, weight), args.batch_size, seed=0)
    cached_batches = cache.dataset(
        pretrained_gemma.WindowBatches((x, labels, weight), args.batch_size, seed=0)
    )

    def distill_step(index, read):
        batch = cached_batches[index] if read else first_cached
        distiller.train_on_batch(*batch)

    def plain_step(index, read):
        batch = batches[index] if read else first_plain
        plain.train_on_batch(*batch)

    first_cached, first_plain = cached_batches[0], batches[0]
    for step in (distill_step, plain_step):
        step(0, False)
        step(0, False)
    rounds = {"distill": [], "plain": [], "distill_read": [], "plain_read": []}
    steps = min(args.steps, len(batches))
    for _ in range(args.repeats):
        for name, step, read in (
            ("distill", distill_step, False),
            ("plain", plain_step, False),
            ("distill_read", distill_step, True),
            ("plain_read", plain_step, True),
        ):
            rounds[name].append(
                _seconds(lambda: [step(i, read) for i in range(steps)]) / steps
            )

    def ratio(numerator, denominator):
        return statistics.median(a / b for a, b in zip(numerator, denominator))

    return {
        "backend": keras.backend.backend(),
        "teacher_source": source,
        "tokens": int(tokens),
        "batch_size": args.batch_size,
        "student_vocabulary": int(len(mapping)),
        "predict_seconds": statistics.median(predict_times),
        "build_seconds": statistics.median(build_times),
        "build_over_predict": ratio(build_times, predict_times),
        "fingerprint_seconds": statistics.median(fingerprint_times),
        "build_without_fingerprint_over_predict": ratio(per_token_times, predict_times),
        "predict_tokens_per_second": tokens / statistics.median(predict_times),
        "build_tokens_per_second": tokens / statistics.median(build_times),
        "step_seconds": {name: statistics.median(times) for name, times in rounds.items()},
        "distill_over_plain": ratio(rounds["distill"], rounds["plain"]),
        "distill_over_plain_with_reading": ratio(rounds["distill_read"], rounds["plain_read"]),
        "raw": {
            "predict": predict_times, "build": build_times,
            "fingerprint": fingerprint_times, **rounds,
        },
    }


def format_table(results):
    lines = [
        "| backend | tokens | predict tok/s | cache build tok/s | build / predict "
        "| teacher fingerprint s | build less fingerprint / predict "
        "| plain step s | distill step s | distill / plain | same, reading the batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        steps = row["step_seconds"]
        lines.append(
            f"| {row['backend']} | {row['tokens']:,} | {row['predict_tokens_per_second']:.0f} | "
            f"{row['build_tokens_per_second']:.0f} | {row['build_over_predict']:.3f} | "
            f"{row['fingerprint_seconds']:.2f} | "
            f"{row['build_without_fingerprint_over_predict']:.3f} | "
            f"{steps['plain']:.3f} | {steps['distill']:.3f} | {row['distill_over_plain']:.3f} | "
            f"{row['distill_over_plain_with_reading']:.3f} |"
        )
    return "\n".join(lines)


def main():
    parser = benchmark_parser(__doc__.split("\n\n")[0], "runs/real_teacher_steps.json")
    parser.add_argument("--teacher", default="gemma3-270m",
                        help="gemma3-270m, a .gguf file or a Gemma 3 preset directory")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.worker_output:
        Path(args.worker_output).write_text(json.dumps(worker(args)))
        return
    worker_args = [
        "--data-dir", args.data_dir, "--teacher", args.teacher,
        "--tokens", str(args.tokens), "--sequence-length", str(args.sequence_length),
        "--batch-size", str(args.batch_size), "--student-layers", str(args.student_layers),
        "--steps", str(args.steps), "--repeats", str(args.repeats),
    ]
    results = run_workers(__file__, args.backends, worker_args)
    print(format_table(results))
    save_results(results, args.output)


if __name__ == "__main__":
    main()
