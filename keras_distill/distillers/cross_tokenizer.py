"""`CrossTokenizerDistiller`: a teacher and a student with different tokenizers.

Both models read the same raw text, each through its own tokenizer.
`keras_distill.language_models.alignment.TokenAligner` places both
tokenizations on the text's characters and groups the tokens into spans that
cover the same characters; the loss
(`keras_distill.losses.cross_tokenizer.span_distillation_loss`) compares the
two models span by span. The string work runs in the data pipeline
(`CrossTokenizerDistiller.preprocess`, `AlignedTextDataset`), never in the
compiled step, and gives every batch the same shapes, so the step compiles
once.
"""

import base64
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from keras import ops

from keras_distill import checks
from keras_distill.distillers import distiller
from keras_distill.distillers.distiller import Distiller
from keras_distill.distillers.distiller import single_sample_weight
from keras_distill.distillers.distiller import split_targets
from keras_distill.language_models import alignment
from keras_distill.language_models.hub import _check_causal_lm
from keras_distill.language_models.hub import _tokenizer
from keras_distill.language_models.hub import _vocabulary_size
from keras_distill.losses import cross_tokenizer
from keras_distill.losses import weighting
from keras_distill.metrics import TeacherStudentMetric
from keras_distill.targets.keys import TEACHER_LOGITS
from keras_distill.targets.keys import TEACHER_TOP_INDICES
from keras_distill.targets.keys import TEACHER_TOP_LOG_PROBS

_STUDENT_KEYS = ("token_ids", "padding_mask")


def _student_inputs(inputs):
    if isinstance(inputs, dict) and alignment.TEACHER_TOKEN_IDS in inputs:
        return {key: inputs[key] for key in _STUDENT_KEYS}
    return inputs


def teacher_inputs(x):
    """The teacher's model inputs of a batch from `TokenAligner.batch`.

    These are what a teacher-output cache is built from and looked up by
    (`TeacherOutputCache.build(teacher, teacher_inputs(x), ...)`): the
    teacher's own token ids, so the cache holds its outputs per teacher
    token and serves any student tokenizer.

    Args:
        x: A batch's inputs, with `"teacher_token_ids"` and
            `"teacher_padding_mask"`.

    Returns:
        `{"token_ids": ..., "padding_mask": ...}` of the teacher.

    Example:

    >>> import keras_hub
    >>> byte_tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    >>> aligner = alignment.TokenAligner(byte_tokenizer, byte_tokenizer)
    >>> x, _, _ = aligner.batch(["to be"], sequence_length=6)
    >>> teacher_inputs(x)["token_ids"].tolist()
    [[116, 111, 32, 98, 0, 0]]
    """
    return {
        "token_ids": x[alignment.TEACHER_TOKEN_IDS],
        "padding_mask": x[alignment.TEACHER_PADDING_MASK],
    }


def _serialize_tokenizer(tokenizer):
    """A tokenizer's Keras config with its vocabulary files inside.

    KerasHub tokenizers keep their vocabulary (a SentencePiece proto, BPE
    merges) out of their config, as assets; they ride here in base64 so
    that `from_config` rebuilds a working tokenizer.
    """
    config = keras.saving.serialize_keras_object(tokenizer)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_assets(directory)
        config["assets"] = {
            path.name: base64.b64encode(path.read_bytes()).decode("ascii")
            for path in sorted(Path(directory).iterdir())
        }
    return config


def _deserialize_tokenizer(config, custom_objects=None):
    config = dict(config)
    assets = config.pop("assets", {})
    tokenizer = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)
    with tempfile.TemporaryDirectory() as directory:
        for name, data in assets.items():
            (Path(directory) / name).write_bytes(base64.b64decode(data))
        tokenizer.load_assets(directory)
    return tokenizer


class AlignedTextDataset(keras.utils.PyDataset):
    """Batches of texts, tokenized and aligned as they are read.

    Each batch is `CrossTokenizerDistiller.preprocess` of its texts: the
    string work happens here, in the data pipeline, and every batch has the
    same shapes. With a teacher-output `cache` (built on `teacher_inputs`),
    each batch's `y` carries the teacher's cached outputs for its own
    tokens. The alignment's cost is recorded per batch in
    `alignment_seconds`.

    Args:
        aligner: The distiller's `TokenAligner`.
        texts: A list of strings.
        batch_size: Texts per batch.
        sequence_length: The student's tokens per text.
        teacher_sequence_length: The teacher's (default: `sequence_length`).
        cache: Optional `TeacherOutputCache` of the teacher's outputs.
        shuffle: Whether to reshuffle the texts every epoch.
        seed: Seed of the shuffling; two datasets with the same seed give
            the same batches.
        add_end: Whether each text ends with the end token.
        **kwargs: `keras.utils.PyDataset` arguments (`workers`, ...).

    Example:

    >>> import keras_hub
    >>> byte_tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    >>> aligner = alignment.TokenAligner(byte_tokenizer, byte_tokenizer)
    >>> batches = AlignedTextDataset(aligner, ["to be", "or not"], 2, 8, seed=0)
    >>> x, labels, sample_weight = batches[0]
    >>> len(batches), x["student_span"].shape, len(batches.alignment_seconds)
    (1, (2, 8), 1)
    """

    def __init__(
        self,
        aligner,
        texts,
        batch_size,
        sequence_length,
        teacher_sequence_length=None,
        cache=None,
        shuffle=True,
        seed=None,
        add_end=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        checks.check_positive_int("batch_size", batch_size)
        if isinstance(texts, str) or not len(texts):
            raise ValueError("`texts` must be a non-empty list of strings.")
        self.aligner = aligner
        self.texts = list(texts)
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.teacher_sequence_length = teacher_sequence_length
        self.cache = cache
        self.shuffle = shuffle
        self.add_end = add_end
        self.alignment_seconds = []
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(len(self.texts))
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self.texts) // self.batch_size)

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(len(self.texts))

    def __getitem__(self, index):
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        start = time.perf_counter()
        x, labels, sample_weight = self.aligner.batch(
            [self.texts[row] for row in rows],
            self.sequence_length,
            self.teacher_sequence_length,
            add_end=self.add_end,
        )
        self.alignment_seconds.append(time.perf_counter() - start)
        if self.cache is None:
            return x, labels, sample_weight
        return x, self.cache.batch_targets(teacher_inputs(x), labels), sample_weight


@keras.saving.register_keras_serializable(package="keras_distill")
class CrossTokenizerDistiller(Distiller):
    """Distills a causal LM into one with another tokenizer, span by span.

    Teacher and student read the same text, each in its own tokens
    (`preprocess`, or `dataset` for batches aligned as they are read). The
    tokens are aligned by the characters they cover into spans (see
    `keras_distill.language_models.alignment`) and the loss is

        alpha * CE(student) + (1 - alpha) * T² * mean over spans of D(span)

    with `CE` the student's next-token crossentropy on its own tokens and
    `D` chosen by `method`:

    - `"uld"`: Universal Logit Distillation (Boizard et al., 2024,
      arXiv:2402.12030), the L1 distance between the two next-token
      distributions at the span's first positions, each sorted in
      decreasing order. It needs no vocabulary mapping.
    - `"span"`: where a student token's text equals a teacher token's, the
      teacher's probability is used directly (forward KL over the shared
      tokens, renormalized), the other tokens by ULD; a span of several
      tokens on either side also compares the probability of its text
      under both models (the sum of its tokens' conditional
      log-probabilities), as a binary KL. With the same tokenizer on both
      sides this is exactly the token-level forward KL.

    The teacher is read as `k` entries per teacher token: its whole
    vocabulary by default, its top `teacher_top_k`, or the top-k a
    `TeacherOutputCache` stores per teacher token (build it on
    `teacher_inputs(x)`; `dataset(..., cache=cache)` attaches it). Tokens
    of either side in no span (cut off by the sequence length, or special
    tokens without a partner) train on their labels only.

    Args:
        student: The student `keras_hub.models.CausalLM`.
        teacher: The teacher `keras_hub.models.CausalLM`, or `None` when
            every batch carries the teacher's cached outputs.
        student_tokenizer: The student's tokenizer; default: its
            preprocessor's.
        teacher_tokenizer: The teacher's; default: its preprocessor's
            (required without a teacher model).
        method: `"uld"` or `"span"`, see above.
        teacher_top_k: Optional number of the teacher's largest entries per
            token the loss reads (renormalized); `None` reads them all. A
            cache's top-k is used as stored.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    >>> import keras_hub
    >>> from keras_distill.language_models import train_gemma3_tokenizer
    >>> def tiny_gemma(tokenizer, hidden_dim):
    ...     backbone = keras_hub.models.Gemma3Backbone(
    ...         vocabulary_size=tokenizer.vocabulary_size(), image_size=None,
    ...         num_layers=1, num_query_heads=1, num_key_value_heads=1,
    ...         hidden_dim=hidden_dim, intermediate_dim=2 * hidden_dim,
    ...         head_dim=hidden_dim)
    ...     return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    >>> lines = ["to be or not to be", "that is the question"] * 50
    >>> student_tokenizer = train_gemma3_tokenizer(lines, 23)
    >>> teacher_tokenizer = train_gemma3_tokenizer(lines, 26)
    >>> distiller = CrossTokenizerDistiller(
    ...     tiny_gemma(student_tokenizer, 8), tiny_gemma(teacher_tokenizer, 16),
    ...     student_tokenizer, teacher_tokenizer, method="span")
    >>> distiller.compile(optimizer="adam", alpha=0.5, temperature=1.0,
    ...     student_loss_fn="sparse_categorical_crossentropy")
    >>> x, labels, weight = distiller.preprocess(["to be or not"], 8)
    >>> history = distiller.fit(x, labels, sample_weight=weight, verbose=0)
    """

    def __init__(
        self,
        student,
        teacher,
        student_tokenizer=None,
        teacher_tokenizer=None,
        method="uld",
        teacher_top_k=None,
        **kwargs,
    ):
        _check_causal_lm("student", student)
        if teacher is not None:
            _check_causal_lm("teacher", teacher)
        if method not in cross_tokenizer.METHODS:
            raise ValueError(
                f"`method` must be one of {cross_tokenizer.METHODS}, got {method!r}."
            )
        checks.check_positive_int("teacher_top_k", teacher_top_k, allow_none=True)
        if isinstance(student_tokenizer, dict):
            student_tokenizer = _deserialize_tokenizer(student_tokenizer)
        if isinstance(teacher_tokenizer, dict):
            teacher_tokenizer = _deserialize_tokenizer(teacher_tokenizer)
        student_tokenizer = student_tokenizer or _tokenizer(student)
        if teacher_tokenizer is None and teacher is not None:
            teacher_tokenizer = _tokenizer(teacher)
        for name, tokenizer in (
            ("student_tokenizer", student_tokenizer),
            ("teacher_tokenizer", teacher_tokenizer),
        ):
            if tokenizer is None:
                raise ValueError(
                    f"`{name}` is needed to align the two tokenizations: pass "
                    "it, or give the model a preprocessor with a tokenizer."
                )
        self.method = method
        self.teacher_top_k = teacher_top_k
        self.aligner = alignment.TokenAligner(student_tokenizer, teacher_tokenizer)
        self._student_size = _vocabulary_size(student)
        self._teacher_size = (
            _vocabulary_size(teacher)
            if teacher is not None
            else self.aligner.teacher.vocabulary_size
        )
        for side, surfaces, size in (
            ("student", self.aligner.student, self._student_size),
            ("teacher", self.aligner.teacher, self._teacher_size),
        ):
            if surfaces.vocabulary_size > size:
                raise ValueError(
                    f"The {side} tokenizer has {surfaces.vocabulary_size} tokens "
                    f"but the {side} model scores {size}: give the {side} the "
                    "tokenizer it was built for."
                )
        student_ids, teacher_ids = self.aligner.shared_vocabulary()
        self._teacher_to_student = np.full(self._teacher_size, -1, "int32")
        self._teacher_to_student[teacher_ids] = student_ids
        self._student_is_shared = np.zeros(self._student_size, "bool")
        self._student_is_shared[student_ids] = True
        super().__init__(student=student, teacher=teacher, **kwargs)

    @property
    def student_tokenizer(self):
        return self.aligner.student.tokenizer

    @property
    def teacher_tokenizer(self):
        return self.aligner.teacher.tokenizer

    def shared_vocabulary_size(self):
        """How many student tokens have a teacher token of the same text."""
        return int(self._student_is_shared.sum())

    def _check_output_sizes(self, student, teacher):
        # Different vocabularies are the point; the spans pair the outputs.
        pass

    def build(self, input_shape):
        # KerasHub causal LMs are built when constructed.
        self.built = True

    def preprocess(
        self, texts, sequence_length=None, teacher_sequence_length=None, add_end=False
    ):
        """Tokenizes and aligns texts into fixed-shape NumPy arrays.

        Args:
            texts: A list of strings.
            sequence_length: The student's tokens per text (default: its
                preprocessor's `sequence_length`).
            teacher_sequence_length: The teacher's (default: the student's).
            add_end: Whether each text ends with the end token.

        Returns:
            `(x, labels, sample_weight)`, see `TokenAligner.batch`.

        Raises:
            AlignmentError: A tokenizer does not spell a text exactly (a
                normalizer changed it); the error names the text.
        """
        return self.aligner.batch(
            texts,
            self._sequence_length(sequence_length),
            teacher_sequence_length,
            add_end=add_end,
        )

    def dataset(
        self,
        texts,
        batch_size=32,
        sequence_length=None,
        teacher_sequence_length=None,
        cache=None,
        shuffle=True,
        seed=None,
        add_end=False,
    ):
        """An `AlignedTextDataset` of `texts` for `fit` and `evaluate`.

        Args:
            texts: A list of strings.
            batch_size: Texts per batch.
            sequence_length: The student's tokens per text (default: its
                preprocessor's).
            teacher_sequence_length: The teacher's (default: the student's).
            cache: Optional `TeacherOutputCache` built on `teacher_inputs`
                of the same texts.
            shuffle: Whether to reshuffle every epoch.
            seed: Seed of the shuffling.
            add_end: Whether each text ends with the end token.

        Returns:
            An `AlignedTextDataset`.
        """
        return AlignedTextDataset(
            self.aligner,
            texts,
            batch_size,
            self._sequence_length(sequence_length),
            teacher_sequence_length,
            cache=cache,
            shuffle=shuffle,
            seed=seed,
            add_end=add_end,
        )

    def _sequence_length(self, sequence_length):
        if sequence_length is not None:
            return sequence_length
        length = getattr(getattr(self.student, "preprocessor", None), "sequence_length", None)
        if length is None:
            raise ValueError(
                "Pass `sequence_length`: the student has no preprocessor to "
                "take it from."
            )
        return length

    def compile(self, optimizer="adam", metrics=None, distillation_loss_fn=None, **kwargs):
        """`Distiller.compile`; the soft loss is set by `method` instead.

        Args:
            optimizer: Optimizer for the student.
            metrics: Metrics of the student's predictions against its labels;
                teacher-student metrics (`TeacherAgreement`, ...) compare
                logits over one vocabulary and are refused.
            distillation_loss_fn: Must stay `None`.
            **kwargs: Other `Distiller.compile` arguments (`student_loss_fn`,
                `alpha`, `temperature`, ...).
        """
        if distillation_loss_fn is not None:
            raise ValueError(
                "A CrossTokenizerDistiller's soft loss is its `method` ('uld' or "
                "'span'), which compares distributions over two vocabularies; "
                "leave `distillation_loss_fn` as None."
            )
        teacher_metrics = [
            m
            for m in [*(metrics or []), *(kwargs.get("weighted_metrics") or [])]
            if isinstance(m, TeacherStudentMetric)
        ]
        if teacher_metrics:
            raise ValueError(
                f"{[m.name for m in teacher_metrics]} compare teacher and student "
                "logits over one vocabulary, which these models do not share: "
                "compile without them."
            )
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def call(self, inputs, training=None):
        return super().call(_student_inputs(inputs), training=training)

    def _checked_inputs(self, x):
        """Token ids of both models outside their vocabularies replaced by 0.

        Checked in the step as `CausalLMDistiller` does: JAX's embedding
        lookup gives NaN for such an id, torch and TensorFlow fail inside
        the model.
        """
        if not isinstance(x, dict) or alignment.TEACHER_TOKEN_IDS not in x:
            raise ValueError(
                "A CrossTokenizerDistiller step reads both models' tokens and "
                "their alignment: pass the `x` of `preprocess` or `dataset` "
                f"(keys 'token_ids', 'padding_mask', {list(alignment.ALIGNMENT_KEYS)})."
            )
        x = {key: ops.convert_to_tensor(value) for key, value in x.items()}
        checked = []
        for key, size in (
            ("token_ids", self._student_size),
            (alignment.TEACHER_TOKEN_IDS, self._teacher_size),
        ):
            token_ids = x[key]
            valid = (token_ids >= 0) & (token_ids < size)
            first_bad = ops.argmax(
                ops.cast(ops.reshape(ops.logical_not(valid), (-1,)), "int32")
            )
            value = ops.take(ops.reshape(token_ids, (-1,)), first_bad)
            x[key] = ops.where(valid, token_ids, 0)
            checked.append(
                (distiller._TOKEN_OUT_OF_RANGE, ops.logical_not(ops.all(valid)), value, size)
            )
        return x, checked

    def _teacher_entries(self, x, teacher_outputs):
        """The teacher's `(scores, token ids)` of `k` entries per token."""
        if teacher_outputs is not None and TEACHER_TOP_INDICES in teacher_outputs:
            return (
                teacher_outputs[TEACHER_TOP_LOG_PROBS],
                ops.cast(teacher_outputs[TEACHER_TOP_INDICES], "int32"),
            )
        if teacher_outputs is not None:
            logits = teacher_outputs[TEACHER_LOGITS]
        elif self.teacher is None:
            raise ValueError(
                "This CrossTokenizerDistiller has no teacher, so each batch's "
                f"`y` must carry the teacher's outputs ('{TEACHER_TOP_LOG_PROBS}' "
                f"and '{TEACHER_TOP_INDICES}', or '{TEACHER_LOGITS}') per teacher "
                "token: `dataset(texts, cache=cache)` attaches them."
            )
        else:
            logits = self.teacher(teacher_inputs(x), training=False)
        logits = ops.cast(logits, "float32")
        if self.teacher_top_k is not None and self.teacher_top_k < logits.shape[-1]:
            return ops.top_k(logits, self.teacher_top_k, sorted=False)
        indices = ops.arange(logits.shape[-1], dtype="int32")
        return logits, ops.broadcast_to(indices, ops.shape(logits))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Hard-label crossentropy plus the span-level soft loss.

        Teacher entries of padded teacher positions are replaced before any
        maths; a NaN, `+inf` or all `-inf` teacher row among the real ones,
        or a token id or label outside a vocabulary, gives the step a zero
        gradient and a NaN loss that stops `fit` with an error naming it
        (`Distiller._finish_loss`).
        """
        labels, teacher_outputs = split_targets(y)
        x, input_checks = self._checked_inputs(x)
        sample_weight = single_sample_weight(sample_weight)
        # Padding never counts, whatever the weights (as in CausalLMDistiller).
        mask = ops.cast(x["padding_mask"], "float32")
        sample_weight = mask if sample_weight is None else (
            weighting.broadcast_weights(sample_weight, mask) * mask
        )
        student_logits = ops.cast(y_pred, "float32")
        if labels is None:
            raise ValueError(
                "A CrossTokenizerDistiller needs the student's labels `y` (the "
                "next tokens), as `preprocess` and `dataset` return them."
            )
        student_loss, label_checks = self._hard_loss(labels, student_logits, sample_weight)
        scores, indices = self._teacher_entries(x, teacher_outputs)
        scores = ops.stop_gradient(ops.cast(scores, "float32"))
        real = ops.expand_dims(ops.cast(x[alignment.TEACHER_PADDING_MASK], "bool"), -1)
        # Selected before any maths: NaN at padding would reach the gradient.
        scores = ops.where(real, scores, 0.0)
        row_sum = ops.sum(scores, axis=-1)
        broken = (
            ops.isnan(row_sum)
            | ops.equal(row_sum, float("inf"))
            | ops.equal(ops.max(scores, axis=-1), float("-inf"))
        )
        teacher_finite = ops.logical_not(ops.any(broken))
        scores = ops.where(teacher_finite, scores, 0.0)
        distillation_loss = cross_tokenizer.span_distillation_loss(
            scores,
            indices,
            x[alignment.TEACHER_LABELS],
            x[alignment.TEACHER_SPAN],
            student_logits,
            ops.clip(ops.cast(labels, "int32"), 0, self._student_size - 1),
            x[alignment.STUDENT_SPAN],
            method=self.method,
            teacher_to_student=self._teacher_to_student,
            student_is_shared=self._student_is_shared,
            temperature=self.temperature,
            sample_weight=sample_weight,
        )
        loss = self.alpha * student_loss + (1.0 - self.alpha) * distillation_loss
        return self._finish_loss(
            loss=loss,
            student_loss=student_loss,
            distillation_loss=distillation_loss,
            student_outputs=student_logits,
            sample_weight=sample_weight,
            training=training,
            teacher_finite=teacher_finite,
            checks=input_checks + label_checks,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            student_tokenizer=_serialize_tokenizer(self.student_tokenizer),
            teacher_tokenizer=_serialize_tokenizer(self.teacher_tokenizer),
            method=self.method,
            teacher_top_k=self.teacher_top_k,
        )
        return config
