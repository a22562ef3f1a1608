"""Tests for `keras_distill.distillers.on_policy`: on-policy and sequence-level distillation."""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from keras_distill import distillers  # noqa: E402
from keras_distill import language_models  # noqa: E402
from keras_distill import losses  # noqa: E402
from keras_distill.distillers import on_policy  # noqa: E402
from keras_distill.metrics import TeacherAgreement  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402
from tests.conftest import tiny_gemma3  # noqa: E402

VOCABULARY_SIZE = 300
SEQUENCE_LENGTH = 12
PROMPT_LENGTH = 4
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def windows():
    """Real Tiny Shakespeare byte windows: `(x, labels, sample_weight)`."""
    text = (DATA_DIR / "tinyshakespeare.txt").read_text()[:2_000]
    x, labels, weight = language_models.language_model_windows(
        keras_hub.tokenizers.ByteTokenizer(), text, SEQUENCE_LENGTH,
        add_bos=False,
    )
    count = 2 * BATCH_SIZE
    return {k: v[:count] for k, v in x.items()}, labels[:count], weight[:count]


def _gemma(hidden_dim, seed):
    return tiny_gemma3(VOCABULARY_SIZE, hidden_dim, seed=seed)


@pytest.fixture(scope="module")
def models():
    student, teacher = _gemma(16, seed=1), _gemma(32, seed=2)
    return student, teacher, [w.copy() for w in student.get_weights()]


def _distiller(
    models, fraction=None, seed=0, run_eagerly=False, prompt_length=PROMPT_LENGTH,
    **config,
):
    """A distiller of a fresh student with the initial weights.

    Fresh, so that no state of an earlier `fit` (optimizer, leftover
    gradients) reaches the comparisons.
    """
    _, teacher, initial_weights = models
    student = _gemma(16, seed=1)
    student.set_weights(initial_weights)
    policy = None
    if fraction is not None:
        policy = on_policy.OnPolicyGeneration(
            fraction=fraction, prompt_length=prompt_length, seed=seed, **config
        )
    distiller = distillers.CausalLMDistiller(student, teacher, on_policy=policy)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.5),
        distillation_loss_fn=losses.GeneralizedJSD(beta=0.5),
        alpha=0.0,
        temperature=1.0,
        # Eager where a test compares one or two steps: no compilation cost.
        run_eagerly=run_eagerly,
    )
    return distiller


def _fit(distiller, data, steps=None):
    x, labels, weight = data
    if steps is not None:
        count = steps * BATCH_SIZE
        x, labels, weight = {k: v[:count] for k, v in x.items()}, labels[:count], weight[:count]
    return distiller.fit(
        x, labels, sample_weight=weight, batch_size=BATCH_SIZE, shuffle=False,
        verbose=0,
    )


def _weights(model):
    return [w.copy() for w in model.get_weights()]


@pytest.fixture(scope="module")
def on_policy_run(models, windows):
    """One on-policy step (fraction=1) from the initial student weights."""
    distiller = _distiller(models, fraction=1.0)
    history = _fit(distiller, windows, steps=1)
    return {
        "distiller": distiller,
        "history": history.history,
        "batch": distiller.on_policy_callback.last_batch,
        "weights": _weights(distiller.student),
    }


def test_only_generated_tokens_carry_weight(on_policy_run, windows):
    x, labels, weight = on_policy_run["batch"]
    prompts = windows[0]["token_ids"][:BATCH_SIZE, :PROMPT_LENGTH]
    # The prompts are the batch's first tokens; the rest is generated.
    np.testing.assert_array_equal(x["token_ids"][:, :PROMPT_LENGTH], prompts)
    # Label t is token t + 1; it weighs 1 exactly when that token is generated.
    np.testing.assert_array_equal(labels[:, :-1], x["token_ids"][:, 1:])
    expected = np.zeros_like(weight)
    expected[:, PROMPT_LENGTH - 1 : SEQUENCE_LENGTH - 1] = 1.0
    np.testing.assert_array_equal(weight, expected)
    assert x["padding_mask"].all()


def test_fraction_one_makes_every_step_on_policy_and_logs_it(on_policy_run):
    history = on_policy_run["history"]
    assert history["on_policy_fraction"] == [1.0]
    assert 0.0 < history["generation_time_share"][0] < 1.0
    assert history["generated_tokens_per_second"][0] > 0.0


def test_on_policy_step_is_the_supervised_step_on_the_generated_batch(
    models, on_policy_run
):
    # No gradient flows through generation: the on-policy step equals an
    # ordinary step on its generated tokens, taken as fixed data.
    supervised = _distiller(models, run_eagerly=True)
    _fit(supervised, on_policy_run["batch"])
    for expected, actual in zip(on_policy_run["weights"], _weights(supervised.student)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_seeded_run_is_reproducible_and_generation_compiles_once(
    models, windows, on_policy_run
):
    distiller = _distiller(models, fraction=1.0)
    _fit(distiller, windows, steps=1)
    batch = distiller.on_policy_callback.last_batch
    np.testing.assert_array_equal(
        batch[0]["token_ids"], on_policy_run["batch"][0]["token_ids"]
    )
    for expected, actual in zip(on_policy_run["weights"], _weights(distiller.student)):
        np.testing.assert_array_equal(actual, expected)
    # A second fit reuses the generate function and the compiled step.
    generate_function = distiller._on_policy_training.generator.generate_function
    train_function = distiller.train_function
    _fit(distiller, windows)
    assert distiller._on_policy_training.generator.generate_function is generate_function
    assert distiller._on_policy_training.generator.model.generate_function is generate_function
    assert distiller.train_function is train_function


def test_fraction_zero_is_the_supervised_step(models, windows):
    supervised = _distiller(models, run_eagerly=True)
    _fit(supervised, windows)
    distiller = _distiller(models, fraction=0.0, run_eagerly=True)
    history = _fit(distiller, windows)
    assert history.history["on_policy_fraction"] == [0.0]
    for expected, actual in zip(_weights(supervised.student), _weights(distiller.student)):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_step_draws_follow_the_fraction(models, windows):
    config = on_policy.OnPolicyGeneration(fraction=0.3, prompt_length=2, seed=5)
    callback = on_policy.OnPolicyGenerator(
        config,
        on_policy.TrainingBatches(*windows, BATCH_SIZE, False, 5),
        generated=None,
        generator=None,
        seed=5,
    )
    draws = [callback.is_on_policy(0, step) for step in range(2000)]
    assert abs(np.mean(draws) - 0.3) < 0.04
    assert draws == [callback.is_on_policy(0, step) for step in range(2000)]


def test_teacher_sequences_weight_the_continuation_only(models, windows):
    student, teacher, _ = models
    prompts = windows[0]["token_ids"][:3, :PROMPT_LENGTH]
    x, labels, weight = on_policy.generate_sequences(
        teacher, prompts, max_new_tokens=5, sequence_length=SEQUENCE_LENGTH,
        batch_size=2,
    )
    assert x["token_ids"].shape == (3, SEQUENCE_LENGTH)
    np.testing.assert_array_equal(x["token_ids"][:, :PROMPT_LENGTH], prompts)
    expected = np.zeros((3, SEQUENCE_LENGTH), "float32")
    expected[:, PROMPT_LENGTH - 1 : PROMPT_LENGTH + 4] = 1.0
    np.testing.assert_array_equal(weight, expected)
    # Greedy: the first new token is the teacher's most likely next token.
    logits = keras.ops.convert_to_numpy(
        teacher({"token_ids": prompts, "padding_mask": np.ones_like(prompts, bool)})
    )
    np.testing.assert_array_equal(
        x["token_ids"][:, PROMPT_LENGTH], logits[:, -1].argmax(-1)
    )
    # Sequence-level distillation: hard crossentropy on the teacher's tokens.
    distiller = distillers.CausalLMDistiller(student, teacher)
    distiller.compile(
        optimizer="sgd", student_loss_fn="sparse_categorical_crossentropy",
        alpha=1.0,
    )
    loss = distiller.compute_loss(x, labels, student(x), weight)
    assert np.isfinite(float(keras.ops.convert_to_numpy(loss)))


def test_config_round_trips(models):
    config = on_policy.OnPolicyGeneration(
        fraction=0.25, prompt_length=3, max_new_tokens=4, sampler="top_k",
        temperature=0.7, seed=3,
    )
    restored = on_policy.OnPolicyGeneration.from_config(config.get_config())
    assert restored.get_config() == config.get_config()
    sampler = keras_hub.samplers.TopPSampler(p=0.5, temperature=0.5)
    with_instance = on_policy.OnPolicyGeneration(sampler=sampler)
    again = on_policy.OnPolicyGeneration.from_config(with_instance.get_config())
    assert again.sampler.p == 0.5 and again.sampler.temperature == 0.5
    student, teacher, _ = models
    distiller = distillers.CausalLMDistiller(student, teacher, on_policy=config)
    serialized = distiller.get_config()["on_policy"]
    assert keras.saving.deserialize_keras_object(serialized).get_config() == (
        config.get_config()
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"fraction": 1.5}, ValueError, "`fraction` must be in"),
        ({"fraction": -0.1}, ValueError, "`fraction` must be in"),
        ({"temperature": 0.0}, ValueError, "`temperature` must be"),
        ({"temperature": -1.0}, ValueError, "`temperature` must be"),
        ({"sampler": "beam_search"}, ValueError, "`sampler` must be one of"),
        ({"prompt_length": 0}, ValueError, "`prompt_length` must be a Python int >= 1"),
        ({"prompt_length": 4.0}, TypeError, "`prompt_length` must be a Python int >= 1"),
        (
            {"prompt_length": "foo"}, ValueError,
            "`prompt_length` must be a Python int >= 1 or 'sample_weight'",
        ),
        ({"max_new_tokens": 0}, ValueError, "`max_new_tokens` must be a Python int >= 1 or None"),
    ],
)
def test_bad_configs_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        on_policy.OnPolicyGeneration(**kwargs)


def test_bad_sampler_instance_temperature():
    sampler = keras_hub.samplers.RandomSampler(temperature=0.0)
    with pytest.raises(ValueError, match="`temperature` must be"):
        on_policy.OnPolicyGeneration(sampler=sampler)


def test_beta_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="`beta` must be in"):
        losses.GeneralizedJSD(beta=1.5)
    with pytest.raises(ValueError, match="`beta` must be in"):
        losses.GeneralizedJSD(beta=-0.5)


@pytest.mark.parametrize(
    "prompt_length, max_new_tokens, match",
    [
        (SEQUENCE_LENGTH + 1, None, "longer than the sequence length"),
        (SEQUENCE_LENGTH, None, "leaving no room to generate"),
        (PROMPT_LENGTH, SEQUENCE_LENGTH, "`max_new_tokens`=12 after prompts"),
    ],
)
def test_prompts_must_leave_room(models, windows, prompt_length, max_new_tokens, match):
    student, teacher, _ = models
    distiller = distillers.CausalLMDistiller(
        student, teacher,
        on_policy=on_policy.OnPolicyGeneration(
            prompt_length=prompt_length, max_new_tokens=max_new_tokens
        ),
    )
    distiller.compile(optimizer="sgd", alpha=0.0)
    with pytest.raises(ValueError, match=match):
        _fit(distiller, windows)
    prompts = np.ones((2, prompt_length), "int32")
    with pytest.raises(ValueError, match=match):
        on_policy.generate_sequences(
            teacher, prompts, max_new_tokens=max_new_tokens or 1,
            sequence_length=SEQUENCE_LENGTH,
        )


def test_on_policy_refusals(models, windows):
    student, teacher, _ = models
    config = on_policy.OnPolicyGeneration(prompt_length=PROMPT_LENGTH)
    with pytest.raises(ValueError, match="needs the `teacher` model"):
        distillers.CausalLMDistiller(student, None, on_policy=config)
    with pytest.raises(TypeError, match="`on_policy` must be"):
        distillers.CausalLMDistiller(student, teacher, on_policy=0.5)
    distiller = distillers.CausalLMDistiller(student, teacher, on_policy=config)
    with pytest.raises(ValueError, match="compiled `metrics`"):
        distiller.compile(optimizer="sgd", alpha=0.0, metrics=["accuracy"])
    # Teacher–student metrics see the generated batch, so they are allowed.
    distiller.compile(optimizer="sgd", alpha=0.0, metrics=[TeacherAgreement()])
    with pytest.raises(TypeError, match="`x` must be a dict of NumPy arrays"):
        distiller.fit(windows[0]["token_ids"], windows[1])
    with pytest.raises(ValueError, match="`temperature` must be"):
        on_policy.generate_sequences(
            teacher, np.ones((2, 3), "int32"), 2, sampler="random",
            temperature=0.0,
        )


def test_save_and_load_after_on_policy_fit(on_policy_run, windows, tmp_path):
    """The generated-batch variables are distiller state: a saved distiller
    reloads with its on-policy setting and the student's exact weights."""
    distiller = on_policy_run["distiller"]
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.on_policy.get_config() == distiller.on_policy.get_config()
    for expected, actual in zip(
        distiller.student.get_weights(), loaded.student.get_weights()
    ):
        np.testing.assert_array_equal(expected, actual)
    x, _, _ = windows
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(distiller.student.predict(x, verbose=0)),
        keras.ops.convert_to_numpy(loaded.student.predict(x, verbose=0)),
    )


# Per-row prompts (`prompt_length="sample_weight"`), from instruction data:
# prompts of 2 and 8 tokens (continued from token 3 for `MAX_NEW_TOKENS`, and
# from token 9 to the sequence's end) and one of 11 with an empty response
# (start token + prompt fill the 12-token sequence: only the last label, the
# end token, is weighted). Three rows in batches of 4: the fourth row is
# `TrainingBatches`' zero-weight copy of the first.
PROMPT_TOKENS = (2, 8, 11)
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def instructions():
    """Real Shakespeare line pairs (a line, then the next) through a real
    `Gemma3CausalLMPreprocessor`: `(x, labels, sample_weight)`."""
    text = (DATA_DIR / "tinyshakespeare.txt").read_text()
    lines = [line for line in text.splitlines() if line.strip()][:4000]
    tokenizer = language_models.train_gemma3_tokenizer(lines, VOCABULARY_SIZE)
    prompts, responses = [], []
    for count in PROMPT_TOKENS:
        index = next(
            i for i, line in enumerate(lines)
            if len(keras.ops.convert_to_numpy(tokenizer(line))) == count
        )
        prompts.append(lines[index])
        responses.append(lines[index + 1])
    responses[-1] = ""
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    x, labels, weight = preprocessor({"prompts": prompts, "responses": responses})
    x = {
        "token_ids": keras.ops.convert_to_numpy(x["token_ids"]).astype("int32"),
        "padding_mask": keras.ops.convert_to_numpy(x["padding_mask"]).astype(bool),
    }
    labels = keras.ops.convert_to_numpy(labels).astype("int32")
    weight = keras.ops.convert_to_numpy(weight).astype("float32")
    return x, labels, weight


@pytest.fixture(scope="module")
def per_row_run(models, instructions):
    """One on-policy step with per-row prompts, greedy, from the initial weights."""
    distiller = _distiller(
        models, fraction=1.0, run_eagerly=True, prompt_length="sample_weight",
        max_new_tokens=MAX_NEW_TOKENS, sampler="greedy",
    )
    # The student before the step: generation samples from these weights.
    logits = keras.ops.convert_to_numpy(distiller.student(instructions[0]))
    history = _fit(distiller, instructions)
    return {
        "distiller": distiller,
        "history": history.history,
        "batch": distiller.on_policy_callback.last_batch,
        "logits": logits,
    }


def test_preprocessor_weights_give_per_row_prompts(instructions):
    _, _, weight = instructions
    # Start token + prompt; the row with nothing to continue gets the whole
    # sequence, as does a row of zero weights.
    np.testing.assert_array_equal(
        on_policy.prompt_lengths(weight), [3, 9, SEQUENCE_LENGTH]
    )
    assert weight[2, :-1].sum() == 0 and weight[2, -1] == 1
    np.testing.assert_array_equal(
        on_policy.prompt_lengths(np.zeros((1, SEQUENCE_LENGTH))), [SEQUENCE_LENGTH]
    )


def test_per_row_prompts_are_continued_from_their_own_end(per_row_run, instructions):
    x, labels, weight = per_row_run["batch"]
    original_x, original_labels, _ = instructions
    positions = np.arange(SEQUENCE_LENGTH)
    for row, (start, end) in enumerate([(3, 3 + MAX_NEW_TOKENS), (9, SEQUENCE_LENGTH)]):
        # The prompt is kept exactly, also where the other row generates.
        np.testing.assert_array_equal(
            x["token_ids"][row, :start], original_x["token_ids"][row, :start]
        )
        np.testing.assert_array_equal(x["padding_mask"][row], positions < end)
        assert (x["token_ids"][row, end:] == 0).all()
        # Greedy: the first new token is the student's most likely token
        # after this row's own prompt.
        assert x["token_ids"][row, start] == per_row_run["logits"][row, start - 1].argmax()
        # Label t is token t + 1; it weighs 1 exactly when that token is generated.
        np.testing.assert_array_equal(labels[row, :-1], x["token_ids"][row, 1:])
        np.testing.assert_array_equal(
            weight[row], ((positions >= start - 1) & (positions < end - 1)).astype("float32")
        )
    assert np.isfinite(per_row_run["history"]["loss"]).all()


def test_rows_with_nothing_to_continue_stay_unchanged_and_unweighted(
    per_row_run, instructions
):
    x, labels, weight = per_row_run["batch"]
    original_x, original_labels, original_weight = instructions
    # The prompt filling the sequence, and the zero-weight filler row (a copy
    # of the first) that makes the batch of 4.
    for row, source in [(2, 2), (3, 0)]:
        for key in ("token_ids", "padding_mask"):
            np.testing.assert_array_equal(x[key][row], original_x[key][source])
        np.testing.assert_array_equal(labels[row], original_labels[source])
        assert (weight[row] == 0).all()
    # A batch of only such rows: nothing generated, a zero loss, no NaN.
    rows = [2, 0, 2, 0]
    sample_weight = original_weight[rows]
    sample_weight[1::2] = 0.0
    distiller = per_row_run["distiller"]
    batch = on_policy.response_continuation_batch(
        distiller._on_policy_training.generator,
        {key: value[rows] for key, value in original_x.items()},
        original_labels[rows], sample_weight, MAX_NEW_TOKENS,
    )
    np.testing.assert_array_equal(batch[0]["token_ids"], original_x["token_ids"][rows])
    assert (batch[2] == 0).all()
    loss = distiller.compute_loss(batch[0], batch[1], distiller(batch[0]), batch[2])
    assert float(keras.ops.convert_to_numpy(loss)) == 0.0


def test_per_row_prompts_config_and_save_load(per_row_run, tmp_path):
    config = per_row_run["distiller"].on_policy
    assert config.get_config()["prompt_length"] == "sample_weight"
    restored = on_policy.OnPolicyGeneration.from_config(config.get_config())
    assert restored.get_config() == config.get_config()
    path = tmp_path / "distiller.keras"
    per_row_run["distiller"].save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.on_policy.get_config() == config.get_config()
    for expected, actual in zip(
        per_row_run["distiller"].student.get_weights(), loaded.student.get_weights()
    ):
        np.testing.assert_array_equal(expected, actual)


def test_per_row_prompts_refusals(models, instructions):
    x, labels, weight = instructions
    distiller = _distiller(models, fraction=1.0, prompt_length="sample_weight")
    with pytest.raises(ValueError, match="pass `sample_weight`"):
        distiller.fit(x, labels, batch_size=BATCH_SIZE, verbose=0)
    distiller = _distiller(
        models, fraction=1.0, prompt_length="sample_weight",
        max_new_tokens=SEQUENCE_LENGTH,
    )
    with pytest.raises(ValueError, match="`max_new_tokens`=12 exceeds the room"):
        _fit(distiller, instructions)


# `backend.compile_decode_step`: the traced decode step of PyTorch, a no-op
# on JAX and TensorFlow (which compile the whole generate function).
TRACED = keras.backend.backend() == "torch"


def _generators(model, sampler):
    """An eager and a decode-step-compiled generator, samplers of one seed."""
    return [
        on_policy.SequenceGenerator(
            model, on_policy.make_sampler(sampler, seed=3),
            compile_decode_step=compiled,
        )
        for compiled in (False, True)
    ]


def _prompts():
    token_ids = np.zeros((3, 9), "int32")
    token_ids[:, :3] = np.random.default_rng(0).integers(1, VOCABULARY_SIZE, (3, 3))
    padding_mask = np.zeros((3, 9), bool)
    padding_mask[:, :3] = True
    # A shorter prompt: its row keeps the prompt where others generate.
    padding_mask[1, 2] = False
    return token_ids, padding_mask


@pytest.mark.parametrize("sampler", ["greedy", "random"])
def test_compiled_decode_step_samples_as_eager_after_weight_updates(sampler):
    """Same samples for the same seed as KerasHub's eager generation, call
    after call, and after the weights change (they are graph inputs)."""
    model = _gemma(16, seed=4)
    eager, compiled = _generators(model, sampler)
    prompts = _prompts()
    samples = []
    for _ in range(2):
        expected, actual = eager(*prompts), compiled(*prompts)
        np.testing.assert_array_equal(actual[0], expected[0])
        np.testing.assert_array_equal(actual[1], expected[1])
        samples.append(actual[0])
    embeddings = model.backbone.token_embedding.embeddings
    # Large enough to change the greedy continuations too.
    embeddings.assign(embeddings * -3.0 + 0.1)
    expected, actual = eager(*prompts), compiled(*prompts)
    np.testing.assert_array_equal(actual[0], expected[0])
    assert not all((s == actual[0]).all() for s in samples)
    traced = vars(compiled.model).get("call_with_cache")
    if TRACED:
        # One graph for every cache position, and it was used.
        assert len(traced.graphs) == 1
        assert next(iter(traced.graphs.values()))[0] is not None
    else:
        assert traced is None
    assert "call_with_cache" not in vars(model)


@pytest.mark.skipif(not TRACED, reason="a no-op without PyTorch")
def test_compiled_decode_step_keeps_few_graphs_and_runs_other_calls_eagerly():
    import torch

    from keras_distill import backend

    model = _gemma(16, seed=4)
    generator = _gemma(16, seed=4)
    generator.set_weights(model.get_weights())
    backend.compile_decode_step(generator)
    step = generator.call_with_cache
    step.max_graphs = 2
    cache = lambda batch: tuple(  # noqa: E731
        (torch.zeros(batch, 6, 1, 8), torch.zeros(batch, 6, 1, 8))
        for _ in model.backbone.transformer_layers
    )
    with torch.no_grad():
        for batch in (1, 2, 3):
            token_ids = torch.ones(batch, 1, dtype=torch.int32)
            index = torch.tensor(2, dtype=torch.int32)
            expected = model.call_with_cache(token_ids, cache(batch), index)
            actual = generator.call_with_cache(token_ids, cache(batch), index)
            for e, a in zip(expected[:2], actual[:2]):
                np.testing.assert_array_equal(a.numpy(), e.numpy())
        # Prefill (several tokens) runs eagerly and traces nothing.
        generator.call_with_cache(torch.ones(1, 6, dtype=torch.int32), cache(1), 0)
    assert [key[2][0][0][0] for key in step.graphs] == [2, 3]
    # With gradients on (not a generation), the eager method.
    token_ids = torch.ones(3, 1, dtype=torch.int32)
    logits = generator.call_with_cache(token_ids, cache(3), 2)[0]
    assert logits.requires_grad
