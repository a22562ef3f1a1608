"""Teacher–student metrics: top-1 agreement and KL, updated by the Distiller.

Two metrics compare the teacher with the student on every batch:
`TeacherAgreement` (how often their top-1 predictions match) and `TeacherKL`
(the plain KL divergence between their distributions). They take
`update_state(teacher_logits, student_logits, sample_weight)`, so the
`Distiller` updates them itself from the logits it already computed: pass
them to `Distiller.compile(metrics=[...])` and they show in the progress bar
and in `History` as `teacher_agreement` and `teacher_kl` (`val_...` too).
"""

import keras
from keras import ops

from keras_distill import checks
from keras_distill.losses import divergences
from keras_distill.losses import weighting


class TeacherStudentMetric(keras.metrics.Metric):
    """Base class of weighted means of a per-position teacher–student value.

    Subclasses implement `values(teacher_logits, student_logits)`, returning
    one float per position (the logits' shape without the class axis). The
    `Distiller` recognizes instances among its compiled metrics and updates
    them with the teacher's and the student's logits instead of `(y, y_pred)`.

    Args:
        name: Name of the metric (its key in `logs`).
        dtype: Dtype of the metric's result.
    """

    def __init__(self, name, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="count"
        )

    def values(self, teacher_logits, student_logits):
        raise NotImplementedError

    def update_state(self, teacher_logits, student_logits, sample_weight=None):
        """Accumulates the batch's values.

        Args:
            teacher_logits: Teacher logits, shape `(..., num_classes)`.
            student_logits: Student logits, same shape.
            sample_weight: Optional per-example weights or per-token padding
                mask, broadcastable to the logits without their class axis.
        """
        teacher_logits = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
        student_logits = ops.stop_gradient(ops.cast(student_logits, "float32"))
        if tuple(teacher_logits.shape[-1:]) != tuple(student_logits.shape[-1:]):
            raise ValueError(
                f"`{self.name}` compares logits of the same shape, got teacher "
                f"{tuple(teacher_logits.shape)} and student "
                f"{tuple(student_logits.shape)}."
            )
        values = self.values(teacher_logits, student_logits)
        self.total.assign_add(
            weighting.weighted_reduce(values, sample_weight, "sum")
        )
        self.count.assign_add(
            weighting.token_count(sample_weight, student_logits)
        )

    def result(self):
        # Before any update (or with all-zero weights) the mean is 0, not NaN.
        return ops.cast(ops.divide_no_nan(self.total, self.count), self.dtype)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_distill")
class TeacherAgreement(TeacherStudentMetric):
    """Fraction of positions where the teacher's and student's top-1 agree.

    With a padding mask as `sample_weight` it counts real tokens only. Ties
    are broken towards the lowest class index on both sides (`argmax`).

    Args:
        name: Name of the metric, `"teacher_agreement"` by default.
        dtype: Dtype of the metric's result.

    Example:

    >>> metric = TeacherAgreement()
    >>> metric.update_state([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]])
    >>> float(metric.result())
    0.5
    """

    def __init__(self, name="teacher_agreement", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def values(self, teacher_logits, student_logits):
        return ops.cast(
            ops.equal(
                ops.argmax(teacher_logits, axis=-1),
                ops.argmax(student_logits, axis=-1),
            ),
            "float32",
        )


@keras.saving.register_keras_serializable(package="keras_distill")
class TeacherKL(TeacherStudentMetric):
    """Mean `KL(softmax(t / T) || softmax(s / T))` between teacher and student.

    Unlike the Distiller's `distillation_loss` it is not scaled by `T²` and it
    does not depend on the training divergence, so it is comparable across
    runs with different losses and temperatures. At `temperature=1` (the
    default) it is how far the student's predictive distribution is from the
    teacher's.

    Args:
        temperature: Softening temperature `T > 0` of both distributions.
        name: Name of the metric, `"teacher_kl"` by default.
        dtype: Dtype of the metric's result.

    Example:

    >>> metric = TeacherKL()
    >>> metric.update_state([[2.0, 0.5, -1.0]], [[1.0, 1.0, 0.0]])
    >>> round(float(metric.result()), 4)
    0.2795
    """

    def __init__(self, temperature=1.0, name="teacher_kl", dtype=None):
        checks.check_positive_number("temperature", temperature)
        super().__init__(name=name, dtype=dtype)
        self.temperature = temperature

    def values(self, teacher_logits, student_logits):
        # forward_kl scales by T²; the metric reports the plain KL.
        return divergences.forward_kl(
            teacher_logits, student_logits, self.temperature, reduction="none"
        ) / (self.temperature**2)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
