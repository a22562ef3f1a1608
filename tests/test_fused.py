"""Chunked and fused losses against dense losses and float64 NumPy references."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_distill import losses
from keras_distill.losses import fused
from keras_distill.targets import top_k
from tests.conftest import value_and_grad

# Shared shapes (JAX compiles once per shape and loss): 2 sequences of 7
# tokens, a 13-class vocabulary, hidden size 5. Chunks of 3 tokens and 5
# classes divide neither.
TOKENS = (2, 7)
CLASSES = 13
HIDDEN = 5
TEACHER_HIDDEN = 4


# ---- NumPy references (float64, written independently of fused.py) ----


def np_log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_divergence(name, teacher, student, temperature, beta=0.5, skew=0.1):
    """Per-token `T² · D(P_teacher, Q_student)`."""
    log_p = np_log_softmax(teacher, temperature)
    log_q = np_log_softmax(student, temperature)
    p, q = np.exp(log_p), np.exp(log_q)

    def kl(p, log_p, log_r):
        # 0 · log 0 = 0: classes with p = 0 (a -inf teacher logit) add nothing.
        return np.where(p > 0, p * (np.where(p > 0, log_p, 0.0) - log_r), 0.0).sum(
            axis=-1
        )

    if name == "forward_kl" or (name == "generalized_jsd" and beta == 0.0):
        value = kl(p, log_p, log_q)
    elif name == "reverse_kl" or (name == "generalized_jsd" and beta == 1.0):
        value = kl(q, log_q, log_p)
    elif name == "total_variation":
        value = 0.5 * np.abs(p - q).sum(axis=-1)
    elif name == "skew_kl":
        value = kl(p, log_p, np.log(skew * p + (1 - skew) * q))
    else:
        log_m = np.log(beta * p + (1 - beta) * q)
        value = (beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, log_q, log_m)) / (
            beta * (1 - beta)
        )
    return temperature**2 * value


def np_mean(values, weights):
    total = weights.sum()
    return (weights * values).sum() / (total if total else 1.0)


def np_forward_kl_gradient(teacher, student, temperature, weights):
    """d mean(T² · KL(P || Q)) / d student = T · (Q - P) · w / Σw."""
    p = np.exp(np_log_softmax(teacher, temperature))
    q = np.exp(np_log_softmax(student, temperature))
    total = weights.sum() or 1.0
    return temperature * (q - p) * (weights / total)[..., None]


def np_cross_entropy(labels, logits):
    log_q = np_log_softmax(logits)
    return -np.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]


# ---- helpers ----


def random_logits(seed, shape=TOKENS + (CLASSES,), scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype("float32")


def padding_mask(all_padding=False):
    mask = np.ones(TOKENS, "float32")
    mask[1, 4:] = 0.0  # the second sequence is 4 tokens long
    return mask * 0.0 if all_padding else mask


def assert_close(actual, expected, rtol=1e-5):
    """Equal within `rtol`, relative to the largest magnitude (gradients)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


class LanguageModelCase:
    """Hidden states, embeddings, labels and teacher targets of one test."""

    def __init__(self, seed=0, soft_cap=None):
        rng = np.random.default_rng(seed)
        self.hidden = rng.normal(size=TOKENS + (HIDDEN,)).astype("float32")
        self.embedding = rng.normal(size=(CLASSES, HIDDEN)).astype("float32")
        self.teacher_hidden = rng.normal(size=TOKENS + (TEACHER_HIDDEN,)).astype(
            "float32"
        )
        self.teacher_embedding = rng.normal(
            size=(CLASSES, TEACHER_HIDDEN)
        ).astype("float32")
        self.labels = rng.integers(0, CLASSES, size=TOKENS).astype("int32")
        self.soft_cap = soft_cap

    def packed(self):
        """Hidden states and embedding in one array, for one gradient call."""
        return np.concatenate([self.hidden.ravel(), self.embedding.ravel()])

    def unpack(self, packed):
        size = self.hidden.size
        return (
            ops.reshape(packed[:size], self.hidden.shape),
            ops.reshape(packed[size:], self.embedding.shape),
        )

    def teacher_logits(self, teacher_soft_cap=None):
        logits = self.teacher_hidden @ self.teacher_embedding.T * 2.0
        if teacher_soft_cap is not None:
            logits = teacher_soft_cap * np.tanh(logits / teacher_soft_cap)
        return logits.astype("float32")

    def dense_student_logits(self, packed):
        hidden, embedding = self.unpack(packed)
        logits = ops.matmul(hidden, ops.transpose(embedding))
        if self.soft_cap is not None:
            logits = self.soft_cap * ops.tanh(logits / self.soft_cap)
        return logits


# ---- chunked_distillation_loss ----

DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.3}),
    ("generalized_jsd", {"beta": 0.0}),
    ("total_variation", {}),
    ("skew_kl", {"skew": 0.2}),
]


CHUNKED_CASES = [(name, kwargs, 2.0) for name, kwargs in DIVERGENCE_CASES] + [
    ("forward_kl", {}, 0.5),
    ("forward_kl", {}, 1.0),
    ("reverse_kl", {}, 4.0),
    # The limits: reverse KL, forward KL.
    ("generalized_jsd", {"beta": 1.0}, 2.0),
    ("skew_kl", {"skew": 0.0}, 2.0),
]


@pytest.mark.parametrize("name,kwargs,temperature", CHUNKED_CASES)
def test_chunked_loss_matches_numpy_and_dense_loss(name, kwargs, temperature):
    teacher, student = random_logits(0), random_logits(1)
    mask = padding_mask()
    value, gradient = value_and_grad(
        lambda s: fused.chunked_distillation_loss(
            teacher, s, temperature, sample_weight=mask, divergence=name,
            chunk_size=3, **kwargs,
        ),
        student,
    )
    dense_value, dense_gradient = value_and_grad(
        lambda s: losses.DIVERGENCES[name](
            teacher, s, temperature, sample_weight=mask, **kwargs
        ),
        student,
    )
    expected = np_mean(
        np_divergence(name, teacher, student, temperature, **kwargs), mask
    )
    assert_close(value, expected)
    assert_close(value, dense_value)
    assert_close(gradient, dense_gradient)
    if name == "forward_kl" or kwargs.get("beta") == 0.0:
        assert_close(
            gradient, np_forward_kl_gradient(teacher, student, temperature, mask)
        )


RULING_OUT_CASES = [c for c in DIVERGENCE_CASES if c[0] != "reverse_kl"]


@pytest.mark.parametrize("name,kwargs", RULING_OUT_CASES)
def test_tiled_losses_of_teacher_logits_of_minus_inf_are_finite(name, kwargs):
    # A -inf teacher logit rules its class out (0 · log 0 = 0), in every tile
    # as in the dense loss; a whole vocabulary block of it leaves that tile
    # with no teacher mass at all.
    case = LanguageModelCase(seed=11)
    teacher = case.teacher_logits()
    teacher[..., :5] = -np.inf
    teacher[0, 1, 7:9] = -np.inf
    mask = padding_mask()
    expected = np_mean(np_divergence(name, teacher, random_logits(1), 2.0, **kwargs), mask)
    value, gradient = value_and_grad(
        lambda s: fused.chunked_distillation_loss(
            teacher, s, 2.0, sample_weight=mask, divergence=name, chunk_size=3,
            **kwargs,
        ),
        random_logits(1),
    )
    _, dense_gradient = value_and_grad(
        lambda s: losses.DIVERGENCES[name](
            teacher, s, 2.0, sample_weight=mask, **kwargs
        ),
        random_logits(1),
    )
    assert_close(value, expected)
    assert_close(gradient, dense_gradient)

    def fused_loss(packed):
        hidden, embedding = case.unpack(packed)
        return fused.fused_distillation_loss(
            hidden, embedding, teacher_logits=teacher, temperature=2.0,
            alpha=0.0, sample_weight=mask, divergence=name, chunk_size=3,
            vocabulary_chunk_size=5, **kwargs,
        )["loss"]

    value, gradient = value_and_grad(fused_loss, case.packed())
    student_logits = case.hidden.astype(np.float64) @ case.embedding.T
    expected = np_mean(np_divergence(name, teacher, student_logits, 2.0, **kwargs), mask)
    _, dense_gradient = value_and_grad(
        lambda packed: losses.DIVERGENCES[name](
            teacher, case.dense_student_logits(packed), 2.0, sample_weight=mask,
            **kwargs,
        ),
        case.packed(),
    )
    assert_close(value, expected)
    assert np.all(np.isfinite(gradient))
    assert_close(gradient, dense_gradient)


@pytest.mark.parametrize("chunk_size", (1, 3, 14, 100, None))
def test_chunked_loss_is_the_same_for_any_chunk_size(chunk_size):
    teacher, student = random_logits(2), random_logits(3)
    value, gradient = value_and_grad(
        lambda s: fused.chunked_distillation_loss(
            teacher, s, 2.0, chunk_size=chunk_size
        ),
        student,
    )
    expected = np_divergence("forward_kl", teacher, student, 2.0).mean()
    assert_close(value, expected)
    assert_close(
        gradient,
        np_forward_kl_gradient(teacher, student, 2.0, np.ones(TOKENS)),
    )


def test_chunked_loss_takes_per_sequence_weights_and_extreme_logits():
    teacher = random_logits(4, scale=1e3)
    student = random_logits(5, scale=1e3)
    weights = np.array([2.0, 0.5], "float32")
    value = fused.chunked_distillation_loss(
        teacher, student, 1.0, sample_weight=weights, chunk_size=4
    )
    expected = np_mean(
        np_divergence("forward_kl", teacher, student, 1.0),
        np.broadcast_to(weights[:, None], TOKENS),
    )
    assert math.isfinite(float(value))
    assert_close(value, expected)


def test_chunked_loss_of_all_padding_is_a_finite_zero_with_zero_gradient():
    teacher, student = random_logits(6), random_logits(7)
    value, gradient = value_and_grad(
        lambda s: fused.chunked_distillation_loss(
            teacher, s, 2.0, sample_weight=padding_mask(all_padding=True),
            chunk_size=3,
        ),
        student,
    )
    assert float(value) == 0.0
    np.testing.assert_array_equal(gradient, np.zeros_like(student))


# ---- fused_distillation_loss ----


def dense_reference(case, packed, teacher, temperature, alpha, mask, **kwargs):
    """The same loss from materialized logits, with `losses` / `sparse`."""
    logits = case.dense_student_logits(packed)
    cross_entropy = losses.weighted_reduce(
        keras.losses.sparse_categorical_crossentropy(
            case.labels, logits, from_logits=True
        ),
        mask,
    )
    if teacher == "top_k":
        divergence = losses.sparse_forward_kl(
            kwargs["log_probs"], kwargs["indices"], logits, temperature,
            tail=kwargs["tail"], sample_weight=mask, targets_temperature=1.0,
        )
    else:
        divergence = losses.DIVERGENCES[kwargs["divergence"]](
            kwargs["teacher_logits"], logits, temperature, sample_weight=mask
        )
    return alpha * cross_entropy + (1 - alpha) * divergence


FUSED_CASES = [
    # (teacher form, divergence, tail, temperature, student soft-cap)
    ("logits", "forward_kl", None, 2.0, 3.0),
    ("logits", "reverse_kl", None, 1.0, None),
    ("logits", "generalized_jsd", None, 0.5, 3.0),
    ("hidden_states", "forward_kl", None, 2.0, 3.0),
    ("top_k", "forward_kl", "renormalize", 2.0, 3.0),
    ("top_k", "forward_kl", "renormalize", 1.0, None),
    ("top_k", "forward_kl", "bucket", 1.0, 3.0),
]


@pytest.mark.parametrize(
    "teacher,divergence,tail,temperature,soft_cap", FUSED_CASES
)
def test_fused_loss_matches_the_dense_loss(
    teacher, divergence, tail, temperature, soft_cap
):
    case = LanguageModelCase(seed=1, soft_cap=soft_cap)
    mask = padding_mask()
    teacher_soft_cap = 4.0 if teacher == "hidden_states" else None
    teacher_logits = case.teacher_logits(teacher_soft_cap)
    fused_kwargs, reference_kwargs = {}, {"divergence": divergence}
    if teacher == "logits":
        fused_kwargs["teacher_logits"] = teacher_logits
    elif teacher == "hidden_states":
        fused_kwargs.update(
            teacher_hidden_states=case.teacher_hidden * 2.0,
            teacher_embedding=case.teacher_embedding,
            teacher_soft_cap=teacher_soft_cap,
        )
    else:
        # 4 of 13 entries, the last one padding (-inf at a repeated index).
        log_probs, indices = top_k.top_k_teacher_targets(teacher_logits, 4)
        log_probs = ops.convert_to_numpy(log_probs)
        indices = ops.convert_to_numpy(indices)
        log_probs[..., -1] = -np.inf
        indices[..., -1] = indices[..., 0]
        fused_kwargs.update(
            teacher_top_log_probs=log_probs,
            teacher_top_indices=indices,
            tail=tail,
        )
        reference_kwargs.update(log_probs=log_probs, indices=indices, tail=tail)
    reference_kwargs["teacher_logits"] = teacher_logits

    def fused_loss(packed):
        hidden, embedding = case.unpack(packed)
        return fused.fused_distillation_loss(
            hidden, embedding, case.labels, temperature=temperature,
            alpha=0.3, sample_weight=mask, soft_cap=soft_cap,
            divergence=divergence, chunk_size=3, vocabulary_chunk_size=5,
            **fused_kwargs,
        )["loss"]

    value, gradient = value_and_grad(fused_loss, case.packed())
    dense_value, dense_gradient = value_and_grad(
        lambda packed: dense_reference(
            case, packed, teacher, temperature, 0.3, mask, **reference_kwargs
        ),
        case.packed(),
    )
    assert_close(value, dense_value)
    assert_close(gradient, dense_gradient)


def test_fused_loss_terms_match_numpy():
    case = LanguageModelCase(seed=2, soft_cap=5.0)
    mask = padding_mask()
    teacher_logits = case.teacher_logits()
    result = fused.fused_distillation_loss(
        case.hidden, case.embedding, case.labels, teacher_logits=teacher_logits,
        temperature=2.0, alpha=0.25, sample_weight=mask, soft_cap=5.0,
        chunk_size=4, vocabulary_chunk_size=6,
    )
    logits = case.hidden.astype(np.float64) @ case.embedding.T
    logits = 5.0 * np.tanh(logits / 5.0)
    cross_entropy = np_mean(np_cross_entropy(case.labels, logits), mask)
    divergence = np_mean(
        np_divergence("forward_kl", teacher_logits, logits, 2.0), mask
    )
    assert_close(result["student_loss"], cross_entropy)
    assert_close(result["distillation_loss"], divergence)
    assert_close(result["loss"], 0.25 * cross_entropy + 0.75 * divergence)


def test_soft_cap_is_applied_to_the_student_logits():
    """Large logits, where the cap matters: only the capped reference matches."""
    case = LanguageModelCase(seed=3)
    case.hidden *= 10.0
    teacher_logits = case.teacher_logits()
    kwargs = dict(teacher_logits=teacher_logits, temperature=1.0, alpha=0.5)
    capped = fused.fused_distillation_loss(
        case.hidden, case.embedding, case.labels, soft_cap=2.0, **kwargs
    )["loss"]
    uncapped = fused.fused_distillation_loss(
        case.hidden, case.embedding, case.labels, **kwargs
    )["loss"]
    logits = 2.0 * np.tanh(case.hidden @ case.embedding.T / 2.0)
    expected = 0.5 * np_cross_entropy(case.labels, logits).mean() + 0.5 * (
        np_divergence("forward_kl", teacher_logits, logits, 1.0).mean()
    )
    assert_close(capped, expected)
    assert abs(float(uncapped) - expected) > 0.1 * expected


@pytest.mark.parametrize("teacher", ("logits", "top_k"))
def test_fused_loss_of_all_padding_is_a_finite_zero_with_zero_gradient(teacher):
    case = LanguageModelCase(seed=4)
    if teacher == "logits":
        targets = {"teacher_logits": case.teacher_logits()}
    else:
        log_probs, indices = top_k.top_k_teacher_targets(case.teacher_logits(), 3)
        targets = {
            "teacher_top_log_probs": log_probs,
            "teacher_top_indices": indices,
        }

    def fused_loss(packed):
        hidden, embedding = case.unpack(packed)
        return fused.fused_distillation_loss(
            hidden, embedding, case.labels, alpha=0.5, temperature=2.0,
            sample_weight=padding_mask(all_padding=True), chunk_size=3,
            vocabulary_chunk_size=5, **targets,
        )["loss"]

    value, gradient = value_and_grad(fused_loss, case.packed())
    assert float(value) == 0.0
    np.testing.assert_array_equal(gradient, np.zeros_like(case.packed()))


def test_alpha_zero_needs_no_labels_and_gives_the_divergence_alone():
    case = LanguageModelCase(seed=5)
    teacher_logits = case.teacher_logits()
    result = fused.fused_distillation_loss(
        case.hidden, case.embedding, teacher_logits=teacher_logits, alpha=0.0
    )
    expected = np_divergence(
        "forward_kl", teacher_logits, case.hidden @ case.embedding.T, 1.0
    ).mean()
    assert float(result["student_loss"]) == 0.0
    assert_close(result["loss"], expected)


# ---- inside Keras's train step ----


class TiedLanguageModel(keras.Model):
    """Embedding → Dense; logits through the transposed embedding (tied)."""

    def __init__(self, loss_kind, chunk_sizes=(5, 4), **kwargs):
        super().__init__(**kwargs)
        self.loss_kind = loss_kind
        self.chunk_sizes = chunk_sizes
        self.token_embedding = keras.layers.Embedding(CLASSES, HIDDEN)
        self.hidden_layer = keras.layers.Dense(HIDDEN, activation="tanh")

    def call(self, token_ids):
        return self.hidden_layer(self.token_embedding(token_ids))

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        embedding = self.token_embedding.embeddings
        teacher_logits = y["teacher_logits"]
        # The padding mask travels in `y`: Keras takes a per-token
        # `sample_weight` for a dict `y` as one per output.
        sample_weight = y["padding_mask"]
        if self.loss_kind == "fused":
            return fused.fused_distillation_loss(
                y_pred, embedding, y["labels"], teacher_logits=teacher_logits,
                temperature=2.0, alpha=0.3, sample_weight=sample_weight,
                soft_cap=4.0, chunk_size=self.chunk_sizes[0],
                vocabulary_chunk_size=self.chunk_sizes[1],
            )["loss"]
        logits = 4.0 * ops.tanh(ops.matmul(y_pred, ops.transpose(embedding)) / 4.0)
        if self.loss_kind == "chunked":
            divergence = fused.chunked_distillation_loss(
                teacher_logits, logits, 2.0, sample_weight=sample_weight,
                chunk_size=4,
            )
        else:
            divergence = losses.forward_kl(
                teacher_logits, logits, 2.0, sample_weight=sample_weight
            )
        cross_entropy = losses.weighted_reduce(
            keras.losses.sparse_categorical_crossentropy(
                y["labels"], logits, from_logits=True
            ),
            sample_weight,
        )
        return 0.3 * cross_entropy + 0.7 * divergence


def train_tied_model(loss_kind, jit_compile, batch_size=2, chunk_sizes=(5, 4)):
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, CLASSES, size=(6, 8)).astype("int32")
    y = {
        "labels": np.roll(token_ids, -1, axis=1),
        "teacher_logits": random_logits(8, shape=(6, 8, CLASSES)),
    }
    y["padding_mask"] = np.ones((6, 8), "float32")
    y["padding_mask"][1, 5:] = 0.0
    y["padding_mask"][4, 2:] = 0.0
    keras.utils.set_random_seed(0)
    model = TiedLanguageModel(loss_kind, chunk_sizes)
    model(token_ids[:1])
    model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=jit_compile)
    history = model.fit(
        token_ids, y, batch_size=batch_size, epochs=2, shuffle=False,
        verbose=0,
    )
    return model.get_weights(), history.history["loss"]


@pytest.mark.parametrize("loss_kind", ("fused", "chunked"))
def test_fit_with_the_memory_efficient_loss_gives_the_dense_weights(loss_kind):
    # 16 tokens per batch: chunks of 4 divide it, chunks of 5 do not.
    dense_weights, dense_losses = train_tied_model("dense", "auto")
    weights, train_losses = train_tied_model(loss_kind, "auto")
    assert dense_losses[1] < dense_losses[0]
    np.testing.assert_allclose(train_losses, dense_losses, rtol=1e-5)
    for actual, expected in zip(weights, dense_weights):
        assert_close(actual, expected)


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="torch.compile of Keras's train step takes ~45 s on 2 cores, most "
    "of it in graph breaks of Keras's own trainer, with or without this loss",
)
def test_fit_with_jit_compile():
    # XLA on JAX and TensorFlow (the TensorFlow backend's XLA-only branch).
    dense_weights, _ = train_tied_model("dense", "auto", batch_size=3)
    weights, _ = train_tied_model(
        "fused", True, batch_size=3, chunk_sizes=(16, 7)
    )
    for actual, expected in zip(weights, dense_weights):
        assert_close(actual, expected)


def test_out_of_range_labels_in_a_compiled_step_give_nan_and_no_update():
    """Compiled (JAX, TensorFlow) the ids cannot be checked before use: the
    loss is NaN and the update zero. Eager (PyTorch) they raise."""
    rng = np.random.default_rng(1)
    token_ids = rng.integers(0, CLASSES, size=(4, 8)).astype("int32")
    y = {
        "labels": np.full((4, 8), CLASSES + 2, "int32"),
        "teacher_logits": random_logits(9, shape=(4, 8, CLASSES)),
        "padding_mask": np.ones((4, 8), "float32"),
    }
    model = TiedLanguageModel("fused")
    model(token_ids[:1])
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    before = model.get_weights()
    try:
        history = model.fit(token_ids, y, batch_size=4, verbose=0)
    except ValueError as error:
        assert "`labels` must hold class ids in [0, 13)" in str(error)
    else:
        assert math.isnan(history.history["loss"][0])
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


# ---- bad input ----


def fused_arguments(**overrides):
    case = LanguageModelCase(seed=6)
    arguments = dict(
        student_hidden_states=case.hidden,
        student_embedding=case.embedding,
        labels=case.labels,
        teacher_logits=case.teacher_logits(),
    )
    arguments.update(overrides)
    return arguments


BAD_FUSED_ARGUMENTS = [
    ({"chunk_size": 0}, ValueError, "`chunk_size` must be a Python int >= 1"),
    ({"chunk_size": -2}, ValueError, "`chunk_size` must be a Python int >= 1"),
    ({"chunk_size": 2.5}, TypeError, "`chunk_size` must be a Python int >= 1"),
    ({"vocabulary_chunk_size": 0}, ValueError, "`vocabulary_chunk_size`"),
    (
        {"student_embedding": np.zeros((CLASSES, HIDDEN + 1), "float32")},
        ValueError,
        r"`student_embedding` must be the output embedding, shape `\(vocabulary_size, 5\)`",
    ),
    (
        {"student_embedding": np.zeros((HIDDEN, CLASSES), "float32")},
        ValueError,
        "pass `keras.ops.transpose",
    ),
    (
        {"teacher_logits": np.zeros(TOKENS + (CLASSES + 3,), "float32")},
        ValueError,
        "`teacher_logits` has 16 classes but `student_embedding` has 13 rows",
    ),
    (
        {"teacher_logits": np.zeros((2, 6, CLASSES), "float32")},
        ValueError,
        r"`teacher_logits` must have shape \(2, 7, 13\)",
    ),
    ({"labels": np.zeros((2, 6), "int32")}, ValueError, "`labels` must have shape"),
    (
        {"labels": np.zeros(TOKENS, "float32")},
        TypeError,
        "`labels` must be an integer tensor",
    ),
    (
        {"labels": np.full(TOKENS, CLASSES, "int32")},
        ValueError,
        r"`labels` must hold class ids in \[0, 13\).*from 13 to 13",
    ),
    (
        {"labels": np.full(TOKENS, -100, "int32")},
        ValueError,
        "Mask positions with `sample_weight`",
    ),
    ({"labels": None}, ValueError, "alpha=0.1 weights a cross-entropy"),
    ({"teacher_logits": None}, ValueError, "exactly one form.*none"),
    (
        {"teacher_hidden_states": np.zeros(TOKENS + (4,), "float32")},
        ValueError,
        r"exactly one form.*\['logits', 'hidden_states'\]",
    ),
    ({"temperature": 0.0}, ValueError, "`temperature`"),
    ({"alpha": 1.5}, ValueError, "`alpha`"),
    ({"soft_cap": -1.0}, ValueError, "`soft_cap`"),
    ({"divergence": "kl"}, ValueError, "`divergence` must be one of"),
    ({"tail": "drop"}, ValueError, "`tail` must be one of"),
    (
        {"sample_weight": np.ones((3, 7), "float32")},
        ValueError,
        "`sample_weight` of shape",
    ),
]


@pytest.mark.parametrize("overrides,error,match", BAD_FUSED_ARGUMENTS)
def test_bad_fused_arguments_fail_early_and_name_the_argument(
    overrides, error, match
):
    with pytest.raises(error, match=match):
        fused.fused_distillation_loss(**fused_arguments(**overrides))


def top_k_arguments(k=3, **overrides):
    case = LanguageModelCase(seed=7)
    log_probs, indices = top_k.top_k_teacher_targets(case.teacher_logits(), k)
    arguments = fused_arguments(
        teacher_logits=None,
        teacher_top_log_probs=ops.convert_to_numpy(log_probs),
        teacher_top_indices=ops.convert_to_numpy(indices),
    )
    arguments.update(overrides)
    return arguments


def test_top_k_indices_out_of_range_are_refused():
    arguments = top_k_arguments()
    indices = arguments["teacher_top_indices"].copy()
    indices[1, 3, 2] = CLASSES + 4
    arguments["teacher_top_indices"] = indices
    with pytest.raises(
        ValueError, match=r"`teacher_top_indices` must hold class ids in \[0, 13\)"
    ):
        fused.fused_distillation_loss(**arguments)
    indices[1, 3, 2] = -1
    with pytest.raises(ValueError, match="from -1 to"):
        fused.fused_distillation_loss(**arguments)


BAD_TOP_K_ARGUMENTS = [
    ({"divergence": "reverse_kl"}, "support divergence='forward_kl' only"),
    ({"tail": "bucket", "temperature": 2.0}, 'tail="bucket" needs'),
    ({"teacher_top_indices": None}, "need both"),
    (
        {"teacher_top_indices": np.zeros(TOKENS + (2,), "int32")},
        r"`teacher_top_indices` must have shape \(2, 7, 3\)",
    ),
]


@pytest.mark.parametrize("overrides,match", BAD_TOP_K_ARGUMENTS)
def test_bad_top_k_arguments_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        fused.fused_distillation_loss(**top_k_arguments(**overrides))


def test_more_top_k_entries_than_classes_are_refused():
    arguments = top_k_arguments()
    arguments["teacher_top_log_probs"] = np.zeros(TOKENS + (CLASSES + 1,), "float32")
    arguments["teacher_top_indices"] = np.zeros(TOKENS + (CLASSES + 1,), "int32")
    with pytest.raises(ValueError, match="k=14 entries per token"):
        fused.fused_distillation_loss(**arguments)


def test_fused_teacher_embedding_must_match_the_vocabulary():
    case = LanguageModelCase(seed=8)
    with pytest.raises(ValueError, match="`teacher_embedding` must have shape"):
        fused.fused_distillation_loss(
            **fused_arguments(
                teacher_logits=None,
                teacher_hidden_states=case.teacher_hidden,
                teacher_embedding=case.teacher_embedding[:-1],
            )
        )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be a Python int >= 1"),
        ({"chunk_size": "8"}, TypeError, "`chunk_size` must be a Python int >= 1"),
        ({"divergence": "jsd"}, ValueError, "`divergence` must be one of"),
        (
            {"divergence": "forward_kl", "beta": 0.5},
            TypeError,
            "forward_kl takes no argument 'beta'",
        ),
        (
            {"divergence": "generalized_jsd", "beta": 2.0},
            ValueError,
            "`beta` must be in",
        ),
        ({"temperature": -1.0}, ValueError, "`temperature`"),
    ],
)
def test_bad_chunked_arguments_fail_early(kwargs, error, match):
    teacher, student = random_logits(9), random_logits(10)
    kwargs = {"temperature": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        fused.chunked_distillation_loss(teacher, student, **kwargs)


def test_chunked_loss_refuses_logits_of_different_shapes():
    with pytest.raises(ValueError, match="must have the same shape"):
        fused.chunked_distillation_loss(
            random_logits(11), random_logits(12, shape=(2, 7, CLASSES + 1))
        )
