"""tf.data: NumPy code inside a pipeline's graph, under any Keras backend.

A `tf.data.Dataset` feeds `fit` on every backend, so this module is not one
of the per-backend modules: `keras_distill.backend` imports it only when it
is given a dataset, whose maker has imported TensorFlow already.
"""

import tensorflow as tf


def numpy_function(function, inputs, output_specs):
    """Calls the NumPy `function` from the graph, its outputs' shapes set.

    Args:
        function: Takes one NumPy array per input, returns a list of arrays;
            pure (the same inputs give the same outputs), so that TensorFlow
            may run it in parallel and need not order it with other ops.
        inputs: Tensors.
        output_specs: `(dtype, shape)` of each output, `None` for a
            dimension known only when the function runs.

    Returns:
        The list of output tensors.
    """
    outputs = tf.numpy_function(
        function,
        inputs,
        [dtype for dtype, _ in output_specs],
        stateful=False,
    )
    for output, (_, shape) in zip(outputs, output_specs):
        output.set_shape(shape)
    return outputs


def map_in_parallel(dataset, function):
    """`dataset.map(function)`, as many calls at once as tf.data tunes."""
    return dataset.map(function, num_parallel_calls=tf.data.AUTOTUNE)
