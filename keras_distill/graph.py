"""Functional-graph surgery: inlining nested models, multi-output views.

**One forward pass.** The student runs once per step: the Distiller calls a
multi-output *view* of it, a functional model that shares every layer (and
weight) with the student and returns its logits together with the chosen
layers' outputs. The view is built by walking the student's graph with
Keras's own functional graph runner, inlining nested functional models (a
KerasHub task's backbone), so a block deep inside a `Gemma3CausalLM` is an
output of the view. The teacher likewise runs once, through its own view.

Layer dropout (`keras_distill.extras.layer_dropout`) rebuilds a model with
the same inlining, inserting a stochastic-depth layer on each residual branch.
"""

import keras

from keras_distill.language_models.hub import _AttentionWithScores
from keras_distill.language_models.hub import _check_attention_support
from keras_distill.language_models.hub import _EncoderWithScores
from keras_distill.language_models.hub import _Gemma3AttentionProbabilities
from keras_distill.language_models.hub import _is_transformer_encoder


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
