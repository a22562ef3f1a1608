"""Memory-efficient distillation losses for language models.

A language model's logits are large: `num_tokens × vocabulary_size` float32
values, 512 MiB for 512 tokens of Gemma 3's 262,144-entry vocabulary, and a
dense loss (`keras_distill.losses.forward_kl`) keeps several tensors of that
size alive at once. The two losses here work on tiles of the logits and keep
only a few numbers per token between tiles:

- `chunked_distillation_loss` takes materialized teacher and student logits
  and equals a divergence of `keras_distill.losses` with mean reduction,
  computed a chunk of tokens at a time. Peak memory beyond the inputs is the
  gradient itself plus a few chunks.
- `fused_distillation_loss` starts one step earlier, from the student's last
  hidden states and its output embedding (the tied `(vocabulary_size,
  hidden_dim)` table of KerasHub's `ReversibleEmbedding`): the logits of a
  tile of `chunk_size` tokens by `vocabulary_chunk_size` classes are
  computed, soft-capped, used and dropped, in the forward and again in the
  backward pass, so full student logits never exist. It returns the
  next-token cross-entropy and the `T²`-scaled divergence to the teacher,
  given as dense logits, as top-k log-probabilities (as
  `keras_distill.targets.top_k`), or as the teacher's own hidden states and output
  embedding (then no full teacher logits exist either).

How: the softmax over a vocabulary split into blocks needs each row's
log-sum-exp, gathered block by block ("online", as in flash attention). Each
divergence `D = Σ_v f(log p_v, log q_v)` is a sum of elementwise terms (each
`f` and its slope `∂f/∂log q` is defined once, in
`keras_distill.losses.divergences`, and the dense losses use the same), so a
second pass sums the terms and `S = Σ_v ∂f/∂log q_v`; the gradient with
respect to the student's softened logits is then `∂f/∂log q_v - q_v · S` per
tile. The forward KL (the default) needs no second pass: `S = -Σ_v p_v = -1`,
and `D` itself is gathered online with the log-sum-exps (the terms so far
renormalized as those grow, as flash attention rescales its output). A forward
pass then computes each tile's logits once instead of twice: from hidden
states, 6 tile matmuls per value and gradient instead of 8 (the dense path
that materializes the logits does 4).
The forward pass keeps a few numbers per token (log-sum-exps, `S`), the
backward pass recomputes each tile's logits from them and writes the
gradients in place (`keras_distill.backend.chunked_loss`, the only
backend-specific piece). The maths is pure `keras.ops` in float32 log space;
values and gradients equal the dense losses' up to float32 summation order,
on JAX, TensorFlow and PyTorch, inside Keras's compiled train steps too.

The teacher's inputs get no gradient: they are treated as fixed, as a frozen
teacher's outputs are.
"""

import functools
import math

import keras
from keras import ops

from keras_distill import backend
from keras_distill import checks
from keras_distill.losses import divergences
from keras_distill.losses import sparse

# Logits per chunk of `chunked_distillation_loss` when `chunk_size` is None:
# 8 MiB in float32, 8 tokens of a 262,144-entry vocabulary.
DEFAULT_CHUNK_ELEMENTS = 2**21


# Default tile of `fused_distillation_loss`: 256 tokens by 4,096 classes.
DEFAULT_FUSED_CHUNK_SIZE = 256


DEFAULT_VOCABULARY_CHUNK_SIZE = 4096


TEACHER_FORMS = ("logits", "top_k", "hidden_states")


# ---- per-tile maths ----


def _soft_capped(logits, soft_cap):
    if soft_cap is None:
        return logits
    return soft_cap * ops.tanh(logits / soft_cap)


def _logsumexp_update(running, values):
    """Folds the rows of `values` into a running log-sum-exp (-inf: empty)."""
    return ops.logaddexp(running, ops.logsumexp(values, axis=-1))


def _forward_kl_update(divergence, kl, lses, new_lses, teacher, student):
    """Folds one tile into the running `KL(p || q)` of the classes before it.

    `kl` is that divergence with `p` and `q` normalized over the classes
    before (their log-sum-exps `lses`, teacher's and student's); `new_lses`
    add the tile's classes. Renormalizing shifts each past term by the same
    `δ` and scales their mass by `exp(old - new)` (as flash attention
    rescales its output), so every term stays a difference of
    log-probabilities and no large logits cancel. Until the teacher has a
    class with mass (all `-inf` so far) the sum is 0.
    """
    (teacher_lse, student_lse), (new_teacher_lse, new_student_lse) = (
        lses,
        new_lses,
    )
    new_teacher_lse = ops.where(
        ops.isfinite(new_teacher_lse), new_teacher_lse, 0.0
    )
    shift = ops.where(
        ops.isfinite(teacher_lse),
        (teacher_lse - new_teacher_lse) - (student_lse - new_student_lse),
        0.0,
    )
    tile_terms = divergence.terms(
        divergences.LogProbabilities(
            teacher - ops.expand_dims(new_teacher_lse, -1),
            student - ops.expand_dims(new_student_lse, -1),
        )
    )
    return ops.exp(teacher_lse - new_teacher_lse) * (kl + shift) + ops.sum(
        tile_terms, axis=-1
    )


def _class_ids(tile):
    return tile.offset + ops.arange(ops.shape(tile.logits)[1], dtype="int32")


def _gather_in_tile(values, indices, offset):
    """`values[row, indices[row, j] - offset]`, 0 where it is not in the tile."""
    width = ops.shape(values)[1]
    local = indices - offset
    inside = ops.logical_and(
        ops.greater_equal(local, 0), ops.less(local, width)
    )
    gathered = ops.take_along_axis(
        values, ops.clip(local, 0, width - 1), axis=-1
    )
    return ops.where(inside, gathered, 0.0)


def _scatter_to_tile(values, indices, offset, width):
    """A `(rows, width)` tile with `values` at `indices - offset`, else 0.

    Duplicate indices add up (a padding entry, probability 0, may repeat an
    index). Entries outside the tile go to a spare last column, dropped.
    """
    local = indices - offset
    inside = ops.logical_and(
        ops.greater_equal(local, 0), ops.less(local, width)
    )
    columns = ops.where(inside, local, width)
    rows = ops.expand_dims(
        ops.arange(ops.shape(indices)[0], dtype="int32"), -1
    ) + ops.zeros_like(indices)
    coordinates = ops.stack(
        [ops.reshape(rows, (-1,)), ops.reshape(columns, (-1,))], axis=-1
    )
    tile = ops.zeros((ops.shape(indices)[0], width + 1), "float32")
    tile = ops.scatter_update(
        tile,
        coordinates,
        ops.reshape(ops.where(inside, values, 0.0), (-1,)),
        reduction="add",
    )
    return tile[:, :width]


def _probabilities(log_probs):
    """`exp(log_probs)`, with 0 for NaN (an all-padding row's renormalization)."""
    probs = ops.exp(log_probs)
    return ops.where(ops.greater(probs, 0.0), probs, 0.0)


class _TiledLoss:
    """The tile maths of one configuration (see `backend.chunked_loss`).

    Row constants: `weights`, then `labels` (with `has_labels`), then the
    teacher's top-k `log_probs, indices` or `hidden_states`. Tile constants:
    the teacher's `logits`. Class constants: the teacher's `embedding`.
    """

    def __init__(
        self,
        teacher,
        has_labels,
        divergence,
        divergence_kwargs,
        temperature,
        soft_cap,
        teacher_soft_cap,
        tail,
    ):
        self.teacher = teacher
        self.has_labels = has_labels
        self.divergence = divergences.elementwise_divergence(
            divergence, **dict(divergence_kwargs)
        )
        self.temperature = temperature
        self.soft_cap = soft_cap
        self.teacher_soft_cap = teacher_soft_cap
        self.tail = tail
        self.num_values = 1 + has_labels
        # See the module docstring: the forward KL of a dense teacher is
        # gathered in the first pass.
        self.one_pass = (
            teacher != "top_k" and self.divergence.name == "forward_kl"
        )

    def _unpack(self, row_chunks):
        weights, *rest = row_chunks
        labels = rest.pop(0) if self.has_labels else None
        return weights, labels, rest

    def _student_logits(self, tile):
        return _soft_capped(ops.cast(tile.logits, "float32"), self.soft_cap)

    def _softened_teacher(self, tile):
        if self.teacher == "logits":
            logits = ops.cast(tile.tile_constants[0], "float32")
        else:
            logits = _soft_capped(
                ops.cast(
                    backend.project_to_vocabulary(
                        tile.row_constants[-1], tile.class_constants[0]
                    ),
                    "float32",
                ),
                self.teacher_soft_cap,
            )
        return logits / self.temperature

    def _renormalized_targets(self, log_probs):
        # Targets stored at T = 1, renormalized over the k entries at T.
        return ops.log_softmax(
            ops.cast(log_probs, "float32") / self.temperature, axis=-1
        )

    def chunk_forward(self, row_chunks, over_tiles, complete):
        """Values and saved numbers of one chunk (`backend.chunked_loss`)."""
        if complete and self.teacher != "top_k" and not self.has_labels:
            # One tile holds whole rows: one pass with native log-softmaxes,
            # which the backward pass recomputes rather than keep their
            # log-sum-exps.
            sums = over_tiles(
                lambda _, tile: self._complete_tile_sums(tile),
                self._initial_sums(row_chunks),
            )
            divergence = ops.sum(
                row_chunks[0] * self.temperature**2 * sums["divergence"]
            )
            return (divergence,), {"slope": sums["slope"]}
        stats = over_tiles(self._update_stats, self._initial_stats(row_chunks))
        sums = {}
        if self.teacher != "top_k" and not self.one_pass:
            sums = over_tiles(
                lambda sums, tile: self._update_sums(stats, sums, tile),
                self._initial_sums(row_chunks),
            )
        return self._finish(stats, sums, row_chunks)

    def _complete_tile_sums(self, tile):
        log_q = ops.log_softmax(
            self._student_logits(tile) / self.temperature, axis=-1
        )
        log_p = ops.log_softmax(self._softened_teacher(tile), axis=-1)
        return self._term_sums(divergences.LogProbabilities(log_p, log_q))

    def _term_sums(self, x):
        return {
            "divergence": ops.sum(self.divergence.terms(x), axis=-1),
            "slope": ops.sum(self.divergence.slopes(x), axis=-1),
        }

    # -- pass 1: row statistics --

    def _initial_stats(self, row_chunks):
        weights, _, teacher_rows = self._unpack(row_chunks)
        empty = ops.full_like(weights, -math.inf)
        stats = {"student_lse": empty}
        if self.has_labels:
            stats["label_logit"] = ops.zeros_like(weights)
            if self.temperature != 1.0:
                stats["student_lse_t1"] = empty
        if self.teacher == "top_k":
            stats["top_student"] = ops.zeros_like(teacher_rows[0], "float32")
            if self.tail == "bucket":
                stats["uncovered_lse"] = empty
        else:
            stats["teacher_lse"] = empty
            if self.one_pass:
                stats["forward_kl"] = ops.zeros_like(weights)
        return stats

    def _update_stats(self, stats, tile):
        previous, stats = stats, dict(stats)
        _, labels, teacher_rows = self._unpack(tile.row_constants)
        logits = self._student_logits(tile)
        softened = logits / self.temperature
        stats["student_lse"] = _logsumexp_update(stats["student_lse"], softened)
        if self.has_labels:
            stats["label_logit"] = stats["label_logit"] + ops.squeeze(
                _gather_in_tile(logits, ops.expand_dims(labels, -1), tile.offset),
                -1,
            )
            if self.temperature != 1.0:
                stats["student_lse_t1"] = _logsumexp_update(
                    stats["student_lse_t1"], logits
                )
        if self.teacher != "top_k":
            teacher = self._softened_teacher(tile)
            teacher_lse = _logsumexp_update(stats["teacher_lse"], teacher)
            if self.one_pass:
                stats["forward_kl"] = _forward_kl_update(
                    self.divergence,
                    previous["forward_kl"],
                    (previous["teacher_lse"], previous["student_lse"]),
                    (teacher_lse, stats["student_lse"]),
                    teacher,
                    softened,
                )
            stats["teacher_lse"] = teacher_lse
            return stats
        _, indices = teacher_rows
        stats["top_student"] = stats["top_student"] + _gather_in_tile(
            softened, indices, tile.offset
        )
        if self.tail == "bucket":
            covered = _scatter_to_tile(
                ops.ones_like(indices, "float32"),
                indices,
                tile.offset,
                ops.shape(softened)[1],
            )
            stats["uncovered_lse"] = _logsumexp_update(
                stats["uncovered_lse"],
                ops.where(ops.greater(covered, 0.0), -math.inf, softened),
            )
        return stats

    # -- pass 2 (dense teachers): the divergence's terms and their slope --

    def _initial_sums(self, row_chunks):
        weights = row_chunks[0]
        return {
            "divergence": ops.zeros_like(weights),
            "slope": ops.zeros_like(weights),
        }

    def _update_sums(self, stats, sums, tile):
        log_q = self._student_logits(tile) / self.temperature - ops.expand_dims(
            stats["student_lse"], -1
        )
        log_p = self._softened_teacher(tile) - ops.expand_dims(
            stats["teacher_lse"], -1
        )
        tile_sums = self._term_sums(divergences.LogProbabilities(log_p, log_q))
        return {key: sums[key] + tile_sums[key] for key in sums}

    def _finish(self, stats, sums, row_chunks):
        weights, _, teacher_rows = self._unpack(row_chunks)
        student_lse = stats["student_lse"]
        saved = {"student_lse": student_lse}
        values = []
        if self.has_labels:
            lse_t1 = student_lse
            if self.temperature != 1.0:
                lse_t1 = saved["student_lse_t1"] = stats["student_lse_t1"]
            values.append(ops.sum(weights * (lse_t1 - stats["label_logit"])))
        if self.teacher != "top_k":
            saved["teacher_lse"] = stats["teacher_lse"]
            if self.one_pass:
                divergence = stats["forward_kl"]
                saved["slope"] = ops.full_like(student_lse, -1.0)
            else:
                divergence = sums["divergence"]
                saved["slope"] = sums["slope"]
        else:
            log_probs, _ = teacher_rows
            top_log_q = stats["top_student"] - ops.expand_dims(student_lse, -1)
            if self.tail == "renormalize":
                divergence = sparse._top_k_divergence(
                    self._renormalized_targets(log_probs), top_log_q
                )
            else:
                uncovered_lse = stats["uncovered_lse"]
                has_tail = ops.isfinite(uncovered_lse)
                divergence, teacher_tail = sparse._bucket_divergence(
                    ops.cast(log_probs, "float32"),
                    top_log_q,
                    ops.where(has_tail, uncovered_lse - student_lse, 0.0),
                    has_tail,
                )
                saved["uncovered_lse"] = ops.where(has_tail, uncovered_lse, 0.0)
                saved["teacher_tail"] = _probabilities(teacher_tail)
        values.append(
            ops.sum(weights * self.temperature**2 * divergence)
        )
        return tuple(values), saved

    # -- backward: the gradient with respect to one tile's logits --

    def tile_gradient(self, saved, cotangents, tile):
        weights, labels, teacher_rows = self._unpack(tile.row_constants)
        cotangents = list(cotangents)
        logits = self._student_logits(tile)
        softened = logits / self.temperature
        if "student_lse" in saved:
            log_q = softened - ops.expand_dims(saved["student_lse"], -1)
        else:  # a complete tile (see `chunk_forward`)
            log_q = ops.log_softmax(softened, axis=-1)
        if self.teacher != "top_k":
            log_p = self._softened_teacher(tile)
            if "teacher_lse" in saved:
                log_p = log_p - ops.expand_dims(saved["teacher_lse"], -1)
            else:
                log_p = ops.log_softmax(log_p, axis=-1)
            tile_log_probs = divergences.LogProbabilities(log_p, log_q)
            student_probs = tile_log_probs.q
        else:
            student_probs = ops.exp(log_q)
        label_gradient = None
        if self.has_labels:
            probs_t1 = student_probs
            if self.temperature != 1.0:
                probs_t1 = ops.exp(
                    logits - ops.expand_dims(saved["student_lse_t1"], -1)
                )
            one_hot = ops.equal(_class_ids(tile), ops.expand_dims(labels, -1))
            label_gradient = ops.expand_dims(
                cotangents.pop(0) * weights, -1
            ) * (probs_t1 - ops.cast(one_hot, "float32"))
        if self.teacher != "top_k":
            softened_gradient = self.divergence.slopes(
                tile_log_probs
            ) - student_probs * ops.expand_dims(saved["slope"], -1)
        else:
            log_probs, indices = teacher_rows
            if self.tail == "renormalize":
                log_probs = self._renormalized_targets(log_probs)
            probs = _probabilities(ops.cast(log_probs, "float32"))
            mass = ops.sum(probs, axis=-1)
            softened_gradient = _scatter_to_tile(
                -probs, indices, tile.offset, ops.shape(logits)[1]
            )
            if self.tail == "bucket":
                tail = saved["teacher_tail"]
                mass = mass + tail
                covered = _scatter_to_tile(
                    ops.ones_like(probs), indices, tile.offset,
                    ops.shape(logits)[1],
                )
                uncovered_share = ops.where(
                    ops.greater(covered, 0.0),
                    0.0,
                    ops.exp(
                        softened - ops.expand_dims(saved["uncovered_lse"], -1)
                    ),
                )
                softened_gradient = softened_gradient - ops.expand_dims(
                    tail, -1
                ) * uncovered_share
            softened_gradient = softened_gradient + student_probs * (
                ops.expand_dims(mass, -1)
            )
            # A padding row's targets may be all -inf (NaN once
            # renormalized): its weight is 0, and so must its gradient be.
            softened_gradient = ops.where(
                ops.expand_dims(ops.equal(weights, 0.0), -1),
                0.0,
                softened_gradient,
            )
        # d(T² · D)/d logits = T · dD/d(logits / T).
        row_scale = cotangents[0] * self.temperature * weights
        gradient = ops.expand_dims(row_scale, -1) * softened_gradient
        if label_gradient is not None:
            gradient = gradient + label_gradient
        if self.soft_cap is not None:
            gradient = gradient * (1.0 - ops.square(logits / self.soft_cap))
        return gradient


@functools.lru_cache(maxsize=None)
def _tiled_loss(*config):
    # One object per configuration: the JAX path compiles once per object.
    return _TiledLoss(*config)


# ---- argument checks ----


def _check_divergence(divergence, divergence_kwargs):
    # Fail now, with the divergence's own message on its arguments (the
    # tiled loss of a configuration is built once and cached).
    divergences.elementwise_divergence(divergence, **dict(divergence_kwargs))


def _last_axis(name, tensor):
    size = tensor.shape[-1] if len(tensor.shape) else None
    if size is None:
        raise ValueError(
            f"`{name}` must have a known last axis, got shape "
            f"{tuple(tensor.shape)}."
        )
    return size


def _same_known_dims(a, b):
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def _check_token_shape(name, tensor, token_shape, trailing=()):
    expected = tuple(token_shape) + tuple(trailing)
    if not _same_known_dims(tuple(tensor.shape), expected):
        raise ValueError(
            f"`{name}` must have shape {expected}, one entry per token of "
            f"`student_hidden_states`, got {tuple(tensor.shape)}."
        )


def _check_integer(name, tensor):
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if not dtype.startswith(("int", "uint")):
        raise TypeError(
            f"`{name}` must be an integer tensor of class ids, got dtype "
            f"{dtype}. Cast it with `keras.ops.cast({name}, 'int32')`."
        )


def _check_class_ids(name, ids, num_classes):
    """Raises on ids outside `[0, num_classes)` when their values are known.

    Returns a boolean scalar tensor, True when every id is in range, for
    the compiled case, where no Python error can be raised.
    """
    values = backend.concrete_value(ids)
    if values is not None and values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`{name}` must hold class ids in [0, {num_classes}) (the "
                f"vocabulary of `student_embedding`), got values from {low} "
                f"to {high}. Mask positions with `sample_weight`, not with "
                "out-of-range ids."
            )
    return ops.logical_and(
        ops.all(ops.greater_equal(ids, 0)), ops.all(ops.less(ids, num_classes))
    )


def _token_weights(sample_weight, token_shape):
    """Float32 weights, one per token, flattened to `(num_tokens,)`.

    Broadcast as `keras_distill.losses.weighted_reduce` does: per-token
    weights or padding mask, `(batch,)` per-sequence weights, or Keras's
    `(batch, 1)`.
    """
    if sample_weight is None:
        return ops.reshape(ops.ones(token_shape, "float32"), (-1,))
    weights = ops.cast(sample_weight, "float32")
    original_shape = tuple(weights.shape)
    while len(weights.shape) < len(token_shape):
        weights = ops.expand_dims(weights, -1)
    while len(weights.shape) > len(token_shape) and weights.shape[-1] == 1:
        weights = ops.squeeze(weights, -1)
    try:
        weights = ops.broadcast_to(weights, token_shape)
    except Exception as error:
        raise ValueError(
            f"`sample_weight` of shape {original_shape} does not broadcast "
            f"to the tokens' shape {tuple(token_shape)}: pass one weight (or "
            "0/1 padding mask entry) per token, or one per sequence."
        ) from error
    return ops.reshape(weights, (-1,))


def _weighted_mean(total, weights):
    weight_sum = ops.sum(weights)
    # A safe denominator (not a masked division): an all-zero mask gives a
    # finite 0 with a zero, not NaN, gradient.
    return total / ops.where(ops.equal(weight_sum, 0.0), 1.0, weight_sum)


# ---- public API ----


def chunked_distillation_loss(
    teacher_logits,
    student_logits,
    temperature=1.0,
    sample_weight=None,
    divergence="forward_kl",
    chunk_size=None,
    **divergence_kwargs,
):
    """A divergence of `keras_distill.losses`, computed a chunk at a time.

    Equals `keras_distill.losses.DIVERGENCES[divergence](teacher_logits,
    student_logits, temperature, sample_weight=sample_weight)` (`T²`-scaled,
    mean over the weighted tokens), value and gradient, while keeping only a
    few chunks of `chunk_size` tokens alive besides the inputs and the
    gradient: the backward pass recomputes each chunk from two numbers per
    token instead of storing the forward pass. No gradient flows to
    `teacher_logits`.

    Args:
        teacher_logits: Teacher logits `(..., num_classes)`, any leading
            token axes (e.g. `(batch, sequence_length, vocabulary_size)`).
        student_logits: Student logits, same shape.
        temperature: Softening temperature `T > 0`.
        sample_weight: Optional per-token weights or 0/1 padding mask, shape
            of the logits without the class axis (or one per sequence). An
            all-zero mask gives a finite 0 with a zero gradient.
        divergence: A name in `keras_distill.losses.DIVERGENCES`:
            `"forward_kl"`, `"reverse_kl"`, `"generalized_jsd"`,
            `"total_variation"` or `"skew_kl"`.
        chunk_size: Tokens per chunk, or None for about 2M logits per chunk
            (8 tokens of a 262,144-entry vocabulary).
        **divergence_kwargs: The divergence's extra arguments, e.g.
            `beta=0.5` for `"generalized_jsd"`.

    Returns:
        The float32 scalar loss.

    Example:

    >>> teacher_logits = keras.random.normal((2, 5, 11), seed=0)
    >>> student_logits = keras.random.normal((2, 5, 11), seed=1)
    >>> chunked = chunked_distillation_loss(
    ...     teacher_logits, student_logits, temperature=2.0, chunk_size=3
    ... )
    >>> dense = divergences.forward_kl(teacher_logits, student_logits, 2.0)
    >>> bool(abs(float(chunked) - float(dense)) <= 1e-5 * float(dense))
    True
    """
    checks.check_positive_number("temperature", temperature)
    checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    divergence_kwargs = tuple(sorted(divergence_kwargs.items()))
    _check_divergence(divergence, divergence_kwargs)
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    student_logits = ops.convert_to_tensor(student_logits)
    teacher_shape = tuple(teacher_logits.shape)
    student_shape = tuple(student_logits.shape)
    if len(student_shape) < 1 or not _same_known_dims(
        teacher_shape, student_shape
    ):
        raise ValueError(
            "`teacher_logits` and `student_logits` must have the same shape "
            f"`(..., num_classes)`, got {teacher_shape} and {student_shape}."
        )
    num_classes = _last_axis("student_logits", student_logits)
    weights = _token_weights(sample_weight, ops.shape(student_logits)[:-1])
    loss = _tiled_loss(
        "logits", False, divergence, divergence_kwargs, float(temperature),
        None, None, None,
    )
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // num_classes)
    (total,) = backend.chunked_loss(
        loss,
        ops.reshape(student_logits, (-1, num_classes)),
        row_constants=(weights,),
        tile_constants=(ops.reshape(teacher_logits, (-1, num_classes)),),
        chunk_size=chunk_size,
    )
    return _weighted_mean(total, weights)


def fused_distillation_loss(
    student_hidden_states,
    student_embedding,
    labels=None,
    teacher_logits=None,
    teacher_top_log_probs=None,
    teacher_top_indices=None,
    temperature=1.0,
    alpha=0.1,
    sample_weight=None,
    soft_cap=None,
    divergence="forward_kl",
    tail="renormalize",
    chunk_size=None,
    vocabulary_chunk_size=None,
    teacher_hidden_states=None,
    teacher_embedding=None,
    teacher_soft_cap=None,
    **divergence_kwargs,
):
    """Hard-label CE and divergence from hidden states, without full logits.

    The student's logits are `soft_cap · tanh(h @ E.T / soft_cap)` (`h @ E.T`
    without a soft-cap), `h` its last hidden states and `E` its output
    embedding, computed a tile of `chunk_size` tokens by
    `vocabulary_chunk_size` classes at a time and recomputed in the backward
    pass. The loss is

        alpha · CE(labels, student) + (1 - alpha) · T² · D(teacher, student)

    with CE the next-token cross-entropy (at temperature 1) and `D` the
    divergence at temperature `T`, each averaged over the weighted tokens
    (`sum(w · loss) / sum(w)`; a finite 0 when all weights are 0). The
    gradient flows to `student_hidden_states` and `student_embedding`.

    The teacher comes in exactly one of three forms:

    - `teacher_logits` `(..., vocabulary_size)`: the logits the teacher
      model outputs (soft-capped already if the model caps them);
    - `teacher_top_log_probs` and `teacher_top_indices` `(..., k)`: the
      teacher's log-probabilities at temperature 1 at its kept entries, as
      `keras_distill.targets.top_k_teacher_targets(teacher_logits, k)` (or
      `sampled_teacher_targets`) returns them; `D` is then
      `keras_distill.losses.sparse_forward_kl(..., tail=tail,
      targets_temperature=1.0)`: `"renormalize"` (the Gemma 3 recipe)
      renormalizes the k entries at `T` and counts the rest as 0;
      `"bucket"` keeps the uncovered mass as one extra class (it needs
      `temperature=1.0`, the temperature the targets were stored at);
    - `teacher_hidden_states` `(..., teacher_hidden_dim)` and
      `teacher_embedding` `(vocabulary_size, teacher_hidden_dim)`: the
      teacher's logits are computed tile by tile too, soft-capped with
      `teacher_soft_cap`, so no full logits of either model exist.

    Args:
        student_hidden_states: The student's last hidden states (after its
            final normalization), `(..., hidden_dim)`, e.g. `(batch,
            sequence_length, hidden_dim)`.
        student_embedding: The output embedding `(vocabulary_size,
            hidden_dim)`, e.g. a tied `ReversibleEmbedding`'s `embeddings`.
            For an untied `(hidden_dim, vocabulary_size)` output kernel, pass
            its transpose.
        labels: Integer next-token ids `(...)`: `labels[..., i]` is the
            target of position `i` (already shifted, as KerasHub's
            `CausalLMPreprocessor` returns `y`). Required unless `alpha` is 0.
        teacher_logits: Dense teacher logits, see above.
        teacher_top_log_probs: Top-k teacher log-probabilities, see above.
        teacher_top_indices: Their integer class ids.
        temperature: Softening temperature `T > 0` of the divergence.
        alpha: Weight of the cross-entropy, in `[0, 1]`.
        sample_weight: Optional per-token weights or 0/1 padding mask `(...)`
            (or one per sequence).
        soft_cap: The student's final-logit soft-cap (Gemma 2's
            `final_logit_soft_cap`), or None.
        divergence: A name in `keras_distill.losses.DIVERGENCES`; top-k
            targets support `"forward_kl"` only.
        tail: `"renormalize"` or `"bucket"`, for top-k targets.
        chunk_size: Tokens per tile, or None for 256.
        vocabulary_chunk_size: Classes per tile, or None for 4,096.
        teacher_hidden_states: The teacher's last hidden states, see above.
        teacher_embedding: The teacher's output embedding, see above.
        teacher_soft_cap: The teacher's final-logit soft-cap, or None; used
            with `teacher_hidden_states` only.
        **divergence_kwargs: The divergence's extra arguments, e.g.
            `beta=0.5` for `"generalized_jsd"`.

    Returns:
        A dict of float32 scalars: `"loss"` (the weighted sum above),
        `"student_loss"` (the cross-entropy; 0 without labels) and
        `"distillation_loss"` (the `T²`-scaled divergence).

    Example:

    >>> hidden_states = keras.random.normal((2, 5, 8), seed=0)
    >>> embedding = keras.random.normal((11, 8), seed=1)
    >>> teacher_logits = keras.random.normal((2, 5, 11), seed=2)
    >>> labels = keras.ops.ones((2, 5), "int32")
    >>> result = fused_distillation_loss(
    ...     hidden_states, embedding, labels, teacher_logits=teacher_logits,
    ...     temperature=2.0, alpha=0.5, chunk_size=4, vocabulary_chunk_size=3,
    ... )
    >>> student_logits = keras.ops.matmul(
    ...     hidden_states, keras.ops.transpose(embedding)
    ... )
    >>> dense = divergences.forward_kl(teacher_logits, student_logits, 2.0)
    >>> fused = float(result["distillation_loss"])
    >>> bool(abs(fused - float(dense)) <= 1e-5 * float(dense))
    True
    """
    checks.check_positive_number("temperature", temperature)
    checks.check_unit_interval("alpha", alpha)
    checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    checks.check_positive_int(
        "vocabulary_chunk_size", vocabulary_chunk_size, allow_none=True
    )
    for name, cap in (("soft_cap", soft_cap), ("teacher_soft_cap", teacher_soft_cap)):
        if cap is not None:
            checks.check_positive_number(name, cap)
    if tail not in sparse.TAILS:
        raise ValueError(f"`tail` must be one of {sparse.TAILS}, got {tail!r}.")
    divergence_kwargs = tuple(sorted(divergence_kwargs.items()))
    _check_divergence(divergence, divergence_kwargs)

    hidden_states = ops.convert_to_tensor(student_hidden_states)
    embedding = ops.convert_to_tensor(student_embedding)
    hidden_dim = _last_axis("student_hidden_states", hidden_states)
    embedding_shape = tuple(embedding.shape)
    token_shape = tuple(hidden_states.shape)[:-1]
    if len(embedding_shape) != 2 or embedding_shape[1] != hidden_dim:
        raise ValueError(
            "`student_embedding` must be the output embedding, shape "
            f"`(vocabulary_size, {hidden_dim})` for `student_hidden_states` "
            f"{tuple(hidden_states.shape)}, got {embedding_shape}. For an "
            "untied `(hidden_dim, vocabulary_size)` output kernel, pass "
            "`keras.ops.transpose(kernel)`."
        )
    num_classes = embedding_shape[0]

    given = {
        "logits": teacher_logits is not None,
        "top_k": teacher_top_log_probs is not None
        or teacher_top_indices is not None,
        "hidden_states": teacher_hidden_states is not None
        or teacher_embedding is not None,
    }
    if sum(given.values()) != 1:
        raise ValueError(
            "Pass the teacher in exactly one form: `teacher_logits`; or "
            "`teacher_top_log_probs` with `teacher_top_indices`; or "
            "`teacher_hidden_states` with `teacher_embedding`. Got "
            f"{[form for form in TEACHER_FORMS if given[form]] or 'none'}."
        )
    teacher = next(form for form in TEACHER_FORMS if given[form])

    row_constants, tile_constants, class_constants = [], [], []
    ids_valid = []
    if teacher == "logits":
        teacher_logits = ops.convert_to_tensor(teacher_logits)
        if _last_axis("teacher_logits", teacher_logits) != num_classes:
            raise ValueError(
                f"`teacher_logits` has {teacher_logits.shape[-1]} classes but "
                f"`student_embedding` has {num_classes} rows: teacher and "
                "student must share the vocabulary (slice a padded table to "
                "the shared vocabulary first)."
            )
        _check_token_shape(
            "teacher_logits", teacher_logits, token_shape, (num_classes,)
        )
        tile_constants.append(ops.reshape(teacher_logits, (-1, num_classes)))
    elif teacher == "top_k":
        if teacher_top_log_probs is None or teacher_top_indices is None:
            raise ValueError(
                "Top-k teacher targets need both `teacher_top_log_probs` and "
                "`teacher_top_indices`."
            )
        if divergence != "forward_kl":
            raise ValueError(
                "Top-k teacher targets support divergence='forward_kl' only, "
                f"got {divergence!r}: pass dense `teacher_logits` or the "
                "teacher's hidden states for other divergences."
            )
        if tail == "bucket" and temperature != 1.0:
            raise ValueError(
                'tail="bucket" needs the loss at the temperature the top-k '
                f"targets were stored at (1.0), got temperature={temperature}: "
                "the mass outside the k entries at another temperature is "
                'unknown. Use tail="renormalize".'
            )
        log_probs = ops.convert_to_tensor(teacher_top_log_probs)
        indices = ops.convert_to_tensor(teacher_top_indices)
        _check_integer("teacher_top_indices", indices)
        k = _last_axis("teacher_top_log_probs", log_probs)
        _check_token_shape("teacher_top_log_probs", log_probs, token_shape, (k,))
        _check_token_shape("teacher_top_indices", indices, token_shape, (k,))
        if k > num_classes:
            raise ValueError(
                f"The teacher targets keep k={k} entries per token, more than "
                f"the vocabulary's {num_classes} classes."
            )
        ids_valid.append(
            _check_class_ids("teacher_top_indices", indices, num_classes)
        )
        row_constants += [
            ops.reshape(ops.cast(log_probs, "float32"), (-1, k)),
            ops.reshape(ops.cast(indices, "int32"), (-1, k)),
        ]
    else:
        if teacher_hidden_states is None or teacher_embedding is None:
            raise ValueError(
                "A fused teacher needs both `teacher_hidden_states` and "
                "`teacher_embedding`."
            )
        teacher_hidden_states = ops.convert_to_tensor(teacher_hidden_states)
        teacher_embedding = ops.convert_to_tensor(teacher_embedding)
        teacher_dim = _last_axis("teacher_hidden_states", teacher_hidden_states)
        if tuple(teacher_embedding.shape) != (num_classes, teacher_dim):
            raise ValueError(
                "`teacher_embedding` must have shape `(vocabulary_size, "
                f"teacher_hidden_dim)` = {(num_classes, teacher_dim)}, the "
                "vocabulary of `student_embedding` and the width of "
                f"`teacher_hidden_states`, got {tuple(teacher_embedding.shape)}."
            )
        _check_token_shape(
            "teacher_hidden_states", teacher_hidden_states, token_shape,
            (teacher_dim,),
        )
        row_constants.append(
            ops.reshape(teacher_hidden_states, (-1, teacher_dim))
        )
        class_constants.append(
            ops.cast(teacher_embedding, teacher_hidden_states.dtype)
        )

    has_labels = labels is not None
    if has_labels:
        labels = ops.convert_to_tensor(labels)
        _check_integer("labels", labels)
        _check_token_shape("labels", labels, token_shape)
        ids_valid.append(_check_class_ids("labels", labels, num_classes))
        row_constants.insert(0, ops.reshape(ops.cast(labels, "int32"), (-1,)))
    elif alpha > 0:
        raise ValueError(
            f"alpha={alpha} weights a cross-entropy on `labels`, but no labels "
            "were given: pass the next-token `labels`, or alpha=0 to learn "
            "from the teacher alone."
        )

    weights = _token_weights(sample_weight, ops.shape(hidden_states)[:-1])
    loss = _tiled_loss(
        teacher,
        has_labels,
        divergence,
        divergence_kwargs,
        float(temperature),
        None if soft_cap is None else float(soft_cap),
        None if teacher_soft_cap is None else float(teacher_soft_cap),
        tail,
    )
    totals = backend.chunked_loss(
        loss,
        ops.reshape(hidden_states, (-1, hidden_dim)),
        # The logits' matmul runs in the hidden states' dtype, as the model's.
        embedding=ops.cast(embedding, hidden_states.dtype),
        row_constants=(weights, *row_constants),
        tile_constants=tile_constants,
        class_constants=class_constants,
        chunk_size=chunk_size or DEFAULT_FUSED_CHUNK_SIZE,
        block_size=vocabulary_chunk_size or DEFAULT_VOCABULARY_CHUNK_SIZE,
    )
    totals = [_weighted_mean(total, weights) for total in totals]
    distillation_loss = totals[-1]
    student_loss = totals[0] if has_labels else ops.zeros((), "float32")
    loss_value = alpha * student_loss + (1.0 - alpha) * distillation_loss
    if ids_valid:
        # Inside a compiled step out-of-range ids cannot raise: the loss is
        # NaN instead (loud), with a zero gradient (no corrupted update).
        valid = functools.reduce(ops.logical_and, ids_valid)
        loss_value = loss_value * ops.cast(valid, "float32") + ops.stop_gradient(
            ops.where(valid, 0.0, math.nan)
        )
    return {
        "loss": loss_value,
        "student_loss": student_loss,
        "distillation_loss": distillation_loss,
    }
