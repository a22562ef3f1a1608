"""TensorFlow: the chunked losses' custom gradient, traced tensors, GPU memory.

`chunked_loss` is a `tf.custom_gradient` around `tf.while_loop`s; buffers
are updated with the aliasing `InplaceUpdate` / `InplaceAdd` ops (XLA's
`dynamic_update_slice` inside an XLA-compiled function). Imported only when
Keras runs on TensorFlow.
"""

import keras
import tensorflow as tf
from tensorflow.compiler.tf2xla.python.xla import dynamic_slice
from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from keras_distill.backend.common import Tile
from keras_distill.backend.common import assign_outside_compiled_graph
from keras_distill.backend.common import clear_gradients

__all__ = [
    "assign_outside_compiled_graph",
    "chunked_loss",
    "clear_gradients",
    "device_peak_memory_bytes",
    "is_traced",
    "project_to_vocabulary",
]


def project_to_vocabulary(hidden_states, embedding):
    """`hidden_states @ embedding.T`, the transpose folded into the matmul."""
    # `keras.ops.transpose` would copy the (num_classes, features) table.
    return tf.matmul(hidden_states, embedding, transpose_b=True)


def is_traced(tensor):
    """Whether `tensor` is symbolic: in a `tf.function` graph or a Keras graph."""
    return not tf.executing_eagerly() or tf.is_symbolic_tensor(tensor)


def device_peak_memory_bytes():
    """`get_memory_info("GPU:0")["peak"]`, `None` without a GPU."""
    if not tf.config.list_logical_devices("GPU"):
        return None
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


def chunked_loss(
    loss, chunk_size, block_size, rows, embedding, row_constants,
    tile_constants, class_constants,
):
    """`keras_distill.backend.chunked_loss` on TensorFlow."""
    has_embedding = embedding is not None
    sizes = (len(row_constants), len(tile_constants), len(class_constants))

    @tf.custom_gradient
    def loss_fn(rows, *tensors):
        # Cut the tape: an eager GradientTape would otherwise record (and keep
        # alive) every tile's intermediates of the forward pass.
        rows = tf.stop_gradient(rows)
        tensors = [tf.stop_gradient(t) for t in tensors]
        embedding = tensors[0] if has_embedding else None
        constants = tensors[has_embedding:]
        row_constants = constants[: sizes[0]]
        tile_constants = constants[sizes[0] : sizes[0] + sizes[1]]
        class_constants = constants[sizes[0] + sizes[1] :]
        classes = embedding if has_embedding else tf.transpose(rows[:1])
        num_classes = (tf.shape(classes)[0], classes.shape[0])
        num_rows = (tf.shape(rows)[0], rows.shape[0])

        def tiles(start, size):
            rows_chunk = _slice(rows, start, size)
            row_chunks = tuple(_slice(c, start, size) for c in row_constants)

            def over_blocks(step, state):
                def tile_step(offset, width, state):
                    if has_embedding:
                        block = _slice(embedding, offset, width)
                        logits = tf.matmul(rows_chunk, block, transpose_b=True)
                    else:
                        block = None
                        logits = _slice(rows_chunk, offset, width, axis=1)
                    tile = Tile(
                        logits,
                        offset,
                        row_chunks,
                        # One 2-D slice: a chunk of rows first would copy
                        # them.
                        tuple(
                            tf.slice(
                                c,
                                tf.stack([start, offset]),
                                tf.stack([size, width]),
                            )
                            for c in tile_constants
                        ),
                        tuple(
                            _slice(c, offset, width)
                            for c in class_constants
                        ),
                    )
                    return step(tile, block, state)

                return _for_each(*num_classes, block_size, tile_step, state)

            return rows_chunk, row_chunks, over_blocks

        def chunk_forward(start, size, state):
            _, row_chunks, over_blocks = tiles(start, size)
            values, chunk_saved = loss.chunk_forward(
                row_chunks,
                lambda step, state: over_blocks(
                    lambda tile, _, state: step(state, tile), state
                ),
                complete=block_size >= num_classes[1],
            )
            if state is None:
                # The first (remainder) chunk gives the state its structure.
                saved = keras.tree.map_structure(
                    lambda x: _new_buffer(
                        tf.concat([tf.shape(rows)[:1], tf.shape(x)[1:]], 0),
                        x.dtype,
                        zeros=False,
                    ),
                    chunk_saved,
                )
                totals = tuple(tf.zeros_like(v) for v in values)
            else:
                totals, saved = state
            saved = keras.tree.map_structure(
                lambda buffer, x: _update_rows(buffer, start, x),
                saved,
                chunk_saved,
            )
            return tuple(t + v for t, v in zip(totals, values)), saved

        values, saved = _for_each(
            *num_rows, chunk_size, chunk_forward, None
        )

        def gradient(*cotangents):
            def chunk_backward(start, size, grads):
                grad_rows, grad_embedding = grads
                rows_chunk, _, over_blocks = tiles(start, size)
                saved_chunk = keras.tree.map_structure(
                    lambda x: _slice(x, start, size), saved
                )

                def tile_step(tile, block, state):
                    grad_rows_chunk, grad_embedding = state
                    grad_logits = tf.cast(
                        loss.tile_gradient(saved_chunk, cotangents, tile),
                        rows.dtype,
                    )
                    if not has_embedding:
                        # One block: the tile is the whole chunk of rows.
                        return grad_logits, grad_embedding
                    grad_embedding = _update_rows(
                        grad_embedding,
                        tile.offset,
                        tf.matmul(grad_logits, rows_chunk, transpose_a=True),
                        add=True,
                    )
                    return (
                        grad_rows_chunk + tf.matmul(grad_logits, block),
                        grad_embedding,
                    )

                grad_rows_chunk, grad_embedding = over_blocks(
                    tile_step, (tf.zeros_like(rows_chunk), grad_embedding)
                )
                grad_rows = _update_rows(grad_rows, start, grad_rows_chunk)
                return grad_rows, grad_embedding

            grads = (
                _new_buffer(tf.shape(rows), rows.dtype, zeros=False),
                _new_buffer(tf.shape(embedding), embedding.dtype, zeros=True)
                if has_embedding
                else tf.zeros(()),
            )
            grad_rows, grad_embedding = _for_each(
                *num_rows, chunk_size, chunk_backward, grads
            )
            grads = [grad_rows] + ([grad_embedding] if has_embedding else [])
            return grads + [None] * len(constants)

        return values, gradient

    inputs = [rows] + ([embedding] if has_embedding else [])
    return loss_fn(*inputs, *row_constants, *tile_constants, *class_constants)


def _for_each(total, static_total, size, step, state):
    """`state = step(start, size, state)` over `total` items in chunks.

    The remainder chunk runs first, outside the loop (even when empty if
    `state` starts as None, to give it its structure); the full chunks run
    in a `tf.while_loop`. Every chunk size is then fixed once the input
    shapes are, as XLA requires (it compiles the loop body even when the
    loop runs no iteration, so `size` must not exceed a known row count).
    """
    if static_total is None:
        num_full = total // size
        state = step(num_full * size, total - num_full * size, state)
    else:
        # Python ints where the count is known: static shapes throughout.
        size = max(1, min(size, static_total))
        num_full, remainder = divmod(static_total, size)
        if remainder or state is None:
            state = step(num_full * size, remainder, state)
        if not num_full:
            return state
    _, state = tf.while_loop(
        lambda i, _: i < num_full,
        lambda i, state: (i + 1, step(i * size, size, state)),
        (tf.constant(0), state),
        # One iteration at a time: by default up to 10 run ahead, each with
        # its own tiles in memory.
        parallel_iterations=1,
    )
    return state


def _slice(tensor, start, size, axis=0):
    begin = [0] * len(tensor.shape)
    sizes = [-1] * len(tensor.shape)
    begin[axis] = start
    sizes[axis] = size
    return tf.slice(tensor, tf.stack(begin), tf.stack(sizes))


def _in_xla_context():
    # Private but long-stable: TensorFlow's own control flow asks the same.
    return control_flow_util.GraphOrParentsInXlaContext(
        tf_ops.get_default_graph()
    )


def _new_buffer(shape, dtype, zeros):
    """A fresh buffer for the in-place updates of `_update_rows`."""
    if _in_xla_context():
        return tf.zeros(shape, dtype)
    # Not `tf.zeros`: the updates mutate the buffer, which must be allocated
    # anew on every call, never a constant-folded, shared tensor.
    return tf.raw_ops.Empty(shape=shape, dtype=dtype, init=zeros)


def _update_rows(buffer, start, update, add=False):
    """`buffer[start:start + len(update)] (+)= update`, without copying it.

    Outside XLA, TensorFlow copies a while-loop variable on every functional
    update (`tensor_scatter_nd_update` and friends), so a gradient assembled
    that way costs twice its size; the aliasing `InplaceUpdate` and
    `InplaceAdd` ops write into the buffer itself. XLA has no such ops but
    updates loop variables in place by itself.
    """
    if _in_xla_context():
        begin = tf.stack([start] + [0] * (len(buffer.shape) - 1))
        if add:
            update = update + dynamic_slice(buffer, begin, tf.shape(update))
        return dynamic_update_slice(buffer, update, begin)
    indices = tf.range(start, start + tf.shape(update)[0])
    if add:
        return tf.raw_ops.InplaceAdd(x=buffer, i=indices, v=update)
    return tf.raw_ops.InplaceUpdate(x=buffer, i=indices, v=update)

