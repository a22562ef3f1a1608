"""PyTorch: the chunked losses' autograd function, gradients, CUDA memory.

`chunked_loss` is a `torch.autograd.Function` that writes into slices of
the gradients and accumulates the embedding gradient with `addmm_`.
Imported only when Keras runs on PyTorch.
"""

import collections
import warnings

import keras
import torch
from torch.fx.experimental import proxy_tensor
from torch.utils import _pytree as pytree

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


def compile_decode_step(causal_lm, max_graphs=4):
    """Makes `causal_lm.call_with_cache` run decode steps as a traced graph.

    KerasHub runs generation on PyTorch eagerly, and per generated token the
    Keras layer machinery costs several times the arithmetic. This sets, on
    `causal_lm` itself (only ever a private generator model), an instance
    attribute `call_with_cache` that runs decode calls (one token per row)
    through a graph traced with `make_fx` from the eager method and run by
    TorchScript's interpreter: the same aten ops in the same order, so the
    same numbers bit for bit. See `_TracedDecodeStep` for what is traced and
    what stays eager.

    Args:
        causal_lm: A `keras_hub.models.CausalLM` with `call_with_cache`;
            other models are left as they are.
        max_graphs: Most graphs kept (one per set of input shapes).
    """
    if callable(getattr(causal_lm, "call_with_cache", None)):
        causal_lm.call_with_cache = _TracedDecodeStep(causal_lm, max_graphs)


class _NarrowByGather(torch.overrides.TorchFunctionMode):
    """`torch.narrow` at a tensor start as a gather, while tracing.

    Keras's `ops.slice` at tensor start indices calls `torch.narrow`, which
    reads the start as a Python number (`Tensor.item()`): `make_fx` refuses
    that, and a graph that had the number baked in would be right at one
    position only. `index_select` at `start + arange(length)` reads the same
    elements with the start kept a tensor, so one graph serves every cache
    position. The length is a shape, constant in the graph.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.narrow and torch.is_tensor(args[2]):
            tensor, dim, start, length = args
            if torch.is_tensor(length):
                # A constant made from static shapes: read its value
                # without recording the read.
                with proxy_tensor.disable_proxy_modes_tracing():
                    length = int(length)
            positions = start.to(torch.int64) + torch.arange(
                length, device=tensor.device
            )
            return torch.index_select(tensor, dim, positions)
        return func(*args, **kwargs)


class _TracedDecodeStep:
    """`call_with_cache` through cached `make_fx` graphs, eager otherwise.

    A decode call (`token_ids` of one column, a cache, an integer cache
    index, no further arguments, gradients off) is traced once per set of
    input shapes, dtypes and device, with the model's variables and the
    cache index as graph inputs (through `keras.StatelessScope`), so the
    graph reads the current weights at every call (training changes them
    between calls) and serves every position. Real-mode `make_fx` fails on
    any read of a traced value as a Python number, which would bake it in;
    as a further check, each new graph is compared with the eager method at
    another position, and shapes whose graph fails or differs stay eager.
    Prefill calls and anything else not described above run eagerly. At most
    `max_graphs` graphs are kept; the least recently used goes first.
    """

    def __init__(self, causal_lm, max_graphs):
        self.model = causal_lm
        # The class's method: the instance attribute is this object.
        self.eager = type(causal_lm).call_with_cache.__get__(causal_lm)
        self.max_graphs = max_graphs
        self.graphs = collections.OrderedDict()

    def __call__(
        self, token_ids, cache, cache_update_index, cache_update_mask=None,
        **kwargs,
    ):
        arguments = dict(
            token_ids=token_ids,
            cache=cache,
            cache_update_index=cache_update_index,
            cache_update_mask=cache_update_mask,
            **kwargs,
        )
        if (
            any(value is not None for value in kwargs.values())
            or torch.is_grad_enabled()
            or not torch.is_tensor(token_ids)
            or token_ids.ndim != 2
            or token_ids.shape[1] != 1
        ):
            return self.eager(**arguments)
        index = torch.as_tensor(
            cache_update_index,
            dtype=None if torch.is_tensor(cache_update_index) else torch.int32,
            device=token_ids.device,
        )
        flat_cache, cache_spec = pytree.tree_flatten(cache)
        # The graph's inputs after the variables' values.
        tensors = [token_ids, index, *flat_cache]
        if cache_update_mask is not None:
            tensors.append(cache_update_mask)
        if (
            index.ndim
            or not flat_cache
            or not all(torch.is_tensor(t) for t in tensors)
        ):
            return self.eager(**arguments)
        key = (
            cache_spec,
            cache_update_mask is None,
            tuple((t.shape, t.dtype, t.device) for t in tensors),
        )
        if key not in self.graphs:
            self.graphs[key] = self._trace(tensors, cache_spec, cache_update_mask is not None)
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, variables = self.graphs[key]
        if graph is None:
            return self.eager(**arguments)
        logits, hidden_states, *flat_cache = graph(
            *[variable.value for variable in variables], *tensors
        )
        return logits, hidden_states, pytree.tree_unflatten(
            flat_cache, cache_spec
        )

    def _trace(self, tensors, cache_spec, has_mask):
        """`(graph, variables)`; the graph None where it fails or differs.

        The graph takes the variables' values then `tensors` (`token_ids`,
        the index, the cache's tensors, the update mask if any) and returns
        the logits, the hidden states and the cache's tensors.
        """
        # Collected once: `Model.variables` walks every layer.
        variables = self.model.variables
        num_values, num_cache = len(variables), len(tensors) - 2 - has_mask

        def decode(*inputs):
            values, (token_ids, index, *rest) = (
                inputs[:num_values], inputs[num_values:]
            )
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values))
            ):
                logits, hidden_states, cache = self.eager(
                    token_ids=token_ids,
                    cache=pytree.tree_unflatten(rest[:num_cache], cache_spec),
                    cache_update_index=index,
                    cache_update_mask=rest[num_cache] if has_mask else None,
                )
            return [logits, hidden_states, *pytree.tree_flatten(cache)[0]]

        values = [variable.value for variable in variables]
        try:
            with _NarrowByGather():
                module = proxy_tensor.make_fx(decode)(*values, *tensors)
        except Exception:  # noqa: BLE001 (any failure: stay eager)
            return None, variables
        # Positional inputs and a list out: no pytree work per call.
        module.graph._codegen = torch.fx.graph.CodeGen()
        module.recompile()
        graph = _interpreted(module, [*values, *tensors])
        # Another valid position, which the trace did not see.
        token_ids, index, *flat_cache = tensors
        positions = flat_cache[0].shape[1] - token_ids.shape[1] + 1
        other = [token_ids, (index + 1) % max(positions, 1), *flat_cache]
        other += tensors[len(other):]
        expected, actual = decode(*values, *other), graph(*values, *other)
        if len(expected) != len(actual) or not all(
            torch.equal(e, a) for e, a in zip(expected, actual)
        ):
            return None, variables
        return graph, variables


def _interpreted(module, inputs):
    """`module` run by TorchScript's interpreter, else its Python forward.

    The fx graph's Python forward costs a few microseconds per aten call,
    hundreds of them per token; TorchScript's C++ interpreter runs the same
    calls (a graph without control flow traces exactly) two to three times
    faster. Its optimizations (fusion, profiling-based specialization) stay
    off, so each call runs the very kernels of the eager model. TorchScript
    is deprecated; where tracing fails (or it is gone), the fx forward runs.
    """
    try:
        with warnings.catch_warnings():
            # Deprecation, and the list output (fixed for a graph).
            warnings.simplefilter("ignore")
            scripted = torch.jit.trace(module, tuple(inputs), check_trace=False)
    except Exception:  # noqa: BLE001 (any failure: the fx forward)
        return module.forward

    def run(*tensors):
        with torch.jit.optimized_execution(False):
            return scripted(*tensors)

    return run
