"""Everything that touches KerasHub: its import, tokenizers, backbones.

The rest of the package calls KerasHub only through this module, so a
change in KerasHub is fixed in one place:

- `_keras_hub()`: the import, with the install hint when it is missing.
- tokenizer and vocabulary checks: `vocabulary_fingerprint`,
  `shared_vocabulary` (a teacher and a student with the same or mapped
  token ids), `_check_vocabulary_mapping`.
- backbones: the output embedding, the final logit soft cap, the
  transformer blocks.
- attention probabilities of KerasHub blocks, which KerasHub does not
  return: A `keras.layers.MultiHeadAttention` in a
functional model is called (once) with `return_attention_scores=True` (through
a small wrapper layer, as a graph expects one output count per layer). A
KerasHub `Gemma3DecoderBlock` does not expose its probabilities, so they are
recomputed from the block input: the block's `pre_attention_norm`, its
attention layer's `query_dense`/`key_dense` (with its query/key norms and
RoPE) and attention mask (causal, padding and sliding window), then the
scaled, soft-capped masked softmax of `CachedGemma3Attention`'s non-fused
path. This repeats the query and key projections of each chosen block (not
the whole block); the tests check that these probabilities times the block's
values reproduce its attention output exactly.
A KerasHub `TransformerEncoder` (the blocks of `BertBackbone` and other
BERT-style encoders) is called once with `return_attention_scores=True`,
giving its self-attention's probabilities (before dropout), with the
padding mask applied to the keys.
- text: `language_model_windows` (fixed-length training windows from a
  corpus) and `train_gemma3_tokenizer` (a Gemma 3 tokenizer trained on a
  corpus, offline).
"""

import hashlib
import logging

import keras
import numpy as np
from keras import ops

from keras_distill import checks

logger = logging.getLogger(__name__)


def _keras_hub():
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            "KerasHub models (and Gemma 3 GGUF files) need keras-hub: "
            "`pip install 'keras-distill[hub]'`."
        ) from error
    return keras_hub


def vocabulary_fingerprint(tokenizer):
    """A hash of a tokenizer's vocabulary: equal hashes mean equal token ids.

    Args:
        tokenizer: A `keras_hub.tokenizers.Tokenizer`.

    Returns:
        A hex SHA-256 digest of the vocabulary in id order.

    Example:

    >>> import keras_hub
    >>> tokenizer = keras_hub.tokenizers.ByteTokenizer()
    >>> len(vocabulary_fingerprint(tokenizer))
    64
    """
    digest = hashlib.sha256()
    for token in tokenizer.get_vocabulary():
        digest.update(str(token).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _tokenizer(causal_lm):
    preprocessor = getattr(causal_lm, "preprocessor", None)
    return getattr(preprocessor, "tokenizer", None)


def _vocabulary_size(causal_lm):
    return causal_lm.backbone.vocabulary_size


def _check_causal_lm(name, model):
    keras_hub = _keras_hub()
    if not isinstance(model, keras_hub.models.CausalLM):
        raise TypeError(
            f"`{name}` must be a `keras_hub.models.CausalLM` (e.g. "
            f"`keras_hub.models.Gemma3CausalLM.from_preset(...)`), got "
            f"{type(model).__name__}. Plain Keras models distill with "
            "`keras_distill.Distiller`."
        )


def _check_vocabulary_mapping(mapping, student_size, teacher_size):
    mapping = np.asarray(mapping)
    if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError(
            "`vocabulary_mapping` must be a 1-D integer array: entry i is the "
            f"teacher's token id for the student's token i. Got shape "
            f"{mapping.shape} and dtype {mapping.dtype}."
        )
    if len(mapping) != student_size:
        raise ValueError(
            f"`vocabulary_mapping` has {len(mapping)} entries but the "
            f"student's vocabulary has {student_size} tokens; give one "
            "teacher id per student token."
        )
    if mapping.min() < 0 or mapping.max() >= teacher_size:
        raise ValueError(
            "`vocabulary_mapping` holds ids outside the teacher's vocabulary "
            f"[0, {teacher_size}): min {mapping.min()}, max {mapping.max()}."
        )
    return mapping.astype("int32")


def shared_vocabulary(student, teacher, vocabulary_mapping=None):
    """Checks that teacher and student score the same tokens.

    Identical tokenizers whose embedding tables are padded to different sizes
    share the tokenizer's vocabulary: logits are sliced to it. Different
    tokenizers are refused unless `vocabulary_mapping` says which teacher
    token each student token is.

    Args:
        student: The student `keras_hub.models.CausalLM`.
        teacher: The teacher `keras_hub.models.CausalLM`.
        vocabulary_mapping: Optional 1-D integer array, the teacher's token id
            for each of the student's token ids.

    Returns:
        `(vocabulary_size, vocabulary_mapping)`: the number of leading token
        ids both models' logits are compared over, and the checked mapping
        (or `None`).

    Raises:
        ValueError: if the vocabularies differ and no mapping is given.
    """
    student_size = _vocabulary_size(student)
    teacher_size = _vocabulary_size(teacher)
    if vocabulary_mapping is not None:
        mapping = _check_vocabulary_mapping(
            vocabulary_mapping, student_size, teacher_size
        )
        return student_size, mapping
    student_tokenizer, teacher_tokenizer = _tokenizer(student), _tokenizer(teacher)
    tokenizers_known = None not in (student_tokenizer, teacher_tokenizer)
    if tokenizers_known and vocabulary_fingerprint(
        student_tokenizer
    ) != vocabulary_fingerprint(teacher_tokenizer):
        raise ValueError(
            "Teacher and student tokenizers differ (teacher vocabulary "
            f"{teacher_tokenizer.vocabulary_size()} tokens, student "
            f"{student_tokenizer.vocabulary_size()}, different token lists): "
            "the same id means different text, so their distributions cannot "
            "be compared token by token. Use a student with the teacher's "
            "tokenizer, or pass `vocabulary_mapping` (the teacher id of each "
            "student token)."
        )
    if student_size == teacher_size:
        return student_size, None
    if not tokenizers_known:
        raise ValueError(
            f"Teacher vocabulary has {teacher_size} tokens, student "
            f"{student_size}. If both use the same tokenizer with padded "
            "embedding tables, attach their preprocessors (as `from_preset` "
            "does) so the tokenizers can be checked; otherwise pass "
            "`vocabulary_mapping`."
        )
    size = student_tokenizer.vocabulary_size()
    if size > min(student_size, teacher_size):
        raise ValueError(
            f"The tokenizer has {size} tokens but the teacher's embedding "
            f"table {teacher_size} and the student's {student_size} rows."
        )
    logger.info(
        "Teacher (%d) and student (%d) embedding tables are padded "
        "differently around the same %d-token tokenizer; distilling over "
        "the %d shared tokens.",
        teacher_size,
        student_size,
        size,
        size,
    )
    return size, None


def _output_embedding(backbone):
    """The `(vocabulary_size, hidden_dim)` matrix that maps a backbone's hidden states to logits."""
    token_embedding = backbone.token_embedding
    if getattr(token_embedding, "tie_weights", True):
        return token_embedding.embeddings
    return ops.transpose(token_embedding.reverse_embeddings)


def _soft_cap(backbone):
    return getattr(backbone.token_embedding, "logit_soft_cap", None)


def language_model_windows(tokenizer, text, sequence_length, add_bos=True):
    """Cuts one long text into next-token training windows.

    The text is tokenized once and split into consecutive, non-overlapping
    windows of `sequence_length + 1` tokens; each gives the inputs (its first
    `sequence_length` tokens) and the labels (the same shifted by one). All
    tokens are real, so `padding_mask` and `sample_weight` are all ones. The
    leftover tokens at the end are dropped.

    Args:
        tokenizer: A `keras_hub.tokenizers.Tokenizer`.
        text: The text, one string.
        sequence_length: Tokens per window.
        add_bos: Whether each window starts with the tokenizer's start
            token (`start_token_id`), as KerasHub preprocessors do.

    Returns:
        `(x, labels, sample_weight)`: `x` a dict of `"token_ids"` (int32) and
        `"padding_mask"` (bool) of shape `(windows, sequence_length)`.

    Example:

    >>> import keras_hub
    >>> tokenizer = keras_hub.tokenizers.ByteTokenizer()
    >>> x, labels, weight = language_model_windows(
    ...     tokenizer, "To be, or not to be", sequence_length=4, add_bos=False)
    >>> x["token_ids"].shape, labels[0].tolist()
    ((3, 4), [111, 32, 98, 101])
    """
    checks.check_positive_int("sequence_length", sequence_length)
    token_ids = np.asarray(ops.convert_to_numpy(tokenizer(text)), "int32")
    window = sequence_length + 1
    start_token_id = getattr(tokenizer, "start_token_id", None)
    if add_bos and start_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no start token; pass "
            "add_bos=False."
        )
    body = window - 1 if add_bos else window
    count = len(token_ids) // body
    if count == 0:
        raise ValueError(
            f"The text has {len(token_ids)} tokens, fewer than one window of "
            f"{body}; pass a longer text or a smaller `sequence_length`."
        )
    windows = token_ids[: count * body].reshape(count, body)
    if add_bos:
        windows = np.concatenate(
            [np.full((count, 1), start_token_id, "int32"), windows], axis=1
        )
    x = {
        "token_ids": windows[:, :-1],
        "padding_mask": np.ones((count, sequence_length), "bool"),
    }
    return x, windows[:, 1:], np.ones((count, sequence_length), "float32")


# Gemma 3's SentencePiece model keeps its special pieces at these ids.
_GEMMA3_SPECIAL_PIECES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}


_GEMMA3_USER_SYMBOLS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<img>",
]


# SentencePiece trainer options under which the tokens spell any text.
_LOSSLESS_TRAINER_OPTIONS = {
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "byte_fallback": True,
    "max_sentence_length": 1 << 20,
}


def train_gemma3_tokenizer(lines, vocabulary_size, lossless=False):
    """Trains a small `Gemma3Tokenizer` on text, for offline experiments.

    Gemma 3's tokenizer expects `<pad>`, `<eos>`, `<bos>` and `<unk>` at ids
    0 to 3 and its turn and image markers as user-defined pieces; the
    `sentencepiece` trainer is told so explicitly.

    By default SentencePiece normalizes (NFKC, runs of spaces folded,
    newlines dropped), so the tokens do not always spell the text. With
    `lossless=True` the tokens spell any text exactly, which cross-tokenizer
    alignment needs: the identity normalizer, no dummy prefix, whitespace
    kept as it is, and byte fallback (the 256 byte pieces then count in
    `vocabulary_size`).

    Args:
        lines: An iterable of training sentences (with `lossless=True`,
            texts whose newlines are learned too).
        vocabulary_size: Number of tokens, at least 16 (with
            `lossless=True`, about 300 or more: the byte pieces, the
            special pieces and the texts' characters).
        lossless: Whether the tokens must spell every text exactly.

    Returns:
        A `keras_hub.models.Gemma3Tokenizer`.

    Example:

    >>> tokenizer = train_gemma3_tokenizer(
    ...     ["to be or not to be", "that is the question"] * 50, 24)
    >>> tokenizer.vocabulary_size(), tokenizer.pad_token_id, tokenizer.end_token_id
    (24, 0, 1)
    """
    import io

    import sentencepiece

    if not isinstance(vocabulary_size, int) or vocabulary_size < 16:
        raise ValueError(
            f"`vocabulary_size` must be an integer >= 16, got {vocabulary_size!r}."
        )
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        **{f"{name}_piece": piece for name, piece in _GEMMA3_SPECIAL_PIECES.items()},
        user_defined_symbols=_GEMMA3_USER_SYMBOLS,
        minloglevel=2,
        **(_LOSSLESS_TRAINER_OPTIONS if lossless else {}),
    )
    return _keras_hub().models.Gemma3Tokenizer(proto=model.getvalue())


def _hub_blocks(model):
    """A KerasHub model's transformer blocks, or None for other models."""
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "transformer_layers", None)
    return None if blocks is None else list(blocks)


class _Gemma3AttentionProbabilities(keras.layers.Layer):
    """Recomputes a Gemma 3 decoder block's attention probabilities.

    Mirrors `CachedGemma3Attention._compute_attention`'s non-fused path
    (keras-hub 0.32) on the block input, without a cache. Returns
    `(batch, heads, queries, keys)` float32 probabilities.
    """

    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, x, padding_mask=None, vision_mask=None):
        block = self.block
        attention = block.attention
        normalized = block.pre_attention_norm(x)
        attention_mask = block._compute_attention_mask(
            normalized, padding_mask, vision_mask, None, 0
        )
        query = attention.query_dense(normalized)
        key = attention.key_dense(normalized)
        if attention.use_query_key_norm:
            query = attention.query_norm(query)
            key = attention.key_norm(key)
        query = attention._apply_rope(query, 0)
        key = attention._apply_rope(key, 0)
        if attention.query_head_dim_normalize:
            scale = 1 / np.sqrt(attention.head_dim)
        else:
            scale = 1 / np.sqrt(attention.hidden_dim // attention.num_query_heads)
        if attention.use_sliding_window_attention:
            attention_mask = attention._mask_sliding_window(
                attention_mask, cache_update_index=0
            )
        query = ops.cast(query, "float32") * scale
        key = ops.cast(key, "float32")
        groups = attention.num_query_heads // attention.num_key_value_heads
        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        query = ops.reshape(
            query,
            (batch, length, attention.num_key_value_heads, groups, attention.head_dim),
        )
        logits = ops.einsum("btkgh,bskh->bkgts", query, key)
        if attention.logit_soft_cap is not None:
            cap = attention.logit_soft_cap
            logits = ops.tanh(logits / cap) * cap
        mask = ops.cast(attention_mask[:, None, None, :, :], "bool")
        logits = ops.where(mask, logits, -1e9)
        probs = ops.softmax(logits, axis=-1)
        return ops.reshape(
            probs, (batch, attention.num_query_heads, length, ops.shape(key)[1])
        )

    def compute_output_spec(self, x, padding_mask=None, vision_mask=None):
        # Given, not traced: the symbolic block input may be flagged sparse.
        heads = self.block.attention.num_query_heads
        return keras.KerasTensor(
            (x.shape[0], heads, x.shape[1], x.shape[1]), dtype="float32"
        )


class _AttentionWithScores(keras.layers.Layer):
    """Calls a `MultiHeadAttention` once, returning its scores too.

    A wrapper, because a functional graph expects every call of a layer to
    return as many outputs as its first call did.
    """

    def __init__(self, attention, **kwargs):
        super().__init__(**kwargs)
        self.attention = attention

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        training=None,
        use_causal_mask=False,
    ):
        return self.attention(
            query,
            value,
            key=key,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            return_attention_scores=True,
            training=training,
            use_causal_mask=use_causal_mask,
        )


class _EncoderWithScores(keras.layers.Layer):
    """Calls a KerasHub `TransformerEncoder` once, returning its attention
    probabilities too (its self-attention's, before dropout)."""

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def call(self, inputs, padding_mask=None, attention_mask=None, training=None):
        return self.encoder(
            inputs,
            padding_mask=padding_mask,
            attention_mask=attention_mask,
            training=training,
            return_attention_scores=True,
        )


def _is_gemma3_block(layer):
    return type(layer).__name__ == "Gemma3DecoderBlock"


def _is_transformer_encoder(layer):
    """A KerasHub `TransformerEncoder` (BERT-style block) or a subclass."""
    return any(
        cls.__name__ == "TransformerEncoder"
        and cls.__module__.startswith("keras_hub")
        for cls in type(layer).__mro__
    )


def _check_attention_support(layer, role):
    if (
        isinstance(layer, keras.layers.MultiHeadAttention)
        or _is_gemma3_block(layer)
        or _is_transformer_encoder(layer)
    ):
        return
    raise ValueError(
        f"Attention maps of the {role}'s layer {layer.name!r} "
        f"({type(layer).__name__}) are not available: attention distillation "
        "supports keras.layers.MultiHeadAttention layers (by name) and "
        "KerasHub Gemma3DecoderBlock and TransformerEncoder (BERT-style) "
        "blocks (by index)."
    )
