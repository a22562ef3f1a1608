"""Training at scale with a KerasHub causal LM: mixed precision, XLA, remat,
gradient accumulation (the fused loss too)."""

import math

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from keras_distill import distillers  # noqa: E402
from tests.conftest import tiny_gemma3  # noqa: E402

VOCABULARY, SEQUENCE = 64, 8
# Real tokens per sequence: unequal, and micro-batch 2 (of 2 sequences) all
# padding.
LENGTHS = [8, 3, 0, 0, 5, 1, 8, 6]


def gemma(hidden_dim, seed):
    return tiny_gemma3(VOCABULARY, hidden_dim, seed=seed)


def token_batch(lengths=LENGTHS):
    rng = np.random.default_rng(0)
    mask = np.arange(SEQUENCE) < np.array(lengths)[:, None]
    token_ids = rng.integers(4, VOCABULARY, size=mask.shape).astype("int32")
    labels = rng.integers(4, VOCABULARY, size=mask.shape).astype("int32")
    x = {"token_ids": token_ids * mask, "padding_mask": mask}
    return x, labels, mask.astype("float32")


def distiller(
    optimizer=None, fused_loss=False, teacher_weights=None,
    student_weights=None, remat=False, **compile_kwargs
):
    """A compiled tiny Gemma 3 pair, fixed weights whatever the dtype policy."""
    teacher = gemma(16, seed=1)
    if remat:
        # The transformer blocks, as for long sequences; remat of the whole
        # CausalLM call (mode="full") is not supported by KerasHub.
        with keras.RematScope(
            mode="list_of_layers", layer_names=["decoder_block_0"]
        ):
            student = gemma(8, seed=2)
    else:
        student = gemma(8, seed=2)
    model = distillers.CausalLMDistiller(
        student=student, teacher=teacher, fused_loss=fused_loss,
        chunk_size=6, vocabulary_chunk_size=32,
    )
    for target, weights in ((teacher, teacher_weights), (student, student_weights)):
        if weights is not None:
            target.set_weights(weights)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.5),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=0.5,
        temperature=2.0,
        **compile_kwargs,
    )
    return model


def loss_value(model, x, labels, weight):
    loss = model.compute_loss(x, labels, model(x), weight, training=False)
    return loss


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy, tolerance, fused_loss",
    [
        ("mixed_bfloat16", 3e-2, False),
        ("mixed_float16", 3e-3, False),
        ("mixed_bfloat16", 3e-2, True),
    ],
)
def test_mixed_precision_losses_are_float32_and_close_to_float32(
    policy, tolerance, fused_loss, restore_dtype_policy
):
    x, labels, weight = token_batch()
    reference = distiller(fused_loss=fused_loss)
    expected = float(keras.ops.convert_to_numpy(
        loss_value(reference, x, labels, weight)
    ))
    keras.config.set_dtype_policy(policy)
    model = distiller(
        keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
        fused_loss=fused_loss,
        teacher_weights=reference.teacher.get_weights(),
        student_weights=reference.student.get_weights(),
    )
    hidden_states = model.student.backbone(x)
    assert keras.backend.standardize_dtype(hidden_states.dtype) == (
        policy.split("_")[1]
    )
    loss = loss_value(model, x, labels, weight)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(
        expected, rel=tolerance
    )
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(
        x, labels, sample_weight=weight, batch_size=4, epochs=1, shuffle=False,
        verbose=0,
    )
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert all(np.isfinite(w).all() for w in model.student.get_weights())


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="Keras's TensorFlow remat (tf.recompute_grad) refuses keyword "
    "arguments in a compiled step, and KerasHub blocks take them",
)
def test_rematerialized_student_gives_the_same_loss_and_gradients():
    x, labels, weight = token_batch()
    plain = distiller()
    rematerialized = distiller(
        teacher_weights=plain.teacher.get_weights(),
        student_weights=plain.student.get_weights(),
        remat=True,
    )
    results = []
    for model in (plain, rematerialized):
        history = model.fit(
            x, labels, sample_weight=weight, batch_size=8, epochs=1, verbose=0
        )
        results.append((history.history["loss"], model.student.get_weights()))
    (plain_loss, plain_weights), (remat_loss, remat_weights) = results
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    # One SGD step: equal weights mean equal gradients.
    for remat_weight, plain_weight in zip(remat_weights, plain_weights):
        np.testing.assert_allclose(remat_weight, plain_weight, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fused_loss", [False, True])
def test_accumulation_matches_the_concatenated_batch(fused_loss):
    """4 micro-batches of 2 sequences (one all padding) = one batch of 8."""
    x, labels, weight = token_batch()
    results = []
    for optimizer, batch_size in (
        (keras.optimizers.SGD(0.5, gradient_accumulation_steps=4), 2),
        (keras.optimizers.SGD(0.5), 8),
    ):
        model = distiller(optimizer, fused_loss=fused_loss)
        model.fit(
            x, labels, sample_weight=weight, batch_size=batch_size,
            epochs=2, shuffle=False, verbose=0,
        )
        results.append(model.student.get_weights())
    for accumulated, concatenated in zip(*results):
        np.testing.assert_allclose(accumulated, concatenated, atol=1e-6)
