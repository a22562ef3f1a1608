"""Sharding a large teacher (and its student) with `keras.distribution`.

A 27B teacher does not fit on one accelerator. `keras.distribution` (JAX)
shards each weight over a device mesh according to a `LayoutMap` of weight
paths; KerasHub backbones ship their own (`GemmaBackbone.get_layout_map`).
Two gaps are filled here:

- `Gemma3Backbone` has no `get_layout_map` in KerasHub, but its weights have
  the same paths and roles as Gemma's, so Gemma's map applies.
- A layout map shards attention weights over their heads, and Gemma 3 1B has
  one key/value head: a mesh axis of 8 cannot split it. `ShardedDistribution`
  replicates any weight axis that the mesh axis does not divide instead of
  failing, so one mesh serves a 27B teacher and a 1B student alike.
"""

import keras


def causal_lm_layout_map(
    backbone_class, device_mesh, model_dim_name="model", batch_dim_name="batch"
):
    """The `LayoutMap` a KerasHub backbone class shards its weights with.

    Args:
        backbone_class: A KerasHub backbone class (or instance), e.g.
            `keras_hub.models.Gemma3Backbone`.
        device_mesh: The `keras.distribution.DeviceMesh`.
        model_dim_name: Mesh axis the weights are split over.
        batch_dim_name: Mesh axis the batch is split over.

    Returns:
        A `keras.distribution.LayoutMap`.

    Example:

    >>> import keras_hub
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (1, 1), ("batch", "model"), devices=["cpu:0"])
    >>> layout_map = causal_lm_layout_map(keras_hub.models.Gemma3Backbone, mesh)
    >>> layout_map["decoder_block_0/ffw_linear/kernel"].axes
    ('model', 'batch')
    """
    import keras_hub

    if not isinstance(backbone_class, type):
        backbone_class = type(backbone_class)
    if issubclass(backbone_class, keras_hub.models.Gemma3Backbone):
        # Same weight paths and roles as Gemma's (checked in the tests).
        backbone_class = keras_hub.models.GemmaBackbone
    get_layout_map = getattr(backbone_class, "get_layout_map", None)
    if get_layout_map is None:
        raise ValueError(
            f"{backbone_class.__name__} has no `get_layout_map`; build a "
            "`keras.distribution.LayoutMap` of its weight paths yourself."
        )
    return get_layout_map(
        device_mesh,
        model_parallel_dim_name=model_dim_name,
        data_parallel_dim_name=batch_dim_name,
    )


class ShardedDistribution(keras.distribution.ModelParallel):
    """`ModelParallel` that replicates weight axes the mesh cannot divide.

    Args:
        layout_map: The `keras.distribution.LayoutMap` of weight paths.
        batch_dim_name: Mesh axis the batch is split over.
        **kwargs: Other `keras.distribution.ModelParallel` arguments.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), keras.distribution.list_devices())
    layout_map = causal_lm_layout_map(keras_hub.models.Gemma3Backbone, mesh)
    keras.distribution.set_distribution(
        ShardedDistribution(layout_map, batch_dim_name="batch"))
    distiller = CausalLMDistiller.from_preset(
        "gemma3_instruct_27b", "gemma3_instruct_1b", teacher_dtype="bfloat16")
    ```
    """

    def __init__(self, layout_map, batch_dim_name="batch", **kwargs):
        super().__init__(
            layout_map=layout_map, batch_dim_name=batch_dim_name, **kwargs
        )

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        mesh = layout.device_mesh
        axes = tuple(
            axis
            if axis is None
            or size % mesh.shape[mesh.axis_names.index(axis)] == 0
            else None
            for axis, size in zip(layout.axes, variable.shape)
        )
        if axes == tuple(layout.axes):
            return layout
        return keras.distribution.TensorLayout(axes, mesh)
