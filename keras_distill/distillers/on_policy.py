"""On-policy and sequence-level distillation for KerasHub causal LMs.

Token-level distillation trains the student on a fixed corpus, text it would
never write itself. Two remedies, both for `keras_distill.distillers.
CausalLMDistiller`:

- On-policy (GKD-style): `CausalLMDistiller(..., on_policy=
  OnPolicyGeneration(fraction=...))`. Before each training step, with
  probability `fraction` (drawn from a seeded generator), the batch's prompts
  (its first `prompt_length` tokens) are continued by the *current* student
  with a KerasHub sampler; the step then runs teacher and student on those
  sequences and minimizes the compiled divergence over the generated tokens
  only. Otherwise the step is the ordinary supervised one. For instruction
  data, whose prompts differ in length, `prompt_length="sample_weight"`
  takes each row's prompt from its loss weights instead: the tokens before
  its first weighted label, as KerasHub's CausalLM preprocessors weight the
  response only (`prompt_lengths`); each row is continued from its own
  prompt's end.
- Sequence-level: `generate_sequences(teacher, prompts, ...)` generates
  the teacher's continuations of a prompt set once and returns `(x, labels,
  sample_weight)` that weight the continuation only; the same
  `CausalLMDistiller` trains on them with hard crossentropy (`alpha=1`)
  and/or the teacher's token distributions (`alpha < 1`).

Generation runs outside the compiled training step, in
`OnPolicyGenerator.on_train_batch_begin`, with the causal LM's own compiled
`generate_function`, built once and always called with the same shapes, so it
is never differentiated through and nothing recompiles. The generated batch
reaches the compiled step through non-trainable variables
(`GeneratedBatch`), which the step reads in place of the input batch when
its `active` flag is set: data pipelines (tf.data's prefetch, JAX's
look-ahead on accelerators) read batches ahead of the step, so only
variables set between steps carry sequences sampled from the weights of that
very step.
"""

import math
import numbers
import time

import keras
import numpy as np
from keras import ops

from keras_distill import backend
from keras_distill import checks
from keras_distill.language_models.hub import _check_causal_lm
from keras_distill.language_models.hub import _keras_hub
from keras_distill.metrics import TeacherStudentMetric

SAMPLERS = ("greedy", "random", "top_k", "top_p")


# `OnPolicyGeneration(prompt_length=...)` for per-row prompts read from the
# batch's `sample_weight`.
PROMPT_FROM_SAMPLE_WEIGHT = "sample_weight"


def make_sampler(sampler, temperature=1.0, seed=None):
    """A KerasHub sampler from a name, or a checked sampler instance.

    Args:
        sampler: One of `SAMPLERS` (`"greedy"`, `"random"`, `"top_k"`,
            `"top_p"`), or a `keras_hub.samplers.Sampler`.
        temperature: Sampling temperature `> 0` for a named sampler; a
            sampler instance keeps its own (which is checked too).
        seed: Optional integer seed of a named random sampler.

    Returns:
        A `keras_hub.samplers.Sampler`.

    Example:

    >>> make_sampler("random", temperature=0.7, seed=1).temperature
    0.7
    """
    samplers = _keras_hub().samplers
    if isinstance(sampler, samplers.Sampler):
        checks.check_positive_number("temperature", sampler.temperature)
        return sampler
    checks.check_positive_number("temperature", temperature)
    if sampler == "greedy":
        return samplers.GreedySampler(temperature=temperature)
    classes = {
        "random": samplers.RandomSampler,
        "top_k": samplers.TopKSampler,
        "top_p": samplers.TopPSampler,
    }
    if sampler not in classes:
        raise ValueError(
            f"`sampler` must be one of {SAMPLERS} or a "
            f"`keras_hub.samplers.Sampler`, got {sampler!r}."
        )
    return classes[sampler](temperature=temperature, seed=seed)


class SequenceGenerator:
    """Continues prompts with a causal LM's compiled `generate_function`.

    The generator is a second causal LM of the same class sharing the model's
    backbone (so it always reads the model's current weights) with its own
    sampler; its generate function is made once. Every call gets inputs of
    the same shape `(batch_size, length)`, so it compiles once.

    Args:
        causal_lm: A `keras_hub.models.CausalLM`.
        sampler: A `keras_hub.samplers.Sampler`.
        stop_token_ids: Optional tuple of token ids that end a continuation.
        compile_decode_step: Whether to trace the per-token decode step on
            PyTorch (`keras_distill.backend.compile_decode_step`: the same
            samples, about 2x faster); no effect on JAX and TensorFlow,
            which compile the whole `generate_function`.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.Gemma3Backbone(
    ...     vocabulary_size=20, image_size=None, num_layers=1,
    ...     num_query_heads=1, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=8)
    >>> model = keras_hub.models.Gemma3CausalLM(
    ...     backbone=backbone, preprocessor=None)
    >>> generator = SequenceGenerator(model, make_sampler("greedy"))
    >>> token_ids, mask = generator(
    ...     np.ones((2, 5), "int32"), np.array([[1, 1, 0, 0, 0]] * 2, bool))
    >>> token_ids.shape, bool(mask.all())
    ((2, 5), True)
    """

    def __init__(
        self, causal_lm, sampler, stop_token_ids=None, compile_decode_step=True
    ):
        self.model = type(causal_lm)(
            backbone=causal_lm.backbone, preprocessor=None
        )
        self.model.compile(sampler=sampler)
        if compile_decode_step:
            # The private model only: the user's `causal_lm` stays eager.
            backend.compile_decode_step(self.model)
        self.stop_token_ids = (
            None if stop_token_ids is None else tuple(stop_token_ids)
        )
        self.generate_function = self.model.make_generate_function()

    def __call__(self, token_ids, padding_mask):
        """Fills the positions `padding_mask` leaves free.

        Args:
            token_ids: int32 array `(batch, length)`, prompts left-aligned.
            padding_mask: bool array, True on prompt tokens.

        Returns:
            `(token_ids, padding_mask)` NumPy arrays: the prompts with their
            continuations, and True on every real token (all of them, or
            up to and including a stop token).
        """
        outputs = self.generate_function(
            {
                "token_ids": ops.convert_to_tensor(token_ids, "int32"),
                "padding_mask": ops.convert_to_tensor(padding_mask, "bool"),
            },
            stop_token_ids=self.stop_token_ids,
        )
        return (
            ops.convert_to_numpy(outputs["token_ids"]).astype("int32"),
            ops.convert_to_numpy(outputs["padding_mask"]).astype(bool),
        )


def _check_room(prompt_length, max_new_tokens, sequence_length):
    if prompt_length > sequence_length:
        raise ValueError(
            f"Prompts of `prompt_length`={prompt_length} tokens are longer "
            f"than the sequence length {sequence_length}: use shorter "
            "prompts or longer sequences."
        )
    if prompt_length == sequence_length:
        raise ValueError(
            f"Prompts of `prompt_length`={prompt_length} tokens fill the "
            f"whole sequence length {sequence_length}, leaving no room to "
            "generate: use shorter prompts or longer sequences."
        )
    if max_new_tokens is not None and (
        prompt_length + max_new_tokens > sequence_length
    ):
        raise ValueError(
            f"`max_new_tokens`={max_new_tokens} after prompts of "
            f"{prompt_length} tokens exceed the sequence length "
            f"{sequence_length}; use at most "
            f"{sequence_length - prompt_length} new tokens."
        )


def continuation_batch(
    generator, prompt_ids, prompt_mask, max_new_tokens, sequence_length
):
    """Generates continuations and returns them as a training batch.

    Args:
        generator: A `SequenceGenerator`.
        prompt_ids: int32 array `(batch, prompt_length)`, prompts
            left-aligned.
        prompt_mask: bool array of the same shape, True on prompt tokens.
        max_new_tokens: Tokens generated after the longest prompt.
        sequence_length: Length of the returned sequences (zero-padded).

    Returns:
        `(x, labels, sample_weight)`: `x` a dict of `"token_ids"` and
        `"padding_mask"` of shape `(batch, sequence_length)`, the labels the
        tokens shifted by one, and weights 1 exactly where the label is a
        generated token (prompt tokens and padding weigh 0).
    """
    batch, prompt_length = prompt_ids.shape
    length = prompt_length + max_new_tokens
    token_ids = np.zeros((batch, length), "int32")
    padding_mask = np.zeros((batch, length), bool)
    token_ids[:, :prompt_length] = np.where(prompt_mask, prompt_ids, 0)
    padding_mask[:, :prompt_length] = prompt_mask
    generated_ids, generated_mask = generator(token_ids, padding_mask)
    return _training_batch(
        generated_ids, generated_mask, padding_mask, sequence_length
    )


def _training_batch(token_ids, padding_mask, prompt_mask, sequence_length):
    """`(x, labels, sample_weight)` of generated sequences, zero-padded.

    `padding_mask` is True on the tokens kept, `prompt_mask` on the prompt
    tokens; labels are the tokens shifted by one, weighted 1 exactly where
    that token was generated.
    """
    new_tokens = padding_mask & ~prompt_mask
    pad = ((0, 0), (0, sequence_length - token_ids.shape[1]))
    token_ids = np.pad(token_ids * padding_mask, pad)
    padding_mask = np.pad(padding_mask, pad)
    new_tokens = np.pad(new_tokens, pad)
    labels = np.pad(token_ids[:, 1:], ((0, 0), (0, 1)))
    sample_weight = np.pad(new_tokens[:, 1:], ((0, 0), (0, 1)))
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    return x, labels, sample_weight.astype("float32")


def prompt_lengths(sample_weight):
    """Each row's prompt length, read from its loss weights.

    A row's prompt is its tokens up to and including the one before its
    first weighted label (label `i` is token `i + 1`): with the weights of
    KerasHub's CausalLM preprocessors (0 on the prompt's labels, 1 on the
    response's), the prompt with its start token. A row with no weighted
    label, or whose only room is the last label, has nothing to continue:
    its length is the whole sequence.

    Args:
        sample_weight: Array `(batch, sequence_length)`, positive on the
            labels to train.

    Returns:
        int array `(batch,)` of prompt lengths, at most `sequence_length`.

    Example:

    >>> prompt_lengths(np.array([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]))
    array([3, 5])
    """
    weighted = np.asarray(sample_weight) > 0
    last = weighted.shape[1] - 1
    first = np.where(weighted.any(axis=1), weighted.argmax(axis=1), last)
    return first + 1


def response_continuation_batch(
    generator, x, labels, sample_weight, max_new_tokens
):
    """Continues each row after its own prompt, as a training batch.

    Row `i`'s prompt is its first `prompt_lengths(sample_weight)[i]` tokens
    (where `x["padding_mask"]` is set); the generator continues it for at
    most `max_new_tokens` tokens, up to the sequence's end. Rows with
    nothing to continue (no weighted label, or a prompt filling the
    sequence) are not generated into: they come back unchanged, weighted 0.

    Args:
        generator: A `SequenceGenerator`, always called with arrays of the
            batch's shape, so it compiles once.
        x: Dict of `"token_ids"` and `"padding_mask"` arrays `(batch,
            sequence_length)`.
        labels: The batch's labels.
        sample_weight: The batch's weights, positive on the response's
            labels.
        max_new_tokens: Most tokens generated after a row's prompt.

    Returns:
        `(x, labels, sample_weight)` as `continuation_batch` returns them.
    """
    token_ids = np.asarray(x["token_ids"], "int32")
    padding_mask = np.asarray(x["padding_mask"], bool)
    sequence_length = token_ids.shape[1]
    lengths = prompt_lengths(sample_weight)
    positions = np.arange(sequence_length)
    kept = lengths >= sequence_length
    prompt_mask = (positions < lengths[:, None]) & padding_mask
    # A row masked whole is one the generator leaves alone.
    prompt_mask[kept] = True
    generated_ids, generated_mask = generator(
        np.where(prompt_mask, token_ids, 0), prompt_mask
    )
    # Every row is sampled to the sequence's end (one shape, one
    # compilation); tokens past a row's `max_new_tokens` are dropped.
    generated_mask &= positions < (lengths + max_new_tokens)[:, None]
    x, new_labels, new_weight = _training_batch(
        generated_ids, generated_mask, prompt_mask, sequence_length
    )
    x["token_ids"][kept] = token_ids[kept]
    x["padding_mask"][kept] = padding_mask[kept]
    new_labels[kept] = np.asarray(labels)[kept]
    new_weight[kept] = 0.0
    return x, new_labels, new_weight


def _as_prompts(prompts):
    if isinstance(prompts, dict):
        if set(prompts) != {"token_ids", "padding_mask"}:
            raise ValueError(
                "`prompts` as a dict needs exactly 'token_ids' and "
                f"'padding_mask', got {sorted(prompts)}."
            )
        token_ids = np.asarray(prompts["token_ids"], "int32")
        padding_mask = np.asarray(prompts["padding_mask"], bool)
    else:
        token_ids = np.asarray(prompts)
        if not np.issubdtype(token_ids.dtype, np.integer):
            raise TypeError(
                "`prompts` must be an integer array of token ids (or a dict "
                f"with 'token_ids' and 'padding_mask'), got {token_ids.dtype}."
            )
        token_ids = token_ids.astype("int32")
        padding_mask = np.ones(token_ids.shape, bool)
    if token_ids.ndim != 2 or token_ids.shape != padding_mask.shape:
        raise ValueError(
            "`prompts` must be 2-D `(num_prompts, prompt_length)` with a "
            f"padding mask of the same shape, got {token_ids.shape} and "
            f"{padding_mask.shape}."
        )
    return token_ids, padding_mask


def generate_sequences(
    causal_lm,
    prompts,
    max_new_tokens,
    sequence_length=None,
    sampler="greedy",
    temperature=1.0,
    seed=None,
    batch_size=32,
    stop_token_ids=None,
):
    """Continues prompts with a causal LM, as training data.

    With the teacher, this is sequence-level distillation's data, generated
    once: a `CausalLMDistiller` trained on it with `alpha=1` learns the
    teacher's tokens (hard labels), with `alpha < 1` also the teacher's token
    distributions on the same sequences. Only continuation tokens carry
    weight. With a student, it gives the student's own samples, e.g. to
    score with the teacher.

    Args:
        causal_lm: The `keras_hub.models.CausalLM` that writes, e.g. the
            teacher.
        prompts: int array `(num_prompts, prompt_length)` of prompt tokens,
            or a dict of `"token_ids"` and `"padding_mask"` for prompts of
            different lengths (left-aligned).
        max_new_tokens: Tokens to generate after the longest prompt.
        sequence_length: Length of the returned sequences; defaults to
            `prompt_length + max_new_tokens`.
        sampler: One of `SAMPLERS` or a `keras_hub.samplers.Sampler`.
        temperature: Sampling temperature `> 0` of a named sampler.
        seed: Optional integer seed of a named random sampler.
        batch_size: Prompts generated per call (the last batch is padded, so
            generation compiles once).
        stop_token_ids: Optional token ids ending a continuation (the stop
            token is trained, what follows is padding).

    Returns:
        `(x, labels, sample_weight)` NumPy arrays as `fit` takes them.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.Gemma3Backbone(
    ...     vocabulary_size=20, image_size=None, num_layers=1,
    ...     num_query_heads=1, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=8)
    >>> teacher = keras_hub.models.Gemma3CausalLM(
    ...     backbone=backbone, preprocessor=None)
    >>> x, labels, weight = generate_sequences(
    ...     teacher, np.full((3, 2), 2), max_new_tokens=3, sequence_length=6)
    >>> weight.tolist()[0]
    [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """
    _check_causal_lm("causal_lm", causal_lm)
    prompt_ids, prompt_mask = _as_prompts(prompts)
    checks.check_positive_int("max_new_tokens", max_new_tokens)
    checks.check_positive_int("batch_size", batch_size)
    prompt_length = prompt_ids.shape[1]
    if sequence_length is None:
        sequence_length = prompt_length + max_new_tokens
    checks.check_positive_int("sequence_length", sequence_length)
    _check_room(prompt_length, max_new_tokens, sequence_length)
    generator = SequenceGenerator(
        causal_lm, make_sampler(sampler, temperature, seed), stop_token_ids
    )
    count = len(prompt_ids)
    parts = []
    for start in range(0, count, batch_size):
        ids = prompt_ids[start : start + batch_size]
        mask = prompt_mask[start : start + batch_size]
        real = len(ids)
        if real < batch_size:
            fill = batch_size - real
            ids = np.concatenate([ids, np.repeat(ids[:1], fill, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], fill, 0)])
        batch = continuation_batch(
            generator, ids, mask, max_new_tokens, sequence_length
        )
        parts.append(keras.tree.map_structure(lambda a: a[:real], batch))
    return keras.tree.map_structure(lambda *a: np.concatenate(a), *parts)


@keras.saving.register_keras_serializable(package="keras_distill")
class OnPolicyGeneration:
    """How a `CausalLMDistiller` mixes in the student's own generations.

    Before each training step, with probability `fraction` (drawn from a
    generator seeded by `seed`, the epoch and the step), the batch's prompts,
    its first `prompt_length` tokens, are continued by the current student
    for `max_new_tokens` tokens; the step then distills on those sequences,
    weighting only the generated tokens. `fraction=0` is plain token-level
    distillation, `fraction=1` on-policy distillation at every step (GKD's
    `lmbda`). Compile with `alpha=0` as GKD does: the hard-label term would
    otherwise train the student on its own samples.

    Prompts of different lengths per row, as in instruction data: with
    `prompt_length="sample_weight"`, each row's prompt is its tokens up to
    and including the one before its first weighted label (`prompt_lengths`),
    which is the prompt of KerasHub's `CausalLMPreprocessor` output for
    `{"prompts": ..., "responses": ...}` (it weights the response only); pass
    that `sample_weight` to `fit`. Each row is continued from its own
    prompt's end, for at most `max_new_tokens` tokens and up to the sequence's
    end. Rows with nothing to continue (all weights 0, such as a prompt that
    was truncated, or only the last label weighted) are not generated into
    and stay weighted 0.

    Args:
        fraction: Probability in `[0, 1]` that a step is on-policy.
        prompt_length: Number of leading tokens of each training example used
            as its prompt, or `"sample_weight"` for per-row prompts read from
            `fit`'s `sample_weight` (see above).
        max_new_tokens: Tokens generated after the prompt; defaults to the
            rest of the sequence. With per-row prompts, at most the sequence
            length minus 1.
        sampler: One of `SAMPLERS` or a `keras_hub.samplers.Sampler`.
        temperature: Sampling temperature `> 0` of a named sampler.
        seed: Integer seed of the step draws and of a named sampler; `None`
            draws one from NumPy's global generator at `fit`.
        stop_token_ids: Optional token ids that end a generation.

    Example:

    >>> config = OnPolicyGeneration(fraction=0.5, prompt_length=4, seed=0)
    >>> OnPolicyGeneration.from_config(config.get_config()).fraction
    0.5

    Per-row prompts, from weights like a KerasHub preprocessor's:

    >>> config = OnPolicyGeneration(prompt_length="sample_weight", seed=0)
    >>> OnPolicyGeneration.from_config(config.get_config()).prompt_length
    'sample_weight'
    >>> weight = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])
    >>> prompt_lengths(weight)  # rows continue at token 2 and at token 4
    array([2, 4])
    """

    def __init__(
        self,
        fraction=0.5,
        prompt_length=8,
        max_new_tokens=None,
        sampler="random",
        temperature=1.0,
        seed=None,
        stop_token_ids=None,
    ):
        checks.check_unit_interval("fraction", fraction)
        if isinstance(prompt_length, str):
            if prompt_length != PROMPT_FROM_SAMPLE_WEIGHT:
                raise ValueError(
                    "`prompt_length` must be a Python int >= 1 or "
                    f"{PROMPT_FROM_SAMPLE_WEIGHT!r} (per-row prompts read "
                    f"from `fit`'s `sample_weight`), got {prompt_length!r}."
                )
        else:
            checks.check_positive_int("prompt_length", prompt_length)
        checks.check_positive_int(
            "max_new_tokens", max_new_tokens, allow_none=True
        )
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
        ):
            raise TypeError(f"`seed` must be an integer or None, got {seed!r}.")
        if isinstance(sampler, dict):
            sampler = _keras_hub().samplers.deserialize(sampler)
        make_sampler(sampler, temperature, seed)  # checks name and temperature
        self.fraction = float(fraction)
        self.prompt_length = (
            prompt_length if isinstance(prompt_length, str)
            else int(prompt_length)
        )
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.temperature = float(temperature)
        self.seed = seed
        self.stop_token_ids = (
            None if stop_token_ids is None else [int(t) for t in stop_token_ids]
        )

    def get_config(self):
        sampler = self.sampler
        if not isinstance(sampler, str):
            sampler = _keras_hub().samplers.serialize(sampler)
        return {
            "fraction": self.fraction,
            "prompt_length": self.prompt_length,
            "max_new_tokens": self.max_new_tokens,
            "sampler": sampler,
            "temperature": self.temperature,
            "seed": self.seed,
            "stop_token_ids": self.stop_token_ids,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @property
    def per_row_prompts(self):
        """Whether each row's prompt is read from its `sample_weight`."""
        return self.prompt_length == PROMPT_FROM_SAMPLE_WEIGHT

    def new_tokens(self, sequence_length):
        """Most tokens generated per example for sequences of this length."""
        if not self.per_row_prompts:
            _check_room(
                self.prompt_length, self.max_new_tokens, sequence_length
            )
            if self.max_new_tokens is None:
                return sequence_length - self.prompt_length
            return self.max_new_tokens
        # Per-row prompts hold at least one token.
        if self.max_new_tokens is None:
            return sequence_length - 1
        if self.max_new_tokens >= sequence_length:
            raise ValueError(
                f"`max_new_tokens`={self.max_new_tokens} exceeds the room "
                f"after a prompt of at least one token in sequences of "
                f"{sequence_length}; use at most {sequence_length - 1} (each "
                "row's continuation also ends at the sequence's end)."
            )
        return self.max_new_tokens

    def check_fit_data(self, sequence_length, sample_weight):
        """Raises unless `fit`'s data suits this configuration.

        Args:
            sequence_length: Tokens per training example.
            sample_weight: `fit`'s `sample_weight` (or None).
        """
        self.new_tokens(sequence_length)
        if self.per_row_prompts and sample_weight is None:
            raise ValueError(
                f"`prompt_length`={PROMPT_FROM_SAMPLE_WEIGHT!r} reads each "
                "row's prompt from `fit`'s `sample_weight` (0 on the prompt's "
                "labels, positive on the response's, as KerasHub's "
                "CausalLMPreprocessor returns it); pass `sample_weight`."
            )


class GeneratedBatch(keras.layers.Layer):
    """Non-trainable variables carrying a generated batch into the step.

    `select` returns the generated batch when `active` is set and the given
    one otherwise; the compiled step calls it, so a flag and four arrays of
    fixed shape are all that change between steps.

    Args:
        batch_size: Examples per batch.
        sequence_length: Tokens per example.
    """

    def __init__(self, batch_size, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        shape = (batch_size, sequence_length)

        def variable(name, dtype, shape=shape):
            return self.add_weight(
                shape=shape, dtype=dtype, initializer="zeros",
                trainable=False, name=name,
            )

        self.active = variable("active", "int32", shape=())
        self.token_ids = variable("token_ids", "int32")
        self.padding_mask = variable("padding_mask", "int32")
        self.labels = variable("labels", "int32")
        self.sample_weight = variable("sample_weight", "float32")

    def assign(self, x, labels, sample_weight):
        self.token_ids.assign(x["token_ids"])
        self.padding_mask.assign(x["padding_mask"].astype("int32"))
        self.labels.assign(labels)
        self.sample_weight.assign(sample_weight)

    def select(self, x, y=None, sample_weight=None):
        """`(x, y, sample_weight)`, replaced by the generated batch if active."""
        active = ops.cast(ops.convert_to_tensor(self.active), "bool")
        token_ids = ops.convert_to_tensor(self.token_ids)
        padding_mask = ops.cast(ops.convert_to_tensor(self.padding_mask), "bool")
        x = dict(
            x,
            token_ids=ops.where(
                active, token_ids, ops.cast(x["token_ids"], "int32")
            ),
            padding_mask=ops.where(
                active, padding_mask, ops.cast(x["padding_mask"], "bool")
            ),
        )
        if y is not None:
            y = ops.where(
                active,
                ops.convert_to_tensor(self.labels),
                ops.cast(y, "int32"),
            )
        if sample_weight is not None:
            sample_weight = ops.where(
                active,
                ops.convert_to_tensor(self.sample_weight),
                ops.cast(sample_weight, "float32"),
            )
        return x, y, sample_weight


class TrainingBatches(keras.utils.PyDataset):
    """Fixed-size training batches, shuffled per epoch from a seed.

    Batch `i` of epoch `e` is a pure function of `(seed, e, i)`, so the
    `OnPolicyGenerator` callback reads the same batch's prompts as the step
    receives, however far ahead the data pipeline reads. A last, smaller
    batch is filled up with zero-weight copies of its first rows, so every
    batch has the same shape.

    Args:
        x: Dict of `"token_ids"` and `"padding_mask"` arrays.
        labels: Label array.
        sample_weight: Weight array (defaults to the padding mask).
        batch_size: Examples per batch.
        shuffle: Whether each epoch permutes the examples.
        seed: Integer seed of the permutations.
    """

    def __init__(self, x, labels, sample_weight, batch_size, shuffle, seed):
        super().__init__()
        self.x = {key: np.asarray(value) for key, value in x.items()}
        self.labels = np.asarray(labels)
        if sample_weight is None:
            sample_weight = self.x["padding_mask"]
        self.sample_weight = np.asarray(sample_weight, "float32")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.count = len(self.labels)

    def __len__(self):
        return math.ceil(self.count / self.batch_size)

    def indices(self, epoch, index):
        order = np.arange(self.count)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(
                self.count
            )
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        return rows

    def batch(self, epoch, index):
        rows = self.indices(epoch, index)
        fill = self.batch_size - len(rows)
        all_rows = np.concatenate([rows, np.repeat(rows[:1], fill)])
        x = {key: value[all_rows] for key, value in self.x.items()}
        weight = self.sample_weight[all_rows].copy()
        weight[len(rows) :] = 0.0
        return x, self.labels[all_rows], weight

    def __getitem__(self, index):
        return self.batch(self.epoch, index)


class OnPolicyGenerator(keras.callbacks.Callback):
    """Generates each on-policy batch just before its step, and logs it.

    `CausalLMDistiller.fit` adds it when the distiller has `on_policy`. At
    each step's begin it draws whether the step is on-policy; if so it
    continues the step's prompts with the current student and writes the
    batch into the distiller's `GeneratedBatch`. Each epoch's logs get
    `on_policy_fraction` (share of on-policy steps), `generation_seconds`,
    `generation_time_share` (generation time over the epoch's training
    time, from its start to its last step's end) and
    `generated_tokens_per_second`.

    Args:
        config: The `OnPolicyGeneration`.
        batches: The `TrainingBatches` the step reads.
        generated: The distiller's `GeneratedBatch`.
        generator: A `SequenceGenerator` of the student.
        seed: Integer seed of the step draws.
    """

    def __init__(self, config, batches, generated, generator, seed):
        super().__init__()
        self.config = config
        self.batches = batches
        self.generated = generated
        self.generator = generator
        self.seed = seed
        self.new_tokens = config.new_tokens(batches.x["token_ids"].shape[1])
        self._active = False
        self.last_batch = None

    def is_on_policy(self, epoch, step):
        """The seeded Bernoulli(`fraction`) draw of one step."""
        draw = np.random.default_rng([self.seed, epoch, step]).random()
        return bool(draw < self.config.fraction)

    def _set_active(self, active):
        if active != self._active:
            # `self.model` syncs the JAX trainer's state into the variables
            # and makes the trainer read them back after this callback.
            self.model  # noqa: B018
            self.generated.active.assign(int(active))
            self._active = active

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self.batches.epoch = epoch
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None
        self._steps = self._on_policy_steps = 0
        self._generation_seconds = 0.0
        self._generated_tokens = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._steps += 1
        if not self.is_on_policy(self._epoch, batch):
            self._set_active(False)
            return
        self.model  # noqa: B018  (current weights; see `_set_active`)
        start = time.perf_counter()
        x, labels, weight = self.batches.batch(self._epoch, batch)
        if self.config.per_row_prompts:
            # Filler rows of a last, smaller batch weigh 0, so stay as they are.
            generated = response_continuation_batch(
                self.generator, x, labels, weight, self.new_tokens
            )
        else:
            length = self.config.prompt_length
            generated = continuation_batch(
                self.generator,
                x["token_ids"][:, :length],
                x["padding_mask"][:, :length].astype(bool),
                self.new_tokens,
                x["token_ids"].shape[1],
            )
            # Filler rows of a last, smaller batch keep their zero weight.
            generated[2][weight.sum(axis=1) == 0] = 0.0
        self._generation_seconds += time.perf_counter() - start
        self._generated_tokens += int(generated[2].sum())
        self._on_policy_steps += 1
        self.generated.assign(*generated)
        self.last_batch = generated
        self._set_active(True)

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch_end = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._set_active(False)

    def on_train_end(self, logs=None):
        self._set_active(False)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self._last_batch_end is None:
            return
        train_seconds = self._last_batch_end - self._epoch_start
        logs["on_policy_fraction"] = self._on_policy_steps / self._steps
        logs["generation_seconds"] = self._generation_seconds
        logs["generation_time_share"] = self._generation_seconds / train_seconds
        logs["generated_tokens_per_second"] = (
            self._generated_tokens / self._generation_seconds
            if self._generation_seconds
            else 0.0
        )


class OnPolicyTraining:
    """The on-policy mode of a `CausalLMDistiller`: its checks and each `fit`.

    A `CausalLMDistiller` built with `on_policy` holds one and delegates to
    it: `compile` to `check_metrics`, `fit` to `check_fit_options` and
    `prepare_fit`, which cut the batches, make the `GeneratedBatch` whose
    variables the compiled step reads in place of its input batch, and the
    `OnPolicyGenerator` callback that fills them. The student's
    `SequenceGenerator` is made at the first `fit` and kept, so generation
    compiles once.

    Args:
        config: The `OnPolicyGeneration`.
        student: The student `keras_hub.models.CausalLM`, which generates.
        teacher: The teacher model; required, since it scores the student's
            generations, which no cache holds.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.Gemma3Backbone(
    ...     vocabulary_size=20, image_size=None, num_layers=1,
    ...     num_query_heads=1, num_key_value_heads=1, hidden_dim=8,
    ...     intermediate_dim=16, head_dim=8)
    >>> student = keras_hub.models.Gemma3CausalLM(
    ...     backbone=backbone, preprocessor=None)
    >>> training = OnPolicyTraining(
    ...     OnPolicyGeneration(fraction=1.0, prompt_length=2, seed=0),
    ...     student, teacher=student)
    >>> x = {"token_ids": np.ones((3, 6), "int32"),
    ...      "padding_mask": np.ones((3, 6), bool)}
    >>> batches, generated, callback = training.prepare_fit(
    ...     x, np.ones((3, 6), "int32"), batch_size=2)
    >>> len(batches), (generated.batch_size, generated.sequence_length)
    (2, (2, 6))
    """

    def __init__(self, config, student, teacher):
        if not isinstance(config, OnPolicyGeneration):
            raise TypeError(
                "`on_policy` must be a keras_distill.distillers.on_policy."
                f"OnPolicyGeneration, got {type(config).__name__}."
            )
        if teacher is None:
            raise ValueError(
                "`on_policy` needs the `teacher` model: it scores the "
                "student's generations, which no cache holds."
            )
        self.config = config
        self.student = student
        self.generator = None

    def check_metrics(self, metrics):
        """Refuses compiled label metrics; teacher–student ones are fine.

        Args:
            metrics: The compiled `metrics` and `weighted_metrics`.
        """
        student_metrics = [
            m for m in metrics if not isinstance(m, TeacherStudentMetric)
        ]
        if student_metrics:
            raise ValueError(
                "With `on_policy`, compiled `metrics` would compare the "
                "student's predictions on generated sequences with the "
                f"data's labels ({student_metrics}); compile with teacher "
                "metrics only (e.g. keras_distill.TeacherAgreement()), "
                "and evaluate label metrics separately."
            )

    def check_fit_options(
        self, validation_split, class_weight, steps_per_epoch, steps_per_execution
    ):
        """Refuses the `fit` and `compile` options on-policy training lacks."""
        unsupported = {
            "validation_split": validation_split,
            "class_weight": class_weight,
            "steps_per_epoch": steps_per_epoch,
        }
        for name, value in unsupported.items():
            if value:
                raise ValueError(
                    f"`{name}` is not supported with `on_policy`; pass "
                    "`validation_data`, `sample_weight` and whole epochs."
                )
        if steps_per_execution != 1:
            raise ValueError(
                "`on_policy` generates between steps, so compile with "
                "steps_per_execution=1."
            )

    def prepare_fit(
        self,
        x,
        y,
        sample_weight=None,
        batch_size=None,
        shuffle=True,
        generated_batch=None,
    ):
        """The batches, generated batch and callback of one on-policy `fit`.

        Args:
            x: Dict of NumPy `"token_ids"` and `"padding_mask"` arrays.
            y: The labels.
            sample_weight: Optional weights (per-row prompts read them).
            batch_size: Examples per batch (default 32).
            shuffle: Whether each epoch permutes the examples.
            generated_batch: The `GeneratedBatch` of an earlier `fit`, or
                None.

        Returns:
            `(batches, generated_batch, callback)`: the `TrainingBatches` to
            fit on, `generated_batch` (a new one when None was given), and
            the `OnPolicyGenerator` callback to add to the `fit`.
        """
        if not isinstance(x, dict) or not {"token_ids", "padding_mask"} <= set(x):
            raise TypeError(
                "With `on_policy`, `x` must be a dict of NumPy arrays "
                "'token_ids' and 'padding_mask' (the batches are cut and "
                f"generated for here), got {type(x).__name__}."
            )
        if y is None:
            raise ValueError("With `on_policy`, pass the labels `y`.")
        batch_size = batch_size or 32
        sequence_length = np.shape(x["token_ids"])[1]
        self.config.check_fit_data(sequence_length, sample_weight)
        seed = self.config.seed
        if seed is None:
            seed = int(np.random.randint(2**31 - 1))
        batches = TrainingBatches(x, y, sample_weight, batch_size, shuffle, seed)
        if generated_batch is None:
            generated_batch = GeneratedBatch(
                batch_size, sequence_length, name="generated_batch"
            )
        elif (generated_batch.batch_size, generated_batch.sequence_length) != (
            batch_size, sequence_length
        ):
            raise ValueError(
                f"This distiller was fit with batches of shape "
                f"{(generated_batch.batch_size, generated_batch.sequence_length)}; "
                "on-policy training keeps one shape so nothing recompiles."
            )
        if self.generator is None:
            self.generator = SequenceGenerator(
                self.student,
                make_sampler(self.config.sampler, self.config.temperature, seed),
                self.config.stop_token_ids,
            )
        callback = OnPolicyGenerator(
            self.config, batches, generated_batch, self.generator, seed
        )
        return batches, generated_batch, callback
