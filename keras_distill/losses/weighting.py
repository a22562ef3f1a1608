"""Sample weights, padding masks and reductions shared by every loss.

A `sample_weight` has the shape of the logits without the class axis (for a
language model: a padding mask, 0 for padded tokens). `weighted_reduce`
turns per-position values into a loss with `reduction="mean"` (the weighted
mean over positions that count), `"sum"` or `"none"`; the same rule serves
the dense, sparse and fused losses.
"""

from keras import ops

from keras_distill.checks import check_reduction


def weighted_reduce(values, sample_weight=None, reduction="mean"):
    """Reduces per-position values with optional weights or a padding mask.

    Args:
        values: Tensor of per-example or per-token values.
        sample_weight: Optional weights or 0/1 mask broadcastable to `values`.
        reduction: `"mean"` (`sum(w * v) / sum(w)`, 0 when all weights are
            zero), `"sum"` (`sum(w * v)`) or `"none"` (`w * v`).

    Returns:
        A float32 scalar, or a tensor shaped like `values` for `"none"`.

    Example:

    >>> import keras
    >>> values = keras.ops.convert_to_tensor([1.0, 3.0, 100.0])
    >>> float(weighted_reduce(values, sample_weight=[1.0, 1.0, 0.0]))
    2.0
    """
    check_reduction(reduction)
    values = ops.cast(values, "float32")
    if sample_weight is None:
        if reduction == "none":
            return values
        return ops.sum(values) if reduction == "sum" else ops.mean(values)
    weights = broadcast_weights(sample_weight, values)
    weighted = weights * values
    if reduction == "none":
        return weighted
    total = ops.sum(weighted)
    if reduction == "sum":
        return total
    weight_sum = ops.sum(weights)
    # A safe denominator, not a masked division: `where(w == 0, 0, x / w)`
    # would put 0 * inf into the gradient when every weight is zero.
    safe_sum = ops.where(ops.equal(weight_sum, 0.0), 1.0, weight_sum)
    return total / safe_sum


def broadcast_weights(sample_weight, values):
    """`sample_weight` as float32 weights of the shape of `values`.

    Args:
        sample_weight: Weights or 0/1 mask: per example `(batch,)` or Keras's
            `(batch, 1)` for per-token `values`, or of the shape of `values`.
        values: Per-position values, e.g. `(batch, sequence)`.

    Returns:
        A float32 tensor shaped like `values`.

    Example:

    >>> import keras
    >>> weights = broadcast_weights([1.0, 0.0], keras.ops.ones((2, 3)))
    >>> keras.ops.convert_to_numpy(weights).tolist()
    [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """
    weights = ops.cast(sample_weight, "float32")
    # Per-example weights (batch,) for per-token values (batch, seq), and
    # Keras's (batch, 1) weights for (batch,) values.
    while len(weights.shape) < len(values.shape):
        weights = ops.expand_dims(weights, -1)
    while len(weights.shape) > len(values.shape) and weights.shape[-1] == 1:
        weights = ops.squeeze(weights, -1)
    return ops.broadcast_to(weights, ops.shape(values))


def real_positions(sample_weight, logits):
    """Where `sample_weight` counts, as a mask that selects rows of `logits`.

    Args:
        sample_weight: Optional weights or 0/1 padding mask broadcastable to
            `logits.shape[:-1]`.
        logits: The logits, `(..., classes)`.

    Returns:
        None without `sample_weight`; else a bool tensor of shape
        `logits.shape[:-1] + (1,)`, True where the weight is nonzero.

    Example:

    >>> import keras
    >>> mask = real_positions([[1, 0]], keras.ops.ones((1, 2, 5)))
    >>> keras.ops.convert_to_numpy(mask)[..., 0].tolist()
    [[True, False]]
    """
    if sample_weight is None:
        return None
    weights = broadcast_weights(sample_weight, logits[..., 0])
    return ops.expand_dims(ops.not_equal(weights, 0.0), -1)


def token_count(sample_weight, logits):
    """The number of real tokens (or examples) a loss is averaged over.

    Args:
        sample_weight: Optional weights or 0/1 padding mask broadcastable to
            `logits.shape[:-1]`.
        logits: The logits (or hidden states), `(..., classes)`.

    Returns:
        A float32 scalar: the sum of the weights, or the number of positions
        without weights.

    Example:

    >>> import keras
    >>> float(token_count([[1, 1, 0], [1, 0, 0]], keras.ops.ones((2, 3, 10))))
    3.0
    """
    positions = ops.ones_like(logits[..., 0], dtype="float32")
    return weighted_reduce(positions, sample_weight, reduction="sum")
