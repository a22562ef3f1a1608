"""`keras_distill.extras.distribution`: sharded distillation equals single-device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

pytest.importorskip("keras_hub")

WORKER = Path(__file__).with_name("distribution_worker.py")


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution shards models on the JAX backend",
)
def test_sharded_teacher_and_student_match_single_device():
    # The device count is fixed when JAX starts: a fresh process.
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=str(WORKER.parents[1]),
    )
    completed = subprocess.run(
        [sys.executable, str(WORKER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    for name in ("loss", "student_loss", "distillation_loss"):
        assert result["sharded"][name] == pytest.approx(
            result["single"][name], rel=1e-5
        )
    assert result["max_weight_difference"] < 1e-5
    shardings = result["shardings"]
    # The embedding and the feed-forward kernels are split over the mesh...
    assert "model" in shardings["token_embedding/embeddings"]
    assert "model" in shardings["decoder_block_0/ffw_linear/kernel"]
    assert "model" in shardings["decoder_block_0/attention/query/kernel"]
    # ...while the single key/value head, which 4 devices cannot split, is
    # replicated along the model axis instead of failing.
    assert "model" not in shardings["decoder_block_0/attention/key/kernel"]


def test_gemma3_weights_follow_gemma_layout_paths():
    import keras_hub

    from keras_distill.extras.distribution import causal_lm_layout_map

    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), devices=["cpu:0"]
    )
    layout_map = causal_lm_layout_map(keras_hub.models.Gemma3Backbone, mesh)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=32, image_size=None, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=16, head_dim=4,
    )
    matrices = [v.path for v in backbone.weights if len(v.shape) > 1]
    unmatched = [path for path in matrices if layout_map[path] is None]
    assert not unmatched, f"Gemma 3 weights outside Gemma's layout map: {unmatched}"
