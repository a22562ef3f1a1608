"""The teacher-output cache: same loss as online, fingerprints, resumption."""

import json

import keras
import numpy as np
import pytest

from keras_distill import Distiller
from keras_distill.cache import TeacherOutputCache
from tests.test_distiller import compiled_distiller
from tests.test_distiller import make_data
from tests.test_distiller import make_teacher


@pytest.fixture
def teacher_batches(monkeypatch):
    """Counts the cache's teacher batches; can interrupt after some."""

    class Counter:
        batches = 0
        fail_after = None

    original = TeacherOutputCache._teacher_outputs

    def counted(*args):
        Counter.batches += 1
        if Counter.fail_after is not None and Counter.batches > Counter.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args)

    monkeypatch.setattr(TeacherOutputCache, "_teacher_outputs", staticmethod(counted))
    return Counter


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_loss_equals_online_loss_on_the_same_batch(tmp_path, dtype):
    x, y = make_data()
    online = compiled_distiller()
    expected = online.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    cache = TeacherOutputCache.build(online.teacher, x, tmp_path, dtype=dtype)
    assert all(isinstance(a, np.memmap) for a in cache.arrays.values())
    offline = compiled_distiller(teacher=None, student=online.student)
    batches = cache.dataset(x, y, batch_size=16, shuffle=False)
    actual = offline.evaluate(batches, return_dict=True, verbose=0)
    tolerance = 1e-6 if dtype == "float32" else 2e-3
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=tolerance), key


def test_shuffled_batches_keep_each_example_with_its_own_outputs(tmp_path):
    x, y = make_data()
    teacher = make_teacher()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, dtype="float32")
    expected = keras.ops.convert_to_numpy(teacher(x))
    batches = cache.dataset(x, y, batch_size=10, shuffle=True, seed=0)
    seen = []
    for epoch in range(2):
        for index in range(len(batches)):
            inputs, targets = batches[index]
            rows = [int(np.where((x == row).all(axis=1))[0][0]) for row in inputs]
            np.testing.assert_array_equal(targets["labels"], y[rows])
            np.testing.assert_allclose(
                targets["teacher_logits"], expected[rows], rtol=1e-6
            )
            seen.extend(rows)
        batches.on_epoch_end()
    assert sorted(seen[:64]) == list(range(64))
    assert seen[:64] != seen[64:]  # a new order each epoch


def test_distiller_trains_from_the_cache_without_the_teacher(
    tmp_path, teacher_batches
):
    x, y = make_data()
    cache = TeacherOutputCache.build(make_teacher(), x, tmp_path, batch_size=16)
    assert teacher_batches.batches == 4
    distiller = compiled_distiller(teacher=None)
    history = distiller.fit(cache.dataset(x, y, batch_size=16), epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_top_k_cache_trains_the_distiller(tmp_path):
    x, y = make_data()
    teacher = make_teacher()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, top_k=3)
    assert cache.arrays["teacher_top_indices"].dtype == np.uint8
    assert cache.arrays["teacher_top_log_probs"].shape == (64, 3)
    distiller = compiled_distiller(teacher=None)
    history = distiller.fit(cache.dataset(x, y, batch_size=16), epochs=2, verbose=0)
    assert np.isfinite(history.history["distillation_loss"]).all()


def test_complete_cache_is_reused_and_stale_cache_refused(
    tmp_path, teacher_batches
):
    x, _ = make_data()
    teacher = make_teacher()
    TeacherOutputCache.build(teacher, x, tmp_path)
    assert teacher_batches.batches == 1
    same_weights = keras.models.clone_model(teacher)
    same_weights.set_weights(teacher.get_weights())
    TeacherOutputCache.build(same_weights, x, tmp_path)
    assert teacher_batches.batches == 1  # same fingerprint: nothing recomputed
    other_teacher = make_teacher(seed=7)
    with pytest.raises(ValueError, match="different teacher weights"):
        TeacherOutputCache.build(other_teacher, x, tmp_path)
    with pytest.raises(ValueError, match="different inputs"):
        TeacherOutputCache.build(teacher, x + 1.0, tmp_path)
    with pytest.raises(ValueError, match="different preprocessing"):
        TeacherOutputCache.build(teacher, x, tmp_path, preprocessing={"scale": 2})
    with pytest.raises(ValueError, match="stale"):
        TeacherOutputCache.open(tmp_path, teacher=other_teacher)
    TeacherOutputCache.open(tmp_path, teacher=teacher, inputs=x)
    rebuilt = TeacherOutputCache.build(other_teacher, x, tmp_path, overwrite=True)
    np.testing.assert_allclose(
        rebuilt.targets(slice(0, 4))["teacher_logits"],
        keras.ops.convert_to_numpy(other_teacher(x[:4])),
        rtol=2e-3,
    )


def test_interrupted_build_is_detected_and_resumed(tmp_path, teacher_batches):
    x, _ = make_data()
    teacher = make_teacher()
    teacher_batches.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        TeacherOutputCache.build(teacher, x, tmp_path, batch_size=16)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["complete"], manifest["rows_written"]) == (False, 32)
    with pytest.raises(ValueError, match="incomplete"):
        TeacherOutputCache(tmp_path)
    teacher_batches.fail_after = None
    cache = TeacherOutputCache.build(teacher, x, tmp_path, batch_size=16)
    assert teacher_batches.batches == 3 + 2  # the 2 missing batches only
    np.testing.assert_allclose(
        cache.targets(slice(None))["teacher_logits"],
        keras.ops.convert_to_numpy(teacher(x)),
        rtol=2e-3,
        atol=1e-3,
    )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"dtype": "int8"}, ValueError, "`dtype`"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"teacher": lambda x: x}, TypeError, "`teacher`"),
        ({"inputs": "not arrays"}, TypeError, "`inputs`"),
    ],
)
def test_bad_build_arguments_are_named(tmp_path, kwargs, error, match):
    x, _ = make_data()
    arguments = {"teacher": make_teacher(), "inputs": x, "directory": tmp_path}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        TeacherOutputCache.build(**arguments)


def test_missing_cache_and_mismatched_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="TeacherOutputCache.build"):
        TeacherOutputCache.open(tmp_path)
    x, y = make_data()
    cache = TeacherOutputCache.build(make_teacher(), x, tmp_path)
    with pytest.raises(ValueError, match="holds 64"):
        cache.dataset(x[:10], y[:10])


def test_pydataset_inputs_are_refused(tmp_path):
    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return np.zeros((2, 3))

    with pytest.raises(TypeError, match="PyDataset"):
        TeacherOutputCache.build(make_teacher(), Batches(), tmp_path)


def test_distiller_with_cache_round_trips_without_teacher(tmp_path):
    x, y = make_data()
    distiller = compiled_distiller(teacher=None)
    cache = TeacherOutputCache.build(make_teacher(), x, tmp_path / "cache")
    distiller.fit(cache.dataset(x, y, batch_size=32), epochs=1, verbose=0)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    assert isinstance(loaded, Distiller) and loaded.teacher is None
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0), rtol=1e-6
    )
