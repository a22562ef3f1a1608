"""Students cut from a teacher's blocks and vocabulary (`keras_distill.language_models.pruning`)."""

import keras
import numpy as np
import pytest

from keras_distill import language_models
from keras_distill.language_models import pruning
from keras_distill.targets.cache import teacher_fingerprint
from tests.conftest import DATA_DIR
from tests.conftest import tiny_gemma3

keras_hub = pytest.importorskip("keras_hub")


def _gemma_with_global_blocks(num_layers=12, vocabulary_size=40, seed=0):
    # With sliding windows on, blocks 5 and 11 are global (rotary base 1e6)
    # and the others local: the kinds `default_layers` must respect.
    return tiny_gemma3(
        vocabulary_size,
        16,
        seed=seed,
        num_layers=num_layers,
        use_sliding_window_attention=True,
        sliding_window_size=4,
    )


def _inputs(token_ids):
    token_ids = np.asarray(token_ids, "int32")
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, "bool")}


def test_corpus_vocabulary_sorted_unique_with_kept_ids():
    mapping = pruning.corpus_vocabulary(np.array([[9, 4, 9], [4, 30, 7]]))
    np.testing.assert_array_equal(mapping, [0, 1, 2, 3, 4, 7, 9, 30])
    assert mapping.dtype == np.int32
    with pytest.raises(ValueError, match="integers"):
        pruning.corpus_vocabulary(np.array([0.5]))


def test_default_layers_match_block_kinds_and_spread():
    teacher = _gemma_with_global_blocks()
    layers = pruning.default_layers(teacher, 6)
    # Student block 5 is the global one; it copies one of the teacher's
    # global blocks (5, 11), the others its local blocks, spread evenly.
    assert layers == [1, 3, 6, 8, 10, 11]
    for position, layer in enumerate(layers):
        assert (position % 6 == 5) == (layer % 6 == 5)


def test_student_with_every_block_reproduces_the_teacher():
    teacher = _gemma_with_global_blocks()
    student = pruning.student_from_teacher(teacher, layers=list(range(12)))
    x = _inputs(np.random.default_rng(0).integers(0, 40, (2, 7)))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(student(x)), keras.ops.convert_to_numpy(teacher(x))
    )


def test_blocks_and_embedding_rows_are_copies():
    teacher = _gemma_with_global_blocks()
    mapping = np.array([0, 1, 2, 3, 8, 13, 21, 34], "int32")
    student = pruning.student_from_teacher(teacher, num_layers=6, vocabulary_mapping=mapping)
    assert student.preprocessor is None
    assert student.backbone.vocabulary_size == len(mapping)
    layers = pruning.default_layers(teacher, 6)
    for block, layer in zip(student.backbone.transformer_layers, layers):
        source = teacher.backbone.transformer_layers[layer]
        for mine, theirs in zip(block.get_weights(), source.get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(student.backbone.token_embedding.embeddings),
        keras.ops.convert_to_numpy(teacher.backbone.token_embedding.embeddings)[mapping],
    )
    np.testing.assert_array_equal(
        student.backbone.get_layer("final_normalization").get_weights()[0],
        teacher.backbone.get_layer("final_normalization").get_weights()[0],
    )


def test_vocabulary_subset_with_all_blocks_gives_the_teachers_logits_for_those_tokens():
    teacher = _gemma_with_global_blocks(num_layers=2)
    mapping = np.array([0, 1, 2, 3, 5, 8, 13, 21, 34], "int32")
    student = pruning.student_from_teacher(teacher, layers=[0, 1], vocabulary_mapping=mapping)
    student_ids = np.array([[2, 4, 5, 8, 6, 7]])
    student_logits = keras.ops.convert_to_numpy(student(_inputs(student_ids)))
    teacher_logits = keras.ops.convert_to_numpy(teacher(_inputs(mapping[student_ids])))
    np.testing.assert_allclose(student_logits, teacher_logits[..., mapping], atol=1e-5)


def test_refusals():
    teacher = _gemma_with_global_blocks()
    with pytest.raises(ValueError, match="configurations differ"):
        pruning.student_from_teacher(teacher, layers=[0, 1, 2, 3, 4, 6])
    with pytest.raises(ValueError, match="exactly one"):
        pruning.student_from_teacher(teacher)
    with pytest.raises(ValueError, match=r"\[1, 12\]"):
        pruning.default_layers(teacher, 13)
    with pytest.raises(ValueError, match="repeats"):
        pruning.student_from_teacher(teacher, num_layers=2, vocabulary_mapping=[0, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        pruning.student_from_teacher(teacher, num_layers=2, vocabulary_mapping=[])
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        pruning.student_from_teacher(teacher, num_layers=2, vocabulary_mapping=[0, 40])
    with pytest.raises(TypeError, match="Backbone or CausalLM"):
        pruning.student_from_teacher(keras.Sequential([keras.layers.Dense(2)]), num_layers=1)


def test_bert_backbone_keeps_evenly_spread_blocks():
    teacher = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=6, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=12,
    )
    student = pruning.student_from_teacher(teacher, num_layers=2)
    assert pruning.default_layers(teacher, 2) == [2, 5]
    for block, layer in zip(student.transformer_layers, [2, 5]):
        for mine, theirs in zip(
            block.get_weights(), teacher.transformer_layers[layer].get_weights()
        ):
            np.testing.assert_array_equal(mine, theirs)
    for name in ("position_embedding", "segment_embedding", "embeddings_layer_norm"):
        for mine, theirs in zip(
            student.get_layer(name).get_weights(), teacher.get_layer(name).get_weights()
        ):
            np.testing.assert_array_equal(mine, theirs)


@pytest.mark.skipif(
    not (DATA_DIR / "tinyshakespeare.txt").is_file(),
    reason=f"needs Tiny Shakespeare in {DATA_DIR} (the shared data folder)",
)
def test_vocabulary_subset_teacher_logits_config_and_fingerprint():
    lines = (DATA_DIR / "tinyshakespeare.txt").read_text().splitlines()[:2000]
    tokenizer = language_models.train_gemma3_tokenizer([line for line in lines if line], 300)
    # A task with its preprocessor attached, as loaders return it.
    lm = tiny_gemma3(
        300, 16, num_layers=2,
        preprocessor=keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=tokenizer),
    )
    mapping = np.array([0, 1, 2, 3, 7, 19, 39], "int32")
    teacher = pruning.VocabularySubsetTeacher(lm, mapping)
    teacher.predict_on_batch(_inputs(np.array([[2, 4, 6, 5, 4]])))
    student_ids = np.array([[2, 4, 6, 5, 4]])
    full = keras.ops.convert_to_numpy(lm(_inputs(mapping[student_ids])))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(teacher(_inputs(student_ids))),
        full[..., mapping],
        atol=1e-5,
    )
    restored = pruning.VocabularySubsetTeacher.from_config(teacher.get_config())
    restored.set_weights(teacher.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(_inputs(student_ids))),
        full[..., mapping],
        atol=1e-5,
    )
    # Only the backbone is kept: an attached preprocessor (never built)
    # would make Keras run the model eagerly before each compiled call.
    assert all(layer.built for layer in teacher._flatten_layers())
    # The mapping is part of the teacher's identity for the cache.
    other = pruning.VocabularySubsetTeacher(lm, np.array([0, 1, 2, 3, 7, 19, 38], "int32"))
    assert teacher_fingerprint(teacher) != teacher_fingerprint(other)
