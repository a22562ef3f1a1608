"""Hidden-state and attention-map distillation, and teacher–student layer maps.

`FeatureDistillation` adds two terms to a `Distiller`'s loss:

- hidden states ("linear path"): a trainable projection (a `Dense` without
  bias on the last axis) maps each chosen student layer's output to the
  width of its teacher layer; both are layer-normalized (no parameters) and
  compared by MSE or cosine distance;
- attention maps: `1 - cosine` between the student's and the teacher's
  attention probabilities of each query row, after averaging the heads, or
  grouping them, or an explicit head mapping; padded queries do not count.

Both are masked by the Distiller's `sample_weight` (for language models the
padding mask) and by the input's `padding_mask` (a BERT classifier's batch,
whose `sample_weight` is per example): padded positions count for no
attention query and no `(batch, sequence, features)` hidden state. They are
added to the logits loss:
`loss = alpha·hard + (1-alpha)·T²·divergence + weight·hidden +
attention_weight·attention`.

Layers are named by **layer name** on functional (and Sequential) Keras
models and by **block index** (`backbone.transformer_layers[i]`) on KerasHub
models. Pairs are explicit `(student_layer, teacher_layer)` tuples or come
from a strategy: `"uniform"` (evenly spread over the teacher's depth),
`"last"` (the teacher's last layers) or `"attention"` (for each student
layer, the teacher layer whose head-averaged attention maps are most similar
on a calibration batch).

The projections train with the student, are saved with the Distiller (they
are weights of the `FeatureDistillation` layer it holds), and are not part
of `distiller.student`.

The losses themselves are `keras_distill.losses.features`; the view is
`keras_distill.graph`; KerasHub's attention probabilities come from
`keras_distill.language_models.hub`.
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_distill import checks
from keras_distill.checks import check_choice
from keras_distill.graph import _functional
from keras_distill.graph import _Holder
from keras_distill.graph import build_view
from keras_distill.language_models.hub import _hub_blocks
from keras_distill.losses import weighting
from keras_distill.losses.features import HIDDEN_LOSSES
from keras_distill.losses.features import _check_head_mapping
from keras_distill.losses.features import _unit
from keras_distill.losses.features import attention_map_loss
from keras_distill.losses.features import hidden_state_loss

STRATEGIES = ("uniform", "last", "attention")


# ---- Layer mapping ----


def layer_mapping(num_student_layers, num_teacher_layers, strategy="uniform"):
    """Pairs student layers with teacher layers by position.

    Args:
        num_student_layers: Number of student layers to map.
        num_teacher_layers: Number of teacher layers to choose from.
        strategy: `"uniform"`: student layer `i` of `S` gets teacher layer
            `ceil((i + 1) · T / S) - 1`, so the last maps to the last and the
            others spread evenly; `"last"`: the teacher's last `S` layers
            (needs `S <= T`).

    Returns:
        A list of `(student_index, teacher_index)` tuples.

    Example:

    >>> layer_mapping(2, 6, "uniform")
    [(0, 2), (1, 5)]
    >>> layer_mapping(2, 6, "last")
    [(0, 4), (1, 5)]
    """
    check_choice("strategy", strategy, ("uniform", "last"))
    for name, value in (
        ("num_student_layers", num_student_layers),
        ("num_teacher_layers", num_teacher_layers),
    ):
        checks.check_positive_int(name, value)
    if strategy == "uniform":
        return [
            (i, math.ceil((i + 1) * num_teacher_layers / num_student_layers) - 1)
            for i in range(num_student_layers)
        ]
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"strategy='last' maps each of the {num_student_layers} student "
            f"layers to a distinct one of the teacher's last layers, but the "
            f"teacher has only {num_teacher_layers}; use 'uniform'."
        )
    offset = num_teacher_layers - num_student_layers
    return [(i, offset + i) for i in range(num_student_layers)]


# ---- Finding layers and tapping their outputs ----


def _named_layers(model):
    return {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, keras.layers.InputLayer)
    }


def candidate_layers(model):
    """The layers of `model` that feature distillation can name.

    Args:
        model: A functional/Sequential Keras model or a KerasHub model.

    Returns:
        For KerasHub models, the number of transformer blocks (an `int`:
        layers are named by block index); otherwise the list of layer names.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, name="hidden"), keras.layers.Dense(2, name="out")])
    >>> candidate_layers(model)
    ['hidden', 'out']
    """
    blocks = _hub_blocks(model)
    if blocks is not None:
        return len(blocks)
    return list(_named_layers(_functional(model, "model")))


def _resolve_layer(model, reference, role):
    """The layer object `reference` (a name or a block index) designates."""
    blocks = _hub_blocks(model)
    if blocks is not None:
        if isinstance(reference, bool) or not isinstance(reference, numbers.Integral):
            raise ValueError(
                f"The {role} is a KerasHub model: name its layers by block "
                f"index in [0, {len(blocks)}) (or negative from the end), "
                f"got {reference!r}."
            )
        if not -len(blocks) <= reference < len(blocks):
            raise ValueError(
                f"The {role} has {len(blocks)} transformer blocks (indices 0 "
                f"to {len(blocks) - 1}); block {reference} does not exist."
            )
        return blocks[reference]
    layers = _named_layers(_functional(model, role))
    if reference not in layers:
        raise ValueError(
            f"The {role} has no layer named {reference!r}. Its layers are: "
            f"{list(layers)}."
        )
    return layers[reference]


def _default_candidates(model, layers, role):
    if layers is not None:
        return list(layers)
    blocks = _hub_blocks(model)
    if blocks is None:
        raise ValueError(
            f"A mapping strategy needs the {role}'s candidate layers: pass "
            f"`{role}_layers=[...]` with names from {candidate_layers(model)}."
        )
    return list(range(len(blocks)))


# ---- The Distiller component ----


class _Taps:
    """Stashes one step's tapped outputs between `Distiller.call` and
    `compute_loss` (both run inside the same traced step)."""

    def __init__(self):
        self.student = None
        self.teacher = None
        self.padding_mask = None


@keras.saving.register_keras_serializable(package="keras_distill")
class FeatureDistillation(keras.layers.Layer):
    """Hidden-state and attention-map terms for a `Distiller`.

    Pass it as `Distiller(student, teacher, feature_distillation=...)`. The
    Distiller then runs the student once per step through a view returning
    its logits and the chosen layers' outputs, runs the teacher likewise, and
    adds `weight · hidden_loss + attention_weight · attention_loss` to the
    logits loss, reported as `feature_loss` and `attention_loss`.

    Args:
        pairs: Explicit `[(student_layer, teacher_layer), ...]`, layers
            named by name (functional models) or block index (KerasHub), or
            a strategy: `"uniform"`, `"last"` or `"attention"`.
        loss: Hidden-state distance, `"mse"` or `"cosine"`.
        weight: Weight of the hidden-state term (0 turns it off).
        attention_weight: Weight of the attention-map term (0, the default,
            turns it off).
        attention_heads: `"average"`, `"grouped"` or a list of teacher heads,
            one per student head (see `map_heads`).
        student_layers: Candidate student layers for a strategy; every
            transformer block of a KerasHub model by default.
        teacher_layers: Candidate teacher layers for a strategy, likewise.
        calibration_data: A batch both models read, for `"attention"`.
        normalize: Layer-normalize hidden states before comparing them.
        projection: Whether a trainable projection maps student hidden
            states to the teacher's width; `False` needs equal widths.
        **kwargs: `keras.layers.Layer` arguments such as `name`.

    Example:

    >>> import numpy as np
    >>> from keras_distill import Distiller
    >>> def mlp(width, name):
    ...     inputs = keras.Input((4,))
    ...     hidden = keras.layers.Dense(width, "relu", name=f"{name}_hidden")(inputs)
    ...     return keras.Model(inputs, keras.layers.Dense(3)(hidden), name=name)
    >>> features = FeatureDistillation(
    ...     pairs=[("student_hidden", "teacher_hidden")], loss="mse", weight=0.5)
    >>> distiller = Distiller(mlp(8, "student"), mlp(16, "teacher"),
    ...                       feature_distillation=features)
    >>> distiller.compile(optimizer="adam", alpha=0.0)
    >>> history = distiller.fit(np.ones((8, 4)), epochs=1, verbose=0)
    >>> sorted(history.history)
    ['distillation_loss', 'feature_loss', 'loss', 'student_loss']
    """

    def __init__(
        self,
        pairs="uniform",
        loss="mse",
        weight=1.0,
        attention_weight=0.0,
        attention_heads="average",
        student_layers=None,
        teacher_layers=None,
        calibration_data=None,
        normalize=True,
        projection=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("loss", loss, HIDDEN_LOSSES)
        for name, value in (("weight", weight), ("attention_weight", attention_weight)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if weight == 0 and attention_weight == 0:
            raise ValueError(
                "Both `weight` (hidden states) and `attention_weight` are 0: "
                "set at least one, or leave `feature_distillation` out."
            )
        if isinstance(pairs, str):
            check_choice("pairs", pairs, STRATEGIES)
            if pairs == "attention" and calibration_data is None:
                raise ValueError(
                    "pairs='attention' picks teacher layers by attention "
                    "similarity on a calibration batch: pass "
                    "`calibration_data=x` (a batch both models read)."
                )
        else:
            pairs = [tuple(pair) for pair in pairs]
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise ValueError(
                    "`pairs` must be a strategy name or a non-empty list of "
                    f"(student_layer, teacher_layer) pairs, got {pairs!r}."
                )
        if not isinstance(attention_heads, str):
            attention_heads = list(attention_heads)
        self.pairs = pairs
        self.loss = loss
        self.weight = float(weight)
        self.attention_weight = float(attention_weight)
        self.attention_heads = attention_heads
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        self.normalize = bool(normalize)
        self.projection = bool(projection)
        self._calibration = _Holder()
        self._calibration.data = calibration_data
        self._views = _Holder()
        self._taps = _Taps()
        self.attention_similarity = None
        self.projections = []
        self.feature_loss_tracker = (
            keras.metrics.Mean(name="feature_loss") if weight else None
        )
        self.attention_loss_tracker = (
            keras.metrics.Mean(name="attention_loss") if attention_weight else None
        )

    def attach(self, student, teacher):
        """Resolves the pairs, builds the views and the projections.

        Called by the `Distiller` with its (built) student and teacher.
        """
        if hasattr(self._views, "student"):
            raise ValueError(
                "This FeatureDistillation already belongs to a Distiller (it "
                "holds that Distiller's projections); create a new one."
            )
        if teacher is None:
            raise ValueError(
                "Feature distillation reads the teacher's intermediate layers, "
                "so it needs the teacher model, not only cached outputs."
            )
        self.pairs = self._resolve_pairs(student, teacher)
        taps = {"student": [], "teacher": []}
        for student_ref, teacher_ref in self.pairs:
            student_layer = _resolve_layer(student, student_ref, "student")
            teacher_layer = _resolve_layer(teacher, teacher_ref, "teacher")
            for kind, used in (("hidden", self.weight), ("attention", self.attention_weight)):
                if used:
                    taps["student"].append((student_layer, kind))
                    taps["teacher"].append((teacher_layer, kind))
        self._views.student = build_view(student, taps["student"], "student")
        self._views.teacher = build_view(teacher, taps["teacher"], "teacher")
        self._check_shapes()
        self.built = True

    def _resolve_pairs(self, student, teacher):
        if not isinstance(self.pairs, str):
            return self.pairs
        if self.pairs == "attention":
            similarity, student_layers, teacher_layers = attention_similarity(
                student,
                teacher,
                self._calibration.data,
                self.student_layers,
                self.teacher_layers,
            )
            self.attention_similarity = similarity
            return [
                (student_layers[i], teacher_layers[int(np.argmax(row))])
                for i, row in enumerate(similarity)
            ]
        student_layers = _default_candidates(student, self.student_layers, "student")
        teacher_layers = _default_candidates(teacher, self.teacher_layers, "teacher")
        return [
            (student_layers[i], teacher_layers[j])
            for i, j in layer_mapping(
                len(student_layers), len(teacher_layers), self.pairs
            )
        ]

    def _check_shapes(self):
        """Checks every pair's shapes and builds the projections."""
        student_outputs = self._views.student.outputs[1:]
        teacher_outputs = self._views.teacher.outputs[1:]
        projections = []
        for (pair, kind), s, t in zip(
            self._tap_kinds(), student_outputs, teacher_outputs
        ):
            if kind == "attention":
                _check_head_mapping(self.attention_heads, s.shape[1], t.shape[1])
                continue
            s_shape, t_shape = tuple(s.shape), tuple(t.shape)
            if len(s_shape) != len(t_shape) or any(
                a is not None and b is not None and a != b
                for a, b in zip(s_shape[1:-1], t_shape[1:-1])
            ):
                raise ValueError(
                    f"Hidden states of pair {pair} cannot be mapped: student "
                    f"{s_shape}, teacher {t_shape}. A projection maps the last "
                    "(feature) axis only; the other axes (sequence length, "
                    "spatial size) must match, e.g. by pooling one side or "
                    "choosing layers of the same resolution."
                )
            if not self.projection:
                if s_shape[-1] != t_shape[-1]:
                    raise ValueError(
                        f"projection=False but pair {pair} has student width "
                        f"{s_shape[-1]} and teacher width {t_shape[-1]}; "
                        "enable the projection."
                    )
                continue
            projection = keras.layers.Dense(
                t_shape[-1], use_bias=False, name=f"projection_{len(projections)}"
            )
            projection.build(s_shape)
            projections.append(projection)
        self.projections = projections

    def _kinds(self):
        return [
            kind
            for kind, used in (("hidden", self.weight), ("attention", self.attention_weight))
            if used
        ]

    def _tap_kinds(self):
        return [(pair, kind) for pair in self.pairs for kind in self._kinds()]

    def student_outputs(self, inputs, training=None):
        """Runs the student's view once: returns its logits, keeps the taps."""
        outputs = self._views.student(inputs, training=training)
        self._taps.student = outputs[1:]
        self._taps.padding_mask = _padding_mask_of(inputs)
        return outputs[0]

    def teacher_outputs(self, inputs):
        """Runs the teacher's view in inference mode: returns its logits."""
        outputs = self._views.teacher(inputs, training=False)
        self._taps.teacher = [ops.stop_gradient(o) for o in outputs[1:]]
        return outputs[0]

    def compute_loss(self, sample_weight=None):
        """The weighted hidden-state and attention terms of this step.

        Consumes the outputs that `student_outputs` and `teacher_outputs`
        kept during the same step.

        Args:
            sample_weight: The Distiller's `sample_weight` (or padding mask).

        Returns:
            A float32 scalar.
        """
        student_taps, teacher_taps = self._taps.student, self._taps.teacher
        self._taps.student = self._taps.teacher = None
        if student_taps is None or teacher_taps is None:
            raise ValueError(
                "FeatureDistillation.compute_loss needs this step's student "
                "and teacher outputs: call it from the Distiller's step."
            )
        # Padded positions of the input (`x["padding_mask"]`, e.g. a BERT
        # classifier's batch, whose `sample_weight` is per example) count
        # for no attention query and no (batch, sequence, features) state.
        position_weights = _position_weights(sample_weight, self._taps.padding_mask)
        self._taps.padding_mask = None
        hidden, attention = [], []
        projection_index = 0
        for (pair, kind), s, t in zip(self._tap_kinds(), student_taps, teacher_taps):
            if kind == "attention":
                attention.append(
                    attention_map_loss(s, t, position_weights, self.attention_heads)
                )
                continue
            if self.projection:
                s = self.projections[projection_index](s)
                projection_index += 1
            weights = position_weights if len(t.shape) == 3 else sample_weight
            hidden.append(
                hidden_state_loss(s, t, self.loss, weights, self.normalize)
            )
        total = ops.zeros((), "float32")
        batch_size = ops.shape(student_taps[0])[0]
        if hidden:
            hidden_loss = ops.mean(ops.stack(hidden))
            self.feature_loss_tracker.update_state(hidden_loss, batch_size)
            total = total + self.weight * hidden_loss
        if attention:
            attention_loss = ops.mean(ops.stack(attention))
            self.attention_loss_tracker.update_state(attention_loss, batch_size)
            total = total + self.attention_weight * attention_loss
        return total

    def get_config(self):
        config = super().get_config()
        config.update(
            pairs=self.pairs,
            loss=self.loss,
            weight=self.weight,
            attention_weight=self.attention_weight,
            attention_heads=self.attention_heads,
            student_layers=self.student_layers,
            teacher_layers=self.teacher_layers,
            normalize=self.normalize,
            projection=self.projection,
        )
        return config


def attention_similarity(
    student, teacher, x, student_layers=None, teacher_layers=None
):
    """Mean cosine similarity of every student/teacher attention-map pair.

    Head-averaged attention maps of each candidate layer are computed on the
    calibration batch `x`, and each query row of a student layer is compared
    with the same row of each teacher layer; padded queries (from
    `x["padding_mask"]`) do not count.

    Args:
        student: The student model.
        teacher: The teacher model.
        x: A calibration batch both models read.
        student_layers: Candidate student layers (names or block indices);
            every transformer block of a KerasHub model by default.
        teacher_layers: Candidate teacher layers, likewise.

    Returns:
        `(similarity, student_layers, teacher_layers)`, where `similarity`
        is a NumPy array `(len(student_layers), len(teacher_layers))`.
    """
    student_layers = _default_candidates(student, student_layers, "student")
    teacher_layers = _default_candidates(teacher, teacher_layers, "teacher")
    maps = []
    for model, layers, role in (
        (student, student_layers, "student"),
        (teacher, teacher_layers, "teacher"),
    ):
        taps = [(_resolve_layer(model, ref, role), "attention") for ref in layers]
        outputs = build_view(model, taps, role)(x, training=False)[1:]
        maps.append(
            [ops.mean(ops.cast(probs, "float32"), axis=1) for probs in outputs]
        )
    padding_mask = _padding_mask_of(x)
    similarity = np.zeros((len(student_layers), len(teacher_layers)))
    for i, student_map in enumerate(maps[0]):
        for j, teacher_map in enumerate(maps[1]):
            values = ops.sum(_unit(student_map) * _unit(teacher_map), axis=-1)
            similarity[i, j] = ops.convert_to_numpy(
                ops.stop_gradient(weighting.weighted_reduce(values, padding_mask))
            )
    return similarity, student_layers, teacher_layers


def _padding_mask_of(x):
    if isinstance(x, dict) and "padding_mask" in x:
        return x["padding_mask"]
    return None


def _position_weights(sample_weight, padding_mask):
    """Per-position weights `(batch, sequence)`: the input padding mask times
    per-example (or per-token) `sample_weight`; `sample_weight` without one."""
    if padding_mask is None:
        return sample_weight
    mask = ops.cast(padding_mask, "float32")
    if sample_weight is None:
        return mask
    weights = ops.cast(sample_weight, "float32")
    if len(weights.shape) == 1:
        weights = ops.expand_dims(weights, -1)
    return weights * mask
