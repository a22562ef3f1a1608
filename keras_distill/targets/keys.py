"""The names under which teacher outputs travel in a batch's `y`.

A `Distiller` batch is `(x, y)` or `(x, y, sample_weight)`. Without a
teacher-output cache `y` is the labels. With one, `y` is a dict: `LABELS`
and either `TEACHER_LOGITS` (full logits) or `TEACHER_TOP_LOG_PROBS` and
`TEACHER_TOP_INDICES` (top-k targets). The cache writes these keys and the
distillers read them.
"""



# Keys of a batch's `y` dict that carries precomputed teacher outputs (for
# example from a teacher-output cache) next to its "labels".
LABELS = "labels"


TEACHER_LOGITS = "teacher_logits"


TEACHER_TOP_LOG_PROBS = "teacher_top_log_probs"


TEACHER_TOP_INDICES = "teacher_top_indices"


_TEACHER_OUTPUT_KEYS = (
    TEACHER_LOGITS,
    TEACHER_TOP_LOG_PROBS,
    TEACHER_TOP_INDICES,
)
