"""keras_distill.Distiller vs keras.distillation.Distiller on MNIST, side by side.

For each backend (a subprocess each: the backend is fixed at import time) and
each recipe of `examples/mnist_distillation.py`, one teacher is trained, then
for every seed three students start from the same initial weights and see the
same batches for the same epochs:

- `ours`: `keras_distill.Distiller` with keras.io's compile call
  (`KLDivergence()`, the recipe's alpha and temperature);
- `keras`: `keras.distillation.Distiller` (Keras >= 3.12) with its documented
  default `LogitsDistillation(temperature=T)` and `student_loss_weight=alpha`;
- `scratch`: the student trained on the hard labels alone.

It prints test accuracy (mean ± std over seeds) and median seconds per
training epoch of each, and the ratio of the two distillers' epoch times. No
timing is asserted anywhere; run it and read the table:

    python benchmarks/vs_keras_distillation.py                 # all backends, both recipes
    python benchmarks/vs_keras_distillation.py --backends jax --recipes seed
"""

import json
import statistics
import sys
import tempfile
from pathlib import Path

from per_backend import benchmark_parser
from per_backend import run_workers
from per_backend import save_results

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ("ours", "keras", "scratch")


def run_worker(args):
    """Trains every student on the backend of this process; writes JSON."""
    sys.path.insert(0, str(ROOT / "examples"))
    import keras
    import mnist_distillation as example

    from keras_distill import Distiller
    from keras_distill.examples.datasets import load_mnist

    data = tuple(load_mnist(args.data_dir))
    results = {"backend": keras.backend.backend(), "keras": keras.__version__}
    output_dir = Path(tempfile.mkdtemp())
    for recipe_name in args.recipes:
        recipe = example.RECIPES[recipe_name]
        student_epochs = args.epochs or recipe.student_epochs
        teacher_epochs = args.teacher_epochs or recipe.teacher_epochs
        teacher, teacher_summary = example.train_teacher(
            recipe, data, teacher_epochs, recipe.batch_size, 0, output_dir
        )
        runs = {name: [] for name in STUDENTS}
        for seed in args.seeds:
            keras.utils.set_random_seed(seed)
            student = recipe.build_student()
            copies = {}
            for name in STUDENTS:
                copies[name] = keras.models.clone_model(student)
                copies[name].set_weights(student.get_weights())
            trained = {
                "ours": Distiller(student=copies["ours"], teacher=teacher),
                "keras": keras.distillation.Distiller(
                    teacher=teacher,
                    student=copies["keras"],
                    distillation_losses=keras.distillation.LogitsDistillation(
                        temperature=recipe.temperature
                    ),
                    student_loss_weight=recipe.alpha,
                ),
                "scratch": copies["scratch"],
            }
            hard_loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            )
            trained["ours"].compile(
                optimizer=keras.optimizers.Adam(),
                metrics=["accuracy"],
                student_loss_fn=hard_loss,
                distillation_loss_fn=keras.losses.KLDivergence(),
                alpha=recipe.alpha,
                temperature=recipe.temperature,
            )
            for name in ("keras", "scratch"):
                trained[name].compile(
                    optimizer=keras.optimizers.Adam(),
                    loss=hard_loss,
                    metrics=["accuracy"],
                )
            (_, _), (x_test, y_test) = data
            for name in STUDENTS:
                _, epoch_seconds = example._fit(
                    trained[name], data, student_epochs, recipe.batch_size,
                    seed, augment=False,
                )
                runs[name].append(
                    {
                        "seed": seed,
                        "test_accuracy": example.classification_accuracy(
                            copies[name], x_test, y_test
                        ),
                        # The first epoch includes tracing and compilation.
                        "median_epoch_seconds": statistics.median(
                            epoch_seconds[1:] or epoch_seconds
                        ),
                    }
                )
        results[recipe_name] = {
            "teacher_accuracy": teacher_summary["test_accuracy"],
            "student_epochs": student_epochs,
            "runs": runs,
        }
    Path(args.worker_output).write_text(json.dumps(results, indent=2))


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def format_table(all_results, recipes):
    header = (
        "| backend | recipe | teacher | ours | keras.distillation | scratch "
        "| ours s/epoch | keras s/epoch | scratch s/epoch | keras / ours time |"
    )
    lines = [header, "|" + "---|" * 10]
    for results in all_results:
        for recipe in recipes:
            recipe_results = results[recipe]
            runs = recipe_results["runs"]
            accuracy = {
                name: mean_std([r["test_accuracy"] for r in runs[name]])
                for name in STUDENTS
            }
            seconds = {
                name: statistics.median(
                    r["median_epoch_seconds"] for r in runs[name]
                )
                for name in STUDENTS
            }
            lines.append(
                f"| {results['backend']} | {recipe} "
                f"({recipe_results['student_epochs']} ep) "
                f"| {recipe_results['teacher_accuracy']:.4f} "
                f"| {accuracy['ours']} | {accuracy['keras']} "
                f"| {accuracy['scratch']} | {seconds['ours']:.2f} "
                f"| {seconds['keras']:.2f} | {seconds['scratch']:.2f} "
                f"| {seconds['keras'] / seconds['ours']:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__.split("\n\n")[0], "runs/vs_keras_distillation.json")
    parser.add_argument(
        "--recipes", nargs="+", default=["default", "seed"],
        choices=["default", "seed"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--epochs", type=int, default=None,
        help="student epochs (default: the recipe's)",
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None,
        help="teacher epochs (default: the recipe's)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker_output:
        run_worker(args)
        return
    worker_args = [
        "--recipes", *args.recipes,
        "--seeds", *map(str, args.seeds),
        "--data-dir", args.data_dir,
    ]
    if args.epochs:
        worker_args += ["--epochs", str(args.epochs)]
    if args.teacher_epochs:
        worker_args += ["--teacher-epochs", str(args.teacher_epochs)]
    all_results = run_workers(__file__, args.backends, worker_args)
    table = format_table(all_results, args.recipes)
    print(table)
    save_results(all_results, args.output)


if __name__ == "__main__":
    main()
