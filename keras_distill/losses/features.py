"""Hidden-state and attention-map losses, pure functions on `keras.ops`.

- `hidden_state_loss`: layer-normalized (no parameters) hidden states
  compared by MSE or cosine distance, masked per position.
- `attention_map_loss`: `1 - cosine` between the student's and the
  teacher's attention probabilities of each query row, after averaging the
  heads, grouping them, or an explicit head mapping (`map_heads`); padded
  queries do not count.

`keras_distill.distillers.FeatureDistillation` chooses the layers and adds
these terms to a `Distiller`'s loss.
"""

import numbers

import numpy as np
from keras import ops

from keras_distill.checks import check_choice
from keras_distill.losses import weighting

HIDDEN_LOSSES = ("mse", "cosine")


_EPSILON = 1e-6


# ---- Pure loss functions ----


def layer_normalize(x, epsilon=_EPSILON):
    """Normalizes the last axis to zero mean and unit variance (no parameters).

    Args:
        x: Tensor of features, `(..., features)`.
        epsilon: Added to the variance.

    Returns:
        The float32 normalized tensor.

    Example:

    >>> import keras
    >>> x = keras.ops.convert_to_tensor([[1.0, 3.0]])
    >>> keras.ops.convert_to_numpy(layer_normalize(x)).round(3).tolist()
    [[-1.0, 1.0]]
    """
    x = ops.cast(x, "float32")
    mean = ops.mean(x, axis=-1, keepdims=True)
    variance = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * ops.rsqrt(variance + epsilon)


def _unit(x):
    """`x / ||x||` on the last axis, 0 (with a finite gradient) for x = 0."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + 1e-12)


def hidden_state_loss(
    student_hidden, teacher_hidden, loss="mse", sample_weight=None, normalize=True
):
    """Distance between (projected) student and teacher hidden states.

    Args:
        student_hidden: Student features already projected to the teacher's
            width, `(batch, ..., features)`.
        teacher_hidden: Teacher features of the same shape.
        loss: `"mse"` (mean over features of the squared difference) or
            `"cosine"` (`1 - cos` over the features).
        sample_weight: Optional per-example weights `(batch,)` or per-position
            mask `(batch, ...)` (e.g. a padding mask `(batch, sequence)`).
        normalize: Whether both are layer-normalized first.

    Returns:
        The weighted mean over positions, a float32 scalar.

    Example:

    >>> import keras
    >>> student = keras.ops.convert_to_tensor([[[1.0, 2.0], [0.0, 1.0]]])
    >>> teacher = keras.ops.convert_to_tensor([[[1.0, 2.0], [5.0, 1.0]]])
    >>> float(hidden_state_loss(student, teacher, sample_weight=[[1.0, 0.0]]))
    0.0
    """
    check_choice("loss", loss, HIDDEN_LOSSES)
    student_hidden = ops.cast(student_hidden, "float32")
    teacher_hidden = ops.cast(teacher_hidden, "float32")
    if normalize:
        student_hidden = layer_normalize(student_hidden)
        teacher_hidden = layer_normalize(teacher_hidden)
    if loss == "mse":
        values = ops.mean(ops.square(student_hidden - teacher_hidden), axis=-1)
    else:
        values = 1.0 - ops.sum(
            _unit(student_hidden) * _unit(teacher_hidden), axis=-1
        )
    return weighting.weighted_reduce(values, sample_weight)


def map_heads(student_probs, teacher_probs, heads="average"):
    """Brings student and teacher attention maps to the same heads.

    Args:
        student_probs: `(batch, student_heads, queries, keys)`.
        teacher_probs: `(batch, teacher_heads, queries, keys)`.
        heads: `"average"` (the mean over heads of each, one map each),
            `"grouped"` (the model with more heads has its heads averaged in
            contiguous groups down to the other's count, which must divide
            it), or a list giving the teacher head for each student head.

    Returns:
        `(student_probs, teacher_probs)` with equal head counts.

    Example:

    >>> import numpy as np
    >>> student = np.full((1, 2, 3, 3), 1 / 3, "float32")
    >>> teacher = np.full((1, 4, 3, 3), 1 / 3, "float32")
    >>> s, t = map_heads(student, teacher, heads="grouped")
    >>> tuple(s.shape), tuple(t.shape)
    ((1, 2, 3, 3), (1, 2, 3, 3))
    """
    student_heads = student_probs.shape[1]
    teacher_heads = teacher_probs.shape[1]
    _check_head_mapping(heads, student_heads, teacher_heads)
    if heads == "average":
        return (
            ops.mean(student_probs, axis=1, keepdims=True),
            ops.mean(teacher_probs, axis=1, keepdims=True),
        )
    if heads == "grouped":
        return _grouped(student_probs, teacher_heads), _grouped(
            teacher_probs, student_heads
        )
    return student_probs, ops.take(
        teacher_probs, np.asarray(heads, "int32"), axis=1
    )


def _grouped(probs, target_heads):
    heads = probs.shape[1]
    if heads <= target_heads:
        return probs
    shape = ops.shape(probs)
    grouped = ops.reshape(
        probs,
        (shape[0], target_heads, heads // target_heads, shape[2], shape[3]),
    )
    return ops.mean(grouped, axis=2)


def _check_head_mapping(heads, student_heads, teacher_heads):
    if isinstance(heads, str):
        check_choice("attention_heads", heads, ("average", "grouped"))
        if heads == "grouped" and None not in (student_heads, teacher_heads):
            larger, smaller = max(student_heads, teacher_heads), min(
                student_heads, teacher_heads
            )
            if larger % smaller:
                raise ValueError(
                    f"attention_heads='grouped' cannot map {student_heads} "
                    f"student heads to {teacher_heads} teacher heads: one "
                    "count must divide the other. Use 'average' or a list "
                    "giving the teacher head of each student head."
                )
        return
    mapping = list(heads)
    if len(mapping) != student_heads or any(
        isinstance(h, bool) or not isinstance(h, numbers.Integral)
        or not 0 <= h < teacher_heads
        for h in mapping
    ):
        raise ValueError(
            f"`attention_heads` as a list gives one teacher head in "
            f"[0, {teacher_heads}) for each of the {student_heads} student "
            f"heads; got {mapping}."
        )


def attention_map_loss(
    student_probs, teacher_probs, sample_weight=None, heads="average"
):
    """`1 - cosine` between student and teacher attention probabilities.

    Each query row (a distribution over keys) of each mapped head is compared
    by cosine similarity; rows are averaged with `sample_weight` over
    queries.

    Args:
        student_probs: `(batch, student_heads, queries, keys)` probabilities.
        teacher_probs: `(batch, teacher_heads, queries, keys)`.
        sample_weight: Optional `(batch,)` weights or `(batch, queries)`
            padding mask.
        heads: Head handling, see `map_heads`.

    Returns:
        A float32 scalar in `[0, 1]` (probabilities are non-negative).

    Example:

    >>> import numpy as np
    >>> student = np.array([[[[1.0, 0.0], [0.5, 0.5]]]], "float32")
    >>> teacher = np.array([[[[0.0, 1.0], [0.5, 0.5]]]], "float32")
    >>> round(float(attention_map_loss(student, teacher)), 4)
    0.5
    """
    student_probs = ops.cast(student_probs, "float32")
    teacher_probs = ops.cast(teacher_probs, "float32")
    if tuple(student_probs.shape[2:]) != tuple(teacher_probs.shape[2:]) and (
        None not in student_probs.shape[2:] + teacher_probs.shape[2:]
    ):
        raise ValueError(
            "Student and teacher attention maps cover different query/key "
            f"lengths: {tuple(student_probs.shape)} vs "
            f"{tuple(teacher_probs.shape)}; both models must read the same "
            "sequence."
        )
    student_probs, teacher_probs = map_heads(student_probs, teacher_probs, heads)
    similarity = ops.sum(_unit(student_probs) * _unit(teacher_probs), axis=-1)
    # (batch, heads, queries) -> (batch, queries, heads), so that a padding
    # mask over queries lines up with the leading axes.
    values = ops.transpose(1.0 - similarity, (0, 2, 1))
    return weighting.weighted_reduce(values, sample_weight)


