"""Shared test helpers. The backend is fixed by `KERAS_BACKEND` at import time."""

from pathlib import Path

import keras
import numpy as np
import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def value_and_grad(fn, x):
    """`fn(x)` and its gradient with respect to `x`, on the active backend.

    The one backend branch of the test suite: autodiff has no `keras.ops` form.
    """
    backend = keras.backend.backend()
    x = np.asarray(x, dtype="float32")
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(fn)(jax.numpy.asarray(x))
    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        grad = tape.gradient(value, x)
    elif backend == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        value = fn(x)
        value.backward()
        grad = x.grad
    else:
        raise NotImplementedError(backend)
    return keras.ops.convert_to_numpy(value), keras.ops.convert_to_numpy(grad)


@pytest.fixture
def restore_dtype_policy():
    """Resets the global dtype policy a mixed-precision test changes."""
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


def tiny_gemma3(vocabulary_size, hidden_dim, seed=0, preprocessor=None, **config):
    """A one-block Gemma 3 causal LM built from a config (no download).

    Args:
        vocabulary_size: Rows of the embedding table.
        hidden_dim: Model width; the two query heads each get half of it.
        seed: Seeds the weight initialization.
        preprocessor: Optional `Gemma3CausalLMPreprocessor`.
        **config: Further `Gemma3Backbone` arguments (they override these).

    Returns:
        A `keras_hub.models.Gemma3CausalLM`.
    """
    import keras_hub

    keras.utils.set_random_seed(seed)
    arguments = dict(
        vocabulary_size=vocabulary_size,
        image_size=None,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        head_dim=hidden_dim // 2,
    )
    backbone = keras_hub.models.Gemma3Backbone(**{**arguments, **config})
    return keras_hub.models.Gemma3CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )


def pytest_addoption(parser):
    parser.addoption(
        "--large",
        action="store_true",
        help="also run the tests on real pretrained checkpoints (marker `large`)",
    )


def _reads_shared_data(item):
    """Whether the test's module reads the real datasets through `DATA_DIR`."""
    module = getattr(item, "module", None)
    return module is not None and getattr(module, "DATA_DIR", None) is DATA_DIR


def pytest_collection_modifyitems(config, items):
    missing_data = pytest.mark.skip(
        reason=f"needs the real datasets in {DATA_DIR} (the MNIST test split, Tiny "
        "Shakespeare, Financial PhraseBank; see its README), which are absent here"
    )
    large = pytest.mark.skip(reason="real-checkpoint test: run with `pytest --large`")
    for item in items:
        if _reads_shared_data(item):
            item.add_marker(pytest.mark.shared_data)
            if not DATA_DIR.is_dir():
                item.add_marker(missing_data)
        if "large" in item.keywords and not config.getoption("--large"):
            item.add_marker(large)
