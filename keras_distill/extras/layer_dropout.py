"""Progressive layer dropout (stochastic depth) for a student's residual blocks.

While training, each residual block is skipped for a whole example with
probability `rate` (Huang et al., 2016, "Deep Networks with Stochastic
Depth"; Fan et al., 2019, "LayerDrop"): its output is `shortcut + keep ·
residual / (1 - rate)` with `keep ∈ {0, 1}` drawn per example, so the
expected output equals the full block's. At inference every block runs and
nothing is scaled. Deeper blocks are dropped more often: block `l` of `L`
(counting from 1) gets `rate = base_rate · l / L`.

`add_stochastic_depth(model, base_rate)` returns a *view* of a functional
model in which every residual block goes through a `StochasticDepth` layer.
The view shares every weight with `model`, so training the view trains
`model`; keep `model` for inference and export, it has no dropout at all.
Nested models (a KerasHub task's backbone) are inlined, so the view is one
flat functional graph that saves and reloads like any functional model.
Residual blocks are

- on plain Keras functional models, the `keras.layers.Add` layers with two
  inputs: the deeper input (more layers from the model's inputs) is the
  residual branch, the other the shortcut;
- on KerasHub models (a backbone or a task such as `Gemma3CausalLM`), the
  backbone's `transformer_layers` (e.g. Gemma 3 decoder blocks): the whole
  block is skipped, i.e. `keep` multiplies `block(x) - x`.

`StochasticDepthSchedule` grows the rates over the first epochs. The masks
come from each layer's `keras.random.SeedGenerator`, so a `seed` makes them
reproducible.
"""

import keras
from keras import ops

from keras_distill import checks
from keras_distill.graph import inline_graph
from keras_distill.language_models.hub import _hub_blocks


@keras.saving.register_keras_serializable(package="keras_distill")
class StochasticDepth(keras.layers.Layer):
    """Adds a residual to its shortcut, dropping it per example in training.

    Called on `[shortcut, branch]`. With `block_output=False` (default)
    `branch` is the residual branch and the output is `shortcut + branch` at
    inference; with `block_output=True`, `branch` is the output of a block
    that already added `shortcut` itself (as transformer blocks do), the
    residual is `branch - shortcut`, and the output at inference is `branch`
    unchanged. In training the residual is multiplied by
    `keep / (1 - rate)`, where `keep` is 0 with probability `rate`, once per
    example.

    The rate in use is a non-trainable variable (`current_rate`), so a
    callback such as `StochasticDepthSchedule` can change it between epochs
    without retracing the compiled step; `rate` is its target value.

    Args:
        rate: Drop probability in `[0, 1)`.
        seed: Optional integer seed of the layer's `SeedGenerator`.
        block_output: Whether `branch` already includes `shortcut`.
        **kwargs: `keras.layers.Layer` arguments such as `name`.

    Example:

    >>> import numpy as np
    >>> layer = StochasticDepth(rate=0.5, seed=0)
    >>> shortcut, branch = np.ones((4, 2)), np.full((4, 2), 3.0)
    >>> keras.ops.convert_to_numpy(layer([shortcut, branch]))[0].tolist()
    [4.0, 4.0]
    >>> out = keras.ops.convert_to_numpy(layer([shortcut, branch], training=True))
    >>> sorted(set(out[:, 0].tolist()) | {1.0, 7.0}) == [1.0, 7.0]
    True
    """

    def __init__(self, rate, seed=None, block_output=False, **kwargs):
        super().__init__(**kwargs)
        checks.check_unit_interval("rate", rate, include_one=False)
        self.rate = float(rate)
        self.seed = seed
        self.block_output = bool(block_output)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.current_rate = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.rate),
            dtype="float32",
            trainable=False,
            name="current_rate",
        )
        self.built = True

    def call(self, inputs, training=None):
        shortcut, branch = inputs
        if not training:
            return branch if self.block_output else shortcut + branch
        residual = branch - shortcut if self.block_output else branch
        batch_size = ops.shape(residual)[0]
        mask_shape = (batch_size,) + (1,) * (len(residual.shape) - 1)
        rate = ops.cast(self.current_rate, "float32")
        draws = keras.random.uniform(mask_shape, seed=self.seed_generator)
        keep = ops.cast(draws >= rate, "float32") / (1.0 - rate)
        return shortcut + residual * ops.cast(keep, residual.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def get_config(self):
        return {
            **super().get_config(),
            "rate": self.rate,
            "seed": self.seed,
            "block_output": self.block_output,
        }


def progressive_rates(num_blocks, base_rate):
    """Drop rates growing linearly with depth: `base_rate · l / num_blocks`.

    Args:
        num_blocks: Number of residual blocks.
        base_rate: Rate of the last block, in `[0, 1)`.

    Returns:
        A list of `num_blocks` floats, shallowest block first.

    Example:

    >>> progressive_rates(4, 0.5)
    [0.125, 0.25, 0.375, 0.5]
    """
    checks.check_unit_interval("base_rate", base_rate, include_one=False)
    checks.check_positive_int("num_blocks", num_blocks)
    return [base_rate * (block + 1) / num_blocks for block in range(num_blocks)]


def _residual_adds(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.Add)
    ]


def _keras_tensors(structure):
    return [
        value
        for value in keras.tree.flatten(structure)
        if isinstance(value, keras.KerasTensor)
    ]


def stochastic_depth_layers(model):
    """The `StochasticDepth` layers of a model, shallowest first.

    Args:
        model: A Keras model, e.g. a view from `add_stochastic_depth`.

    Returns:
        A list of `StochasticDepth` layers, sorted by target rate.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> stochastic_depth_layers(model)
    []
    """
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, StochasticDepth)
    ]
    # Rates grow with depth, so they order the layers.
    return sorted(layers, key=lambda layer: (layer.rate, layer.name))


def add_stochastic_depth(model, base_rate, seed=None, blocks=None):
    """A view of `model` that skips residual blocks at random in training.

    Args:
        model: A built functional `keras.Model` with `keras.layers.Add`
            residual connections, or a KerasHub backbone or task (e.g.
            `keras_hub.models.Gemma3CausalLM`) whose backbone has
            `transformer_layers`.
        base_rate: Drop rate of the deepest block, in `[0, 1)`; block `l` of
            `L` gets `base_rate · l / L`.
        seed: Optional integer; block `l` uses seed `seed + l`, so the view's
            masks are reproducible.
        blocks: Optional names of the blocks to use (the `Add` layers, or
            the transformer blocks of a KerasHub model); all by default.
            Depth fractions count the chosen blocks only.

    Returns:
        A functional `keras.Model` with the same inputs and outputs as
        `model`, sharing all its weights, with one `StochasticDepth` layer
        per block. Train it (e.g. as a `Distiller`'s student) and keep
        `model` for inference.

    Raises:
        ValueError: For a model without residual blocks, unknown `blocks`
            names (the available ones are listed), a rate outside `[0, 1)`,
            a model that already has `StochasticDepth` layers, or an `Add`
            whose two inputs are equally deep (the branch is ambiguous).

    Example:

    >>> import numpy as np
    >>> inputs = keras.Input((4,))
    >>> hidden = keras.layers.Dense(4)(inputs)
    >>> outputs = keras.layers.Add()([inputs, keras.layers.Dense(4)(hidden)])
    >>> model = keras.Model(inputs, outputs)
    >>> view = add_stochastic_depth(model, base_rate=0.2, seed=0)
    >>> [layer.rate for layer in stochastic_depth_layers(view)]
    [0.2]
    >>> x = np.ones((2, 4), "float32")
    >>> bool(np.allclose(view.predict(x, verbose=0), model.predict(x, verbose=0)))
    True
    """
    checks.check_unit_interval("base_rate", base_rate, include_one=False)
    if isinstance(model, keras.Sequential):
        raise ValueError(
            "A Sequential model has no residual connections; build the "
            "student functionally with `keras.layers.Add()([shortcut, "
            "branch])` blocks."
        )
    if not isinstance(model, keras.Model) or not hasattr(model, "_run_through_graph"):
        raise TypeError(
            "`model` must be a functional keras.Model (built with "
            "`keras.Model(inputs, outputs)` or a KerasHub model), got "
            f"{type(model).__name__}."
        )
    if stochastic_depth_layers(model):
        raise ValueError(
            "`model` already has StochasticDepth layers; apply "
            "`add_stochastic_depth` to the model without them."
        )
    hub_blocks = _hub_blocks(model)
    candidates = hub_blocks if hub_blocks is not None else _residual_adds(model)
    if not candidates:
        raise ValueError(
            "`model` has no residual blocks: no `keras.layers.Add` layer and "
            "no KerasHub `transformer_layers`. Write residual connections as "
            "`keras.layers.Add()([shortcut, branch])`."
        )
    if blocks is not None:
        names = [layer.name for layer in candidates]
        unknown = [name for name in blocks if name not in names]
        if unknown:
            raise ValueError(
                f"Unknown blocks {unknown}; the residual blocks of `model` "
                f"are {names}."
            )
        candidates = [layer for layer in candidates if layer.name in blocks]
    rates = progressive_rates(len(candidates), base_rate)
    rate_of = {id(layer): rate for layer, rate in zip(candidates, rates)}
    block_index = {id(layer): index for index, layer in enumerate(candidates)}
    # Longest path (in layers) from the model's inputs to each tensor of the
    # view, filled in topological order as the graph is rebuilt.
    depth = {}

    wrapped = set()

    def call_function(layer, *args, **kwargs):
        inputs_depth = max(
            (depth.get(id(t), 0) for t in _keras_tensors((args, kwargs))),
            default=0,
        )
        if id(layer) not in rate_of:
            outputs = layer(*args, **kwargs)
        else:
            if id(layer) in wrapped:
                raise ValueError(
                    f"Block {layer.name!r} is called more than once in the "
                    "model; stochastic depth needs one call per block. Leave "
                    "it out with `blocks=`."
                )
            wrapped.add(id(layer))
            index = block_index[id(layer)]
            stochastic_depth = StochasticDepth(
                rate_of[id(layer)],
                seed=None if seed is None else seed + index,
                block_output=hub_blocks is not None,
                name=f"stochastic_depth_{index}",
            )
            if hub_blocks is not None:
                outputs = stochastic_depth([args[0], layer(*args, **kwargs)])
            else:
                # The Add itself is replaced: StochasticDepth does the sum.
                outputs = stochastic_depth(_shortcut_and_branch(layer, args, depth))
        for tensor in _keras_tensors(outputs):
            depth[id(tensor)] = inputs_depth + 1
        return outputs

    inputs, outputs = inline_graph(model, call_function)
    return keras.Model(inputs, outputs, name=model.name)


def _shortcut_and_branch(add_layer, args, depth):
    inputs = args[0]
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
        raise ValueError(
            f"Add layer {add_layer.name!r} sums {len(keras.tree.flatten(inputs))} "
            "tensors; stochastic depth needs residual Adds of exactly two: "
            "`Add()([shortcut, branch])`. Leave it out with `blocks=`."
        )
    first, second = inputs
    first_depth, second_depth = depth.get(id(first), 0), depth.get(id(second), 0)
    if first_depth == second_depth:
        raise ValueError(
            f"Cannot tell the residual branch from the shortcut in Add layer "
            f"{add_layer.name!r}: both inputs are {first_depth} layers deep. "
            "Leave it out with `blocks=`."
        )
    return [first, second] if first_depth < second_depth else [second, first]


def _children(layer):
    """Direct sublayers by name, with nested models expanded into theirs.

    Views are flat graphs, so a nested model (a KerasHub backbone) is matched
    by its layers rather than by itself.
    """
    children = {}
    for child in layer._flatten_layers(include_self=False, recursive=False):
        if isinstance(child, keras.Model):
            children.update(_children(child))
        elif not isinstance(child, (StochasticDepth, keras.layers.InputLayer)):
            children[child.name] = child
    return children


def _copy_weights_by_name(source, target, path):
    own_source = source._trainable_variables + source._non_trainable_variables
    own_target = target._trainable_variables + target._non_trainable_variables
    if len(own_source) != len(own_target) or any(
        tuple(a.shape) != tuple(b.shape) for a, b in zip(own_source, own_target)
    ):
        raise ValueError(
            f"Layer {path!r} has weights of shapes "
            f"{[tuple(v.shape) for v in own_source]} in `model` but "
            f"{[tuple(v.shape) for v in own_target]} in `into`: `into` must "
            "have the architecture the view was made from."
        )
    for source_variable, target_variable in zip(own_source, own_target):
        target_variable.assign(source_variable)
    source_children = _children(source)
    for name, target_child in _children(target).items():
        if not target_child.weights:
            continue
        if name not in source_children:
            raise ValueError(
                f"`into` has a layer {path + '/' + name!r} that `model` lacks; "
                f"`model` has {sorted(source_children)} there."
            )
        _copy_weights_by_name(
            source_children[name], target_child, path + "/" + name
        )


def remove_stochastic_depth(model, into=None):
    """`model` without its `StochasticDepth` layers, for inference and export.

    Useful when the original model is gone (say the view was reloaded from a
    file). Without `into` the result is a functional model that computes
    what the view computes at inference and shares its weights. With `into`,
    a freshly built model of the original architecture (e.g. a new
    `Gemma3CausalLM` from the same config, to keep `generate` and
    `save_to_preset`), the view's weights are copied into it, layer by layer
    and by name, and `into` is returned.

    Args:
        model: A functional model with `StochasticDepth` layers.
        into: Optional model to copy the weights into.

    Returns:
        A model without `StochasticDepth` layers.

    Example:

    >>> inputs = keras.Input((4,))
    >>> branch = keras.layers.Dense(4)(inputs)
    >>> model = keras.Model(inputs, keras.layers.Add()([inputs, branch]))
    >>> view = add_stochastic_depth(model, base_rate=0.1)
    >>> stochastic_depth_layers(remove_stochastic_depth(view))
    []
    """
    if not stochastic_depth_layers(model):
        raise ValueError("`model` has no StochasticDepth layers to remove.")
    if into is not None:
        if stochastic_depth_layers(into):
            raise ValueError("`into` has StochasticDepth layers itself.")
        _copy_weights_by_name(model, into, into.name)
        return into

    def call_function(layer, *args, **kwargs):
        if isinstance(layer, StochasticDepth):
            shortcut, branch = args[0]
            if layer.block_output:
                return branch
            return keras.layers.Add()([shortcut, branch])
        return layer(*args, **kwargs)

    inputs, outputs = inline_graph(model, call_function)
    return keras.Model(inputs, outputs, name=model.name)


class StochasticDepthSchedule(keras.callbacks.Callback):
    """Grows every `StochasticDepth` rate from 0 to its target over epochs.

    At the start of epoch `e` (from 0) each layer's `current_rate` becomes
    `rate · min(1, e / warmup_epochs)`, so the first epoch trains the full
    network and the rates reach their targets at epoch `warmup_epochs`. The
    rates change between epochs only: under the JAX backend the training
    state is read from the variables once per epoch.

    Args:
        warmup_epochs: Number of epochs over which the rates grow, >= 1.

    Example:

    >>> inputs = keras.Input((4,))
    >>> branch = keras.layers.Dense(4)(inputs)
    >>> view = add_stochastic_depth(
    ...     keras.Model(inputs, keras.layers.Add()([inputs, branch])), 0.2)
    >>> schedule = StochasticDepthSchedule(warmup_epochs=4)
    >>> schedule.set_model(view)
    >>> schedule.on_epoch_begin(2)
    >>> [round(float(layer.current_rate.numpy()), 4)
    ...  for layer in stochastic_depth_layers(view)]
    [0.1]
    """

    def __init__(self, warmup_epochs):
        super().__init__()
        checks.check_positive_int("warmup_epochs", warmup_epochs)
        self.warmup_epochs = warmup_epochs

    def on_epoch_begin(self, epoch, logs=None):
        layers = stochastic_depth_layers(self.model)
        if not layers:
            raise ValueError(
                "StochasticDepthSchedule found no StochasticDepth layer in the "
                "model being trained; train the view `add_stochastic_depth` "
                "returns (or a Distiller whose student it is)."
            )
        factor = min(1.0, epoch / self.warmup_epochs)
        for layer in layers:
            layer.current_rate.assign(layer.rate * factor)
