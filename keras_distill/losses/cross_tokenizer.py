"""Losses between a teacher and a student whose tokenizers differ.

The two models' tokens are aligned into spans by
`keras_distill.language_models.alignment`: a span is a run of student tokens
and a run of teacher tokens covering the same characters. At a span's first
tokens both models have read the same text, so their next-token
distributions there (the span's *first positions*) predict the same thing,
over different vocabularies. Two ways to compare them:

- `uld_distance`: the Universal Logit Distillation loss (Boizard et al.,
  2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs", arXiv:2402.12030): the L1 distance between the
  two probability vectors sorted in decreasing order, the shorter one padded
  with zeros; their Wasserstein-1 distance in closed form under the cost
  that ignores which token is which. It needs no vocabulary mapping and is
  invariant to permuting either vocabulary.
- `shared_vocabulary_divergence`: where a student token's text equals a
  teacher token's, the teacher's probability for it is used directly: the
  forward KL between the two distributions renormalized over the shared
  tokens; the tokens only one side has are compared by ULD (the hybrid of
  GOLD, Hugging Face TRL's General Online Logit Distillation, and of DSKD-style
  span alignment).

`span_distillation_loss` puts them together per span; with `method="span"`
a span of several tokens on either side also compares its joint probability
(the sum of its tokens' conditional log-probabilities): `binary_kl` of the
event "the next characters are this span's" under each model.

Conventions as in `keras_distill.losses.divergences`: pure `keras.ops`,
float32, log space (`log_softmax`, `logsumexp`; probabilities only where ULD
compares them), results multiplied by `T²`. The teacher is given as scores of
`k` entries per position (its logits, or log-probabilities at T = 1 as a
top-k cache stores them, `(..., k)`) with their token ids: its distribution
at `T` is `softmax(scores / T)` over those entries, the whole distribution
when `k` is the vocabulary, renormalized over the top k otherwise.
"""

import math

from keras import ops

from keras_distill.checks import check_temperature
from keras_distill.losses.weighting import weighted_reduce

METHODS = ("uld", "span")


def _safe_product(p, log_p, log_q):
    """`p · (log p - log q)`, 0 where `p` is 0 (no `0 · inf`)."""
    kept = ops.greater(p, 0.0)
    return ops.where(
        kept, ops.where(kept, p, 0.0) * (ops.where(kept, log_p, 0.0) - log_q), 0.0
    )


def _masked_logsumexp(values, mask, axis=-1):
    """`log Σ exp(values)` over `mask`; `-inf` where nothing finite is kept.

    Rows with nothing to sum get a finite stand-in first, so no row of
    `-inf` reaches `logsumexp` (or its gradient).
    """
    kept = ops.logical_and(ops.convert_to_tensor(mask, "bool"), ops.greater(values, -math.inf))
    any_kept = ops.any(kept, axis=axis, keepdims=True)
    safe = ops.where(kept, values, -math.inf)
    safe = ops.where(any_kept, safe, 0.0)
    total = ops.logsumexp(safe, axis=axis)
    return ops.where(ops.squeeze(any_kept, axis), total, -math.inf)


def _teacher_log_probs(teacher_scores, temperature):
    """The teacher at `T` over its entries: `log_softmax(scores / T)`."""
    return ops.log_softmax(ops.cast(teacher_scores, "float32") / temperature, axis=-1)


def _sorted_l1(teacher_probs, student_probs, student_total=None):
    """ULD's `Σ |p_(i) - q_(i)|` over both vectors sorted in decreasing order.

    The teacher's `k` entries hold all its mass. The student's `V` entries
    are cut to its largest `min(k, V)`, the rest of its mass (`student_total`
    minus those, default 1) added as it is: it faces the teacher's zero
    padding. A shorter student is padded with zeros.
    """
    k = teacher_probs.shape[-1]
    size = student_probs.shape[-1]
    teacher_sorted = ops.top_k(teacher_probs, k, sorted=True)[0]
    kept = min(k, size)
    student_sorted = ops.top_k(student_probs, kept, sorted=True)[0]
    if kept < k:
        padding = [[0, 0]] * (len(student_sorted.shape) - 1) + [[0, k - kept]]
        student_sorted = ops.pad(student_sorted, padding)
    distance = ops.sum(ops.abs(teacher_sorted - student_sorted), axis=-1)
    if kept < size:
        if student_total is None:
            student_total = ops.ones_like(distance)
        distance = distance + student_total - ops.sum(student_sorted, axis=-1)
    return distance


def uld_distance(
    teacher_scores,
    student_logits,
    temperature=1.0,
    sample_weight=None,
    reduction="mean",
):
    """Universal Logit Distillation: `T² · Σ_i |p_(i) - q_(i)|`, sorted.

    `p_(i)` and `q_(i)` are the teacher's and the student's probabilities at
    `T` in decreasing order, the shorter vector padded with zeros (Boizard
    et al., 2024). Which token carries which probability does not matter, so
    the two vocabularies need no mapping (and it is the same after permuting
    either). With a top-k teacher (`k` below its vocabulary), the teacher is
    its top k renormalized, and the student's mass beyond its own `k`
    largest entries counts as it is against the teacher's zeros: exact for
    that teacher.

    Args:
        teacher_scores: Teacher logits or log-probabilities of `k` entries,
            `(..., k)` (the whole vocabulary, or a top k).
        student_logits: Student logits, `(..., V)`, same leading shape.
        temperature: Softening temperature `T > 0`.
        sample_weight: Optional per-position weights or mask.
        reduction: `"mean"`, `"sum"` or `"none"` (see `weighted_reduce`).

    Returns:
        The reduced float32 distance.

    Example:

    >>> import keras
    >>> teacher = keras.ops.log(keras.ops.convert_to_tensor([[0.7, 0.2, 0.1]]))
    >>> student = keras.ops.log(keras.ops.convert_to_tensor([[0.1, 0.6, 0.2, 0.1]]))
    >>> round(float(uld_distance(teacher, student)), 4)  # |.7-.6|+|.2-.2|+|.1-.1|+.1
    0.2
    """
    check_temperature(temperature)
    teacher_probs = ops.exp(_teacher_log_probs(teacher_scores, temperature))
    student_probs = ops.exp(
        ops.log_softmax(ops.cast(student_logits, "float32") / temperature, axis=-1)
    )
    distance = temperature**2 * _sorted_l1(teacher_probs, student_probs)
    return weighted_reduce(distance, sample_weight, reduction)


def shared_vocabulary_divergence(
    teacher_scores,
    teacher_indices,
    student_logits,
    teacher_to_student,
    student_is_shared,
    temperature=1.0,
    sample_weight=None,
    reduction="mean",
):
    """Forward KL over the shared tokens plus ULD over the others, times `T²`.

    A teacher entry whose token the student also has (`teacher_to_student`
    maps it to a student id) is compared directly: with `p̃` the teacher's
    distribution renormalized over its shared entries and `q̃` the student's
    renormalized over all its shared tokens, the first term is
    `KL(p̃ || q̃)`. The teacher's other entries and the student's other
    tokens are compared by `uld_distance`'s sorted L1 on their (not
    renormalized) probabilities. When every token is shared (the same
    tokenizer), the second term is exactly 0 and the first is the ordinary
    token-level forward KL.

    Args:
        teacher_scores: Teacher logits or log-probabilities of `k` entries,
            `(..., k)`.
        teacher_indices: Their teacher token ids, `(..., k)`.
        student_logits: Student logits, `(..., V)`.
        teacher_to_student: Int array over the teacher's vocabulary: the
            student id of each teacher token, `-1` where the student lacks it.
        student_is_shared: Bool array `(V,)`, True for the student tokens
            that `teacher_to_student` reaches.
        temperature: Softening temperature `T > 0`.
        sample_weight: Optional per-position weights or mask.
        reduction: `"mean"`, `"sum"` or `"none"`.

    Returns:
        The reduced float32 divergence.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> teacher = keras.ops.convert_to_tensor([[2.0, 0.5, -1.0]])
    >>> student = keras.ops.convert_to_tensor([[1.0, 1.0, 0.0]])
    >>> same = shared_vocabulary_divergence(
    ...     teacher, np.array([[0, 1, 2]]), student, np.arange(3), np.ones(3, bool))
    >>> from keras_distill.losses import forward_kl
    >>> round(float(same), 4), round(float(forward_kl(teacher, student)), 4)
    (0.2795, 0.2795)
    """
    check_temperature(temperature)
    teacher_log_probs = _teacher_log_probs(teacher_scores, temperature)
    teacher_to_student = ops.convert_to_tensor(teacher_to_student, "int32")
    student_ids = ops.take(teacher_to_student, ops.cast(teacher_indices, "int32"))
    teacher_shared = ops.greater_equal(student_ids, 0)
    teacher_shared_total = _masked_logsumexp(teacher_log_probs, teacher_shared)
    # Rows with no shared entry have no KL term (their total is -inf).
    teacher_shared_total = ops.where(
        ops.isfinite(teacher_shared_total), teacher_shared_total, 0.0
    )
    renormalized_teacher = teacher_log_probs - ops.expand_dims(teacher_shared_total, -1)
    student_log_probs = ops.log_softmax(
        ops.cast(student_logits, "float32") / temperature, axis=-1
    )
    student_is_shared = ops.convert_to_tensor(student_is_shared, "bool")
    shared_mask = ops.broadcast_to(student_is_shared, ops.shape(student_log_probs))
    student_shared_total = _masked_logsumexp(student_log_probs, shared_mask)
    student_at_entries = ops.take_along_axis(
        student_log_probs, ops.maximum(student_ids, 0), axis=-1
    ) - ops.expand_dims(student_shared_total, -1)
    shared_probs = ops.where(teacher_shared, ops.exp(renormalized_teacher), 0.0)
    kl = ops.sum(
        _safe_product(
            shared_probs,
            ops.where(teacher_shared, renormalized_teacher, 0.0),
            ops.where(teacher_shared, student_at_entries, 0.0),
        ),
        axis=-1,
    )
    student_probs = ops.exp(student_log_probs)
    student_rest = ops.where(shared_mask, 0.0, student_probs)
    rest = _sorted_l1(
        ops.where(teacher_shared, 0.0, ops.exp(teacher_log_probs)),
        student_rest,
        student_total=ops.sum(student_rest, axis=-1),
    )
    divergence = temperature**2 * (kl + rest)
    return weighted_reduce(divergence, sample_weight, reduction)


def token_log_probs(logits, labels, temperature=1.0):
    """Each position's log-probability of its label, and of anything else.

    Args:
        logits: `(..., V)` logits.
        labels: `(...)` integer labels (the next tokens).
        temperature: Softening temperature `T > 0`.

    Returns:
        `(log q(label), log(1 - q(label)))` at `T`, each `(...)`. The second
        is a `logsumexp` over the other tokens, accurate even where the label
        is all but certain (where `log(1 - exp(log q))` would round to
        `log 0`).

    Example:

    >>> import keras
    >>> logits = keras.ops.log(keras.ops.convert_to_tensor([[0.5, 0.25, 0.25]]))
    >>> chosen, other = token_log_probs(logits, keras.ops.convert_to_tensor([0]))
    >>> round(float(keras.ops.exp(chosen)[0]), 4), round(float(keras.ops.exp(other)[0]), 4)
    (0.5, 0.5)
    """
    check_temperature(temperature)
    log_probs = ops.log_softmax(ops.cast(logits, "float32") / temperature, axis=-1)
    labels = ops.expand_dims(ops.cast(labels, "int32"), -1)
    chosen = ops.take_along_axis(log_probs, labels, axis=-1)[..., 0]
    is_label = ops.equal(
        ops.arange(log_probs.shape[-1], dtype="int32"), labels
    )
    other = _masked_logsumexp(log_probs, ops.logical_not(is_label))
    return chosen, other


def entry_log_probs(teacher_scores, teacher_indices, labels, temperature=1.0):
    """`token_log_probs` of a teacher given by `k` entries per position.

    Args:
        teacher_scores: Logits or log-probabilities of `k` entries, `(..., k)`.
        teacher_indices: Their token ids, `(..., k)`.
        labels: `(...)` the tokens whose probabilities are read.
        temperature: Softening temperature `T > 0`.

    Returns:
        `(log p(label), log(1 - p(label)), found)`: `found` is False where
        the label is not among the entries (or has probability 0); the two
        log-probabilities are then 0 and `-inf`, placeholders to mask.

    Example:

    >>> import keras
    >>> scores = keras.ops.log(keras.ops.convert_to_tensor([[0.6, 0.2]]))
    >>> chosen, other, found = entry_log_probs(scores, [[7, 3]], [3])
    >>> round(float(keras.ops.exp(chosen)[0]), 4), bool(found[0])  # renormalized
    (0.25, True)
    >>> bool(entry_log_probs(scores, [[7, 3]], [5])[2][0])
    False
    """
    log_probs = _teacher_log_probs(teacher_scores, temperature)
    is_label = ops.equal(
        ops.cast(teacher_indices, "int32"),
        ops.expand_dims(ops.cast(labels, "int32"), -1),
    )
    is_label = is_label & ops.greater(log_probs, -math.inf)
    found = ops.any(is_label, axis=-1)
    chosen = ops.sum(ops.where(is_label, log_probs, 0.0), axis=-1)
    other = _masked_logsumexp(log_probs, ops.logical_not(is_label))
    return chosen, other, found


def span_members(span_index, num_spans):
    """Which positions belong to which span.

    Args:
        span_index: `(batch, length)` integers, each position's span (`-1`:
            none), as `TokenAligner.batch` gives them.
        num_spans: Static number of span slots per row.

    Returns:
        `(members, first)`: `members` a bool `(batch, num_spans, length)`
        tensor, `first` the int32 `(batch, num_spans)` first position of each
        span (0 for an empty slot).

    Example:

    >>> import keras
    >>> members, first = span_members(keras.ops.convert_to_tensor([[0, 0, 1, -1]]), 3)
    >>> keras.ops.convert_to_numpy(first).tolist()
    [[0, 2, 0]]
    """
    span_index = ops.cast(span_index, "int32")
    slots = ops.arange(num_spans, dtype="int32")
    members = ops.equal(ops.expand_dims(span_index, 1), slots[None, :, None])
    length = span_index.shape[-1]
    positions = ops.arange(length, dtype="int32")[None, None, :]
    first = ops.min(ops.where(members, positions, length), axis=-1)
    return members, ops.where(ops.less(first, length), first, 0)


def span_log_probs(chosen, other, members):
    """A span's joint log-probability and the log of its complement.

    Args:
        chosen: `(batch, length)` each token's conditional log-probability.
        other: `(batch, length)` the log-probability of any other token there
            (`token_log_probs`'s second output).
        members: `(batch, spans, length)` bool, from `span_members`.

    Returns:
        `(log P(span), log(1 - P(span)))`, each `(batch, spans)`: `P(span)`
        is the product of its tokens' conditional probabilities; its
        complement is the sum, over the span's tokens, of the probability of
        matching up to a token and then not matching it, a `logsumexp` that
        stays accurate when `P(span)` is close to 1. Empty slots give 0 and
        `-inf`.

    Example:

    >>> import math
    >>> import keras
    >>> chosen = keras.ops.log(keras.ops.convert_to_tensor([[0.5, 0.4]]))
    >>> other = keras.ops.log(keras.ops.convert_to_tensor([[0.5, 0.6]]))
    >>> members, _ = span_members(keras.ops.convert_to_tensor([[0, 0]]), 1)
    >>> joint, complement = span_log_probs(chosen, other, members)
    >>> round(math.exp(float(joint[0, 0])), 4), round(math.exp(float(complement[0, 0])), 4)
    (0.2, 0.8)
    """
    members = ops.convert_to_tensor(members, "bool")
    weights = ops.cast(members, "float32")
    chosen = ops.expand_dims(ops.cast(chosen, "float32"), 1)
    joint = ops.sum(weights * chosen, axis=-1)
    # Log-probability of the span's tokens before each position.
    before = ops.cumsum(weights * chosen, axis=-1) - weights * chosen
    complement = _masked_logsumexp(
        before + ops.expand_dims(ops.cast(other, "float32"), 1), members
    )
    return joint, complement


def binary_kl(teacher_log_p, teacher_log_not_p, student_log_p, student_log_not_p):
    """Forward KL between two Bernoulli distributions given in log space.

    `p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))`, with the
    teacher's terms 0 where its probability is 0.

    Args:
        teacher_log_p: `log p`, the teacher's log-probability of the event.
        teacher_log_not_p: `log(1 - p)`.
        student_log_p: `log q`.
        student_log_not_p: `log(1 - q)`.

    Returns:
        The elementwise divergence.

    Example:

    >>> import math
    >>> round(float(binary_kl(math.log(0.5), math.log(0.5), math.log(0.25),
    ...                       math.log(0.75))), 4)
    0.1438
    """
    teacher_log_p = ops.cast(teacher_log_p, "float32")
    teacher_log_not_p = ops.cast(teacher_log_not_p, "float32")
    return _safe_product(
        ops.exp(teacher_log_p), teacher_log_p, student_log_p
    ) + _safe_product(ops.exp(teacher_log_not_p), teacher_log_not_p, student_log_not_p)


def span_distillation_loss(
    teacher_scores,
    teacher_indices,
    teacher_labels,
    teacher_span,
    student_logits,
    student_labels,
    student_span,
    method="uld",
    teacher_to_student=None,
    student_is_shared=None,
    temperature=1.0,
    sample_weight=None,
    return_terms=False,
):
    """The cross-tokenizer distillation loss, averaged over aligned spans.

    For each span the first positions' distributions are compared, by
    `uld_distance` (`method="uld"`) or `shared_vocabulary_divergence`
    (`method="span"`). With `"span"`, a span of more than one token on
    either side adds `binary_kl` between the teacher's and the student's
    probabilities of the span (`span_log_probs`), where all of the teacher's
    span tokens are among its entries (a top-k teacher may lack one; the
    share that counts is in `return_terms`). With the same tokenizer on
    both sides every span is one token each, and `"span"` is exactly the
    token-level forward KL.

    Args:
        teacher_scores: `(batch, teacher_length, k)` teacher logits or
            log-probabilities of `k` entries per position.
        teacher_indices: `(batch, teacher_length, k)` their token ids.
        teacher_labels: `(batch, teacher_length)` the teacher's next tokens.
        teacher_span: `(batch, teacher_length)` each position's span (`-1`:
            none).
        student_logits: `(batch, length, V)` student logits.
        student_labels: `(batch, length)` the student's next tokens.
        student_span: `(batch, length)` each position's span.
        method: `"uld"` or `"span"`.
        teacher_to_student: For `"span"`: the student id of each teacher
            token (`-1`: none).
        student_is_shared: For `"span"`: bool `(V,)` of the student tokens
            the teacher has.
        temperature: Softening temperature `T > 0`.
        sample_weight: Optional `(batch, length)` student weights; a span
            weighs as its first student position.
        return_terms: Also return a dict of diagnostics.

    Returns:
        The float32 weighted mean over spans (0 without spans); with
        `return_terms`, `(loss, terms)` where `terms` has the number of
        `"spans"`, of `"joint_spans"` (multi-token spans whose joint term
        counts) and of `"multi_token_spans"`.

    Example:

    One row: student tokens 0 and 1 cover what teacher token 0 covers.

    >>> import keras
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> teacher_logits = rng.normal(size=(1, 2, 5)).astype("float32")
    >>> student_logits = rng.normal(size=(1, 3, 4)).astype("float32")
    >>> loss = span_distillation_loss(
    ...     teacher_logits, np.tile(np.arange(5), (1, 2, 1)), [[2, 0]], [[0, 1]],
    ...     student_logits, [[1, 3, 0]], [[0, 0, 1]], method="uld")
    >>> expected = np.mean([
    ...     float(uld_distance(teacher_logits[0, i], student_logits[0, j]))
    ...     for i, j in ((0, 0), (1, 2))])
    >>> bool(np.isclose(float(loss), expected))
    True
    """
    check_temperature(temperature)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if method == "span" and (teacher_to_student is None or student_is_shared is None):
        raise ValueError(
            'method="span" compares the tokens both vocabularies share: pass '
            "`teacher_to_student` and `student_is_shared` (see "
            "`TokenAligner.shared_vocabulary`)."
        )
    student_logits = ops.cast(student_logits, "float32")
    teacher_scores = ops.cast(teacher_scores, "float32")
    student_span = ops.convert_to_tensor(student_span, "int32")
    teacher_span = ops.convert_to_tensor(teacher_span, "int32")
    num_spans = min(student_span.shape[-1], teacher_span.shape[-1])
    student_members, student_first = span_members(student_span, num_spans)
    teacher_members, teacher_first = span_members(teacher_span, num_spans)
    present = ops.any(student_members, axis=-1) & ops.any(teacher_members, axis=-1)

    def at_first(values, first):
        return ops.take_along_axis(values, ops.expand_dims(first, -1), axis=1)

    student_first_logits = at_first(student_logits, student_first)
    teacher_first_scores = at_first(teacher_scores, teacher_first)
    if method == "uld":
        per_span = uld_distance(
            teacher_first_scores, student_first_logits, temperature, reduction="none"
        )
    else:
        per_span = shared_vocabulary_divergence(
            teacher_first_scores,
            at_first(ops.cast(teacher_indices, "int32"), teacher_first),
            student_first_logits,
            teacher_to_student,
            student_is_shared,
            temperature,
            reduction="none",
        )
    joint_spans = ops.zeros_like(per_span)
    multi_token = (
        ops.greater(ops.sum(ops.cast(student_members, "int32"), -1), 1)
        | ops.greater(ops.sum(ops.cast(teacher_members, "int32"), -1), 1)
    ) & present
    if method == "span":
        student_chosen, student_other = token_log_probs(
            student_logits, student_labels, temperature
        )
        teacher_chosen, teacher_other, found = entry_log_probs(
            teacher_scores, teacher_indices, teacher_labels, temperature
        )
        student_joint, student_complement = span_log_probs(
            student_chosen, student_other, student_members
        )
        teacher_joint, teacher_complement = span_log_probs(
            teacher_chosen, teacher_other, teacher_members
        )
        missing = teacher_members & ops.logical_not(ops.expand_dims(found, 1))
        joint_spans = ops.cast(
            multi_token & ops.logical_not(ops.any(missing, axis=-1)), "float32"
        )
        joint = binary_kl(
            ops.stop_gradient(teacher_joint),
            ops.stop_gradient(teacher_complement),
            student_joint,
            student_complement,
        )
        per_span = per_span + temperature**2 * ops.where(
            ops.greater(joint_spans, 0.0), joint, 0.0
        )
    weights = ops.cast(present, "float32")
    if sample_weight is not None:
        weights = weights * ops.take_along_axis(
            ops.cast(sample_weight, "float32"), student_first, axis=1
        )
    loss = weighted_reduce(ops.where(present, per_span, 0.0), weights)
    if not return_terms:
        return loss
    return loss, {
        "spans": ops.sum(ops.cast(present, "float32")),
        "multi_token_spans": ops.sum(ops.cast(multi_token, "float32")),
        "joint_spans": ops.sum(joint_spans),
    }
