"""`Distiller`: a `keras.Model` that trains a student on a teacher's soft targets."""

import contextlib
import copy
import inspect
import math

import keras
from keras import ops

# Keras 3 has no public form of this one, and the package's private Keras
# imports are it and the two in `keras_distill/losses/weighting.py`:
# `tracking.no_automatic_dependency_tracking` is how Keras keeps its compiled
# metrics out of a model's tracked state, which teacher metrics need too.
from keras.src.utils import tracking

from keras_distill import backend as distill_backend
from keras_distill import checks
from keras_distill.distillers.feature_distillation import FeatureDistillation
from keras_distill.losses import divergences
from keras_distill.losses import sparse
from keras_distill.losses import weighting
from keras_distill.losses.weighting import scale_loss_for_distribution
from keras_distill.metrics import TeacherStudentMetric
from keras_distill.targets.keys import _TEACHER_OUTPUT_KEYS
from keras_distill.targets.keys import LABELS
from keras_distill.targets.keys import TEACHER_LOGITS
from keras_distill.targets.keys import TEACHER_TOP_INDICES
from keras_distill.targets.keys import TEACHER_TOP_LOG_PROBS

# Codes of the checks a step records in `Distiller._batch_status` when they
# fail; `NonFiniteLossGuard` turns them into errors.
_LABEL_OUT_OF_RANGE = 1


_TOKEN_OUT_OF_RANGE = 2


_TEACHER_PROBABILITIES = 3


# Spellings of Keras's probability-space KL that mean "KL of the softened
# distributions" in the keras.io idiom; they are computed from logits instead.
_KERAS_KL_NAMES = ("kl_divergence", "kld", "kullback_leibler_divergence")


def split_targets(y):
    """Splits a batch's `y` into labels and precomputed teacher outputs.

    Args:
        y: Labels, or a dict with `"labels"` (optional) and either
            `"teacher_logits"` or `"teacher_top_log_probs"` and
            `"teacher_top_indices"` (log-probabilities at T = 1, as
            `keras_distill.targets.top_k_teacher_targets` returns them).

    Returns:
        `(labels, teacher_outputs)`, where `teacher_outputs` is a dict of the
        teacher keys, or `None` when `y` holds labels only.

    Example:

    >>> split_targets({"labels": [1], "teacher_logits": [[0.5, 0.1]]})
    ([1], {'teacher_logits': [[0.5, 0.1]]})
    >>> split_targets([1])
    ([1], None)
    """
    if isinstance(y, dict) and set(y) == {LABELS}:
        return y[LABELS], None
    if not isinstance(y, dict) or not any(k in y for k in _TEACHER_OUTPUT_KEYS):
        return y, None
    unknown = set(y) - {LABELS, *_TEACHER_OUTPUT_KEYS}
    if unknown:
        raise ValueError(
            f"Unknown keys {sorted(unknown)} in `y`; a dict `y` holds "
            f"'{LABELS}' and the teacher's outputs {_TEACHER_OUTPUT_KEYS}."
        )
    if (TEACHER_TOP_LOG_PROBS in y) != (TEACHER_TOP_INDICES in y):
        raise ValueError(
            f"Top-k teacher targets need both '{TEACHER_TOP_LOG_PROBS}' and "
            f"'{TEACHER_TOP_INDICES}' in `y`."
        )
    teacher_outputs = {k: y[k] for k in _TEACHER_OUTPUT_KEYS if k in y}
    return y.get(LABELS), teacher_outputs


def single_sample_weight(sample_weight):
    """The one weights array of a batch whose `y` may be a dict.

    Keras copies a `fit(sample_weight=...)` array to every entry of a dict
    `y` (labels and teacher outputs); all the copies are the same array.
    """
    if isinstance(sample_weight, dict):
        return next(iter(sample_weight.values()), None)
    return sample_weight


def _split_teacher_metrics(metrics):
    """Splits compiled metrics into student metrics and teacher–student ones.

    `TeacherStudentMetric`s (e.g. `TeacherAgreement`, `TeacherKL`) compare
    the teacher's logits with the student's, so `compute_loss` updates them;
    the others compare the labels with the student as in any Keras model.
    """
    if not isinstance(metrics, (list, tuple)):
        return metrics, []
    teacher_metrics = [
        m for m in metrics if isinstance(m, TeacherStudentMetric)
    ]
    student_metrics = [
        m for m in metrics if not isinstance(m, TeacherStudentMetric)
    ]
    return student_metrics or None, teacher_metrics


def _check_model(name, model):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"`{name}` must be a Keras model (or layer) that returns logits, "
            f"got {type(model).__name__}. Wrap other callables in a "
            "`keras.layers.Layer` subclass or build them as a `keras.Model`."
        )


def _class_count(model):
    """Static number of output classes of a built functional model, or None."""
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        return None
    return outputs[0].shape[-1]


def _softmax_output_layer(model):
    """The layer that applies softmax to a functional model's output, or None."""
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        return None
    history = getattr(outputs[0], "_keras_history", None)
    layer = getattr(history, "operation", None)
    if isinstance(layer, keras.layers.Softmax) or (
        getattr(layer, "activation", None) is keras.activations.softmax
    ):
        return layer
    return None


def _check_returns_logits(name, model):
    """Refuses a model whose last layer turns its logits into probabilities."""
    layer = _softmax_output_layer(model)
    if layer is None:
        return
    if isinstance(layer, keras.layers.Softmax):
        fix = (
            f"`{name} = keras.Model({name}.inputs, "
            f"{name}.get_layer({layer.name!r}).input)`"
        )
    else:
        fix = (
            f"`{name}.get_layer({layer.name!r}).activation = "
            "keras.activations.linear`"
        )
    raise ValueError(
        f"The {name}'s output layer {layer.name!r} applies softmax, so the "
        f"{name} returns probabilities, but the Distiller softens logits "
        "(softmax(p / T) of probabilities is nearly uniform). Give it "
        f"logits: {fix}."
    )


def _is_keras_kl(loss):
    if isinstance(loss, str):
        return loss.lower() in _KERAS_KL_NAMES
    if isinstance(loss, keras.losses.KLDivergence):
        return True
    return loss is keras.losses.kl_divergence


# The student returns logits, so Keras's crossentropy functions, by name or
# as functions (which default to probabilities), become these losses with
# `from_logits=True`.
_LOGITS_CROSSENTROPIES = {
    keras.losses.sparse_categorical_crossentropy: (
        keras.losses.SparseCategoricalCrossentropy
    ),
    keras.losses.categorical_crossentropy: keras.losses.CategoricalCrossentropy,
    keras.losses.binary_crossentropy: keras.losses.BinaryCrossentropy,
    keras.losses.categorical_focal_crossentropy: (
        keras.losses.CategoricalFocalCrossentropy
    ),
    keras.losses.binary_focal_crossentropy: (
        keras.losses.BinaryFocalCrossentropy
    ),
}


def _takes_probabilities(function):
    """Whether `function` has a `from_logits` argument that defaults to False."""
    try:
        parameter = inspect.signature(function).parameters.get("from_logits")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is False


def _logits_loss(loss):
    """The hard-label loss, refusing crossentropies that expect probabilities."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if loss in _LOGITS_CROSSENTROPIES:
        return _LOGITS_CROSSENTROPIES[loss](from_logits=True)
    if getattr(loss, "from_logits", True) is False:
        raise ValueError(
            "`student_loss_fn` expects probabilities (from_logits=False), but "
            "the student returns logits: use e.g. "
            "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`."
        )
    if not isinstance(loss, keras.losses.Loss) and _takes_probabilities(loss):
        raise ValueError(
            f"`student_loss_fn` {getattr(loss, '__name__', loss)!r} takes "
            "`from_logits=False` by default, but it is called as "
            "`fn(labels, student_logits)` with logits: pass "
            "`functools.partial(fn, from_logits=True)`."
        )
    return loss


def _label_range_check(loss):
    """`(checked, ignore_class)`: whether `loss` takes class-index labels."""
    if not isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return False, None
    return True, loss._fn_kwargs.get("ignore_class")


def _is_forward_kl(loss):
    return (
        loss is None
        or _is_keras_kl(loss)
        or isinstance(loss, divergences.ForwardKL)
        or (isinstance(loss, str) and loss == "forward_kl")
        or loss is divergences.forward_kl
    )


def _is_reverse_kl(loss):
    """Whether `loss` is the reverse KL, infinite where the teacher gives 0."""
    if isinstance(loss, divergences.GeneralizedJSD):
        return loss.beta == 1.0
    return (
        isinstance(loss, divergences.ReverseKL)
        or (isinstance(loss, str) and loss == "reverse_kl")
        or loss is divergences.reverse_kl
    )


def _per_example_loss_fn(loss):
    """A function `(y_true, y_pred) -> per-example losses` for a Keras loss."""
    if isinstance(loss, keras.losses.Loss):
        # `Loss.call` is the unreduced per-example loss; the Distiller does the
        # weighting and normalization itself.
        return loss.call
    if callable(loss):
        return loss
    raise TypeError(f"Expected a Keras loss or a callable, got {loss!r}.")


def _resolve_distillation_loss(loss, temperature):
    """Returns `fn(teacher_logits, student_logits, sample_weight) -> scalar`."""
    if loss is None or _is_keras_kl(loss):
        loss = divergences.forward_kl
    if isinstance(loss, str):
        if loss in divergences.DIVERGENCES:
            loss = divergences.DIVERGENCES[loss]
        else:
            loss = keras.losses.get(loss)
    if isinstance(loss, divergences.DistillationLoss):
        if loss.temperature is not None and loss.temperature != temperature:
            raise ValueError(
                f"`distillation_loss_fn` sets temperature={loss.temperature} "
                f"but `compile` got temperature={temperature}. Set it in one "
                "place: pass `temperature` to `compile` and leave the loss's "
                "temperature as None."
            )

        def divergence(teacher_logits, student_logits, sample_weight):
            return loss.divergence(
                teacher_logits,
                student_logits,
                temperature,
                sample_weight=sample_weight,
                **loss.divergence_kwargs,
            )

        return divergence
    if loss in divergences.DIVERGENCES.values():

        def divergence(teacher_logits, student_logits, sample_weight):
            return loss(
                teacher_logits,
                student_logits,
                temperature,
                sample_weight=sample_weight,
            )

        return divergence
    # Any other Keras loss follows the keras.io convention: it compares the
    # softened probabilities, and the result is scaled by T².
    per_example = _per_example_loss_fn(loss)

    def divergence(teacher_logits, student_logits, sample_weight):
        teacher_probs = ops.softmax(teacher_logits / temperature, axis=-1)
        student_probs = ops.softmax(student_logits / temperature, axis=-1)
        values = per_example(teacher_probs, student_probs)
        return temperature**2 * weighting.weighted_reduce(
            values, sample_weight
        )

    return divergence


@keras.saving.register_keras_serializable(package="keras_distill")
class Distiller(keras.Model):
    """Trains a student model on a frozen teacher's softened outputs.

    The training loss is

        alpha * student_loss(y, s) + (1 - alpha) * T² * KL(softmax(t/T) || softmax(s/T))

    where `s` and `t` are the student's and the teacher's logits. `fit`,
    `evaluate`, callbacks, `jit_compile`, gradient accumulation, mixed
    precision and `keras.distribution` work as for any Keras model: the
    Distiller only supplies `compute_loss`, and Keras's own `train_step` and
    `test_step` on each backend do the rest. With the optimizer's
    `gradient_accumulation_steps=k`, the loss of the `k` micro-batches is
    normalized by the real tokens (sample weights) of all of them together,
    so the update equals one step on their concatenation. Calling the Distiller (and
    `predict`) runs the student.

    The teacher is frozen: `teacher.trainable` is set to `False`, its
    weights are never among the Distiller's trainable variables (so no
    optimizer, weight decay included, moves them, even after
    `teacher.trainable = True`), it runs in inference mode
    (`training=False`, so BatchNorm and Dropout behave as at inference), and
    its outputs are wrapped in `stop_gradient`. Both models must return
    logits: a softmax output layer is refused, and so is a batch of teacher
    outputs that are probabilities (rows summing to 1, no value above 1).

    Positions whose `sample_weight` is 0 (padding) never reach the loss:
    the teacher's logits there are replaced before any maths, so NaN or inf
    there does not matter, and a teacher logit of `-inf` elsewhere rules its
    class out. A
    label outside the student's classes (for
    `SparseCategoricalCrossentropy`), like a NaN teacher, gives that step a
    zero gradient and stops `fit` with an error naming it.

    Precomputed teacher outputs (say, from a teacher-output cache) can ride in
    each batch's `y` instead: a dict with `"labels"` and `"teacher_logits"`,
    or `"teacher_top_log_probs"` and `"teacher_top_indices"` for top-k
    targets (see `split_targets`). The teacher is then not called, and may be
    `None`.

    Args:
        student: The `keras.Model` to train; it must return logits.
        teacher: A trained `keras.Model` returning logits of the same shape,
            or `None` when every batch carries the teacher's outputs.
        feature_distillation: Optional `keras_distill.distillers.
            FeatureDistillation` adding hidden-state and attention-map terms;
            the student then runs once per step through a view returning its
            logits and the chosen layers' outputs.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    >>> import numpy as np
    >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> distiller = Distiller(student=student, teacher=teacher)
    >>> distiller.compile(
    ...     optimizer="adam",
    ...     metrics=["accuracy"],
    ...     student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
    ...         from_logits=True),
    ...     distillation_loss_fn=keras.losses.KLDivergence(),
    ...     alpha=0.1,
    ...     temperature=3.0,
    ... )
    >>> x, y = np.ones((8, 4)), np.zeros((8,))
    >>> history = distiller.fit(x, y, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'distillation_loss', 'loss', 'student_loss']
    """

    def __init__(self, student, teacher, feature_distillation=None, **kwargs):
        super().__init__(**kwargs)
        _check_model("student", student)
        if teacher is not None:
            _check_model("teacher", teacher)
        if student is teacher:
            raise ValueError(
                "`student` and `teacher` are the same object; distill into a "
                "separate model (e.g. `keras.models.clone_model(teacher)`)."
            )
        self._check_output_sizes(student, teacher)
        _check_returns_logits("student", student)
        if teacher is not None:
            _check_returns_logits("teacher", teacher)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(
            name="distillation_loss"
        )
        self.alpha = None
        self.temperature = None
        # Real tokens of the optimizer's current gradient-accumulation cycle
        # before and after the last micro-batch, and the optimizer iteration
        # that follows it (see `_normalize_over_accumulation`).
        self._tokens_before = self._accumulation_counter("tokens_before")
        self._tokens_after = self._accumulation_counter("tokens_after")
        self._next_iteration = self._accumulation_counter(
            "next_iteration", "int32"
        )
        # The first failed check of this `fit`: `[code, value, limit]`, e.g.
        # `[_LABEL_OUT_OF_RANGE, label, classes]` (see `_record_checks`).
        self._batch_status = self.add_weight(
            shape=(3,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            autocast=False,
            name="batch_status",
        )
        self._predicting = False
        # Callbacks such as BackupAndRestore need a built model before `fit`.
        self.built = student.built and (teacher is None or teacher.built)
        if feature_distillation is not None:
            if not isinstance(feature_distillation, FeatureDistillation):
                raise TypeError(
                    "`feature_distillation` must be a keras_distill."
                    f"FeatureDistillation, got {type(feature_distillation)}."
                )
            feature_distillation.attach(student, teacher)
        self.feature_distillation = feature_distillation

    def _accumulation_counter(self, name, dtype="float32"):
        return self.add_weight(
            shape=(),
            initializer="zeros",
            dtype=dtype,
            trainable=False,
            autocast=False,
            name=f"accumulation_{name}",
        )

    def _check_output_sizes(self, student, teacher):
        teacher_classes = None if teacher is None else _class_count(teacher)
        student_classes = _class_count(student)
        if None not in (teacher_classes, student_classes) and (
            teacher_classes != student_classes
        ):
            raise ValueError(
                f"Teacher outputs {teacher_classes} classes, student "
                f"{student_classes}: `teacher` and `student` must have the "
                "same output shape."
            )

    def _saved_variables(self):
        # `_batch_status` belongs to one `fit`, not to the model: saved files
        # keep the layout they had before it existed, both ways.
        own = self._trainable_variables + self._non_trainable_variables
        return [v for v in own if v is not self._batch_status]

    def save_own_variables(self, store):
        for index, variable in enumerate(self._saved_variables()):
            store[f"{index}"] = variable

    def load_own_variables(self, store):
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"The Distiller {self.name!r} has {len(variables)} variables "
                f"of its own ({[v.name for v in variables]}), but the file "
                f"holds {len(store.keys())}: it was saved by another version."
            )
        for index, variable in enumerate(variables):
            variable.assign(store[f"{index}"])

    def _teacher_only_variables(self, variables):
        """The teacher's variables among `variables` (not the student's)."""
        if self.teacher is None:
            return []
        student = {id(v) for v in self.student.variables}
        teacher = {id(v) for v in self.teacher.variables} - student
        return [v for v in variables if id(v) in teacher]

    def _without_teacher(self, variables):
        excluded = {id(v) for v in self._teacher_only_variables(variables)}
        return [v for v in variables if id(v) not in excluded]

    # The teacher stays out of the optimizer whatever its `trainable` flag (a
    # user may set it back to True): its variables are non-trainable here.
    @property
    def trainable_weights(self):
        return self._without_teacher(super().trainable_weights)

    @property
    def non_trainable_weights(self):
        return super().non_trainable_weights + self._teacher_only_variables(
            super().trainable_weights
        )

    @property
    def trainable_variables(self):
        return self._without_teacher(super().trainable_variables)

    @property
    def non_trainable_variables(self):
        return super().non_trainable_variables + self._teacher_only_variables(
            super().trainable_variables
        )

    def _teacher_logits(self, x):
        """The teacher's logits for `x`, as the divergence compares them."""
        if self.feature_distillation is not None:
            # One teacher pass for its logits and its mapped layers.
            return self.feature_distillation.teacher_outputs(x)
        return self.teacher(x, training=False)

    def _shared_logits(self, student_logits):
        """The student's logits over the classes the teacher also scores."""
        return student_logits

    def build(self, input_shape):
        # Subclassed models create their weights on a first (symbolic) call.
        inputs = keras.tree.map_shape_structure(keras.KerasTensor, input_shape)
        for model in (self.student, self.teacher):
            if model is not None and not model.built:
                model(inputs)
        self.built = True

    def compile(
        self,
        optimizer="adam",
        metrics=None,
        student_loss_fn=None,
        distillation_loss_fn=None,
        alpha=0.1,
        temperature=3.0,
        **kwargs,
    ):
        """Configures the Distiller for training (the keras.io signature).

        Args:
            optimizer: Optimizer (instance or name) for the student.
            metrics: Metrics of the student's predictions against `y`.
            student_loss_fn: Hard-label loss between `y` and the student's
                logits, e.g. `SparseCategoricalCrossentropy(from_logits=True)`.
                Keras's crossentropies by name (`"sparse_categorical_
                crossentropy"`) or as functions
                (`keras.losses.sparse_categorical_crossentropy`) are applied
                to logits; a loss object with `from_logits=False` is refused.
                Any other function is called as `fn(labels, student_logits)`
                and returns per-example losses; one with a `from_logits`
                argument that defaults to False is refused (pass
                `functools.partial(fn, from_logits=True)`). Required unless
                `alpha` is 0.
            distillation_loss_fn: Divergence between teacher and student.
                `None`, `"kl_divergence"` or `keras.losses.KLDivergence()`
                mean forward KL of the softened distributions, computed from
                logits in log space. Any function or `DistillationLoss` from
                `keras_distill.losses` (or its name, e.g. `"reverse_kl"`) is
                used as is; any other Keras loss is applied to the softened
                probabilities and scaled by `T²`.
            alpha: Weight of the hard-label loss, in `[0, 1]`.
            temperature: Softening temperature `T > 0`.
            **kwargs: Other `keras.Model.compile` arguments
                (`weighted_metrics`, `jit_compile`, `steps_per_execution`,
                `run_eagerly`, `auto_scale_loss`).
        """
        # A reloaded compile config carries Keras's own `loss=None` entries.
        for unused in ("loss", "loss_weights"):
            if kwargs.get(unused, None) is None:
                kwargs.pop(unused, None)
        if "loss" in kwargs or "loss_weights" in kwargs:
            raise ValueError(
                "The Distiller takes `student_loss_fn` and "
                "`distillation_loss_fn`, not `loss`."
            )
        checks.check_unit_interval("alpha", alpha)
        checks.check_temperature(temperature)
        if student_loss_fn is None and alpha > 0:
            raise ValueError(
                f"`student_loss_fn` is required when alpha={alpha} > 0, e.g. "
                "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`"
                "; or pass alpha=0 to train on the teacher alone."
            )
        student_loss_fn = _logits_loss(student_loss_fn)
        self._label_check = _label_range_check(student_loss_fn)
        self._student_losses = (
            None if student_loss_fn is None else _per_example_loss_fn(
                student_loss_fn
            )
        )
        self._divergence_is_forward_kl = _is_forward_kl(distillation_loss_fn)
        # A class ruled out by a -inf teacher logit makes the reverse KL (and
        # its gradient) infinite: such a batch is refused as broken.
        self._minus_inf_is_broken = _is_reverse_kl(distillation_loss_fn)
        self._divergence = _resolve_distillation_loss(
            distillation_loss_fn, temperature
        )
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        student_metrics, teacher_metrics = _split_teacher_metrics(metrics)
        super().compile(optimizer=optimizer, metrics=student_metrics, **kwargs)
        self._set_teacher_metrics(teacher_metrics)
        self._compile_config.config.update(
            metrics=metrics,
            student_loss_fn=student_loss_fn,
            distillation_loss_fn=distillation_loss_fn,
            alpha=alpha,
            temperature=temperature,
        )

    @tracking.no_automatic_dependency_tracking
    def _set_teacher_metrics(self, teacher_metrics):
        # Untracked (as Keras's own compiled metrics are), so that compiling
        # again replaces them instead of adding to them.
        self._teacher_metrics = teacher_metrics

    @property
    def metrics(self):
        return [*super().metrics, *getattr(self, "_teacher_metrics", [])]

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def call(self, inputs, training=None):
        if self._predicting:
            # `predict` gives the student's logits, whatever the loss reads.
            return self.student(inputs, training=False)
        return self._step_outputs(inputs, training)

    def _step_outputs(self, inputs, training):
        """What a training or test step's `compute_loss` gets as `y_pred`."""
        if self.feature_distillation is not None:
            # One student pass for its logits and its mapped layers.
            return self.feature_distillation.student_outputs(
                inputs, training=training
            )
        return self.student(inputs, training=training)

    @contextlib.contextmanager
    def _student_prediction(self):
        self._predicting = True
        try:
            yield
        finally:
            self._predicting = False

    def predict_step(self, *args, **kwargs):
        # The arguments differ by backend (JAX passes the state first); the
        # step is traced inside this scope, so `call` runs the plain student.
        with self._student_prediction():
            return super().predict_step(*args, **kwargs)

    def _check_output_shapes(self, teacher_logits, student_logits):
        teacher_shape = tuple(teacher_logits.shape)
        student_shape = tuple(student_logits.shape)
        if len(teacher_shape) != len(student_shape) or any(
            t is not None and s is not None and t != s
            for t, s in zip(teacher_shape[1:], student_shape[1:])
        ):
            raise ValueError(
                f"Teacher outputs {teacher_shape[-1]} classes, student "
                f"{student_shape[-1]} (teacher output shape {teacher_shape}, "
                f"student {student_shape}): the two models must produce "
                "logits of the same shape."
            )

    def _dense_distillation_loss(
        self, teacher_logits, student_logits, sample_weight, real
    ):
        """`(divergence, teacher_finite, checks)` of dense teacher logits.

        `real` (see `losses.real_positions`) selects the positions that
        count. Elsewhere the teacher's logits are replaced by zeros before
        any maths: NaN or inf there (some attention kernels give them to
        fully masked rows) would survive a multiplication by a zero weight,
        in the value and the gradient. The student's own logits are used as
        they are, weighted 0 there (selecting them too doubled the cost of
        a loss-bound step on JAX).
        """
        if not hasattr(teacher_logits, "shape"):
            raise TypeError(
                "The Distiller expects the teacher to return one logits "
                f"tensor, got {type(teacher_logits).__name__}."
            )
        self._check_output_shapes(teacher_logits, student_logits)
        teacher_logits = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
        if real is not None:
            # Selected before any maths: NaN there would reach the gradient.
            teacher_logits = ops.where(real, teacher_logits, 0.0)
        # Two reductions per row check the whole batch. A NaN or +inf logit
        # makes the row sum NaN or +inf; a row of -inf alone has no
        # distribution (its max is -inf); a -inf among finite logits rules
        # its class out and is fine (but for the reverse KL). Rows that sum
        # to 1 with no value above 1 are probabilities, not logits.
        row_sum = ops.sum(teacher_logits, axis=-1)
        row_max = ops.max(teacher_logits, axis=-1)
        broken = (
            ops.isnan(row_sum)
            | ops.equal(row_sum, float("inf"))
            | ops.equal(row_max, float("-inf"))
        )
        if self._minus_inf_is_broken:
            broken = broken | ops.equal(row_sum, float("-inf"))
        probabilities = (row_max <= 1.0) & (ops.abs(row_sum - 1.0) < 1e-3)
        if real is not None:
            probabilities = probabilities | ops.logical_not(real[..., 0])
        # One class is no evidence: its softmax is 1 whatever the logit.
        looks_like_probabilities = ops.all(probabilities) & (
            teacher_logits.shape[-1] != 1
        )
        if real is not None:
            looks_like_probabilities = looks_like_probabilities & ops.any(real)
        teacher_finite = ops.logical_not(ops.any(broken))
        # A non-finite teacher batch is replaced by the student itself (zero
        # divergence); `compute_loss` then multiplies the loss by 0, so the
        # gradient is exactly zero, and adds a NaN outside the gradient.
        teacher_logits = ops.where(
            teacher_finite, teacher_logits, ops.stop_gradient(student_logits)
        )
        checks = [(_TEACHER_PROBABILITIES, looks_like_probabilities, 0, 0)]
        return (
            self._divergence(teacher_logits, student_logits, sample_weight),
            teacher_finite,
            checks,
        )

    def _sparse_distillation_loss(
        self, teacher_outputs, student_logits, sample_weight, real
    ):
        if not self._divergence_is_forward_kl:
            raise ValueError(
                "Top-k teacher targets support the forward KL only; compile "
                "with distillation_loss_fn=None (or 'kl_divergence') to train "
                "on them, or cache dense teacher logits."
            )
        log_probs = ops.stop_gradient(
            ops.cast(teacher_outputs[TEACHER_TOP_LOG_PROBS], "float32")
        )
        if real is not None:
            log_probs = ops.where(real, log_probs, 0.0)
        # -inf marks unused entries; only NaN means a broken teacher.
        teacher_finite = ops.logical_not(ops.any(ops.isnan(log_probs)))
        log_probs = ops.where(teacher_finite, log_probs, 0.0)
        distillation_loss = sparse.sparse_forward_kl(
            log_probs,
            teacher_outputs[TEACHER_TOP_INDICES],
            student_logits,
            self.temperature,
            sample_weight=sample_weight,
            targets_temperature=1.0,
        )
        return distillation_loss, teacher_finite, []

    def _checked_inputs(self, x):
        """`(x, checks)`: the step's inputs, made safe, and their checks.

        Each check is `(code, failed, value, limit)`, scalars for
        `_record_checks`. Plain inputs have none; `CausalLMDistiller`
        checks token ids.
        """
        return x, []

    def _checked_labels(
        self, labels, sample_weight, num_classes, ignore_class=None
    ):
        """`(labels, checks)`: class labels outside `[0, num_classes)` replaced.

        Labels of zero-weight positions are replaced too (padding may carry
        any id, e.g. -100) and never checked; SparseCategoricalCrossentropy's
        `ignore_class` is kept. JAX would gather out-of-range classes
        silently and torch or TensorFlow fail deep in the step; replacing
        them keeps every backend's step finite, and the check stops `fit`.
        """
        labels = ops.convert_to_tensor(labels)
        values = ops.cast(labels, "int32")
        keep = (values >= 0) & (values < num_classes)
        if ignore_class is not None:
            keep = keep | ops.equal(values, ignore_class)
        counted = ops.ones_like(values, dtype="bool")
        if sample_weight is not None:
            counted = ops.not_equal(
                weighting.broadcast_weights(
                    sample_weight, ops.cast(values, "float32")
                ),
                0.0,
            )
        bad = ops.logical_not(keep) & counted
        first_bad = ops.argmax(ops.cast(ops.reshape(bad, (-1,)), "int32"))
        value = ops.take(ops.reshape(values, (-1,)), first_bad)
        safe = ops.where(keep & counted, labels, ops.zeros_like(labels))
        return safe, [(_LABEL_OUT_OF_RANGE, ops.any(bad), value, num_classes)]

    def _record_checks(self, checks):
        """Records the first failed check; returns whether any failed.

        The status sticks until the next `fit` resets it, so a failed check
        of any batch (also within `steps_per_execution`) is the one
        `NonFiniteLossGuard` reports. Costs one int32 assignment per step.
        """
        status = ops.zeros((3,), "int32")
        failed_any = ops.zeros((), "bool")
        for code, failed, value, limit in reversed(checks):
            row = ops.stack(
                [
                    ops.convert_to_tensor(code, "int32"),
                    ops.cast(value, "int32"),
                    ops.convert_to_tensor(limit, "int32"),
                ]
            )
            status = ops.where(failed, row, status)
            failed_any = failed_any | failed
        previous = self._batch_status.value
        self._batch_status.assign(
            ops.where(ops.not_equal(previous[0], 0), previous, status)
        )
        return failed_any

    def batch_error(self):
        """The error of the first failed check of the last `fit`, or None.

        Returns:
            A `ValueError` naming the bad label, token id or the teacher's
            probabilities, and the fix; `None` if every check passed.
        """
        code, value, limit = (
            int(v) for v in ops.convert_to_numpy(self._batch_status.value)
        )
        if code == _LABEL_OUT_OF_RANGE:
            return ValueError(
                f"Label {value} is outside the student's {limit} classes "
                f"[0, {limit}): labels must be class indices below {limit} "
                "(or have sample_weight 0, e.g. padding)."
            )
        if code == _TOKEN_OUT_OF_RANGE:
            return ValueError(
                f"Token id {value} is outside the vocabulary of {limit} "
                f"tokens [0, {limit}): tokenize with the models' tokenizer."
            )
        if code == _TEACHER_PROBABILITIES:
            return ValueError(
                "The teacher's outputs are probabilities (every row sums to "
                "1, no value above 1), but the Distiller softens logits: "
                "remove the teacher's final softmax, or pass "
                "`np.log(probabilities)` as its logits."
            )
        return None

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Compiled metrics compare the labels alone with the student.
        labels, _ = split_targets(y)
        return super().compute_metrics(x, labels, y_pred, sample_weight)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Hard-label loss plus `T²`-scaled divergence to the teacher.

        Both terms are weighted by `sample_weight` and normalized by its sum;
        a batch whose weights are all zero gives a loss of 0. With the
        optimizer's `gradient_accumulation_steps`, the gradient is normalized
        by the weights of the whole accumulated batch instead (see
        `_normalize_over_accumulation`); the value stays this batch's loss.
        Zero-weight teacher positions are replaced before any maths. If the
        teacher's outputs are not finite, or a check fails (a label outside
        the classes, a token id outside the vocabulary, teacher outputs that
        are probabilities; two row reductions over the teacher logits and
        a few elementwise ops over the labels), the step's gradient is zero (no NaN
        reaches the student) and the returned loss is NaN, which stops
        `fit` with an error naming the problem.
        """
        labels, teacher_outputs = split_targets(y)
        if not hasattr(y_pred, "shape"):
            raise TypeError(
                "The Distiller expects the student to return one logits "
                f"tensor, got {type(y_pred).__name__}."
            )
        x, input_checks = self._checked_inputs(x)
        sample_weight = single_sample_weight(sample_weight)
        student_logits = ops.cast(y_pred, "float32")
        distillation_loss, teacher_finite, teacher_checks, teacher_logits = (
            self._soft_loss(x, teacher_outputs, student_logits, sample_weight)
        )
        student_loss, label_checks = self._hard_loss(
            labels, student_logits, sample_weight
        )
        loss = self.alpha * student_loss + (1.0 - self.alpha) * distillation_loss
        if self.feature_distillation is not None:
            if teacher_outputs is not None:
                raise ValueError(
                    "Feature distillation needs the teacher's intermediate "
                    "layers, which cached teacher outputs do not carry: pass "
                    "the teacher model and plain labels as `y`."
                )
            loss = loss + self.feature_distillation.compute_loss(sample_weight)
        return self._finish_loss(
            loss=loss,
            student_loss=student_loss,
            distillation_loss=distillation_loss,
            student_outputs=student_logits,
            sample_weight=sample_weight,
            training=training,
            teacher_finite=teacher_finite,
            checks=input_checks + label_checks + teacher_checks,
            teacher_logits=teacher_logits,
            student_logits=self._shared_logits(student_logits),
        )

    def _soft_loss(self, x, teacher_outputs, student_logits, sample_weight):
        """The divergence term, on the path the batch's teacher targets take.

        Top-k targets in `y` take `_sparse_distillation_loss`; dense logits
        in `y`, or else the teacher's own for `x`, take
        `_dense_distillation_loss`. Both select the positions that count
        (`losses.real_positions`) before any maths.

        Returns:
            `(divergence, teacher_finite, checks, teacher_logits)`, where
            `teacher_logits` (for compiled teacher metrics) is None on the
            top-k path.
        """
        shared_logits = self._shared_logits(student_logits)
        real = weighting.real_positions(sample_weight, student_logits)
        if teacher_outputs is not None and TEACHER_TOP_INDICES in teacher_outputs:
            terms = self._sparse_distillation_loss(
                teacher_outputs, shared_logits, sample_weight, real
            )
            return (*terms, None)
        if teacher_outputs is not None:
            teacher_logits = teacher_outputs[TEACHER_LOGITS]
        elif self.teacher is None:
            raise ValueError(
                "This Distiller has no teacher, so each batch's `y` must "
                f"carry the teacher's outputs: a dict with "
                f"'{TEACHER_LOGITS}' (or '{TEACHER_TOP_LOG_PROBS}' and "
                f"'{TEACHER_TOP_INDICES}') and 'labels'."
            )
        else:
            teacher_logits = self._teacher_logits(x)
        terms = self._dense_distillation_loss(
            teacher_logits, shared_logits, sample_weight, real
        )
        return (*terms, teacher_logits)

    def _hard_loss(self, labels, student_logits, sample_weight):
        """`(student_loss, checks)`: the weighted hard-label term, or 0.

        Class labels (for `SparseCategoricalCrossentropy`) are checked
        against the student's classes first (`_checked_labels`).
        """
        if labels is None and self.alpha > 0:
            raise ValueError(
                f"The data has no labels `y` but alpha={self.alpha} weights a "
                "hard-label loss: pass labels, or compile with alpha=0 to "
                "learn from the teacher alone."
            )
        if self._student_losses is None or labels is None:
            return ops.zeros((), "float32"), []
        checks = []
        takes_classes, ignore_class = self._label_check
        if takes_classes:
            labels, checks = self._checked_labels(
                labels, sample_weight, student_logits.shape[-1], ignore_class
            )
        student_loss = weighting.weighted_reduce(
            self._student_losses(labels, student_logits), sample_weight
        )
        return student_loss, checks

    def _finish_loss(
        self,
        *,
        loss,
        student_loss,
        distillation_loss,
        student_outputs,
        sample_weight,
        training,
        teacher_finite=True,
        checks=(),
        teacher_logits=None,
        student_logits=None,
    ):
        """The tail every distiller's `compute_loss` ends with.

        In this order: adds the model's own losses (`self.losses`, e.g.
        regularizers) to `loss`; gives the step a zero gradient and a NaN
        value if the teacher was not finite or a check failed
        (`_guarded_loss`, which records the check for `NonFiniteLossGuard`);
        updates the `student_loss` and `distillation_loss` trackers and the
        compiled teacher metrics; in training, normalizes the gradient over
        the optimizer's gradient-accumulation cycle
        (`_normalize_over_accumulation`); and scales the loss for
        `tf.distribute` replicas, as Keras's own `compute_loss` does.

        Args:
            loss: float32 scalar, the step's total loss (the weighted hard and
                soft terms, plus any extra term such as feature
                distillation), averaged over the batch's real tokens.
            student_loss: float32 scalar, the hard-label term, reported as
                `student_loss` (zero when there is none).
            distillation_loss: float32 scalar, the teacher term, reported as
                `distillation_loss`.
            student_outputs: The student's outputs the loss was computed
                from, `(batch, ..., features)` (logits, or hidden states for
                a fused loss): the trackers weight by its batch size, and
                without `sample_weight` its positions are the real tokens.
            sample_weight: The batch's weights (or padding mask) the terms
                were averaged with, or None.
            training: Whether this is a training step; only those normalize
                over gradient accumulation.
            teacher_finite: bool scalar, False when the teacher's outputs
                for this batch were not finite. `loss` must be finite even
                then, computed from a finite stand-in for the teacher (the
                dense loss uses the student's own logits): the zero gradient
                of NaN maths would be NaN.
            checks: The step's checks, `(code, failed, value, limit)` tuples
                of scalars (see `_record_checks`), e.g. from
                `_checked_inputs` and `_checked_labels`.
            teacher_logits: The teacher's logits over the classes both
                models score, for compiled teacher metrics (`TeacherKL`,
                ...); None when the step has none (top-k targets, a fused
                loss), and compiled teacher metrics are then refused.
            student_logits: The student's logits matching `teacher_logits`.

        Returns:
            The float32 scalar `compute_loss` returns.

        Example:

        A distiller whose soft term is the squared distance between logits:

        >>> import numpy as np
        >>> class LogitMatching(Distiller):
        ...     def compute_loss(self, x=None, y=None, y_pred=None,
        ...                      sample_weight=None, training=True):
        ...         teacher_logits = ops.stop_gradient(
        ...             self.teacher(x, training=False))
        ...         finite = ops.all(ops.isfinite(teacher_logits))
        ...         teacher_logits = ops.where(
        ...             finite, teacher_logits, ops.stop_gradient(y_pred))
        ...         distance = ops.mean(ops.square(teacher_logits - y_pred))
        ...         return self._finish_loss(
        ...             loss=distance, student_loss=ops.zeros(()),
        ...             distillation_loss=distance, student_outputs=y_pred,
        ...             sample_weight=sample_weight, training=training,
        ...             teacher_finite=finite)
        >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> distiller = LogitMatching(student=student, teacher=teacher)
        >>> distiller.compile(optimizer="sgd", alpha=0.0)
        >>> history = distiller.fit(np.ones((8, 4)), np.zeros((8,)), verbose=0)
        >>> sorted(history.history)
        ['distillation_loss', 'loss', 'student_loss']
        """
        for extra_loss in self.losses:
            loss = loss + ops.cast(ops.sum(extra_loss), "float32")
        loss = self._guarded_loss(loss, teacher_finite, list(checks))
        batch_size = ops.shape(student_outputs)[0]
        self.student_loss_tracker.update_state(student_loss, batch_size)
        self.distillation_loss_tracker.update_state(distillation_loss, batch_size)
        teacher_metrics = getattr(self, "_teacher_metrics", [])
        if teacher_metrics and teacher_logits is None:
            raise ValueError(
                f"{[m.name for m in teacher_metrics]} compare the teacher's "
                "full logits with the student's, but this step has none (it "
                "trains on top-k teacher targets, or on a fused loss): compile "
                "without them, or cache dense teacher logits."
            )
        for metric in teacher_metrics:
            metric.update_state(teacher_logits, student_logits, sample_weight)
        if training:
            loss = self._normalize_over_accumulation(
                loss, weighting.token_count(sample_weight, student_outputs)
            )
        return scale_loss_for_distribution(loss)

    def _guarded_loss(self, loss, teacher_finite, checks):
        """`loss`, or a zero gradient and a NaN value if a check failed.

        A NaN value stops `fit` (see `NonFiniteLossGuard`), which reports
        the recorded check, else the non-finite teacher.
        """
        valid = ops.logical_and(
            teacher_finite, ops.logical_not(self._record_checks(checks))
        )
        loss = loss * ops.cast(valid, "float32")
        return loss + ops.stop_gradient(ops.where(valid, 0.0, float("nan")))

    def _accumulating_optimizer(self):
        """The built optimizer that accumulates gradients, or None."""
        optimizer = getattr(self, "optimizer", None)
        # A LossScaleOptimizer (mixed_float16) accumulates in its inner one.
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if optimizer is None or not optimizer.built:
            return None
        if not optimizer.gradient_accumulation_steps:
            return None
        return optimizer

    def _normalize_over_accumulation(self, loss, tokens):
        """`loss`, with the gradient of the whole accumulated batch's mean.

        With `gradient_accumulation_steps=k`, Keras's optimizer applies the
        mean of the `k` gradients it is given, each normalized by its own
        micro-batch's tokens; but one step on the concatenated batch
        normalizes every token by the batch's total. Given micro-batch `i`
        with `n_i` real tokens and mean loss `L_i`, the gradient returned
        here keeps the optimizer's accumulator equal to
        `sum_j n_j grad(L_j) / sum_j n_j` over the cycle so far (it rescales
        the accumulator through a term linear in the weights), and `k` times
        that on the last micro-batch, so the applied update is
        `sum_i n_i grad(L_i) / N` over all `N` real tokens: the same as one
        step on the concatenated batch, and zero when they are all padding.
        The value stays `L_i`, the micro-batch's own mean loss.

        Args:
            loss: The micro-batch's loss, a float32 scalar normalized by its
                own `tokens`.
            tokens: Its number of real tokens (sum of the token weights).

        Returns:
            `loss` unchanged without gradient accumulation; otherwise the same
            value with the rescaled gradient.
        """
        optimizer = self._accumulating_optimizer()
        if optimizer is None:
            return loss
        value = distill_backend.variable_value
        steps = optimizer.gradient_accumulation_steps
        iteration = ops.cast(value(optimizer._iterations), "int32")
        first = ops.equal(iteration % steps, 0)
        last = ops.equal((iteration + 1) % steps, 0)
        # A micro-batch whose step a LossScaleOptimizer skipped (non-finite
        # gradients) left the iteration unchanged: its tokens do not count.
        previous_applied = ops.equal(iteration, self._next_iteration.value)
        earlier = ops.where(
            first,
            0.0,
            ops.where(
                previous_applied,
                self._tokens_after.value,
                self._tokens_before.value,
            ),
        )
        total = earlier + tokens
        # Outside torch.compile's graph, which would otherwise compute the
        # gradient below from the counters as assigned here.
        distill_backend.assign_outside_compiled_graph(
            (self._tokens_before, earlier),
            (self._tokens_after, total),
            (self._next_iteration, iteration + 1),
        )
        inverse_total = ops.where(
            total > 0, 1.0 / ops.maximum(total, 1e-30), 0.0
        )
        multiplier = ops.where(last, float(steps), 1.0)
        objective = multiplier * tokens * inverse_total * loss
        accumulator_weight = multiplier * earlier * inverse_total - 1.0
        for variable in self.trainable_variables:
            if getattr(variable, "overwrite_with_gradient", False):
                continue
            accumulated = value(
                optimizer._accumulated_gradients[
                    optimizer._get_variable_index(variable)
                ]
            )
            # Gradient `accumulator_weight * accumulated` for this variable.
            objective = objective + ops.sum(
                ops.stop_gradient(accumulator_weight * accumulated)
                * ops.cast(variable, accumulated.dtype)
            )
        # The value of `loss`, the gradient of `objective`.
        return ops.stop_gradient(loss - objective) + objective

    def zero_grad(self, set_to_none=True):
        # Keras's PyTorch train step only: see `backend.clear_gradients`.
        distill_backend.clear_gradients(self.trainable_variables)

    def compute_loss_and_updates(
        self, *args, optimizer_variables=None, **kwargs
    ):
        # Keras's JAX trainer only: it passes the optimizer's state here, and
        # `_normalize_over_accumulation` reads it through `variable_value`.
        variables = [] if optimizer_variables is None else self.optimizer.variables
        with distill_backend.variable_values(
            variables, optimizer_variables or []
        ):
            return super().compute_loss_and_updates(
                *args, optimizer_variables=optimizer_variables, **kwargs
            )

    def _check_compiled(self, method):
        if not self.compiled:
            raise ValueError(
                f"Call `distiller.compile(optimizer=..., student_loss_fn=..., "
                f"distillation_loss_fn=..., alpha=..., temperature=...)` "
                f"before `{method}()`."
            )

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, stopping with an error on a non-finite loss."""
        self._check_compiled("fit")
        self._batch_status.assign(ops.zeros((3,), "int32"))
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks.append(NonFiniteLossGuard())
        else:
            callbacks = [NonFiniteLossGuard(), *(callbacks or [])]
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._check_compiled("evaluate")
        return super().evaluate(*args, **kwargs)

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
        }
        if self.feature_distillation is not None:
            config["feature_distillation"] = (
                keras.saving.serialize_keras_object(self.feature_distillation)
            )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # A deep copy: KerasHub's `from_config` edits the nested model configs
        # in place, which would spoil the caller's config for a second load.
        config = copy.deepcopy(config)
        for key in ("student", "teacher", "feature_distillation"):
            if key in config:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops `fit` with a clear error at the first non-finite training loss.

    The `Distiller` adds it to every `fit`. Its step zeroes the gradient of a
    batch whose teacher outputs are not finite, or that fails one of its
    checks (labels, token ids, teacher probabilities), so the student keeps
    finite weights (unchanged under plain SGD; momentum optimizers still
    apply their running average once), and makes the loss NaN. The error
    names the failed check (`Distiller.batch_error`), else the teacher.

    Example:

    >>> guard = NonFiniteLossGuard()
    >>> guard.on_train_batch_end(0, {"loss": 0.5})  # finite: nothing happens
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            # `self.model` syncs the JAX state: read it only on failure.
            model = self.model
            if model is not None:
                model.stop_training = True
                error = (
                    model.batch_error() if isinstance(model, Distiller) else None
                )
                if error is not None:
                    raise error
            raise FloatingPointError(
                f"Non-finite distillation loss ({loss}) at epoch "
                f"{getattr(self, '_epoch', 0) + 1}, batch {batch + 1}; "
                "training stopped. Where the teacher's outputs were NaN or "
                "inf, that batch's gradient was zeroed and the student keeps "
                "its last good weights; NaN in the inputs or labels reaches "
                "the student itself. Check `np.isfinite(x).all()` and "
                "`np.isfinite(teacher.predict(x)).all()`."
            )
