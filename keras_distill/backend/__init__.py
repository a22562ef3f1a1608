"""The backend part of `keras_distill`: tiled losses, variables, memory probes.

The one place in `keras_distill` that branches on `keras.backend.backend()`:
a custom gradient, in-place buffer updates, compiled-graph boundaries and
device memory have no `keras.ops` form. This module holds the
backend-neutral entry points and, once at import, picks the module of the
running backend, which imports its framework:

- `jax.py`: `jax.custom_vjp` around `lax.fori_loop`s, jitted once per loss;
  buffers updated with `dynamic_update_slice`, in place under XLA.
- `tensorflow.py`: `tf.custom_gradient` around `tf.while_loop`s; buffers
  updated with the aliasing `InplaceUpdate` / `InplaceAdd` ops (XLA's
  `dynamic_update_slice` inside an XLA-compiled function).
- `torch.py`: a `torch.autograd.Function` that writes into slices of the
  gradients and accumulates the embedding gradient with `addmm_`.
- `common.py`: `Tile`, and the `keras.ops` versions of the hooks, which
  the three reuse where they need nothing else and which Keras backends
  without a module here (numpy, openvino) get; these have no chunked
  losses.
- `tf_data.py`: `tf.data` pipelines, which feed every backend; imported
  only when one is given.

`chunked_loss` evaluates a loss over the logits of `rows` (tokens) tile by
tile: a tile is `chunk_size` rows by `block_size` classes, its logits either a
slice of materialized logits or `rows_chunk @ embedding_block.T`. The loss
object (`keras_distill.losses.fused` defines them) supplies the maths on one
tile as pure `keras.ops` functions; the backend module runs the loops and the
custom gradient:

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

Host memory comes from the `resource` module, which Windows lacks; there
`host_peak_memory_bytes` asks psutil if it is installed, so importing
`keras_distill` never needs `resource`.
"""

import contextlib
import sys

import keras

from keras_distill.backend import common
from keras_distill.backend.common import Tile

try:
    import resource
except ImportError:  # Windows
    resource = None

_BACKEND = keras.backend.backend()
if _BACKEND == "jax":
    from keras_distill.backend import jax as _running_backend
elif _BACKEND == "tensorflow":
    from keras_distill.backend import tensorflow as _running_backend
elif _BACKEND == "torch":
    from keras_distill.backend import torch as _running_backend
else:
    _running_backend = common


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
        block_size = common.num_classes(rows, embedding)
    return _running_backend.chunked_loss(
        loss,
        chunk_size,
        block_size,
        rows,
        embedding,
        tuple(row_constants),
        tuple(tile_constants),
        tuple(class_constants),
    )


def project_to_vocabulary(hidden_states, embedding):
    """`hidden_states @ embedding.T` without materializing the transpose.

    Args:
        hidden_states: Tensor `(num_rows, features)`.
        embedding: Output embedding `(num_classes, features)`.

    Returns:
        Logits `(num_rows, num_classes)` in the inputs' dtype.
    """
    return _running_backend.project_to_vocabulary(hidden_states, embedding)


def concrete_value(tensor):
    """`tensor` as a NumPy array, or `None` inside a traced function."""
    if _running_backend.is_traced(tensor):
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
    _running_backend.clear_gradients(variables)


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
    _running_backend.assign_outside_compiled_graph(assignments)


def compile_decode_step(causal_lm):
    """Compiles the per-token decode step of a KerasHub causal LM's generation.

    JAX and TensorFlow compile a causal LM's whole `generate_function`
    already; there this does nothing. KerasHub runs it eagerly on PyTorch,
    where per generated token the Keras layer machinery costs several times
    the arithmetic; there `causal_lm.call_with_cache` becomes an instance
    attribute that runs each one-token decode call through a `torch.fx`
    graph traced from it (`make_fx`), once per set of input shapes, with the
    weights and the cache position as graph inputs: the same operations, so
    the same logits bit for bit, read from the current weights at each call.
    Prefill calls and calls it cannot trace run eagerly.

    This changes `causal_lm`: call it on a model of your own making that
    only generates (`keras_distill.distillers.on_policy.SequenceGenerator`
    calls it on its private copy sharing the backbone).

    Args:
        causal_lm: A `keras_hub.models.CausalLM`; a model without
            `call_with_cache` is left as it is.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.Gemma3Backbone(
    ...     vocabulary_size=20, image_size=None, num_layers=1,
    ...     num_query_heads=1, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=8)
    >>> model = keras_hub.models.Gemma3CausalLM(
    ...     backbone=backbone, preprocessor=None)
    >>> compile_decode_step(model)
    >>> model.compile(sampler="greedy")
    >>> outputs = model.make_generate_function()(
    ...     {"token_ids": keras.ops.ones((2, 5), "int32"),
    ...      "padding_mask": keras.ops.array([[True, True, False, False,
    ...                                        False]] * 2)})
    >>> tuple(outputs["token_ids"].shape)
    (2, 5)
    """
    # Only PyTorch's module has the hook; the others compile generation.
    compile_step = getattr(_running_backend, "compile_decode_step", None)
    if compile_step is not None:
        compile_step(causal_lm)


def device_peak_memory_bytes():
    """Peak memory of the first accelerator, where the backend reports it.

    JAX reads `jax.devices()[0].memory_stats()["peak_bytes_in_use"]`,
    PyTorch `torch.cuda.max_memory_allocated()`, TensorFlow
    `tf.config.experimental.get_memory_info("GPU:0")["peak"]`. All are peaks
    since the process started (or since the backend's own reset).

    Returns:
        An `int` number of bytes, or `None` on CPU and wherever the backend
        does not report device memory.

    Example:

    >>> peak = device_peak_memory_bytes()
    >>> peak is None or peak > 0
    True
    """
    return _running_backend.device_peak_memory_bytes()


def host_peak_memory_bytes():
    """Peak resident memory of this process since it started, in bytes.

    With the `resource` module (Linux, macOS, the BSDs): `getrusage`'s
    `ru_maxrss`. Without it (Windows): psutil's peak working set
    (`psutil.Process().memory_info().peak_wset`) if psutil is installed and
    reports one, else `None`.

    Returns:
        An `int` number of bytes, or `None` where neither source exists.

    Example:

    >>> peak = host_peak_memory_bytes()
    >>> peak is None or peak > 0
    True
    """
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # macOS reports bytes, the others kilobytes.
        return peak if sys.platform == "darwin" else peak * 1024
    try:
        import psutil
    except ImportError:
        return None
    peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
    return None if peak is None else int(peak)


def tf_numpy_function(function, inputs, output_specs):
    """Calls the NumPy `function` from a `tf.data` (or `tf.function`) graph.

    Works under every Keras backend: it is TensorFlow's, for the
    `tf.data.Dataset`s that feed `fit`.

    Args:
        function: Takes one NumPy array per input, returns a list of arrays;
            pure (the same inputs give the same outputs).
        inputs: TensorFlow tensors.
        output_specs: `(dtype, shape)` of each output, `None` for a
            dimension known only when the function runs.

    Returns:
        The list of output tensors, their static shapes set.

    Example:

    >>> import tensorflow as tf
    >>> dataset = tf.data.Dataset.from_tensor_slices([[1.0, 2.0]])
    >>> double = lambda x: tf_numpy_function(
    ...     lambda v: [2 * v], [x], [("float32", (2,))]
    ... )[0]
    >>> [x.tolist() for x in dataset.map(double).as_numpy_iterator()]
    [[2.0, 4.0]]
    """
    from keras_distill.backend import tf_data

    return tf_data.numpy_function(function, inputs, output_specs)


def map_tf_dataset(dataset, function):
    """`dataset.map(function)`, as many calls at once as `tf.data` tunes.

    Args:
        dataset: A `tf.data.Dataset`.
        function: Maps one element (its components as arguments) to one.

    Returns:
        The mapped `tf.data.Dataset`, in the same order.

    Example:

    >>> import tensorflow as tf
    >>> dataset = map_tf_dataset(tf.data.Dataset.range(3), lambda x: x + 1)
    >>> [int(x) for x in dataset.as_numpy_iterator()]
    [1, 2, 3]
    """
    from keras_distill.backend import tf_data

    return tf_data.map_in_parallel(dataset, function)
