"""Progressive layer dropout: the layer, the view, the schedule, KerasHub."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_distill import Distiller
from keras_distill.extras.layer_dropout import StochasticDepth
from keras_distill.extras.layer_dropout import StochasticDepthSchedule
from keras_distill.extras.layer_dropout import add_stochastic_depth
from keras_distill.extras.layer_dropout import progressive_rates
from keras_distill.extras.layer_dropout import remove_stochastic_depth
from keras_distill.extras.layer_dropout import stochastic_depth_layers

WIDTH = 6


def residual_model(seed=0):
    """Three residual blocks; the second has a projection shortcut."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(WIDTH, name="stem")(inputs)
    branch = keras.layers.Dense(WIDTH, activation="tanh", name="branch_0")(x)
    x = keras.layers.Add(name="block_0")([x, branch])
    branch = keras.layers.Dense(WIDTH, activation="tanh", name="branch_1a")(x)
    branch = keras.layers.Dense(WIDTH, name="branch_1b")(branch)
    shortcut = keras.layers.Dense(WIDTH, name="projection_1")(x)
    x = keras.layers.Add(name="block_1")([branch, shortcut])
    branch = keras.layers.Dense(WIDTH, activation="tanh", name="branch_2")(x)
    x = keras.layers.Add(name="block_2")([x, branch])
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name="residual")


def numpy(x):
    return ops.convert_to_numpy(x)


def set_current_rates(view, rate):
    for layer in stochastic_depth_layers(view):
        layer.current_rate.assign(rate)


# ---- StochasticDepth ----


@pytest.mark.parametrize("block_output", [False, True])
def test_each_example_keeps_or_drops_its_whole_residual(block_output):
    rate = 0.3
    layer = StochasticDepth(rate, seed=1, block_output=block_output)
    rng = np.random.default_rng(0)
    shortcut = rng.normal(size=(4000, 3, 2)).astype("float32")
    residual = rng.normal(size=(4000, 3, 2)).astype("float32")
    branch = shortcut + residual if block_output else residual
    inference = numpy(layer([shortcut, branch]))
    expected = branch if block_output else shortcut + branch
    np.testing.assert_array_equal(inference, expected)

    out = numpy(layer([shortcut, branch], training=True))
    dropped = np.all(np.isclose(out, shortcut, atol=1e-6), axis=(1, 2))
    kept = np.all(
        np.isclose(out, shortcut + residual / (1 - rate), atol=1e-5), axis=(1, 2)
    )
    assert np.all(dropped ^ kept), "every example is either dropped or kept"
    # The dropped fraction is Binomial(4000, 0.3)/4000: sd 0.0072.
    assert abs(dropped.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / 4000)


def test_rate_zero_trains_the_full_block_and_masks_are_seeded():
    shortcut = np.ones((8, 2), "float32")
    branch = np.arange(16, dtype="float32").reshape(8, 2)
    np.testing.assert_array_equal(
        numpy(StochasticDepth(0.0)([shortcut, branch], training=True)),
        shortcut + branch,
    )
    first = [numpy(StochasticDepth(0.5, seed=3)([shortcut, branch], training=True))]
    again = [numpy(StochasticDepth(0.5, seed=3)([shortcut, branch], training=True))]
    other = [numpy(StochasticDepth(0.5, seed=4)([shortcut, branch], training=True))]
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_layer_config_round_trip_and_bad_rates():
    layer = StochasticDepth(0.25, seed=7, block_output=True, name="sd")
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert isinstance(restored, StochasticDepth)
    assert restored.get_config() == layer.get_config()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            StochasticDepth(bad)
    with pytest.raises(TypeError, match="rate"):
        StochasticDepth("0.1")


def test_progressive_rates():
    assert progressive_rates(3, 0.3) == pytest.approx([0.1, 0.2, 0.3])
    assert progressive_rates(1, 0.5) == [0.5]
    with pytest.raises(ValueError, match="base_rate"):
        progressive_rates(3, 1.0)
    with pytest.raises(ValueError, match="num_blocks"):
        progressive_rates(0, 0.1)
    with pytest.raises(TypeError, match="num_blocks"):
        progressive_rates(True, 0.1)


# ---- The view of a plain residual model ----


def test_view_shares_weights_and_matches_at_inference():
    model = residual_model()
    view = add_stochastic_depth(model, base_rate=0.3, seed=0)
    layers = stochastic_depth_layers(view)
    assert [layer.rate for layer in layers] == pytest.approx([0.1, 0.2, 0.3])
    assert {id(v) for v in model.weights} <= {id(v) for v in view.weights}
    x = np.random.default_rng(1).normal(size=(16, 4)).astype("float32")
    np.testing.assert_allclose(numpy(view(x)), numpy(model(x)), atol=1e-6)


def test_dropping_every_block_leaves_the_shortcuts():
    """The deeper input of each Add is the branch, the other the shortcut."""
    model = residual_model()
    view = add_stochastic_depth(model, base_rate=0.5, seed=0)
    set_current_rates(view, 1.0 - 1e-7)
    x = np.random.default_rng(2).normal(size=(8, 4)).astype("float32")
    hidden = model.get_layer("stem")(x)
    hidden = model.get_layer("projection_1")(hidden)
    expected = numpy(model.get_layer("head")(hidden))
    np.testing.assert_allclose(numpy(view(x, training=True)), expected, atol=1e-5)


def test_same_seed_same_masks():
    model = residual_model()
    x = np.random.default_rng(3).normal(size=(32, 4)).astype("float32")
    outputs = []
    for seed in (5, 5, 6):
        view = add_stochastic_depth(model, base_rate=0.5, seed=seed)
        outputs.append([numpy(view(x, training=True)) for _ in range(2)])
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert not np.array_equal(outputs[0][0], outputs[0][1])
    assert not np.array_equal(outputs[0][0], outputs[2][0])


def test_blocks_selects_and_renumbers_the_depth_fractions():
    view = add_stochastic_depth(
        residual_model(), base_rate=0.4, blocks=["block_0", "block_2"]
    )
    assert [layer.rate for layer in stochastic_depth_layers(view)] == (
        pytest.approx([0.2, 0.4])
    )


def test_view_saves_loads_and_can_be_removed(tmp_path):
    model = residual_model()
    view = add_stochastic_depth(model, base_rate=0.3, seed=0)
    path = str(tmp_path / "view.keras")
    view.save(path)
    loaded = keras.saving.load_model(path)
    assert [
        (layer.rate, layer.seed) for layer in stochastic_depth_layers(loaded)
    ] == [(layer.rate, layer.seed) for layer in stochastic_depth_layers(view)]
    x = np.random.default_rng(4).normal(size=(8, 4)).astype("float32")
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)), atol=1e-6)
    plain = remove_stochastic_depth(loaded)
    assert stochastic_depth_layers(plain) == []
    np.testing.assert_allclose(numpy(plain(x)), numpy(model(x)), atol=1e-6)
    fresh = remove_stochastic_depth(loaded, into=residual_model(seed=9))
    np.testing.assert_allclose(numpy(fresh(x)), numpy(model(x)), atol=1e-6)
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(3, name="head")(inputs))
    with pytest.raises(ValueError, match="head'.*architecture"):
        remove_stochastic_depth(loaded, into=other)


def test_distilling_the_view_trains_the_original_student(tmp_path):
    teacher = residual_model(seed=1)
    student = residual_model(seed=2)
    before = [w.copy() for w in student.get_weights()]
    view = add_stochastic_depth(student, base_rate=0.3, seed=0)
    distiller = Distiller(student=view, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1), alpha=0.0, temperature=2.0
    )
    x = np.random.default_rng(5).normal(size=(32, 4)).astype("float32")
    distiller.fit(x, epochs=1, batch_size=8, verbose=0)
    assert all(
        not np.array_equal(b, a) for b, a in zip(before, student.get_weights())
    )
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert len(stochastic_depth_layers(loaded.student)) == 3
    np.testing.assert_allclose(
        numpy(loaded.student(x)), numpy(student(x)), atol=1e-6
    )


def test_schedule_grows_the_rates_the_compiled_step_reads():
    model = residual_model()
    view = add_stochastic_depth(model, base_rate=0.9, seed=0)
    view.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.random.default_rng(6).normal(size=(64, 4)).astype("float32")
    y = np.zeros((64, 3), "float32")
    full_loss = view.evaluate(x, y, batch_size=64, verbose=0)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(
                [float(numpy(l.current_rate)) for l in stochastic_depth_layers(view)]
            )

    history = view.fit(
        x,
        y,
        epochs=3,
        batch_size=64,
        verbose=0,
        callbacks=[StochasticDepthSchedule(warmup_epochs=2), Record()],
    )
    np.testing.assert_allclose(
        seen, [[0.0, 0.0, 0.0], [0.15, 0.3, 0.45], [0.3, 0.6, 0.9]], rtol=1e-6
    )
    losses = history.history["loss"]
    # Epoch 0 trains the full network (rate 0): the loss is the evaluated
    # one; later epochs drop blocks, which changes the loss.
    assert losses[0] == pytest.approx(full_loss, rel=1e-5)
    assert losses[2] != pytest.approx(full_loss, rel=1e-3)


# ---- KerasHub Gemma 3 ----


@pytest.fixture(scope="module")
def gemma():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=40,
        image_size=None,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


def gemma_inputs(batch=3, length=5):
    rng = np.random.default_rng(0)
    padding_mask = np.ones((batch, length), "int32")
    padding_mask[0, -2:] = 0
    return {
        "token_ids": rng.integers(1, 40, size=(batch, length)).astype("int32"),
        "padding_mask": padding_mask,
    }


def test_gemma_view_drops_whole_decoder_blocks(gemma):
    view = add_stochastic_depth(gemma, base_rate=0.2, seed=0)
    layers = stochastic_depth_layers(view)
    assert [layer.rate for layer in layers] == pytest.approx([0.1, 0.2])
    assert all(layer.block_output for layer in layers)
    x = gemma_inputs()
    np.testing.assert_allclose(numpy(view(x)), numpy(gemma(x)), atol=1e-5)
    # With both blocks dropped, only the embedding, final norm and head run.
    set_current_rates(view, 1.0 - 1e-7)
    backbone = gemma.backbone
    embedded = backbone.token_embedding(x["token_ids"]) * math.sqrt(16)
    expected = backbone.token_embedding(backbone.layer_norm(embedded), reverse=True)
    np.testing.assert_allclose(
        numpy(view(x, training=True)), numpy(expected), atol=1e-4
    )


def test_gemma_view_saves_loads_and_copies_back_into_a_causal_lm(gemma, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    view = add_stochastic_depth(gemma, base_rate=0.2, seed=0)
    path = str(tmp_path / "view.keras")
    view.save(path)
    loaded = keras.saving.load_model(path)
    x = gemma_inputs()
    np.testing.assert_allclose(numpy(loaded(x)), numpy(gemma(x)), atol=1e-5)
    fresh = keras_hub.models.Gemma3CausalLM(
        backbone=keras_hub.models.Gemma3Backbone.from_config(
            gemma.backbone.get_config()
        ),
        preprocessor=None,
    )
    restored = remove_stochastic_depth(loaded, into=fresh)
    assert restored is fresh
    np.testing.assert_allclose(numpy(fresh(x)), numpy(gemma(x)), atol=1e-5)


def test_gemma_blocks_by_name_and_unknown_names(gemma):
    view = add_stochastic_depth(gemma, base_rate=0.2, blocks=["decoder_block_1"])
    assert [layer.rate for layer in stochastic_depth_layers(view)] == [0.2]
    with pytest.raises(ValueError, match=r"decoder_block_0.*decoder_block_1"):
        add_stochastic_depth(gemma, base_rate=0.2, blocks=["decoder_block_7"])


# ---- Bad input ----


def test_bad_models_and_arguments():
    with pytest.raises(ValueError, match="base_rate"):
        add_stochastic_depth(residual_model(), base_rate=1.0)
    sequential = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Sequential"):
        add_stochastic_depth(sequential, 0.1)
    inputs = keras.Input((2,))
    no_residual = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no residual blocks"):
        add_stochastic_depth(no_residual, 0.1)
    with pytest.raises(ValueError, match=r"Unknown blocks \['nope'\].*block_0"):
        add_stochastic_depth(residual_model(), 0.1, blocks=["nope"])
    view = add_stochastic_depth(residual_model(), 0.1)
    with pytest.raises(ValueError, match="already has StochasticDepth"):
        add_stochastic_depth(view, 0.1)
    with pytest.raises(TypeError, match="functional"):
        add_stochastic_depth(keras.layers.Dense(2), 0.1)
    with pytest.raises(ValueError, match="no StochasticDepth"):
        remove_stochastic_depth(no_residual)


def test_ambiguous_and_wide_adds_are_refused():
    inputs = keras.Input((2,))
    left = keras.layers.Dense(2)(inputs)
    right = keras.layers.Dense(2)(inputs)
    ambiguous = keras.Model(inputs, keras.layers.Add(name="sum")([left, right]))
    with pytest.raises(ValueError, match="Cannot tell.*'sum'"):
        add_stochastic_depth(ambiguous, 0.1)
    third = keras.layers.Dense(2)(left)
    wide = keras.Model(inputs, keras.layers.Add(name="sum3")([inputs, left, third]))
    with pytest.raises(ValueError, match="sums 3 tensors"):
        add_stochastic_depth(wide, 0.1)


def test_schedule_arguments_and_missing_layers():
    with pytest.raises(ValueError, match="warmup_epochs"):
        StochasticDepthSchedule(0)
    with pytest.raises(TypeError, match="warmup_epochs"):
        StochasticDepthSchedule(2.0)
    schedule = StochasticDepthSchedule(2)
    schedule.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="no StochasticDepth"):
        schedule.on_epoch_begin(0)
