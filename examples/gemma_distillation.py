"""Distill a Gemma 3 teacher into a smaller Gemma 3 student on Tiny Shakespeare.

Offline (the default), everything is built here: a SentencePiece tokenizer
trained on the training part of Tiny Shakespeare, a small Gemma 3 teacher
trained briefly on it, then two identical small Gemma 3 students that start
from the same initial weights and see the same batches for the same number of
optimizer steps: one distilled from the teacher with
`keras_distill.distillers.CausalLMDistiller`, one trained from scratch on the text
alone. It prints held-out perplexity and teacher–student top-1 agreement
(how often the student's most likely next token is the teacher's) for each
model, a few generated lines from each, and the error of top-k teacher
targets (k = 8, 64, 256) against the dense loss, and writes `results.json`.

`--mode on_policy`, `sequence` or `all` also trains, from the same initial
weights and for the same number of optimizer steps, an on-policy student
(`on_policy.OnPolicyGeneration`: a share `--lmbda` of the steps distills on
the student's own continuations of each window's first `--prompt-length`
tokens, generalized JSD with `--beta`) and/or a sequence-level student
(hard crossentropy on the teacher's continuations of the same prompts,
generated once with `on_policy.generate_sequences`), and compares them with
the token-level one: held-out perplexity, the teacher's mean per-token
log-likelihood of each student's own samples, samples, and the share of the
on-policy student's training time spent generating.

The text is split by position: the first 90% trains, the last 10% is
held out. Each split is tokenized once and cut into windows of
`--sequence-length` tokens (`keras_distill.language_models.language_model_windows`).

With `--teacher` and `--student` preset names (e.g. `gemma3_instruct_27b`
and `gemma3_instruct_1b`) or local preset directories, the same script loads
real models with `CausalLMDistiller.from_preset` and distills on the same
text with the teacher's tokenizer, where the weights are reachable.

    python examples/gemma_distillation.py                 # offline, tiny models
    python examples/gemma_distillation.py --quick         # a smoke run
    python examples/gemma_distillation.py --mode all      # + on-policy, sequence-level
    python examples/gemma_distillation.py --teacher gemma3_instruct_27b \\
        --student gemma3_instruct_1b --sequence-length 256
"""

import argparse
import math
import time
from pathlib import Path

import keras
import numpy as np

from keras_distill import distillers
from keras_distill import language_models
from keras_distill import losses
from keras_distill import targets
from keras_distill.distillers import on_policy
from keras_distill.examples import datasets
from keras_distill.examples import reporting

PROMPTS = ("ROMEO:", "First Citizen:\nWe are", "KING RICHARD III:\nNow")


def build_gemma(vocabulary_size, hidden_dim, num_layers, num_heads, preprocessor):
    """A text-only Gemma 3 causal LM built from a config."""
    import keras_hub

    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=vocabulary_size,
        image_size=None,
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_key_value_heads=1,
        hidden_dim=hidden_dim,
        intermediate_dim=4 * hidden_dim,
        head_dim=hidden_dim // num_heads,
    )
    return keras_hub.models.Gemma3CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )


def _optimizer(learning_rate):
    return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=0.01)


def token_log_likelihoods(model, x, labels, batch_size):
    """Per-token log-probabilities of `labels` under `model`, and its logits."""
    logits = model.predict(x, batch_size=batch_size, verbose=0).astype("float32")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, labels[..., None], -1)[..., 0], logits


def evaluate(model, teacher_logits, x, labels, weight, batch_size):
    """Held-out perplexity and top-1 agreement with the teacher."""
    log_likelihood, logits = token_log_likelihoods(model, x, labels, batch_size)
    perplexity = math.exp(-(log_likelihood * weight).sum() / weight.sum())
    agreement = None
    if teacher_logits is not None:
        same = logits.argmax(-1) == teacher_logits.argmax(-1)
        agreement = float((same * weight).sum() / weight.sum())
    return {"perplexity": perplexity, "agreement": agreement}, logits


def top_k_errors(teacher_logits, student_logits, weight, temperature, ks):
    """Relative error of the top-k losses against the dense forward KL."""
    dense = float(
        keras.ops.convert_to_numpy(
            losses.forward_kl(
                teacher_logits, student_logits, temperature, sample_weight=weight
            )
        )
    )
    rows = []
    for k in ks:
        if k > teacher_logits.shape[-1]:
            continue
        log_probs, indices = targets.top_k_teacher_targets(teacher_logits, k)
        row = {"k": k, "dense": dense}
        for tail in ("renormalize", "bucket"):
            value = float(
                keras.ops.convert_to_numpy(
                    losses.sparse_forward_kl(
                        log_probs,
                        indices,
                        student_logits,
                        temperature,
                        sample_weight=weight,
                        tail=tail,
                    )
                )
            )
            row[tail] = value
            row[f"{tail}_relative_error"] = (value - dense) / dense
        rows.append(row)
    return rows


def generate_samples(model, preprocessor, max_length, seed):
    """Top-10 samples continuing `PROMPTS`, from `model`'s backbone."""
    import keras_hub

    # The models train on token ids, without a preprocessor (KerasHub's
    # `fit` would run one on the ids); generation needs one to read text.
    generator = keras_hub.models.Gemma3CausalLM(
        backbone=model.backbone, preprocessor=preprocessor
    )
    generator.compile(sampler=keras_hub.samplers.TopKSampler(k=10, seed=seed))
    return [
        str(generator.generate(prompt, max_length=max_length)) for prompt in PROMPTS
    ]


def _fit_history(model, data, epochs, batch_size, seed, validation):
    keras.utils.set_random_seed(seed)
    x, labels, weight = data
    history = model.fit(
        x,
        labels,
        sample_weight=weight,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=validation,
        shuffle=True,
        verbose=2,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def run_offline(args):
    import keras_hub

    text = datasets.load_tiny_shakespeare(args.data_dir)
    split = int(0.9 * len(text))
    train_text, heldout_text = text[:split], text[split:]
    if args.quick:
        train_text, heldout_text = train_text[:60_000], heldout_text[:8_000]
    lines = [line for line in train_text.splitlines() if line.strip()]
    tokenizer = language_models.train_gemma3_tokenizer(lines, args.vocabulary_size)
    train = language_models.language_model_windows(tokenizer, train_text, args.sequence_length)
    heldout = language_models.language_model_windows(tokenizer, heldout_text, args.sequence_length)
    print(
        f"{len(train[1])} training and {len(heldout[1])} held-out windows of "
        f"{args.sequence_length} tokens (vocabulary {tokenizer.vocabulary_size()})"
    )

    teacher_size, student_size = args.teacher_size, args.student_size
    keras.utils.set_random_seed(args.seed)
    teacher = build_gemma(
        tokenizer.vocabulary_size(), *teacher_size, preprocessor=None
    )
    teacher.compile(optimizer=_optimizer(args.learning_rate), sampler="greedy")
    start = time.perf_counter()
    teacher_history = _fit_history(
        teacher, train, args.teacher_epochs, args.batch_size, args.seed, None
    )
    teacher_seconds = time.perf_counter() - start

    keras.utils.set_random_seed(args.seed + 1)
    distilled = build_gemma(
        tokenizer.vocabulary_size(), *student_size, preprocessor=None
    )
    scratch = build_gemma(
        tokenizer.vocabulary_size(), *student_size, preprocessor=None
    )
    scratch.set_weights(distilled.get_weights())
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=args.sequence_length
    )
    return (
        teacher, teacher_history, teacher_seconds, distilled, scratch,
        preprocessor, train, heldout,
    )


def run_presets(args):
    distiller = distillers.CausalLMDistiller.from_preset(
        args.teacher, args.student, sequence_length=args.sequence_length
    )
    text = datasets.load_tiny_shakespeare(args.data_dir)
    split = int(0.9 * len(text))
    tokenizer = distiller.preprocessor.tokenizer
    train = language_models.language_model_windows(tokenizer, text[:split], args.sequence_length)
    heldout = language_models.language_model_windows(tokenizer, text[split:], args.sequence_length)
    preprocessor = distiller.preprocessor
    teacher, student = distiller.teacher, distiller.student
    # KerasHub's `fit` would run the preprocessor on the token ids.
    teacher.preprocessor = student.preprocessor = None
    scratch = keras.models.clone_model(student)
    scratch.set_weights(student.get_weights())
    return teacher, None, 0.0, student, scratch, preprocessor, train, heldout


def run(args):
    keras.utils.set_random_seed(args.seed)
    if args.teacher:
        loaded = run_presets(args)
    else:
        loaded = run_offline(args)
    (
        teacher, teacher_history, teacher_seconds, distilled, scratch,
        preprocessor, train, heldout,
    ) = loaded
    x_heldout, labels_heldout, weight_heldout = heldout
    validation = (x_heldout, labels_heldout, weight_heldout)

    initial_weights = distilled.get_weights()
    distiller = distillers.CausalLMDistiller(student=distilled, teacher=teacher)
    distiller.compile(
        optimizer=_optimizer(args.learning_rate),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=args.alpha,
        temperature=args.temperature,
    )
    start = time.perf_counter()
    distilled_history = _fit_history(
        distiller, train, args.student_epochs, args.batch_size, args.seed, validation
    )
    distilled_seconds = time.perf_counter() - start

    scratch.compile(optimizer=_optimizer(args.learning_rate), sampler="greedy")
    start = time.perf_counter()
    scratch_history = _fit_history(
        scratch, train, args.student_epochs, args.batch_size, args.seed, validation
    )
    scratch_seconds = time.perf_counter() - start

    teacher_metrics, teacher_logits = evaluate(
        teacher, None, x_heldout, labels_heldout, weight_heldout, args.batch_size
    )
    rows = {"teacher": dict(teacher_metrics, agreement=1.0)}
    student_logits = {}
    for name, model in (("distilled", distilled), ("scratch", scratch)):
        rows[name], student_logits[name] = evaluate(
            model,
            teacher_logits,
            x_heldout,
            labels_heldout,
            weight_heldout,
            args.batch_size,
        )
    for name, model in (("teacher", teacher), ("distilled", distilled), ("scratch", scratch)):
        rows[name]["parameters"] = int(model.count_params())
    rows["teacher"]["train_seconds"] = teacher_seconds
    rows["distilled"]["train_seconds"] = distilled_seconds
    rows["scratch"]["train_seconds"] = scratch_seconds

    # Top-k teacher targets against the dense loss, on the held-out tokens
    # and the distilled student's logits.
    errors = top_k_errors(
        teacher_logits,
        student_logits["distilled"],
        weight_heldout,
        args.temperature,
        ks=(8, 64, 256),
    )
    samples = {
        name: generate_samples(model, preprocessor, args.generate_length, args.seed)
        for name, model in (("teacher", teacher), ("distilled", distilled), ("scratch", scratch))
    }
    results = {
        "backend": keras.backend.backend(),
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "models": rows,
        "top_k": errors,
        "samples": samples,
        "history": {
            "teacher": teacher_history,
            "distilled": distilled_history,
            "scratch": scratch_history,
        },
    }
    if args.mode != "token":
        results["modes"] = compare_modes(
            args, teacher, initial_weights, train, heldout,
            teacher_logits,
            {"token": (distilled, int(distiller.optimizer.iterations), distilled_seconds)},
            preprocessor,
        )
    print(format_table(results))
    print(f"wrote {reporting.write_results(results, args.output_dir)}")
    return results


def _fresh_student(args, vocabulary_size, initial_weights):
    """A student like the token-level one, from the same initial weights."""
    import keras_hub

    if args.student:
        student = keras_hub.models.CausalLM.from_preset(args.student)
        student.preprocessor = None
    else:
        student = build_gemma(vocabulary_size, *args.student_size, preprocessor=None)
    student.set_weights(initial_weights)
    return student


def _window_prompts(x, prompt_length):
    return {
        "token_ids": x["token_ids"][:, :prompt_length],
        "padding_mask": x["padding_mask"][:, :prompt_length],
    }


def teacher_log_likelihood_of_samples(teacher, student, heldout, args):
    """The teacher's mean per-token log-likelihood of `student`'s samples.

    The student continues the first `--prompt-length` tokens of held-out
    windows (random sampling, temperature 1) to the window length; the
    teacher scores the generated tokens: the higher, the more teacher-like
    the student's own text.
    """
    prompts = _window_prompts(heldout[0], args.prompt_length)
    prompts = {k: v[: args.sample_prompts] for k, v in prompts.items()}
    x, labels, weight = on_policy.generate_sequences(
        student,
        prompts,
        max_new_tokens=args.sequence_length - args.prompt_length,
        sampler="random",
        seed=args.seed,
        batch_size=args.batch_size,
    )
    log_likelihood, _ = token_log_likelihoods(teacher, x, labels, args.batch_size)
    return float((log_likelihood * weight).sum() / weight.sum())


def compare_modes(
    args, teacher, initial_weights, train, heldout, teacher_logits,
    trained, preprocessor,
):
    """Token-level, sequence-level and on-policy students at equal step budgets."""
    x_heldout, labels_heldout, weight_heldout = heldout
    validation = (x_heldout, labels_heldout, weight_heldout)
    modes = ("on_policy", "sequence") if args.mode == "all" else (args.mode,)
    distilled_vocabulary = trained["token"][0].backbone.vocabulary_size
    trained = dict(trained)
    extra = {}
    if "sequence" in modes:
        start = time.perf_counter()
        sequences = on_policy.generate_sequences(
            teacher,
            _window_prompts(train[0], args.prompt_length),
            max_new_tokens=args.sequence_length - args.prompt_length,
            sampler="random",
            seed=args.seed,
            batch_size=4 * args.batch_size,
        )
        extra["sequence"] = {"teacher_generation_seconds": time.perf_counter() - start}
        student = _fresh_student(args, distilled_vocabulary, initial_weights)
        distiller = distillers.CausalLMDistiller(student=student, teacher=teacher)
        distiller.compile(
            optimizer=_optimizer(args.learning_rate),
            student_loss_fn="sparse_categorical_crossentropy",
            alpha=1.0,
        )
        start = time.perf_counter()
        _fit_history(
            distiller, sequences, args.student_epochs, args.batch_size, args.seed,
            validation,
        )
        trained["sequence"] = (
            student, int(distiller.optimizer.iterations), time.perf_counter() - start
        )
    if "on_policy" in modes:
        student = _fresh_student(args, distilled_vocabulary, initial_weights)
        distiller = distillers.CausalLMDistiller(
            student=student,
            teacher=teacher,
            on_policy=on_policy.OnPolicyGeneration(
                fraction=args.lmbda,
                prompt_length=args.prompt_length,
                sampler="random",
                seed=args.seed,
            ),
        )
        distiller.compile(
            optimizer=_optimizer(args.learning_rate),
            distillation_loss_fn=losses.GeneralizedJSD(beta=args.beta),
            alpha=0.0,
            temperature=args.temperature,
        )
        start = time.perf_counter()
        history = _fit_history(
            distiller, train, args.student_epochs, args.batch_size, args.seed,
            validation,
        )
        trained["on_policy"] = (
            student, int(distiller.optimizer.iterations), time.perf_counter() - start
        )
        on_policy_steps = sum(
            fraction * math.ceil(len(train[1]) / args.batch_size)
            for fraction in history["on_policy_fraction"]
        )
        extra["on_policy"] = {
            "on_policy_fraction": history["on_policy_fraction"],
            "generation_time_share": history["generation_time_share"],
            "generated_tokens_per_second": history["generated_tokens_per_second"],
            "generation_seconds_per_on_policy_step": (
                sum(history["generation_seconds"]) / max(on_policy_steps, 1)
            ),
        }
    rows = {}
    for name, (student, steps, seconds) in trained.items():
        metrics, _ = evaluate(
            student, teacher_logits, x_heldout, labels_heldout, weight_heldout,
            args.batch_size,
        )
        rows[name] = dict(
            metrics,
            optimizer_steps=steps,
            teacher_log_likelihood_of_samples=teacher_log_likelihood_of_samples(
                teacher, student, heldout, args
            ),
            train_seconds=seconds,
            samples=generate_samples(
                student, preprocessor, args.generate_length, args.seed
            ),
            **extra.get(name, {}),
        )
    rows["teacher"] = {
        "teacher_log_likelihood_of_samples": teacher_log_likelihood_of_samples(
            teacher, teacher, heldout, args
        )
    }
    return rows


def format_modes(modes):
    lines = [
        "| student | optimizer steps | held-out perplexity | top-1 agreement "
        "| teacher log-likelihood of its samples (per token) | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in modes.items():
        if name == "teacher":
            continue
        lines.append(
            f"| {name} | {row['optimizer_steps']} | {row['perplexity']:.2f} | "
            f"{row['agreement']:.3f} | "
            f"{row['teacher_log_likelihood_of_samples']:.3f} | "
            f"{row['train_seconds']:.0f} |"
        )
    lines.append(
        "teacher's own samples: "
        f"{modes['teacher']['teacher_log_likelihood_of_samples']:.3f} per token"
    )
    if "on_policy" in modes:
        row = modes["on_policy"]
        lines.append(
            f"on-policy: fraction of steps {row['on_policy_fraction']}, "
            f"generation share of step time {row['generation_time_share']}, "
            f"{row['generation_seconds_per_on_policy_step']:.3f} s generating "
            "per on-policy step"
        )
    for name, row in modes.items():
        if name != "teacher":
            lines.append(f"\n--- {name} student samples")
            lines += [text.replace("\n", " / ") for text in row["samples"]]
    return "\n".join(lines)


def format_table(results):
    lines = [
        f"backend: {results['backend']}",
        "| model | parameters | held-out perplexity | top-1 agreement with teacher | train s |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        lines.append(
            f"| {name} | {row['parameters']:,} | {row['perplexity']:.2f} | "
            f"{row['agreement']:.3f} | {row['train_seconds']:.0f} |"
        )
    if results["top_k"]:
        lines += [
            "",
            "| k | dense T²·KL | top-k, renormalized tail (error) | top-k, tail bucket (error) |",
            "|---|---|---|---|",
        ]
        for row in results["top_k"]:
            lines.append(
                f"| {row['k']} | {row['dense']:.4f} | {row['renormalize']:.4f} "
                f"({100 * row['renormalize_relative_error']:+.1f}%) | "
                f"{row['bucket']:.4f} ({100 * row['bucket_relative_error']:+.2f}%) |"
            )
    for name, texts in results["samples"].items():
        lines.append(f"\n--- {name}")
        lines += [text.replace("\n", " / ") for text in texts]
    if "modes" in results:
        lines += ["", format_modes(results["modes"])]
    return "\n".join(lines)


def parse_args(argv=None):
    root = Path(__file__).resolve().parents[1]
    known, _ = _recipe_parser().parse_known_args(argv)
    # `--teacher` alone: a real teacher and a student cut from its blocks.
    pretrained = bool(known.teacher) and not known.student
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=str(root.parent / "shared" / "data"),
                        help="folder holding tinyshakespeare.txt")
    parser.add_argument("--output-dir", default="gemma_distillation_output")
    parser.add_argument("--teacher",
                        help="teacher preset name or directory (default: build one); alone, "
                             "e.g. gemma3-270m or a .gguf file, it teaches a student cut "
                             "from its own blocks (examples/pretrained_gemma.py)")
    parser.add_argument("--student", help="student preset name or directory")
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--vocabulary-size", type=int, default=1000)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--generate-length", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a small, fast run for smoke tests")
    parser.add_argument("--mode", choices=("token", "on_policy", "sequence", "all"),
                        default="token",
                        help="students compared with the token-level one")
    parser.add_argument("--lmbda", type=float, default=0.5,
                        help="on-policy: share of steps on the student's generations")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="on-policy: generalized JSD beta (0 forward, 1 reverse KL)")
    parser.add_argument("--prompt-length", type=int, default=8,
                        help="on-policy and sequence-level: prompt tokens per window")
    parser.add_argument("--sample-prompts", type=int, default=256,
                        help="held-out prompts each student continues for the teacher to score")
    parser.add_argument("--train-tokens", type=int, default=40_960,
                        help="real teacher: training tokens (first 90%% of the text)")
    parser.add_argument("--heldout-tokens", type=int, default=4_096,
                        help="real teacher: held-out tokens (last 10%% of the text)")
    parser.add_argument("--student-layers", type=int, default=6,
                        help="real teacher: student blocks copied from the teacher's")
    parser.add_argument("--top-k", type=int, default=256,
                        help="real teacher: cached teacher log-probabilities per token")
    if pretrained:
        parser.set_defaults(sequence_length=128, batch_size=8, learning_rate=3e-4,
                            student_epochs=2, generate_length=24)
    args = parser.parse_args(argv)
    args.pretrained = pretrained
    if args.student and not args.teacher:
        parser.error("--student needs --teacher")
    if pretrained and args.mode != "token":
        parser.error("--mode applies to the tiny and two-preset recipes")
    for name in ("train_tokens", "heldout_tokens", "student_layers", "top_k", "batch_size",
                 "sequence_length", "student_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    # (hidden_dim, num_layers, num_heads)
    args.teacher_size = (128, 4, 4)
    args.student_size = (64, 1, 2)
    if args.quick and pretrained:
        args.sequence_length = min(args.sequence_length, 64)
        args.train_tokens = min(args.train_tokens, 16 * args.sequence_length)
        args.heldout_tokens = min(args.heldout_tokens, 4 * args.sequence_length)
        args.student_layers, args.top_k = min(args.student_layers, 2), min(args.top_k, 64)
        args.student_epochs, args.generate_length = 1, min(args.generate_length, 8)
    elif args.quick:
        args.teacher_size, args.student_size = (32, 1, 2), (16, 1, 2)
        args.vocabulary_size = min(args.vocabulary_size, 300)
        args.teacher_epochs = args.student_epochs = 1
        args.sequence_length = min(args.sequence_length, 32)
        args.generate_length = min(args.generate_length, 12)
        args.sample_prompts = min(args.sample_prompts, 16)
        args.prompt_length = min(args.prompt_length, 4)
    return args


def _recipe_parser():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--teacher")
    parser.add_argument("--student")
    return parser


def main(argv=None):
    args = parse_args(argv)
    if args.pretrained:
        from keras_distill.cli import load_example

        return load_example("pretrained_gemma").run(args)
    return run(args)


if __name__ == "__main__":
    main()
