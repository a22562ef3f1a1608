"""Top-k and sampled-k teacher targets: k teacher entries per token.

Storing or transmitting the teacher's full distribution costs `V` floats per
token (262k for Gemma 3). Sparse distillation keeps `k << V` entries per
position, as `teacher_top_log_probs` (float32, shape `(..., k)`) and
`teacher_top_indices` (int32, shape `(..., k)`), and trains the student on
them. The Gemma 3 report samples 256 entries per token from the teacher
distribution, keeps their probabilities, sets the rest to zero and
renormalizes; `sampled_teacher_targets` followed by `sparse_forward_kl` with
`tail="renormalize"` is that recipe, and `top_k_teacher_targets` its
deterministic variant.
"""

import keras
from keras import ops

from keras_distill.checks import check_positive_int
from keras_distill.checks import check_temperature

# Lower bound of the uniform draws behind the Gumbel noise: keeps
# -log(-log(u)) finite without measurably changing the distribution.
_MIN_UNIFORM = 1e-30


def _check_k(k, num_classes):
    check_positive_int("k", k)
    if num_classes is not None and k > num_classes:
        raise ValueError(
            f"`k` must be at most the vocabulary size: got k={k} for "
            f"`teacher_logits` with {num_classes} classes. Use "
            f"k <= {num_classes} (k={num_classes} keeps the whole "
            "distribution)."
        )


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(
        seed, (int, keras.random.SeedGenerator)
    ):
        raise TypeError(
            "`seed` must be a Python int (the same draws on every call) or a "
            "`keras.random.SeedGenerator` (fresh draws on every call), got "
            f"{seed!r} of type {type(seed).__name__}."
        )


def _teacher_log_probs(teacher_logits, k, temperature):
    check_temperature(temperature)
    teacher_logits = ops.cast(teacher_logits, "float32")
    if len(teacher_logits.shape) < 1:
        raise ValueError(
            "`teacher_logits` must have a class axis, shape "
            f"`(..., num_classes)`, got shape {tuple(teacher_logits.shape)}."
        )
    _check_k(k, teacher_logits.shape[-1])
    return ops.log_softmax(teacher_logits / temperature, axis=-1)


def top_k_teacher_targets(teacher_logits, k, temperature=1.0):
    """The teacher's k most probable entries per position, as sparse targets.

    The log-probabilities are those of the full distribution
    `softmax(teacher_logits / T)` over the whole vocabulary (not renormalized
    over the k entries), sorted in decreasing order. Extract at the
    temperature you train at (see `sparse_forward_kl` for stored targets).

    Args:
        teacher_logits: Teacher logits, shape `(..., num_classes)`.
        k: Number of entries kept per position, `1 <= k <= num_classes`.
        temperature: Softening temperature `T > 0` of the log-probabilities.
            It does not change which entries are kept.

    Returns:
        A tuple `(teacher_top_log_probs, teacher_top_indices)`, float32 and
        int32 tensors of shape `(..., k)`.

    Example:

    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> log_probs, indices = top_k_teacher_targets(teacher_logits, k=2)
    >>> keras.ops.convert_to_numpy(indices).tolist()
    [[0, 1]]
    >>> [round(p, 4) for p in keras.ops.convert_to_numpy(log_probs)[0].tolist()]
    [-0.2413, -1.7413]
    """
    log_probs = _teacher_log_probs(teacher_logits, k, temperature)
    _, indices = ops.top_k(log_probs, k, sorted=True)
    indices = ops.cast(indices, "int32")
    # Gathered rather than top_k's values so both functions return the same
    # log-probabilities bit for bit.
    return ops.take_along_axis(log_probs, indices, axis=-1), indices


def sampled_teacher_targets(teacher_logits, k, seed, temperature=1.0):
    """k entries per position sampled from the teacher, without replacement.

    The Gemma 3 recipe: the kept entries are drawn from the teacher
    distribution `softmax(teacher_logits / T)`, so likely tokens are kept
    more often but the tail is represented too. Implemented with the
    Gumbel-top-k trick: the k largest `log p + Gumbel noise` are an ordered
    sample of k distinct entries, drawn without replacement with probabilities
    proportional to `p`. Entries come in draw order, not sorted.

    Args:
        teacher_logits: Teacher logits, shape `(..., num_classes)`.
        k: Number of entries drawn per position, `1 <= k <= num_classes`.
        seed: A Python int (the same draws on every call: reproducible
            offline extraction) or a `keras.random.SeedGenerator` (fresh
            draws on every call, e.g. once per training step).
        temperature: Temperature `T > 0` of both the sampling distribution
            and the returned log-probabilities.

    Returns:
        A tuple `(teacher_top_log_probs, teacher_top_indices)`, float32 and
        int32 tensors of shape `(..., k)`: the teacher's log-probabilities at
        `T` (of the full distribution, not renormalized) at the drawn indices.

    Example:

    >>> teacher_logits = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0, 0.0]])
    >>> log_probs, indices = sampled_teacher_targets(teacher_logits, 3, seed=0)
    >>> tuple(indices.shape), keras.backend.standardize_dtype(indices.dtype)
    ((1, 3), 'int32')
    >>> len(set(keras.ops.convert_to_numpy(indices)[0].tolist()))
    3
    """
    _check_seed(seed)
    log_probs = _teacher_log_probs(teacher_logits, k, temperature)
    uniform = keras.random.uniform(
        ops.shape(log_probs),
        minval=_MIN_UNIFORM,
        maxval=1.0,
        dtype="float32",
        seed=seed,
    )
    gumbel = -ops.log(-ops.log(uniform))
    _, indices = ops.top_k(log_probs + gumbel, k, sorted=True)
    indices = ops.cast(indices, "int32")
    return ops.take_along_axis(log_probs, indices, axis=-1), indices


def _known_dims_match(a, b):
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def _check_target_pair(log_probs, indices):
    log_shape = tuple(log_probs.shape)
    index_shape = tuple(indices.shape)
    if len(log_shape) < 1 or not _known_dims_match(log_shape, index_shape):
        raise ValueError(
            "`teacher_top_log_probs` and `teacher_top_indices` must have the "
            f"same shape `(..., k)`, got {log_shape} and {index_shape}. Pass "
            "both outputs of `top_k_teacher_targets` or "
            "`sampled_teacher_targets` unchanged."
        )
    dtype = keras.backend.standardize_dtype(indices.dtype)
    if not dtype.startswith(("int", "uint")):
        raise TypeError(
            "`teacher_top_indices` must be an integer tensor, got dtype "
            f"{dtype}. Cast it with `keras.ops.cast(indices, 'int32')`."
        )


def pack_sparse_targets(teacher_top_log_probs, teacher_top_indices):
    """Packs sparse targets into one float32 tensor, a Keras `y_true`.

    `model.fit` accepts one `y_true` tensor per model output, not a dict or a
    tuple, so `SparseForwardKL` takes the targets as
    `concatenate([teacher_top_log_probs, float32(teacher_top_indices)])`.
    Indices are exact in float32 for vocabularies of up to 2²⁴ = 16,777,216
    classes.

    Args:
        teacher_top_log_probs: Teacher log-probabilities, shape `(..., k)`.
        teacher_top_indices: Their integer class indices, shape `(..., k)`.

    Returns:
        A float32 tensor of shape `(..., 2k)`.

    Example:

    >>> log_probs, indices = top_k_teacher_targets([[2.0, 0.5, -1.0]], k=2)
    >>> packed = pack_sparse_targets(log_probs, indices)
    >>> tuple(packed.shape)
    (1, 4)
    >>> keras.ops.convert_to_numpy(unpack_sparse_targets(packed)[1]).tolist()
    [[0, 1]]
    """
    teacher_top_log_probs = ops.cast(teacher_top_log_probs, "float32")
    teacher_top_indices = ops.convert_to_tensor(teacher_top_indices)
    _check_target_pair(teacher_top_log_probs, teacher_top_indices)
    return ops.concatenate(
        [teacher_top_log_probs, ops.cast(teacher_top_indices, "float32")],
        axis=-1,
    )


def unpack_sparse_targets(packed_targets):
    """Splits `pack_sparse_targets`' output back into log-probs and indices.

    Args:
        packed_targets: Float tensor of shape `(..., 2k)`.

    Returns:
        A tuple `(teacher_top_log_probs, teacher_top_indices)`, float32 and
        int32 tensors of shape `(..., k)`.

    Example:

    >>> packed = keras.ops.convert_to_tensor([[-0.2, -1.7, 0.0, 1.0]])
    >>> log_probs, indices = unpack_sparse_targets(packed)
    >>> keras.ops.convert_to_numpy(indices).tolist()
    [[0, 1]]
    """
    packed_targets = ops.convert_to_tensor(packed_targets)
    dtype = keras.backend.standardize_dtype(packed_targets.dtype)
    if dtype not in ("float32", "float64"):
        raise TypeError(
            "Packed sparse targets must be float32 (or float64) to hold the "
            f"indices exactly, got dtype {dtype}. Build them with "
            "`pack_sparse_targets` and keep the loss dtype float32."
        )
    width = packed_targets.shape[-1] if len(packed_targets.shape) else None
    if width is None or width % 2:
        raise ValueError(
            "Packed sparse targets must have an even, known last axis `2k` "
            "(k log-probabilities, then k indices), got shape "
            f"{tuple(packed_targets.shape)}. Build them with "
            "`pack_sparse_targets`."
        )
    k = width // 2
    log_probs = ops.cast(packed_targets[..., :k], "float32")
    indices = ops.cast(ops.round(packed_targets[..., k:]), "int32")
    return log_probs, indices
