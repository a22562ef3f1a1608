"""On-policy generation: eager vs traced decode step, side by side in one process.

Per backend (one process each), for Gemma 3 students built from configs
(`examples/gemma_distillation.build_gemma`: vocabulary 1,000, two query heads,
one key-value head), batch `--batch-size` prompts of `--prompt-length` random
tokens continued to `--length` tokens with the seeded random sampler, through
two `SequenceGenerator`s of the same model: `compile_decode_step=False` (what
KerasHub runs) and the default `True` (`backend.compile_decode_step`, a no-op
on jax and tensorflow). Reported per model size:

- `first_call_seconds` of each: the traced one's includes tracing (once per
  set of shapes);
- `seconds_per_call`: the median of `--repeats` rounds, each round timing one
  call of each in turn, so that a load change (the machine may be shared)
  moves both; `speedup` is the median over rounds of each round's ratio;
- `same_samples`: whether the two gave the same tokens on every call (both
  samplers start from the same seed, and each call advances both alike).

    python benchmarks/generation_speed.py --backends torch
    python benchmarks/generation_speed.py --sizes 64,1 256,4 --repeats 7
"""

import statistics
import time

from per_backend import benchmark_parser
from per_backend import run_workers
from per_backend import save_results


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def compare(hidden_dim, num_layers, args):
    import numpy as np

    from examples.gemma_distillation import build_gemma
    from keras_distill.distillers import on_policy

    model = build_gemma(1000, hidden_dim, num_layers, 2, None)
    rng = np.random.default_rng(0)
    token_ids = np.zeros((args.batch_size, args.length), "int32")
    padding_mask = np.zeros((args.batch_size, args.length), bool)
    token_ids[:, : args.prompt_length] = rng.integers(
        1, 1000, (args.batch_size, args.prompt_length)
    )
    padding_mask[:, : args.prompt_length] = True
    generators = {
        name: on_policy.SequenceGenerator(
            model,
            on_policy.make_sampler("random", seed=0),
            compile_decode_step=traced,
        )
        for name, traced in (("eager", False), ("traced", True))
    }
    row = {"hidden_dim": hidden_dim, "num_layers": num_layers}
    samples = {}
    for name, generator in generators.items():
        seconds, samples[name] = _timed(lambda g=generator: g(token_ids, padding_mask))
        row[f"{name}_first_call_seconds"] = seconds
    same = bool((samples["eager"][0] == samples["traced"][0]).all())
    times = {name: [] for name in generators}
    for _ in range(args.repeats):
        for name, generator in generators.items():
            seconds, samples[name] = _timed(lambda g=generator: g(token_ids, padding_mask))
            times[name].append(seconds)
        same = same and bool((samples["eager"][0] == samples["traced"][0]).all())
    for name in generators:
        row[f"{name}_seconds_per_call"] = statistics.median(times[name])
    row["speedup"] = statistics.median(
        e / t for e, t in zip(times["eager"], times["traced"])
    )
    row["same_samples"] = same
    return row


def worker(args):
    import json
    import sys
    from pathlib import Path

    import keras

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    keras.utils.set_random_seed(0)
    rows = [
        compare(*map(int, size.split(",")), args) for size in args.sizes
    ]
    result = {"backend": keras.backend.backend(), "rows": rows}
    Path(args.worker_output).write_text(json.dumps(result))


def main():
    parser = benchmark_parser(__doc__.split("\n\n")[0], "generation_speed.json")
    parser.add_argument(
        "--sizes", nargs="+", default=["64,1", "256,4"],
        help="hidden_dim,num_layers of each student",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.worker_output:
        return worker(args)
    worker_args = [
        "--sizes", *args.sizes, "--batch-size", str(args.batch_size),
        "--prompt-length", str(args.prompt_length), "--length", str(args.length),
        "--repeats", str(args.repeats),
    ]
    results = run_workers(__file__, args.backends, worker_args)
    for result in results:
        print(f"backend: {result['backend']}")
        print("| hidden, blocks | eager s/call | traced s/call | speedup | "
              "first call eager / traced s | same samples |")
        print("|---|---|---|---|---|---|")
        for row in result["rows"]:
            print(
                f"| {row['hidden_dim']}, {row['num_layers']} | "
                f"{row['eager_seconds_per_call']:.3f} | "
                f"{row['traced_seconds_per_call']:.3f} | {row['speedup']:.2f}x | "
                f"{row['eager_first_call_seconds']:.2f} / "
                f"{row['traced_first_call_seconds']:.2f} | {row['same_samples']} |"
            )
    save_results(results, args.output)


if __name__ == "__main__":
    main()
