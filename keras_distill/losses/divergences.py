"""Divergences between teacher and student distributions, as pure functions.

Every function here takes `teacher_logits` and `student_logits` of the same
shape `(..., num_classes)`, softens both with `temperature`, and reduces over
the last (class) axis. The maths runs in float32 and in log space
(`log_softmax`, `logaddexp`), so logits of ±1e4 and mixed-precision inputs give
exact, finite results with no clipping.

Conventions shared by every divergence:

- `P = softmax(teacher_logits / T)` is the teacher, `Q = softmax(student_logits
  / T)` the student.
- The result is multiplied by `T²` (Hinton et al., 2015), which keeps the
  gradient scale independent of `T`; at `T = 1` it is the plain divergence.
- `sample_weight` (or a 0/1 padding mask) has the shape of the logits without
  the class axis, or one that broadcasts to it. With `reduction="mean"` the
  result is `sum(w * d) / sum(w)`, and `0` (finite, with a finite gradient)
  when every weight is zero.
- A teacher logit of `-inf` rules its class out (probability 0): it adds
  nothing to the divergences that weigh `log P` by `P` (forward KL, the JSD,
  skew KL) or to the total variation; the reverse KL is then infinite, as
  the student gives every class some mass.
"""

import math

import keras
from keras import ops

from keras_distill.checks import check_temperature
from keras_distill.checks import check_unit_interval
from keras_distill.losses.weighting import weighted_reduce


def _softened_log_probs(teacher_logits, student_logits, temperature):
    """Validates inputs and returns float32 `log P`, `log Q` at `temperature`."""
    check_temperature(temperature)
    teacher_logits = ops.cast(teacher_logits, "float32")
    student_logits = ops.cast(student_logits, "float32")
    teacher_shape = tuple(teacher_logits.shape)
    student_shape = tuple(student_logits.shape)
    if teacher_shape[-1:] != student_shape[-1:] and None not in (
        teacher_shape[-1],
        student_shape[-1],
    ):
        raise ValueError(
            f"Teacher outputs {teacher_shape[-1]} classes, student "
            f"{student_shape[-1]}: `teacher_logits` {teacher_shape} and "
            f"`student_logits` {student_shape} must have the same class axis."
        )
    teacher_log_probs = ops.log_softmax(teacher_logits / temperature, axis=-1)
    student_log_probs = ops.log_softmax(student_logits / temperature, axis=-1)
    return teacher_log_probs, student_log_probs


def _kl(log_p, log_q):
    """KL(P || Q) over the last axis from log-probabilities.

    A class that P rules out (log p = -inf, e.g. a teacher logit of -inf that
    masks it) adds p·(log p − log q) = 0, not 0·(−inf) = NaN: its log p is
    replaced before the product, so no NaN reaches the value or a gradient.
    """
    p = ops.exp(log_p)
    log_p = ops.where(ops.equal(p, 0.0), 0.0, log_p)
    return ops.sum(p * (log_p - log_q), axis=-1)


def forward_kl(
    teacher_logits,
    student_logits,
    temperature=1.0,
    sample_weight=None,
    reduction="mean",
):
    """Forward KL divergence `T² · KL(P_teacher || Q_student)`, the default.

    Mode-covering: the student is pushed to put mass wherever the teacher does.
    Its gradient with respect to the student logits is
    `T · (softmax(s / T) - softmax(t / T))` per position.

    Args:
        teacher_logits: Teacher logits, shape `(..., num_classes)`.
        student_logits: Student logits, same shape.
        temperature: Softening temperature `T > 0`.
        sample_weight: Optional per-position weights or padding mask.
        reduction: `"mean"`, `"sum"` or `"none"` (see `weighted_reduce`).

    Returns:
        The reduced float32 divergence.

    Example:

    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(forward_kl(teacher_logits, student_logits, 2.0)), 4)
    0.358
    """
    log_p, log_q = _softened_log_probs(
        teacher_logits, student_logits, temperature
    )
    divergence = temperature**2 * _kl(log_p, log_q)
    return weighted_reduce(divergence, sample_weight, reduction)


def reverse_kl(
    teacher_logits,
    student_logits,
    temperature=1.0,
    sample_weight=None,
    reduction="mean",
):
    """Reverse KL divergence `T² · KL(Q_student || P_teacher)`.

    Mode-seeking: the student concentrates on the teacher's main modes, which
    suits generative students too small to cover every mode.

    Args:
        teacher_logits: Teacher logits, shape `(..., num_classes)`.
        student_logits: Student logits, same shape.
        temperature: Softening temperature `T > 0`.
        sample_weight: Optional per-position weights or padding mask.
        reduction: `"mean"`, `"sum"` or `"none"`.

    Returns:
        The reduced float32 divergence.

    Example:

    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(reverse_kl(teacher_logits, student_logits, 2.0)), 4)
    0.3616
    """
    log_p, log_q = _softened_log_probs(
        teacher_logits, student_logits, temperature
    )
    divergence = temperature**2 * _kl(log_q, log_p)
    return weighted_reduce(divergence, sample_weight, reduction)


def generalized_jsd(
    teacher_logits,
    student_logits,
    temperature=1.0,
    beta=0.5,
    sample_weight=None,
    reduction="mean",
):
    """Generalized Jensen–Shannon divergence, from forward (β=0) to reverse KL.

    With the mixture `M = β·P + (1 - β)·Q` it is

        T² · [β·KL(P || M) + (1 - β)·KL(Q || M)] / (β·(1 - β)),

    and exactly `forward_kl` at `β = 0` and `reverse_kl` at `β = 1`, its
    limits. The division by `β·(1 - β)` is what makes those limits hold:
    without it (as in GKD-style trainers) the divergence decays to 0 at both
    ends and silently trains nothing. At `β = 0.5` it is 4× the symmetric JSD.

    Args:
        teacher_logits: Teacher logits, shape `(..., num_classes)`.
        student_logits: Student logits, same shape.
        temperature: Softening temperature `T > 0`.
        beta: Interpolation in `[0, 1]`: 0 is forward KL, 1 reverse KL.
        sample_weight: Optional per-position weights or padding mask.
        reduction: `"mean"`, `"sum"` or `"none"`.

    Returns:
        The reduced float32 divergence.

    Example:

    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(generalized_jsd(teacher_logits, student_logits, beta=0.5)), 4)
    0.2906
    """
    check_unit_interval("beta", beta)
    if beta == 0.0:
        return forward_kl(
            teacher_logits, student_logits, temperature, sample_weight, reduction
        )
    if beta == 1.0:
        return reverse_kl(
            teacher_logits, student_logits, temperature, sample_weight, reduction
        )
    log_p, log_q = _softened_log_probs(
        teacher_logits, student_logits, temperature
    )
    log_m = ops.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    mixed = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    divergence = temperature**2 * mixed / (beta * (1.0 - beta))
    return weighted_reduce(divergence, sample_weight, reduction)


def total_variation(
    teacher_logits,
    student_logits,
    temperature=1.0,
    sample_weight=None,
    reduction="mean",
):
    """Total variation distance `T² · ½ Σ |P - Q|`.

    Bounded in `[0, T²]`, so a few confidently wrong teacher positions cannot
    dominate the loss.

    Args:
        teacher_logits: Teacher logits, shape `(..., num_classes)`.
        student_logits: Student logits, same shape.
        temperature: Softening temperature `T > 0`.
        sample_weight: Optional per-position weights or padding mask.
        reduction: `"mean"`, `"sum"` or `"none"`.

    Returns:
        The reduced float32 distance.

    Example:

    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(total_variation(teacher_logits, student_logits)), 4)
    0.3633
    """
    log_p, log_q = _softened_log_probs(
        teacher_logits, student_logits, temperature
    )
    distance = 0.5 * ops.sum(ops.abs(ops.exp(log_p) - ops.exp(log_q)), axis=-1)
    return weighted_reduce(temperature**2 * distance, sample_weight, reduction)


def skew_kl(
    teacher_logits,
    student_logits,
    temperature=1.0,
    skew=0.1,
    sample_weight=None,
    reduction="mean",
):
    """Skew KL divergence `T² · KL(P || skew·P + (1 - skew)·Q)` (DistiLLM).

    Mixing a little of the teacher into the student's side bounds the
    divergence by `-log(skew)` and keeps its gradient stable where the student
    puts almost no mass. `skew = 0` is `forward_kl`.

    Args:
        teacher_logits: Teacher logits, shape `(..., num_classes)`.
        student_logits: Student logits, same shape.
        temperature: Softening temperature `T > 0`.
        skew: Teacher share of the mixture, in `[0, 1)`.
        sample_weight: Optional per-position weights or padding mask.
        reduction: `"mean"`, `"sum"` or `"none"`.

    Returns:
        The reduced float32 divergence.

    Example:

    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(skew_kl(teacher_logits, student_logits, skew=0.1)), 4)
    0.2283
    """
    check_unit_interval("skew", skew, include_one=False)
    if skew == 0.0:
        return forward_kl(
            teacher_logits, student_logits, temperature, sample_weight, reduction
        )
    log_p, log_q = _softened_log_probs(
        teacher_logits, student_logits, temperature
    )
    log_mixture = ops.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew))
    divergence = temperature**2 * _kl(log_p, log_mixture)
    return weighted_reduce(divergence, sample_weight, reduction)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "skew_kl": skew_kl,
}


class DistillationLoss(keras.losses.Loss):
    """Base class of the divergences above as `keras.losses.Loss` objects.

    Called as `loss(teacher_logits, student_logits, sample_weight)`: the
    teacher plays `y_true`, the student `y_pred`. Inside a `Distiller` the
    Distiller's `temperature` applies unless the loss sets its own; setting
    both to different values is an error. Subclasses name their divergence in
    `divergence` and their extra arguments in `divergence_kwargs`.

    Args:
        temperature: Softening temperature; `None` means the Distiller's, or
            1.0 when the loss is used on its own.
        **kwargs: `keras.losses.Loss` arguments (`reduction`, `name`, `dtype`).
    """

    divergence = staticmethod(forward_kl)

    def __init__(self, temperature=None, **kwargs):
        if temperature is not None:
            check_temperature(temperature)
        super().__init__(**kwargs)
        self.temperature = temperature

    @property
    def divergence_kwargs(self):
        """Extra keyword arguments of the divergence, e.g. `{"beta": 0.5}`."""
        return {}

    def call(self, y_true, y_pred):
        return self.divergence(
            y_true,
            y_pred,
            self.temperature or 1.0,
            reduction="none",
            **self.divergence_kwargs,
        )

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature, **self.divergence_kwargs)
        return config


@keras.saving.register_keras_serializable(package="keras_distill")
class ForwardKL(DistillationLoss):
    """`forward_kl` as a Keras loss.

    Example:

    >>> loss = ForwardKL(temperature=2.0)
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(loss(teacher_logits, student_logits)), 4)
    0.358
    """

    divergence = staticmethod(forward_kl)


@keras.saving.register_keras_serializable(package="keras_distill")
class ReverseKL(DistillationLoss):
    """`reverse_kl` as a Keras loss.

    Example:

    >>> loss = ReverseKL(temperature=2.0)
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(loss(teacher_logits, student_logits)), 4)
    0.3616
    """

    divergence = staticmethod(reverse_kl)


@keras.saving.register_keras_serializable(package="keras_distill")
class TotalVariation(DistillationLoss):
    """`total_variation` as a Keras loss.

    Example:

    >>> loss = TotalVariation()
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(loss(teacher_logits, student_logits)), 4)
    0.3633
    """

    divergence = staticmethod(total_variation)


@keras.saving.register_keras_serializable(package="keras_distill")
class GeneralizedJSD(DistillationLoss):
    """`generalized_jsd` as a Keras loss.

    Args:
        beta: Interpolation in `[0, 1]`: 0 is forward KL, 1 reverse KL.
        temperature: Softening temperature (see `DistillationLoss`).
        **kwargs: `keras.losses.Loss` arguments.

    Example:

    >>> loss = GeneralizedJSD(beta=0.5)
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(loss(teacher_logits, student_logits)), 4)
    0.2906
    """

    divergence = staticmethod(generalized_jsd)

    def __init__(self, beta=0.5, temperature=None, **kwargs):
        check_unit_interval("beta", beta)
        super().__init__(temperature=temperature, **kwargs)
        self.beta = beta

    @property
    def divergence_kwargs(self):
        return {"beta": self.beta}


@keras.saving.register_keras_serializable(package="keras_distill")
class SkewKL(DistillationLoss):
    """`skew_kl` as a Keras loss.

    Args:
        skew: Teacher share of the mixture, in `[0, 1)`.
        temperature: Softening temperature (see `DistillationLoss`).
        **kwargs: `keras.losses.Loss` arguments.

    Example:

    >>> loss = SkewKL(skew=0.1)
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(loss(teacher_logits, student_logits)), 4)
    0.2283
    """

    divergence = staticmethod(skew_kl)

    def __init__(self, skew=0.1, temperature=None, **kwargs):
        check_unit_interval("skew", skew, include_one=False)
        super().__init__(temperature=temperature, **kwargs)
        self.skew = skew

    @property
    def divergence_kwargs(self):
        return {"skew": self.skew}
