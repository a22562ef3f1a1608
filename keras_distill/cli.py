"""The `keras-distill` command: run the examples, build a teacher-output cache.

    keras-distill mnist --quick                   # MNIST teacher/distilled/scratch
    keras-distill sentiment --backend torch       # Financial PhraseBank
    keras-distill gemma --epochs 1                # Gemma 3 causal-LM distillation
    keras-distill cache --teacher runs/mnist/teacher.keras

The Keras backend is fixed when Keras is first imported, and importing
`keras_distill` imports Keras. So when `--backend` names another backend than
the running one, the command sets `KERAS_BACKEND` and runs itself again in a
new process (`os.execv`), before doing any work.
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import sys
from pathlib import Path

BACKENDS = ("jax", "tensorflow", "torch")
# The package each backend imports, to check it is installed before switching.
_BACKEND_PACKAGES = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}
# Set in the environment of the re-executed process, so a backend that does
# not take effect is reported instead of re-executing forever.
_REEXEC_MARKER = "KERAS_DISTILL_CLI_BACKEND"
EXAMPLES = {
    "mnist": (
        "mnist_distillation",
        "MNIST: a CNN teacher, a distilled MLP student and a scratch student",
    ),
    "sentiment": (
        "sentiment_distillation",
        "Financial PhraseBank sentiment: a transformer teacher, a small "
        "distilled transformer student and a scratch student",
    ),
    "gemma": (
        "gemma_distillation",
        "a tiny Gemma 3 causal language model distilled on Tiny Shakespeare",
    ),
    "features": (
        "feature_distillation",
        "what hidden-state and attention-map distillation add over "
        "logits only (MNIST CNNs; BERT encoders on Financial PhraseBank), "
        "and the quantized student",
    ),
}
# The cache fingerprint's description of `load_mnist`'s training images.
MNIST_PREPROCESSING = {"dataset": "mnist", "split": "train", "scale": "1/255"}
_EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

DESCRIPTION = """\
Knowledge distillation with Keras 3 on JAX, TensorFlow or PyTorch.

Each example trains a large "teacher" model, then a small "student" twice:
once distilled (it learns from the teacher's softened outputs as well as the
labels) and once from scratch (labels only), and prints a table comparing
them. Results go to --output-dir as results.json with PNG plots beside it;
a results.json of an earlier run is renamed results.json.stale when a run
starts, so an interrupted run never leaves old results next to new models.
"""

EPILOG = """\
examples:
  keras-distill mnist --quick              one-minute smoke run
  keras-distill mnist --backend torch      the full comparison on PyTorch
  keras-distill sentiment --seeds 0 1 2 --output-dir runs/sentiment
  keras-distill cache --teacher runs/mnist/teacher.keras

Run `keras-distill COMMAND --help` for a command's options. The data is read
from --data-dir (default ../shared/data) when it cannot be downloaded.
"""


class CommandLineError(Exception):
    """A user error reported as one line, with exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line that names the fix."""

    def error(self, message):
        raise CommandLineError(
            f"{message} (run `{self.prog} --help` for the options)"
        )


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common_options():
    """Options every command takes."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--backend", choices=BACKENDS,
        help="Keras backend to run on (default: $KERAS_BACKEND, else "
        "Keras's configured backend)",
    )
    group.add_argument(
        "--data-dir",
        help="folder with the datasets, read when a download is impossible "
        "(default: ../shared/data)",
    )
    group.add_argument(
        "--output-dir",
        help="where models, results.json and the PNG plots go (default: the "
        "example's, e.g. runs/mnist)",
    )
    return parser


def _training_options():
    """Options of the commands that train models."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("training options")
    group.add_argument(
        "--epochs", type=_positive_int,
        help="epochs of each student (default: the example's)",
    )
    group.add_argument(
        "--seeds", type=int, nargs="+", metavar="SEED",
        help="one distilled and one scratch student per seed; results are "
        "mean ± std over seeds (default: the example's, 0 1 2 for mnist and "
        "sentiment)",
    )
    group.add_argument(
        "--quick", action="store_true",
        help="a smoke run on a data subset with few epochs (seconds to a "
        "minute)",
    )
    return parser


def build_parser():
    """The `keras-distill` argument parser.

    Returns:
        An `argparse.ArgumentParser` with one sub-command per example and
        `cache`.

    Example:

    >>> args, extra = build_parser().parse_known_args(
    ...     ["mnist", "--quick", "--seeds", "0", "1", "--recipe", "seed"])
    >>> args.command, args.quick, args.seeds, extra
    ('mnist', True, [0, 1], ['--recipe', 'seed'])
    """
    from keras_distill.targets.cache import FORMATS

    common, training = _common_options(), _training_options()
    parser = _OneLineParser(
        prog="keras-distill",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_OneLineParser
    )
    for name, (module, summary) in EXAMPLES.items():
        commands.add_parser(
            name,
            parents=[common, training],
            help=summary,
            description=f"Runs examples/{module}.py: {summary}.",
            epilog="Other options are passed to the example script; its own "
            "options are listed below when it is installed.",
        )
    cache = commands.add_parser(
        "cache",
        parents=[common],
        help="run a saved teacher once over a dataset and store its outputs "
        "for later distillation without the teacher",
        description="Builds a keras_distill.TeacherOutputCache: runs a saved "
        "teacher over the training inputs once and stores its logits (or "
        "top-k log-probabilities) on disk, fingerprinted by the teacher's "
        "weights and the inputs. A Distiller with teacher=None then trains "
        "from `TeacherOutputCache.open(DIR).dataset(x, y, batch_size)`. An "
        "interrupted build resumes when run again.",
    )
    cache.add_argument(
        "--teacher", required=True,
        help="the saved teacher model (.keras), e.g. runs/mnist/teacher.keras "
        "from `keras-distill mnist`",
    )
    cache.add_argument(
        "--dataset", choices=("mnist",), default="mnist",
        help="whose training inputs to run the teacher on (default: mnist)",
    )
    cache.add_argument(
        "--top-k", type=_positive_int,
        help="store only the k largest log-probabilities per example "
        "(for large vocabularies; default: all logits)",
    )
    cache.add_argument(
        "--format", choices=FORMATS, default="float16",
        help="stored values: float16 or float32 logits, or `compact` top-k "
        "targets (needs --top-k) (default: float16)",
    )
    cache.add_argument(
        "--batch-size", type=_positive_int, default=256,
        help="examples per teacher call (default: 256)",
    )
    parser.command_parsers = commands.choices
    return parser


def _switch_backend(backend, argv):
    """Re-executes this command under `backend` unless it already runs it."""
    import keras  # Already imported by `keras_distill/__init__`.

    if backend is None or keras.backend.backend() == backend:
        if backend is not None and os.environ.get(_REEXEC_MARKER) == backend:
            print(f"keras-distill: running on the {backend} backend")
        return
    if os.environ.get(_REEXEC_MARKER) == backend:
        raise CommandLineError(
            f"--backend {backend} did not take effect (Keras runs "
            f"{keras.backend.backend()}); check KERAS_BACKEND and "
            "~/.keras/keras.json"
        )
    if importlib.util.find_spec(_BACKEND_PACKAGES[backend]) is None:
        raise CommandLineError(
            f"--backend {backend} needs the `{_BACKEND_PACKAGES[backend]}` "
            f"package: pip install 'keras-distill[{backend}]'"
        )
    environment = dict(os.environ, KERAS_BACKEND=backend)
    environment[_REEXEC_MARKER] = backend
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable,
        [sys.executable, "-m", "keras_distill.cli", *argv],
        environment,
    )


def load_example(module_name):
    """Imports an example script by module name.

    Installed packages ship the scripts as `keras_distill.examples`; a source
    checkout reads them from its `examples/` folder.

    Args:
        module_name: e.g. `"mnist_distillation"`.

    Returns:
        The module, which has a `main(argv)` function.

    Raises:
        CommandLineError: If the example is in neither place.
    """
    try:
        return importlib.import_module(f"keras_distill.examples.{module_name}")
    except ModuleNotFoundError as error:
        if error.name not in (
            "keras_distill.examples",
            f"keras_distill.examples.{module_name}",
        ):
            raise
    path = _EXAMPLES_DIR / f"{module_name}.py"
    if not path.is_file():
        raise CommandLineError(
            f"examples/{module_name}.py is not part of this installation; "
            "update keras-distill (pip install -U keras-distill) or run it "
            "from a source checkout"
        )
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _example_argv(args, extra, example_options, command):
    """The example's arguments for the common options that were given.

    Args:
        args: The parsed common options.
        extra: Other arguments, passed on as they are.
        example_options: The example's own defaults (`parse_args([])`), to
            see which spelling of each option it takes.
        command: The command name, for error messages.

    Returns:
        A list of strings for the example's `main`.
    """
    argv = []
    if args.epochs is not None:
        # Examples with several trained models name the students' epochs.
        name = "epochs" if hasattr(example_options, "epochs") else (
            "student_epochs"
        )
        argv += [f"--{name.replace('_', '-')}", str(args.epochs)]
    for option in ("output_dir", "data_dir"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option.replace('_', '-')}", str(value)]
    if args.seeds is not None:
        if hasattr(example_options, "seeds"):
            argv += ["--seeds", *map(str, args.seeds)]
        elif len(args.seeds) == 1 and hasattr(example_options, "seed"):
            argv += ["--seed", str(args.seeds[0])]
        else:
            raise CommandLineError(
                f"--seeds: `{command}` runs one seed at a time; pass one "
                "value, e.g. --seeds 0"
            )
    if args.quick:
        argv.append("--quick")
    return argv + list(extra)


def _check_example_argv(module, command, argv):
    """Parses `argv` with the example's own parser, as one-line errors."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            module.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code:
            lines = captured.getvalue().strip().splitlines() or ["bad option"]
            message = lines[-1].split("error: ", 1)[-1]
            raise CommandLineError(
                f"{message} (run `keras-distill {command} --help` for the "
                "options)"
            ) from None


def _example_help(module):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            module.parse_args(["--help"])
        except SystemExit:
            pass
    return printed.getvalue()


def _check_data_dir(args):
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CommandLineError(
            f"--data-dir {args.data_dir} is not a folder; pass the folder that "
            "holds the datasets (e.g. --data-dir ../shared/data)"
        )


def _check_output_dir(output_dir):
    """Refuses an `--output-dir` that cannot be written, before any work.

    The folder itself, or else the nearest folder above it that exists (it
    is created there), must be a writable folder.
    """
    path = Path(output_dir)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CommandLineError(
            f"--output-dir {output_dir}: {existing} is a file, not a folder; "
            "pass a folder path (it is created if missing)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandLineError(
            f"--output-dir {output_dir}: {existing} is not writable; pass a "
            "folder you can write to"
        )


# A results.json that a new run has not written yet is set aside under this
# name, so it never sits next to new models after an interrupted run.
STALE_RESULTS = "results.json.stale"


def _set_aside_stale_results(output_dir):
    results = Path(output_dir) / "results.json"
    if results.is_file():
        results.replace(results.with_name(STALE_RESULTS))
        print(
            f"Moved the previous {results} to {STALE_RESULTS}; this run "
            "writes a new results.json when it completes"
        )


def _report_outputs(output_dir):
    output_dir = Path(output_dir)
    written = sorted(
        path.name for path in output_dir.glob("*") if path.suffix in (
            ".json", ".png"
        )
    )
    if written:
        print(f"Wrote {', '.join(written)} to {output_dir}/")


def _run_example(command, args, extra, parser):
    module_name = EXAMPLES[command][0]
    module = load_example(module_name)
    if args.help:
        parser.print_help()
        print(f"\noptions of examples/{module_name}.py:")
        print(_example_help(module).split("options:", 1)[-1].rstrip())
        return 0
    argv = _example_argv(args, extra, module.parse_args([]), command)
    _check_example_argv(module, command, argv)
    options = module.parse_args(argv)
    batch_size = getattr(options, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        # Some examples read 0 as "the recipe's default".
        raise CommandLineError(
            f"--batch-size must be at least 1, got {batch_size}; leave it out "
            "for the example's default"
        )
    output_dir = getattr(options, "output_dir", None)
    if output_dir is not None:
        _check_output_dir(output_dir)
        _set_aside_stale_results(output_dir)
    module.main(argv)
    if output_dir is not None:
        _report_outputs(output_dir)
    return 0


def build_cache(args):
    """Runs `cache`: the teacher's outputs on a dataset's training inputs.

    Args:
        args: The parsed `cache` options.

    Returns:
        The `TeacherOutputCache`.
    """
    import keras

    from keras_distill.examples.datasets import load_mnist
    from keras_distill.targets.cache import TeacherOutputCache

    teacher_path = Path(args.teacher)
    if not teacher_path.is_file():
        raise CommandLineError(
            f"--teacher {teacher_path} does not exist; train one first, e.g. "
            "`keras-distill mnist` writes runs/mnist/teacher.keras"
        )
    if teacher_path.suffix != ".keras":
        raise CommandLineError(
            f"--teacher {teacher_path} is not a .keras file; save the teacher "
            "with `model.save('teacher.keras')`"
        )
    if args.format == "compact" and args.top_k is None:
        raise CommandLineError(
            "--format compact stores top-k targets: add --top-k K (e.g. "
            "--top-k 8), or choose --format float16"
        )
    output_dir = Path(args.output_dir or "runs/mnist_teacher_cache")
    _check_output_dir(output_dir)
    try:
        teacher = keras.saving.load_model(teacher_path, compile=False)
    except Exception as error:  # Any failure to read a user's file.
        reason = str(error).strip().splitlines()[0] if str(error) else ""
        raise CommandLineError(
            f"--teacher {teacher_path} cannot be loaded as a Keras model "
            f"({type(error).__name__}: {reason}); re-save the teacher with "
            "`model.save('teacher.keras')`"
        ) from None
    data_dir = args.data_dir or "../shared/data"
    (x_train, _), _ = load_mnist(data_dir)
    _check_teacher_takes(teacher, teacher_path, x_train)
    print(
        f"Running {teacher_path} over {len(x_train):,} MNIST training images "
        f"into {output_dir}"
    )
    cache = TeacherOutputCache.build(
        teacher,
        x_train,
        output_dir,
        batch_size=args.batch_size,
        top_k=args.top_k,
        format=args.format,
        preprocessing=MNIST_PREPROCESSING,
    )
    print(f"Cached teacher outputs of {len(x_train):,} examples in {output_dir}/")
    return cache


def _batch_shape(shape):
    return f"(batch, {', '.join(map(str, tuple(shape)[1:]))})"


def _check_teacher_takes(teacher, teacher_path, inputs):
    """Refuses a teacher that does not map `inputs` to `(batch, classes)`."""
    try:
        outputs = teacher(inputs[:1], training=False)
        shape = tuple(outputs.shape)
    except Exception as error:  # Whatever the model raises on these inputs.
        model_inputs = getattr(teacher, "inputs", None)
        reason = (
            f"it takes {_batch_shape(model_inputs[0].shape)}" if model_inputs
            else type(error).__name__
        )
        raise CommandLineError(
            f"--teacher {teacher_path} does not take MNIST images of shape "
            f"{_batch_shape(inputs.shape)} ({reason}); "
            "pass a teacher trained on them, e.g. runs/mnist/teacher.keras "
            "from `keras-distill mnist`"
        ) from None
    if len(shape) != 2:
        raise CommandLineError(
            f"--teacher {teacher_path} returns outputs of shape {shape}, not "
            "(batch, classes) logits; pass a classifier of MNIST images"
        )


def main(argv=None):
    """Runs the `keras-distill` command.

    Args:
        argv: Arguments without the program name; `None` reads `sys.argv`.

    Returns:
        The exit status: 0, or 2 after a one-line error on standard error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        # `--help` of an example command also lists the example's options,
        # so it is handled after the example is loaded.
        wants_help = bool(argv) and argv[0] in EXAMPLES and any(
            a in ("-h", "--help") for a in argv[1:]
        )
        parse_argv = [a for a in argv if a not in ("-h", "--help")] if (
            wants_help
        ) else argv
        args, extra = parser.parse_known_args(parse_argv)
        args.help = wants_help
        if args.command is None:
            parser.error(f"choose a command: {', '.join(parser.command_parsers)}")
        if extra and args.command == "cache":
            parser.command_parsers["cache"].error(
                f"unrecognized arguments: {' '.join(extra)}"
            )
        _check_data_dir(args)
        _switch_backend(args.backend, argv)
        if args.command == "cache":
            build_cache(args)
            return 0
        return _run_example(
            args.command, args, extra, parser.command_parsers[args.command]
        )
    except SystemExit as exit_:
        # `--help` (status 0); errors are raised as `CommandLineError`.
        return exit_.code
    except (CommandLineError, FileNotFoundError) as error:
        # A missing data file's message names the path and the flag to fix.
        command = "keras-distill"
        if argv and argv[0] in parser.command_parsers:
            command += f" {argv[0]}"
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
