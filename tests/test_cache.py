"""The teacher-output cache: same loss as online, any input pipeline, fingerprints, resumption."""

import hashlib
import json

import keras
import numpy as np
import pytest

from keras_distill import Distiller
from keras_distill.targets.cache import TeacherOutputCache
from keras_distill.targets.cache import example_digests
from keras_distill.targets.cache import teacher_fingerprint
from keras_distill.targets.codec import top_k_total_variation
from keras_distill.targets.top_k import top_k_teacher_targets
from tests.test_distiller import compiled_distiller
from tests.test_distiller import make_data
from tests.test_distiller import make_student
from tests.test_distiller import make_teacher


@pytest.fixture
def teacher_batches(monkeypatch):
    """Counts the cache's teacher batches and examples; can interrupt after some."""

    class Counter:
        batches = 0
        examples = 0
        fail_after = None

    original = TeacherOutputCache._teacher_outputs

    def counted(teacher, batch, *args):
        Counter.batches += 1
        if Counter.fail_after is not None and Counter.batches > Counter.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        Counter.examples += len(keras.tree.flatten(batch)[0])
        return original(teacher, batch, *args)

    monkeypatch.setattr(TeacherOutputCache, "_teacher_outputs", staticmethod(counted))
    return Counter


class Batches(keras.utils.PyDataset):
    """Batches of `(x, y)`, reshuffled every epoch, optionally augmented."""

    def __init__(self, x, y, batch_size=16, augment=False, seed=0):
        super().__init__()
        self.x, self.y, self.batch_size, self.augment = x, y, batch_size, augment
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(x))

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.x))

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = self.x[rows]
        if self.augment:
            x = x + self.rng.normal(scale=0.1, size=x.shape).astype("float32")
        return x, self.y[rows]


def teacher_logits_of(teacher, x):
    return keras.ops.convert_to_numpy(teacher(x))


def check_batches_match_teacher(batches, teacher, x, y, atol=1e-6):
    """Every batch carries its own examples' labels and teacher logits.

    Logits are stored relative to each row's largest, so a logit's rounding
    error scales with its distance from that maximum, not with its own size.
    """
    seen = []
    for inputs, targets in batches:
        inputs = np.asarray(inputs)
        rows = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in inputs]
        np.testing.assert_array_equal(np.asarray(targets["labels"]), y[rows])
        np.testing.assert_allclose(
            np.asarray(targets["teacher_logits"]),
            teacher_logits_of(teacher, inputs),
            rtol=1e-6,
            atol=atol,
        )
        seen.extend(rows)
    return seen


@pytest.mark.parametrize("format", ["float32", "float16"])
def test_cached_loss_equals_online_loss_on_the_same_batch(tmp_path, format):
    x, y = make_data()
    online = compiled_distiller()
    expected = online.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    cache = TeacherOutputCache.build(online.teacher, x, tmp_path, format=format)
    assert all(isinstance(a, np.memmap) for a in cache.arrays.values())
    offline = compiled_distiller(teacher=None, student=online.student)
    batches = cache.dataset(x, y, batch_size=16, shuffle=False)
    actual = offline.evaluate(batches, return_dict=True, verbose=0)
    tolerance = 1e-6 if format == "float32" else 2e-3
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=tolerance), key


def test_shuffled_batches_keep_each_example_with_its_own_outputs(tmp_path):
    x, y = make_data()
    teacher = make_teacher()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, format="float32")
    batches = cache.dataset(x, y, batch_size=10, shuffle=True, seed=0)
    seen = []
    for _ in range(2):
        seen += check_batches_match_teacher(
            [batches[i] for i in range(len(batches))], teacher, x, y
        )
        batches.on_epoch_end()
    assert sorted(seen[:64]) == list(range(64))
    assert seen[:64] != seen[64:]  # a new order each epoch


def test_examples_are_found_by_content_in_any_order_or_subset(tmp_path):
    x, y = make_data()
    teacher = make_teacher()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, format="float32")
    order = np.random.default_rng(3).permutation(64)[:20]
    np.testing.assert_array_equal(cache.rows(x[order]), order)
    batches = cache.dataset(x[order], y[order], batch_size=7, shuffle=False)
    seen = check_batches_match_teacher(
        [batches[i] for i in range(len(batches))], teacher, x, y
    )
    assert sorted(seen) == sorted(order.tolist())
    with pytest.raises(KeyError, match="not in the teacher-output cache"):
        cache.dataset(x + 1.0, y)


def test_example_digests_see_bytes_dtype_shape_and_structure():
    x = np.arange(12, dtype="float32").reshape(3, 4)
    digests = example_digests(x)
    assert len(set(digests.tolist())) == 3
    np.testing.assert_array_equal(example_digests(x[[2, 0]]), digests[[2, 0]])
    assert example_digests(x.astype("float64"))[0] != digests[0]
    assert example_digests(x.reshape(3, 2, 2))[0] != digests[0]
    assert example_digests({"a": x})[0] != example_digests({"b": x})[0]
    pair = example_digests({"ids": x, "mask": x > 5})
    assert pair[1] != example_digests({"ids": x, "mask": x > 4})[1]


def test_pydataset_that_reshuffles_gives_online_loss_and_own_outputs(
    tmp_path, teacher_batches
):
    x, y = make_data()
    online = compiled_distiller()
    cache = TeacherOutputCache.build(online.teacher, Batches(x, y), tmp_path)
    assert teacher_batches.batches == 4  # one pass (the determinism probe reads only)
    batches = cache.dataset(Batches(x, y, seed=1))
    batches.on_epoch_end()  # a new order, not the one the cache was built in
    check_batches_match_teacher(
        [batches[i] for i in range(len(batches))], online.teacher, x, y, atol=2e-3
    )
    expected = online.evaluate(Batches(x, y), return_dict=True, verbose=0)
    offline = compiled_distiller(teacher=None, student=online.student)
    actual = offline.evaluate(batches, return_dict=True, verbose=0)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=2e-3), key


def test_tf_data_pipeline_shuffled_after_the_cache_gives_online_loss(tmp_path):
    tf = pytest.importorskip("tensorflow")
    x, y = make_data()
    online = compiled_distiller()
    pipeline = tf.data.Dataset.from_tensor_slices((x, y))
    cache = TeacherOutputCache.build(
        online.teacher, pipeline.batch(16), tmp_path, format="float32"
    )
    shuffled = cache.dataset(pipeline.shuffle(64, seed=0).batch(10))
    seen = check_batches_match_teacher(
        shuffled.as_numpy_iterator(), online.teacher, x, y
    )
    assert sorted(seen) == list(range(64)) and seen != list(range(64))
    expected = online.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    offline = compiled_distiller(teacher=None, student=online.student)
    actual = offline.evaluate(
        cache.dataset(pipeline.batch(16)), return_dict=True, verbose=0
    )
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-5), key
    history = offline.fit(shuffled, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_generator_of_batches_builds_and_trains(tmp_path, teacher_batches):
    x, y = make_data()
    teacher = make_teacher()

    def batches(order):
        for begin in range(0, 64, 16):
            rows = order[begin : begin + 16]
            yield x[rows], y[rows], np.ones(len(rows), "float32")

    cache = TeacherOutputCache.build(
        teacher, batches(np.arange(64)), tmp_path, format="float32"
    )
    assert (teacher_batches.batches, cache.num_examples) == (4, 64)
    reversed_batches = list(cache.dataset(batches(np.arange(64)[::-1])))
    assert len(reversed_batches) == 4 and len(reversed_batches[0]) == 3
    check_batches_match_teacher(
        [batch[:2] for batch in reversed_batches], teacher, x, y
    )
    distiller = compiled_distiller(teacher=None)
    history = distiller.fit(
        cache.dataset(batches(np.arange(64))), epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()


def test_random_pipelines_are_refused(tmp_path):
    x, y = make_data()
    teacher = make_teacher()
    with pytest.raises(ValueError, match="two reads of its first batch differ"):
        TeacherOutputCache.build(teacher, Batches(x, y, augment=True), tmp_path)
    with pytest.raises(ValueError, match="random layers"):
        TeacherOutputCache.build(
            teacher, x, tmp_path, preprocessing=[keras.layers.GaussianNoise(0.1)]
        )
    with pytest.raises(ValueError, match="random layers"):
        TeacherOutputCache.build(
            teacher,
            x,
            tmp_path,
            preprocessing=keras.Sequential([keras.layers.RandomFlip()]),
        )
    # A generator cannot be read twice: augmentation shows when training.
    cache = TeacherOutputCache.build(teacher, x, tmp_path)
    augmented = cache.dataset(Batches(x, y, augment=True))
    with pytest.raises(KeyError, match="random augmentation"):
        augmented[0]


def test_random_tf_data_pipelines_are_refused(tmp_path):
    tf = pytest.importorskip("tensorflow")
    x, _ = make_data()
    generator = tf.random.Generator.from_seed(0)  # advances across passes
    noisy = (
        tf.data.Dataset.from_tensor_slices(x)
        .map(lambda image: image + generator.normal(tf.shape(image)))
        .batch(16)
    )
    reshuffled = tf.data.Dataset.from_tensor_slices(x).shuffle(64).batch(16)
    for pipeline in (noisy, reshuffled):
        with pytest.raises(ValueError, match="two reads of its first batch differ"):
            TeacherOutputCache.build(make_teacher(), pipeline, tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_teacher_fingerprint_is_the_sha256_of_the_weights_bytes(dtype):
    # Read in place rather than copied: the digest must stay the one caches
    # were built with (the bytes `convert_to_numpy` gives), bfloat16 (which
    # NumPy's buffer protocol refuses) included, and change with any weight.
    teacher = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, dtype=dtype), keras.layers.Dense(2)]
    )
    reference = hashlib.sha256()
    for weight in teacher.weights:
        array = keras.ops.convert_to_numpy(weight)
        name = array.dtype.name if array.dtype.kind == "V" else array.dtype.str
        reference.update(str((name, array.shape)).encode())
        reference.update(np.ascontiguousarray(array).tobytes())
    assert teacher_fingerprint(teacher) == reference.hexdigest()
    kernel = keras.ops.convert_to_numpy(teacher.weights[0]).copy()
    kernel[2, 1] += 1
    teacher.weights[0].assign(kernel)
    assert teacher_fingerprint(teacher) != reference.hexdigest()


def test_deterministic_preprocessing_layers_are_fingerprinted(tmp_path):
    x, _ = make_data()
    teacher = make_teacher()
    scale = keras.layers.Rescaling(2.0)
    TeacherOutputCache.build(teacher, x, tmp_path, preprocessing=[scale])
    TeacherOutputCache.open(tmp_path, teacher, x, preprocessing=[scale])
    with pytest.raises(ValueError, match="different preprocessing"):
        TeacherOutputCache.build(
            teacher, x, tmp_path, preprocessing=[keras.layers.Rescaling(3.0)]
        )


def test_training_from_the_cache_gives_the_online_students_weights(
    tmp_path, teacher_batches
):
    x, y = make_data()
    teacher = make_teacher()
    cache = TeacherOutputCache.build(
        teacher, x, tmp_path, batch_size=16, format="float32"
    )
    assert teacher_batches.batches == 4
    online = compiled_distiller(teacher=teacher, student=make_student())
    online.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    offline = compiled_distiller(teacher=None, student=make_student())
    # Keras shuffles a PyDataset's batch order unless told not to.
    offline.fit(
        cache.dataset(x, y, batch_size=16, shuffle=False),
        epochs=3,
        shuffle=False,
        verbose=0,
    )
    for expected, actual in zip(
        online.student.get_weights(), offline.student.get_weights()
    ):
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_top_k_cache_trains_the_distiller(tmp_path):
    x, y = make_data()
    teacher = make_teacher()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, top_k=3)
    assert cache.arrays["teacher_top_indices"].dtype == np.uint8
    assert cache.arrays["teacher_top_log_probs"].shape == (64, 3)
    distiller = compiled_distiller(teacher=None)
    history = distiller.fit(cache.dataset(x, y, batch_size=16), epochs=2, verbose=0)
    assert np.isfinite(history.history["distillation_loss"]).all()


def test_top_k_targets_are_taken_in_the_teachers_compiled_step(tmp_path, monkeypatch):
    x, _ = make_data()
    teacher = make_teacher()
    expected_log_probs, expected_indices = top_k_teacher_targets(
        teacher.predict(x, verbose=0), 3
    )
    weights = len(teacher.weights)

    def no_dense_logits(*args, **kwargs):
        raise AssertionError("the dense logits were brought to the host")

    monkeypatch.setattr(teacher, "predict_on_batch", no_dense_logits)
    for directory in ("first", "second"):
        cache = TeacherOutputCache.build(
            teacher, x, tmp_path / directory, top_k=3, format="float32", batch_size=16
        )
    targets = cache.targets(cache.rows(x))
    np.testing.assert_array_equal(
        targets["teacher_top_indices"], keras.ops.convert_to_numpy(expected_indices)
    )
    np.testing.assert_allclose(
        targets["teacher_top_log_probs"],
        keras.ops.convert_to_numpy(expected_log_probs),
        rtol=1e-6,
        atol=1e-6,
    )
    # One predictor per (teacher, k), compiled once, and invisible to the
    # teacher's weights (hence to its fingerprint).
    predictor = teacher.__dict__["_keras_distill_top_k"][3]
    assert predictor.predict_function is not None
    assert list(teacher.__dict__["_keras_distill_top_k"]) == [3]
    assert len(teacher.weights) == weights


VOCABULARY = 300
SEQUENCE = 6


def make_language_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((SEQUENCE,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, 16),
            keras.layers.Dense(VOCABULARY),
        ]
    )


def make_tokens(n=24):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCABULARY, (n, SEQUENCE + 1)).astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def test_compact_top_k_cache_matches_the_teacher_and_trains(tmp_path):
    x, y = make_tokens()
    teacher = make_language_model(seed=1)
    compact = TeacherOutputCache.build(
        teacher, x, tmp_path / "compact", top_k=32, format="compact", batch_size=10
    )
    assert all(isinstance(a, np.memmap) for a in compact.arrays.values())
    order = np.array([5, 17, 0, 23])
    targets = compact.targets(compact.rows(x[order]))
    assert targets["teacher_top_log_probs"].shape == (4, SEQUENCE, 32)
    log_probs, indices = top_k_teacher_targets(teacher.predict(x[order], verbose=0), 32)
    log_probs = keras.ops.convert_to_numpy(log_probs).reshape(-1, 32)
    indices = keras.ops.convert_to_numpy(indices).reshape(-1, 32)
    decoded_indices = targets["teacher_top_indices"].reshape(-1, 32)
    np.testing.assert_array_equal(decoded_indices, np.sort(indices, axis=-1))
    assert top_k_total_variation(
        log_probs, indices, targets["teacher_top_log_probs"].reshape(-1, 32), decoded_indices
    ).max() <= 1e-3
    stored = sum(f.stat().st_size for f in (tmp_path / "compact").glob("compact_*"))
    plain = TeacherOutputCache.build(
        teacher, x, tmp_path / "plain", top_k=32, format="float32"
    )
    # Smaller than float16 values + uint16 indices even for this untrained
    # teacher's flat distributions (sizes at scale: tests/test_codec.py).
    assert stored < 24 * SEQUENCE * 32 * (2 + 2)

    # The distillation loss from compact targets is the float32 one's, up to
    # the values' rounding (a total variation of at most 1e-3 per position).
    student = make_language_model(seed=2)
    losses = {}
    for name, cache in (("compact", compact), ("plain", plain)):
        distiller = compiled_distiller(teacher=None, student=student)
        batches = cache.dataset(x, y, batch_size=8, shuffle=False)
        losses[name] = distiller.evaluate(batches, return_dict=True, verbose=0)
    assert losses["compact"]["distillation_loss"] == pytest.approx(
        losses["plain"]["distillation_loss"], rel=1e-3
    )
    assert losses["compact"]["student_loss"] == losses["plain"]["student_loss"]
    # Training from either moves the student the same way: the rounding
    # changes the training update by well under 1% of its size.
    initial = make_language_model(seed=2).get_weights()
    updates = {}
    for name, cache in (("compact", compact), ("plain", plain)):
        distiller = compiled_distiller(
            teacher=None, student=make_language_model(seed=2)
        )
        distiller.fit(
            cache.dataset(x, y, batch_size=8, shuffle=False),
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        updates[name] = np.concatenate(
            [
                (after - before).ravel()
                for after, before in zip(distiller.student.get_weights(), initial)
            ]
        )
    difference = np.linalg.norm(updates["compact"] - updates["plain"])
    assert difference < 0.01 * np.linalg.norm(updates["plain"])


def test_interrupted_compact_build_is_resumed(tmp_path, teacher_batches):
    x, _ = make_tokens()
    teacher = make_language_model(seed=1)
    teacher_batches.fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        TeacherOutputCache.build(teacher, x, tmp_path, top_k=8, format="compact", batch_size=10)
    with open(tmp_path / "compact_payload.bin", "ab") as file:
        file.write(b"\xff" * 100)  # bytes of a batch never committed
    teacher_batches.fail_after = None
    cache = TeacherOutputCache.build(
        teacher, x, tmp_path, top_k=8, format="compact", batch_size=10
    )
    assert teacher_batches.examples == 24
    fresh = TeacherOutputCache.build(
        teacher, x, tmp_path / "fresh", top_k=8, format="compact", batch_size=24
    )
    for name, values in fresh.targets(fresh.rows(x)).items():
        np.testing.assert_array_equal(cache.targets(cache.rows(x))[name], values)


def test_complete_cache_is_reused_and_stale_cache_refused(
    tmp_path, teacher_batches
):
    x, _ = make_data()
    teacher = make_teacher()
    TeacherOutputCache.build(teacher, x, tmp_path)
    assert teacher_batches.batches == 1
    same_weights = keras.models.clone_model(teacher)
    same_weights.set_weights(teacher.get_weights())
    TeacherOutputCache.build(same_weights, x[::-1], tmp_path, batch_size=8)
    assert teacher_batches.batches == 1  # same examples: nothing recomputed
    other_teacher = make_teacher(seed=7)
    with pytest.raises(ValueError, match="different teacher weights"):
        TeacherOutputCache.build(other_teacher, x, tmp_path)
    with pytest.raises(ValueError, match="different inputs"):
        TeacherOutputCache.build(teacher, x + 1.0, tmp_path)
    with pytest.raises(ValueError, match="different inputs"):
        TeacherOutputCache.build(teacher, x[:10], tmp_path)  # a subset
    with pytest.raises(ValueError, match="different preprocessing"):
        TeacherOutputCache.build(teacher, x, tmp_path, preprocessing={"scale": 2})
    with pytest.raises(ValueError, match="storage format"):
        TeacherOutputCache.build(teacher, x, tmp_path, format="float32")
    with pytest.raises(ValueError, match="stale.*teacher weights"):
        TeacherOutputCache.open(tmp_path, teacher=other_teacher)
    with pytest.raises(ValueError, match="stale.*inputs"):
        TeacherOutputCache.open(tmp_path, inputs=x[:10])
    TeacherOutputCache.open(tmp_path, teacher=teacher, inputs=x)
    assert teacher_batches.batches == 1
    rebuilt = TeacherOutputCache.build(other_teacher, x, tmp_path, overwrite=True)
    np.testing.assert_allclose(
        rebuilt.targets(slice(0, 4))["teacher_logits"],
        teacher_logits_of(other_teacher, x[:4]),
        atol=2e-3,
    )


def test_overwrite_with_new_inputs_runs_the_teacher_on_new_examples_only(
    tmp_path, teacher_batches
):
    x, _ = make_data()
    teacher = make_teacher()
    TeacherOutputCache.build(teacher, x[:40], tmp_path, format="float32")
    cache = TeacherOutputCache.build(
        teacher, x, tmp_path, format="float32", overwrite=True
    )
    assert teacher_batches.examples == 40 + 24
    np.testing.assert_allclose(
        cache.targets(cache.rows(x))["teacher_logits"],
        teacher_logits_of(teacher, x),
        rtol=1e-6,
        atol=1e-6,
    )
    TeacherOutputCache.open(tmp_path, inputs=x)


@pytest.mark.parametrize("stream", [False, True])
def test_interrupted_build_is_detected_and_resumed(
    tmp_path, teacher_batches, stream
):
    x, y = make_data()
    teacher = make_teacher()
    inputs = (lambda: Batches(x, y)) if stream else (lambda: x)
    teacher_batches.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        TeacherOutputCache.build(teacher, inputs(), tmp_path, batch_size=16)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["complete"], manifest["rows_written"]) == (False, 32)
    # Bytes written after the last commit (a crash mid-batch) are dropped.
    with open(tmp_path / "teacher_logits.bin", "ab") as file:
        file.write(b"\x00" * 100)
    with pytest.raises(ValueError, match="incomplete"):
        TeacherOutputCache(tmp_path)
    with pytest.raises(ValueError, match="incomplete"):
        TeacherOutputCache.open(tmp_path)
    teacher_batches.fail_after = None
    cache = TeacherOutputCache.build(teacher, inputs(), tmp_path, batch_size=16)
    assert teacher_batches.batches == 3 + 2  # the 2 missing batches only
    assert teacher_batches.examples == 64
    np.testing.assert_allclose(
        cache.targets(cache.rows(x))["teacher_logits"],
        teacher_logits_of(teacher, x),
        rtol=2e-3,
        atol=1e-3,
    )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"format": "int8"}, ValueError, "`format`"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"top_k": 0}, ValueError, "`top_k`"),
        ({"format": "compact"}, ValueError, "pass `top_k`"),
        ({"teacher": lambda x: x}, TypeError, "`teacher`"),
        ({"inputs": "not arrays"}, TypeError, "`inputs`"),
        ({"inputs": np.array(["a", "b"])}, TypeError, "numeric"),
        ({"inputs": np.zeros((0, 8), "float32")}, ValueError, "no examples"),
        ({"preprocessing": object()}, TypeError, "`preprocessing`"),
    ],
)
def test_bad_build_arguments_are_named(tmp_path, kwargs, error, match):
    x, _ = make_data()
    arguments = {"teacher": make_teacher(), "inputs": x, "directory": tmp_path}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        TeacherOutputCache.build(**arguments)


def test_bad_dataset_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="TeacherOutputCache.build"):
        TeacherOutputCache.open(tmp_path)
    x, y = make_data()
    cache = TeacherOutputCache.build(make_teacher(), x, tmp_path)
    with pytest.raises(ValueError, match="`labels` has 10 rows"):
        cache.dataset(x, y[:10])
    with pytest.raises(ValueError, match="apply to NumPy inputs only"):
        cache.dataset(Batches(x, y), batch_size=8)
    with pytest.raises(ValueError, match="`batch_size`"):
        cache.dataset(x, y, batch_size=0)
    with pytest.raises(TypeError, match="`batch_size`"):
        cache.dataset(x, y, batch_size=8.0)


def test_infinite_pydataset_is_refused(tmp_path):
    class Endless(keras.utils.PyDataset):
        @property
        def num_batches(self):
            return None

        def __getitem__(self, index):
            return np.zeros((2, 8), "float32")

    with pytest.raises(ValueError, match="infinite"):
        TeacherOutputCache.build(make_teacher(), Endless(), tmp_path)


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
