"""The Distiller's step, API, freezing, inputs, callbacks, saving and errors."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_distill import Distiller
from keras_distill import losses
from tests.test_losses import np_divergence
from tests.test_losses import np_log_softmax

BACKEND = keras.backend.backend()
NUM_FEATURES, NUM_CLASSES = 12, 5


def make_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(n,)).astype("int32")
    return x, y


def make_teacher(seed=1, num_classes=NUM_CLASSES, normalization=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((NUM_FEATURES,)), keras.layers.Dense(32, "relu")]
    if normalization:
        layers += [keras.layers.BatchNormalization(), keras.layers.Dropout(0.5)]
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers, name="teacher")


def make_student(seed=2):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES)],
        name="student",
    )


def compiled_distiller(
    teacher=..., student=None, alpha=0.1, temperature=3.0, **compile_kwargs
):
    distiller = Distiller(
        student=student or make_student(),
        teacher=make_teacher() if teacher is ... else teacher,
    )
    compile_kwargs.setdefault("optimizer", keras.optimizers.Adam(1e-2))
    distiller.compile(
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        distillation_loss_fn=compile_kwargs.pop(
            "distillation_loss_fn", keras.losses.KLDivergence()
        ),
        alpha=alpha,
        temperature=temperature,
        **compile_kwargs,
    )
    return distiller


def np_cross_entropy(labels, logits):
    log_probs = np_log_softmax(logits, 1.0)
    return -log_probs[np.arange(len(labels)), labels]


def reference_losses(distiller, x, y, sample_weight=None, temperature=3.0):
    teacher_logits = ops.convert_to_numpy(distiller.teacher(x, training=False))
    student_logits = ops.convert_to_numpy(distiller.student(x, training=False))
    weights = np.ones(len(x)) if sample_weight is None else sample_weight
    hard = (np_cross_entropy(y, student_logits) * weights).sum() / weights.sum()
    soft = np_divergence(
        "forward_kl", teacher_logits, student_logits, temperature
    )
    soft = (soft * weights).sum() / weights.sum()
    return hard, soft


# ---- the loss ----


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_evaluate_matches_the_reference_loss(alpha):
    x, y = make_data()
    distiller = compiled_distiller(alpha=alpha)
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    hard, soft = reference_losses(distiller, x, y)
    assert results["student_loss"] == pytest.approx(hard, rel=1e-5)
    assert results["distillation_loss"] == pytest.approx(soft, rel=1e-5)
    assert results["loss"] == pytest.approx(
        alpha * hard + (1 - alpha) * soft, rel=1e-5
    )
    accuracy = np.mean(
        np.argmax(ops.convert_to_numpy(distiller.student(x)), -1) == y
    )
    assert results["sparse_categorical_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize(
    "distillation_loss_fn",
    [
        None,
        "kl_divergence",
        "kld",
        keras.losses.KLDivergence(),
        keras.losses.kl_divergence,
        losses.forward_kl,
        "forward_kl",
        losses.ForwardKL(),
    ],
)
def test_keras_kl_idioms_all_mean_exact_forward_kl(distillation_loss_fn):
    # Extreme teacher logits: Keras's probability-space KLDivergence clips
    # probabilities to 1e-7 and would be biased here.
    x, y = make_data()
    teacher = make_teacher()
    teacher.layers[-1].kernel.assign(teacher.layers[-1].kernel * 500.0)
    distiller = compiled_distiller(
        teacher=teacher, distillation_loss_fn=distillation_loss_fn
    )
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    _, soft = reference_losses(distiller, x, y)
    assert results["distillation_loss"] == pytest.approx(soft, rel=1e-5)


def test_other_keras_losses_compare_softened_probabilities():
    x, y = make_data()
    distiller = compiled_distiller(
        distillation_loss_fn=keras.losses.MeanSquaredError(), temperature=2.0
    )
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    teacher_logits = ops.convert_to_numpy(distiller.teacher(x))
    student_logits = ops.convert_to_numpy(distiller.student(x))
    teacher_probs = np.exp(np_log_softmax(teacher_logits, 2.0))
    student_probs = np.exp(np_log_softmax(student_logits, 2.0))
    expected = 4.0 * np.mean((teacher_probs - student_probs) ** 2)
    assert results["distillation_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "loss,name,kwargs",
    [
        (losses.GeneralizedJSD(beta=0.3), "generalized_jsd", {"beta": 0.3}),
        ("reverse_kl", "reverse_kl", {}),
        (losses.skew_kl, "skew_kl", {"skew": 0.1}),
    ],
)
def test_every_divergence_plugs_in(loss, name, kwargs):
    x, y = make_data()
    distiller = compiled_distiller(distillation_loss_fn=loss, temperature=2.0)
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    teacher_logits = ops.convert_to_numpy(distiller.teacher(x))
    student_logits = ops.convert_to_numpy(distiller.student(x))
    expected = np_divergence(name, teacher_logits, student_logits, 2.0, **kwargs)
    assert results["distillation_loss"] == pytest.approx(expected.mean(), rel=1e-5)


def test_sample_weight_weights_both_terms_and_normalizes_by_their_sum():
    x, y = make_data()
    weights = np.random.default_rng(3).uniform(size=len(x)).astype("float32")
    weights[::3] = 0.0
    distiller = compiled_distiller(alpha=0.3)
    results = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=len(x), return_dict=True, verbose=0
    )
    hard, soft = reference_losses(distiller, x, y, weights)
    assert results["loss"] == pytest.approx(0.3 * hard + 0.7 * soft, rel=1e-5)
    scaled = distiller.evaluate(
        x, y, sample_weight=10 * weights, batch_size=len(x), return_dict=True, verbose=0
    )
    assert scaled["loss"] == pytest.approx(results["loss"], rel=1e-5)


def test_all_zero_sample_weight_gives_finite_zero_and_no_update():
    x, y = make_data(16)
    distiller = compiled_distiller(optimizer=keras.optimizers.SGD(0.1))
    before = [w.copy() for w in distiller.student.get_weights()]
    history = distiller.fit(
        x, y, sample_weight=np.zeros(len(x)), batch_size=len(x), verbose=0
    )
    assert history.history["loss"] == [0.0]
    for old, new in zip(before, distiller.student.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_student_regularization_losses_are_added():
    x, y = make_data()
    keras.utils.set_random_seed(2)
    student = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(
                NUM_CLASSES, kernel_regularizer=keras.regularizers.L2(0.1)
            ),
        ]
    )
    distiller = compiled_distiller(student=student)
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    hard, soft = reference_losses(distiller, x, y)
    kernel = ops.convert_to_numpy(student.layers[-1].kernel)
    penalty = 0.1 * np.sum(kernel**2)
    assert results["loss"] == pytest.approx(
        0.1 * hard + 0.9 * soft + penalty, rel=1e-5
    )


def test_unlabeled_data_trains_on_the_teacher_alone_with_alpha_zero():
    x, _ = make_data()
    distiller = Distiller(student=make_student(), teacher=make_teacher())
    # No compiled metrics: they need labels.
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), alpha=0.0)
    history = distiller.fit(x, epochs=2, batch_size=16, verbose=0)
    assert history.history["student_loss"] == [0.0, 0.0]
    assert history.history["loss"][1] < history.history["loss"][0]
    labelled = Distiller(student=make_student(), teacher=make_teacher())
    labelled.compile(
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    with pytest.raises(ValueError, match="no labels `y`"):
        labelled.fit(x, epochs=1, batch_size=16, verbose=0)


# ---- the Keras API ----


def test_fit_logs_every_term_and_predict_runs_the_student():
    x, y = make_data()
    distiller = compiled_distiller()
    history = distiller.fit(
        x, y, epochs=2, batch_size=16, validation_data=(x, y), verbose=0
    )
    assert set(history.history) == {
        "loss",
        "student_loss",
        "distillation_loss",
        "sparse_categorical_accuracy",
        "val_loss",
        "val_student_loss",
        "val_distillation_loss",
        "val_sparse_categorical_accuracy",
    }
    assert history.history["loss"][1] < history.history["loss"][0]
    np.testing.assert_allclose(
        distiller.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(distiller(x)),
        ops.convert_to_numpy(distiller.student(x)),
        rtol=1e-6,
    )


def test_teacher_is_frozen_in_inference_mode_and_never_updated():
    x, y = make_data()
    teacher = make_teacher(normalization=True)
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    distiller = compiled_distiller(teacher=teacher)
    assert not teacher.trainable
    teacher_ids = {id(v) for v in teacher.weights}
    assert not teacher_ids & {id(v) for v in distiller.trainable_weights}
    assert {id(v) for v in distiller.trainable_weights} == {
        id(v) for v in distiller.student.trainable_weights
    }
    # Dropout off and BatchNorm on moving statistics: the logged distillation
    # loss equals the one computed from the teacher at inference.
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    _, soft = reference_losses(distiller, x, y)
    assert results["distillation_loss"] == pytest.approx(soft, rel=1e-5)
    distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for old, new in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(old, new)


def numpy_batches():
    return make_data(), {}


def tf_dataset():
    import tensorflow as tf

    x, y = make_data()
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=0).batch(16), {}


class ArraySequence(keras.utils.PyDataset):
    def __init__(self):
        super().__init__()
        self.x, self.y = make_data()

    def __len__(self):
        return 4

    def __getitem__(self, index):
        batch = slice(16 * index, 16 * (index + 1))
        return self.x[batch], self.y[batch]


def torch_loader():
    import torch

    x, y = make_data()
    dataset = torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y))
    return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True), {}


@pytest.mark.parametrize(
    "make_input",
    [numpy_batches, tf_dataset, lambda: (ArraySequence(), {}), torch_loader],
    ids=["numpy", "tf.data", "PyDataset", "torch.DataLoader"],
)
def test_every_keras_input_type_trains(make_input):
    data, _ = make_input()
    distiller = compiled_distiller()
    if isinstance(data, tuple):
        history = distiller.fit(*data, batch_size=16, epochs=2, verbose=0)
        results = distiller.evaluate(*data, verbose=0, return_dict=True)
    else:
        history = distiller.fit(data, epochs=2, verbose=0)
        results = distiller.evaluate(data, verbose=0, return_dict=True)
    assert history.history["loss"][1] < history.history["loss"][0]
    assert math.isfinite(results["distillation_loss"])


def test_callbacks_work_unchanged(tmp_path):
    x, y = make_data()
    distiller = compiled_distiller()
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1),
        keras.callbacks.ModelCheckpoint(
            str(tmp_path / "best.keras"), monitor="val_loss", save_best_only=True
        ),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        keras.callbacks.TensorBoard(str(tmp_path / "logs")),
    ]
    history = distiller.fit(
        x,
        y,
        epochs=3,
        batch_size=16,
        validation_data=(x, y),
        callbacks=callbacks,
        verbose=0,
    )
    assert len(history.history["loss"]) >= 2
    reloaded = keras.saving.load_model(str(tmp_path / "best.keras"))
    assert isinstance(reloaded, Distiller)
    assert any((tmp_path / "logs").rglob("*tfevents*"))


def test_backup_and_restore_resumes_an_interrupted_fit(tmp_path):
    x, y = make_data()

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    distiller = compiled_distiller()
    with pytest.raises(RuntimeError, match="interrupted"):
        distiller.fit(x, y, epochs=4, batch_size=16, callbacks=[backup, Interrupt()], verbose=0)
    resumed = compiled_distiller()
    history = resumed.fit(x, y, epochs=4, batch_size=16, callbacks=[backup], verbose=0)
    assert len(history.history["loss"]) == 2  # epochs 3 and 4 only


def test_jit_compile_trains_on_every_backend():
    x, y = make_data()
    distiller = compiled_distiller(jit_compile=True)
    history = distiller.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    hard, soft = reference_losses(distiller, x, y)
    assert results["loss"] == pytest.approx(0.1 * hard + 0.9 * soft, rel=1e-4)


def test_gradient_accumulation_updates_every_n_steps():
    x, y = make_data(32)
    distiller = compiled_distiller(
        optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    )
    before = [w.copy() for w in distiller.student.get_weights()]
    distiller.fit(x[:16], y[:16], batch_size=16, verbose=0)
    for old, new in zip(before, distiller.student.get_weights()):
        np.testing.assert_array_equal(old, new)  # accumulated, not applied
    distiller.fit(x[16:], y[16:], batch_size=16, verbose=0)
    assert any(
        not np.array_equal(old, new)
        for old, new in zip(before, distiller.student.get_weights())
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_student_trains_with_float32_losses(
    policy, restore_dtype_policy
):
    x, y = make_data()
    teacher = make_teacher()
    keras.config.set_dtype_policy(policy)
    student = make_student()
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        alpha=0.1,
        temperature=3.0,
    )
    if policy == "mixed_float16":
        assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert history.history["loss"][1] < history.history["loss"][0]


@pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution is implemented for JAX only"
)
def test_keras_distribution_data_parallel():
    x, y = make_data()
    distribution = keras.distribution.DataParallel()
    with distribution.scope():
        distiller = compiled_distiller()
        history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]


# ---- saving ----


def test_config_round_trip():
    distiller = Distiller(student=make_student(), teacher=make_teacher(), name="kd")
    config = distiller.get_config()
    restored = Distiller.from_config(config)
    assert restored.name == "kd"
    assert restored.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(distiller)
    )
    assert isinstance(revived, Distiller)


def test_save_and_load_round_trip_keeps_weights_and_compile_settings(tmp_path):
    x, y = make_data()
    distiller = compiled_distiller(
        alpha=0.25,
        temperature=4.0,
        distillation_loss_fn=losses.GeneralizedJSD(beta=0.3),
    )
    distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, Distiller)
    assert (loaded.alpha, loaded.temperature) == (0.25, 4.0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), distiller.predict(x, verbose=0))
    np.testing.assert_allclose(
        loaded.teacher.predict(x, verbose=0), distiller.teacher.predict(x, verbose=0)
    )
    expected = distiller.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    actual = loaded.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-5), key
    loaded.fit(x, y, epochs=1, batch_size=16, verbose=0)  # training continues

    # The student alone: one line.
    distiller.student.save(str(tmp_path / "student.keras"))
    student = keras.saving.load_model(str(tmp_path / "student.keras"))
    np.testing.assert_allclose(student.predict(x, verbose=0), distiller.predict(x, verbose=0))


# ---- bad input ----


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"alpha": -0.1}, ValueError, "`alpha`"),
        ({"alpha": 1.5}, ValueError, "`alpha`"),
        ({"alpha": float("nan")}, ValueError, "`alpha`"),
        ({"alpha": "0.1"}, TypeError, "`alpha`"),
        ({"temperature": 0}, ValueError, "`temperature`"),
        ({"temperature": -2.0}, ValueError, "`temperature`"),
        ({"temperature": float("nan")}, ValueError, "`temperature`"),
        ({"temperature": float("inf")}, ValueError, "`temperature`"),
        ({"student_loss_fn": None}, ValueError, "`student_loss_fn`"),
        ({"loss": "mse"}, ValueError, "`student_loss_fn`"),
        (
            {"distillation_loss_fn": losses.ReverseKL(temperature=2.0)},
            ValueError,
            "temperature",
        ),
    ],
)
def test_bad_compile_arguments_fail_early_and_name_the_argument(kwargs, error, match):
    distiller = Distiller(student=make_student(), teacher=make_teacher())
    arguments = {
        "optimizer": "adam",
        "student_loss_fn": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "alpha": 0.1,
        "temperature": 3.0,
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        distiller.compile(**arguments)


def test_crossentropy_by_name_reads_logits_and_probability_losses_are_refused():
    x, y = make_data()
    distiller = Distiller(student=make_student(), teacher=make_teacher())
    distiller.compile(
        student_loss_fn="sparse_categorical_crossentropy",
        alpha=np.float32(0.5),  # NumPy scalars are numbers too
        temperature=np.float64(3.0),
    )
    results = distiller.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    hard, _ = reference_losses(distiller, x, y)
    assert results["student_loss"] == pytest.approx(hard, rel=1e-5)
    labels_only = distiller.evaluate(
        x, {"labels": y}, batch_size=64, return_dict=True, verbose=0
    )
    assert labels_only["loss"] == pytest.approx(results["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="from_logits=True"):
        distiller.compile(
            student_loss_fn=keras.losses.SparseCategoricalCrossentropy()
        )


def test_output_shape_mismatch_names_both_class_counts():
    with pytest.raises(ValueError, match="Teacher outputs 11 classes, student 5"):
        Distiller(student=make_student(), teacher=make_teacher(num_classes=11))


def test_output_shape_mismatch_of_subclassed_models_fails_on_first_step():
    class Logits(keras.Model):
        def __init__(self, classes, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(classes)

        def call(self, inputs):
            return self.dense(inputs)

    x, y = make_data(16)
    distiller = compiled_distiller(teacher=Logits(11), student=Logits(NUM_CLASSES))
    with pytest.raises(ValueError, match="Teacher outputs 11 classes, student 5"):
        distiller.fit(x, y, verbose=0)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_models_must_be_keras_models(role):
    models = {"student": make_student(), "teacher": make_teacher()}
    models[role] = lambda x: x
    with pytest.raises(TypeError, match=f"`{role}` must be a Keras model"):
        Distiller(**models)


@pytest.mark.parametrize("method", ["fit", "evaluate"])
def test_fit_or_evaluate_before_compile_says_to_compile(method):
    x, y = make_data(8)
    distiller = Distiller(student=make_student(), teacher=make_teacher())
    with pytest.raises(ValueError, match=r"distiller.compile\("):
        getattr(distiller, method)(x, y, verbose=0)


class FaultyTeacher(keras.Model):
    """Returns NaN logits for inputs whose first feature is below -50."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(NUM_CLASSES)

    def call(self, inputs):
        return self.dense(inputs) * ops.sqrt(inputs[:, :1] + 50.0)


def test_non_finite_teacher_stops_fit_and_keeps_the_last_good_weights():
    def faulty_distiller():
        keras.utils.set_random_seed(5)
        return compiled_distiller(
            teacher=FaultyTeacher(), optimizer=keras.optimizers.SGD(0.1)
        )

    x, y = make_data(48)
    reference = faulty_distiller()
    reference.fit(x[:32], y[:32], batch_size=16, shuffle=False, verbose=0)
    x[40, 0] = -100.0  # the third batch: finite input, NaN teacher logits
    distiller = faulty_distiller()
    with pytest.raises(FloatingPointError, match="epoch 1, batch 3"):
        distiller.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    # Weights after the two good batches: the bad one changed nothing.
    for good, now in zip(
        reference.student.get_weights(), distiller.student.get_weights()
    ):
        assert np.all(np.isfinite(now))
        np.testing.assert_array_equal(good, now)


# ---- precomputed teacher outputs in `y` ----


def test_precomputed_teacher_logits_give_the_online_loss_without_a_teacher():
    x, y = make_data()
    online = compiled_distiller()
    teacher_logits = online.teacher.predict(x, verbose=0)
    expected = online.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    offline = compiled_distiller(teacher=None, student=online.student)
    offline_targets = {"labels": y, "teacher_logits": teacher_logits}
    actual = offline.evaluate(
        x, offline_targets, batch_size=16, return_dict=True, verbose=0
    )
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-5), key
    history = offline.fit(x, offline_targets, epochs=2, batch_size=16, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]


def test_top_k_targets_with_every_class_equal_the_dense_loss():
    from keras_distill.targets.top_k import top_k_teacher_targets

    x, y = make_data()
    distiller = compiled_distiller()
    expected = distiller.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    log_probs, indices = top_k_teacher_targets(
        distiller.teacher.predict(x, verbose=0), k=NUM_CLASSES
    )
    targets = {
        "labels": y,
        "teacher_top_log_probs": ops.convert_to_numpy(log_probs),
        "teacher_top_indices": ops.convert_to_numpy(indices),
    }
    actual = distiller.evaluate(x, targets, batch_size=64, return_dict=True, verbose=0)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize(
    "targets,match",
    [
        ({"teacher_top_log_probs": np.zeros((64, 2))}, "need both"),
        ({"teacher_logits": np.zeros((64, NUM_CLASSES)), "extra": np.zeros(64)}, "Unknown keys"),
    ],
)
def test_malformed_precomputed_targets_are_named(targets, match):
    x, _ = make_data()
    distiller = compiled_distiller()
    with pytest.raises(ValueError, match=match):
        distiller.evaluate(x, targets, batch_size=64, verbose=0)


def test_teacherless_distiller_needs_teacher_outputs_in_y():
    x, y = make_data()
    distiller = compiled_distiller(teacher=None)
    with pytest.raises(ValueError, match="has no teacher"):
        distiller.fit(x, y, batch_size=64, verbose=0)


def test_top_k_targets_refuse_a_divergence_other_than_forward_kl():
    x, y = make_data()
    distiller = compiled_distiller(distillation_loss_fn="reverse_kl")
    targets = {
        "labels": y,
        "teacher_top_log_probs": np.full((64, 2), -0.7, "float32"),
        "teacher_top_indices": np.tile(np.arange(2, dtype="int32"), (64, 1)),
    }
    with pytest.raises(ValueError, match="forward KL only"):
        distiller.evaluate(x, targets, batch_size=64, verbose=0)


# ---- what slipped through (issue 14) ----


def _feature_distiller():
    from keras_distill.distillers.feature_distillation import FeatureDistillation

    def mlp(name, seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((NUM_FEATURES,))
        hidden = keras.layers.Dense(8, "tanh", name=f"{name}_hidden")(inputs)
        return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(hidden))

    return Distiller(
        mlp("student", 2),
        mlp("teacher", 1),
        feature_distillation=FeatureDistillation(
            pairs=[("student_hidden", "teacher_hidden")]
        ),
    )


@pytest.mark.parametrize("features", [False, True])
def test_predict_returns_the_student_logits_and_the_model_stays_usable(
    features,
):
    x, y = make_data(16)
    distiller = _feature_distiller() if features else Distiller(
        student=make_student(), teacher=make_teacher()
    )
    distiller.compile(
        optimizer="sgd", student_loss_fn="sparse_categorical_crossentropy"
    )
    distiller.fit(x, y, batch_size=8, verbose=0)
    expected = ops.convert_to_numpy(distiller.student(x))
    np.testing.assert_allclose(
        distiller.predict(x, batch_size=8, verbose=0), expected, atol=1e-5
    )
    np.testing.assert_allclose(
        distiller.predict_on_batch(x), expected, atol=1e-5
    )
    # Training, evaluation and the student itself still work afterwards.
    distiller.fit(x, y, batch_size=8, verbose=0)
    assert math.isfinite(distiller.evaluate(x, y, verbose=0)[0])
    assert distiller.student(x).shape == (16, NUM_CLASSES)


def test_keras_crossentropy_functions_are_applied_to_logits():
    x, y = make_data()
    by_name = compiled_distiller(alpha=0.5)
    hard, _ = reference_losses(by_name, x, y)
    for loss in (
        keras.losses.sparse_categorical_crossentropy,
        "sparse_categorical_crossentropy",
    ):
        distiller = Distiller(student=make_student(), teacher=make_teacher())
        distiller.compile(student_loss_fn=loss, alpha=0.5)
        results = distiller.evaluate(x, y, batch_size=64, return_dict=True,
                                     verbose=0)
        assert results["student_loss"] == pytest.approx(hard, rel=1e-5)

    def probabilities_loss(y_true, y_pred, from_logits=False):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=from_logits
        )

    with pytest.raises(ValueError, match="functools.partial"):
        by_name.compile(student_loss_fn=probabilities_loss)


def _softmax_teacher(kind):
    keras.utils.set_random_seed(1)
    if kind == "activation":
        return keras.Sequential([
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ])
    return keras.Sequential([
        keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES),
        keras.layers.Softmax(),
    ])


@pytest.mark.parametrize(
    "kind, fix", [("activation", ".activation = keras.activations.linear"),
                  ("layer", ".input)")]
)
def test_teacher_returning_probabilities_is_refused(kind, fix):
    with pytest.raises(ValueError, match="returns probabilities") as raised:
        Distiller(student=make_student(), teacher=_softmax_teacher(kind))
    assert fix in str(raised.value)


def test_probabilities_as_teacher_logits_stop_fit():
    x, y = make_data(16)
    distiller = compiled_distiller(teacher=None)
    teacher_logits = ops.convert_to_numpy(ops.softmax(make_teacher()(x)))
    before = distiller.student.get_weights()
    with pytest.raises(ValueError, match="teacher's outputs are probabilities"):
        distiller.fit(x, {"labels": y, "teacher_logits": teacher_logits},
                      batch_size=8, verbose=0)
    for initial, now in zip(before, distiller.student.get_weights()):
        assert np.all(np.isfinite(now))


@pytest.mark.parametrize("label", [NUM_CLASSES + 2, -1])
def test_out_of_range_labels_stop_fit_naming_label_and_classes(label):
    x, y = make_data(16)
    y[3] = label
    distiller = compiled_distiller(optimizer=keras.optimizers.SGD(0.1))
    before = distiller.student.get_weights()
    with pytest.raises(
        ValueError, match=rf"Label {label} is outside .* {NUM_CLASSES} classes"
    ):
        distiller.fit(x, y, batch_size=16, verbose=0)
    # A zero gradient: under plain SGD the student did not move.
    for initial, now in zip(before, distiller.student.get_weights()):
        np.testing.assert_array_equal(now, initial)
    # Zero-weight examples may carry any label (e.g. -100 for padding).
    y[3] = -100
    weights = np.ones(16, "float32")
    weights[3] = 0.0
    history = distiller.fit(x, y, sample_weight=weights, batch_size=16,
                            verbose=0)
    assert math.isfinite(history.history["loss"][0])


def test_teacher_set_trainable_again_is_not_moved_by_weight_decay():
    x, y = make_data(16)
    teacher = make_teacher()
    distiller = compiled_distiller(
        teacher=teacher,
        optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.5),
    )
    teacher.trainable = True
    before = teacher.get_weights()
    distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for initial, now in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(now, initial)
    assert not {id(v) for v in teacher.weights} & {
        id(v) for v in distiller.trainable_variables
    }


def test_minus_inf_class_logits_rule_the_class_out():
    x, y = make_data(16)
    teacher_logits = ops.convert_to_numpy(make_teacher()(x))
    masked = teacher_logits.copy()
    masked[:, 0] = -np.inf
    distiller = compiled_distiller(teacher=None, alpha=0.0, temperature=1.0)
    student_logits = ops.convert_to_numpy(distiller.student(x))
    value = float(ops.convert_to_numpy(distiller.compute_loss(
        x, {"labels": y, "teacher_logits": masked},
        ops.convert_to_tensor(student_logits), training=False,
    )))
    # The KL to a teacher that gives class 0 no mass, from the finite logits.
    log_p = np_log_softmax(teacher_logits[:, 1:], 1.0)
    log_q = np_log_softmax(student_logits, 1.0)[:, 1:]
    expected = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    assert value == pytest.approx(expected, rel=1e-5)
    history = distiller.fit(
        x, {"labels": y, "teacher_logits": masked}, batch_size=8, verbose=0
    )
    assert math.isfinite(history.history["loss"][0])
    # The reverse KL to a ruled-out class is infinite: refused, no update.
    reverse = compiled_distiller(
        teacher=None, alpha=0.0, distillation_loss_fn="reverse_kl",
        optimizer=keras.optimizers.SGD(0.1),
    )
    before = reverse.student.get_weights()
    with pytest.raises(FloatingPointError):
        reverse.fit(x, {"labels": y, "teacher_logits": masked}, verbose=0)
    for initial, now in zip(before, reverse.student.get_weights()):
        np.testing.assert_array_equal(now, initial)


def test_zero_weight_positions_with_nan_teacher_logits_do_not_count():
    x, y = make_data(16)
    teacher_logits = ops.convert_to_numpy(make_teacher()(x))
    weights = np.ones(16, "float32")
    weights[[2, 9]] = 0.0
    poisoned = teacher_logits.copy()
    poisoned[2] = np.nan
    poisoned[9, 1] = -np.inf
    poisoned[9, 3] = np.inf
    distiller = compiled_distiller(teacher=None)
    student_logits = distiller.student(x)

    def loss(targets):
        return float(ops.convert_to_numpy(distiller.compute_loss(
            x, {"labels": y, "teacher_logits": targets}, student_logits,
            sample_weight=weights, training=False,
        )))

    assert loss(poisoned) == pytest.approx(loss(teacher_logits), rel=1e-6)
    before = distiller.student.get_weights()
    distiller.fit(x, {"labels": y, "teacher_logits": poisoned},
                  sample_weight=weights, batch_size=16, verbose=0)
    for initial, now in zip(before, distiller.student.get_weights()):
        assert np.all(np.isfinite(now)) and not np.array_equal(now, initial)


# ---- `Distiller._finish_loss`, the tail of every distiller's loss ----


class SquaredLogitDistance(Distiller):
    """A distiller of another soft term, ending as every distiller does."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        # A broken teacher batch is replaced by a finite stand-in: `_finish_loss`
        # zeroes the gradient, which NaN maths would turn into NaN.
        teacher_finite = ops.all(ops.isfinite(teacher_logits))
        teacher_logits = ops.where(
            teacher_finite, teacher_logits, ops.stop_gradient(y_pred)
        )
        distance = ops.mean(ops.square(teacher_logits - y_pred))
        return self._finish_loss(
            loss=distance,
            student_loss=ops.zeros(()),
            distillation_loss=distance,
            student_outputs=y_pred,
            sample_weight=sample_weight,
            training=training,
            teacher_finite=teacher_finite,
        )


def test_finish_loss_gives_a_new_distiller_regularizers_trackers_and_the_guard():
    x, y = make_data(32)
    keras.utils.set_random_seed(2)
    student = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(
                NUM_CLASSES, kernel_regularizer=keras.regularizers.L2(0.1)
            ),
        ]
    )
    teacher = make_teacher()
    distiller = SquaredLogitDistance(student=student, teacher=teacher)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1), alpha=0.0)
    results = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    x64 = x.astype("float64")
    weights = [w.astype("float64") for w in teacher.get_weights()]
    hidden = np.maximum(x64 @ weights[0] + weights[1], 0.0)
    teacher_logits = hidden @ weights[2] + weights[3]
    kernel, bias = (w.astype("float64") for w in student.get_weights())
    distance = np.mean((teacher_logits - (x64 @ kernel + bias)) ** 2)
    penalty = 0.1 * np.sum(kernel**2)
    assert results["distillation_loss"] == pytest.approx(distance, rel=1e-5)
    assert results["student_loss"] == 0.0
    assert results["loss"] == pytest.approx(distance + penalty, rel=1e-5)
    # A NaN teacher: the step's gradient is zero and `fit` stops.
    before = student.get_weights()
    teacher.layers[-1].bias.assign(np.full((NUM_CLASSES,), np.nan, "float32"))
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        distiller.fit(x, y, batch_size=len(x), verbose=0)
    for old, new in zip(before, student.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_distiller_modules_import_one_way():
    """`causal_lm` -> `on_policy` -> `language_models.hub`, never back, even
    inside a function."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "keras_distill"

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse((package / path).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    def imports_any(path, modules):
        return sorted(
            name for name in imported(path)
            if any(name == m or name.startswith(m + ".") for m in modules)
        )

    causal_lm = "keras_distill.distillers.causal_lm"
    on_policy = "keras_distill.distillers.on_policy"
    hub = "keras_distill.language_models.hub"
    assert on_policy in imported("distillers/causal_lm.py")
    assert hub in imported("distillers/on_policy.py")
    assert imports_any("distillers/on_policy.py", [causal_lm]) == []
    assert imports_any("language_models/hub.py", ["keras_distill.distillers"]) == []
