"""Sparse (top-k) teacher targets against float64 NumPy references."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_distill import losses
from keras_distill.targets import top_k
from tests.conftest import value_and_grad

TEMPERATURES = (0.5, 1.0, 10.0)
TAILS = ("renormalize", "bucket")


# ---- NumPy references (float64, written independently of sparse.py) ----


def np_log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_logsumexp(x, axis=-1):
    x = np.asarray(x, np.float64)
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(
            peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True)), axis
        )


def np_xlogy_terms(log_p, log_q):
    """`p · (log p - log q)` with `0 · log 0 = 0`."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (log_p - log_q), 0.0)


def np_sparse_kl(teacher_logits, indices, student_logits, temperature, tail):
    """Per-position sparse KL from the *full* teacher logits, float64.

    The uncovered masses are summed over the complement of `indices` directly
    (not as `1 - covered`), an independent route from the implementation's.
    """
    log_p = np_log_softmax(teacher_logits, temperature)
    log_q = np_log_softmax(student_logits, temperature)
    log_p_k = np.take_along_axis(log_p, indices, axis=-1)
    log_q_k = np.take_along_axis(log_q, indices, axis=-1)
    if tail == "renormalize":
        log_p_tilde = log_p_k - np_logsumexp(log_p_k)[..., None]
        value = np_xlogy_terms(log_p_tilde, log_q_k).sum(axis=-1)
    else:
        covered = np.zeros(log_p.shape, bool)
        np.put_along_axis(covered, indices, True, axis=-1)
        tail_p = np_logsumexp(np.where(covered, -np.inf, log_p))
        tail_q = np_logsumexp(np.where(covered, -np.inf, log_q))
        value = np_xlogy_terms(log_p_k, log_q_k).sum(axis=-1)
        value = value + np.where(
            covered.all(axis=-1), 0.0, np_xlogy_terms(tail_p, tail_q)
        )
    return temperature**2 * value


def np_dense_kl(teacher_logits, student_logits, temperature):
    log_p = np_log_softmax(teacher_logits, temperature)
    log_q = np_log_softmax(student_logits, temperature)
    return temperature**2 * np_xlogy_terms(log_p, log_q).sum(axis=-1)


# Most tests share one shape, so JAX's eager mode compiles each op once.
SHAPE = (4, 3, 8)


def random_logits(seed, shape=SHAPE, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype("float32"), (
        rng.normal(size=shape) * scale
    ).astype("float32")


def to_numpy(x):
    return ops.convert_to_numpy(x)


def lm_like_logits(vocabulary=1000, positions=64, width=32, seed=0):
    """Teacher and student logits shaped like a language model's.

    A fixed random projection of random hidden states plus a Zipf unigram
    prior: entropy ~3.2 nats, top-1 probability ~0.3, the top 64 tokens
    cover ~92% of the mass. The student is a noisier, flatter copy.
    """
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(positions, width))
    projection = rng.normal(size=(width, vocabulary)) / np.sqrt(width)
    zipf = -np.log(np.arange(1, vocabulary + 1))
    teacher = 3.0 * hidden @ projection + zipf
    noisy = projection + 0.5 * rng.normal(size=projection.shape) / np.sqrt(width)
    student = 2.0 * hidden @ noisy + 0.8 * zipf
    return teacher.astype("float32"), student.astype("float32")


def pad_targets(log_probs, indices, k):
    """Keeps the first k entries; the rest become padding.

    Padding is a `-inf` log-probability at an index already kept (the first),
    so it adds no class to the bucket's covered set.
    """
    log_probs, indices = to_numpy(log_probs), to_numpy(indices)
    padded = np.arange(log_probs.shape[-1]) >= k
    log_probs = np.where(padded, -np.inf, log_probs).astype("float32")
    indices = np.where(padded, indices[..., :1], indices).astype("int32")
    return log_probs, indices


# ---- Extracting targets ----


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_top_k_targets_are_the_largest_log_probs(temperature):
    teacher, _ = random_logits(0)
    log_probs, indices = top_k.top_k_teacher_targets(teacher, 3, temperature)
    assert keras.backend.standardize_dtype(log_probs.dtype) == "float32"
    assert keras.backend.standardize_dtype(indices.dtype) == "int32"
    assert tuple(indices.shape) == (4, 3, 3)
    reference = np_log_softmax(teacher, temperature)
    expected_indices = np.argsort(-reference, axis=-1, kind="stable")[..., :3]
    np.testing.assert_array_equal(to_numpy(indices), expected_indices)
    np.testing.assert_allclose(
        to_numpy(log_probs),
        np.take_along_axis(reference, expected_indices, axis=-1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_top_k_targets_of_extreme_logits_are_exact():
    teacher = np.array([[1e4, -1e4, 0.0, 5.0], [-1e4, 3.0, 1e4, 2.0]], "float32")
    log_probs, indices = top_k.top_k_teacher_targets(teacher, 3, 0.5)
    np.testing.assert_array_equal(to_numpy(indices), [[0, 3, 2], [2, 1, 3]])
    expected = np.take_along_axis(
        np_log_softmax(teacher, 0.5), to_numpy(indices), axis=-1
    )
    assert np.all(np.isfinite(to_numpy(log_probs)))
    np.testing.assert_allclose(to_numpy(log_probs), expected, rtol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_sampled_targets_are_distinct_teacher_entries(temperature):
    teacher, _ = random_logits(1)
    log_probs, indices = top_k.sampled_teacher_targets(
        teacher, 3, seed=3, temperature=temperature
    )
    assert keras.backend.standardize_dtype(indices.dtype) == "int32"
    indices = to_numpy(indices)
    assert indices.shape == (4, 3, 3)
    assert indices.min() >= 0 and indices.max() < 8
    flat = indices.reshape(-1, 3)
    assert all(len(set(row)) == 3 for row in flat.tolist())
    expected = np.take_along_axis(
        np_log_softmax(teacher, temperature), indices, axis=-1
    )
    np.testing.assert_allclose(
        to_numpy(log_probs), expected, rtol=1e-5, atol=1e-6
    )
    # k = V draws every entry once: a permutation of the vocabulary.
    _, everything = top_k.sampled_teacher_targets(teacher, 8, seed=4)
    np.testing.assert_array_equal(
        np.sort(to_numpy(everything), axis=-1),
        np.broadcast_to(np.arange(8), SHAPE),
    )


def test_sampled_targets_are_deterministic_for_a_seed():
    teacher, _ = random_logits(2)

    def draw(seed):
        return to_numpy(top_k.sampled_teacher_targets(teacher, 3, seed)[1])

    np.testing.assert_array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))
    # A SeedGenerator replays from its seed and advances between calls.
    first = keras.random.SeedGenerator(11)
    again = keras.random.SeedGenerator(11)
    step_one, step_two = draw(first), draw(first)
    np.testing.assert_array_equal(step_one, draw(again))
    assert not np.array_equal(step_one, step_two)


def test_sampled_targets_follow_the_teacher_distribution():
    # A Zipf teacher over 8 tokens at every position, drawn 334 times:
    # 4008 independent draws of 3 tokens.
    probs = 1.0 / np.arange(1, 9)
    probs /= probs.sum()
    teacher = np.broadcast_to(np.log(probs), SHAPE).astype("float32")

    def draws(temperature):
        seed = keras.random.SeedGenerator(0)
        batches = [
            top_k.sampled_teacher_targets(teacher, 3, seed, temperature)[1]
            for _ in range(334)
        ]
        return np.concatenate([to_numpy(b).reshape(-1, 3) for b in batches])

    kept = draws(1.0)
    total = len(kept)
    # The first draw is a categorical sample: frequencies match p within
    # 5 sigma.
    counts = np.bincount(kept[:, 0], minlength=8)
    sigma = np.sqrt(total * probs * (1 - probs))
    assert np.all(np.abs(counts - total * probs) < 5 * sigma)

    # Without replacement, more probable tokens are kept more often.
    inclusion = np.bincount(kept.ravel(), minlength=8)
    assert inclusion.sum() == 3 * total
    assert inclusion[0] > inclusion[2] > inclusion[4] > inclusion[7]

    # A higher temperature flattens the draws.
    hot = draws(10.0)
    assert np.sum(hot[:, 0] == 0) < 0.6 * counts[0]


# ---- The sparse forward KL ----


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_forward_kl_matches_numpy_reference(tail, temperature):
    teacher, student = random_logits(3)
    for extract in ("top_k", "sampled"):
        if extract == "top_k":
            targets = top_k.top_k_teacher_targets(teacher, 3, temperature)
        else:
            targets = top_k.sampled_teacher_targets(teacher, 3, 5, temperature)
        expected = np_sparse_kl(
            teacher, to_numpy(targets[1]), student, temperature, tail
        )
        per_position = losses.sparse_forward_kl(
            *targets, student, temperature, tail=tail, reduction="none"
        )
        assert keras.backend.standardize_dtype(per_position.dtype) == "float32"
        assert tuple(per_position.shape) == SHAPE[:-1]
        np.testing.assert_allclose(
            to_numpy(per_position),
            expected,
            rtol=2e-5,
            atol=1e-6 * temperature**2,
        )
        mean = losses.sparse_forward_kl(*targets, student, temperature, tail=tail)
        np.testing.assert_allclose(float(mean), expected.mean(), rtol=2e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", TAILS)
def test_k_equal_to_vocabulary_is_dense_forward_kl(tail, temperature):
    teacher, student = random_logits(4)
    dense, dense_grad = value_and_grad(
        lambda s: losses.forward_kl(teacher, s, temperature, reduction="sum"),
        student,
    )
    # Sampling k = V entries gives them in a random order: same result.
    for targets in (
        top_k.top_k_teacher_targets(teacher, 8, temperature),
        top_k.sampled_teacher_targets(teacher, 8, 6, temperature),
    ):
        value, grad = value_and_grad(
            lambda s: losses.sparse_forward_kl(
                *targets, s, temperature, tail=tail, reduction="sum"
            ),
            student,
        )
        np.testing.assert_allclose(value, dense, rtol=1e-5)
        # The gradient T·(q - p) cancels to ~1e-8 at some entries, so the
        # absolute floor is float32 rounding of q and p, times T.
        np.testing.assert_allclose(
            grad, dense_grad, rtol=1e-5, atol=2e-7 * temperature
        )


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", TAILS)
def test_extreme_logits_are_exact_and_finite(tail, temperature):
    rng = np.random.default_rng(13)
    values = np.array([-1e4, -5.0, 0.0, 5.0, 1e4], "float32")
    teacher = rng.choice(values, SHAPE)
    student = rng.choice(values, SHAPE)
    teacher[0, 0, :4] = [1e4, -1e4, 0.0, 5.0]
    student[0, 0, :4] = [-1e4, 1e4, 0.0, 5.0]
    # A moderate teacher and a student whose mass outside the teacher's top 3
    # underflows to exactly 0 in float32: `log(1 - Σ q_k)` would be -inf and
    # the bucket loss infinite; the exact value is large and finite.
    teacher[3, 2] = [2.0, 1.0, 0.5, -1.0, -2.0, -3.0, -4.0, -5.0]
    student[3, 2] = [1e4, 1e4, 1e4, -1e4, -1e4, -1e4, 0.0, -1e4]
    for k in (3, 8):
        targets = top_k.top_k_teacher_targets(teacher, k, temperature)
        value = to_numpy(
            losses.sparse_forward_kl(
                *targets, student, temperature, tail=tail, reduction="none"
            )
        )
        expected = np_sparse_kl(
            teacher, to_numpy(targets[1]), student, temperature, tail
        )
        assert np.all(np.isfinite(value))
        np.testing.assert_allclose(
            value, expected, rtol=1e-5, atol=1e-6 * temperature**2
        )
        _, grad = value_and_grad(
            lambda s: losses.sparse_forward_kl(
                *targets, s, temperature, tail=tail, reduction="sum"
            ),
            student,
        )
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("tail", TAILS)
def test_classes_the_teacher_rules_out_are_exact(tail):
    # A -inf teacher logit gives a -inf log-probability: 0 · log 0 = 0.
    teacher, student = random_logits(5)
    teacher[..., 4] = -np.inf
    targets = top_k.top_k_teacher_targets(teacher, 8, 2.0)
    value, grad = value_and_grad(
        lambda s: losses.sparse_forward_kl(
            *targets, s, 2.0, tail=tail, reduction="sum"
        ),
        student,
    )
    expected = np_dense_kl(teacher, student, 2.0)
    np.testing.assert_allclose(value, expected.sum(), rtol=1e-5)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("tail", TAILS)
def test_padding_entries_change_nothing(tail):
    teacher, student = random_logits(14)
    top_8 = top_k.top_k_teacher_targets(teacher, 8, 2.0)
    log_probs, indices = pad_targets(*top_8, k=3)
    # One position is padding only, and masked out: finite, no NaN gradient.
    log_probs[0, 0] = -np.inf
    mask = np.ones(SHAPE[:-1], "float32")
    mask[0, 0] = 0.0
    value, grad = value_and_grad(
        lambda s: losses.sparse_forward_kl(
            log_probs, indices, s, 2.0, tail=tail, sample_weight=mask,
            reduction="sum",
        ),
        student,
    )
    expected = np_sparse_kl(
        teacher, to_numpy(top_8[1])[..., :3], student, 2.0, tail
    )
    np.testing.assert_allclose(value, (expected * mask).sum(), rtol=1e-5)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[0, 0] == 0.0)


@pytest.mark.parametrize("temperature", (0.5, 10.0))
def test_targets_stored_at_another_temperature_renormalize_exactly(temperature):
    teacher, student = random_logits(6)
    stored = top_k.top_k_teacher_targets(teacher, 3)  # at T = 1
    fresh = top_k.top_k_teacher_targets(teacher, 3, temperature)
    resoftened = losses.sparse_forward_kl(
        *stored, student, temperature, reduction="none", targets_temperature=1.0
    )
    expected = np_sparse_kl(
        teacher, to_numpy(stored[1]), student, temperature, "renormalize"
    )
    np.testing.assert_allclose(to_numpy(resoftened), expected, rtol=2e-5)
    direct = losses.sparse_forward_kl(
        *fresh, student, temperature, reduction="none"
    )
    np.testing.assert_allclose(to_numpy(resoftened), to_numpy(direct), rtol=2e-5)
    # The bucket needs the uncovered mass at T: it accepts matching targets
    # and refuses to guess from targets stored at another temperature.
    losses.sparse_forward_kl(
        *fresh, student, temperature, tail="bucket",
        targets_temperature=temperature,
    )
    with pytest.raises(ValueError, match="targets_temperature=1.0"):
        losses.sparse_forward_kl(
            *stored, student, temperature, tail="bucket",
            targets_temperature=1.0,
        )


@pytest.mark.parametrize("tail", TAILS)
def test_sample_weight_is_a_normalized_weighted_mean(tail):
    teacher, student = random_logits(7)
    targets = top_k.top_k_teacher_targets(teacher, 3, 2.0)
    per_token = np_sparse_kl(teacher, to_numpy(targets[1]), student, 2.0, tail)
    weights = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [2, 1, 1]], "float32")
    value = losses.sparse_forward_kl(
        *targets, student, 2.0, tail=tail, sample_weight=weights
    )
    np.testing.assert_allclose(
        float(value), (per_token * weights).sum() / weights.sum(), rtol=2e-5
    )
    summed = losses.sparse_forward_kl(
        *targets, student, 2.0, tail=tail, sample_weight=weights,
        reduction="sum",
    )
    np.testing.assert_allclose(
        float(summed), (per_token * weights).sum(), rtol=2e-5
    )
    # Per-example weights broadcast over the token axis.
    example_weights = np.array([1, 0, 1, 1], "float32")
    value = losses.sparse_forward_kl(
        *targets, student, 2.0, tail=tail, sample_weight=example_weights
    )
    np.testing.assert_allclose(
        float(value), per_token[example_weights > 0].mean(), rtol=2e-5
    )


@pytest.mark.parametrize("tail", TAILS)
def test_empty_mask_gives_finite_zero_and_zero_gradient(tail):
    teacher, student = random_logits(8)
    targets = top_k.top_k_teacher_targets(teacher, 3, 2.0)
    mask = np.zeros(SHAPE[:-1], "float32")
    value, grad = value_and_grad(
        lambda s: losses.sparse_forward_kl(
            *targets, s, 2.0, tail=tail, sample_weight=mask
        ),
        student,
    )
    assert float(value) == 0.0
    assert np.all(grad == 0.0)


def test_error_against_dense_shrinks_as_k_grows():
    # Synthetic LM-like teacher over V = 1000 tokens (see `lm_like_logits`).
    teacher, student = lm_like_logits()
    dense = float(losses.forward_kl(teacher, student))
    top_log_probs, top_indices = top_k.top_k_teacher_targets(teacher, 256)
    errors = {}
    for tail in TAILS:
        values = []
        for k in (8, 64, 256):
            # The top k of the top 256, padded to 256 entries (one compiled
            # shape): see `test_padding_entries_change_nothing`.
            targets = pad_targets(top_log_probs, top_indices, k)
            values.append(
                float(losses.sparse_forward_kl(*targets, student, tail=tail))
            )
        errors[tail] = [abs(v - dense) / dense for v in values]
        if tail == "bucket":
            # Coarse-graining never increases a KL: lower bounds, tightening.
            assert values[0] < values[1] < values[2] <= dense * (1 + 1e-6)
    for tail, error in errors.items():
        assert error[0] > error[1] > error[2], (tail, error)
    # Measured: renormalize 1.10, 0.27, 0.045; bucket 0.29, 0.058, 0.0074.
    assert errors["renormalize"][2] < 0.1
    assert errors["bucket"][2] < 0.02


# ---- Bad arguments ----


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"k": 9}, ValueError, r"k=9 for `teacher_logits` with 8 classes"),
        ({"k": 0}, ValueError, "`k` must be a Python int >= 1"),
        ({"k": 2.0}, TypeError, "`k` must be a Python int >= 1"),
        ({"k": True}, TypeError, "`k` must be a Python int >= 1"),
        ({"k": 2, "temperature": 0.0}, ValueError, "temperature"),
        ({"k": 2, "temperature": -1.0}, ValueError, "temperature"),
        ({"k": 2, "temperature": "hot"}, TypeError, "temperature"),
    ],
)
def test_bad_extraction_arguments_are_named(kwargs, error, match):
    teacher, _ = random_logits(9)
    with pytest.raises(error, match=match):
        top_k.top_k_teacher_targets(teacher, **kwargs)
    with pytest.raises(error, match=match):
        top_k.sampled_teacher_targets(teacher, seed=0, **kwargs)


@pytest.mark.parametrize("seed", [None, "0", 1.5, True])
def test_bad_seed_is_named(seed):
    teacher, _ = random_logits(9)
    with pytest.raises(TypeError, match="`seed` must be"):
        top_k.sampled_teacher_targets(teacher, 2, seed)


def _bad_loss_call(case):
    teacher, student = random_logits(10)
    log_probs, indices = top_k.top_k_teacher_targets(teacher, 3)
    log_probs, indices = to_numpy(log_probs), to_numpy(indices)
    if case == "shape_mismatch":
        return losses.sparse_forward_kl(log_probs[..., :2], indices, student)
    if case == "float_indices":
        return losses.sparse_forward_kl(
            log_probs, indices.astype("float32"), student
        )
    if case == "positions":
        return losses.sparse_forward_kl(log_probs, indices, student[:, :2])
    if case == "k_above_vocabulary":
        return losses.sparse_forward_kl(
            np.zeros((4, 3, 9), "float32"), np.zeros((4, 3, 9), "int32"),
            student,
        )
    arguments = {
        "tail": {"tail": "drop"},
        "reduction": {"reduction": "max"},
        "temperature": {"temperature": 0.0},
        "targets_temperature": {"targets_temperature": -2.0},
    }[case]
    return losses.sparse_forward_kl(log_probs, indices, student, **arguments)


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("shape_mismatch", ValueError, "`teacher_top_indices` must have the"),
        ("float_indices", TypeError, "`teacher_top_indices` must be an integer"),
        ("positions", ValueError, "`student_logits`"),
        ("k_above_vocabulary", ValueError, "k=9 .* only 8 classes"),
        ("tail", ValueError, "`tail` must be one of"),
        ("reduction", ValueError, "`reduction` must be one of"),
        ("temperature", ValueError, "`temperature`"),
        ("targets_temperature", ValueError, "`targets_temperature`"),
    ],
)
def test_bad_loss_arguments_are_named(case, error, match):
    with pytest.raises(error, match=match):
        _bad_loss_call(case)


# ---- Packing and the Keras loss ----


def test_pack_and_unpack_round_trip_large_indices():
    log_probs = np.array([[-0.1, -2.5, -7.0]], "float32")
    indices = np.array([[262_143, 0, 16_777_215]], "int32")
    packed = top_k.pack_sparse_targets(log_probs, indices)
    assert tuple(packed.shape) == (1, 6)
    unpacked_log_probs, unpacked_indices = top_k.unpack_sparse_targets(packed)
    np.testing.assert_array_equal(to_numpy(unpacked_log_probs), log_probs)
    np.testing.assert_array_equal(to_numpy(unpacked_indices), indices)
    with pytest.raises(ValueError, match="even"):
        top_k.unpack_sparse_targets(np.zeros((2, 5), "float32"))
    with pytest.raises(TypeError, match="float32"):
        top_k.unpack_sparse_targets(np.zeros((2, 4), "int32"))


@pytest.mark.parametrize("tail", TAILS)
def test_loss_object_matches_function_and_round_trips(tail):
    teacher, student = random_logits(11)
    targets = top_k.top_k_teacher_targets(teacher, 3, 2.0)
    # Non-uniform, with a padded position and a padded sequence.
    weights = np.array(
        [[1, 0.5, 0], [3, 0, 0], [0, 0, 0], [2, 1, 1]], "float32"
    )
    loss = losses.SparseForwardKL(temperature=2.0, tail=tail)
    # The functions' rule: sum(w · d) / sum(w), not Keras's
    # "sum_over_batch_size" (sum(w · d) / number of positions).
    per_position = np_sparse_kl(teacher, to_numpy(targets[1]), student, 2.0, tail)
    expected = (per_position * weights).sum() / weights.sum()
    function_value = losses.sparse_forward_kl(
        *targets, student, 2.0, tail=tail, sample_weight=weights
    )
    packed = top_k.pack_sparse_targets(*targets)
    as_dict = {"top_log_probs": targets[0], "top_indices": targets[1]}
    for y_true in (packed, as_dict):
        value = float(loss(y_true, student, sample_weight=weights))
        np.testing.assert_allclose(value, expected, rtol=2e-5)
        np.testing.assert_allclose(value, float(function_value), rtol=1e-6)
    # All weights zero: a finite 0 with a zero gradient, as the function.
    value, grad = value_and_grad(
        lambda s: loss(packed, s, sample_weight=np.zeros(SHAPE[:-1], "float32")),
        student,
    )
    assert float(value) == 0.0
    assert np.all(grad == 0.0)
    summed = losses.SparseForwardKL(temperature=2.0, tail=tail, reduction="sum")
    np.testing.assert_allclose(
        float(summed(packed, student, sample_weight=weights)),
        (per_position * weights).sum(),
        rtol=2e-5,
    )
    config = loss.get_config()
    assert config["tail"] == tail and config["temperature"] == 2.0
    assert config["reduction"] == "mean"
    restored = losses.SparseForwardKL.from_config(config)
    assert restored.get_config() == config
    # What `serialize_keras_object` writes for a registered class (built by
    # hand: its first call spends seconds importing optional modules).
    name = keras.saving.get_registered_name(losses.SparseForwardKL)
    assert name == "keras_distill>SparseForwardKL"
    revived = keras.saving.deserialize_keras_object(
        {
            "module": "keras_distill.losses.sparse",
            "class_name": "SparseForwardKL",
            "config": config,
            "registered_name": name,
        }
    )
    assert type(revived) is losses.SparseForwardKL
    assert revived.get_config() == config
    np.testing.assert_allclose(
        float(revived(packed, student)), per_position.mean(), rtol=2e-5
    )


def test_bad_loss_object_arguments_are_named():
    with pytest.raises(ValueError, match="`tail`"):
        losses.SparseForwardKL(tail="drop")
    with pytest.raises(ValueError, match="`temperature`"):
        losses.SparseForwardKL(temperature=0.0)
    with pytest.raises(ValueError, match="`targets_temperature`"):
        losses.SparseForwardKL(targets_temperature=0.0)
    with pytest.raises(ValueError, match="float32"):
        losses.SparseForwardKL(dtype="float16")
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        losses.SparseForwardKL(reduction="sum_over_batch_size")
    with pytest.raises(ValueError, match='"top_log_probs" and "top_indices"'):
        losses.SparseForwardKL()(
            {"log_probs": np.zeros((1, 2))}, np.zeros((1, 4))
        )


def test_loss_object_trains_a_keras_model_on_sparse_targets():
    # The bucket tail: its class mask is a scatter inside the compiled step.
    teacher, _ = random_logits(12, shape=(32, 16))
    targets = top_k.top_k_teacher_targets(teacher, 4)
    y = to_numpy(top_k.pack_sparse_targets(*targets))
    features = np.eye(32, dtype="float32")
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(16)])
    model.compile(
        optimizer=keras.optimizers.Adam(0.1),
        loss=losses.SparseForwardKL(tail="bucket"),
    )
    before = model.evaluate(features, y, verbose=0)
    model.fit(features, y, batch_size=16, epochs=25, verbose=0)
    after = model.evaluate(features, y, verbose=0)
    assert after < 0.05 * before
    # The student's most likely class is the teacher's.
    predicted = to_numpy(model.predict(features, verbose=0))
    np.testing.assert_array_equal(
        predicted.argmax(axis=-1), to_numpy(targets[1])[:, 0]
    )
