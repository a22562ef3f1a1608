"""The forward KL against sparse (top-k or sampled-k) teacher targets.

`sparse_forward_kl` trains a student on `teacher_top_log_probs` and
`teacher_top_indices` (from `keras_distill.targets.top_k`) instead of the
teacher's full logits. The mass outside the k entries is either dropped and
the k entries renormalized (`tail="renormalize"`, the Gemma 3 recipe) or
kept as one "rest" bucket (`tail="bucket"`).

Same conventions as `keras_distill.losses.divergences`: pure `keras.ops`
functions, float32 maths in log space (no `log(softmax)`, no clipping),
results multiplied by `T²`, optional `sample_weight` of the shape of the
logits without the class axis, and `reduction` as in `weighted_reduce`. The
loss class `SparseForwardKL` reduces by the same rule (the weighted mean over
positions, `sum(w · d) / sum(w)`), as the divergences' classes do.

Temperature: `teacher_top_log_probs` are the teacher's log-probabilities at the
temperature of the loss, i.e. what `top_k_teacher_targets(teacher_logits, k,
temperature=T)` returns, so that with `k = V` the sparse loss at `T` is exactly
the dense `forward_kl` at `T`. Targets stored once at another temperature (say
`T₀ = 1`, the usual offline setting) can be used at any `T` with
`tail="renormalize"` by passing `targets_temperature=T₀`: the renormalized
teacher `softmax(z_k / T)` is `softmax(log p_k · T₀ / T)` over the k entries,
exactly. `tail="bucket"` needs the mass outside the k entries *at T*, which the
stored k values do not determine, so it requires targets extracted at `T`.
"""

import math

import keras
from keras import ops

from keras_distill.checks import check_positive_number
from keras_distill.checks import check_reduction
from keras_distill.checks import check_temperature
from keras_distill.losses.divergences import LogProbabilities
from keras_distill.losses.divergences import elementwise_divergence
from keras_distill.losses.weighting import WeightedMeanLoss
from keras_distill.losses.weighting import weighted_reduce
from keras_distill.targets.top_k import _check_target_pair
from keras_distill.targets.top_k import _known_dims_match
from keras_distill.targets.top_k import unpack_sparse_targets

TAILS = ("renormalize", "bucket")


_FORWARD_KL = elementwise_divergence("forward_kl")


def _forward_kl_terms(log_p, log_q):
    """The forward KL's elementwise terms (`keras_distill.losses.divergences`).

    Entries with `p = 0` are 0 with a zero gradient: no `0 · inf` reaches the
    value or the gradient.
    """
    return _FORWARD_KL.terms(LogProbabilities(log_p, log_q))


def _top_k_divergence(teacher_log_probs, student_log_probs):
    """`Σ_k p_k (log p_k - log q_k)` over the k entries, per position."""
    return ops.sum(_forward_kl_terms(teacher_log_probs, student_log_probs), axis=-1)


def _bucket_divergence(
    teacher_top_log_probs, student_top_log_probs, student_tail_log_prob, has_tail
):
    """The forward KL over the k entries plus the tail bucket, per position.

    Args:
        teacher_top_log_probs: The teacher's `(..., k)` log-probabilities.
        student_top_log_probs: The student's at the same entries.
        student_tail_log_prob: The student's log-mass outside them, `(...)`
            (any finite stand-in where `has_tail` is False).
        has_tail: Where some class is outside the k entries, `(...)`.

    Returns:
        The divergence and the teacher's tail log-probability (`-inf` where
        there is no tail), both `(...)`.
    """
    teacher_covered = ops.minimum(
        ops.logsumexp(teacher_top_log_probs, axis=-1), 0.0
    )
    teacher_tail_log_prob = ops.where(
        has_tail, _log1mexp(teacher_covered), -math.inf
    )
    divergence = _top_k_divergence(
        teacher_top_log_probs, student_top_log_probs
    ) + _forward_kl_terms(teacher_tail_log_prob, student_tail_log_prob)
    return divergence, teacher_tail_log_prob


def _log1mexp(x):
    """`log(1 - exp(x))` for `x <= 0`.

    `expm1` keeps it accurate near 0 (covered mass close to 1, the common
    case); for very negative x the absolute error stays below float32's
    resolution of log-probabilities near 0, which is all the tail term needs.
    """
    return ops.log(-ops.expm1(x))


def _covered_mask(indices, logits):
    """Boolean mask of `logits`' shape, True at each position's `indices`."""
    num_classes = logits.shape[-1]
    if num_classes is None:
        num_classes = ops.shape(logits)[-1]
    flat_indices = ops.reshape(indices, (-1, ops.shape(indices)[-1]))
    rows = ops.expand_dims(
        ops.arange(ops.shape(flat_indices)[0], dtype="int32"), -1
    ) + ops.zeros_like(flat_indices)
    coordinates = ops.reshape(ops.stack([rows, flat_indices], axis=-1), (-1, 2))
    updates = ops.ones_like(ops.reshape(flat_indices, (-1,)), dtype="float32")
    zeros = ops.zeros_like(
        ops.reshape(logits, (-1, num_classes)), dtype="float32"
    )
    covered = ops.scatter_update(zeros, coordinates, updates)
    return ops.greater(ops.reshape(covered, ops.shape(logits)), 0.0)


def _check_sparse_inputs(log_probs, indices, student_logits):
    _check_target_pair(log_probs, indices)
    log_shape = tuple(log_probs.shape)
    student_shape = tuple(student_logits.shape)
    if len(student_shape) < 1 or not _known_dims_match(
        log_shape[:-1], student_shape[:-1]
    ):
        raise ValueError(
            "The teacher targets and `student_logits` must have the same "
            f"positions: `teacher_top_log_probs` {log_shape} is `(..., k)` "
            f"and `student_logits` {student_shape} `(..., num_classes)` with "
            "the same `...`."
        )
    k, num_classes = log_shape[-1], student_shape[-1]
    if None not in (k, num_classes) and k > num_classes:
        raise ValueError(
            f"The teacher targets keep k={k} entries per position but "
            f"`student_logits` has only {num_classes} classes: k must be at "
            "most the vocabulary size (indices are distinct classes)."
        )


def sparse_forward_kl(
    teacher_top_log_probs,
    teacher_top_indices,
    student_logits,
    temperature=1.0,
    tail="renormalize",
    sample_weight=None,
    reduction="mean",
    targets_temperature=None,
):
    """Forward KL `T² · KL(P_teacher || Q_student)` from sparse teacher targets.

    The student distribution `Q = softmax(student_logits / T)` is the full
    one, over the whole vocabulary, read at the teacher's indices. The teacher
    is known only at its k entries `p_k`; `tail` says what the sparse teacher
    distribution is:

    - `"renormalize"` (Gemma 3): `p̃ = p_k / Σ p_k` on the k entries, zero
      elsewhere, and the loss is `T² · Σ_k p̃ (log p̃ - log q_k)`. Up to the
      constant `H(p̃)` it is the student's cross-entropy on the teacher's
      k entries. The teacher's tail counts as exactly 0, so the student is
      pushed to move all its mass onto the k entries: the loss overshoots
      the dense KL when the k entries miss much teacher mass.
    - `"bucket"`: the teacher's uncovered mass `1 - Σ p_k` and the student's
      `1 - Σ q_k` form one extra class each, so the loss also sees how much
      mass the student puts outside the teacher's entries. It is the exact
      KL between the two distributions coarsened to the k entries plus one
      bucket, so it never exceeds the dense KL and grows towards it as k
      grows. The student's tail is a log-sum-exp over its uncovered
      log-probabilities (exact even when it underflows in probability
      space); the teacher's is `log(-expm1(logsumexp(log p_k)))` of the
      stored values, exact to float32 rounding of `Σ p_k` (~1e-7).

    With `k = V` both equal the dense `forward_kl`. Indices must be distinct
    within a position and in `[0, num_classes)`. Padding (e.g. a variable k
    stored in a fixed width) is an entry with log-probability `-inf`: it
    contributes nothing, provided its index repeats one the position already
    has (under `"bucket"`, a new index would leave the tail bucket).

    Temperature: `teacher_top_log_probs` must be the teacher's
    log-probabilities at `temperature`, as `top_k_teacher_targets(...,
    temperature=T)` returns them. For targets extracted at another
    temperature `T₀`, pass `targets_temperature=T₀`: `"renormalize"` then
    re-softens them exactly (`softmax(log p_k · T₀ / T)` over the k entries),
    while `"bucket"` raises, because the uncovered mass at `T` is not
    determined by k values stored at `T₀`.

    Args:
        teacher_top_log_probs: Teacher log-probabilities at its kept entries,
            shape `(..., k)`.
        teacher_top_indices: Their integer class indices, shape `(..., k)`.
        student_logits: Student logits, shape `(..., num_classes)`.
        temperature: Softening temperature `T > 0`.
        tail: `"renormalize"` or `"bucket"`, see above.
        sample_weight: Optional per-position weights or padding mask.
        reduction: `"mean"`, `"sum"` or `"none"` (see `weighted_reduce`).
        targets_temperature: Temperature the targets were extracted at;
            `None` means `temperature`.

    Returns:
        The reduced float32 divergence.

    Example:

    >>> from keras_distill.targets import top_k_teacher_targets
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0, -1.5]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0, 0.5]])
    >>> log_probs, indices = top_k_teacher_targets(teacher_logits, 2, 2.0)
    >>> loss = sparse_forward_kl(log_probs, indices, student_logits, 2.0)
    >>> round(float(loss), 4)
    2.3679
    >>> loss = sparse_forward_kl(
    ...     log_probs, indices, student_logits, 2.0, tail="bucket"
    ... )
    >>> round(float(loss), 4)
    0.5559
    >>> log_probs, indices = top_k_teacher_targets(teacher_logits, 4, 2.0)
    >>> loss = sparse_forward_kl(log_probs, indices, student_logits, 2.0)
    >>> from keras_distill.losses import forward_kl
    >>> dense = forward_kl(teacher_logits, student_logits, 2.0)
    >>> round(float(loss), 4), round(float(dense), 4)
    (0.5823, 0.5823)
    """
    check_temperature(temperature)
    if tail not in TAILS:
        raise ValueError(f"`tail` must be one of {TAILS}, got {tail!r}.")
    check_reduction(reduction)
    if targets_temperature is not None:
        check_positive_number("targets_temperature", targets_temperature)
        if tail == "bucket" and targets_temperature != temperature:
            raise ValueError(
                'tail="bucket" needs the teacher targets at the loss '
                f"temperature, got targets_temperature={targets_temperature} "
                f"and temperature={temperature}: the mass outside the k "
                "stored entries at another temperature is unknown. Extract "
                "the targets at the loss temperature, or use "
                'tail="renormalize".'
            )
    teacher_top_log_probs = ops.cast(teacher_top_log_probs, "float32")
    teacher_top_indices = ops.convert_to_tensor(teacher_top_indices)
    student_logits = ops.cast(student_logits, "float32")
    _check_sparse_inputs(
        teacher_top_log_probs, teacher_top_indices, student_logits
    )
    teacher_top_indices = ops.cast(teacher_top_indices, "int32")

    student_log_probs = ops.log_softmax(student_logits / temperature, axis=-1)
    student_top_log_probs = ops.take_along_axis(
        student_log_probs, teacher_top_indices, axis=-1
    )

    if tail == "renormalize":
        teacher_scores = teacher_top_log_probs
        if targets_temperature not in (None, temperature):
            # log p_k at T₀ is z_k / T₀ minus a constant; renormalization
            # drops the constant, so this is softmax(z_k / T) on the k entries.
            teacher_scores = teacher_scores * (targets_temperature / temperature)
        renormalized = ops.log_softmax(teacher_scores, axis=-1)
        # An all-padding position (every entry -inf) renormalizes to NaN; it
        # holds no teacher mass, and -inf keeps NaN out of the gradient.
        renormalized = ops.where(ops.isnan(renormalized), -math.inf, renormalized)
        divergence = _top_k_divergence(renormalized, student_top_log_probs)
    else:
        covered = _covered_mask(teacher_top_indices, student_log_probs)
        has_tail = ops.logical_not(ops.all(covered, axis=-1))
        # Rows with no uncovered class get a finite stand-in (their tail term
        # is zeroed below), so no -inf-only row reaches logsumexp's gradient.
        uncovered_log_probs = ops.where(
            has_tail[..., None],
            ops.where(covered, -math.inf, student_log_probs),
            student_log_probs,
        )
        student_tail_log_prob = ops.where(
            has_tail, ops.logsumexp(uncovered_log_probs, axis=-1), 0.0
        )
        divergence, _ = _bucket_divergence(
            teacher_top_log_probs,
            student_top_log_probs,
            student_tail_log_prob,
            has_tail,
        )
    divergence = temperature**2 * divergence
    return weighted_reduce(divergence, sample_weight, reduction)


@keras.saving.register_keras_serializable(package="keras_distill")
class SparseForwardKL(WeightedMeanLoss):
    """`sparse_forward_kl` as a Keras loss, with sparse targets as `y_true`.

    `y_pred` is the student logits `(..., num_classes)`. `y_true` holds the
    outputs of `top_k_teacher_targets` or `sampled_teacher_targets`, packed
    into one float32 tensor `(..., 2k)` by `pack_sparse_targets`: that is the
    form `model.fit` accepts, since Keras matches `y_true` to the model
    outputs one tensor each and rejects a dict or a tuple for a single
    output. Called directly, the loss also takes the dict
    `{"top_log_probs": ..., "top_indices": ...}`.

    `loss(y_true, student_logits, sample_weight=w)` is
    `sparse_forward_kl(..., sample_weight=w)`: the weighted mean over
    positions, `sum(w · d) / sum(w)`, 0 when every weight is 0 (see
    `keras_distill.losses.weighting.WeightedMeanLoss`; a Keras mask on the
    student's logits multiplies the weights).

    Args:
        temperature: Softening temperature; `None` means 1.0.
        tail: `"renormalize"` (Gemma 3) or `"bucket"`, see
            `sparse_forward_kl`.
        targets_temperature: Temperature the targets were extracted at;
            `None` means `temperature`.
        **kwargs: `WeightedMeanLoss` arguments: `reduction` (`"mean"`,
            `"sum"` or `"none"`), `name`, `dtype`; `dtype` must stay float32
            (or float64) to hold the packed indices exactly.

    Example:

    >>> from keras_distill.targets import pack_sparse_targets, top_k_teacher_targets
    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0, -1.5]])
    >>> student_logits = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0, 0.5]])
    >>> log_probs, indices = top_k_teacher_targets(teacher_logits, 2, 2.0)
    >>> loss = SparseForwardKL(temperature=2.0, tail="bucket")
    >>> y_true = pack_sparse_targets(log_probs, indices)
    >>> round(float(loss(y_true, student_logits)), 4)
    0.5559
    """

    def __init__(
        self,
        temperature=None,
        tail="renormalize",
        targets_temperature=None,
        **kwargs,
    ):
        if temperature is not None:
            check_temperature(temperature)
        if tail not in TAILS:
            raise ValueError(f"`tail` must be one of {TAILS}, got {tail!r}.")
        if targets_temperature is not None:
            check_positive_number("targets_temperature", targets_temperature)
        super().__init__(**kwargs)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(
                "`SparseForwardKL` needs a float32 (or float64) `dtype`: Keras "
                "casts `y_true`, the packed indices included, to the loss "
                f"dtype, and {self.dtype} does not hold them exactly."
            )
        self.temperature = temperature
        self.tail = tail
        self.targets_temperature = targets_temperature

    def call(self, y_true, y_pred):
        if isinstance(y_true, dict):
            if set(y_true) != {"top_log_probs", "top_indices"}:
                raise ValueError(
                    "`SparseForwardKL` takes `y_true` as a dict with keys "
                    '"top_log_probs" and "top_indices", got keys '
                    f"{sorted(y_true)}."
                )
            log_probs = y_true["top_log_probs"]
            indices = ops.cast(ops.round(y_true["top_indices"]), "int32")
        else:
            log_probs, indices = unpack_sparse_targets(y_true)
        return sparse_forward_kl(
            log_probs,
            indices,
            y_pred,
            self.temperature or 1.0,
            tail=self.tail,
            reduction="none",
            targets_temperature=self.targets_temperature,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            tail=self.tail,
            targets_temperature=self.targets_temperature,
        )
        return config
