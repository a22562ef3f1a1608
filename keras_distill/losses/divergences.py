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
- The loss classes (`ForwardKL`, ..., `DistillationLoss`) reduce by the same
  rule: `ForwardKL(temperature=T)(t, s, sample_weight=w)` is
  `forward_kl(t, s, T, sample_weight=w)`, the weighted mean over positions
  (see `keras_distill.losses.weighting.WeightedMeanLoss`), not Keras's
  `"sum_over_batch_size"`, which would divide by every position.
- A teacher logit of `-inf` rules its class out (probability 0): it adds
  nothing to the divergences that weigh `log P` by `P` (forward KL, the JSD,
  skew KL) or to the total variation; the reverse KL is then infinite, as
  the student gives every class some mass.
"""

import functools
import inspect
import math
import typing

import keras
from keras import ops

from keras_distill.checks import check_temperature
from keras_distill.checks import check_unit_interval
from keras_distill.losses.weighting import WeightedMeanLoss
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


class LogProbabilities:
    """The teacher's `log p` and the student's `log q` at one set of positions.

    A divergence's terms and slopes read `p`, `q` and mixtures of the two
    from here, so each is computed once however many of them ask for it.

    Args:
        log_p: Teacher log-probabilities, `(..., classes)` (a tile, or all).
        log_q: Student log-probabilities, the same shape.

    Example:

    >>> x = LogProbabilities(
    ...     keras.ops.log(keras.ops.convert_to_tensor([[0.5, 0.5]])),
    ...     keras.ops.log(keras.ops.convert_to_tensor([[0.9, 0.1]])),
    ... )
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(x.q)[0].tolist()]
    [0.9, 0.1]
    """

    def __init__(self, log_p, log_q):
        self.log_p = log_p
        self.log_q = log_q
        self._log_mixtures = {}

    @functools.cached_property
    def p(self):
        return ops.exp(self.log_p)

    @functools.cached_property
    def q(self):
        return ops.exp(self.log_q)

    def log_mixture(self, weight):
        """`log(weight · p + (1 - weight) · q)` for `0 < weight < 1`."""
        if weight not in self._log_mixtures:
            self._log_mixtures[weight] = ops.logaddexp(
                self.log_p + math.log(weight), self.log_q + math.log1p(-weight)
            )
        return self._log_mixtures[weight]


# The most negative float32. It stands in for `log p = -inf` in `_kl_terms`:
# every `p > 0` has `log p > -104`, which it leaves as it is.
_LOG_ZERO = -3.4028235e38


def _kl_terms(p, log_p, log_r):
    """Elementwise `p · (log p - log r)`, the terms of `KL(P || R)`.

    Where `p` is 0 (a class P rules out: `log p = -inf`) the term is
    `0 · (finite) = 0`, not `0 · (-inf) = NaN`, with a zero gradient: `log p`
    is raised to the most negative float32 first, which changes no class
    with `p > 0`. (One `maximum`, not a `where`: PyTorch's CPU `where` costs
    as much as an `exp`, and the tiled losses run this on every tile.)
    """
    return p * (ops.maximum(log_p, _LOG_ZERO) - log_r)


# Each divergence `D(P, Q) = Σ_v f(log p_v, log q_v)`, defined once: its
# elementwise terms `f` and their slope `∂f/∂log q` (what the tiled losses'
# hand-written backward pass needs; the dense functions differentiate the
# terms), as functions of `LogProbabilities` and the divergence's arguments.


def _forward_kl_terms(x):
    return _kl_terms(x.p, x.log_p, x.log_q)


def _forward_kl_slopes(x):
    return -x.p


def _reverse_kl_terms(x):
    return _kl_terms(x.q, x.log_q, x.log_p)


def _reverse_kl_slopes(x):
    return x.q * (x.log_q - x.log_p + 1.0)


def _generalized_jsd_terms(x, beta):
    log_m = x.log_mixture(beta)
    mixed = beta * _kl_terms(x.p, x.log_p, log_m) + (1.0 - beta) * _kl_terms(
        x.q, x.log_q, log_m
    )
    return mixed / (beta * (1.0 - beta))


def _generalized_jsd_slopes(x, beta):
    # The mixture's own dependence on log q cancels: (1-β) q (log q - log m),
    # over the β(1-β) normalization.
    return x.q * (x.log_q - x.log_mixture(beta)) / beta


def _total_variation_terms(x):
    return 0.5 * ops.abs(x.q - x.p)


def _total_variation_slopes(x):
    return 0.5 * ops.sign(x.q - x.p) * x.q


def _skew_kl_terms(x, skew):
    return _kl_terms(x.p, x.log_p, x.log_mixture(skew))


def _skew_kl_slopes(x, skew):
    return -x.p * ops.exp(math.log1p(-skew) + x.log_q - x.log_mixture(skew))


def _check_beta(beta):
    check_unit_interval("beta", beta)


def _check_skew(skew):
    check_unit_interval("skew", skew, include_one=False)


def _generalized_jsd_limit(beta):
    # The (β(1-β))-normalized JSD tends to forward KL at 0, reverse KL at 1,
    # where its own formula is 0 / 0.
    return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta)


def _skew_kl_limit(skew):
    return "forward_kl" if skew == 0.0 else None


class _Definition(typing.NamedTuple):
    """A divergence's elementwise terms and slopes, argument check and limits.

    `terms(x, **arguments)` and `slopes(x, **arguments)` take
    `LogProbabilities`; `check(**arguments)` raises on bad arguments;
    `limit(**arguments)` names the divergence the arguments reduce to, or
    returns None.
    """

    terms: typing.Callable
    slopes: typing.Callable
    check: typing.Optional[typing.Callable] = None
    limit: typing.Optional[typing.Callable] = None


_DEFINITIONS = {
    "forward_kl": _Definition(_forward_kl_terms, _forward_kl_slopes),
    "reverse_kl": _Definition(_reverse_kl_terms, _reverse_kl_slopes),
    "generalized_jsd": _Definition(
        _generalized_jsd_terms,
        _generalized_jsd_slopes,
        _check_beta,
        _generalized_jsd_limit,
    ),
    "total_variation": _Definition(
        _total_variation_terms, _total_variation_slopes
    ),
    "skew_kl": _Definition(
        _skew_kl_terms, _skew_kl_slopes, _check_skew, _skew_kl_limit
    ),
}


class ElementwiseDivergence(typing.NamedTuple):
    """A divergence's terms and slopes, its arguments bound.

    Fields:
        name: The divergence computed, after its limits (`"forward_kl"` for
            `generalized_jsd` at `beta=0`).
        terms: `terms(x)`: the elementwise `f(log p, log q)` of
            `D = Σ_v f(log p_v, log q_v)`, `x` a `LogProbabilities`.
        slopes: `slopes(x)`: the elementwise `∂f/∂log q`.
    """

    name: str
    terms: typing.Callable
    slopes: typing.Callable


# The arguments every divergence function takes; the others are its own.
_SHARED_ARGUMENTS = (
    "teacher_logits",
    "student_logits",
    "temperature",
    "sample_weight",
    "reduction",
)


def elementwise_divergence(name, **arguments):
    """The terms and slopes of divergence `name`, checked and at its limits.

    The dense functions, the sparse loss and the tiled losses of
    `keras_distill.losses.fused` all evaluate a divergence through this.

    Args:
        name: A key of `DIVERGENCES`.
        **arguments: The divergence's own arguments (e.g. `beta=0.3`); the
            missing ones take the defaults of its function in `DIVERGENCES`.

    Returns:
        An `ElementwiseDivergence`.

    Example:

    >>> divergence = elementwise_divergence("generalized_jsd", beta=0.0)
    >>> divergence.name
    'forward_kl'
    """
    if name not in _DEFINITIONS:
        raise ValueError(
            f"`divergence` must be one of {sorted(_DEFINITIONS)}, got {name!r}."
        )
    parameters = inspect.signature(DIVERGENCES[name]).parameters
    own = {
        key: parameter.default
        for key, parameter in parameters.items()
        if key not in _SHARED_ARGUMENTS
    }
    unknown = sorted(set(arguments) - set(own))
    if unknown:
        raise TypeError(
            f"{name} takes no argument {', '.join(map(repr, unknown))}; its "
            f"own arguments are {sorted(own) or 'none'}."
        )
    arguments = {**own, **arguments}
    definition = _DEFINITIONS[name]
    if definition.check is not None:
        definition.check(**arguments)
    limit = definition.limit(**arguments) if definition.limit else None
    if limit is not None:
        return elementwise_divergence(limit)
    return ElementwiseDivergence(
        name,
        functools.partial(definition.terms, **arguments),
        functools.partial(definition.slopes, **arguments),
    )


def _dense_divergence(
    name, teacher_logits, student_logits, temperature, sample_weight,
    reduction, **arguments,
):
    """`T²`-scaled divergence `name` of full logits, reduced over positions."""
    divergence = elementwise_divergence(name, **arguments)
    log_p, log_q = _softened_log_probs(
        teacher_logits, student_logits, temperature
    )
    terms = divergence.terms(LogProbabilities(log_p, log_q))
    values = temperature**2 * ops.sum(terms, axis=-1)
    return weighted_reduce(values, sample_weight, reduction)


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
    return _dense_divergence(
        "forward_kl", teacher_logits, student_logits, temperature,
        sample_weight, reduction,
    )


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
    return _dense_divergence(
        "reverse_kl", teacher_logits, student_logits, temperature,
        sample_weight, reduction,
    )


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
    return _dense_divergence(
        "generalized_jsd", teacher_logits, student_logits, temperature,
        sample_weight, reduction, beta=beta,
    )


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
    return _dense_divergence(
        "total_variation", teacher_logits, student_logits, temperature,
        sample_weight, reduction,
    )


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
    return _dense_divergence(
        "skew_kl", teacher_logits, student_logits, temperature,
        sample_weight, reduction, skew=skew,
    )


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "skew_kl": skew_kl,
}


class DistillationLoss(WeightedMeanLoss):
    """Base class of the divergences above as `keras.losses.Loss` objects.

    Called as `loss(teacher_logits, student_logits, sample_weight)`: the
    teacher plays `y_true`, the student `y_pred`, and the result is the
    function's: `sum(w · d) / sum(w)` over the positions with the default
    `reduction="mean"`, 0 when every weight is 0 (see `WeightedMeanLoss`; a
    Keras mask on `y_pred` multiplies the weights). Inside a `Distiller` the
    Distiller's `temperature` applies unless the loss sets its own; setting
    both to different values is an error. Subclasses name their divergence in
    `divergence` and their extra arguments in `divergence_kwargs`.

    Args:
        temperature: Softening temperature; `None` means the Distiller's, or
            1.0 when the loss is used on its own.
        **kwargs: `WeightedMeanLoss` arguments: `reduction` (`"mean"`,
            `"sum"` or `"none"`), `name`, `dtype`.
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
        """The unweighted divergence at each position, `(...)`."""
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

    `ForwardKL(temperature=T)(t, s, sample_weight=w)` is
    `forward_kl(t, s, T, sample_weight=w)`: the weighted mean over positions,
    `sum(w · d) / sum(w)` (see `DistillationLoss`).

    Args:
        temperature: Softening temperature (see `DistillationLoss`).
        **kwargs: `WeightedMeanLoss` arguments (`reduction`, `name`, `dtype`).

    Example:

    >>> loss = ForwardKL(temperature=2.0)
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> round(float(loss(teacher_logits, student_logits)), 4)
    0.358

    A second, padded position (weight 0) changes nothing:

    >>> teacher_logits = keras.ops.convert_to_tensor(
    ...     [[2.0, 0.5, -1.0], [0.0, 0.0, 5.0]]
    ... )
    >>> student_logits = keras.ops.convert_to_tensor(
    ...     [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    ... )
    >>> weights = keras.ops.convert_to_tensor([1.0, 0.0])
    >>> round(float(loss(teacher_logits, student_logits, sample_weight=weights)), 4)
    0.358
    """

    divergence = staticmethod(forward_kl)


@keras.saving.register_keras_serializable(package="keras_distill")
class ReverseKL(DistillationLoss):
    """`reverse_kl` as a Keras loss.

    `ReverseKL(temperature=T)(t, s, sample_weight=w)` is
    `reverse_kl(t, s, T, sample_weight=w)`: the weighted mean over positions
    (see `DistillationLoss`).

    Args:
        temperature: Softening temperature (see `DistillationLoss`).
        **kwargs: `WeightedMeanLoss` arguments (`reduction`, `name`, `dtype`).

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

    `TotalVariation(temperature=T)(t, s, sample_weight=w)` is
    `total_variation(t, s, T, sample_weight=w)`: the weighted mean over positions
    (see `DistillationLoss`).

    Args:
        temperature: Softening temperature (see `DistillationLoss`).
        **kwargs: `WeightedMeanLoss` arguments (`reduction`, `name`, `dtype`).

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

    `GeneralizedJSD(beta, temperature=T)(t, s, sample_weight=w)` is
    `generalized_jsd(t, s, T, beta, sample_weight=w)`: the weighted mean over
    positions (see `DistillationLoss`).

    Args:
        beta: Interpolation in `[0, 1]`: 0 is forward KL, 1 reverse KL.
        temperature: Softening temperature (see `DistillationLoss`).
        **kwargs: `WeightedMeanLoss` arguments (`reduction`, `name`, `dtype`).

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

    `SkewKL(skew, temperature=T)(t, s, sample_weight=w)` is
    `skew_kl(t, s, T, skew, sample_weight=w)`: the weighted mean over
    positions (see `DistillationLoss`).

    Args:
        skew: Teacher share of the mixture, in `[0, 1)`.
        temperature: Softening temperature (see `DistillationLoss`).
        **kwargs: `WeightedMeanLoss` arguments (`reduction`, `name`, `dtype`).

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
