"""PyTorch: the chunked losses' autograd function, gradients, CUDA memory.

`chunked_loss` is a `torch.autograd.Function` that writes into slices of
the gradients and accumulates the embedding gradient with `addmm_`.
Imported only when Keras runs on PyTorch.
"""

import torch

from keras_distill.backend.common import Tile
from keras_distill.backend.common import assign
from keras_distill.backend.common import is_traced
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
    """`keras_distill.backend.chunked_loss` on PyTorch."""
    constants = (row_constants, tile_constants, class_constants)
    return _ChunkedLoss.apply(
        (loss, chunk_size, block_size, tuple(map(len, constants))),
        rows,
        embedding,
        *[tensor for group in constants for tensor in group],
    )


def clear_gradients(variables):
    """Sets each variable's `grad` to `None`."""
    for variable in variables:
        variable.value.grad = None


def assign_outside_compiled_graph(assignments):
    """The assignments, excluded from any `torch.compile` graph."""
    torch.compiler.disable(assign)(assignments)


def device_peak_memory_bytes():
    """`torch.cuda.max_memory_allocated()`, `None` without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())


def _tiles(settings, rows, embedding, constants, start, size):
    """`(rows_chunk, row_chunks, generate)`; `generate` yields the tiles."""
    _, _, block_size, (num_row_constants, num_tile_constants, _) = settings
    end = start + size
    rows_chunk = rows[start:end]
    row_chunks = tuple(c[start:end] for c in constants[:num_row_constants])
    class_start = num_row_constants + num_tile_constants
    tile_rows = tuple(
        c[start:end] for c in constants[num_row_constants:class_start]
    )
    class_constants = constants[class_start:]

    def generate():
        for offset in range(0, num_classes(rows, embedding), block_size):
            stop = offset + block_size
            if embedding is None:
                block = None
                logits = rows_chunk[:, offset:stop]
            else:
                block = embedding[offset:stop]
                logits = rows_chunk @ block.T
            yield block, Tile(
                logits,
                offset,
                row_chunks,
                tuple(c[:, offset:stop] for c in tile_rows),
                tuple(c[offset:stop] for c in class_constants),
            )

    return rows_chunk, row_chunks, generate


def _chunks(num_rows, chunk_size):
    # At least one (possibly empty) chunk, so that no rows still give
    # values.
    for start in range(0, max(num_rows, 1), chunk_size):
        yield start, min(chunk_size, num_rows - start)


class _ChunkedLoss(torch.autograd.Function):
    """The tile loops forward and backward; gradients written in place."""

    @staticmethod
    def forward(ctx, settings, rows, embedding, *constants):
        loss, chunk_size, block_size = settings[:3]
        totals, saved = None, []
        for start, size in _chunks(rows.shape[0], chunk_size):
            _, row_chunks, generate = _tiles(
                settings, rows, embedding, constants, start, size
            )

            def over_tiles(step, state):
                for _, tile in generate():
                    state = step(state, tile)
                return state

            values, chunk_saved = loss.chunk_forward(
                row_chunks,
                over_tiles,
                complete=block_size >= num_classes(rows, embedding),
            )
            saved.append(chunk_saved)
            totals = (
                list(values)
                if totals is None
                else [t + v for t, v in zip(totals, values)]
            )
        ctx.settings = settings
        ctx.saved = {
            key: torch.cat([s[key] for s in saved]) for key in saved[0]
        }
        ctx.save_for_backward(rows, embedding, *constants)
        return tuple(totals)

    @staticmethod
    def backward(ctx, *cotangents):
        loss, chunk_size = ctx.settings[:2]
        rows, embedding, *constants = ctx.saved_tensors
        grad_rows = torch.empty_like(rows)
        grad_embedding = (
            None if embedding is None else torch.zeros_like(embedding)
        )
        for start, size in _chunks(rows.shape[0], chunk_size):
            rows_chunk, _, generate = _tiles(
                ctx.settings, rows, embedding, constants, start, size
            )
            saved_chunk = {
                key: value[start : start + size]
                for key, value in ctx.saved.items()
            }
            grad_rows_chunk = grad_rows[start : start + size]
            if embedding is not None:
                grad_rows_chunk.zero_()
            for block, tile in generate():
                grad_logits = loss.tile_gradient(
                    saved_chunk, cotangents, tile
                ).to(rows.dtype)
                stop = tile.offset + grad_logits.shape[1]
                if embedding is None:
                    grad_rows_chunk[:, tile.offset : stop] = grad_logits
                    continue
                # In place: no (num_classes, features) temporaries.
                grad_embedding[tile.offset : stop].addmm_(
                    grad_logits.T, rows_chunk
                )
                grad_rows_chunk.addmm_(grad_logits, block)
        return (None, grad_rows, grad_embedding) + (None,) * len(
            constants
        )
