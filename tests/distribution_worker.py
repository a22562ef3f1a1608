"""Worker for `test_distribution.py`: run with 8 virtual CPU devices on JAX.

Trains a tiny Gemma 3 student from a tiny Gemma 3 teacher for two steps, once
on one device and once with both models sharded over a (2 batch × 4 model)
mesh, and prints the two evaluations, final weights' largest difference and
the teacher's shardings as JSON.
"""

import json
import sys

import keras
import numpy as np

from tests.conftest import tiny_gemma3


def build(hidden_dim, seed):
    # One key/value head, as Gemma 3 1B: a 4-way model axis cannot split it,
    # so ShardedDistribution replicates those kernels.
    return tiny_gemma3(
        vocabulary_size=64, hidden_dim=hidden_dim, seed=seed,
        num_query_heads=4, num_key_value_heads=1, head_dim=8,
    )


def train(distribution, data, weights):
    from keras_distill.distillers.causal_lm import CausalLMDistiller

    keras.distribution.set_distribution(distribution)
    teacher, student = build(32, 0), build(16, 1)
    if weights is not None:
        teacher.set_weights(weights[0])
        student.set_weights(weights[1])
    start = [teacher.get_weights(), student.get_weights()]
    distiller = CausalLMDistiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.5),
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=0.5,
        temperature=2.0,
    )
    x, labels, sample_weight = data
    before = distiller.evaluate(
        x, labels, sample_weight=sample_weight, batch_size=8, verbose=0,
        return_dict=True,
    )
    distiller.fit(
        x, labels, sample_weight=sample_weight, batch_size=8, epochs=2,
        shuffle=False, verbose=0,
    )
    shardings = {
        v.path: str(getattr(v.value.sharding, "spec", "single device"))
        for v in teacher.weights
    }
    return start, before, student.get_weights(), shardings


def main():
    import keras_hub

    from keras_distill.extras.distribution import ShardedDistribution
    from keras_distill.extras.distribution import causal_lm_layout_map

    devices = keras.distribution.list_devices()
    rng = np.random.default_rng(0)
    token_ids = rng.integers(4, 64, size=(8, 12)).astype("int32")
    padding_mask = np.ones((8, 12), bool)
    padding_mask[::2, 9:] = False  # some padded rows
    data = (
        {"token_ids": token_ids, "padding_mask": padding_mask},
        np.roll(token_ids, -1, axis=1),
        padding_mask.astype("float32"),
    )
    single = keras.distribution.DataParallel(devices=devices[:1])
    weights, single_metrics, single_final, _ = train(single, data, None)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = causal_lm_layout_map(keras_hub.models.Gemma3Backbone, mesh)
    sharded = ShardedDistribution(layout_map, batch_dim_name="batch")
    _, sharded_metrics, sharded_final, shardings = train(sharded, data, weights)
    print(json.dumps({
        "devices": len(devices),
        "single": single_metrics,
        "sharded": sharded_metrics,
        "max_weight_difference": max(
            float(np.abs(a - b).max()) for a, b in zip(single_final, sharded_final)
        ),
        "shardings": shardings,
    }))


if __name__ == "__main__":
    sys.exit(main())
