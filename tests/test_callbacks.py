"""Teacher–student metrics, throughput and peak-memory callbacks."""

import resource

import keras
import numpy as np
import pytest
from keras import ops

from keras_distill import Distiller
from keras_distill import callbacks
from keras_distill.callbacks import PeakMemory
from keras_distill.callbacks import Throughput
from keras_distill.metrics import TeacherAgreement
from keras_distill.metrics import TeacherKL
from tests.test_losses import np_kl
from tests.test_losses import np_log_softmax

NUM_FEATURES, NUM_CLASSES = 6, 4


def np_agreement(teacher, student, weights):
    values = (teacher.argmax(-1) == student.argmax(-1)).astype(np.float64)
    weights = np.broadcast_to(weights, values.shape)
    return (values * weights).sum() / weights.sum()


def np_teacher_kl(teacher, student, weights, temperature=1.0):
    values = np_kl(
        np_log_softmax(teacher, temperature), np_log_softmax(student, temperature)
    )
    weights = np.broadcast_to(weights, values.shape)
    return (values * weights).sum() / weights.sum()


def token_batches(seed=0, num_batches=3, shape=(4, 5, 7)):
    rng = np.random.default_rng(seed)
    for _ in range(num_batches):
        teacher = rng.normal(scale=3.0, size=shape).astype("float32")
        student = rng.normal(scale=3.0, size=shape).astype("float32")
        mask = (rng.random(shape[:-1]) < 0.7).astype("float32")
        yield teacher, student, mask


@pytest.mark.parametrize("metric_class", [TeacherAgreement, TeacherKL])
def test_metrics_accumulate_a_masked_mean_over_batches(metric_class):
    reference = np_agreement if metric_class is TeacherAgreement else np_teacher_kl
    metric = metric_class()
    batches = list(token_batches())
    for teacher, student, mask in batches:
        metric.update_state(teacher, student, sample_weight=mask)
    teacher, student, mask = (np.concatenate(a) for a in zip(*batches))
    np.testing.assert_allclose(
        float(metric.result()), reference(teacher, student, mask), rtol=1e-5
    )
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_teacher_kl_temperature_and_extreme_logits():
    teacher = np.array([[1e4, -1e4, 0.0], [2.0, 0.5, -1.0]], "float32")
    student = np.array([[-1e4, 1e4, 0.0], [1.0, 1.0, 0.0]], "float32")
    for temperature in (1.0, 4.0):
        metric = TeacherKL(temperature=temperature)
        metric.update_state(teacher, student)
        expected = np_teacher_kl(teacher, student, 1.0, temperature)
        assert np.isfinite(float(metric.result()))
        np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-5)


def test_per_example_weights_and_all_zero_weights():
    teacher = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]], "float32")
    student = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "float32")
    metric = TeacherAgreement()
    metric.update_state(teacher, student, sample_weight=[1.0, 3.0, 0.0])
    assert float(metric.result()) == pytest.approx(0.25)
    empty = TeacherKL()
    empty.update_state(teacher, student, sample_weight=[0.0, 0.0, 0.0])
    assert float(empty.result()) == 0.0


def test_agreement_breaks_ties_towards_the_first_class():
    metric = TeacherAgreement()
    metric.update_state([[1.0, 1.0, 0.0]], [[2.0, 0.0, 0.0]])
    assert float(metric.result()) == 1.0


def test_bad_metric_input():
    with pytest.raises(ValueError, match="same shape"):
        TeacherAgreement().update_state(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="temperature"):
        TeacherKL(temperature=0.0)


@pytest.mark.parametrize(
    "metric", [TeacherAgreement(name="agree"), TeacherKL(temperature=2.0)]
)
def test_metric_config_round_trip(metric):
    config = keras.saving.serialize_keras_object(metric)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(metric)
    assert restored.get_config() == metric.get_config()


def make_distiller(metrics, seed=0):
    keras.utils.set_random_seed(seed)
    teacher = keras.Sequential(
        [keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES)]
    )
    student = keras.Sequential(
        [keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES)]
    )
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1),
        metrics=metrics,
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        alpha=0.5,
        temperature=2.0,
    )
    return distiller


def data(n=32, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(n,)).astype("int32")
    return x, y


def test_distiller_reports_teacher_metrics_equal_to_references():
    distiller = make_distiller(
        ["accuracy", TeacherAgreement(), TeacherKL()]
    )
    x, y = data()
    weights = np.linspace(0.0, 1.0, len(x)).astype("float32")
    results = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=8, verbose=0, return_dict=True
    )
    teacher = ops.convert_to_numpy(distiller.teacher(x))
    student = ops.convert_to_numpy(distiller.student(x))
    np.testing.assert_allclose(
        results["teacher_agreement"],
        np_agreement(teacher, student, weights),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        results["teacher_kl"], np_teacher_kl(teacher, student, weights), rtol=1e-5
    )
    # The student's own metrics still compare labels with the student.
    np.testing.assert_allclose(
        results["accuracy"], (student.argmax(-1) == y).mean(), rtol=1e-6
    )


def test_teacher_metrics_reach_history_progress_bar_and_validation():
    distiller = make_distiller([TeacherAgreement(), TeacherKL()])
    x, y = data()
    history = distiller.fit(
        x, y, epochs=2, batch_size=8, validation_data=(x, y), verbose=0
    )
    for key in ("teacher_agreement", "teacher_kl"):
        assert len(history.history[key]) == 2
        assert len(history.history["val_" + key]) == 2
    # Training moves the student towards the teacher.
    assert history.history["val_teacher_kl"][1] < history.history["val_teacher_kl"][0]


def test_teacher_metrics_survive_saving_and_recompiling(tmp_path):
    distiller = make_distiller([TeacherAgreement(), TeacherKL(temperature=2.0)])
    x, y = data()
    distiller.fit(x, y, epochs=1, batch_size=8, verbose=0)
    expected = distiller.evaluate(x, y, verbose=0, return_dict=True)
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    results = loaded.evaluate(x, y, verbose=0, return_dict=True)
    for key in ("teacher_agreement", "teacher_kl"):
        np.testing.assert_allclose(results[key], expected[key], rtol=1e-5)
    # Compiling again replaces the metrics instead of adding to them.
    loaded.compile(
        metrics=[TeacherAgreement()],
        student_loss_fn="sparse_categorical_crossentropy",
    )
    names = [m.name for m in loaded.metrics]
    assert names.count("teacher_agreement") == 1 and "teacher_kl" not in names


def test_teacher_metrics_refuse_top_k_targets():
    distiller = make_distiller([TeacherAgreement()])
    x, y = data(n=8)
    targets = {
        "labels": y,
        "teacher_top_log_probs": np.zeros((8, 2), "float32"),
        "teacher_top_indices": np.zeros((8, 2), "int32"),
    }
    with pytest.raises(ValueError, match="top-k teacher targets"):
        distiller.evaluate(x, targets, verbose=0)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def run_epoch(callback, clock, batch_seconds, logs):
    callback.on_epoch_begin(0)
    for batch, seconds in enumerate(batch_seconds):
        clock.now += seconds
        callback.on_train_batch_end(batch, {"loss": 0.0})
    # Validation time after the last batch is not counted.
    clock.now += 50.0
    callback.on_epoch_end(0, logs)
    return logs


def test_throughput_counts_examples_and_tokens_exactly(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    padding_mask = np.zeros((10, 8), "float32")
    padding_mask[:, :6] = 1.0  # 6 real tokens per example
    callback = Throughput(4, num_examples=10, padding_mask=padding_mask)
    logs = run_epoch(callback, clock, [1.0, 0.5, 0.5], {})
    # 3 batches of at most 4 examples cover the 10 examples in 2 seconds.
    assert logs["train_seconds"] == pytest.approx(2.0)
    assert logs["examples_per_second"] == pytest.approx(5.0)
    assert logs["tokens_per_second"] == pytest.approx(30.0)

    without_size = run_epoch(Throughput(4, tokens_per_example=3), clock, [2.0] * 3, {})
    assert without_size["examples_per_second"] == pytest.approx(2.0)
    assert without_size["tokens_per_second"] == pytest.approx(6.0)
    assert "tokens_per_second" not in run_epoch(Throughput(4), clock, [1.0], {})


def test_throughput_and_peak_memory_reach_history():
    distiller = make_distiller(None)
    x, y = data()
    history = distiller.fit(
        x,
        y,
        epochs=2,
        batch_size=8,
        verbose=0,
        callbacks=[Throughput(8, num_examples=len(x)), PeakMemory()],
    )
    for key in ("examples_per_second", "train_seconds", "peak_host_memory_mb"):
        assert len(history.history[key]) == 2
        assert all(value > 0 for value in history.history[key])
    peaks = history.history["peak_host_memory_mb"]
    assert peaks[1] >= peaks[0]
    if callbacks.device_peak_memory_bytes() is None:
        assert "peak_device_memory_mb" not in history.history
    else:
        assert history.history["peak_device_memory_mb"][1] > 0


def test_host_peak_memory_is_at_least_the_current_resident_size():
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    current = resident_pages * resource.getpagesize()
    # Linux caches RSS counters per thread (up to 64 pages each), so the two
    # readings can differ by a few MB in either direction.
    assert callbacks.host_peak_memory_bytes() >= current - 16 * 2**20


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"batch_size": 4, "num_examples": -1}, ValueError, "num_examples"),
        (
            {"batch_size": 4, "tokens_per_example": 3, "padding_mask": [[1]]},
            ValueError,
            "not both",
        ),
        ({"batch_size": 4, "padding_mask": [1, 1, 0]}, ValueError, "padding_mask"),
        ({"batch_size": 4, "tokens_per_example": float("nan")}, ValueError, "tokens"),
    ],
)
def test_throughput_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Throughput(**kwargs)
