"""Peak memory and time of one value+grad of a language-model distillation loss.

Side by side, per backend, on `N` tokens of a `V`-entry vocabulary (default
N = 512, V = 262,144, Gemma 3's vocabulary):

- `keras`: keras.distillation's `LogitsDistillation(temperature=T)`, its
  default, gradient with respect to the student logits. Its default loss
  string `"kl_divergence"` resolves to a function, not a `KLDivergence`
  instance, so it takes the KL of the raw softened logits clipped to
  [1e-7, 1] (its value is not a KL of distributions; see the README);
- `keras_kl`: the same with `loss=keras.losses.KLDivergence()`, the branch
  that applies the softmax: the KL we compute, in probability space;
- `chunked`: `keras_distill.losses.fused.chunked_distillation_loss`, same inputs;
- `fused`: `keras_distill.losses.fused.fused_distillation_loss` from the student's
  hidden states `(N, H)` and output embedding `(V, H)` to the teacher's
  logits (alpha = 0: the divergence alone), gradients with respect to both;
- `fused_ce`: the same with next-token labels and alpha = 0.1 (cross-entropy
  plus divergence, the usual training loss);
- `fused_top_k`: `fused_ce` with the teacher's top-256 log-probabilities
  (Gemma 3's recipe, `tail="renormalize"`) instead of its logits;
- `fused_hidden`: `fused` with the teacher given as its own hidden states
  `(N, H)` and output embedding `(V, H)`, so no full logits of either model
  exist;
- `floor`: the dense path `fused_hidden` replaces, its fair floor: both
  models' `hidden @ embedding.T` materialized, `chunked` on them, and the
  gradient back through the student's matmul to its hidden states and
  embedding. Its FLOPs, `3 · 2NVH` for the student and `2NVH` for the
  teacher, are what `fused_hidden` must do too, plus one recomputation of
  each tile's logits in the backward pass (about 1.25× the floor's FLOPs);
- `matmul`: one plain `keras.ops.matmul` of `(N, H) × (H, V)`, forward only,
  compiled the same way: the machine's practical ceiling in GFLOP/s.

`fused_hidden` and `floor` are also reported in GFLOP/s of the floor's
`8NVH` FLOPs, next to `matmul`'s `2NVH`, and the ratio fused / floor per
backend is printed under the table.

Every (backend, loss) runs in a fresh process (`per_backend.run_workers`, one
call per loss), so no allocator state carries over. The inputs are created as
backend tensors and the call is compiled first (JAX: ahead of time;
TensorFlow: traced into a `tf.function`, as `fit` runs it; PyTorch: eager, as
`fit` runs it). A thread samples the process's resident memory (RSS) every
2 ms during the first call; the peak minus the RSS just before the call is
reported in units of one logits tensor (`N · V · 4` bytes). For the fused
losses it is also given net of the gradients, whose size is fixed
(`(N + V) · H · 4` bytes).

Two passes, each a fresh process per (backend, loss):

- with glibc's default allocator settings, which also give the times (the
  median over `--repeats` calls after the measured one);
- with `MALLOC_MMAP_THRESHOLD_` fixed at 1 MiB: every buffer of 1 MiB or more
  gets its own mapping, returned to the system when freed, so RSS follows the
  live buffers. By default glibc raises that threshold as large buffers are
  freed (up to 32 MiB) and then serves buffers of a few MiB from its heap,
  where freed ones stay resident; a loss that allocates many chunk-sized
  temporaries (ours) then shows up to ~1× one logits tensor of freed memory
  in its RSS. Dense losses' buffers are far above 32 MiB and mapped either
  way.

Times depend on the machine's load (it is shared); the memory figures do not.

    python benchmarks/lm_loss_memory.py
    python benchmarks/lm_loss_memory.py --backends jax --tokens 128 --vocabulary 32768
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from per_backend import benchmark_parser
from per_backend import run_workers
from per_backend import save_results

ROOT = Path(__file__).resolve().parents[1]
LOSSES = (
    "keras", "keras_kl", "chunked", "fused", "fused_ce", "fused_top_k",
    "fused_hidden", "floor", "matmul",
)
# glibc's threshold above which an allocation gets its own mapping, returned
# to the system when freed (see the module docstring).
MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = 2**20
TOP_K = 256


def resident_bytes():
    """The process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples RSS in a thread; `.peak` is the maximum minus the start value."""

    def __enter__(self):
        self.baseline = resident_bytes()
        self._maximum = self.baseline
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self._maximum = max(self._maximum, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc_info):
        self._running = False
        self._thread.join()
        self.peak = max(self._maximum, resident_bytes()) - self.baseline


def compiled_value_and_grad(loss_fn, inputs):
    """`f(*inputs) -> (value, grads)`, compiled as Keras's train step is.

    Gradients are taken with respect to every input that is not an integer
    or a teacher tensor: `loss_fn(*inputs)` uses the first `num_diff` inputs
    as the differentiable ones (see `build_loss`).
    """
    import keras

    backend = keras.backend.backend()
    num_diff = loss_fn.num_differentiable
    if num_diff == 0:
        return compiled_forward(loss_fn, inputs)
    if backend == "jax":
        import jax

        def value_and_grad(*args):
            return jax.value_and_grad(
                loss_fn, argnums=tuple(range(num_diff))
            )(*args)

        compiled = jax.jit(value_and_grad).lower(*inputs).compile()

        def run():
            value, grads = compiled(*inputs)
            jax.block_until_ready(grads)
            return value, grads

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def value_and_grad(*args):
            with tf.GradientTape() as tape:
                for x in args[:num_diff]:
                    tape.watch(x)
                value = loss_fn(*args)
            return value, tape.gradient(value, list(args[:num_diff]))

        value_and_grad.get_concrete_function(*inputs)
        return lambda: value_and_grad(*inputs)
    if backend == "torch":
        import torch

        def run():
            leaves = [x.detach().requires_grad_() for x in inputs[:num_diff]]
            value = loss_fn(*leaves, *inputs[num_diff:])
            grads = torch.autograd.grad(value, leaves)
            return value, grads

        return run
    raise NotImplementedError(backend)


def compiled_forward(fn, inputs):
    """`fn(*inputs)` alone (no gradient), compiled as `compiled_value_and_grad`."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compiled = jax.jit(fn).lower(*inputs).compile()
        return lambda: (jax.block_until_ready(compiled(*inputs)), ())
    if backend == "tensorflow":
        import tensorflow as tf

        function = tf.function(fn)
        function.get_concrete_function(*inputs)
        return lambda: (function(*inputs), ())
    if backend == "torch":
        import torch

        def run():
            with torch.no_grad():
                return fn(*inputs), ()

        return run
    raise NotImplementedError(backend)


def build_loss(name, temperature, chunk_size, vocabulary_chunk_size=None):
    """The loss function of `name` and the names of its inputs, in order."""
    import keras

    from keras_distill.losses import fused

    if name in ("keras", "keras_kl"):
        loss = "kl_divergence" if name == "keras" else keras.losses.KLDivergence()
        distillation = keras.distillation.LogitsDistillation(
            temperature=temperature, loss=loss
        )

        def loss_fn(student_logits, teacher_logits):
            return distillation.compute_loss(teacher_logits, student_logits)

        inputs = ("student_logits", "teacher_logits")
    elif name == "chunked":

        def loss_fn(student_logits, teacher_logits):
            return fused.chunked_distillation_loss(
                teacher_logits, student_logits, temperature,
                chunk_size=chunk_size,
            )

        inputs = ("student_logits", "teacher_logits")
    elif name in ("fused", "fused_ce"):
        with_labels = name == "fused_ce"

        def loss_fn(hidden_states, embedding, teacher_logits, labels):
            return fused.fused_distillation_loss(
                hidden_states,
                embedding,
                labels if with_labels else None,
                teacher_logits=teacher_logits,
                temperature=temperature,
                alpha=0.1 if with_labels else 0.0,
                chunk_size=chunk_size,
                vocabulary_chunk_size=vocabulary_chunk_size,
            )["loss"]

        inputs = ("hidden_states", "embedding", "teacher_logits", "labels")
    elif name == "fused_top_k":

        def loss_fn(hidden_states, embedding, log_probs, indices, labels):
            return fused.fused_distillation_loss(
                hidden_states,
                embedding,
                labels,
                teacher_top_log_probs=log_probs,
                teacher_top_indices=indices,
                temperature=temperature,
                alpha=0.1,
                chunk_size=chunk_size,
                vocabulary_chunk_size=vocabulary_chunk_size,
            )["loss"]

        inputs = (
            "hidden_states", "embedding", "top_log_probs", "top_indices",
            "labels",
        )
    elif name == "fused_hidden":

        def loss_fn(hidden_states, embedding, teacher_hidden, teacher_embedding):
            return fused.fused_distillation_loss(
                hidden_states,
                embedding,
                None,
                teacher_hidden_states=teacher_hidden,
                teacher_embedding=teacher_embedding,
                temperature=temperature,
                alpha=0.0,
                chunk_size=chunk_size,
                vocabulary_chunk_size=vocabulary_chunk_size,
            )["loss"]

        inputs = (
            "hidden_states", "embedding", "teacher_hidden", "teacher_embedding",
        )
    elif name == "floor":

        def loss_fn(hidden_states, embedding, teacher_hidden, teacher_embedding):
            student_logits = keras.ops.matmul(
                hidden_states, keras.ops.transpose(embedding)
            )
            teacher_logits = keras.ops.matmul(
                teacher_hidden, keras.ops.transpose(teacher_embedding)
            )
            return fused.chunked_distillation_loss(
                teacher_logits, student_logits, temperature,
                chunk_size=chunk_size,
            )

        inputs = (
            "hidden_states", "embedding", "teacher_hidden", "teacher_embedding",
        )
    elif name == "matmul":

        def loss_fn(hidden_states, embedding):
            return keras.ops.matmul(hidden_states, keras.ops.transpose(embedding))

        inputs = ("hidden_states", "embedding")
    else:
        raise ValueError(name)
    loss_fn.num_differentiable = (
        0 if name == "matmul"
        else 2 if name.startswith("fused") or name == "floor"
        else 1
    )
    return loss_fn, inputs


def make_inputs(names, tokens, vocabulary, hidden_dim):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = {
        "student_logits": (tokens, vocabulary),
        "teacher_logits": (tokens, vocabulary),
        "hidden_states": (tokens, hidden_dim),
        "embedding": (vocabulary, hidden_dim),
        "teacher_hidden": (tokens, hidden_dim),
        "teacher_embedding": (vocabulary, hidden_dim),
    }
    tensors = []
    for name in names:
        if name == "labels":
            array = rng.integers(0, vocabulary, size=(tokens,), dtype="int32")
        elif name == "top_indices":
            # Distinct ids per token: a random permutation's first k.
            array = np.argsort(
                rng.random((tokens, vocabulary), dtype="float32"), axis=-1
            )[:, :TOP_K].astype("int32")
        elif name == "top_log_probs":
            logits = rng.standard_normal((tokens, TOP_K), dtype="float32")
            array = (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
            array = array.astype("float32") - 1.0  # ~37% of the mass kept
        else:
            array = rng.standard_normal(shapes[name], dtype="float32")
            if name == "teacher_logits" or name == "student_logits":
                array *= 3.0
            elif name in ("embedding", "teacher_embedding"):
                array /= np.sqrt(hidden_dim) / 3.0
        tensors.append(keras.ops.convert_to_tensor(array))
        del array
    # Make sure every host-to-backend copy has finished before measuring.
    for tensor in tensors:
        keras.ops.convert_to_numpy(tensor[:1])
    return tensors


def run_worker(args):
    """Measures one loss on the backend of this process; writes JSON."""
    import keras

    loss_fn, input_names = build_loss(
        args.loss, args.temperature, args.chunk_size,
        args.vocabulary_chunk_size,
    )
    inputs = make_inputs(
        input_names, args.tokens, args.vocabulary, args.hidden_dim
    )
    run = compiled_value_and_grad(loss_fn, inputs)
    time.sleep(0.5)
    with PeakMemory() as memory:
        start = time.perf_counter()
        value, grads = run()
        value = float(keras.ops.convert_to_numpy(keras.ops.sum(value)))
        first_seconds = time.perf_counter() - start
    del grads
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _, grads = run()
        del grads
        seconds.append(time.perf_counter() - start)
    logits_bytes = args.tokens * args.vocabulary * 4
    gradient_bytes = (
        (args.tokens + args.vocabulary) * args.hidden_dim * 4
        if args.loss.startswith("fused") or args.loss == "floor"
        else logits_bytes
    )
    # The floor's FLOPs for the two paths that compute logits from hidden
    # states, one forward matmul's for `matmul`.
    matmul_flops = 2 * args.tokens * args.vocabulary * args.hidden_dim
    flops = {"fused_hidden": 4 * matmul_flops, "floor": 4 * matmul_flops}.get(
        args.loss, matmul_flops if args.loss == "matmul" else None
    )
    result = {
        "backend": keras.backend.backend(),
        "loss": args.loss,
        "value": value,
        "tokens": args.tokens,
        "vocabulary": args.vocabulary,
        "hidden_dim": args.hidden_dim,
        "peak_bytes": memory.peak,
        "peak_logits": memory.peak / logits_bytes,
        "peak_beyond_gradients_logits": (memory.peak - gradient_bytes)
        / logits_bytes,
        "first_call_seconds": first_seconds,
        "seconds": statistics.median(seconds) if seconds else first_seconds,
    }
    if flops is not None:
        result["gflops_per_second"] = flops / result["seconds"] / 1e9
    Path(args.worker_output).write_text(json.dumps(result, indent=2))


def format_table(results):
    lines = [
        "| backend | loss | value | peak beyond inputs, × logits | "
        "same, fixed mmap threshold | fixed, net of the gradients | "
        "s (median) | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r.get("gflops_per_second")
        lines.append(
            f"| {r['backend']} | {r['loss']} | {r['value']:.5f} | "
            f"{r['peak_logits']:.2f} | {r['fixed_peak_logits']:.2f} | "
            f"{r['fixed_peak_beyond_gradients_logits']:.2f} | "
            f"{r['seconds']:.2f} | {'' if rate is None else f'{rate:.1f}'} |"
        )
    by_key = {(r["backend"], r["loss"]): r for r in results}
    lines.append("")
    for backend in dict.fromkeys(r["backend"] for r in results):
        fused_row = by_key.get((backend, "fused_hidden"))
        floor_row = by_key.get((backend, "floor"))
        if fused_row and floor_row:
            lines.append(
                f"{backend}: fused_hidden / floor = "
                f"{fused_row['seconds'] / floor_row['seconds']:.2f} in time, "
                f"{fused_row['fixed_peak_logits'] / floor_row['fixed_peak_logits']:.2f} "
                "in peak memory (fixed mmap threshold)"
            )
    return "\n".join(lines)


def parse_args(argv):
    parser = benchmark_parser(__doc__, "runs/lm_loss_memory.json")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocabulary", type=int, default=262_144)
    parser.add_argument(
        "--hidden-dim", type=int, default=640,
        help="hidden size of the fused losses (Gemma 3 270M: 640)",
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--chunk-size", type=int, default=None,
        help="tokens per chunk (default: the losses' defaults)",
    )
    parser.add_argument(
        "--vocabulary-chunk-size", type=int, default=None,
        help="classes per tile of the fused losses (default: theirs)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args(argv)


def run_pass(args, worker_args, fixed_mmap_threshold):
    """One worker per (loss, backend); returns {(backend, loss): result}."""
    if fixed_mmap_threshold:
        os.environ[MMAP_THRESHOLD_VARIABLE] = str(MMAP_THRESHOLD)
    else:
        os.environ.pop(MMAP_THRESHOLD_VARIABLE, None)
    results = {}
    for loss in args.losses:
        for result in run_workers(
            __file__, args.backends, worker_args + ["--loss", loss]
        ):
            results[result["backend"], loss] = result
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.worker_output:
        sys.path.insert(0, str(ROOT))
        run_worker(args)
        return
    worker_args = [
        "--tokens", str(args.tokens),
        "--vocabulary", str(args.vocabulary),
        "--hidden-dim", str(args.hidden_dim),
        "--temperature", str(args.temperature),
    ]
    if args.chunk_size is not None:
        worker_args += ["--chunk-size", str(args.chunk_size)]
    if args.vocabulary_chunk_size is not None:
        worker_args += [
            "--vocabulary-chunk-size", str(args.vocabulary_chunk_size)
        ]
    fixed = run_pass(args, worker_args + ["--repeats", "0"], True)
    default = run_pass(
        args, worker_args + ["--repeats", str(args.repeats)], False
    )
    results = []
    for key, result in default.items():
        for name in ("peak_logits", "peak_beyond_gradients_logits"):
            result["fixed_" + name] = fixed[key][name]
        results.append(result)
    results.sort(key=lambda r: args.backends.index(r["backend"]))
    print(format_table(results))
    save_results(results, args.output)


if __name__ == "__main__":
    main()
