"""Token-level distillation between KerasHub causal language models.

`CausalLMDistiller` distills one `keras_hub.models.CausalLM` (Gemma 3, Gemma,
Llama, GPT-2, ...) into another. Teacher and student read the same
`token_ids` and `padding_mask`; the hard loss is next-token crossentropy, the
soft loss a per-token divergence at temperature `T`, and both are averaged
over real tokens only. Which tokens are real comes from the padding mask (or
`sample_weight`), never from a token id, so a tokenizer whose padding id is
also its end-of-sequence id still trains on the real end-of-sequence token.
"""

import keras
from keras import ops

from keras_distill.distillers import distiller
from keras_distill.distillers import on_policy as on_policy_module
from keras_distill.distillers.distiller import Distiller
from keras_distill.distillers.distiller import _is_keras_kl
from keras_distill.distillers.distiller import single_sample_weight
from keras_distill.distillers.distiller import split_targets
from keras_distill.language_models.hub import _check_causal_lm
from keras_distill.language_models.hub import _keras_hub
from keras_distill.language_models.hub import _output_embedding
from keras_distill.language_models.hub import _soft_cap
from keras_distill.language_models.hub import _vocabulary_size
from keras_distill.language_models.hub import shared_vocabulary
from keras_distill.losses import divergences
from keras_distill.losses import fused
from keras_distill.losses import weighting
from keras_distill.losses.divergences import DistillationLoss
from keras_distill.targets.keys import TEACHER_LOGITS
from keras_distill.targets.keys import TEACHER_TOP_INDICES
from keras_distill.targets.keys import TEACHER_TOP_LOG_PROBS

# A finite stand-in for a -inf teacher logit in the fused loss: exp of it
# (over any temperature above 1e-8) is exactly 0 in float32, and it leaves
# room for the tiles' subtractions and divisions without overflow.
_MINUS_INF_STAND_IN = -1e30


def _fused_divergence(loss):
    """The name and arguments of a divergence the fused loss computes."""
    if loss is None or _is_keras_kl(loss):
        return "forward_kl", {}
    if isinstance(loss, str) and loss in divergences.DIVERGENCES:
        return loss, {}
    kwargs = {}
    if isinstance(loss, DistillationLoss):
        kwargs = dict(loss.divergence_kwargs)
        loss = loss.divergence
    for name, function in divergences.DIVERGENCES.items():
        if loss is function:
            return name, kwargs
    raise ValueError(
        "With fused_loss=True the divergence is computed tile by tile, so "
        "`distillation_loss_fn` must be one of keras_distill.losses "
        f"({sorted(divergences.DIVERGENCES)}, by name, function or class) or "
        f"Keras's KL; got {loss!r}."
    )


@keras.saving.register_keras_serializable(package="keras_distill")
class CausalLMDistiller(Distiller):
    """Token-level distillation from one KerasHub causal LM into another.

    Both models read the same `{"token_ids", "padding_mask"}` batch. The loss
    at each position is `alpha` times the next-token crossentropy plus
    `1 - alpha` times the `T²`-scaled divergence between the teacher's and
    the student's next-token distributions, averaged over real tokens: those
    the input `padding_mask` marks, weighted by `sample_weight` (per token,
    or per sequence; the weights are multiplied by the padding mask, so a
    per-sequence weight never counts padding). KerasHub's causal-LM
    preprocessors return `(x, labels, sample_weight)` with exactly these
    weights, and `preprocess` (or `fit` on raw strings) applies the
    student's. Padded positions never reach the loss: NaN or inf logits
    there are ignored. Token ids and labels outside the vocabulary stop
    `fit` with an error naming them.

    Logits are compared as the models really output them, after any
    final-logit soft-cap (Gemma 2) the model applies. Teacher and student must
    score the same tokens (see `shared_vocabulary`).

    Args:
        student: The `keras_hub.models.CausalLM` to train.
        teacher: The trained teacher `keras_hub.models.CausalLM`, or `None`
            when each batch carries the teacher's outputs (a cache).
        vocabulary_mapping: Optional 1-D integer array: the teacher's token
            id for each student token, for tokenizers that differ.
        fused_loss: If True, the loss is computed from the models' last
            hidden states and output embeddings a tile of tokens by
            vocabulary at a time (`keras_distill.losses.fused`), and full logits of
            either model are never materialized: for large vocabularies
            (Gemma's 262,144). Calling the Distiller then returns the
            student's hidden states (`predict` and `distiller.student` still
            give logits), and compiled `metrics` are refused.
        chunk_size: Tokens per tile of the fused loss (None: its default).
        vocabulary_chunk_size: Vocabulary entries per tile of the fused loss
            (None: its default).
        on_policy: Optional `keras_distill.distillers.on_policy.OnPolicyGeneration`:
            a share of the steps then distills on the student's own
            continuations of the batch's prompts, weighting the generated
            tokens only (on-policy distillation; see that module). `fit`
            then takes the data as NumPy arrays `x`, `y`, `sample_weight`.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    >>> import keras_hub
    >>> import numpy as np
    >>> def tiny_gemma(hidden_dim):
    ...     backbone = keras_hub.models.Gemma3Backbone(
    ...         vocabulary_size=50, image_size=None, num_layers=1,
    ...         num_query_heads=1, num_key_value_heads=1,
    ...         hidden_dim=hidden_dim, intermediate_dim=2 * hidden_dim,
    ...         head_dim=hidden_dim)
    ...     return keras_hub.models.Gemma3CausalLM(
    ...         backbone=backbone, preprocessor=None)
    >>> distiller = CausalLMDistiller(
    ...     student=tiny_gemma(8), teacher=tiny_gemma(16))
    >>> distiller.compile(optimizer="adam", alpha=0.5, temperature=2.0,
    ...     student_loss_fn="sparse_categorical_crossentropy")
    >>> x = {"token_ids": np.ones((2, 6), "int32"),
    ...      "padding_mask": np.ones((2, 6), "bool")}
    >>> history = distiller.fit(x, np.ones((2, 6), "int32"), verbose=0)
    """

    def __init__(
        self,
        student,
        teacher,
        vocabulary_mapping=None,
        fused_loss=False,
        chunk_size=None,
        vocabulary_chunk_size=None,
        on_policy=None,
        **kwargs,
    ):
        _check_causal_lm("student", student)
        if isinstance(on_policy, dict):
            on_policy = keras.saving.deserialize_keras_object(on_policy)
        self.on_policy = on_policy
        # Each mode is its own piece, chosen here once: None is the plain
        # (and the dense-loss) behaviour, `Distiller`'s own.
        self._on_policy_training = None if on_policy is None else (
            on_policy_module.OnPolicyTraining(on_policy, student, teacher)
        )
        if on_policy is not None and fused_loss:
            raise ValueError(
                "`on_policy` works with the dense loss only; pass "
                "fused_loss=False."
            )
        self._fused_loss_path = None if not fused_loss else _FusedLoss(
            chunk_size, vocabulary_chunk_size
        )
        # The generated batch's variables, read by the compiled step: state
        # of this model, made by the first on-policy `fit`.
        self._generated_batch = None
        self.fused_loss = bool(fused_loss)
        self.chunk_size = chunk_size
        self.vocabulary_chunk_size = vocabulary_chunk_size
        if teacher is not None:
            _check_causal_lm("teacher", teacher)
            self._vocabulary_size, self._vocabulary_mapping = shared_vocabulary(
                student, teacher, vocabulary_mapping
            )
        elif vocabulary_mapping is not None:
            raise ValueError(
                "`vocabulary_mapping` maps teacher logits, but `teacher` is "
                "None; cache the teacher's outputs over the student's "
                "vocabulary instead."
            )
        else:
            self._vocabulary_size = _vocabulary_size(student)
            self._vocabulary_mapping = None
        super().__init__(student=student, teacher=teacher, **kwargs)

    @classmethod
    def from_preset(
        cls,
        teacher,
        student,
        sequence_length=None,
        teacher_dtype=None,
        student_dtype=None,
        **kwargs,
    ):
        """Builds teacher and student from KerasHub presets.

        The teacher and the student each load with their own preprocessor,
        whose tokenizers are compared; the student's preprocessor is the
        shared one (`distiller.preprocessor`).

        Args:
            teacher: Preset name (e.g. `"gemma3_instruct_27b"`) or local
                preset directory of the teacher.
            student: Preset name (e.g. `"gemma3_instruct_1b"`) or local
                preset directory of the student.
            sequence_length: Optional sequence length of the shared
                preprocessor.
            teacher_dtype: Optional dtype (policy) of the teacher's weights,
                e.g. `"bfloat16"` to halve a large teacher's memory.
            student_dtype: Optional dtype (policy) of the student.
            **kwargs: Other `CausalLMDistiller` arguments.

        Returns:
            A `CausalLMDistiller`.

        Example:

        ```python
        distiller = CausalLMDistiller.from_preset(
            "gemma3_instruct_27b", "gemma3_instruct_1b", sequence_length=512,
            teacher_dtype="bfloat16")
        ```
        """
        keras_hub = _keras_hub()

        def load(preset, dtype):
            options = {} if dtype is None else {"dtype": dtype}
            return keras_hub.models.CausalLM.from_preset(preset, **options)

        teacher_model = load(teacher, teacher_dtype)
        student_model = load(student, student_dtype)
        if sequence_length is not None and student_model.preprocessor is not None:
            student_model.preprocessor.sequence_length = sequence_length
        return cls(student=student_model, teacher=teacher_model, **kwargs)

    @property
    def preprocessor(self):
        """The student's preprocessor, shared by teacher and student."""
        return getattr(self.student, "preprocessor", None)

    def preprocess(self, texts, sequence_length=None):
        """Tokenizes text into `(x, labels, sample_weight)` NumPy arrays.

        Args:
            texts: A list of strings, or a dict with `"prompts"` and
                `"responses"` lists (only response tokens are then trained).
            sequence_length: Optional length overriding the preprocessor's.

        Returns:
            `(x, labels, sample_weight)` as the student's preprocessor returns
            them, converted to NumPy.
        """
        if self.preprocessor is None:
            raise ValueError(
                "The student has no preprocessor to tokenize text with; "
                "build it with one (e.g. `from_preset`) or pass token ids."
            )
        if not isinstance(texts, dict):
            texts = _as_prompts_and_responses(self.preprocessor, texts)
        outputs = self.preprocessor(texts, sequence_length=sequence_length)
        return keras.tree.map_structure(ops.convert_to_numpy, outputs)

    def _check_output_sizes(self, student, teacher):
        # Vocabularies were checked by `shared_vocabulary`.
        pass

    def compile(self, optimizer="adam", metrics=None, **kwargs):
        all_metrics = [*(metrics or []), *(kwargs.get("weighted_metrics") or [])]
        if self._on_policy_training is not None:
            self._on_policy_training.check_metrics(all_metrics)
        if self._fused_loss_path is not None:
            self._fused_loss_path.compile(
                all_metrics, kwargs.get("distillation_loss_fn")
            )
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def _step_outputs(self, inputs, training):
        if training and self._generated_batch is not None:
            inputs, _, _ = self._generated_batch.select(inputs)
        inputs, _ = self._checked_inputs(inputs)
        if self._fused_loss_path is not None:
            return self._fused_loss_path.student_outputs(self.student, inputs, training)
        return super()._step_outputs(inputs, training)

    def _checked_inputs(self, x):
        """Token ids outside the vocabulary replaced by 0, and their check.

        Checked in the step: JAX's embedding lookup gives NaN for such an id
        (then blamed on the teacher), torch and TensorFlow fail deep inside
        the model.
        """
        if not isinstance(x, dict) or "token_ids" not in x:
            return x, []
        sizes = [_vocabulary_size(self.student)]
        if self.teacher is not None:
            sizes.append(_vocabulary_size(self.teacher))
        size = min(sizes)
        # All tensors: Keras refuses inputs that mix them with NumPy arrays.
        x = {key: ops.convert_to_tensor(value) for key, value in x.items()}
        token_ids = x["token_ids"]
        valid = (token_ids >= 0) & (token_ids < size)
        first_bad = ops.argmax(
            ops.cast(ops.reshape(ops.logical_not(valid), (-1,)), "int32")
        )
        value = ops.take(ops.reshape(token_ids, (-1,)), first_bad)
        x = dict(x, token_ids=ops.where(valid, token_ids, 0))
        failed = ops.logical_not(ops.all(valid))
        return x, [(distiller._TOKEN_OUT_OF_RANGE, failed, value, size)]

    def _teacher_logits(self, x):
        logits = super()._teacher_logits(x)
        if self._vocabulary_mapping is not None:
            return ops.take(logits, self._vocabulary_mapping, axis=-1)
        return logits[..., : self._vocabulary_size]

    def _shared_logits(self, student_logits):
        return student_logits[..., : self._vocabulary_size]

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        sample_weight = single_sample_weight(sample_weight)
        if isinstance(x, dict) and "padding_mask" in x:
            # Padding never counts: a per-example `sample_weight` scales the
            # real tokens of its sequence (their product), a per-token one
            # keeps its zeros.
            mask = ops.cast(x["padding_mask"], "float32")
            sample_weight = mask if sample_weight is None else (
                weighting.broadcast_weights(sample_weight, mask) * mask
            )
        if training and self._generated_batch is not None:
            x, y, sample_weight = self._generated_batch.select(
                x, y, sample_weight
            )
        if self._fused_loss_path is not None:
            return self._fused_loss_path.compute_loss(
                self, x, y, y_pred, sample_weight, training
            )
        return super().compute_loss(
            x, y, y_pred, sample_weight=sample_weight, training=training
        )

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        **kwargs,
    ):
        """`Distiller.fit`; with `on_policy`, generation before each step.

        With `on_policy`, `x` must be a dict of NumPy `"token_ids"` and
        `"padding_mask"` arrays and `y` the labels; the batches are cut here
        (`keras_distill.distillers.on_policy.TrainingBatches`) and an
        `on_policy.OnPolicyGenerator` callback generates the on-policy ones
        and logs `on_policy_fraction`, `generation_time_share` and
        `generated_tokens_per_second` (see `on_policy.OnPolicyTraining`).
        """
        if self._on_policy_training is None:
            return super().fit(
                x, y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                callbacks=callbacks, validation_split=validation_split,
                validation_data=validation_data, shuffle=shuffle,
                class_weight=class_weight, sample_weight=sample_weight,
                **kwargs,
            )
        self._check_compiled("fit")
        self._on_policy_training.check_fit_options(
            validation_split=validation_split,
            class_weight=class_weight,
            steps_per_epoch=kwargs.get("steps_per_epoch"),
            steps_per_execution=getattr(self, "steps_per_execution", 1),
        )
        batches, generated_batch, generator_callback = (
            self._on_policy_training.prepare_fit(
                x, y, sample_weight, batch_size, shuffle, self._generated_batch
            )
        )
        if generated_batch is not self._generated_batch:
            self._generated_batch = generated_batch
            # The step must be traced again to read the generated batch.
            self.train_function = None
        self.on_policy_callback = generator_callback
        return super().fit(
            batches, epochs=epochs, verbose=verbose, shuffle=False,
            validation_data=validation_data,
            callbacks=[generator_callback, *(callbacks or [])], **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        mapping = self._vocabulary_mapping
        config.update(
            vocabulary_mapping=None if mapping is None else mapping.tolist(),
            fused_loss=self.fused_loss,
            chunk_size=self.chunk_size,
            vocabulary_chunk_size=self.vocabulary_chunk_size,
            on_policy=None if self.on_policy is None else (
                keras.saving.serialize_keras_object(self.on_policy)
            ),
        )
        return config


class _FusedLoss:
    """The fused mode of a `CausalLMDistiller`: its loss from hidden states.

    With `fused_loss=True` the step's student outputs are its backbone's last
    hidden states, and `keras_distill.losses.fused.fused_distillation_loss`
    computes the hard and the soft term from them and the student's output
    embedding a tile of tokens by vocabulary at a time, so the student's
    full logits never exist. The teacher's side is the batch's cached
    logits or top-k targets, or else the teacher's own hidden states and
    output embedding (then its full logits never exist either).

    Args:
        chunk_size: Tokens per tile (None: the fused loss's default).
        vocabulary_chunk_size: Vocabulary entries per tile (None: its
            default).
    """

    def __init__(self, chunk_size, vocabulary_chunk_size):
        self.chunk_size = chunk_size
        self.vocabulary_chunk_size = vocabulary_chunk_size
        self.divergence = None
        self.divergence_kwargs = {}

    def compile(self, metrics, distillation_loss_fn):
        """Refuses compiled metrics; resolves the tiled divergence.

        Args:
            metrics: The compiled `metrics` and `weighted_metrics`.
            distillation_loss_fn: `compile`'s divergence.
        """
        if metrics:
            raise ValueError(
                "fused_loss=True never materializes the student's logits, "
                "so compiled `metrics` cannot see them: compile without "
                "`metrics` (the loss terms are still reported), or use "
                "fused_loss=False."
            )
        self.divergence, self.divergence_kwargs = _fused_divergence(
            distillation_loss_fn
        )

    def student_outputs(self, student, inputs, training):
        """The student's last hidden states, the step's `y_pred`."""
        return student.backbone(inputs, training=training)

    def compute_loss(
        self, distiller, x, y, hidden_states, sample_weight, training
    ):
        """`CausalLMDistiller.compute_loss` of the fused mode.

        Args:
            distiller: The `CausalLMDistiller`.
            x: The batch's (checked) inputs.
            y: Labels, or a dict of labels and cached teacher outputs.
            hidden_states: The student's last hidden states.
            sample_weight: Token weights, the padding mask included.
            training: Whether this is a training step.

        Returns:
            The loss, finished by `Distiller._finish_loss`.
        """
        labels, teacher_outputs = split_targets(y)
        if labels is None and distiller.alpha > 0:
            raise ValueError(
                f"The data has no labels `y` but alpha={distiller.alpha} "
                "weights a hard-label loss: pass labels, or compile with "
                "alpha=0."
            )
        x, checks = distiller._checked_inputs(x)
        real = weighting.real_positions(sample_weight, hidden_states)
        vocabulary_size = distiller._vocabulary_size
        if labels is not None:
            labels, label_checks = distiller._checked_labels(
                labels, sample_weight, vocabulary_size
            )
            checks = checks + label_checks
        teacher, teacher_finite = self._teacher(
            distiller, x, teacher_outputs, real
        )
        student = distiller.student.backbone
        terms = fused.fused_distillation_loss(
            hidden_states,
            _output_embedding(student)[:vocabulary_size],
            labels=labels,
            temperature=distiller.temperature,
            alpha=distiller.alpha,
            sample_weight=sample_weight,
            soft_cap=_soft_cap(student),
            divergence=self.divergence,
            chunk_size=self.chunk_size,
            vocabulary_chunk_size=self.vocabulary_chunk_size,
            **teacher,
            **self.divergence_kwargs,
        )
        return distiller._finish_loss(
            loss=terms["loss"],
            student_loss=terms["student_loss"],
            distillation_loss=terms["distillation_loss"],
            student_outputs=hidden_states,
            sample_weight=sample_weight,
            training=training,
            teacher_finite=teacher_finite,
            checks=checks,
        )

    def _teacher(self, distiller, x, teacher_outputs, real):
        """The teacher arguments of `fused_distillation_loss`, and finiteness.

        Positions outside `real` (padding) are zeroed before any check or
        maths, as in the dense loss.
        """

        def select(tensor):
            return tensor if real is None else ops.where(real, tensor, 0.0)

        if teacher_outputs is not None and TEACHER_TOP_INDICES in teacher_outputs:
            log_probs = select(ops.stop_gradient(
                ops.cast(teacher_outputs[TEACHER_TOP_LOG_PROBS], "float32")
            ))
            finite = ops.logical_not(ops.any(ops.isnan(log_probs)))
            return {
                "teacher_top_log_probs": ops.where(finite, log_probs, 0.0),
                "teacher_top_indices": teacher_outputs[TEACHER_TOP_INDICES],
            }, finite
        if teacher_outputs is not None:
            logits = select(ops.stop_gradient(
                ops.cast(teacher_outputs[TEACHER_LOGITS], "float32")
            ))
            # A -inf logit rules its class out, as in the dense loss; the
            # tiled maths gets a finite stand-in whose probability is
            # exactly 0 too. A row of -inf alone has no distribution.
            ruled_out = ops.equal(logits, float("-inf"))
            finite = ops.logical_not(ops.any(ops.all(ruled_out, axis=-1)))
            logits = ops.where(ruled_out, _MINUS_INF_STAND_IN, logits)
            finite = finite & ops.all(ops.isfinite(logits))
            return {"teacher_logits": ops.where(finite, logits, 0.0)}, finite
        teacher = distiller.teacher
        if teacher is None:
            raise ValueError(
                "This Distiller has no teacher, so each batch's `y` must "
                f"carry the teacher's outputs ('{TEACHER_LOGITS}', or "
                f"'{TEACHER_TOP_LOG_PROBS}' and '{TEACHER_TOP_INDICES}')."
            )
        hidden_states = select(ops.stop_gradient(
            teacher.backbone(x, training=False)
        ))
        embedding = _output_embedding(teacher.backbone)
        if distiller._vocabulary_mapping is not None:
            embedding = ops.take(
                embedding, distiller._vocabulary_mapping, axis=0
            )
        else:
            embedding = embedding[: distiller._vocabulary_size]
        finite = ops.all(ops.isfinite(hidden_states))
        return {
            "teacher_hidden_states": ops.where(finite, hidden_states, 0.0),
            "teacher_embedding": ops.stop_gradient(embedding),
            "teacher_soft_cap": _soft_cap(teacher.backbone),
        }, finite


def _as_prompts_and_responses(preprocessor, texts):
    """Plain text for a preprocessor that may want prompts and responses."""
    texts = [str(text) for text in texts]
    keras_hub = _keras_hub()
    if isinstance(preprocessor, keras_hub.models.Gemma3CausalLMPreprocessor):
        return {"prompts": [""] * len(texts), "responses": texts}
    return texts
