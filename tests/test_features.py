"""Hidden-state and attention-map distillation, layer mapping, the Distiller hook."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_distill import Distiller
from keras_distill import losses
from keras_distill.distillers.feature_distillation import FeatureDistillation
from keras_distill.distillers.feature_distillation import layer_mapping
from keras_distill.graph import build_view
from keras_distill.language_models import hub
from keras_distill.losses.features import attention_map_loss
from keras_distill.losses.features import hidden_state_loss
from keras_distill.losses.features import map_heads
from tests.conftest import value_and_grad
from tests.test_losses import np_divergence
from tests.test_losses import np_log_softmax

NUM_FEATURES, NUM_CLASSES = 5, 4


def numpy(x):
    return ops.convert_to_numpy(x)


# ---- NumPy references ----


def np_layer_normalize(x, epsilon=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + epsilon)


def np_unit(x):
    return x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-12)


def np_weighted_mean(values, weights):
    if weights is None:
        return values.mean()
    weights = np.asarray(weights, np.float64)
    while weights.ndim < values.ndim:
        weights = weights[..., None]
    weights = np.broadcast_to(weights, values.shape)
    return (values * weights).sum() / weights.sum()


def np_hidden_loss(student, teacher, loss, weights, normalize=True):
    student, teacher = np.float64(student), np.float64(teacher)
    if normalize:
        student, teacher = np_layer_normalize(student), np_layer_normalize(teacher)
    if loss == "mse":
        values = ((student - teacher) ** 2).mean(-1)
    else:
        values = 1 - (np_unit(student) * np_unit(teacher)).sum(-1)
    return np_weighted_mean(values, weights)


def np_attention_loss(student, teacher, weights, heads):
    student, teacher = np.float64(student), np.float64(teacher)
    if heads == "average":
        student, teacher = student.mean(1, keepdims=True), teacher.mean(1, keepdims=True)
    elif heads == "grouped":
        s_heads, t_heads = student.shape[1], teacher.shape[1]
        if t_heads > s_heads:
            b, _, q, k = teacher.shape
            teacher = teacher.reshape(b, s_heads, t_heads // s_heads, q, k).mean(2)
        elif s_heads > t_heads:
            b, _, q, k = student.shape
            student = student.reshape(b, t_heads, s_heads // t_heads, q, k).mean(2)
    else:
        teacher = teacher[:, heads]
    values = 1 - (np_unit(student) * np_unit(teacher)).sum(-1)  # (b, h, q)
    return np_weighted_mean(values.transpose(0, 2, 1), weights)


def random_probs(rng, shape):
    logits = rng.normal(scale=2.0, size=shape)
    return np.exp(np_log_softmax(logits, 1.0)).astype("float32")


# ---- Pure functions ----


def test_layer_normalize_matches_numpy():
    x = np.random.default_rng(0).normal(3.0, 5.0, size=(4, 7)).astype("float32")
    np.testing.assert_allclose(
        numpy(losses.layer_normalize(x)), np_layer_normalize(x), atol=1e-5
    )


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "per_example", "per_token"])
def test_hidden_state_loss_matches_numpy(loss, normalize, mask_kind):
    rng = np.random.default_rng(1)
    student = rng.normal(size=(3, 5, 6)).astype("float32")
    teacher = rng.normal(2.0, 3.0, size=(3, 5, 6)).astype("float32")
    weights = {
        "none": None,
        "per_example": np.array([1.0, 0.0, 2.0], "float32"),
        "per_token": (rng.random((3, 5)) < 0.6).astype("float32"),
    }[mask_kind]
    value = float(hidden_state_loss(student, teacher, loss, weights, normalize))
    expected = np_hidden_loss(student, teacher, loss, weights, normalize)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_hidden_state_loss_on_zero_features_has_a_finite_gradient():
    teacher = np.ones((2, 3), "float32")

    def fn(student):
        return hidden_state_loss(student, teacher, "cosine", normalize=False)

    value, grad = value_and_grad(fn, np.zeros((2, 3), "float32"))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "student_heads, teacher_heads, heads",
    [
        (2, 4, "average"),
        (2, 4, "grouped"),
        (4, 2, "grouped"),
        (3, 3, "grouped"),
        (2, 4, [3, 0]),
    ],
)
def test_attention_map_loss_matches_numpy(student_heads, teacher_heads, heads):
    rng = np.random.default_rng(2)
    student = random_probs(rng, (2, student_heads, 5, 5))
    teacher = random_probs(rng, (2, teacher_heads, 5, 5))
    padding_mask = np.ones((2, 5), "float32")
    padding_mask[1, 3:] = 0.0
    value = float(attention_map_loss(student, teacher, padding_mask, heads))
    expected = np_attention_loss(student, teacher, padding_mask, heads)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    assert 0.0 <= value <= 1.0


def test_padded_queries_do_not_count():
    rng = np.random.default_rng(3)
    student = random_probs(rng, (1, 2, 4, 4))
    teacher = random_probs(rng, (1, 2, 4, 4))
    changed = teacher.copy()
    changed[:, :, 3] = random_probs(rng, (1, 2, 4))
    padding_mask = np.array([[1, 1, 1, 0]], "float32")
    np.testing.assert_allclose(
        float(attention_map_loss(student, teacher, padding_mask)),
        float(attention_map_loss(student, changed, padding_mask)),
        rtol=1e-6,
    )
    assert float(attention_map_loss(student, student)) == pytest.approx(0.0, abs=1e-6)


def test_map_heads_shapes():
    student = np.zeros((1, 2, 3, 3), "float32")
    teacher = np.zeros((1, 6, 3, 3), "float32")
    for heads, expected in (("average", 1), ("grouped", 2), ([5, 1], 2)):
        s, t = map_heads(student, teacher, heads)
        assert s.shape[1] == t.shape[1] == expected


@pytest.mark.parametrize(
    "heads, match",
    [
        ("grouped", "one count must divide the other"),
        ([0, 1, 2], "one teacher head"),
        ([0, 4], "one teacher head"),
        ("max", "attention_heads"),
    ],
)
def test_unmappable_heads(heads, match):
    student = np.zeros((1, 2, 3, 3), "float32")
    teacher = np.zeros((1, 3, 3, 3), "float32")
    with pytest.raises(ValueError, match=match):
        map_heads(student, teacher, heads)


def test_attention_maps_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="different query/key lengths"):
        attention_map_loss(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 4, 4)))


def test_layer_mapping_strategies():
    assert layer_mapping(3, 6, "uniform") == [(0, 1), (1, 3), (2, 5)]
    assert layer_mapping(4, 2, "uniform") == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert layer_mapping(3, 3, "uniform") == [(0, 0), (1, 1), (2, 2)]
    assert layer_mapping(2, 5, "last") == [(0, 3), (1, 4)]
    with pytest.raises(ValueError, match="only 2"):
        layer_mapping(3, 2, "last")
    with pytest.raises(ValueError, match="strategy"):
        layer_mapping(2, 2, "attention")
    with pytest.raises(ValueError, match="num_teacher_layers"):
        layer_mapping(2, 0)
    with pytest.raises(TypeError, match="num_student_layers"):
        layer_mapping(2.0, 4)


# ---- Models ----


def mlp(width, name, seed, depth=2):
    """Dense layers named `{name}_0`, `{name}_1`..., then logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((NUM_FEATURES,))
    x = inputs
    for index in range(depth):
        x = keras.layers.Dense(width, activation="tanh", name=f"{name}_{index}")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name=f"{name}_logits")(x)
    return keras.Model(inputs, outputs, name=name)


def attention_model(heads, width, name, seed, length=6):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((length, NUM_FEATURES))
    x = keras.layers.Dense(width, name=f"{name}_embed")(inputs)
    x = keras.layers.MultiHeadAttention(heads, key_dim=4, name=f"{name}_attention")(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x), name=name)


def data(n=16, seed=0, shape=(NUM_FEATURES,)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(n,)).astype("int32")
    return x, y


def test_view_returns_the_model_output_and_the_tapped_layers():
    model = mlp(6, "net", seed=0)
    taps = [(model.get_layer("net_1"), "hidden"), (model.get_layer("net_0"), "hidden")]
    view = build_view(model, taps)
    x, _ = data()
    logits, second, first = view(x)
    np.testing.assert_allclose(numpy(logits), numpy(model(x)), atol=1e-6)
    for name, tapped in (("net_0", first), ("net_1", second)):
        reference = keras.Model(model.input, model.get_layer(name).output)
        np.testing.assert_allclose(numpy(tapped), numpy(reference(x)), atol=1e-6)
    assert {id(v) for v in view.weights} == {id(v) for v in model.weights}


def test_view_of_a_model_with_a_list_of_one_output():
    model = mlp(6, "net", seed=0)
    listed = keras.Model(model.inputs, model.outputs)
    logits, hidden = build_view(listed, [(model.get_layer("net_0"), "hidden")])(data()[0])
    assert tuple(logits.shape) == (16, NUM_CLASSES)
    assert tuple(hidden.shape) == (16, 6)


def test_view_inlines_nested_models():
    inner = keras.Sequential(
        [keras.Input((NUM_FEATURES,)), keras.layers.Dense(3, name="inner_dense")],
        name="inner",
    )
    inputs = keras.Input((NUM_FEATURES,))
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(inner(inputs)))
    view = build_view(model, [(inner.get_layer("inner_dense"), "hidden")])
    x, _ = data()
    logits, hidden = view(x)
    np.testing.assert_allclose(numpy(logits), numpy(model(x)), atol=1e-6)
    np.testing.assert_allclose(numpy(hidden), numpy(inner(x)), atol=1e-6)


def test_multi_head_attention_probabilities_come_from_the_single_call():
    model = attention_model(2, 8, "net", seed=0)
    layer = model.get_layer("net_attention")
    view = build_view(model, [(layer, "attention")])
    x, _ = data(shape=(6, NUM_FEATURES))
    logits, probs = view(x)
    embedded = model.get_layer("net_embed")(x)
    _, expected = layer(embedded, embedded, return_attention_scores=True)
    np.testing.assert_allclose(numpy(probs), numpy(expected), atol=1e-6)
    np.testing.assert_allclose(numpy(logits), numpy(model(x)), atol=1e-5)


# ---- The Distiller ----


def feature_distiller(weight=0.7, alpha=0.3, temperature=2.0, **kwargs):
    student = mlp(6, "student", seed=1)
    teacher = mlp(9, "teacher", seed=2)
    kwargs.setdefault("pairs", [("student_0", "teacher_0"), ("student_1", "teacher_1")])
    fd = FeatureDistillation(weight=weight, **kwargs)
    distiller = Distiller(student, teacher, feature_distillation=fd)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.05),
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        alpha=alpha,
        temperature=temperature,
    )
    return distiller


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_loss_is_logits_loss_plus_weighted_hidden_terms(loss):
    distiller = feature_distiller(loss=loss)
    x, y = data()
    weights = np.linspace(0.0, 2.0, len(x)).astype("float32")
    result = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=len(x), verbose=0, return_dict=True
    )
    student, teacher = distiller.student, distiller.teacher
    hidden = []
    for index, (s_name, t_name) in enumerate(distiller.feature_distillation.pairs):
        s = numpy(keras.Model(student.input, student.get_layer(s_name).output)(x))
        t = numpy(keras.Model(teacher.input, teacher.get_layer(t_name).output)(x))
        kernel = numpy(distiller.feature_distillation.projections[index].kernel)
        hidden.append(np_hidden_loss(s @ kernel, t, loss, weights))
    feature_loss = np.mean(hidden)
    student_logits, teacher_logits = numpy(student(x)), numpy(teacher(x))
    hard = -np_log_softmax(student_logits, 1.0)[np.arange(len(y)), y]
    hard = (hard * weights).sum() / weights.sum()
    soft = np_divergence("forward_kl", teacher_logits, student_logits, 2.0)
    soft = (soft * weights).sum() / weights.sum()
    np.testing.assert_allclose(result["feature_loss"], feature_loss, rtol=1e-5)
    np.testing.assert_allclose(
        result["loss"], 0.3 * hard + 0.7 * soft + 0.7 * feature_loss, rtol=1e-5
    )


class CountingLayer(keras.layers.Layer):
    calls = 0

    def call(self, x):
        CountingLayer.calls += 1
        return x


def test_student_and_teacher_run_once_per_step():
    models = []
    for name, width, seed in (("student", 4, 1), ("teacher", 6, 2)):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((NUM_FEATURES,))
        hidden = keras.layers.Dense(width, name=f"{name}_hidden")(inputs)
        counted = CountingLayer(name=f"{name}_count")(hidden)
        models.append(keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(counted)))
    fd = FeatureDistillation(pairs=[("student_hidden", "teacher_hidden")])
    distiller = Distiller(models[0], models[1], feature_distillation=fd)
    distiller.compile(optimizer="sgd", alpha=0.0, run_eagerly=True)
    x, _ = data(n=12)
    CountingLayer.calls = 0
    distiller.fit(x, batch_size=4, epochs=1, verbose=0)
    # 3 steps: one student and one teacher pass each.
    assert CountingLayer.calls == 6


def test_projection_trains_saves_and_stays_out_of_the_student(tmp_path):
    distiller = feature_distiller(alpha=0.0)
    student_weights = len(distiller.student.weights)
    projections = distiller.feature_distillation.projections
    assert [tuple(p.kernel.shape) for p in projections] == [(6, 9), (6, 9)]
    before = numpy(projections[0].kernel).copy()
    x, y = data(n=32)
    history = distiller.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert history.history["feature_loss"][-1] < history.history["feature_loss"][0]
    assert not np.array_equal(before, numpy(projections[0].kernel))
    assert len(distiller.student.weights) == student_weights
    assert not any("projection" in v.path for v in distiller.student.weights)

    expected = distiller.evaluate(x, y, verbose=0, return_dict=True)
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        numpy(loaded.feature_distillation.projections[0].kernel),
        numpy(projections[0].kernel),
    )
    results = loaded.evaluate(x, y, verbose=0, return_dict=True)
    for key in ("loss", "feature_loss"):
        np.testing.assert_allclose(results[key], expected[key], rtol=1e-5)
    # The exported student is a plain model without projections.
    distiller.student.save(str(tmp_path / "student.keras"))
    student = keras.saving.load_model(str(tmp_path / "student.keras"))
    assert len(student.weights) == student_weights


def test_feature_distillation_config_round_trip():
    fd = FeatureDistillation(
        pairs=[("a", "b")], loss="cosine", weight=0.5, attention_weight=0.25,
        attention_heads=[1, 0], normalize=False,
    )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(fd)
    )
    assert isinstance(restored, FeatureDistillation)
    assert restored.get_config() == fd.get_config()
    assert restored.pairs == [("a", "b")]


def test_attention_term_on_multi_head_attention_models():
    student = attention_model(2, 8, "student", seed=1)
    teacher = attention_model(4, 12, "teacher", seed=2)
    fd = FeatureDistillation(
        pairs=[("student_attention", "teacher_attention")],
        weight=0.0,
        attention_weight=1.0,
        attention_heads="grouped",
    )
    distiller = Distiller(student, teacher, feature_distillation=fd)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), alpha=0.0)
    x, _ = data(n=16, shape=(6, NUM_FEATURES))
    result = distiller.evaluate(x, verbose=0, return_dict=True)
    _, student_probs = build_view(
        student, [(student.get_layer("student_attention"), "attention")]
    )(x)
    _, teacher_probs = build_view(
        teacher, [(teacher.get_layer("teacher_attention"), "attention")]
    )(x)
    expected = np_attention_loss(numpy(student_probs), numpy(teacher_probs), None, "grouped")
    np.testing.assert_allclose(result["attention_loss"], expected, rtol=1e-5)
    history = distiller.fit(x, epochs=3, verbose=0)
    assert history.history["attention_loss"][-1] < history.history["attention_loss"][0]


# ---- KerasHub Gemma 3 ----


def gemma(num_layers, hidden_dim, heads, seed):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=40,
        image_size=None,
        num_layers=num_layers,
        num_query_heads=heads,
        num_key_value_heads=heads // 2,
        hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        head_dim=8,
        sliding_window_size=3,
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


@pytest.fixture(scope="module")
def gemma_pair():
    return gemma(2, 16, 2, seed=0), gemma(4, 24, 4, seed=1)


def gemma_batch(batch=3, length=6, seed=0):
    rng = np.random.default_rng(seed)
    padding_mask = np.ones((batch, length), "int32")
    padding_mask[0, -2:] = 0
    x = {
        "token_ids": rng.integers(1, 40, size=(batch, length)).astype("int32"),
        "padding_mask": padding_mask,
    }
    return x, rng.integers(1, 40, size=(batch, length)).astype("int32")


def test_gemma3_attention_probabilities_reproduce_the_attention_output(gemma_pair):
    _, teacher = gemma_pair
    x, _ = gemma_batch()
    block = teacher.backbone.transformer_layers[1]  # a sliding-window layer
    hidden = teacher.backbone.token_embedding(x["token_ids"]) * np.sqrt(24)
    probs = hub._Gemma3AttentionProbabilities(block)(
        hidden, padding_mask=x["padding_mask"]
    )
    attention = block.attention
    normalized = block.pre_attention_norm(hidden)
    mask = block._compute_attention_mask(normalized, x["padding_mask"], None, None, 0)
    expected = attention(normalized, attention_mask=mask)
    values = ops.repeat(attention.value_dense(normalized), 2, axis=2)
    output = attention.output_dense(ops.einsum("bnts,bsnh->btnh", probs, values))
    np.testing.assert_allclose(numpy(output), numpy(expected), atol=1e-5)
    probs = numpy(probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # Causal: no query attends to a later key.
    assert np.all(np.triu(probs, k=1) < 1e-6)


@pytest.mark.slow
def test_gemma_pair_by_block_index_with_hidden_and_attention_terms(gemma_pair, tmp_path):
    from keras_distill.distillers.causal_lm import CausalLMDistiller

    student, teacher = gemma_pair
    fd = FeatureDistillation(pairs="uniform", weight=1.0, attention_weight=1.0)
    distiller = CausalLMDistiller(student, teacher, feature_distillation=fd)
    assert fd.pairs == [(0, 1), (1, 3)]
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        alpha=0.5,
        student_loss_fn="sparse_categorical_crossentropy",
    )
    x, y = gemma_batch()
    history = distiller.fit(x, y, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for key in ("feature_loss", "attention_loss"):
        assert all(np.isfinite(history.history[key])) and history.history[key][0] > 0
    path = str(tmp_path / "gemma.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path).feature_distillation
    assert loaded.pairs == [(0, 1), (1, 3)]
    for projection, reloaded in zip(fd.projections, loaded.projections):
        np.testing.assert_array_equal(numpy(projection.kernel), numpy(reloaded.kernel))


def test_attention_strategy_finds_the_matching_teacher_layers():
    keras_hub = pytest.importorskip("keras_hub")
    teacher = gemma(3, 16, 2, seed=3)
    # A student that is the teacher: each layer's best match is itself.
    student = keras_hub.models.Gemma3CausalLM(
        backbone=keras_hub.models.Gemma3Backbone.from_config(
            teacher.backbone.get_config()
        ),
        preprocessor=None,
    )
    student.set_weights(teacher.get_weights())
    x, _ = gemma_batch()
    fd = FeatureDistillation(
        pairs="attention", calibration_data=x, weight=0.0, attention_weight=1.0
    )
    Distiller(student, teacher, feature_distillation=fd)
    np.testing.assert_allclose(np.diag(fd.attention_similarity), 1.0, atol=1e-5)
    assert fd.pairs == [(0, 0), (1, 1), (2, 2)]
    assert fd.pairs == [
        (i, int(np.argmax(row))) for i, row in enumerate(fd.attention_similarity)
    ]


# ---- KerasHub BERT-style encoders ----


def bert(num_layers, hidden_dim, heads, seed):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=num_layers,
        num_heads=heads,
        hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        max_sequence_length=8,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None, activation=None
    )


@pytest.fixture(scope="module")
def bert_pair():
    return bert(2, 8, 2, seed=0), bert(4, 16, 4, seed=1)


def bert_batch(batch=4, length=6, seed=0):
    rng = np.random.default_rng(seed)
    padding_mask = np.ones((batch, length), "int32")
    padding_mask[0, -3:] = 0
    padding_mask[1, -1:] = 0
    x = {
        "token_ids": rng.integers(1, 30, size=(batch, length)).astype("int32"),
        "segment_ids": np.zeros((batch, length), "int32"),
        "padding_mask": padding_mask,
    }
    return x, rng.integers(0, 3, size=(batch,)).astype("int32")


def test_bert_attention_maps_are_the_blocks_and_mask_padded_keys(bert_pair):
    _, teacher = bert_pair
    x, _ = bert_batch()
    blocks = teacher.backbone.transformer_layers
    view = build_view(teacher, [(blocks[1], "attention"), (blocks[3], "hidden")])
    logits, probs, hidden = view(x)
    np.testing.assert_allclose(numpy(logits), numpy(teacher(x)), atol=1e-5)
    probs = numpy(probs)
    assert probs.shape == (4, 4, 6, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # Padded keys get no attention.
    assert np.all(probs[0, :, :, -3:] < 1e-6) and np.all(probs[1, :, :, -1] < 1e-6)
    # The same maps the block returns when asked for its scores.
    block_input = build_view(teacher, [(blocks[0], "hidden")])(x)[1]
    _, expected = blocks[1](
        block_input, padding_mask=x["padding_mask"], return_attention_scores=True
    )
    np.testing.assert_allclose(probs, numpy(expected), atol=1e-5)
    assert numpy(hidden).shape == (4, 6, 16)


def test_bert_feature_terms_ignore_padded_positions(bert_pair):
    student, teacher = bert_pair
    fd = FeatureDistillation(pairs="uniform", weight=1.0, attention_weight=1.0)
    distiller = Distiller(student, teacher, feature_distillation=fd)
    assert fd.pairs == [(0, 1), (1, 3)]
    distiller.compile(optimizer="sgd", alpha=0.5, student_loss_fn=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
    x, y = bert_batch()
    changed = dict(x, token_ids=np.where(x["padding_mask"] == 1, x["token_ids"], 7))
    # The padded tokens do change the states at padded positions ...
    taps = [(student.backbone.transformer_layers[1], "hidden")]
    view = build_view(student, taps)
    assert not np.allclose(numpy(view(x)[1])[0, -1], numpy(view(changed)[1])[0, -1])
    # ... but no term of the loss.
    before = distiller.evaluate(x, y, return_dict=True, verbose=0)
    after = distiller.evaluate(changed, y, return_dict=True, verbose=0)
    for key in ("loss", "feature_loss", "attention_loss"):
        assert before[key] > 0
        np.testing.assert_allclose(before[key], after[key], rtol=1e-5)


@pytest.mark.slow
def test_bert_pair_distills_hidden_states_and_attention(bert_pair):
    teacher = bert_pair[1]
    student = bert(2, 8, 2, seed=0)  # a fresh one: this test trains it
    fd = FeatureDistillation(pairs="last", weight=1.0, attention_weight=1.0)
    distiller = Distiller(student, teacher, feature_distillation=fd)
    assert fd.pairs == [(0, 2), (1, 3)]
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        alpha=0.5,
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = bert_batch()
    history = distiller.fit(x, y, epochs=4, verbose=0).history
    for key in ("feature_loss", "attention_loss"):
        assert all(np.isfinite(history[key]))
        assert history[key][-1] < history[key][0]
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(fd)
    )
    assert restored.get_config() == fd.get_config()
    assert restored.pairs == [(0, 2), (1, 3)]
    # The projections (8 -> 16, one per pair) are not weights of the student.
    student_ids = {id(v) for v in distiller.student.weights}
    assert [tuple(p.kernel.shape) for p in fd.projections] == [(8, 16)] * 2
    assert not any(id(p.kernel) in student_ids for p in fd.projections)


def test_attention_strategy_on_bert_finds_the_matching_teacher_layers(bert_pair):
    _, teacher = bert_pair
    student = bert(4, 16, 4, seed=2)
    student.set_weights(teacher.get_weights())
    x, _ = bert_batch()
    fd = FeatureDistillation(
        pairs="attention", calibration_data=x, weight=0.0, attention_weight=1.0,
        student_layers=[1, 3],
    )
    Distiller(student, teacher, feature_distillation=fd)
    assert fd.pairs == [(1, 1), (3, 3)]
    np.testing.assert_allclose(fd.attention_similarity[[0, 1], [1, 3]], 1.0, atol=1e-5)


# ---- Bad input ----


def test_unknown_layers_list_the_available_ones(gemma_pair):
    with pytest.raises(ValueError, match=r"no layer named 'nope'.*'student_0'"):
        feature_distiller(pairs=[("nope", "teacher_0")])
    with pytest.raises(ValueError, match=r"teacher.*no layer named 'x'.*'teacher_1'"):
        feature_distiller(pairs=[("student_0", "x")])
    student, teacher = gemma_pair
    with pytest.raises(ValueError, match=r"4 transformer blocks \(indices 0 to 3\)"):
        Distiller(student, teacher, feature_distillation=FeatureDistillation(pairs=[(0, 4)]))
    with pytest.raises(ValueError, match="block index"):
        Distiller(
            student, teacher, feature_distillation=FeatureDistillation(pairs=[("a", 0)])
        )


def test_hidden_shapes_no_projection_can_map():
    def cnn(name, pool, channels):
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv")(inputs)
        if pool:
            x = keras.layers.MaxPooling2D(name=f"{name}_pool")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x), name=name)

    student, teacher = cnn("student", False, 2), cnn("teacher", True, 4)
    with pytest.raises(ValueError, match=r"cannot be mapped.*\(None, 8, 8, 2\).*\(None, 4, 4, 4\)"):
        Distiller(
            student,
            teacher,
            feature_distillation=FeatureDistillation(pairs=[("student_conv", "teacher_pool")]),
        )
    # Same resolution: a 2 -> 4 channel projection maps them.
    distiller = Distiller(
        student,
        teacher,
        feature_distillation=FeatureDistillation(pairs=[("student_conv", "teacher_conv")]),
    )
    assert tuple(distiller.feature_distillation.projections[0].kernel.shape) == (2, 4)
    with pytest.raises(ValueError, match="projection=False"):
        Distiller(
            student,
            teacher,
            feature_distillation=FeatureDistillation(
                pairs=[("student_conv", "teacher_conv")], projection=False
            ),
        )


def test_unmappable_head_counts_and_layers_without_attention():
    student = attention_model(2, 8, "student", seed=1)
    teacher = attention_model(3, 12, "teacher", seed=2)
    with pytest.raises(ValueError, match="2 student heads to 3 teacher heads"):
        Distiller(
            student,
            teacher,
            feature_distillation=FeatureDistillation(
                pairs=[("student_attention", "teacher_attention")],
                attention_weight=1.0,
                attention_heads="grouped",
            ),
        )
    with pytest.raises(ValueError, match="'student_embed' \\(Dense\\)"):
        Distiller(
            student,
            teacher,
            feature_distillation=FeatureDistillation(
                pairs=[("student_embed", "teacher_attention")],
                weight=0.0,
                attention_weight=1.0,
            ),
        )


def test_bad_arguments_and_unsupported_setups():
    with pytest.raises(ValueError, match="pairs"):
        FeatureDistillation(pairs="random")
    with pytest.raises(ValueError, match="calibration_data"):
        FeatureDistillation(pairs="attention")
    with pytest.raises(ValueError, match="loss"):
        FeatureDistillation(loss="l1")
    with pytest.raises(ValueError, match="weight"):
        FeatureDistillation(weight=-1.0)
    with pytest.raises(ValueError, match="Both"):
        FeatureDistillation(weight=0.0)
    with pytest.raises(ValueError, match="pairs"):
        FeatureDistillation(pairs=[])
    with pytest.raises(ValueError, match="student_layers"):
        feature_distiller(pairs="uniform")
    with pytest.raises(ValueError, match="only 1"):
        feature_distiller(
            pairs="last", student_layers=["student_0", "student_1"],
            teacher_layers=["teacher_1"],
        )
    distiller = feature_distiller(
        pairs="uniform", student_layers=["student_1"], teacher_layers=["teacher_0", "teacher_1"]
    )
    assert distiller.feature_distillation.pairs == [("student_1", "teacher_1")]
    with pytest.raises(ValueError, match="needs the teacher model"):
        Distiller(
            mlp(4, "s", 0), None,
            feature_distillation=FeatureDistillation(pairs=[("s_0", "t_0")]),
        )
    fd = distiller.feature_distillation
    with pytest.raises(ValueError, match="already belongs"):
        Distiller(distiller.student, distiller.teacher, feature_distillation=fd)
    with pytest.raises(TypeError, match="FeatureDistillation"):
        Distiller(mlp(4, "s", 0), mlp(4, "t", 1), feature_distillation={"pairs": []})

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(NUM_CLASSES)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, NUM_FEATURES), "float32"))
    with pytest.raises(ValueError, match="subclassed"):
        Distiller(
            subclassed, mlp(4, "t", 1),
            feature_distillation=FeatureDistillation(pairs=[("dense", "t_0")]),
        )


def test_cached_teacher_outputs_are_refused():
    distiller = feature_distiller()
    x, y = data(n=8)
    targets = {"labels": y, "teacher_logits": np.zeros((8, NUM_CLASSES), "float32")}
    with pytest.raises(ValueError, match="cached teacher outputs"):
        distiller.evaluate(x, targets, verbose=0)
