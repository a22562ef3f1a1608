"""Gradient accumulation normalized by the whole accumulated batch's tokens."""

import math

import keras
import numpy as np
import pytest

from keras_distill import Distiller

SEQUENCE, FEATURES, VOCABULARY = 5, 6, 7
MICRO_BATCH, STEPS = 3, 4
# Real tokens of each sequence: micro-batches of 0, 14, 3 and 9 tokens (the
# first one all padding).
LENGTHS = [0, 0, 0, 5, 5, 4, 1, 0, 2, 3, 5, 1]


def token_data(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), SEQUENCE, FEATURES)).astype("float32")
    y = rng.integers(0, VOCABULARY, size=(len(lengths), SEQUENCE))
    weights = (np.arange(SEQUENCE) < np.array(lengths)[:, None]).astype(
        "float32"
    )
    return x, y.astype("int32"), weights


def token_model(seed, hidden=None):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((SEQUENCE, FEATURES))]
    if hidden:
        layers.append(keras.layers.Dense(hidden, activation="tanh"))
    layers.append(keras.layers.Dense(VOCABULARY))
    return keras.Sequential(layers)


def distiller(optimizer, jit_compile="auto"):
    model = Distiller(student=token_model(2), teacher=token_model(1, 16))
    model.compile(
        optimizer=optimizer,
        jit_compile=jit_compile,
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        alpha=0.5,
        temperature=2.0,
    )
    return model


def trained_weights(
    optimizer, batch_size, weights, epochs=2, jit_compile="auto"
):
    x, y, _ = token_data()
    model = distiller(optimizer, jit_compile)
    history = model.fit(
        x, y, sample_weight=weights, batch_size=batch_size, epochs=epochs,
        shuffle=False, verbose=0,
    )
    return model.student.get_weights(), history.history["loss"]


def test_accumulation_matches_one_step_on_the_concatenated_batch():
    """Two cycles of 4 unequally padded micro-batches equal 2 full steps."""
    _, _, weights = token_data()
    accumulated, losses = trained_weights(
        keras.optimizers.SGD(0.5, gradient_accumulation_steps=STEPS),
        MICRO_BATCH,
        weights,
    )
    concatenated, _ = trained_weights(
        keras.optimizers.SGD(0.5), MICRO_BATCH * STEPS, weights
    )
    for a, c in zip(accumulated, concatenated):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)

    # Keras's own accumulation (the mean of per-micro-batch means) is the
    # concatenated step with each micro-batch weighted equally: different.
    tokens = weights.reshape(STEPS, -1).sum(-1)
    share = np.divide(
        tokens.sum(), STEPS * tokens, out=np.zeros(STEPS), where=tokens > 0
    )
    mean_of_means, _ = trained_weights(
        keras.optimizers.SGD(0.5),
        MICRO_BATCH * STEPS,
        weights * np.repeat(share, MICRO_BATCH)[:, None],
    )
    assert max(
        np.abs(a - m).max() for a, m in zip(accumulated, mean_of_means)
    ) > 1e-3

    # The reported loss is the micro-batches' own mean losses, averaged: all
    # four ran on the initial weights.
    x, y, _ = token_data()
    reference = distiller(keras.optimizers.SGD(0.5))
    micro_losses = [
        reference.evaluate(
            x[i : i + MICRO_BATCH], y[i : i + MICRO_BATCH],
            sample_weight=weights[i : i + MICRO_BATCH],
            batch_size=MICRO_BATCH, return_dict=True, verbose=0,
        )["loss"]
        for i in range(0, len(x), MICRO_BATCH)
    ]
    assert micro_losses[0] == 0.0  # all padding
    assert losses[0] == pytest.approx(np.mean(micro_losses), rel=1e-5)


def test_all_padding_accumulated_batch_leaves_the_weights_unchanged():
    _, _, weights = token_data()
    before = distiller(keras.optimizers.SGD(0.5)).student.get_weights()
    after, losses = trained_weights(
        keras.optimizers.SGD(0.5, gradient_accumulation_steps=STEPS),
        MICRO_BATCH,
        np.zeros_like(weights),
        epochs=1,
    )
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    assert losses == [0.0]
    assert all(math.isfinite(v) for v in losses)


def test_jit_compiled_accumulation_matches_eager_concatenated_steps():
    _, _, weights = token_data()
    accumulated, jit_losses = trained_weights(
        keras.optimizers.SGD(0.5, gradient_accumulation_steps=STEPS),
        MICRO_BATCH,
        weights,
        jit_compile=True,
    )
    concatenated, _ = trained_weights(
        keras.optimizers.SGD(0.5), MICRO_BATCH * STEPS, weights,
        jit_compile=False,
    )
    for a, c in zip(accumulated, concatenated):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)
    _, eager_losses = trained_weights(
        keras.optimizers.SGD(0.5, gradient_accumulation_steps=STEPS),
        MICRO_BATCH,
        weights,
        jit_compile=False,
    )
    np.testing.assert_allclose(jit_losses, eager_losses, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch.compile's partitioning"
)
def test_gradient_from_a_counter_assigned_outside_torch_compile_graph():
    """torch.compile's backward must not see the counter's assigned value.

    `Distiller._normalize_over_accumulation` in small: a gradient scaled by
    a count read from a variable that the step then updates. Assigned inside
    the compiled graph, AOTAutograd recomputed the scale from the updated
    variable (a gradient of 15/45 instead of 15/30).
    """
    import torch

    from keras_distill.backend import assign_outside_compiled_graph

    def step(counter, weight):
        total = counter.value + 15.0
        assign_outside_compiled_graph((counter, total))
        (15.0 / total * weight.value).backward()

    for function in (step, torch.compile(step)):
        counter = keras.Variable(15.0, trainable=False)
        weight = keras.Variable(2.0)
        function(counter, weight)
        assert float(weight.value.grad) == pytest.approx(0.5)
        assert float(counter.value) == 30.0
