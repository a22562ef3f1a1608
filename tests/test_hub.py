"""Tests for `keras_distill.distillers.causal_lm`: KerasHub causal-LM distillation, offline."""

import logging

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from keras_distill import distillers  # noqa: E402
from keras_distill import language_models  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402
from tests.conftest import tiny_gemma3  # noqa: E402

VOCABULARY_SIZE = 300
SEQUENCE_LENGTH = 12


def _shakespeare_lines(count=4000):
    text = (DATA_DIR / "tinyshakespeare.txt").read_text()
    return [line for line in text.splitlines() if line.strip()][:count]


@pytest.fixture(scope="module")
def tokenizer():
    return language_models.train_gemma3_tokenizer(_shakespeare_lines(), VOCABULARY_SIZE)


def _gemma(tokenizer, hidden_dim, vocabulary_size=VOCABULARY_SIZE, seed=0, **config):
    preprocessor = None
    if tokenizer is not None:
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
            tokenizer=tokenizer, sequence_length=SEQUENCE_LENGTH
        )
    return tiny_gemma3(
        vocabulary_size, hidden_dim, seed=seed, preprocessor=preprocessor, **config
    )


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _reference_loss(teacher_logits, student_logits, labels, weight, alpha, temperature):
    """alpha * CE + (1 - alpha) * T² * KL, averaged over weighted tokens."""
    student_log_probs = _log_softmax(student_logits.astype("float64"))
    cross_entropy = -np.take_along_axis(
        student_log_probs, labels[..., None], axis=-1
    )[..., 0]
    teacher_log_probs = _log_softmax(teacher_logits.astype("float64") / temperature)
    soft_student = _log_softmax(student_logits.astype("float64") / temperature)
    kl = (np.exp(teacher_log_probs) * (teacher_log_probs - soft_student)).sum(-1)
    weight = weight.astype("float64")
    mean = lambda values: (values * weight).sum() / weight.sum()  # noqa: E731
    return alpha * mean(cross_entropy) + (1 - alpha) * temperature**2 * mean(kl)


def _compile(distiller, alpha=0.5, temperature=2.0):
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=alpha,
        temperature=temperature,
    )
    return distiller


@pytest.fixture(scope="module")
def other_tokenizer():
    """A tokenizer trained on other lines: same size, other token ids."""
    return language_models.train_gemma3_tokenizer(_shakespeare_lines()[2000:], VOCABULARY_SIZE)


@pytest.fixture(scope="module")
def models(tokenizer):
    return _gemma(tokenizer, 16, seed=1), _gemma(tokenizer, 32, seed=2)


@pytest.fixture(scope="module")
def batch(models):
    student, _ = models
    distiller = distillers.CausalLMDistiller(student=student, teacher=models[1])
    texts = _shakespeare_lines()[:4]
    return distiller.preprocess(texts)


def _loss(distiller, x, labels, sample_weight=None):
    y_pred = distiller.student(x)
    return float(
        keras.ops.convert_to_numpy(
            distiller.compute_loss(x, labels, y_pred, sample_weight)
        )
    )


def test_preprocess_masks_padding_not_token_ids(batch):
    x, labels, sample_weight = batch
    assert x["token_ids"].shape == (4, SEQUENCE_LENGTH)
    # Short lines are padded: the weights must follow the padding mask.
    assert not sample_weight.all()
    # Label i is token i + 1: its weight is the padding mask one step on.
    np.testing.assert_array_equal(sample_weight[:, :-1], x["padding_mask"][:, 1:])


def test_loss_matches_reference_over_real_tokens(models, batch):
    student, teacher = models
    x, labels, sample_weight = batch
    distiller = _compile(distillers.CausalLMDistiller(student=student, teacher=teacher))
    expected = _reference_loss(
        keras.ops.convert_to_numpy(teacher(x)),
        keras.ops.convert_to_numpy(student(x)),
        labels,
        sample_weight,
        alpha=0.5,
        temperature=2.0,
    )
    np.testing.assert_allclose(
        _loss(distiller, x, labels, sample_weight), expected, rtol=1e-5
    )


def test_padding_id_equal_to_eos_still_trains_on_eos(models, tokenizer):
    # A tokenizer whose pad id is also its EOS id (GPT-2 style): the real EOS
    # is marked by the mask, and must count.
    student, teacher = models
    distiller = _compile(distillers.CausalLMDistiller(student=student, teacher=teacher))
    pad_id = tokenizer.pad_token_id
    token_ids = np.array([[2, 40, 41, pad_id, pad_id, pad_id]], "int32")
    labels = np.array([[40, 41, pad_id, pad_id, pad_id, pad_id]], "int32")
    # Positions 0..2 are real: position 2 predicts the real end token.
    weight = np.array([[1, 1, 1, 0, 0, 0]], "float32")
    x = {"token_ids": token_ids, "padding_mask": weight.astype(bool)}
    expected = _reference_loss(
        keras.ops.convert_to_numpy(teacher(x)),
        keras.ops.convert_to_numpy(student(x)),
        labels,
        weight,
        alpha=0.5,
        temperature=2.0,
    )
    np.testing.assert_allclose(_loss(distiller, x, labels, weight), expected, rtol=1e-5)
    # Without `sample_weight`, the input padding mask weights the tokens.
    np.testing.assert_allclose(_loss(distiller, x, labels), expected, rtol=1e-5)


def test_all_padding_batch_gives_zero_loss_and_no_update(models, batch):
    tokenizer, teacher = models[0].preprocessor.tokenizer, models[1]
    student = _gemma(tokenizer, 16, seed=1)
    distiller = _compile(distillers.CausalLMDistiller(student=student, teacher=teacher))
    x, labels, _ = batch
    zero_weight = np.zeros(labels.shape, "float32")
    assert _loss(distiller, x, labels, zero_weight) == 0.0
    before = [w.copy() for w in student.get_weights()]
    history = distiller.fit(
        x, labels, sample_weight=zero_weight, epochs=1, verbose=0, batch_size=4
    )
    assert history.history["loss"] == [0.0]
    for old, new in zip(before, student.get_weights()):
        np.testing.assert_array_equal(old, new)


@pytest.mark.slow
def test_fit_moves_the_student_to_the_teacher(models, batch):
    tokenizer, teacher = models[0].preprocessor.tokenizer, models[1]
    student = _gemma(tokenizer, 16, seed=1)
    distiller = distillers.CausalLMDistiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=0.0,
        temperature=2.0,
    )
    x, labels, sample_weight = batch
    history = distiller.fit(
        x, labels, sample_weight=sample_weight, epochs=25, verbose=0, batch_size=4
    )
    # One batch, 25 steps on the teacher alone: the student moves to it.
    distillation_loss = history.history["distillation_loss"]
    assert distillation_loss[-1] < 0.9 * distillation_loss[0]


def test_final_logit_soft_cap_is_distilled(tokenizer, batch):
    # The teacher caps its logits at ±1: what the student must match is the
    # capped distribution the model really outputs.
    teacher = _gemma(tokenizer, 32, seed=3, final_logit_soft_cap=1.0)
    student = _gemma(tokenizer, 16, seed=4)
    distiller = _compile(distillers.CausalLMDistiller(student=student, teacher=teacher))
    x, labels, sample_weight = batch
    teacher_logits = keras.ops.convert_to_numpy(distiller._teacher_logits(x))
    assert np.abs(teacher_logits).max() <= 1.0
    backbone_hidden = teacher.backbone(x)
    uncapped = keras.ops.convert_to_numpy(
        keras.ops.matmul(
            backbone_hidden,
            keras.ops.transpose(teacher.backbone.token_embedding.embeddings),
        )
    )
    np.testing.assert_allclose(teacher_logits, np.tanh(uncapped), atol=1e-5)
    expected = _reference_loss(
        teacher_logits,
        keras.ops.convert_to_numpy(student(x)),
        labels,
        sample_weight,
        alpha=0.5,
        temperature=2.0,
    )
    np.testing.assert_allclose(
        _loss(distiller, x, labels, sample_weight), expected, rtol=1e-5
    )


def test_padded_embedding_tables_are_sliced_to_the_tokenizer(tokenizer, batch, caplog):
    teacher = _gemma(tokenizer, 32, vocabulary_size=VOCABULARY_SIZE + 20, seed=5)
    student = _gemma(tokenizer, 16, vocabulary_size=VOCABULARY_SIZE + 4, seed=6)
    with caplog.at_level(logging.INFO, logger="keras_distill.language_models.hub"):
        distiller = _compile(distillers.CausalLMDistiller(student=student, teacher=teacher))
    assert "padded differently" in caplog.text
    x, labels, sample_weight = batch
    teacher_logits = keras.ops.convert_to_numpy(teacher(x))[..., :VOCABULARY_SIZE]
    student_logits = keras.ops.convert_to_numpy(student(x))
    kl_only = _compile(
        distillers.CausalLMDistiller(student=student, teacher=teacher), alpha=0.0
    )
    expected = _reference_loss(
        teacher_logits,
        student_logits[..., :VOCABULARY_SIZE],
        labels,
        sample_weight,
        alpha=0.0,
        temperature=2.0,
    )
    np.testing.assert_allclose(
        _loss(kl_only, x, labels, sample_weight), expected, rtol=1e-5
    )
    distiller.fit(x, labels, sample_weight=sample_weight, epochs=1, verbose=0)


def test_vocabulary_size_mismatch_without_tokenizers_names_both_sizes():
    teacher = _gemma(None, 32, vocabulary_size=120)
    student = _gemma(None, 16, vocabulary_size=100)
    with pytest.raises(ValueError, match="120 tokens, student 100"):
        distillers.CausalLMDistiller(student=student, teacher=teacher)


def test_different_tokenizers_are_refused(tokenizer, other_tokenizer):
    teacher = _gemma(other_tokenizer, 32)
    student = _gemma(tokenizer, 16)
    with pytest.raises(ValueError, match="tokenizers differ.*vocabulary_mapping"):
        distillers.CausalLMDistiller(student=student, teacher=teacher)


def test_vocabulary_mapping_gathers_teacher_logits(tokenizer, other_tokenizer, batch):
    teacher = _gemma(other_tokenizer, 32, seed=7)
    student = _gemma(tokenizer, 16, seed=8)
    mapping = np.random.default_rng(0).permutation(VOCABULARY_SIZE)
    distiller = distillers.CausalLMDistiller(
        student=student, teacher=teacher, vocabulary_mapping=mapping
    )
    x, _, _ = batch
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(distiller._teacher_logits(x)),
        keras.ops.convert_to_numpy(teacher(x))[..., mapping],
        rtol=1e-6,
    )
    restored = distillers.CausalLMDistiller.from_config(distiller.get_config())
    np.testing.assert_array_equal(restored._vocabulary_mapping, mapping)


@pytest.mark.parametrize(
    "mapping, message",
    [
        (np.arange(10), "has 10 entries"),
        (np.full(VOCABULARY_SIZE, VOCABULARY_SIZE), "outside the teacher"),
        (np.zeros((VOCABULARY_SIZE, 2), "int32"), "1-D integer"),
    ],
)
def test_bad_vocabulary_mapping(models, mapping, message):
    student, teacher = models
    with pytest.raises(ValueError, match=message):
        distillers.CausalLMDistiller(
            student=student, teacher=teacher, vocabulary_mapping=mapping
        )


def test_non_causal_lm_is_refused(models):
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(TypeError, match="`student` must be a `keras_hub"):
        distillers.CausalLMDistiller(student=plain, teacher=models[1])


@pytest.mark.slow
def test_from_preset_loads_local_presets(models, tmp_path):
    student, teacher = models
    teacher.save_to_preset(str(tmp_path / "teacher"))
    student.save_to_preset(str(tmp_path / "student"))
    distiller = distillers.CausalLMDistiller.from_preset(
        str(tmp_path / "teacher"), str(tmp_path / "student"), sequence_length=8
    )
    x, labels, sample_weight = distiller.preprocess(_shakespeare_lines()[:3])
    assert x["token_ids"].shape == (3, 8)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(distiller.teacher(x)),
        keras.ops.convert_to_numpy(teacher(x)),
        atol=1e-6,
    )
    _compile(distiller).fit(x, labels, sample_weight=sample_weight, verbose=0)


def test_language_model_windows_on_shakespeare(tokenizer):
    text = (DATA_DIR / "tinyshakespeare.txt").read_text()[:5000]
    x, labels, weight = language_models.language_model_windows(tokenizer, text, 32)
    ids = np.asarray(keras.ops.convert_to_numpy(tokenizer(text)))
    assert x["token_ids"].shape[1] == 32
    assert (x["token_ids"][:, 0] == tokenizer.start_token_id).all()
    np.testing.assert_array_equal(x["token_ids"][0, 1:], ids[:31])
    np.testing.assert_array_equal(labels[0], ids[:32])
    np.testing.assert_array_equal(x["token_ids"][1, 1:], ids[32:63])
    assert weight.all() and x["padding_mask"].all()
    with pytest.raises(ValueError, match="sequence_length"):
        language_models.language_model_windows(tokenizer, text, 0)
    with pytest.raises(TypeError, match="sequence_length"):
        language_models.language_model_windows(tokenizer, text, True)


@pytest.mark.slow
@pytest.mark.parametrize("soft_cap", [None, 1.5])
def test_fused_loss_equals_dense_loss_and_trains_the_same(tokenizer, batch, soft_cap):
    # Teacher and student both soft-cap their logits when `soft_cap` is set:
    # the fused path must apply the caps it never sees as logits.
    x, labels, sample_weight = batch

    def build():
        teacher = _gemma(tokenizer, 32, seed=9, final_logit_soft_cap=soft_cap)
        student = _gemma(tokenizer, 16, seed=10, final_logit_soft_cap=soft_cap)
        return teacher, student

    results = {}
    for fused_loss in (False, True):
        teacher, student = build()
        distiller = _compile(
            distillers.CausalLMDistiller(
                student=student,
                teacher=teacher,
                fused_loss=fused_loss,
                chunk_size=5,
                vocabulary_chunk_size=64,
            )
        )
        first = _loss(distiller, x, labels, sample_weight) if not fused_loss else float(
            keras.ops.convert_to_numpy(
                distiller.compute_loss(x, labels, distiller(x), sample_weight)
            )
        )
        history = distiller.fit(
            x, labels, sample_weight=sample_weight, epochs=2, batch_size=4,
            shuffle=False, verbose=0,
        )
        results[fused_loss] = (first, history.history, student.get_weights())
    dense, fused_result = results[False], results[True]
    np.testing.assert_allclose(fused_result[0], dense[0], rtol=1e-5)
    for key in ("loss", "student_loss", "distillation_loss"):
        np.testing.assert_allclose(fused_result[1][key], dense[1][key], rtol=1e-4)
    for fused_weight, dense_weight in zip(fused_result[2], dense[2]):
        np.testing.assert_allclose(fused_weight, dense_weight, rtol=1e-4, atol=1e-6)


def test_fused_loss_refuses_metrics_and_unknown_divergences(models):
    student, teacher = models
    distiller = distillers.CausalLMDistiller(student=student, teacher=teacher, fused_loss=True)
    with pytest.raises(ValueError, match="compile without `metrics`"):
        distiller.compile(
            optimizer="sgd",
            metrics=["accuracy"],
            student_loss_fn="sparse_categorical_crossentropy",
        )
    with pytest.raises(ValueError, match="tile by tile"):
        distiller.compile(
            optimizer="sgd",
            student_loss_fn="sparse_categorical_crossentropy",
            distillation_loss_fn=keras.losses.MeanSquaredError(),
        )


# ---- what slipped through (issue 14) ----


@pytest.mark.slow
@pytest.mark.parametrize("fused_loss", [False, True])
def test_predict_returns_student_logits_and_the_model_stays_usable(
    tokenizer, models, batch, fused_loss
):
    x, labels, sample_weight = batch
    student = _gemma(tokenizer, 16, seed=3)
    distiller = _compile(distillers.CausalLMDistiller(
        student=student, teacher=models[1], fused_loss=fused_loss
    ))
    distiller.fit(x, labels, sample_weight=sample_weight, verbose=0)
    expected = keras.ops.convert_to_numpy(student(x))
    np.testing.assert_allclose(
        distiller.predict(x, batch_size=4, verbose=0), expected, atol=1e-5
    )
    np.testing.assert_allclose(distiller.predict_on_batch(x), expected, atol=1e-5)
    assert np.isfinite(distiller.evaluate(x, labels, verbose=0)[0])
    distiller.fit(x, labels, sample_weight=sample_weight, verbose=0)
    assert student(x).shape == (4, SEQUENCE_LENGTH, VOCABULARY_SIZE)


@pytest.mark.parametrize("fused_loss", [False, True])
@pytest.mark.parametrize("where", ["labels", "token_ids"])
def test_ids_outside_the_vocabulary_stop_fit_naming_them(
    tokenizer, models, batch, fused_loss, where
):
    x, labels, sample_weight = batch
    x, labels = dict(x), labels.copy()
    bad_id = VOCABULARY_SIZE + 7
    if where == "labels":
        labels[1, 0] = bad_id
        message = rf"Label {bad_id} is outside .* {VOCABULARY_SIZE} classes"
    else:
        x["token_ids"] = x["token_ids"].copy()
        x["token_ids"][1, 0] = bad_id
        message = rf"Token id {bad_id} .* {VOCABULARY_SIZE} tokens"
    student = _gemma(tokenizer, 16, seed=4)
    distiller = _compile(distillers.CausalLMDistiller(
        student=student, teacher=models[1], fused_loss=fused_loss
    ))
    before = student.get_weights()
    with pytest.raises(ValueError, match=message):
        distiller.fit(x, labels, sample_weight=sample_weight, verbose=0)
    for initial, now in zip(before, student.get_weights()):
        np.testing.assert_array_equal(now, initial)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_non_finite_teacher_logits_at_padding_and_minus_inf_classes(
    models, batch, fused_loss
):
    student, teacher = models
    x, labels, sample_weight = batch
    distiller = _compile(distillers.CausalLMDistiller(
        student=student, teacher=None, fused_loss=fused_loss
    ))
    teacher_logits = keras.ops.convert_to_numpy(teacher(x))
    # A token the teacher rules out everywhere: -inf, probability 0.
    teacher_logits[..., 5] = -np.inf
    padded = ~x["padding_mask"]
    assert padded.any()
    poisoned = teacher_logits.copy()
    poisoned[padded] = np.nan
    poisoned[padded, 0] = np.inf

    def loss(logits):
        y = {"labels": labels, "teacher_logits": logits}
        return float(keras.ops.convert_to_numpy(
            distiller.compute_loss(x, y, distiller(x))
        ))

    finite = teacher_logits.copy()
    finite[..., 5] = -1e4  # the same distribution, nearly
    assert np.isfinite(loss(poisoned))
    np.testing.assert_allclose(loss(poisoned), loss(finite), rtol=1e-5)
    fresh = distillers.CausalLMDistiller(student=_gemma(
        student.preprocessor.tokenizer, 16, seed=5), teacher=None,
        fused_loss=fused_loss)
    history = _compile(fresh).fit(
        x, {"labels": labels, "teacher_logits": poisoned}, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])


def test_per_sequence_sample_weight_keeps_the_padding_mask(models, batch):
    student, teacher = models
    x, labels, _ = batch
    distiller = _compile(distillers.CausalLMDistiller(student=student, teacher=teacher))
    per_sequence = np.array([1.0, 2.0, 0.5, 1.0], "float32")
    mask = x["padding_mask"].astype("float32")
    expected = _reference_loss(
        keras.ops.convert_to_numpy(teacher(x)),
        keras.ops.convert_to_numpy(student(x)),
        labels,
        per_sequence[:, None] * mask,
        alpha=0.5,
        temperature=2.0,
    )
    np.testing.assert_allclose(
        _loss(distiller, x, labels, per_sequence), expected, rtol=1e-5
    )
