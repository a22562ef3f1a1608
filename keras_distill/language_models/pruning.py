"""Students cut from their teacher: some of its blocks and some of its vocabulary.

A student initialized from the teacher's own weights starts much closer to it
than a random one: DistilBERT (Sanh et al., 2019) took every other block of
BERT, Minitron (Muralidharan et al., 2024) prunes depth and then distills.

- `student_from_teacher(teacher, num_layers)` builds a KerasHub backbone or
  causal LM of the teacher's architecture with fewer transformer blocks, each
  a copy of one of the teacher's, and every other layer (embeddings, final
  norm) copied by name.
- `vocabulary_mapping=` also keeps only some rows of the token embedding: the
  student's token `i` is the teacher's token `vocabulary_mapping[i]`. On a
  small corpus (`corpus_vocabulary`) this shrinks Gemma 3's 262,144-entry
  output layer, which dominates every step on a CPU, to the few thousand
  tokens the corpus uses.
- `VocabularySubsetTeacher` is the teacher seen through the same mapping: it
  reads the student's token ids and returns its logits over the student's
  vocabulary, so its outputs can be cached (`TeacherOutputCache`) and
  distilled by a `CausalLMDistiller(student, teacher=None)`. Its softmax is the
  teacher's distribution renormalized over those tokens: the mass the teacher
  puts on tokens outside the mapping is dropped.
"""

import keras
import numpy as np
from keras import ops

from keras_distill.language_models.hub import _keras_hub


def corpus_vocabulary(token_ids, keep_ids=(0, 1, 2, 3)):
    """The sorted token ids a corpus uses, for `vocabulary_mapping`.

    Args:
        token_ids: Integer array-like of the teacher's token ids (any shape),
            e.g. the whole tokenized corpus.
        keep_ids: Ids kept even where the corpus lacks them (Gemma's
            `<pad>`, `<eos>`, `<bos>`, `<unk>` are 0 to 3).

    Returns:
        A sorted 1-D int32 array: entry `i` is the teacher id of student
        token `i`.

    Example:

    >>> corpus_vocabulary([[7, 5, 7], [9, 5, 0]], keep_ids=(0, 1)).tolist()
    [0, 1, 5, 7, 9]
    """
    token_ids = np.asarray(token_ids)
    if token_ids.size and not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(
            f"`token_ids` must be integers, got dtype {token_ids.dtype}."
        )
    ids = np.concatenate([token_ids.ravel(), np.asarray(keep_ids, "int64")])
    if ids.size and ids.min() < 0:
        raise ValueError(f"`token_ids` holds a negative id ({ids.min()}).")
    return np.unique(ids).astype("int32")


def _backbone(model):
    keras_hub = _keras_hub()
    if isinstance(model, keras_hub.models.Backbone):
        return model
    if isinstance(model, keras_hub.models.CausalLM):
        return model.backbone
    raise TypeError(
        "`teacher` must be a keras_hub.models.Backbone or CausalLM, got "
        f"{type(model).__name__}."
    )


def _block_config(block):
    config = dict(block.get_config())
    config.pop("name", None)
    config.pop("trainable", None)
    return config


def _spread(count, choices):
    """`count` of `choices`, evenly spread and ending on the last."""
    return [choices[-(-(i + 1) * len(choices) // count) - 1] for i in range(count)]


def default_layers(teacher, num_layers):
    """Which teacher blocks a `num_layers`-block student copies by default.

    Blocks are spread evenly over the teacher's depth, the last block kept.
    Where the architecture varies its blocks by depth (Gemma 3: five
    sliding-window blocks with local rotary positions, then one global), each
    student block copies one of the teacher's blocks of the same kind, spread
    evenly over those.

    Args:
        teacher: A KerasHub backbone or causal LM.
        num_layers: Blocks of the student, at most the teacher's.

    Returns:
        A list of `num_layers` teacher block indices.
    """
    backbone = _backbone(teacher)
    total = len(backbone.transformer_layers)
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(
            f"`num_layers` must be an integer in [1, {total}] (the teacher's "
            f"blocks), got {num_layers!r}."
        )
    student_configs = [
        _block_config(block)
        for block in _student_backbone(backbone, num_layers, None).transformer_layers
    ]
    teacher_configs = [_block_config(block) for block in backbone.transformer_layers]
    layers = [None] * num_layers
    for config in {repr(c): c for c in student_configs}.values():
        positions = [i for i, c in enumerate(student_configs) if c == config]
        candidates = [j for j, c in enumerate(teacher_configs) if c == config]
        if len(candidates) < len(positions):
            raise ValueError(
                f"The student's blocks {positions} need {len(positions)} "
                f"teacher blocks of their kind, but the teacher has only "
                f"{candidates}; pass `layers` explicitly."
            )
        for position, layer in zip(positions, _spread(len(positions), candidates)):
            layers[position] = layer
    return layers


def _student_backbone(backbone, num_layers, vocabulary_size):
    config = backbone.get_config()
    config["num_layers"] = num_layers
    if vocabulary_size is not None:
        config["vocabulary_size"] = vocabulary_size
    return type(backbone).from_config(config)


def _check_mapping(vocabulary_mapping, teacher_size):
    from keras_distill.language_models.hub import _check_vocabulary_mapping

    mapping = np.asarray(vocabulary_mapping)
    if mapping.size == 0:
        raise ValueError("`vocabulary_mapping` is empty: give the student at least one token.")
    # The student's vocabulary is the mapping itself, so its size always agrees.
    mapping = _check_vocabulary_mapping(mapping, len(mapping) if mapping.ndim else 0, teacher_size)
    if len(np.unique(mapping)) != len(mapping):
        raise ValueError(
            "`vocabulary_mapping` repeats a teacher id: two student tokens "
            "would be the same token."
        )
    return mapping


def _copy_embedding(source, target, mapping):
    """Copies a (reversible) token embedding, keeping `mapping`'s rows."""
    for source_weight, target_weight in zip(source.weights, target.weights):
        value = ops.convert_to_numpy(source_weight)
        if mapping is not None:
            # `embeddings` is (vocabulary, hidden); the `reverse_embeddings`
            # of an untied output layer are (hidden, vocabulary).
            axis = 1 if source_weight.name == "reverse_embeddings" else 0
            value = np.take(value, mapping, axis=axis)
        target_weight.assign(value)


def student_from_teacher(teacher, num_layers=None, layers=None, vocabulary_mapping=None):
    """A KerasHub model with some of the teacher's blocks, copied from them.

    The student has the teacher's architecture and widths, `len(layers)`
    transformer blocks (block `i` a copy of the teacher's `layers[i]`) and
    every other layer of the backbone (embeddings, norms) copied by name. A
    block is copied only into a block of the same configuration (Gemma 3's
    sliding-window and global blocks differ in their rotary positions).

    Args:
        teacher: A KerasHub `Backbone` or `CausalLM` (for example a
            `Gemma3CausalLM` or a `BertBackbone`); it is not modified.
        num_layers: Number of student blocks; the teacher blocks are then
            `default_layers(teacher, num_layers)`.
        layers: Alternatively, the teacher block indices to copy, in order.
        vocabulary_mapping: Optional 1-D integer array: the student keeps
            only these rows of the token embedding (and of an untied output
            layer), student token `i` being teacher token
            `vocabulary_mapping[i]`.

    Returns:
        A model of the teacher's kind: a backbone, or a causal LM with no
        preprocessor when `vocabulary_mapping` changes the token ids (and
        the teacher's preprocessor otherwise).

    Example:

    >>> import keras_hub
    >>> teacher = keras_hub.models.BertBackbone(
    ...     vocabulary_size=30, num_layers=4, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> student = student_from_teacher(teacher, num_layers=2)
    >>> len(student.transformer_layers), default_layers(teacher, 2)
    (2, [1, 3])
    """
    backbone = _backbone(teacher)
    if (num_layers is None) == (layers is None):
        raise ValueError("Pass exactly one of `num_layers` and `layers`.")
    if layers is None:
        layers = default_layers(teacher, num_layers)
    layers = [int(layer) for layer in layers]
    total = len(backbone.transformer_layers)
    if not layers or min(layers) < 0 or max(layers) >= total:
        raise ValueError(
            f"`layers` must be teacher block indices in [0, {total}), got {layers}."
        )
    mapping = None
    if vocabulary_mapping is not None:
        mapping = _check_mapping(
            vocabulary_mapping, backbone.token_embedding.input_dim
        )
    student = _student_backbone(
        backbone, len(layers), None if mapping is None else len(mapping)
    )
    for position, (block, layer) in enumerate(zip(student.transformer_layers, layers)):
        source = backbone.transformer_layers[layer]
        if _block_config(source) != _block_config(block):
            raise ValueError(
                f"Teacher block {layer} cannot initialize student block "
                f"{position}: their configurations differ (e.g. sliding-window "
                "against global attention). Choose a block of the same kind, "
                "or let `default_layers` choose."
            )
        block.set_weights(source.get_weights())
    blocks = {id(block) for block in student.transformer_layers}
    for layer in student.layers:
        if id(layer) in blocks or not layer.weights:
            continue
        source = backbone.get_layer(layer.name)
        if layer is student.token_embedding:
            _copy_embedding(source, layer, mapping)
        else:
            layer.set_weights(source.get_weights())
    if teacher is backbone:
        return student
    preprocessor = teacher.preprocessor if mapping is None else None
    return type(teacher)(backbone=student, preprocessor=preprocessor)


@keras.saving.register_keras_serializable(package="keras_distill")
class VocabularySubsetTeacher(keras.Model):
    """A causal LM read through a vocabulary mapping: student ids in, logits over them out.

    `VocabularySubsetTeacher(causal_lm, mapping)({"token_ids": ids,
    "padding_mask": mask})` runs `causal_lm` on the teacher ids `mapping[ids]`
    and returns its logits for the student's vocabulary only, computed as
    `hidden @ embedding[mapping].T` (the full output layer is never
    evaluated). Their softmax is the teacher's next-token distribution
    renormalized over the student's tokens. The mapping is stored as a
    (non-trainable) weight, so `TeacherOutputCache`'s teacher fingerprint
    covers it.

    Args:
        causal_lm: The teacher `keras_hub.models.CausalLM`, or its backbone
            (which returns hidden states; its token embedding maps them to
            logits). Only the backbone is kept.
        vocabulary_mapping: 1-D integer array, the teacher id of each student
            token.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.Gemma3Backbone(
    ...     vocabulary_size=20, image_size=None, num_layers=1,
    ...     num_query_heads=1, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=8)
    >>> lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    >>> teacher = VocabularySubsetTeacher(lm, [0, 1, 2, 3, 11, 17])
    >>> x = {"token_ids": np.array([[2, 4, 5]]), "padding_mask": np.ones((1, 3))}
    >>> full = ops.convert_to_numpy(lm(dict(x, token_ids=np.array([[2, 11, 17]]))))
    >>> subset = ops.convert_to_numpy(teacher(x))
    >>> np.allclose(subset, full[..., [0, 1, 2, 3, 11, 17]], atol=1e-5)
    True
    """

    def __init__(self, causal_lm, vocabulary_mapping, **kwargs):
        super().__init__(**kwargs)
        if isinstance(causal_lm, dict):
            causal_lm = keras.saving.deserialize_keras_object(causal_lm)
        keras_hub = _keras_hub()
        if isinstance(causal_lm, keras_hub.models.CausalLM):
            causal_lm = causal_lm.backbone
        if not isinstance(causal_lm, keras_hub.models.Backbone):
            raise TypeError(
                "`causal_lm` must be a keras_hub.models.CausalLM (or its "
                f"backbone), got {type(causal_lm).__name__}."
            )
        mapping = _check_mapping(vocabulary_mapping, causal_lm.token_embedding.input_dim)
        # The backbone alone: a task's preprocessor is a layer that is never
        # built, and Keras's `predict_on_batch` then runs the whole model
        # eagerly before each compiled call.
        self.backbone = causal_lm
        self.vocabulary_mapping = self.add_weight(
            shape=mapping.shape,
            dtype="int32",
            initializer=keras.initializers.Constant(mapping),
            trainable=False,
            name="vocabulary_mapping",
        )

    def call(self, inputs):
        from keras_distill.language_models.hub import _output_embedding
        from keras_distill.language_models.hub import _soft_cap

        mapping = ops.convert_to_tensor(self.vocabulary_mapping)
        hidden = self.backbone(
            {
                "token_ids": ops.take(mapping, inputs["token_ids"]),
                "padding_mask": inputs["padding_mask"],
            }
        )
        embedding = ops.take(_output_embedding(self.backbone), mapping, axis=0)
        logits = ops.matmul(hidden, ops.transpose(ops.cast(embedding, hidden.dtype)))
        soft_cap = _soft_cap(self.backbone)
        if soft_cap is not None:
            logits = ops.tanh(logits / soft_cap) * soft_cap
        return logits

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "causal_lm": keras.saving.serialize_keras_object(self.backbone),
                "vocabulary_mapping": ops.convert_to_numpy(
                    self.vocabulary_mapping
                ).tolist(),
            }
        )
        return config
