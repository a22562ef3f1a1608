"""Sample weights, padding masks and reductions shared by every loss.

A `sample_weight` has the shape of the logits without the class axis (for a
language model: a padding mask, 0 for padded tokens). `weighted_reduce`
turns per-position values into a loss with `reduction="mean"` (the weighted
mean over positions that count), `"sum"` or `"none"`; the same rule serves
the dense, sparse and fused losses, the Distillers, and the loss classes
(`WeightedMeanLoss`, the base of every `keras.losses.Loss` here).
"""

import keras
from keras import ops

# Keras 3 has no public form of these two. `get_keras_mask` reads the mask a
# masking layer attaches to the student's outputs (which Keras's own
# `Loss.__call__` folds into the weights); `scale_loss_for_distribution` is
# the division by the `tf.distribute` replicas Keras's mean reductions make.
from keras.src.backend import get_keras_mask
from keras.src.losses.loss import scale_loss_for_distribution

from keras_distill.checks import REDUCTIONS
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


class WeightedMeanLoss(keras.losses.Loss):
    """A `keras.losses.Loss` reduced by the rule of the loss functions.

    Subclasses return one value per position from `call(y_true, y_pred)`.
    Calling the loss weights those values by `sample_weight` (times the Keras
    mask of `y_pred`, if a masking layer set one) and reduces them with
    `weighted_reduce`: with the default `reduction="mean"` the loss is
    `sum(w · v) / sum(w)`, the weighted mean over the positions that count
    (0, with a zero gradient, when every weight is 0). That is what the
    functions (`forward_kl(..., sample_weight=w)`), the Distillers and the
    fused language-model losses compute, so a loss object and its function
    agree, and a 0/1 padding mask averages over the real positions only.
    Keras's `"sum_over_batch_size"`, which divides by every position, padded
    ones included, is not offered.

    Args:
        reduction: `"mean"` (the weighted mean above), `"sum"`
            (`sum(w · v)`) or `"none"` (`w · v`; `None` means `"none"`).
        name: Optional name of the loss.
        dtype: The dtype `y_true` and `y_pred` are converted to first, as in
            Keras; the maths runs in float32 whatever it is.

    Example:

    >>> class Squared(WeightedMeanLoss):
    ...     def call(self, y_true, y_pred):
    ...         return keras.ops.square(y_pred - y_true)
    >>> y_true = keras.ops.zeros((3,))
    >>> y_pred = keras.ops.convert_to_tensor([1.0, 3.0, 100.0])
    >>> float(Squared()(y_true, y_pred, sample_weight=[1.0, 1.0, 0.0]))
    5.0
    """

    def __init__(self, reduction="mean", name=None, dtype=None):
        reduction = "none" if reduction is None else reduction
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}. "
                "The keras_distill losses reduce as their functions do: "
                '"mean" is the weighted mean over positions, sum(w · loss) / '
                "sum(w) (Keras's \"sum_over_batch_size\" would divide by "
                'every position, padding included); "sum" and "none" are '
                "Keras's."
            )
        # Keras's base keeps its own default: `__call__` below applies this
        # reduction, so Keras's list of reduction names never sees it.
        super().__init__(name=name, dtype=dtype)
        self.reduction = reduction

    def __call__(self, y_true, y_pred, sample_weight=None):
        mask = get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            # As Keras converts them; `y_true` may be a dict of tensors.
            y_true = keras.tree.map_structure(
                lambda x: ops.convert_to_tensor(x, dtype=self.dtype), y_true
            )
            y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
            values = self.call(y_true, y_pred)
            if mask is not None:
                mask = broadcast_weights(mask, values)
                if sample_weight is not None:
                    mask = mask * broadcast_weights(sample_weight, values)
                sample_weight = mask
            loss = weighted_reduce(values, sample_weight, self.reduction)
            if self.reduction == "mean":
                loss = scale_loss_for_distribution(loss)
            return loss
