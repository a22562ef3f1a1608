"""Tiled logits losses with a hand-written backward pass: the backend part.

The one module of `keras_distill` that branches on `keras.backend.backend()`:
a custom gradient and in-place buffer updates have no `keras.ops` form.

`chunked_loss` evaluates a loss over the logits of `rows` (tokens) tile by
tile: a tile is `chunk_size` rows by `block_size` classes, its logits either a
slice of materialized logits or `rows_chunk @ embedding_block.T`. The loss
object (`keras_distill.losses.fused` defines them) supplies the maths on one tile as
pure `keras.ops` functions; this module runs the loops and the custom
gradient:

- forward, per chunk of rows: the loss makes one or two passes over the
  class blocks (online log-sum-exps, then sums that depend on them) and
  returns the chunk's values and the few numbers per row that are all the
  backward pass keeps;
- backward, per chunk and block: the tile's logits are recomputed, the loss
  gives their gradient, and it is written (materialized logits) or
  multiplied out (`grad_embedding[block] += grad_logits.T @ rows_chunk`,
  `grad_rows[chunk] += grad_logits @ embedding[block]`) in place.

Peak memory beyond the inputs and the gradients is then a few tiles plus a
few numbers per row, and the embedding is read a handful of times per chunk
of rows instead of several times per token.

- JAX: `jax.custom_vjp` around `lax.fori_loop`s, jitted once per loss;
  buffers are updated with `dynamic_update_slice`, in place under XLA.
- TensorFlow: `tf.custom_gradient` around `tf.while_loop`s; buffers are
  updated with the aliasing `InplaceUpdate` / `InplaceAdd` ops (XLA's
  `dynamic_update_slice` inside an XLA-compiled function).
- PyTorch: a `torch.autograd.Function` that writes into slices of the
  gradients and accumulates the embedding gradient with `addmm_`.
"""

import collections
import contextlib
import functools

import keras

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


def chunked_loss(
    loss,
    rows,
    embedding=None,
    row_constants=(),
    tile_constants=(),
    class_constants=(),
    chunk_size=16,
    block_size=None,
):
    """Evaluates `loss` tile by tile; gradients recompute each tile.

    Gradients flow to `rows` and `embedding` only; the constants are fixed,
    like a frozen teacher's outputs.

    Args:
        loss: The per-tile maths, an object (the same one from call to call
            for the same loss: the JAX path compiles once per object) with
            an int `num_values` and two pure `keras.ops` methods:
            - `chunk_forward(row_chunks, over_tiles, complete) -> (values,
              saved)`: the forward pass over one chunk of rows, given the
              tuple of its row-constant chunks and `over_tiles(step, state)`,
              which folds `state = step(state, tile)` over the chunk's tiles
              (a `Tile` each, in class order; call it once per pass);
              `complete` is True when one tile holds every class. `values`
              is a tuple of `num_values` float32 scalars (sums over the
              chunk's rows), `saved` a dict of float32 tensors with leading
              axis `rows`, all the backward pass gets of the forward pass;
            - `tile_gradient(saved, cotangents, tile)`: the float32 gradient
              of `sum(cotangents[i] * values[i])` with respect to
              `tile.logits`, where `saved` is sliced to the tile's rows.
        rows: `(num_rows, features)`: the logits themselves (no
            `embedding`; then `block_size` is the number of classes) or
            hidden states.
        embedding: Optional `(num_classes, features)` output embedding: a
            tile's logits are `rows_chunk @ embedding_block.T`.
        row_constants: Tensors with leading axis `num_rows`.
        tile_constants: Tensors `(num_rows, num_classes)`, tiled like the
            logits.
        class_constants: Tensors with leading axis `num_classes`.
        chunk_size: Rows per tile, a Python int `>= 1`.
        block_size: Classes per tile with an `embedding`, a Python int
            `>= 1`; None means all of them.

    Returns:
        The tuple of the `num_values` float32 scalars, summed over all rows.
    """
    if embedding is None or block_size is None:
        block_size = _num_classes((rows, embedding))
    args = (
        rows,
        embedding,
        tuple(row_constants),
        tuple(tile_constants),
        tuple(class_constants),
    )
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_loss(loss, chunk_size, block_size, embedding is not None)(
            *args
        )
    if backend == "tensorflow":
        return _tf_chunked_loss(loss, chunk_size, block_size, *args)
    if backend == "torch":
        rows, embedding, *constants = args
        return _torch_function().apply(
            (loss, chunk_size, block_size, tuple(map(len, constants))),
            rows,
            embedding,
            *[tensor for group in constants for tensor in group],
        )
    raise NotImplementedError(
        f"Chunked losses support the jax, tensorflow and torch backends, not "
        f"{backend!r}."
    )


def _num_classes(rows_and_embedding):
    rows, embedding = rows_and_embedding
    return rows.shape[1] if embedding is None else embedding.shape[0]


def project_to_vocabulary(hidden_states, embedding):
    """`hidden_states @ embedding.T` without materializing the transpose.

    Args:
        hidden_states: Tensor `(num_rows, features)`.
        embedding: Output embedding `(num_classes, features)`.

    Returns:
        Logits `(num_rows, num_classes)` in the inputs' dtype.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # `keras.ops.transpose` would copy the (num_classes, features) table.
        return tf.matmul(hidden_states, embedding, transpose_b=True)
    return keras.ops.matmul(hidden_states, keras.ops.transpose(embedding))


def concrete_value(tensor):
    """`tensor` as a NumPy array, or `None` inside a traced function."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if isinstance(tensor, jax.core.Tracer):
            return None
    elif backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly() or tf.is_symbolic_tensor(tensor):
            return None
    return keras.ops.convert_to_numpy(tensor)


# Mappings `id(variable) -> value` that `variable_value` reads first.
_VARIABLE_VALUES = []


@contextlib.contextmanager
def variable_values(variables, values):
    """Makes `variable_value(v)` return `values[i]` for `v = variables[i]`.

    Keras's JAX trainer keeps the optimizer's state as arrays passed to the
    train step, not in its variables (those hold stale values inside the
    traced step), so a loss that reads that state gets it through this scope.
    TensorFlow and PyTorch read their variables directly and never need it.

    Args:
        variables: Keras variables.
        values: Their current values, one per variable.

    Example:

    >>> counter = keras.Variable(0.0)
    >>> with variable_values([counter], [keras.ops.ones(())]):
    ...     float(variable_value(counter))
    1.0
    >>> float(variable_value(counter))
    0.0
    """
    _VARIABLE_VALUES.append({id(v): x for v, x in zip(variables, values)})
    try:
        yield
    finally:
        _VARIABLE_VALUES.pop()


def variable_value(variable):
    """The value of `variable` given by `variable_values`, else its own."""
    for mapping in reversed(_VARIABLE_VALUES):
        if id(variable) in mapping:
            return mapping[id(variable)]
    return variable.value


def clear_gradients(variables):
    """Drops the gradients PyTorch keeps on `variables`; no-op elsewhere.

    Keras's PyTorch train step clears gradients with `Module.zero_grad`,
    which reaches only the parameters the module tracks by variable path; a
    Distiller whose teacher and student share paths (two KerasHub models of
    one class) tracks one parameter per path, and the student's gradients
    would otherwise add up from step to step.

    Args:
        variables: Keras variables.
    """
    if keras.backend.backend() != "torch":
        return
    for variable in variables:
        variable.value.grad = None


def assign_outside_compiled_graph(*assignments):
    """`variable.assign(value)` for each pair, outside `torch.compile` graphs.

    PyTorch's AOTAutograd (seen with torch 2.13) may recompute values that
    the backward pass needs from the compiled graph's inputs, after the
    graph has written its in-place updates to those inputs: a gradient that
    depends on a variable which the same graph then assigns sees the
    assigned value. (`Distiller._normalize_over_accumulation` read its token
    counters, assigned the new totals, and under `torch.compile` the
    gradient counted the micro-batch's tokens twice.) Assigning outside the
    graph splits it there: the values read before this call reach the rest
    of the step as tensors, not as the variables. Compute what the gradient
    needs from those tensors, not by reading the variables again. On JAX and
    TensorFlow, and in eager PyTorch, this is a plain `assign`.

    Args:
        *assignments: `(variable, value)` pairs.

    Example:

    >>> counter = keras.Variable(0.0)
    >>> assign_outside_compiled_graph((counter, 2.0))
    >>> float(counter.value)
    2.0
    """
    if keras.backend.backend() == "torch":
        import torch

        torch.compiler.disable(_assign)(assignments)
        return
    _assign(assignments)


def _assign(assignments):
    for variable, value in assignments:
        variable.assign(value)


# ---- JAX ----


@functools.lru_cache(maxsize=None)
def _jax_loss(loss, chunk_size, block_size, has_embedding):
    import jax
    import jax.numpy as jnp
    from jax import lax

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
        num_classes = (embedding if has_embedding else rows).shape[
            0 if has_embedding else 1
        ]

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

            return for_each(num_classes, block_size, tile_step, state)

        return rows_chunk, row_chunks, over_blocks

    def chunk_forward(inputs, start, size):
        _, row_chunks, over_blocks = tiles(inputs, start, size)
        return loss.chunk_forward(
            row_chunks,
            lambda step, state: over_blocks(
                lambda tile, _, state: step(state, tile), state
            ),
            complete=block_size >= _num_classes(inputs[:2]),
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


# ---- TensorFlow ----


def _tf_chunked_loss(
    loss, chunk_size, block_size, rows, embedding, row_constants,
    tile_constants, class_constants,
):
    import tensorflow as tf

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
            rows_chunk = _tf_slice(rows, start, size)
            row_chunks = tuple(_tf_slice(c, start, size) for c in row_constants)

            def over_blocks(step, state):
                def tile_step(offset, width, state):
                    if has_embedding:
                        block = _tf_slice(embedding, offset, width)
                        logits = tf.matmul(rows_chunk, block, transpose_b=True)
                    else:
                        block = None
                        logits = _tf_slice(rows_chunk, offset, width, axis=1)
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
                            _tf_slice(c, offset, width)
                            for c in class_constants
                        ),
                    )
                    return step(tile, block, state)

                return _tf_for_each(*num_classes, block_size, tile_step, state)

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
                    lambda x: _tf_new_buffer(
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
                lambda buffer, x: _tf_update_rows(buffer, start, x),
                saved,
                chunk_saved,
            )
            return tuple(t + v for t, v in zip(totals, values)), saved

        values, saved = _tf_for_each(
            *num_rows, chunk_size, chunk_forward, None
        )

        def gradient(*cotangents):
            def chunk_backward(start, size, grads):
                grad_rows, grad_embedding = grads
                rows_chunk, _, over_blocks = tiles(start, size)
                saved_chunk = keras.tree.map_structure(
                    lambda x: _tf_slice(x, start, size), saved
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
                    grad_embedding = _tf_update_rows(
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
                grad_rows = _tf_update_rows(grad_rows, start, grad_rows_chunk)
                return grad_rows, grad_embedding

            grads = (
                _tf_new_buffer(tf.shape(rows), rows.dtype, zeros=False),
                _tf_new_buffer(tf.shape(embedding), embedding.dtype, zeros=True)
                if has_embedding
                else tf.zeros(()),
            )
            grad_rows, grad_embedding = _tf_for_each(
                *num_rows, chunk_size, chunk_backward, grads
            )
            grads = [grad_rows] + ([grad_embedding] if has_embedding else [])
            return grads + [None] * len(constants)

        return values, gradient

    inputs = [rows] + ([embedding] if has_embedding else [])
    return loss_fn(*inputs, *row_constants, *tile_constants, *class_constants)


def _tf_for_each(total, static_total, size, step, state):
    """`state = step(start, size, state)` over `total` items in chunks.

    The remainder chunk runs first, outside the loop (even when empty if
    `state` starts as None, to give it its structure); the full chunks run
    in a `tf.while_loop`. Every chunk size is then fixed once the input
    shapes are, as XLA requires (it compiles the loop body even when the
    loop runs no iteration, so `size` must not exceed a known row count).
    """
    import tensorflow as tf

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


def _tf_slice(tensor, start, size, axis=0):
    import tensorflow as tf

    begin = [0] * len(tensor.shape)
    sizes = [-1] * len(tensor.shape)
    begin[axis] = start
    sizes[axis] = size
    return tf.slice(tensor, tf.stack(begin), tf.stack(sizes))


def _tf_in_xla_context():
    # Private but long-stable: TensorFlow's own control flow asks the same.
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        tf_ops.get_default_graph()
    )


def _tf_new_buffer(shape, dtype, zeros):
    """A fresh buffer for the in-place updates of `_tf_update_rows`."""
    import tensorflow as tf

    if _tf_in_xla_context():
        return tf.zeros(shape, dtype)
    # Not `tf.zeros`: the updates mutate the buffer, which must be allocated
    # anew on every call, never a constant-folded, shared tensor.
    return tf.raw_ops.Empty(shape=shape, dtype=dtype, init=zeros)


def _tf_update_rows(buffer, start, update, add=False):
    """`buffer[start:start + len(update)] (+)= update`, without copying it.

    Outside XLA, TensorFlow copies a while-loop variable on every functional
    update (`tensor_scatter_nd_update` and friends), so a gradient assembled
    that way costs twice its size; the aliasing `InplaceUpdate` and
    `InplaceAdd` ops write into the buffer itself. XLA has no such ops but
    updates loop variables in place by itself.
    """
    import tensorflow as tf

    if _tf_in_xla_context():
        from tensorflow.compiler.tf2xla.python.xla import dynamic_slice
        from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

        begin = tf.stack([start] + [0] * (len(buffer.shape) - 1))
        if add:
            update = update + dynamic_slice(buffer, begin, tf.shape(update))
        return dynamic_update_slice(buffer, update, begin)
    indices = tf.range(start, start + tf.shape(update)[0])
    if add:
        return tf.raw_ops.InplaceAdd(x=buffer, i=indices, v=update)
    return tf.raw_ops.InplaceUpdate(x=buffer, i=indices, v=update)


# ---- PyTorch ----


@functools.lru_cache(maxsize=None)
def _torch_function():
    import torch

    def tiles(settings, rows, embedding, constants, start, size):
        """`(rows_chunk, row_chunks, generate)`; `generate` yields the tiles."""
        _, _, block_size, (num_rows, num_tiles, _) = settings
        end = start + size
        rows_chunk = rows[start:end]
        row_chunks = tuple(c[start:end] for c in constants[:num_rows])
        tile_rows = tuple(
            c[start:end] for c in constants[num_rows : num_rows + num_tiles]
        )
        class_constants = constants[num_rows + num_tiles :]
        if embedding is None:
            num_classes = rows.shape[1]
        else:
            num_classes = embedding.shape[0]

        def generate():
            for offset in range(0, num_classes, block_size):
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

    def chunks(num_rows, chunk_size):
        # At least one (possibly empty) chunk, so that no rows still give
        # values.
        for start in range(0, max(num_rows, 1), chunk_size):
            yield start, min(chunk_size, num_rows - start)

    class TorchChunkedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, settings, rows, embedding, *constants):
            loss, chunk_size, block_size = settings[:3]
            totals, saved = None, []
            for start, size in chunks(rows.shape[0], chunk_size):
                _, row_chunks, generate = tiles(
                    settings, rows, embedding, constants, start, size
                )


                def over_tiles(step, state):
                    for _, tile in generate():
                        state = step(state, tile)
                    return state

                values, chunk_saved = loss.chunk_forward(
                    row_chunks,
                    over_tiles,
                    complete=block_size >= _num_classes((rows, embedding)),
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
            for start, size in chunks(rows.shape[0], chunk_size):
                rows_chunk, _, generate = tiles(
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

    return TorchChunkedLoss
