"""Tests for `examples/feature_distillation.py`: one `--quick` run, --help, the CLI."""

import contextlib
import io
import json

import pytest

from keras_distill import cli
from tests.conftest import DATA_DIR

pytest.importorskip("keras_hub")
example = cli.load_example("feature_distillation")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick` run (seed 0, data subsets) shared by the tests."""
    output_dir = tmp_path_factory.mktemp("features")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = example.main(
            ["--quick", "--output-dir", str(output_dir), "--data-dir", str(DATA_DIR)]
        )
    return output_dir, results, printed.getvalue()


@pytest.mark.slow
def test_quick_run_prints_one_table_of_every_technique(quick_run):
    _, _, printed = quick_run
    for row in (
        "MNIST CNN        logits only",
        "MNIST CNN        + hidden states",
        "PhraseBank BERT  logits only",
        "PhraseBank BERT  + hidden states (attention)",
        "PhraseBank BERT  + attention maps (uniform)",
    ):
        assert row in printed
    assert "Δ accuracy vs logits (points)" in printed
    assert "PhraseBank BERT, + attention maps (uniform) - logits only:" in printed
    # The quantization table of the hidden-state-distilled MNIST student.
    assert "| student int8 | int8 |" in printed
    assert "examples/quantize_student.py" in printed


@pytest.mark.slow
def test_quick_run_writes_results_and_keeps_projections_out_of_students(quick_run):
    output_dir, results, _ = quick_run
    written = json.loads((output_dir / "results.json").read_text())
    assert written["seeds"] == [0] and written["quick"]
    for task in ("mnist", "text"):
        rows = written[task]["rows"]
        baseline = rows["logits only"][0]
        assert baseline["projection_params"] == 0
        for name, (row,) in rows.items():
            assert 0.0 <= row["accuracy"] <= 1.0
            # Same exported student whatever the loss; hidden-state rows
            # trained projections on the side.
            assert row["params"] == baseline["params"]
            if "hidden" in name:
                assert row["projection_params"] > 0
    text_rows = written["text"]["rows"]
    # 2 student blocks mapped onto the teacher's 4.
    assert len(text_rows["+ hidden states (attention)"][0]["pairs"]) == 2
    assert [r["mode"] for r in written["mnist"]["quantized"]] == [
        "float", "float", "int8"
    ]


def test_help_lists_the_options():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
        example.parse_args(["--help"])
    assert exit_.value.code == 0
    for option in ("--seeds", "--tasks", "--mnist-epochs", "--text-epochs", "--quick"):
        assert option in printed.getvalue()


def test_features_command_runs_the_example(capsys):
    assert cli.main(["features", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "options of examples/feature_distillation.py" in printed
    assert "--text-epochs" in printed
    assert cli.main(["features", "--tasks", "images"]) == 2
    assert "--tasks" in capsys.readouterr().err


def test_common_epochs_option_sets_every_students_epochs():
    args = example.parse_args(["--quick", "--epochs", "3"])
    assert (args.mnist_epochs, args.text_epochs) == (3, 3)
    args = example.parse_args(["--mnist-epochs", "4"])
    assert (args.mnist_epochs, args.text_epochs) == (4, 6)
