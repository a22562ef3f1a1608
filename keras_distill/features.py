"""Hidden-state and attention-map distillation, and teacher–student layer maps.

`FeatureDistillation` adds two terms to a `Distiller`'s loss:

- hidden states ("linear path"): a trainable projection (a `Dense` without
  bias on the last axis) maps each chosen student layer's output to the
  width of its teacher layer; both are layer-normalized (no parameters) and
  compared by MSE or cosine distance;
- attention maps: `1 - cosine` between the student's and the teacher's
  attention probabilities of each query row, after averaging the heads, or
  grouping them, or an explicit head mapping; padded queries do not count.

Both are masked by the Distiller's `sample_weight` (for language models the
padding mask) and by the input's `padding_mask` (a BERT classifier's batch,
whose `sample_weight` is per example): padded positions count for no
attention query and no `(batch, sequence, features)` hidden state. They are
added to the logits loss:
`loss = alpha·hard + (1-alpha)·T²·divergence + weight·hidden +
attention_weight·attention`.

Layers are named by **layer name** on functional (and Sequential) Keras
models and by **block index** (`backbone.transformer_layers[i]`) on KerasHub
models. Pairs are explicit `(student_layer, teacher_layer)` tuples or come
from a strategy: `"uniform"` (evenly spread over the teacher's depth),
`"last"` (the teacher's last layers) or `"attention"` (for each student
layer, the teacher layer whose head-averaged attention maps are most similar
on a calibration batch).

**One forward pass.** The student runs once per step: the Distiller calls a
multi-output *view* of it, a functional model that shares every layer (and
weight) with the student and returns its logits together with the chosen
layers' outputs. The view is built by walking the student's graph with
Keras's own functional graph runner, inlining nested functional models (a
KerasHub task's backbone), so a block deep inside a `Gemma3CausalLM` is an
output of the view. The teacher likewise runs once, through its own view.

**Attention probabilities.** A `keras.layers.MultiHeadAttention` in a
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

The projections train with the student, are saved with the Distiller (they
are weights of the `FeatureDistillation` layer it holds), and are not part
of `distiller.student`.
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_distill import losses as losses_module

STRATEGIES = ("uniform", "last", "attention")
HIDDEN_LOSSES = ("mse", "cosine")
_EPSILON = 1e-6


# ---- Pure loss functions ----


def layer_normalize(x, epsilon=_EPSILON):
    """Normalizes the last axis to zero mean and unit variance (no parameters).

    Args:
        x: Tensor of features, `(..., features)`.
        epsilon: Added to the variance.

    Returns:
        The float32 normalized tensor.

    Example:

    >>> x = keras.ops.convert_to_tensor([[1.0, 3.0]])
    >>> keras.ops.convert_to_numpy(layer_normalize(x)).round(3).tolist()
    [[-1.0, 1.0]]
    """
    x = ops.cast(x, "float32")
    mean = ops.mean(x, axis=-1, keepdims=True)
    variance = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * ops.rsqrt(variance + epsilon)


def _unit(x):
    """`x / ||x||` on the last axis, 0 (with a finite gradient) for x = 0."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + 1e-12)


def hidden_state_loss(
    student_hidden, teacher_hidden, loss="mse", sample_weight=None, normalize=True
):
    """Distance between (projected) student and teacher hidden states.

    Args:
        student_hidden: Student features already projected to the teacher's
            width, `(batch, ..., features)`.
        teacher_hidden: Teacher features of the same shape.
        loss: `"mse"` (mean over features of the squared difference) or
            `"cosine"` (`1 - cos` over the features).
        sample_weight: Optional per-example weights `(batch,)` or per-position
            mask `(batch, ...)` (e.g. a padding mask `(batch, sequence)`).
        normalize: Whether both are layer-normalized first.

    Returns:
        The weighted mean over positions, a float32 scalar.

    Example:

    >>> student = keras.ops.convert_to_tensor([[[1.0, 2.0], [0.0, 1.0]]])
    >>> teacher = keras.ops.convert_to_tensor([[[1.0, 2.0], [5.0, 1.0]]])
    >>> float(hidden_state_loss(student, teacher, sample_weight=[[1.0, 0.0]]))
    0.0
    """
    _check_choice("loss", loss, HIDDEN_LOSSES)
    student_hidden = ops.cast(student_hidden, "float32")
    teacher_hidden = ops.cast(teacher_hidden, "float32")
    if normalize:
        student_hidden = layer_normalize(student_hidden)
        teacher_hidden = layer_normalize(teacher_hidden)
    if loss == "mse":
        values = ops.mean(ops.square(student_hidden - teacher_hidden), axis=-1)
    else:
        values = 1.0 - ops.sum(
            _unit(student_hidden) * _unit(teacher_hidden), axis=-1
        )
    return losses_module.weighted_reduce(values, sample_weight)


def map_heads(student_probs, teacher_probs, heads="average"):
    """Brings student and teacher attention maps to the same heads.

    Args:
        student_probs: `(batch, student_heads, queries, keys)`.
        teacher_probs: `(batch, teacher_heads, queries, keys)`.
        heads: `"average"` (the mean over heads of each, one map each),
            `"grouped"` (the model with more heads has its heads averaged in
            contiguous groups down to the other's count, which must divide
            it), or a list giving the teacher head for each student head.

    Returns:
        `(student_probs, teacher_probs)` with equal head counts.

    Example:

    >>> import numpy as np
    >>> student = np.full((1, 2, 3, 3), 1 / 3, "float32")
    >>> teacher = np.full((1, 4, 3, 3), 1 / 3, "float32")
    >>> s, t = map_heads(student, teacher, heads="grouped")
    >>> tuple(s.shape), tuple(t.shape)
    ((1, 2, 3, 3), (1, 2, 3, 3))
    """
    student_heads = student_probs.shape[1]
    teacher_heads = teacher_probs.shape[1]
    _check_head_mapping(heads, student_heads, teacher_heads)
    if heads == "average":
        return (
            ops.mean(student_probs, axis=1, keepdims=True),
            ops.mean(teacher_probs, axis=1, keepdims=True),
        )
    if heads == "grouped":
        return _grouped(student_probs, teacher_heads), _grouped(
            teacher_probs, student_heads
        )
    return student_probs, ops.take(
        teacher_probs, np.asarray(heads, "int32"), axis=1
    )


def _grouped(probs, target_heads):
    heads = probs.shape[1]
    if heads <= target_heads:
        return probs
    shape = ops.shape(probs)
    grouped = ops.reshape(
        probs,
        (shape[0], target_heads, heads // target_heads, shape[2], shape[3]),
    )
    return ops.mean(grouped, axis=2)


def _check_head_mapping(heads, student_heads, teacher_heads):
    if isinstance(heads, str):
        _check_choice("attention_heads", heads, ("average", "grouped"))
        if heads == "grouped" and None not in (student_heads, teacher_heads):
            larger, smaller = max(student_heads, teacher_heads), min(
                student_heads, teacher_heads
            )
            if larger % smaller:
                raise ValueError(
                    f"attention_heads='grouped' cannot map {student_heads} "
                    f"student heads to {teacher_heads} teacher heads: one "
                    "count must divide the other. Use 'average' or a list "
                    "giving the teacher head of each student head."
                )
        return
    mapping = list(heads)
    if len(mapping) != student_heads or any(
        isinstance(h, bool) or not isinstance(h, numbers.Integral)
        or not 0 <= h < teacher_heads
        for h in mapping
    ):
        raise ValueError(
            f"`attention_heads` as a list gives one teacher head in "
            f"[0, {teacher_heads}) for each of the {student_heads} student "
            f"heads; got {mapping}."
        )


def attention_map_loss(
    student_probs, teacher_probs, sample_weight=None, heads="average"
):
    """`1 - cosine` between student and teacher attention probabilities.

    Each query row (a distribution over keys) of each mapped head is compared
    by cosine similarity; rows are averaged with `sample_weight` over
    queries.

    Args:
        student_probs: `(batch, student_heads, queries, keys)` probabilities.
        teacher_probs: `(batch, teacher_heads, queries, keys)`.
        sample_weight: Optional `(batch,)` weights or `(batch, queries)`
            padding mask.
        heads: Head handling, see `map_heads`.

    Returns:
        A float32 scalar in `[0, 1]` (probabilities are non-negative).

    Example:

    >>> import numpy as np
    >>> student = np.array([[[[1.0, 0.0], [0.5, 0.5]]]], "float32")
    >>> teacher = np.array([[[[0.0, 1.0], [0.5, 0.5]]]], "float32")
    >>> round(float(attention_map_loss(student, teacher)), 4)
    0.5
    """
    student_probs = ops.cast(student_probs, "float32")
    teacher_probs = ops.cast(teacher_probs, "float32")
    if tuple(student_probs.shape[2:]) != tuple(teacher_probs.shape[2:]) and (
        None not in student_probs.shape[2:] + teacher_probs.shape[2:]
    ):
        raise ValueError(
            "Student and teacher attention maps cover different query/key "
            f"lengths: {tuple(student_probs.shape)} vs "
            f"{tuple(teacher_probs.shape)}; both models must read the same "
            "sequence."
        )
    student_probs, teacher_probs = map_heads(student_probs, teacher_probs, heads)
    similarity = ops.sum(_unit(student_probs) * _unit(teacher_probs), axis=-1)
    # (batch, heads, queries) -> (batch, queries, heads), so that a padding
    # mask over queries lines up with the leading axes.
    values = ops.transpose(1.0 - similarity, (0, 2, 1))
    return losses_module.weighted_reduce(values, sample_weight)


# ---- Layer mapping ----


def layer_mapping(num_student_layers, num_teacher_layers, strategy="uniform"):
    """Pairs student layers with teacher layers by position.

    Args:
        num_student_layers: Number of student layers to map.
        num_teacher_layers: Number of teacher layers to choose from.
        strategy: `"uniform"`: student layer `i` of `S` gets teacher layer
            `ceil((i + 1) · T / S) - 1`, so the last maps to the last and the
            others spread evenly; `"last"`: the teacher's last `S` layers
            (needs `S <= T`).

    Returns:
        A list of `(student_index, teacher_index)` tuples.

    Example:

    >>> layer_mapping(2, 6, "uniform")
    [(0, 2), (1, 5)]
    >>> layer_mapping(2, 6, "last")
    [(0, 4), (1, 5)]
    """
    _check_choice("strategy", strategy, ("uniform", "last"))
    for name, value in (
        ("num_student_layers", num_student_layers),
        ("num_teacher_layers", num_teacher_layers),
    ):
        losses_module.check_positive_int(name, value)
    if strategy == "uniform":
        return [
            (i, math.ceil((i + 1) * num_teacher_layers / num_student_layers) - 1)
            for i in range(num_student_layers)
        ]
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"strategy='last' maps each of the {num_student_layers} student "
            f"layers to a distinct one of the teacher's last layers, but the "
            f"teacher has only {num_teacher_layers}; use 'uniform'."
        )
    offset = num_teacher_layers - num_student_layers
    return [(i, offset + i) for i in range(num_student_layers)]


# ---- Finding layers and tapping their outputs ----


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _hub_blocks(model):
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "transformer_layers", None)
    return None if blocks is None else list(blocks)


def _functional(model, name):
    """The functional graph of `model`, or a clear error."""
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise ValueError(f"`{name}` is not built; call it on a batch first.")
        return model._functional
    if not hasattr(model, "_run_through_graph"):
        raise ValueError(
            f"Feature distillation reads intermediate layers from the graph "
            f"of a functional model, but `{name}` is a subclassed "
            f"{type(model).__name__}. Build it with `keras.Model(inputs, "
            "outputs)` or `keras.Sequential`, or use a KerasHub model."
        )
    return model


def _named_layers(model):
    return {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, keras.layers.InputLayer)
    }


def candidate_layers(model):
    """The layers of `model` that feature distillation can name.

    Args:
        model: A functional/Sequential Keras model or a KerasHub model.

    Returns:
        For KerasHub models, the number of transformer blocks (an `int`:
        layers are named by block index); otherwise the list of layer names.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, name="hidden"), keras.layers.Dense(2, name="out")])
    >>> candidate_layers(model)
    ['hidden', 'out']
    """
    blocks = _hub_blocks(model)
    if blocks is not None:
        return len(blocks)
    return list(_named_layers(_functional(model, "model")))


def _resolve_layer(model, reference, role):
    """The layer object `reference` (a name or a block index) designates."""
    blocks = _hub_blocks(model)
    if blocks is not None:
        if isinstance(reference, bool) or not isinstance(reference, numbers.Integral):
            raise ValueError(
                f"The {role} is a KerasHub model: name its layers by block "
                f"index in [0, {len(blocks)}) (or negative from the end), "
                f"got {reference!r}."
            )
        if not -len(blocks) <= reference < len(blocks):
            raise ValueError(
                f"The {role} has {len(blocks)} transformer blocks (indices 0 "
                f"to {len(blocks) - 1}); block {reference} does not exist."
            )
        return blocks[reference]
    layers = _named_layers(_functional(model, role))
    if reference not in layers:
        raise ValueError(
            f"The {role} has no layer named {reference!r}. Its layers are: "
            f"{list(layers)}."
        )
    return layers[reference]


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


class _Holder:
    """Keeps objects out of Keras tracking and saving (views share weights)."""


def inline_graph(model, call_function, role="model"):
    """Rebuilds `model`'s graph on new inputs, one operation at a time.

    Nested functional and Sequential models (e.g. a KerasHub task's backbone)
    are inlined, so the result is one flat graph whose operations are the
    original layers (shared, not copied). It runs on Keras's own functional
    graph runner (`Functional._run_through_graph`).

    Args:
        model: A functional/Sequential Keras model or a KerasHub model.
        call_function: `fn(operation, *args, **kwargs)` returning the
            operation's outputs on the rebuilt graph, e.g.
            `operation(*args, **kwargs)`.
        role: Name of the model in error messages.

    Returns:
        `(inputs, outputs)`: new `keras.Input`s shaped like the model's and
        the rebuilt outputs, in the model's structures.
    """
    graph = _functional(model, role)

    def call(operation, *args, **kwargs):
        nested = _nested_graph(operation)
        if nested is not None:
            return run_graph(nested, args[0] if args else kwargs["inputs"])
        return call_function(operation, *args, **kwargs)

    def run_graph(functional, inputs):
        if hasattr(functional, "_standardize_inputs"):
            inputs = functional._standardize_inputs(inputs)
        return functional._run_through_graph(
            inputs, operation_fn=lambda operation: operation, call_fn=call
        )

    inputs = keras.tree.map_structure(
        lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name),
        graph.input,
    )
    return inputs, run_graph(graph, inputs)


def build_view(model, taps, role="model"):
    """A functional view of `model` that also returns intermediate outputs.

    The view shares every layer and weight with `model` and runs it once.

    Args:
        model: A functional/Sequential Keras model or a KerasHub model.
        taps: List of `(layer, kind)` with `kind` `"hidden"` (the layer's
            output) or `"attention"` (its attention probabilities,
            `(batch, heads, queries, keys)`).
        role: Name of the model in error messages.

    Returns:
        A `keras.Model` returning `[model_output, *tap_outputs]`.
    """
    wanted = {}
    for index, (layer, kind) in enumerate(taps):
        if kind == "attention":
            _check_attention_support(layer, role)
        wanted.setdefault(id(layer), []).append((index, kind))
    found = [None] * len(taps)

    def call_function(operation, *args, **kwargs):
        requests = wanted.get(id(operation), [])
        kinds = {kind for _, kind in requests}
        if any(found[i] is not None for i, _ in requests):
            raise ValueError(
                f"Layer {operation.name!r} of the {role} is called more than "
                "once in its graph; choose a layer that runs once."
            )
        scores = None
        if "attention" in kinds and isinstance(
            operation, keras.layers.MultiHeadAttention
        ):
            outputs, scores = _AttentionWithScores(operation)(*args, **kwargs)
        elif "attention" in kinds and _is_transformer_encoder(operation):
            outputs, scores = _EncoderWithScores(operation)(*args, **kwargs)
        else:
            outputs = operation(*args, **kwargs)
        if "attention" in kinds and scores is None:
            scores = _Gemma3AttentionProbabilities(operation)(
                args[0],
                padding_mask=kwargs.get("padding_mask"),
                vision_mask=kwargs.get("vision_mask"),
            )
        for index, kind in requests:
            found[index] = outputs if kind == "hidden" else scores
        return outputs

    inputs, outputs = inline_graph(model, call_function, role)
    outputs = keras.tree.flatten(outputs)
    if len(outputs) != 1:
        raise ValueError(
            f"The {role} returns {len(outputs)} outputs; the Distiller needs "
            "one logits tensor."
        )
    missing = [layer.name for (layer, _), out in zip(taps, found) if out is None]
    if missing:
        raise ValueError(
            f"Layers {missing} of the {role} are not on the path from its "
            "inputs to its outputs."
        )
    return keras.Model(inputs, [outputs[0], *found], name=f"{model.name}_view")


def _nested_graph(operation):
    """The graph to inline for a nested functional/Sequential model, or None."""
    if isinstance(operation, keras.Sequential):
        return operation._functional
    if isinstance(operation, keras.Model) and hasattr(
        operation, "_run_through_graph"
    ):
        return operation
    return None


def _padding_mask_of(x):
    if isinstance(x, dict) and "padding_mask" in x:
        return x["padding_mask"]
    return None


def _position_weights(sample_weight, padding_mask):
    """Per-position weights `(batch, sequence)`: the input padding mask times
    per-example (or per-token) `sample_weight`; `sample_weight` without one."""
    if padding_mask is None:
        return sample_weight
    mask = ops.cast(padding_mask, "float32")
    if sample_weight is None:
        return mask
    weights = ops.cast(sample_weight, "float32")
    if len(weights.shape) == 1:
        weights = ops.expand_dims(weights, -1)
    return weights * mask


def attention_similarity(
    student, teacher, x, student_layers=None, teacher_layers=None
):
    """Mean cosine similarity of every student/teacher attention-map pair.

    Head-averaged attention maps of each candidate layer are computed on the
    calibration batch `x`, and each query row of a student layer is compared
    with the same row of each teacher layer; padded queries (from
    `x["padding_mask"]`) do not count.

    Args:
        student: The student model.
        teacher: The teacher model.
        x: A calibration batch both models read.
        student_layers: Candidate student layers (names or block indices);
            every transformer block of a KerasHub model by default.
        teacher_layers: Candidate teacher layers, likewise.

    Returns:
        `(similarity, student_layers, teacher_layers)`, where `similarity`
        is a NumPy array `(len(student_layers), len(teacher_layers))`.
    """
    student_layers = _default_candidates(student, student_layers, "student")
    teacher_layers = _default_candidates(teacher, teacher_layers, "teacher")
    maps = []
    for model, layers, role in (
        (student, student_layers, "student"),
        (teacher, teacher_layers, "teacher"),
    ):
        taps = [(_resolve_layer(model, ref, role), "attention") for ref in layers]
        outputs = build_view(model, taps, role)(x, training=False)[1:]
        maps.append(
            [ops.mean(ops.cast(probs, "float32"), axis=1) for probs in outputs]
        )
    padding_mask = _padding_mask_of(x)
    similarity = np.zeros((len(student_layers), len(teacher_layers)))
    for i, student_map in enumerate(maps[0]):
        for j, teacher_map in enumerate(maps[1]):
            values = ops.sum(_unit(student_map) * _unit(teacher_map), axis=-1)
            similarity[i, j] = ops.convert_to_numpy(
                ops.stop_gradient(losses_module.weighted_reduce(values, padding_mask))
            )
    return similarity, student_layers, teacher_layers


def _default_candidates(model, layers, role):
    if layers is not None:
        return list(layers)
    blocks = _hub_blocks(model)
    if blocks is None:
        raise ValueError(
            f"A mapping strategy needs the {role}'s candidate layers: pass "
            f"`{role}_layers=[...]` with names from {candidate_layers(model)}."
        )
    return list(range(len(blocks)))


# ---- The Distiller component ----


class _Taps:
    """Stashes one step's tapped outputs between `Distiller.call` and
    `compute_loss` (both run inside the same traced step)."""

    def __init__(self):
        self.student = None
        self.teacher = None
        self.padding_mask = None


@keras.saving.register_keras_serializable(package="keras_distill")
class FeatureDistillation(keras.layers.Layer):
    """Hidden-state and attention-map terms for a `Distiller`.

    Pass it as `Distiller(student, teacher, feature_distillation=...)`. The
    Distiller then runs the student once per step through a view returning
    its logits and the chosen layers' outputs, runs the teacher likewise, and
    adds `weight · hidden_loss + attention_weight · attention_loss` to the
    logits loss, reported as `feature_loss` and `attention_loss`.

    Args:
        pairs: Explicit `[(student_layer, teacher_layer), ...]`, layers
            named by name (functional models) or block index (KerasHub), or
            a strategy: `"uniform"`, `"last"` or `"attention"`.
        loss: Hidden-state distance, `"mse"` or `"cosine"`.
        weight: Weight of the hidden-state term (0 turns it off).
        attention_weight: Weight of the attention-map term (0, the default,
            turns it off).
        attention_heads: `"average"`, `"grouped"` or a list of teacher heads,
            one per student head (see `map_heads`).
        student_layers: Candidate student layers for a strategy; every
            transformer block of a KerasHub model by default.
        teacher_layers: Candidate teacher layers for a strategy, likewise.
        calibration_data: A batch both models read, for `"attention"`.
        normalize: Layer-normalize hidden states before comparing them.
        projection: Whether a trainable projection maps student hidden
            states to the teacher's width; `False` needs equal widths.
        **kwargs: `keras.layers.Layer` arguments such as `name`.

    Example:

    >>> import numpy as np
    >>> from keras_distill import Distiller
    >>> def mlp(width, name):
    ...     inputs = keras.Input((4,))
    ...     hidden = keras.layers.Dense(width, "relu", name=f"{name}_hidden")(inputs)
    ...     return keras.Model(inputs, keras.layers.Dense(3)(hidden), name=name)
    >>> features = FeatureDistillation(
    ...     pairs=[("student_hidden", "teacher_hidden")], loss="mse", weight=0.5)
    >>> distiller = Distiller(mlp(8, "student"), mlp(16, "teacher"),
    ...                       feature_distillation=features)
    >>> distiller.compile(optimizer="adam", alpha=0.0)
    >>> history = distiller.fit(np.ones((8, 4)), epochs=1, verbose=0)
    >>> sorted(history.history)
    ['distillation_loss', 'feature_loss', 'loss', 'student_loss']
    """

    def __init__(
        self,
        pairs="uniform",
        loss="mse",
        weight=1.0,
        attention_weight=0.0,
        attention_heads="average",
        student_layers=None,
        teacher_layers=None,
        calibration_data=None,
        normalize=True,
        projection=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_choice("loss", loss, HIDDEN_LOSSES)
        for name, value in (("weight", weight), ("attention_weight", attention_weight)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if weight == 0 and attention_weight == 0:
            raise ValueError(
                "Both `weight` (hidden states) and `attention_weight` are 0: "
                "set at least one, or leave `feature_distillation` out."
            )
        if isinstance(pairs, str):
            _check_choice("pairs", pairs, STRATEGIES)
            if pairs == "attention" and calibration_data is None:
                raise ValueError(
                    "pairs='attention' picks teacher layers by attention "
                    "similarity on a calibration batch: pass "
                    "`calibration_data=x` (a batch both models read)."
                )
        else:
            pairs = [tuple(pair) for pair in pairs]
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise ValueError(
                    "`pairs` must be a strategy name or a non-empty list of "
                    f"(student_layer, teacher_layer) pairs, got {pairs!r}."
                )
        if not isinstance(attention_heads, str):
            attention_heads = list(attention_heads)
        self.pairs = pairs
        self.loss = loss
        self.weight = float(weight)
        self.attention_weight = float(attention_weight)
        self.attention_heads = attention_heads
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        self.normalize = bool(normalize)
        self.projection = bool(projection)
        self._calibration = _Holder()
        self._calibration.data = calibration_data
        self._views = _Holder()
        self._taps = _Taps()
        self.attention_similarity = None
        self.projections = []
        self.feature_loss_tracker = (
            keras.metrics.Mean(name="feature_loss") if weight else None
        )
        self.attention_loss_tracker = (
            keras.metrics.Mean(name="attention_loss") if attention_weight else None
        )

    def attach(self, student, teacher):
        """Resolves the pairs, builds the views and the projections.

        Called by the `Distiller` with its (built) student and teacher.
        """
        if hasattr(self._views, "student"):
            raise ValueError(
                "This FeatureDistillation already belongs to a Distiller (it "
                "holds that Distiller's projections); create a new one."
            )
        if teacher is None:
            raise ValueError(
                "Feature distillation reads the teacher's intermediate layers, "
                "so it needs the teacher model, not only cached outputs."
            )
        self.pairs = self._resolve_pairs(student, teacher)
        taps = {"student": [], "teacher": []}
        for student_ref, teacher_ref in self.pairs:
            student_layer = _resolve_layer(student, student_ref, "student")
            teacher_layer = _resolve_layer(teacher, teacher_ref, "teacher")
            for kind, used in (("hidden", self.weight), ("attention", self.attention_weight)):
                if used:
                    taps["student"].append((student_layer, kind))
                    taps["teacher"].append((teacher_layer, kind))
        self._views.student = build_view(student, taps["student"], "student")
        self._views.teacher = build_view(teacher, taps["teacher"], "teacher")
        self._check_shapes()
        self.built = True

    def _resolve_pairs(self, student, teacher):
        if not isinstance(self.pairs, str):
            return self.pairs
        if self.pairs == "attention":
            similarity, student_layers, teacher_layers = attention_similarity(
                student,
                teacher,
                self._calibration.data,
                self.student_layers,
                self.teacher_layers,
            )
            self.attention_similarity = similarity
            return [
                (student_layers[i], teacher_layers[int(np.argmax(row))])
                for i, row in enumerate(similarity)
            ]
        student_layers = _default_candidates(student, self.student_layers, "student")
        teacher_layers = _default_candidates(teacher, self.teacher_layers, "teacher")
        return [
            (student_layers[i], teacher_layers[j])
            for i, j in layer_mapping(
                len(student_layers), len(teacher_layers), self.pairs
            )
        ]

    def _check_shapes(self):
        """Checks every pair's shapes and builds the projections."""
        student_outputs = self._views.student.outputs[1:]
        teacher_outputs = self._views.teacher.outputs[1:]
        projections = []
        for (pair, kind), s, t in zip(
            self._tap_kinds(), student_outputs, teacher_outputs
        ):
            if kind == "attention":
                _check_head_mapping(self.attention_heads, s.shape[1], t.shape[1])
                continue
            s_shape, t_shape = tuple(s.shape), tuple(t.shape)
            if len(s_shape) != len(t_shape) or any(
                a is not None and b is not None and a != b
                for a, b in zip(s_shape[1:-1], t_shape[1:-1])
            ):
                raise ValueError(
                    f"Hidden states of pair {pair} cannot be mapped: student "
                    f"{s_shape}, teacher {t_shape}. A projection maps the last "
                    "(feature) axis only; the other axes (sequence length, "
                    "spatial size) must match, e.g. by pooling one side or "
                    "choosing layers of the same resolution."
                )
            if not self.projection:
                if s_shape[-1] != t_shape[-1]:
                    raise ValueError(
                        f"projection=False but pair {pair} has student width "
                        f"{s_shape[-1]} and teacher width {t_shape[-1]}; "
                        "enable the projection."
                    )
                continue
            projection = keras.layers.Dense(
                t_shape[-1], use_bias=False, name=f"projection_{len(projections)}"
            )
            projection.build(s_shape)
            projections.append(projection)
        self.projections = projections

    def _kinds(self):
        return [
            kind
            for kind, used in (("hidden", self.weight), ("attention", self.attention_weight))
            if used
        ]

    def _tap_kinds(self):
        return [(pair, kind) for pair in self.pairs for kind in self._kinds()]

    def student_outputs(self, inputs, training=None):
        """Runs the student's view once: returns its logits, keeps the taps."""
        outputs = self._views.student(inputs, training=training)
        self._taps.student = outputs[1:]
        self._taps.padding_mask = _padding_mask_of(inputs)
        return outputs[0]

    def teacher_outputs(self, inputs):
        """Runs the teacher's view in inference mode: returns its logits."""
        outputs = self._views.teacher(inputs, training=False)
        self._taps.teacher = [ops.stop_gradient(o) for o in outputs[1:]]
        return outputs[0]

    def compute_loss(self, sample_weight=None):
        """The weighted hidden-state and attention terms of this step.

        Consumes the outputs that `student_outputs` and `teacher_outputs`
        kept during the same step.

        Args:
            sample_weight: The Distiller's `sample_weight` (or padding mask).

        Returns:
            A float32 scalar.
        """
        student_taps, teacher_taps = self._taps.student, self._taps.teacher
        self._taps.student = self._taps.teacher = None
        if student_taps is None or teacher_taps is None:
            raise ValueError(
                "FeatureDistillation.compute_loss needs this step's student "
                "and teacher outputs: call it from the Distiller's step."
            )
        # Padded positions of the input (`x["padding_mask"]`, e.g. a BERT
        # classifier's batch, whose `sample_weight` is per example) count
        # for no attention query and no (batch, sequence, features) state.
        position_weights = _position_weights(sample_weight, self._taps.padding_mask)
        self._taps.padding_mask = None
        hidden, attention = [], []
        projection_index = 0
        for (pair, kind), s, t in zip(self._tap_kinds(), student_taps, teacher_taps):
            if kind == "attention":
                attention.append(
                    attention_map_loss(s, t, position_weights, self.attention_heads)
                )
                continue
            if self.projection:
                s = self.projections[projection_index](s)
                projection_index += 1
            weights = position_weights if len(t.shape) == 3 else sample_weight
            hidden.append(
                hidden_state_loss(s, t, self.loss, weights, self.normalize)
            )
        total = ops.zeros((), "float32")
        batch_size = ops.shape(student_taps[0])[0]
        if hidden:
            hidden_loss = ops.mean(ops.stack(hidden))
            self.feature_loss_tracker.update_state(hidden_loss, batch_size)
            total = total + self.weight * hidden_loss
        if attention:
            attention_loss = ops.mean(ops.stack(attention))
            self.attention_loss_tracker.update_state(attention_loss, batch_size)
            total = total + self.attention_weight * attention_loss
        return total

    def get_config(self):
        config = super().get_config()
        config.update(
            pairs=self.pairs,
            loss=self.loss,
            weight=self.weight,
            attention_weight=self.attention_weight,
            attention_heads=self.attention_heads,
            student_layers=self.student_layers,
            teacher_layers=self.teacher_layers,
            normalize=self.normalize,
            projection=self.projection,
        )
        return config
