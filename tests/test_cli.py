"""Tests for the `keras-distill` command (`keras_distill/cli.py`)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_distill import cli
from keras_distill.targets.cache import TeacherOutputCache

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / ".." / "shared" / "data"


def _one_line_error(capsys, *fragments):
    """The single stderr line of a failed command, checked for `fragments`."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_help_explains_the_commands_and_options(capsys):
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    for command in ("mnist", "sentiment", "gemma", "cache"):
        assert command in printed
    assert "teacher" in printed and "student" in printed
    assert "keras-distill mnist --quick" in printed


def test_example_help_lists_common_and_example_options(capsys):
    assert cli.main(["mnist", "--help"]) == 0
    printed = capsys.readouterr().out
    for option in ("--backend", "--epochs", "--seeds", "--output-dir",
                   "--data-dir", "--quick"):
        assert option in printed
    # The example's own options, e.g. the MNIST recipe.
    assert "options of examples/mnist_distillation.py" in printed
    assert "--recipe" in printed


@pytest.mark.parametrize(
    "argv, fragments",
    [
        ([], ["choose a command", "mnist"]),
        (["train"], ["invalid choice: 'train'", "--help"]),
        (["mnist", "--epochs", "0"], ["--epochs", "at least 1"]),
        (["mnist", "--epochs", "two"], ["--epochs", "whole number"]),
        (["mnist", "--backend", "numpy"], ["--backend", "invalid choice"]),
        (["mnist", "--seeds"], ["--seeds", "expected at least one"]),
        (["mnist", "--recipe", "best"], ["--recipe", "invalid choice"]),
        (["mnist", "--unknown-flag"], ["unrecognized arguments",
                                       "--unknown-flag"]),
        (["mnist", "--data-dir", "/no/such/folder"], ["--data-dir",
                                                      "not a folder"]),
        (["cache"], ["--teacher", "required"]),
        (["cache", "--teacher", "t.keras", "--extra"], ["--extra"]),
        (["cache", "--teacher", "missing.keras"], ["--teacher",
                                                   "does not exist"]),
    ],
)
def test_bad_options_are_one_line_errors_with_status_2(argv, fragments,
                                                       capsys):
    assert cli.main(argv) == 2
    line = _one_line_error(capsys, *fragments)
    assert line.startswith("keras-distill")


def test_missing_data_file_is_a_one_line_error(tmp_path, capsys):
    assert cli.main([
        "sentiment", "--quick", "--data-dir", str(tmp_path), "--output-dir",
        str(tmp_path / "out"),
    ]) == 2
    _one_line_error(
        capsys, "keras-distill sentiment: error:", "Sentences_AllAgree.txt",
        "--data-dir",
    )


def test_teacher_that_is_not_a_keras_file(tmp_path, capsys):
    path = tmp_path / "teacher.h5"
    path.write_bytes(b"")
    assert cli.main(["cache", "--teacher", str(path)]) == 2
    _one_line_error(capsys, "not a .keras file")


def test_missing_example_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    # Neither the installed subpackage nor a source checkout's examples/.
    monkeypatch.setitem(sys.modules, "keras_distill.examples", None)
    monkeypatch.delitem(
        sys.modules, "keras_distill.examples.gemma_distillation", raising=False
    )
    monkeypatch.setattr(cli, "_EXAMPLES_DIR", tmp_path)
    assert cli.main(["gemma", "--quick"]) == 2
    _one_line_error(
        capsys, "keras-distill gemma: error:", "gemma_distillation.py",
        "not part of this installation",
    )


def test_example_commands_forward_the_options(monkeypatch, tmp_path, capsys):
    calls = []

    def main(argv):
        calls.append(argv)
        (tmp_path / "results.json").write_text("{}")

    stub = types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(
            output_dir=str(tmp_path), epochs=None, seeds=[0, 1, 2]
        ),
        main=main,
    )
    monkeypatch.setattr(cli, "load_example", lambda name: stub)
    (tmp_path / "curves.png").write_bytes(b"")
    status = cli.main([
        "sentiment", "--epochs", "3", "--seeds", "4", "5", "--quick",
        "--output-dir", str(tmp_path), "--data-dir", str(tmp_path),
        "--temperature", "2",
    ])
    assert status == 0
    assert calls == [[
        "--epochs", "3", "--output-dir", str(tmp_path), "--data-dir",
        str(tmp_path), "--seeds", "4", "5", "--quick", "--temperature", "2",
    ]]
    assert f"Wrote curves.png, results.json to {tmp_path}/" in (
        capsys.readouterr().out
    )


def test_examples_with_other_option_names(monkeypatch):
    calls = []
    stub = types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(
            output_dir="runs/x", student_epochs=3, seed=0
        ),
        main=calls.append,
    )
    monkeypatch.setattr(cli, "load_example", lambda name: stub)
    monkeypatch.setattr(cli, "_report_outputs", lambda output_dir: None)
    assert cli.main(["gemma", "--epochs", "2", "--seeds", "7"]) == 0
    assert calls == [["--student-epochs", "2", "--seed", "7"]]


def test_several_seeds_for_a_one_seed_example(monkeypatch, capsys):
    stub = types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(seed=0, epochs=1),
        main=lambda argv: None,
    )
    monkeypatch.setattr(cli, "load_example", lambda name: stub)
    assert cli.main(["gemma", "--seeds", "0", "1"]) == 2
    _one_line_error(capsys, "--seeds", "one seed at a time")


def test_every_example_command_dispatches_to_its_script():
    for command, (module_name, _) in cli.EXAMPLES.items():
        if not (REPO_ROOT / "examples" / f"{module_name}.py").is_file():
            continue  # being written; covered by the missing-example test
        module = cli.load_example(module_name)
        assert callable(module.main), command


def test_same_backend_does_not_restart(monkeypatch):
    def execve(*args):
        raise AssertionError("re-executed for the backend already running")

    monkeypatch.setattr(os, "execve", execve)
    cli._switch_backend(keras.backend.backend(), [])
    cli._switch_backend(None, [])


def _other_backend():
    backends = [b for b in cli.BACKENDS if b != keras.backend.backend()]
    return backends[0]


def test_other_backend_restarts_with_keras_backend_set(monkeypatch):
    calls = []

    def execve(path, argv, environment):
        calls.append((path, argv, environment))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv(cli._REEXEC_MARKER, raising=False)
    backend = _other_backend()
    with pytest.raises(SystemExit):
        cli._switch_backend(backend, ["mnist", "--backend", backend])
    path, argv, environment = calls[0]
    assert path == sys.executable
    assert argv[1:] == ["-m", "keras_distill.cli", "mnist", "--backend",
                        backend]
    assert environment["KERAS_BACKEND"] == backend


def test_uninstalled_or_ineffective_backend_is_a_one_line_error(
    monkeypatch, capsys
):
    backend = _other_backend()
    monkeypatch.delenv(cli._REEXEC_MARKER, raising=False)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["cache", "--teacher", "t.keras", "--backend",
                     backend]) == 2
    _one_line_error(capsys, f"--backend {backend} needs", "pip install")
    # After a restart that did not switch, it stops instead of looping.
    monkeypatch.setenv(cli._REEXEC_MARKER, backend)
    assert cli.main(["cache", "--teacher", "t.keras", "--backend",
                     backend]) == 2
    _one_line_error(capsys, "did not take effect")


def test_cache_command_stores_the_teachers_logits(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(),
         keras.layers.Dense(10)]
    )
    teacher_path = tmp_path / "teacher.keras"
    teacher.save(teacher_path)
    cache_dir = tmp_path / "cache"
    status = cli.main([
        "cache", "--teacher", str(teacher_path), "--output-dir",
        str(cache_dir), "--data-dir", str(DATA_DIR), "--batch-size", "1000",
    ])
    assert status == 0, capsys.readouterr().err
    assert "Cached teacher outputs of" in capsys.readouterr().out

    from keras_distill.examples.datasets import load_mnist

    (x_train, _), _ = load_mnist(DATA_DIR)
    # Opening with the teacher, the inputs and the preprocessing checks the
    # cache's fingerprint against all three.
    cache = TeacherOutputCache.open(
        cache_dir, teacher=teacher, inputs=x_train,
        preprocessing=cli.MNIST_PREPROCESSING,
    )
    picks = x_train[::997]
    stored = cache.targets(cache.rows(picks))["teacher_logits"]
    expected = keras.ops.convert_to_numpy(teacher(picks))
    # float16 storage: about three significant digits.
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_backend_option_runs_the_example_on_that_backend(tmp_path):
    """End to end in a new process: restart, training, table, JSON, PNGs."""
    backend = _other_backend()
    environment = {k: v for k, v in os.environ.items()
                   if k != cli._REEXEC_MARKER}
    completed = subprocess.run(
        [
            sys.executable, "-m", "keras_distill.cli", "mnist", "--backend",
            backend, "--quick", "--seeds", "0", "--epochs", "1",
            "--output-dir", str(tmp_path), "--data-dir", str(DATA_DIR),
        ],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"running on the {backend} backend" in completed.stdout
    assert "distilled student" in completed.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == backend
    assert results["student_epochs"] == 1 and results["seeds"] == [0]
    for name in ("softened_distributions.png", "learning_curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "Wrote " in completed.stdout


# ---- what slipped through (issue 14) ----


def _stub_example(monkeypatch, output_dir, **options):
    """An example that records its runs and writes results.json."""
    runs = []

    def main(argv):
        runs.append(argv)
        (Path(output_dir) / "results.json").write_text('{"run": "new"}')

    namespace = dict(output_dir=str(output_dir), epochs=None, seeds=[0])
    namespace.update(options)
    stub = types.SimpleNamespace(
        parse_args=lambda argv: types.SimpleNamespace(**namespace), main=main
    )
    monkeypatch.setattr(cli, "load_example", lambda name: stub)
    return runs


@pytest.mark.parametrize("command", ["mnist", "cache"])
@pytest.mark.parametrize("problem", ["file", "under a file", "read-only"])
def test_unwritable_output_dir_fails_before_any_work(
    command, problem, monkeypatch, tmp_path, capsys
):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    output_dir = {"file": blocker, "under a file": blocker / "out",
                  "read-only": tmp_path}[problem]
    if problem == "read-only":
        # Root may write anywhere: the permission itself is simulated.
        monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    runs = _stub_example(monkeypatch, output_dir)
    teacher = tmp_path / "teacher.keras"
    teacher.write_bytes(b"")
    argv = ["mnist", "--output-dir", str(output_dir)] if command == "mnist" else [
        "cache", "--teacher", str(teacher), "--output-dir", str(output_dir)
    ]
    assert cli.main(argv) == 2
    _one_line_error(capsys, "--output-dir", "is a file" if problem != (
        "read-only") else "not writable")
    assert runs == []


def test_zero_batch_size_is_refused_not_replaced(monkeypatch, tmp_path, capsys):
    runs = _stub_example(monkeypatch, tmp_path, batch_size=0)
    assert cli.main(["mnist", "--batch-size", "0"]) == 2
    _one_line_error(capsys, "--batch-size must be at least 1, got 0")
    assert runs == []
    assert cli.main(["cache", "--teacher", "t.keras", "--batch-size", "0"]) == 2
    _one_line_error(capsys, "--batch-size", "at least 1")


def test_stale_results_are_set_aside_before_a_new_run(monkeypatch, tmp_path):
    (tmp_path / "results.json").write_text('{"run": "old"}')

    def interrupted(argv):
        (tmp_path / "student.keras").write_bytes(b"new model")
        raise KeyboardInterrupt

    _stub_example(monkeypatch, tmp_path)
    cli.load_example("mnist").main = interrupted
    with pytest.raises(KeyboardInterrupt):
        cli.main(["mnist", "--output-dir", str(tmp_path)])
    # No results.json next to the new model; the old one is marked stale.
    assert not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / cli.STALE_RESULTS).read_text()) == {
        "run": "old"
    }


def _saved_teacher(tmp_path, input_shape=(28, 28, 1)):
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential(
        [keras.Input(input_shape), keras.layers.Flatten(),
         keras.layers.Dense(10)]
    )
    path = tmp_path / "teacher.keras"
    teacher.save(path)
    return path


def test_corrupt_teacher_is_not_reported_as_missing(tmp_path, capsys):
    path = tmp_path / "teacher.keras"
    path.write_bytes(b"not a zip file")
    assert cli.main([
        "cache", "--teacher", str(path), "--output-dir", str(tmp_path / "c"),
    ]) == 2
    line = _one_line_error(capsys, "cannot be loaded as a Keras model",
                           "model.save")
    assert "File not found" not in line.split("(")[0]


def test_compact_format_without_top_k_names_the_fix(tmp_path, capsys):
    path = _saved_teacher(tmp_path)
    assert cli.main([
        "cache", "--teacher", str(path), "--format", "compact",
        "--output-dir", str(tmp_path / "c"),
    ]) == 2
    _one_line_error(capsys, "--format compact", "--top-k")


def test_teacher_of_another_input_shape_is_one_line(tmp_path, capsys):
    path = _saved_teacher(tmp_path, input_shape=(32, 32, 3))
    assert cli.main([
        "cache", "--teacher", str(path), "--output-dir", str(tmp_path / "c"),
        "--data-dir", str(DATA_DIR),
    ]) == 2
    _one_line_error(capsys, "does not take MNIST images of shape (batch, 28, 28, 1)",
                    "(it takes (batch, 32, 32, 3))")
