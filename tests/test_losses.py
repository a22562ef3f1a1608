"""Each divergence against a float64 NumPy reference, on the active backend."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_distill import checks
from keras_distill import losses
from tests.conftest import value_and_grad

TEMPERATURES = (0.5, 1.0, 10.0)


# ---- NumPy references (float64, written independently of losses.py) ----


def np_log_softmax(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def np_mixture(log_p, log_q, weight):
    return np.logaddexp(log_p + np.log(weight), log_q + np.log1p(-weight))


def np_divergence(name, teacher, student, temperature, **kwargs):
    log_p = np_log_softmax(teacher, temperature)
    log_q = np_log_softmax(student, temperature)
    if name == "forward_kl":
        value = np_kl(log_p, log_q)
    elif name == "reverse_kl":
        value = np_kl(log_q, log_p)
    elif name == "total_variation":
        value = 0.5 * np.abs(np.exp(log_p) - np.exp(log_q)).sum(axis=-1)
    elif name == "skew_kl":
        value = np_kl(log_p, np_mixture(log_p, log_q, kwargs["skew"]))
    elif name == "generalized_jsd":
        beta = kwargs["beta"]
        log_m = np_mixture(log_p, log_q, beta)
        value = (
            beta * np_kl(log_p, log_m) + (1 - beta) * np_kl(log_q, log_m)
        ) / (beta * (1 - beta))
    return temperature**2 * value


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("total_variation", {}),
    ("skew_kl", {"skew": 0.1}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.1}),
]


def random_logits(seed, shape=(6, 7), scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype("float32"), (
        rng.normal(size=shape) * scale
    ).astype("float32")


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,kwargs", CASES)
def test_matches_numpy_reference(name, kwargs, temperature):
    teacher, student = random_logits(0)
    fn = losses.DIVERGENCES[name]
    per_position = fn(teacher, student, temperature, reduction="none", **kwargs)
    expected = np_divergence(name, teacher, student, temperature, **kwargs)
    assert keras.backend.standardize_dtype(per_position.dtype) == "float32"
    # float32 cancellation in sum(p * (log p - log q)) is ~1e-7 absolute
    # before the T² factor.
    np.testing.assert_allclose(
        ops.convert_to_numpy(per_position),
        expected,
        rtol=2e-5,
        atol=1e-6 * temperature**2,
    )
    mean = fn(teacher, student, temperature, **kwargs)
    np.testing.assert_allclose(float(mean), expected.mean(), rtol=2e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,kwargs", CASES)
def test_extreme_logits_are_exact_and_finite(name, kwargs, temperature):
    # ±1e4 logits: probabilities underflow to exactly 0 in float32, which a
    # log(softmax) or clipped implementation turns into NaN or a biased value.
    teacher = np.array(
        [[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, 1e4, 1e4]], "float32"
    )
    student = np.array(
        [[-1e4, 1e4, 0.0, 5.0], [1e4, -1e4, 1e4, -1e4]], "float32"
    )
    fn = losses.DIVERGENCES[name]
    value = ops.convert_to_numpy(
        fn(teacher, student, temperature, reduction="none", **kwargs)
    )
    expected = np_divergence(name, teacher, student, temperature, **kwargs)
    assert np.all(np.isfinite(value))
    np.testing.assert_allclose(value, expected, rtol=1e-5)

    _, grad = value_and_grad(
        lambda s: fn(teacher, s, temperature, reduction="sum", **kwargs),
        student,
    )
    assert np.all(np.isfinite(grad))


def np_divergence_ruling_out(name, teacher, student, temperature, **kwargs):
    """`np_divergence` where the teacher has probability-0 classes (`0 · log 0 = 0`)."""
    log_p = np_log_softmax(teacher, temperature)
    log_q = np_log_softmax(student, temperature)
    p, q = np.exp(log_p), np.exp(log_q)

    def kl_from_p(log_r):
        kept = p > 0
        return np.where(kept, p * (np.where(kept, log_p, 0.0) - log_r), 0.0).sum(-1)

    if name == "forward_kl":
        value = kl_from_p(log_q)
    elif name == "total_variation":
        value = 0.5 * np.abs(p - q).sum(axis=-1)
    elif name == "skew_kl":
        value = kl_from_p(np.log(kwargs["skew"] * p + (1 - kwargs["skew"]) * q))
    else:
        beta = kwargs["beta"]
        log_m = np.log(beta * p + (1 - beta) * q)
        value = (
            beta * kl_from_p(log_m) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
        ) / (beta * (1 - beta))
    return temperature**2 * value


@pytest.mark.parametrize("name,kwargs", [c for c in CASES if c[0] != "reverse_kl"])
def test_teacher_logits_of_minus_inf_rule_their_classes_out(name, kwargs):
    teacher, student = random_logits(12)
    teacher[:, :2] = -np.inf
    teacher[0, 2:5] = -np.inf
    fn = losses.DIVERGENCES[name]
    value, grad = value_and_grad(
        lambda s: fn(teacher, s, 2.0, reduction="sum", **kwargs), student
    )
    expected = np_divergence_ruling_out(name, teacher, student, 2.0, **kwargs)
    np.testing.assert_allclose(value, expected.sum(), rtol=2e-5)
    assert np.all(np.isfinite(grad))
    # Each class the teacher rules out gets the student's gradient T·q·(...)
    # of a finite loss; the forward KL's is exactly T·q.
    if name == "forward_kl":
        q = np.exp(np_log_softmax(student, 2.0))
        np.testing.assert_allclose(grad[:, :2], 2.0 * q[:, :2], rtol=1e-4)


def test_reverse_kl_of_a_class_the_teacher_rules_out_is_infinite():
    teacher, student = random_logits(13)
    teacher[0, 1] = -np.inf
    value = ops.convert_to_numpy(losses.reverse_kl(teacher, student, reduction="none"))
    assert value[0] == np.inf
    assert np.all(np.isfinite(value[1:]))


@pytest.mark.parametrize(
    "fn,kwargs,limit",
    [
        (losses.generalized_jsd, {"beta": 0.0}, losses.forward_kl),
        (losses.generalized_jsd, {"beta": 1.0}, losses.reverse_kl),
        (losses.skew_kl, {"skew": 0.0}, losses.forward_kl),
    ],
)
def test_limits_are_exactly_the_limit_divergence(fn, kwargs, limit):
    teacher, student = random_logits(14)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(fn(teacher, student, 2.0, reduction="none", **kwargs)),
        ops.convert_to_numpy(limit(teacher, student, 2.0, reduction="none")),
    )


def test_elementwise_divergence_names_unknown_divergences_and_arguments():
    with pytest.raises(ValueError, match="`divergence` must be one of"):
        losses.divergences.elementwise_divergence("kl")
    with pytest.raises(TypeError, match="forward_kl takes no argument 'beta'"):
        losses.divergences.elementwise_divergence("forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="`beta` must be in"):
        losses.divergences.elementwise_divergence("generalized_jsd", beta=2.0)
    # Missing arguments take the function's defaults (beta=0.5, skew=0.1).
    assert losses.divergences.elementwise_divergence("skew_kl").name == "skew_kl"


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_forward_kl_gradient_is_temperature_times_probability_gap(temperature):
    teacher, student = random_logits(1)
    _, grad = value_and_grad(
        lambda s: losses.forward_kl(teacher, s, temperature, reduction="sum"),
        student,
    )
    expected = temperature * (
        np.exp(np_log_softmax(student, temperature))
        - np.exp(np_log_softmax(teacher, temperature))
    )
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_gradient_matches_finite_differences(name, kwargs):
    teacher, student = random_logits(2, shape=(2, 5))
    fn = losses.DIVERGENCES[name]

    def total(s):
        return float(np.sum(np_divergence(name, teacher, s, 2.0, **kwargs)))

    _, grad = value_and_grad(
        lambda s: fn(teacher, s, 2.0, reduction="sum", **kwargs), student
    )
    step = 1e-5
    numeric = np.zeros_like(student, dtype=np.float64)
    for index in np.ndindex(student.shape):
        plus, minus = student.astype(np.float64), student.astype(np.float64)
        plus[index] += step
        minus[index] -= step
        numeric[index] = (total(plus) - total(minus)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


def test_generalized_jsd_limits_are_forward_and_reverse_kl():
    teacher, student = random_logits(3)
    forward = float(losses.forward_kl(teacher, student, 2.0))
    reverse = float(losses.reverse_kl(teacher, student, 2.0))
    assert float(losses.generalized_jsd(teacher, student, 2.0, beta=0.0)) == (
        pytest.approx(forward, rel=1e-6)
    )
    assert float(losses.generalized_jsd(teacher, student, 2.0, beta=1.0)) == (
        pytest.approx(reverse, rel=1e-6)
    )
    # Continuous at both ends, not decaying to 0 as an un-normalized JSD does.
    near_zero = float(losses.generalized_jsd(teacher, student, 2.0, beta=1e-3))
    near_one = float(losses.generalized_jsd(teacher, student, 2.0, beta=0.999))
    assert near_zero == pytest.approx(forward, rel=2e-2)
    assert near_one == pytest.approx(reverse, rel=2e-2)


def test_skew_zero_is_forward_kl_and_skew_bounds_the_divergence():
    teacher, student = random_logits(4, scale=20.0)
    forward = ops.convert_to_numpy(
        losses.forward_kl(teacher, student, reduction="none")
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(
            losses.skew_kl(teacher, student, skew=0.0, reduction="none")
        ),
        forward,
    )
    skewed = ops.convert_to_numpy(
        losses.skew_kl(teacher, student, skew=0.1, reduction="none")
    )
    assert np.all(skewed <= -math.log(0.1) + 1e-5)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_sample_weight_is_a_normalized_weighted_mean(name, kwargs):
    teacher, student = random_logits(5, shape=(4, 3, 5))
    weights = np.array(
        [[1, 1, 0], [1, 0, 0], [0, 0, 0], [2, 1, 1]], "float32"
    )
    fn = losses.DIVERGENCES[name]
    per_token = np_divergence(name, teacher, student, 2.0, **kwargs)
    expected = (per_token * weights).sum() / weights.sum()
    value = fn(teacher, student, 2.0, sample_weight=weights, **kwargs)
    np.testing.assert_allclose(float(value), expected, rtol=2e-5)
    summed = fn(
        teacher, student, 2.0, sample_weight=weights, reduction="sum", **kwargs
    )
    np.testing.assert_allclose(
        float(summed), (per_token * weights).sum(), rtol=2e-5
    )
    # Per-example weights broadcast over the token axis.
    example_weights = np.array([1, 0, 1, 1], "float32")
    value = fn(teacher, student, 2.0, sample_weight=example_weights, **kwargs)
    expected = per_token[example_weights > 0].mean()
    np.testing.assert_allclose(float(value), expected, rtol=2e-5)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_empty_mask_gives_finite_zero_and_zero_gradient(name, kwargs):
    teacher, student = random_logits(6)
    mask = np.zeros(teacher.shape[:-1], "float32")
    fn = losses.DIVERGENCES[name]
    value, grad = value_and_grad(
        lambda s: fn(teacher, s, 2.0, sample_weight=mask, **kwargs), student
    )
    assert float(value) == 0.0
    assert np.all(grad == 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_logits_are_computed_in_float32(dtype):
    teacher, student = random_logits(7)
    value = losses.forward_kl(
        ops.cast(teacher, dtype), ops.cast(student, dtype), 2.0
    )
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    expected = np_divergence(
        "forward_kl",
        ops.convert_to_numpy(ops.cast(ops.cast(teacher, dtype), "float32")),
        ops.convert_to_numpy(ops.cast(ops.cast(student, dtype), "float32")),
        2.0,
    ).mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"reduction": "max"}, ValueError, "reduction"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    teacher, student = random_logits(8)
    with pytest.raises(error, match=match):
        losses.forward_kl(teacher, student, **kwargs)


@pytest.mark.parametrize(
    "fn,kwargs,match",
    [
        (losses.generalized_jsd, {"beta": -0.1}, "beta"),
        (losses.generalized_jsd, {"beta": 1.5}, "beta"),
        (losses.skew_kl, {"skew": 1.0}, "skew"),
        (losses.skew_kl, {"skew": -0.5}, "skew"),
    ],
)
def test_bad_mixture_weights_are_named(fn, kwargs, match):
    teacher, student = random_logits(9)
    with pytest.raises(ValueError, match=match):
        fn(teacher, student, **kwargs)


@pytest.mark.parametrize(
    "value,error",
    [
        (0, ValueError),
        (-3, ValueError),
        (2.0, TypeError),
        (True, TypeError),
        (np.int64(2), TypeError),
        ("2", TypeError),
        (None, TypeError),
    ],
)
def test_check_positive_int_refuses_with_the_name(value, error):
    with pytest.raises(error, match="`top_k` must be a Python int >= 1, got"):
        checks.check_positive_int("top_k", value)


def test_check_positive_int_accepts_ints_and_allowed_none():
    checks.check_positive_int("top_k", 1)
    checks.check_positive_int("top_k", None, allow_none=True)
    with pytest.raises(ValueError, match=r"`top_k` must be .* or None"):
        checks.check_positive_int("top_k", 0, allow_none=True)


def test_class_count_mismatch_names_both_sizes():
    teacher = np.zeros((2, 11), "float32")
    student = np.zeros((2, 10), "float32")
    with pytest.raises(ValueError, match="Teacher outputs 11 classes, student 10"):
        losses.forward_kl(teacher, student)


LOSS_CLASSES = [
    (losses.ForwardKL, {}),
    (losses.ReverseKL, {}),
    (losses.TotalVariation, {}),
    (losses.SkewKL, {"skew": 0.2}),
    (losses.GeneralizedJSD, {"beta": 0.3}),
]


CLASS_FUNCTIONS = {
    losses.ForwardKL: "forward_kl",
    losses.ReverseKL: "reverse_kl",
    losses.TotalVariation: "total_variation",
    losses.SkewKL: "skew_kl",
    losses.GeneralizedJSD: "generalized_jsd",
}


# Non-uniform weights with zeros: a padded position, a padded sequence.
WEIGHTS = np.array([[1.0, 0.5, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]], "float32")


@pytest.mark.parametrize("cls,kwargs", LOSS_CLASSES)
def test_loss_objects_take_the_weighted_mean_as_their_functions_do(cls, kwargs):
    # The rule: sum(w · d) / sum(w) over positions, not Keras's
    # "sum_over_batch_size" (sum(w · d) / number of positions).
    teacher, student = random_logits(15, shape=(4, 3, 5))
    name = CLASS_FUNCTIONS[cls]
    per_position = np_divergence(name, teacher, student, 2.0, **kwargs)
    expected = (WEIGHTS * per_position).sum() / WEIGHTS.sum()
    loss = cls(temperature=2.0, **kwargs)
    value = float(loss(teacher, student, sample_weight=WEIGHTS))
    np.testing.assert_allclose(value, expected, rtol=2e-5)
    function_value = losses.DIVERGENCES[name](
        teacher, student, 2.0, sample_weight=WEIGHTS, **kwargs
    )
    np.testing.assert_allclose(value, float(function_value), rtol=1e-6)
    assert value != pytest.approx(
        (WEIGHTS * per_position).sum() / WEIGHTS.size, rel=1e-3
    )
    # Per-sequence weights, (batch,) as `fit` passes them, broadcast over
    # the tokens; Keras's (batch, 1) too.
    sequence_weights = np.array([1.0, 0.0, 2.0, 1.0], "float32")
    expected = (sequence_weights[:, None] * per_position).sum() / (
        3 * sequence_weights.sum()
    )
    for weights in (sequence_weights, sequence_weights[:, None]):
        np.testing.assert_allclose(
            float(loss(teacher, student, sample_weight=weights)), expected, rtol=2e-5
        )
    # "sum" and "none" as in the function.
    summed = cls(temperature=2.0, reduction="sum", **kwargs)
    np.testing.assert_allclose(
        float(summed(teacher, student, sample_weight=WEIGHTS)),
        (WEIGHTS * per_position).sum(),
        rtol=2e-5,
    )
    for reduction in ("none", None):
        unreduced = cls(temperature=2.0, reduction=reduction, **kwargs)
        np.testing.assert_allclose(
            ops.convert_to_numpy(unreduced(teacher, student, sample_weight=WEIGHTS)),
            WEIGHTS * per_position,
            rtol=2e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("cls,kwargs", LOSS_CLASSES)
def test_loss_object_of_zero_weights_is_a_finite_zero_with_zero_gradient(cls, kwargs):
    teacher, student = random_logits(16, shape=(4, 3, 5))
    loss = cls(temperature=2.0, **kwargs)
    value, grad = value_and_grad(
        lambda s: loss(teacher, s, sample_weight=np.zeros((4, 3), "float32")),
        student,
    )
    assert float(value) == 0.0
    assert np.all(grad == 0.0)
    # The gradient through the weighted mean is the function's.
    _, grad = value_and_grad(
        lambda s: loss(teacher, s, sample_weight=WEIGHTS), student
    )
    _, expected = value_and_grad(
        lambda s: losses.DIVERGENCES[CLASS_FUNCTIONS[cls]](
            teacher, s, 2.0, sample_weight=WEIGHTS, **kwargs
        ),
        student,
    )
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_loss_object_weights_positions_by_the_keras_mask_of_the_student():
    # Keras's own losses fold a masking layer's mask into the weights; these
    # do too, under the same weighted-mean rule.
    rng = np.random.default_rng(17)
    features = rng.normal(size=(2, 3, 4)).astype("float32")
    features[1, 1:] = 0.0  # masked: the second sequence is 1 token long
    mask = np.array([[1, 1, 1], [1, 0, 0]], "float32")
    student = keras.Sequential(
        [keras.Input((3, 4)), keras.layers.Masking(0.0), keras.layers.Dense(5)]
    )
    teacher = rng.normal(size=(2, 3, 5)).astype("float32")
    student_logits = student(features)
    per_position = np_divergence(
        "forward_kl", teacher, ops.convert_to_numpy(student_logits), 2.0
    )
    loss = losses.ForwardKL(temperature=2.0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loss(teacher, student_logits)),
        (mask * per_position).sum() / mask.sum(),
        rtol=2e-5,
    )
    weights = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "float32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(loss(teacher, student_logits, sample_weight=weights)),
        (mask * weights * per_position).sum() / (mask * weights).sum(),
        rtol=2e-5,
    )


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean_with_sample_weight", "max"])
def test_loss_objects_refuse_other_reductions_with_the_rule(reduction):
    with pytest.raises(ValueError, match=r"`reduction` must be one of .*sum\(w"):
        losses.ForwardKL(reduction=reduction)


@pytest.mark.parametrize("cls,kwargs", LOSS_CLASSES)
def test_loss_objects_round_trip(cls, kwargs):
    teacher, student = random_logits(10, shape=(4, 3, 5))
    loss = cls(temperature=2.0, reduction="sum", name="distill", **kwargs)
    config = loss.get_config()
    assert config["reduction"] == "sum" and config["temperature"] == 2.0
    assert cls().get_config()["reduction"] == "mean"
    restored = cls.from_config(config)
    assert restored.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert type(revived) is cls
    assert revived.get_config() == config
    expected = (
        WEIGHTS * np_divergence(CLASS_FUNCTIONS[cls], teacher, student, 2.0, **kwargs)
    ).sum()
    np.testing.assert_allclose(
        float(revived(teacher, student, sample_weight=WEIGHTS)), expected, rtol=2e-5
    )


def test_keras_evaluate_with_sample_weight_is_the_weighted_mean():
    teacher, _ = random_logits(18, shape=(8, 4))
    features = np.eye(8, dtype="float32")
    weights = np.array([1, 0, 2, 0, 1, 1, 0.5, 0], "float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(loss=losses.ForwardKL(temperature=2.0))
    student = ops.convert_to_numpy(model.predict(features, verbose=0))
    per_example = np_divergence("forward_kl", teacher, student, 2.0)
    value = model.evaluate(
        features, teacher, sample_weight=weights, batch_size=8, verbose=0
    )
    np.testing.assert_allclose(
        value, (weights * per_example).sum() / weights.sum(), rtol=1e-5
    )


def test_loss_object_trains_a_keras_model_on_teacher_logits():
    # As a plain Keras loss: y_true holds the teacher's logits.
    teacher, _ = random_logits(11, shape=(32, 4))
    features = np.eye(32, dtype="float32")
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=losses.ForwardKL())
    before = model.evaluate(features, teacher, verbose=0)
    model.fit(features, teacher, epochs=100, verbose=0)
    assert model.evaluate(features, teacher, verbose=0) < 0.05 * before
