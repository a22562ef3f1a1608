"""What every backend shares, and the hooks of backends without code here.

`Tile` and the helpers below are used by the backend modules (`jax.py`,
`tensorflow.py`, `torch.py`). The hooks in `__all__` are the interface each
backend module provides; a backend module re-exports the ones it does not
override, and a Keras backend this package has no code for (numpy,
openvino) gets exactly these: `keras.ops` where that is enough, no chunked
losses, no device memory.
"""

import collections

import keras

__all__ = [
    "assign_outside_compiled_graph",
    "chunked_loss",
    "clear_gradients",
    "device_peak_memory_bytes",
    "is_traced",
    "project_to_vocabulary",
]

Tile = collections.namedtuple(
    "Tile",
    ["logits", "offset", "row_constants", "tile_constants", "class_constants"],
)


Tile.__doc__ = """One tile of logits and the constants that go with it.

Fields:
    logits: `(rows, classes)` logits of the tile, in the rows' dtype (before
        any soft-cap: the loss applies it).
    offset: Index of the tile's first class in the vocabulary (an int
        scalar, a tensor inside loops).
    row_constants: The row constants' chunks, `(rows, ...)` each.
    tile_constants: The tile constants' tiles, `(rows, classes)` each.
    class_constants: The class constants' blocks, `(classes, ...)` each.
"""


def num_classes(rows, embedding):
    """Classes of the logits: `rows`' columns, else `embedding`'s rows."""
    return rows.shape[1] if embedding is None else embedding.shape[0]


def assign(assignments):
    """`variable.assign(value)` for each `(variable, value)` pair."""
    for variable, value in assignments:
        variable.assign(value)


def chunked_loss(
    loss, chunk_size, block_size, rows, embedding, row_constants,
    tile_constants, class_constants,
):
    """Refuses: the custom gradient has no `keras.ops` form."""
    raise NotImplementedError(
        "Chunked losses support the jax, tensorflow and torch backends, not "
        f"{keras.backend.backend()!r}."
    )


def project_to_vocabulary(hidden_states, embedding):
    """`hidden_states @ embedding.T` with `keras.ops`."""
    return keras.ops.matmul(hidden_states, keras.ops.transpose(embedding))


def is_traced(tensor):
    """Whether `tensor` is symbolic (no value yet): never, without tracing."""
    return False


def clear_gradients(variables):
    """No-op: only PyTorch keeps gradients on the variables."""


def assign_outside_compiled_graph(assignments):
    """Plain assignments: no compiled graph to keep them out of."""
    assign(assignments)


def device_peak_memory_bytes():
    """`None`: the backend reports no device memory."""
    return None
