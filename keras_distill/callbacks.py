"""Callbacks people watch while distilling: throughput and peak memory.

Two callbacks write into each epoch's `logs`, so they reach `History` and the
progress bar as well: `Throughput` (training examples/s and tokens/s) and
`PeakMemory` (the process's peak resident host memory and, where the backend
reports it, the accelerator's peak memory). The memory probes,
`host_peak_memory_bytes` and `device_peak_memory_bytes`, live in
`keras_distill.backend` (they differ per platform and backend) and are
importable from here too.
"""

import time

import keras
import numpy as np

from keras_distill.backend import device_peak_memory_bytes
from keras_distill.backend import host_peak_memory_bytes


class PeakMemory(keras.callbacks.Callback):
    """Writes peak host (and device) memory into each epoch's logs.

    Adds `peak_host_memory_mb`, the process's peak resident set size (where
    the platform reports it, see `host_peak_memory_bytes`: not on Windows
    without psutil), and, where the backend reports it (see
    `device_peak_memory_bytes`), `peak_device_memory_mb`. Both are peaks
    since the process started, so they never decrease from one epoch to the
    next. MB means 2**20 bytes.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> history = model.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0,
    ...                     callbacks=[PeakMemory()])
    >>> history.history["peak_host_memory_mb"][0] > 0
    True
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        host_peak = host_peak_memory_bytes()
        if host_peak is not None:
            logs["peak_host_memory_mb"] = host_peak / 2**20
        device_peak = device_peak_memory_bytes()
        if device_peak is not None:
            logs["peak_device_memory_mb"] = device_peak / 2**20


def _check_count(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


class Throughput(keras.callbacks.Callback):
    """Writes training examples/s (and tokens/s) of each epoch into its logs.

    The time of an epoch runs from its start to the end of its last training
    batch (validation is not counted). Keras converts each batch's logs to
    Python numbers before this callback sees them, which waits for the
    batch's computation, so asynchronous dispatch does not shorten the
    measured time. The first epoch includes tracing and compilation; read
    the steady state from the later epochs.

    Examples are counted as `batch_size` per training step, capped at
    `num_examples` when it is given, so that a smaller last batch is counted
    exactly. Tokens are examples times the mean number of real tokens per
    example: give `tokens_per_example`, or the training set's `padding_mask`
    (shape `(num_examples, sequence_length)`) to count non-padding tokens.

    Adds `examples_per_second`, `tokens_per_second` (when tokens are known)
    and `train_seconds` to the epoch's logs.

    Args:
        batch_size: Examples per training step.
        num_examples: Optional number of training examples per epoch (the
            dataset size); needed for exact counts when the last batch is
            smaller.
        tokens_per_example: Optional mean number of tokens per example.
        padding_mask: Optional 0/1 array over the training set's tokens;
            `tokens_per_example` is its mean number of ones per example.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> history = model.fit(np.ones((10, 3)), np.ones((10, 1)), batch_size=4,
    ...                     verbose=0, callbacks=[Throughput(4, num_examples=10)])
    >>> history.history["examples_per_second"][0] > 0
    True
    """

    def __init__(
        self,
        batch_size,
        num_examples=None,
        tokens_per_example=None,
        padding_mask=None,
    ):
        super().__init__()
        _check_count("batch_size", batch_size)
        if num_examples is not None:
            _check_count("num_examples", num_examples)
        if tokens_per_example is not None and padding_mask is not None:
            raise ValueError(
                "Pass `tokens_per_example` or `padding_mask`, not both."
            )
        if padding_mask is not None:
            padding_mask = np.asarray(padding_mask)
            if padding_mask.ndim < 2:
                raise ValueError(
                    "`padding_mask` must have shape (num_examples, "
                    f"sequence_length), got {padding_mask.shape}."
                )
            tokens_per_example = float(padding_mask.sum() / len(padding_mask))
        if tokens_per_example is not None:
            _check_count("tokens_per_example", tokens_per_example, True)
        self.batch_size = batch_size
        self.num_examples = num_examples
        self.tokens_per_example = tokens_per_example

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch_end = time.perf_counter()
        self._batches += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self._last_batch_end is None:
            return
        seconds = self._last_batch_end - self._epoch_start
        examples = self.batch_size * self._batches
        if self.num_examples is not None:
            examples = min(examples, self.num_examples)
        logs["train_seconds"] = seconds
        logs["examples_per_second"] = examples / seconds
        if self.tokens_per_example is not None:
            logs["tokens_per_second"] = (
                examples * self.tokens_per_example / seconds
            )
