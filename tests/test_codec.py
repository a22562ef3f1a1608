"""The compact top-k format: exact indices, bounded total variation, size, bad input."""

import numpy as np
import pytest

from keras_distill.targets.codec import HEADER_BYTES
from keras_distill.targets.codec import decode_top_k
from keras_distill.targets.codec import encode_top_k
from keras_distill.targets.codec import top_k_total_variation


def language_model_logits(tokens, vocabulary_size, seed=0):
    """Logits shaped like a language model's next-token distributions.

    A Zipf unigram prior (shared by all tokens, on a fixed random permutation
    of the vocabulary), per-token Gaussian context noise of random sharpness,
    and a few context-specific candidates lifted well above the rest: the top
    token's probability ranges from ~0.1 to ~1 and the top-256 mass from ~0.3
    to ~1, as for real language models.
    """
    rng = np.random.default_rng(seed)
    prior = np.empty(vocabulary_size)
    prior[rng.permutation(vocabulary_size)] = -np.log(np.arange(1, vocabulary_size + 1))
    logits = np.empty((tokens, vocabulary_size))
    for token in range(tokens):
        logits[token] = 0.6 * prior + rng.uniform(0.6, 3.0) * rng.standard_normal(
            vocabulary_size
        )
        candidates = rng.integers(0, vocabulary_size, rng.integers(1, 20))
        logits[token, candidates] += rng.exponential(4.0, len(candidates)) + 6
    return logits


def top_k(logits, k):
    """Float64 top-k log-probabilities (over the whole vocabulary) and indices."""
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    indices = np.argpartition(-log_probs, k - 1, axis=-1)[:, :k]
    return np.take_along_axis(log_probs, indices, axis=-1), indices


def round_trip(log_probs, indices, vocabulary_size, **kwargs):
    payload, token_bytes = encode_top_k(log_probs, indices, vocabulary_size, **kwargs)
    assert payload.dtype == np.uint8 and token_bytes.sum() == len(payload)
    decoded, decoded_indices = decode_top_k(payload, token_bytes, log_probs.shape[-1])
    assert decoded.dtype == np.float32 and decoded_indices.dtype == np.int32
    np.testing.assert_array_equal(decoded_indices, np.sort(indices, axis=-1))
    return decoded, decoded_indices, token_bytes


@pytest.mark.parametrize("bound", [1e-3, 1e-5])
def test_round_trip_is_exact_in_indices_and_within_the_bound(bound):
    log_probs, indices = top_k(language_model_logits(40, 4096), 64)
    decoded, decoded_indices, token_bytes = round_trip(
        log_probs, indices, 4096, max_total_variation=bound
    )
    total_variation = top_k_total_variation(
        log_probs, indices, decoded, decoded_indices
    )
    assert total_variation.max() <= bound
    assert total_variation.mean() > bound / 10  # the step is the coarsest allowed
    # The covered mass survives: the values stay log-probabilities at T = 1.
    np.testing.assert_allclose(
        np.logaddexp.reduce(decoded.astype(np.float64), axis=-1),
        np.logaddexp.reduce(log_probs, axis=-1),
        atol=1e-6,
    )
    if bound == 1e-3:
        assert token_bytes.mean() < 0.45 * 64 * (2 + 2)  # float16 + uint16


def test_issue_target_at_a_262k_vocabulary():
    """k = 256, V = 262,144: at most 640 bytes per token, the issue's target."""
    log_probs, indices = top_k(language_model_logits(12, 262_144, seed=1), 256)
    decoded, decoded_indices, token_bytes = round_trip(log_probs, indices, 262_144)
    # Each record's size is stored too (uint16) next to the record.
    assert (token_bytes + 2).mean() <= 640
    assert top_k_total_variation(
        log_probs, indices, decoded, decoded_indices
    ).max() <= 1e-3


def test_uniform_indices_cost_near_the_information_bound():
    rng = np.random.default_rng(2)
    vocabulary_size, k = 65_536, 128
    indices = np.stack([rng.choice(vocabulary_size, k, replace=False) for _ in range(20)])
    log_probs = np.full((20, k), -np.log(k))  # equal values: one level each
    _, _, token_bytes = round_trip(log_probs, indices, vocabulary_size)
    # log2 C(V, k) / k ≈ log2(V / k) + 1.44 = 10.44 bits per index.
    # Equal values are one level each, 2 bits with an order-1 Golomb code.
    index_bits = 8 * token_bytes.mean() - 8 * HEADER_BYTES - 2 * k
    assert index_bits / k < 10.44 + 0.5


@pytest.mark.parametrize(
    "log_probs,indices,vocabulary_size",
    [
        (np.array([[-0.1]]), np.array([[3]]), 4),  # k = 1
        (np.log(np.full((2, 6), 1 / 6)), np.tile(np.arange(6), (2, 1)), 6),  # k = V
        (np.array([[0.0, -80.0, -200.0]]), np.array([[0, 9, 4]]), 10),  # peaked
        (np.array([[-1.0, -np.inf, -2.0]]), np.array([[5, 1, 0]]), 8),  # unused
    ],
)
def test_edge_cases_round_trip(log_probs, indices, vocabulary_size):
    decoded, decoded_indices, _ = round_trip(log_probs, indices, vocabulary_size)
    assert top_k_total_variation(
        log_probs, indices, decoded, decoded_indices
    ).max() <= 1e-3
    order = np.argsort(indices, axis=-1)
    expected = np.take_along_axis(log_probs, order, axis=-1)
    # Entries of no (or negligible) mass decode to -inf: unused by the loss.
    np.testing.assert_array_equal(np.isneginf(decoded), expected < -50)
    finite = expected > -50
    np.testing.assert_allclose(decoded[finite], expected[finite], atol=2e-3)


def test_many_tokens_decode_in_chunks_and_slices():
    log_probs, indices = top_k(language_model_logits(2100, 512, seed=3), 16)
    payload, token_bytes = encode_top_k(log_probs, indices, 512)
    decoded, decoded_indices = decode_top_k(payload, token_bytes, 16)
    # Any run of records decodes alone, as a batch of cache rows does.
    start = int(token_bytes[:1500].sum())
    part, part_indices = decode_top_k(
        payload[start : start + token_bytes[1500:1700].sum()],
        token_bytes[1500:1700],
        16,
    )
    np.testing.assert_array_equal(part, decoded[1500:1700])
    np.testing.assert_array_equal(part_indices, decoded_indices[1500:1700])


def test_no_tokens():
    payload, token_bytes = encode_top_k(np.zeros((0, 4)), np.zeros((0, 4), int), 8)
    log_probs, indices = decode_top_k(payload, token_bytes, 4)
    assert log_probs.shape == indices.shape == (0, 4)


def test_total_variation_matches_by_index():
    reference = np.log([[0.5, 0.25, 0.25]])
    other = np.log([[0.2, 0.3, 0.5]])
    # Matched by index: (0.5, 0.25, 0.25) at 1, 2, 3 vs (0.5, 0.2, 0.3).
    np.testing.assert_allclose(
        top_k_total_variation(reference, [[1, 2, 3]], other, [[2, 3, 1]]), [0.05]
    )
    with pytest.raises(ValueError, match="different indices"):
        top_k_total_variation(reference, [[1, 2, 3]], other, [[1, 2, 4]])


@pytest.mark.parametrize(
    "log_probs,indices,vocabulary_size,kwargs,error,match",
    [
        ([[np.nan, 0.0]], [[0, 1]], 4, {}, ValueError, "NaN"),
        ([[np.inf, 0.0]], [[0, 1]], 4, {}, ValueError, r"\+inf"),
        ([[-np.inf, -np.inf]], [[0, 1]], 4, {}, ValueError, "only -inf"),
        ([[0.0, -1.0]], [[2, 2]], 4, {}, ValueError, "distinct"),
        ([[0.0, -1.0]], [[0, 4]], 4, {}, ValueError, r"\[0, 4\)"),
        ([[0.0, -1.0]], [[0, 1, 2]], 4, {}, ValueError, "shape"),
        ([[0.0, -1.0]], [[0.0, 1.0]], 4, {}, TypeError, "integers"),
        ([[0.0, -1.0]], [[0, 1]], 1, {}, ValueError, "`vocabulary_size`"),
        ([[0.0, -1.0]], [[0, 1]], 4.0, {}, TypeError, "`vocabulary_size`"),
        ([[0.0, -1.0]], [[0, 1]], 4, {"max_total_variation": 0}, ValueError, "max_total"),
    ],
)
def test_bad_input_is_named(log_probs, indices, vocabulary_size, kwargs, error, match):
    with pytest.raises(error, match=match):
        encode_top_k(
            np.array(log_probs), np.array(indices), vocabulary_size, **kwargs
        )


def test_corrupt_or_mismatched_records_are_refused():
    log_probs, indices = top_k(language_model_logits(3, 256), 8)
    payload, token_bytes = encode_top_k(log_probs, indices, 256)
    with pytest.raises(ValueError, match="is k=4 right"):
        decode_top_k(payload, token_bytes, 4)
    with pytest.raises(ValueError, match="sums to"):
        decode_top_k(payload[:-1], token_bytes, 8)
