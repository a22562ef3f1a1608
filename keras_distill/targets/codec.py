"""A compact on-disk format for top-k teacher targets, in vectorized NumPy.

A language-model teacher's top-k targets are, per token, k distinct vocabulary
indices and their log-probabilities. Stored plainly (float16 values, 32-bit
indices) they take 6k bytes per token: 1.5 KB at k = 256. This codec stores
them in about 2k bytes (measured in `benchmarks/README.md`), with the
indices exact and the stored distribution within a chosen total variation
(default 1e-3) of the teacher's top-k distribution renormalized over its k
entries, for every token.

Per token, with the entries sorted by index:

- Indices: the gaps between consecutive sorted indices (`i_0`, then
  `i_j - i_{j-1} - 1`), Rice-coded with the per-token parameter `b` that
  minimizes their size: the quotient `gap >> b` in unary, the low `b` bits in
  binary. k uniformly spread indices in a vocabulary V cost about
  `log2(V / k) + 1.5` bits each (11.5 bits at V = 262,144, k = 256), close to
  the `log2 C(V, k) / k` bits any code needs.
- Values: the probabilities `r = p / max(p)` (renormalized over the k entries)
  quantized uniformly, `q = round(r / step)`, and coded with an order-`o`
  exponential-Golomb code (the length of `q + 2^o` in unary, then its low
  bits), `o` again chosen per token. A uniform step on `p` is what minimizes
  the coded size for a given total variation (an L1 error on `p`), and the
  Golomb code makes the many small tail probabilities cost one to a few
  bits. The step is the coarsest power of `2^(1/4)` whose round trip keeps the
  total variation within the bound; it is checked on the decoded values, so
  the bound holds for every token, not on average. Entries quantized to 0
  decode to log-probability `-inf` (an unused entry for
  `keras_distill.targets.top_k`).
- The log of the k entries' total probability (float32), so decoded values are
  log-probabilities at T = 1 over the whole vocabulary, as stored plainly.

A token's record is a 10-byte header (`b`, `o`, the covered log-mass as
float32, the unary bit count as uint32; the step itself cancels in the
renormalization and is not stored), its unary codes, then its binary
fields. The unary codes and the binary fields of a whole batch of tokens are
each decoded at once: the unary terminators are the zero bits of the unary
regions (`np.flatnonzero`), and every binary field is read from its bit
offset with a 5-byte window. No Python loop runs per token or per entry.
"""

import numpy as np

from keras_distill.checks import check_positive_int

HEADER_BYTES = 10


_MAX_STEP_EXPONENT = 116  # step 2^-29: q < 2^30, fields of at most 31 bits


_MARGIN = 1.0 - 1e-4  # the float32 decode may differ from float64 in the 7th digit


_CHUNK_TOKENS = 1024


def _check_targets(top_log_probs, top_indices, vocabulary_size):
    top_log_probs = np.asarray(top_log_probs, dtype=np.float64)
    top_indices = np.asarray(top_indices)
    if top_log_probs.ndim != 2 or top_log_probs.shape != top_indices.shape:
        raise ValueError(
            "`top_log_probs` and `top_indices` must both have shape (tokens, k),"
            f" got {top_log_probs.shape} and {top_indices.shape}; flatten the "
            "leading axes first."
        )
    if top_indices.dtype.kind not in "iu":
        raise TypeError(
            f"`top_indices` must be integers, got dtype {top_indices.dtype}."
        )
    check_positive_int("vocabulary_size", vocabulary_size)
    if vocabulary_size < top_indices.shape[-1]:
        raise ValueError(
            "`vocabulary_size` must be an int of at least k = "
            f"{top_indices.shape[-1]}, got {vocabulary_size!r}."
        )
    if top_indices.size and (
        top_indices.min() < 0 or top_indices.max() >= vocabulary_size
    ):
        raise ValueError(
            f"`top_indices` must lie in [0, {vocabulary_size}), got values in "
            f"[{top_indices.min()}, {top_indices.max()}]."
        )
    if np.isnan(top_log_probs).any() or (top_log_probs == np.inf).any():
        raise ValueError(
            "`top_log_probs` holds NaN or +inf: the teacher's outputs are not "
            "finite. Check `np.isfinite(teacher.predict(x)).all()`."
        )
    if top_log_probs.size and not np.isfinite(top_log_probs).any(axis=-1).all():
        raise ValueError(
            "Every token needs at least one finite value in `top_log_probs`; "
            "some tokens have only -inf."
        )
    return top_log_probs, top_indices.astype(np.int64)


def _sort_by_index(top_log_probs, top_indices):
    order = np.argsort(top_indices, axis=-1, kind="stable")
    indices = np.take_along_axis(top_indices, order, axis=-1)
    if (np.diff(indices, axis=-1) == 0).any():
        raise ValueError(
            "`top_indices` must be distinct within each token (they are the "
            "teacher's k largest entries)."
        )
    return np.take_along_axis(top_log_probs, order, axis=-1), indices


def _normalized(log_probs):
    """Probabilities renormalized over the last axis, and the log of their sum."""
    top = np.max(log_probs, axis=-1, keepdims=True)
    probs = np.exp(log_probs - top)
    total = probs.sum(axis=-1, keepdims=True)
    return probs / total, (top + np.log(total))[..., 0]


def _dequantize(levels):
    levels = levels.astype(np.float64)
    return levels / levels.sum(axis=-1, keepdims=True)


def _total_variation(p, q):
    return 0.5 * np.abs(p - q).sum(axis=-1)


def _quantize(ratios, exponents):
    step = np.exp2(-exponents / 4.0)[:, None]
    return np.rint(ratios / step).astype(np.int64)


def _choose_steps(probs, max_total_variation):
    """Per token, the coarsest step exponent whose round trip is within the bound."""
    ratios = probs / probs.max(axis=-1, keepdims=True)
    target = max_total_variation * _MARGIN

    def within(exponents):
        levels = _quantize(ratios, exponents)
        return _total_variation(_dequantize(levels), probs) <= target

    finest = np.full(len(probs), _MAX_STEP_EXPONENT)
    if not within(finest).all():
        raise ValueError(
            f"`max_total_variation`={max_total_variation} is below what a "
            f"step of 2^-{_MAX_STEP_EXPONENT // 4} reaches for k = "
            f"{probs.shape[-1]}; use a larger bound."
        )
    # Bisection on the exponent (the error shrinks with the step, nearly
    # monotonically); `high` always satisfies the bound.
    low = np.full(len(probs), -1)
    high = finest.copy()
    while (high - low > 1).any():
        middle = (low + high) // 2
        ok = within(middle)
        high = np.where(ok, middle, high)
        low = np.where(ok, low, middle)
    return high


def _exp_golomb_order(levels):
    """Per token, the exp-Golomb order with the fewest bits, and those lengths."""
    best_bits = best_order = None
    for order in range(31):
        lengths = _bit_length(levels + (1 << order)) - 1 - order
        bits = (2 * lengths + order + 1).sum(axis=-1)
        if best_bits is None:
            best_bits, best_order = bits, np.zeros_like(bits)
        better = bits < best_bits
        best_bits = np.where(better, bits, best_bits)
        best_order = np.where(better, order, best_order)
        if (levels < (1 << order)).all():
            break  # larger orders only add bits
    lengths = _bit_length(levels + (1 << best_order[:, None])) - 1 - best_order[:, None]
    return best_order, lengths


def _rice_parameter(gaps):
    """Per token, the Rice parameter with the fewest bits."""
    k = gaps.shape[-1]
    best_bits = best_parameter = None
    for parameter in range(31):
        bits = (gaps >> parameter).sum(axis=-1) + k * (parameter + 1)
        if best_bits is None:
            best_bits, best_parameter = bits, np.zeros_like(bits)
        better = bits < best_bits
        best_bits = np.where(better, bits, best_bits)
        best_parameter = np.where(better, parameter, best_parameter)
        if (gaps < (1 << parameter)).all():
            break
    return best_parameter


def _bit_length(values):
    """Number of bits of each positive int64 below 2^53 (exact, via frexp)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _ragged_arange(lengths):
    """`concatenate([arange(n) for n in lengths])`, vectorized."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total) - np.repeat(starts, lengths)


def _pack_fields(values, widths):
    """Packs each row's fields (MSB first) into whole bytes; returns bytes, row sizes.

    Fields of at most 33 bits touch at most 5 bytes. Fields never share bits,
    so summing each field's share of each byte (exact in float64, all below
    256) is their bitwise OR.
    """
    row_bits = widths.sum(axis=-1)
    row_bytes = (row_bits + 7) // 8
    # Bit offset of each field: its row's start (byte-aligned) plus the
    # widths of the fields before it in the row.
    row_start = 8 * (np.cumsum(row_bytes) - row_bytes)
    positions = (row_start[:, None] + np.cumsum(widths, axis=-1) - widths).reshape(-1)
    flat_widths = widths.reshape(-1).astype(np.uint64)
    low_bits = values.reshape(-1).astype(np.uint64) & (
        (np.uint64(1) << flat_widths) - np.uint64(1)
    )
    aligned = low_bits << (np.uint64(40) - (positions & 7).astype(np.uint64) - flat_widths)
    shifts = np.uint64(8) * np.arange(4, -1, -1, dtype=np.uint64)
    shares = (aligned[:, None] >> shifts) & np.uint64(255)
    byte_positions = (positions >> 3)[:, None] + np.arange(5)
    total = int(row_bytes.sum())
    packed = np.bincount(
        byte_positions.reshape(-1),
        weights=shares.reshape(-1).astype(np.float64),
        minlength=total + 5,
    )
    return packed[:total].astype(np.uint8), row_bytes


def _pack_unary(runs):
    """Each run `n` as n one-bits and a zero; rows padded with ones to bytes."""
    row_bits = (runs + 1).sum(axis=-1)
    row_bytes = (row_bits + 7) // 8
    row_start = 8 * (np.cumsum(row_bytes) - row_bytes)
    terminators = row_start[:, None] + np.cumsum(runs + 1, axis=-1) - 1
    bits = np.ones(8 * int(row_bytes.sum()), np.uint8)
    bits[terminators.reshape(-1)] = 0
    return np.packbits(bits), row_bits, row_bytes


def _interleave(parts):
    """Concatenates per-token byte segments: `parts` is [(bytes, sizes), ...]."""
    sizes = np.stack([size for _, size in parts], axis=-1)
    token_bytes = sizes.sum(axis=-1)
    token_start = np.cumsum(token_bytes) - token_bytes
    part_start = token_start[:, None] + np.cumsum(sizes, axis=-1) - sizes
    payload = np.empty(int(token_bytes.sum()), np.uint8)
    for column, (data, size) in enumerate(parts):
        payload[np.repeat(part_start[:, column], size) + _ragged_arange(size)] = data
    return payload, token_bytes


def encode_top_k(
    top_log_probs, top_indices, vocabulary_size, max_total_variation=1e-3
):
    """Encodes top-k teacher targets compactly, one variable-size record per token.

    Args:
        top_log_probs: Teacher log-probabilities at the kept entries, shape
            `(tokens, k)`; `-inf` marks an unused entry.
        top_indices: Their distinct vocabulary indices, shape `(tokens, k)`.
        vocabulary_size: The vocabulary size V (indices lie in `[0, V)`).
        max_total_variation: Bound on the total variation between each
            token's decoded distribution and its top-k distribution, both
            renormalized over the k entries.

    Returns:
        `(payload, token_bytes)`: the records of all tokens concatenated
        (uint8), and each record's size in bytes (int64).

    Example:

    >>> log_probs = np.log([[0.5, 0.3, 0.1], [0.9, 0.05, 0.01]])
    >>> indices = np.array([[7, 2, 9], [0, 3, 1]])
    >>> payload, token_bytes = encode_top_k(log_probs, indices, 10)
    >>> decoded, decoded_indices = decode_top_k(payload, token_bytes, k=3)
    >>> decoded_indices.tolist()
    [[2, 7, 9], [0, 1, 3]]
    >>> bool(top_k_total_variation(log_probs, indices, decoded, decoded_indices).max() <= 1e-3)
    True
    """
    if not 0 < max_total_variation < 1:
        raise ValueError(
            "`max_total_variation` must be in (0, 1), got "
            f"{max_total_variation!r}."
        )
    log_probs, indices = _check_targets(top_log_probs, top_indices, vocabulary_size)
    log_probs, indices = _sort_by_index(log_probs, indices)
    # Chunks bound the memory of the bit-level temporaries.
    chunks = [
        _encode_sorted(
            log_probs[begin : begin + _CHUNK_TOKENS],
            indices[begin : begin + _CHUNK_TOKENS],
            max_total_variation,
        )
        for begin in range(0, len(indices), _CHUNK_TOKENS)
    ]
    if not chunks:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    payloads, token_bytes = zip(*chunks)
    return np.concatenate(payloads), np.concatenate(token_bytes)


def _encode_sorted(log_probs, indices, max_total_variation):
    num_tokens = len(indices)
    probs, log_mass = _normalized(log_probs)
    exponents = _choose_steps(probs, max_total_variation)
    levels = _quantize(probs / probs.max(axis=-1, keepdims=True), exponents)
    orders, lengths = _exp_golomb_order(levels)
    gaps = np.diff(indices, axis=-1, prepend=-1) - 1
    rice = _rice_parameter(gaps)

    unary, unary_bits, unary_bytes = _pack_unary(
        np.concatenate([gaps >> rice[:, None], lengths], axis=-1)
    )
    mantissa_widths = lengths + orders[:, None]
    fields, field_bytes = _pack_fields(
        np.concatenate(
            [gaps & ((1 << rice[:, None]) - 1), levels + (1 << orders[:, None])],
            axis=-1,
        ),
        np.concatenate([np.broadcast_to(rice[:, None], gaps.shape), mantissa_widths], axis=-1),
    )
    header = np.zeros((num_tokens, HEADER_BYTES), np.uint8)
    header[:, 0] = rice
    header[:, 1] = orders
    header[:, 2:6] = log_mass.astype("<f4")[:, None].view(np.uint8)
    header[:, 6:10] = unary_bits.astype("<u4")[:, None].view(np.uint8)
    return _interleave(
        [
            (header.reshape(-1), np.full(num_tokens, HEADER_BYTES)),
            (unary, unary_bytes),
            (fields, field_bytes),
        ]
    )


def _read_fields(windows, bit_positions, widths):
    """Unsigned fields of `widths` (≤ 57) bits at `bit_positions`.

    `windows[i]` is the big-endian 64-bit word starting at byte `i`: shifting
    it left drops the bits before the field, shifting right keeps its width.
    """
    window = windows.take(bit_positions >> 3).astype(np.uint64)
    window <<= (bit_positions & 7).astype(np.uint64)
    window >>= (64 - widths).astype(np.uint64)
    return window.astype(np.int64)


def decode_top_k(payload, token_bytes, k):
    """Decodes records written by `encode_top_k`.

    Args:
        payload: The concatenated records of some tokens (uint8).
        token_bytes: Each record's size in bytes, in order.
        k: Entries per token.

    Returns:
        `(top_log_probs, top_indices)`: float32 log-probabilities (at T = 1,
        over the whole vocabulary) and int32 indices, shape `(tokens, k)`,
        each token's entries sorted by index.

    Example:

    >>> payload, token_bytes = encode_top_k(np.log([[0.6, 0.4]]), [[5, 1]], 8)
    >>> log_probs, indices = decode_top_k(payload, token_bytes, k=2)
    >>> indices.tolist(), np.exp(log_probs.astype(float)).round(3).tolist()
    ([[1, 5]], [[0.4, 0.6]])
    """
    token_bytes = np.asarray(token_bytes, np.int64)
    payload = np.asarray(payload, np.uint8)
    if int(token_bytes.sum()) != len(payload):
        raise ValueError(
            f"`token_bytes` sums to {int(token_bytes.sum())} but `payload` "
            f"has {len(payload)} bytes."
        )
    ends = np.cumsum(token_bytes)
    log_probs = np.empty((len(token_bytes), k), np.float32)
    indices = np.empty((len(token_bytes), k), np.int32)
    for begin in range(0, len(token_bytes), _CHUNK_TOKENS):
        chunk = slice(begin, begin + _CHUNK_TOKENS)
        first = ends[begin] - token_bytes[begin]
        log_probs[chunk], indices[chunk] = _decode_chunk(
            payload[first : ends[chunk][-1]], token_bytes[chunk], k
        )
    return log_probs, indices


def _decode_chunk(payload, token_bytes, k):
    num_tokens = len(token_bytes)
    # Zero padding lets every field read a full 64-bit window.
    padded = np.concatenate([payload, np.zeros(8, np.uint8)])
    windows = np.ndarray(
        shape=(len(payload) + 1,), dtype=">u8", buffer=padded, strides=(1,)
    )
    starts = np.cumsum(token_bytes) - token_bytes
    header = padded[starts[:, None] + np.arange(HEADER_BYTES)]
    rice = header[:, 0].astype(np.int64)[:, None]
    orders = header[:, 1].astype(np.int64)[:, None]
    log_mass = header[:, 2:6].copy().view("<f4").astype(np.float64)
    unary_bits = header[:, 6:10].copy().view("<u4")[:, 0].astype(np.int64)

    unary_bytes = (unary_bits + 7) // 8
    unary_start = starts + HEADER_BYTES
    unary = np.unpackbits(
        padded[np.repeat(unary_start, unary_bytes) + _ragged_arange(unary_bytes)]
    )
    terminators = np.flatnonzero(unary == 0)
    if len(terminators) != num_tokens * 2 * k:
        raise ValueError(
            "Corrupt compact teacher targets: the records do not hold "
            f"{2 * k} codes per token (is k={k} right?)."
        )
    terminators = terminators.reshape(num_tokens, 2 * k)
    runs = np.empty_like(terminators)
    runs[:, 0] = terminators[:, 0] - 8 * (np.cumsum(unary_bytes) - unary_bytes)
    np.subtract(terminators[:, 1:], terminators[:, :-1], out=runs[:, 1:])
    runs[:, 1:] -= 1
    quotients, lengths = runs[:, :k], runs[:, k:]

    # Binary fields: k gap remainders of `rice` bits, then the values'
    # mantissas of `length + order` bits.
    field_start = 8 * (unary_start + unary_bytes)[:, None]
    remainders = _read_fields(
        windows, field_start + rice * np.arange(k), np.broadcast_to(rice, (num_tokens, k))
    )
    widths = lengths + orders
    positions = field_start + k * rice + np.cumsum(widths, axis=-1) - widths
    mantissas = _read_fields(windows, positions, widths)

    indices = np.cumsum(((quotients << rice) | remainders) + 1, axis=-1) - 1
    levels = (mantissas | (1 << widths)) - (1 << orders)
    with np.errstate(divide="ignore"):
        log_probs = (
            np.log(levels) - np.log(levels.sum(axis=-1, keepdims=True)) + log_mass
        )
    return log_probs, indices


def top_k_total_variation(
    reference_log_probs, reference_indices, log_probs, indices
):
    """Total variation between two top-k distributions over the same entries.

    Each is renormalized over its k entries; the entries are matched by
    index, so their order does not matter.

    Args:
        reference_log_probs: Reference log-probabilities, shape `(tokens, k)`.
        reference_indices: Their indices.
        log_probs: Log-probabilities to compare, shape `(tokens, k)`.
        indices: Their indices, the same set per token as the reference's.

    Returns:
        A float64 array of per-token total variations.

    Example:

    >>> reference = np.log([[0.5, 0.5]])
    >>> top_k_total_variation(reference, [[0, 1]], np.log([[0.4, 0.6]]), [[1, 0]])
    array([0.1])
    """
    reference_log_probs, reference_indices = _sort_by_index(
        np.asarray(reference_log_probs, np.float64), np.asarray(reference_indices)
    )
    log_probs, indices = _sort_by_index(
        np.asarray(log_probs, np.float64), np.asarray(indices)
    )
    if not np.array_equal(reference_indices, indices):
        raise ValueError(
            "The two top-k targets keep different indices; total variation "
            "over the k entries needs the same entries."
        )
    return _total_variation(
        _normalized(reference_log_probs)[0], _normalized(log_probs)[0]
    )
