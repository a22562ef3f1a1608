"""JAX: the chunked losses' custom VJP, traced values and device memory.

`chunked_loss` is a `jax.custom_vjp` around `lax.fori_loop`s, jitted once
per loss; buffers are updated with `dynamic_update_slice`, in place under
XLA. Imported only when Keras runs on JAX.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from keras_distill.backend.common import Tile
from keras_distill.backend.common import assign_outside_compiled_graph
from keras_distill.backend.common import clear_gradients
from keras_distill.backend.common import num_classes
from keras_distill.backend.common import project_to_vocabulary

__all__ = [
    "assign_outside_compiled_graph",
    "chunked_loss",
    "clear_gradients",
    "device_peak_memory_bytes",
    "is_traced",
    "project_to_vocabulary",
]


def chunked_loss(
    loss, chunk_size, block_size, rows, embedding, row_constants,
    tile_constants, class_constants,
):
    """`keras_distill.backend.chunked_loss` on JAX."""
    has_embedding = embedding is not None
    return _loss_function(loss, chunk_size, block_size, has_embedding)(
        rows, embedding, row_constants, tile_constants, class_constants
    )


def is_traced(tensor):
    """Whether `tensor` is a tracer of a transformed function."""
    return isinstance(tensor, jax.core.Tracer)


def device_peak_memory_bytes():
    """`peak_bytes_in_use` of the first device, `None` where not reported."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


@functools.lru_cache(maxsize=None)
def _loss_function(loss, chunk_size, block_size, has_embedding):
    """The jitted custom-VJP function of `loss` for these tile sizes."""

    def for_each(total, size, step, state):
        """`state = step(start, size, state)` over `total` in chunks."""
        num_full = total // size
        if num_full:
            state = lax.fori_loop(
                0, num_full, lambda i, s: step(i * size, size, s), state
            )
        if total % size:
            state = step(num_full * size, total % size, state)
        return state

    def take(tensors, start, size, axis=0):
        return tuple(
            lax.dynamic_slice_in_dim(t, start, size, axis) for t in tensors
        )

    def tiles(inputs, start, size):
        """`for_each` over the blocks of rows `[start, start + size)`."""
        rows, embedding, row_constants, tile_constants, class_constants = inputs
        (rows_chunk,) = take((rows,), start, size)
        row_chunks = take(row_constants, start, size)
        classes = num_classes(rows, embedding)

        def over_blocks(step, state):
            def tile_step(offset, width, state):
                if has_embedding:
                    (block,) = take((embedding,), offset, width)
                    logits = jnp.matmul(rows_chunk, block.T)
                else:
                    block = None
                    logits = lax.dynamic_slice_in_dim(
                        rows_chunk, offset, width, 1
                    )
                tile = Tile(
                    logits,
                    offset,
                    row_chunks,
                    # One 2-D slice: a chunk of rows first would copy them.
                    tuple(
                        lax.dynamic_slice(t, (start, offset), (size, width))
                        for t in tile_constants
                    ),
                    take(class_constants, offset, width),
                )
                return step(tile, block, state)

            return for_each(classes, block_size, tile_step, state)

        return rows_chunk, row_chunks, over_blocks

    def chunk_forward(inputs, start, size):
        _, row_chunks, over_blocks = tiles(inputs, start, size)
        return loss.chunk_forward(
            row_chunks,
            lambda step, state: over_blocks(
                lambda tile, _, state: step(state, tile), state
            ),
            complete=block_size >= num_classes(*inputs[:2]),
        )

    def forward(*inputs):
        num_rows = inputs[0].shape[0]
        first = min(chunk_size, num_rows)
        shapes = jax.eval_shape(
            lambda *inputs: chunk_forward(inputs, 0, first), *inputs
        )
        state = (
            tuple(jnp.zeros((), v.dtype) for v in shapes[0]),
            jax.tree.map(
                lambda s: jnp.zeros((num_rows,) + s.shape[1:], s.dtype),
                shapes[1],
            ),
        )

        def step(start, size, state):
            totals, saved = state
            values, chunk_saved = chunk_forward(inputs, start, size)
            saved = jax.tree.map(
                lambda buffer, x: lax.dynamic_update_slice_in_dim(
                    buffer, x, start, 0
                ),
                saved,
                chunk_saved,
            )
            return tuple(t + v for t, v in zip(totals, values)), saved

        return for_each(num_rows, chunk_size, step, state)

    @jax.custom_vjp
    def loss_fn(*inputs):
        return forward(*inputs)[0]

    def loss_forward(*inputs):
        values, saved = forward(*inputs)
        return values, (inputs, saved)

    def loss_backward(residuals, cotangents):
        inputs, saved = residuals
        rows, embedding = inputs[:2]

        def step(start, size, grads):
            grad_rows, grad_embedding = grads
            rows_chunk, _, over_blocks = tiles(inputs, start, size)
            saved_chunk = jax.tree.map(
                lambda x: lax.dynamic_slice_in_dim(x, start, size), saved
            )

            def tile_step(tile, block, state):
                grad_rows_chunk, grad_embedding = state
                grad_logits = loss.tile_gradient(
                    saved_chunk, tuple(cotangents), tile
                ).astype(rows.dtype)
                if not has_embedding:
                    return (
                        lax.dynamic_update_slice_in_dim(
                            grad_rows_chunk, grad_logits, tile.offset, 1
                        ),
                        grad_embedding,
                    )
                grad_block = lax.dynamic_slice_in_dim(
                    grad_embedding, tile.offset, block.shape[0]
                )
                grad_embedding = lax.dynamic_update_slice_in_dim(
                    grad_embedding,
                    grad_block + jnp.matmul(grad_logits.T, rows_chunk),
                    tile.offset,
                    0,
                )
                return (
                    grad_rows_chunk + jnp.matmul(grad_logits, block),
                    grad_embedding,
                )

            grad_rows_chunk, grad_embedding = over_blocks(
                tile_step, (jnp.zeros_like(rows_chunk), grad_embedding)
            )
            grad_rows = lax.dynamic_update_slice_in_dim(
                grad_rows, grad_rows_chunk, start, 0
            )
            return grad_rows, grad_embedding

        grads = (
            jnp.zeros_like(rows),
            jnp.zeros_like(embedding) if has_embedding else None,
        )
        grad_rows, grad_embedding = for_each(
            rows.shape[0], chunk_size, step, grads
        )
        return (grad_rows, grad_embedding, None, None, None)

    loss_fn.defvjp(loss_forward, loss_backward)
    return jax.jit(loss_fn)

