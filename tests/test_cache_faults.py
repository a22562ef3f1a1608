"""The teacher-output cache under faults: concurrent builds, short or damaged
files, a broken manifest, a read-only directory, logits float16 cannot hold.

Each test damages a cache the way a user's disk, copy or job scheduler would,
and checks that the cache then refuses by name (file, rows, fix) or repairs
itself through `build(..., overwrite=True)`, and never trains on wrong rows.
"""

import builtins
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_distill.targets import cache as cache_module
from keras_distill.targets.cache import DamagedCacheError
from keras_distill.targets.cache import TeacherOutputCache
from tests.test_cache import teacher_batches  # noqa: F401 (a fixture)
from tests.test_cache import teacher_logits_of
from tests.test_distiller import compiled_distiller
from tests.test_distiller import make_data
from tests.test_distiller import make_teacher

REPOSITORY = Path(__file__).resolve().parents[1]


def assert_rows_match_teacher(cache, teacher, x, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(
        cache.targets(cache.rows(x))["teacher_logits"],
        teacher_logits_of(teacher, x),
        rtol=rtol,
        atol=atol,
    )


def complete_cache(directory, **kwargs):
    x, _ = make_data()
    teacher = make_teacher()
    kwargs.setdefault("format", "float32")
    TeacherOutputCache.build(teacher, x, directory, **kwargs)
    return teacher, x


# 1. Two builds into one directory.

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from keras_distill.targets.cache import TeacherOutputCache
    from tests.test_distiller import make_data, make_teacher

    directory, barrier = Path(sys.argv[1]), Path(sys.argv[2])
    x, _ = make_data()
    teacher = make_teacher()
    original = TeacherOutputCache._teacher_outputs
    examples = []

    def slow(teacher, batch, *args):
        # Slow enough that the other worker starts while this one writes.
        time.sleep(0.05)
        examples.append(len(batch))
        return original(teacher, batch, *args)

    TeacherOutputCache._teacher_outputs = staticmethod(slow)
    (barrier / f"ready-{os.getpid()}").touch()
    while len(list(barrier.glob("ready-*"))) < 2:
        time.sleep(0.005)
    TeacherOutputCache.build(teacher, x, directory, batch_size=4, format="float32")
    print(json.dumps({"pid": os.getpid(), "examples": sum(examples)}))
    """
)


@pytest.mark.slow
def test_two_processes_building_one_directory_give_one_correct_cache(tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / "cache"), str(barrier)],
            cwd=REPOSITORY,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    # One worker ran the teacher on every example; the other waited for it
    # and reused its complete cache, saying which process it waited for.
    assert sorted(report["examples"] for report in reports) == [0, 64]
    waiter = min(range(2), key=lambda i: reports[i]["examples"])
    builder_pid = reports[1 - waiter]["pid"]
    assert f"pid {builder_pid}" in outputs[waiter][1]
    x, _ = make_data()
    teacher = make_teacher()
    cache = TeacherOutputCache.open(tmp_path / "cache", teacher=teacher, inputs=x)
    assert_rows_match_teacher(cache, teacher, x)


# 2. A data file shorter than the manifest says.


def test_short_data_file_of_an_interrupted_build_is_refused_not_zero_filled(
    tmp_path, teacher_batches  # noqa: F811
):
    x, _ = make_data()
    teacher = make_teacher()
    teacher_batches.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        TeacherOutputCache.build(teacher, x, tmp_path, batch_size=16, format="float32")
    teacher_batches.fail_after = None
    logits = tmp_path / "teacher_logits.bin"
    row_bytes = 5 * 4
    os.truncate(logits, 20 * row_bytes)  # 32 rows committed, 20 on disk
    with pytest.raises(DamagedCacheError, match=r"teacher_logits\.bin.* 20 of the 32"):
        TeacherOutputCache.build(teacher, x, tmp_path, batch_size=16, format="float32")
    assert logits.stat().st_size == 20 * row_bytes  # not extended with zeros
    cache = TeacherOutputCache.build(
        teacher, x, tmp_path, batch_size=16, format="float32", overwrite=True
    )
    assert_rows_match_teacher(cache, teacher, x)


def test_short_data_file_of_a_complete_cache_is_refused_by_name(tmp_path):
    teacher, x = complete_cache(tmp_path)
    os.truncate(tmp_path / "teacher_logits.bin", 40 * 5 * 4)
    for attempt in (
        lambda: TeacherOutputCache.open(tmp_path),
        lambda: TeacherOutputCache.build(teacher, x, tmp_path, format="float32"),
    ):
        with pytest.raises(
            DamagedCacheError, match=r"teacher_logits\.bin.* 40 of the 64 rows"
        ):
            attempt()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, format="float32", overwrite=True)
    assert_rows_match_teacher(cache, teacher, x)


# 3. Bytes damaged inside the data files.


def swap_rows(path, row_bytes, first, second):
    data = bytearray(path.read_bytes())
    a = slice(first * row_bytes, (first + 1) * row_bytes)
    b = slice(second * row_bytes, (second + 1) * row_bytes)
    data[a], data[b] = data[b], data[a]
    path.write_bytes(bytes(data))


def flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,name",
    [
        (lambda d: swap_rows(d / "digest_index.bin", 16, 3, 40), "digest_index.bin"),
        (lambda d: swap_rows(d / "example_digests.bin", 16, 0, 1), "example_digests.bin"),
        (lambda d: swap_rows(d / "digest_rows.bin", 8, 5, 6), "digest_rows.bin"),
        (lambda d: flip_byte(d / "teacher_logits.bin", 700), "teacher_logits.bin"),
    ],
)
def test_damaged_bytes_are_an_error_naming_the_file_and_block(
    tmp_path, monkeypatch, damage, name
):
    # Small blocks, so that the error can name the one that changed.
    monkeypatch.setattr(cache_module, "CHECKSUM_BLOCK_BYTES", 256)
    teacher, x = complete_cache(tmp_path)
    damage(tmp_path)
    block = r"block \d+ \(bytes \d+-\d+\)"
    for attempt in (
        lambda: TeacherOutputCache.open(tmp_path),
        lambda: TeacherOutputCache.open(tmp_path, teacher=teacher, inputs=x),
        lambda: TeacherOutputCache.build(teacher, x, tmp_path, format="float32"),
    ):
        with pytest.raises(DamagedCacheError, match=rf"{name}.*{block}.*overwrite=True"):
            attempt()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, format="float32", overwrite=True)
    assert_rows_match_teacher(cache, teacher, x)


def test_flipped_logit_byte_names_its_block_and_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHECKSUM_BLOCK_BYTES", 256)
    complete_cache(tmp_path)
    flip_byte(tmp_path / "teacher_logits.bin", 700)  # block 2: bytes 512-768
    with pytest.raises(DamagedCacheError, match=r"block 2 \(bytes 512-768\), rows 25-38"):
        TeacherOutputCache(tmp_path)


def test_verify_modes_trade_coverage_for_speed(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHECKSUM_BLOCK_BYTES", 256)
    monkeypatch.setattr(cache_module, "SAMPLE_BLOCKS", 1)
    teacher, x = complete_cache(tmp_path)
    # The index files decide which example gets which row: "sample" checks
    # them whole.
    swap_rows(tmp_path / "digest_index.bin", 16, 3, 40)
    with pytest.raises(DamagedCacheError, match="digest_index.bin"):
        TeacherOutputCache.open(tmp_path, verify="sample")
    swap_rows(tmp_path / "digest_index.bin", 16, 3, 40)
    TeacherOutputCache.open(tmp_path, verify="sample")
    # "none" checks sizes only: a flipped byte passes, a short file does not.
    flip_byte(tmp_path / "teacher_logits.bin", 700)
    TeacherOutputCache.open(tmp_path, verify="none")
    TeacherOutputCache.build(teacher, x, tmp_path, format="float32", verify="none")
    os.truncate(tmp_path / "teacher_logits.bin", 100)
    with pytest.raises(DamagedCacheError, match="teacher_logits.bin"):
        TeacherOutputCache.open(tmp_path, verify="none")
    with pytest.raises(ValueError, match="`verify`"):
        TeacherOutputCache.open(tmp_path, verify="quick")


# 4. A damaged cache is repaired through the API.


def truncate_half(path):
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: (d / "digest_index.bin").unlink(), r"lacks digest_index\.bin"),
        (lambda d: truncate_half(d / "manifest.json"), r"manifest\.json.*unreadable"),
        (lambda d: (d / "manifest.json").write_text("[]"), r"manifest\.json.*unreadable"),
        (
            lambda d: truncate_half(d / "teacher_logits.bin"),
            r"teacher_logits\.bin.* 32 of the 64 rows",
        ),
        (
            lambda d: (d / "teacher_logit_offsets.bin").unlink(),
            r"lacks teacher_logit_offsets\.bin",
        ),
    ],
)
def test_damaged_cache_is_named_and_overwrite_repairs_it(tmp_path, damage, match):
    teacher, x = complete_cache(tmp_path)
    damage(tmp_path)
    for attempt in (
        lambda: TeacherOutputCache.open(tmp_path),
        lambda: TeacherOutputCache.build(teacher, x, tmp_path, format="float32"),
    ):
        with pytest.raises(DamagedCacheError, match=rf"{match}.*overwrite=True"):
            attempt()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, format="float32", overwrite=True)
    assert_rows_match_teacher(cache, teacher, x)
    TeacherOutputCache.open(tmp_path, teacher=teacher, inputs=x)


def test_cache_of_an_older_format_is_refused_and_rebuilt(tmp_path):
    teacher, x = complete_cache(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest = {key: manifest[key] for key in manifest if key not in ("files", "checksum")}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    for attempt in (
        lambda: TeacherOutputCache.open(tmp_path),
        lambda: TeacherOutputCache.build(teacher, x, tmp_path, format="float32"),
    ):
        with pytest.raises(ValueError, match=r"format 2.*overwrite=True"):
            attempt()
    cache = TeacherOutputCache.build(teacher, x, tmp_path, format="float32", overwrite=True)
    assert_rows_match_teacher(cache, teacher, x)


# 5. A complete cache in a read-only directory.


@pytest.fixture
def read_only(monkeypatch):
    """Makes a directory read-only, also for root (who ignores its mode).

    The mode stops writes for other users; for root, the calls that write
    files (`open` for writing, `os.open` with a write flag, truncating,
    renaming and removing) raise `PermissionError` inside the directory.
    """
    guarded = []

    def inside(path):
        return any(
            isinstance(path, (str, os.PathLike))
            and Path(path).resolve().is_relative_to(directory)
            for directory in guarded
        )

    def guard(function, writes=lambda *args, **kwargs: True):
        def guarded_call(path, *args, **kwargs):
            if inside(path) and writes(*args, **kwargs):
                raise PermissionError(f"read-only (test): {path}")
            return function(path, *args, **kwargs)

        return guarded_call

    def open_writes(mode="r", *args, **kwargs):
        return any(flag in mode for flag in "wax+")

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open_writes(flags, *args, **kwargs):
        return bool(flags & write_flags)

    guarded_open = guard(builtins.open, open_writes)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guard(os.open, os_open_writes))
    for name in ("truncate", "replace", "rename", "remove", "unlink"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    modes = {}

    def make_read_only(directory):
        directory = Path(directory).resolve()
        for path in [directory, *directory.iterdir()]:
            modes[path] = path.stat().st_mode
            path.chmod(0o555 if path.is_dir() else 0o444)
        guarded.append(directory)

    yield make_read_only
    for path, mode in modes.items():
        path.chmod(mode)


def snapshot(directory):
    return {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(Path(directory).iterdir())
    }


def test_complete_cache_in_a_read_only_directory_is_returned_unchanged(
    tmp_path, read_only, teacher_batches  # noqa: F811
):
    teacher, x = complete_cache(tmp_path / "cache")
    before = snapshot(tmp_path / "cache")
    read_only(tmp_path / "cache")
    with pytest.raises(PermissionError):
        open(tmp_path / "cache" / "probe", "w")  # the guard works
    cache = TeacherOutputCache.build(teacher, x[::-1], tmp_path / "cache", format="float32")
    assert teacher_batches.batches == 1  # the first build only
    assert_rows_match_teacher(cache, teacher, x)
    TeacherOutputCache.open(tmp_path / "cache", teacher=teacher, inputs=x)
    # Refusals stay refusals, not write errors.
    with pytest.raises(ValueError, match="different teacher weights"):
        TeacherOutputCache.build(make_teacher(seed=7), x, tmp_path / "cache")
    with pytest.raises(ValueError, match="different inputs"):
        TeacherOutputCache.build(teacher, x[:10], tmp_path / "cache", format="float32")
    assert snapshot(tmp_path / "cache") == before


# 6. Logits float16 cannot hold as they are.


def shifted_teacher(bias):
    """`make_teacher`'s logits plus a per-class bias."""
    teacher = make_teacher()
    dense = teacher.layers[-1]
    dense.bias.assign(keras.ops.convert_to_numpy(dense.bias) + np.asarray(bias, "float32"))
    return teacher


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("offset", [1000.0, 1e5])
def test_float16_keeps_the_distribution_of_large_logits(tmp_path, offset):
    x, y = make_data()
    teacher = shifted_teacher(offset)
    cache = TeacherOutputCache.build(teacher, x, tmp_path)  # float16
    stored = cache.targets(cache.rows(x))["teacher_logits"]
    expected = teacher_logits_of(teacher, x)
    assert np.isfinite(stored).all()
    total_variation = 0.5 * np.abs(softmax(stored) - softmax(expected)).sum(axis=-1)
    assert total_variation.max() < 1e-3
    np.testing.assert_allclose(stored, expected, rtol=1e-5)
    # The distillation loss is the online one (softmax is shift-invariant,
    # and the stored logits are the teacher's up to float16 rounding).
    online = compiled_distiller(teacher=teacher)
    expected_loss = online.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    offline = compiled_distiller(teacher=None, student=online.student)
    actual = offline.evaluate(
        cache.dataset(x, y, batch_size=16, shuffle=False), return_dict=True, verbose=0
    )
    assert actual["distillation_loss"] == pytest.approx(
        expected_loss["distillation_loss"], rel=2e-3
    )


@pytest.mark.parametrize("top_k", [None, 5])
def test_logits_float16_cannot_hold_are_refused_and_float32_keeps_them(
    tmp_path, top_k
):
    x, _ = make_data()
    teacher = shifted_teacher([0.0, -7e4, 0.0, 0.0, 0.0])  # a span beyond 65,504
    with pytest.raises(ValueError, match='float16.*format="float32"'):
        TeacherOutputCache.build(teacher, x, tmp_path / "f16", top_k=top_k)
    cache = TeacherOutputCache.build(
        teacher, x, tmp_path / "f32", top_k=top_k, format="float32"
    )
    targets = cache.targets(cache.rows(x))
    if top_k is None:
        np.testing.assert_allclose(
            targets["teacher_logits"], teacher_logits_of(teacher, x), rtol=1e-6, atol=1e-6
        )
    else:
        assert np.isfinite(targets["teacher_top_log_probs"]).all()
        assert targets["teacher_top_log_probs"].min() < -6e4
