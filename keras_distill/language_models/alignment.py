"""Aligning two tokenizations of the same text by the characters they cover.

A teacher and a student with different tokenizers split one text into
different tokens. Cross-tokenizer distillation compares them where both
tokenizations have a token boundary at the same character offset: a **span**
is a minimal run of student tokens and a run of teacher tokens that cover
exactly the same characters. At a span's start both models have read the same
text, so their next-token distributions there predict the same thing; the
span's joint probability (the product of its tokens' conditional
probabilities) is the probability of the same characters under each model.

Everything here is plain Python and NumPy string work, run in the data
pipeline (never in the compiled step):

- `TokenSurfaces`: what each token id of a tokenizer adds to the text, as
  UTF-8 bytes (SentencePiece, byte-level BPE, WordPiece and byte tokenizers).
  Offsets are counted in UTF-8 bytes, so byte-fallback tokens that split one
  character (`<0xC3>` `<0xA9>` for "é") align too; a span boundary never
  falls inside a character that only one side splits.
- `align_spans`: the spans of two token-width sequences (pure NumPy).
- `TokenAligner`: tokenizes texts with both tokenizers, checks that each
  tokenization spells the text exactly, aligns them and returns fixed-shape
  arrays for the step (`TokenAligner.batch`), plus the two vocabularies'
  shared tokens (`TokenAligner.shared_vocabulary`).

A tokenizer whose normalizer changes characters (lower-casing, Unicode NFKC,
folding runs of spaces, mapping characters to an unknown token) does not
spell the text, so its tokens cannot be placed on the text's characters:
such a text raises `AlignmentError` naming the text, the tokenizer and the
first character that differs, instead of being misaligned silently.
Special tokens (`<bos>`, `<eos>`, `<pad>`, control pieces) cover no
characters: the same special token on both sides at the same offset (an
`<eos>` after the text) forms a span of its own; an unpaired one is in no
span.
"""

import time

import keras
import numpy as np

from keras_distill import checks

# Keys of the step's inputs `TokenAligner.batch` adds to the student's
# `token_ids` and `padding_mask`.
TEACHER_TOKEN_IDS = "teacher_token_ids"


TEACHER_PADDING_MASK = "teacher_padding_mask"


TEACHER_LABELS = "teacher_labels"


STUDENT_SPAN = "student_span"


TEACHER_SPAN = "teacher_span"


ALIGNMENT_KEYS = (
    TEACHER_TOKEN_IDS,
    TEACHER_PADDING_MASK,
    TEACHER_LABELS,
    STUDENT_SPAN,
    TEACHER_SPAN,
)

# SentencePiece writes a space as U+2581 inside its pieces.
_SENTENCEPIECE_SPACE = "\u2581"

# Characters of a text quoted around the first difference in an error.
_QUOTED_CONTEXT = 24


class AlignmentError(ValueError):
    """A text whose tokens do not spell it, so they cannot be aligned.

    Attributes:
        text: The offending text.
        index: Its index in the batch of texts.
        side: `"student"` or `"teacher"`: whose tokenizer changed it.
    """

    def __init__(self, message, text, index, side):
        super().__init__(message)
        self.text = text
        self.index = index
        self.side = side


def _class_names(tokenizer):
    return {cls.__name__ for cls in type(tokenizer).__mro__}


def _byte_pair_alphabet():
    """GPT-2's map from the 256 bytes to the printable characters its
    byte-level BPE vocabularies are written in (Radford et al., 2019)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters)}


def _special_roles(tokenizer, token_ids):
    """`{id: role}` of the special tokens `token_ids` of a tokenizer.

    The start, end and padding tokens are named by their role, so that two
    tokenizers' `<bos>` and `<|begin_of_text|>` pair; any other special
    token by its string.
    """
    roles = {int(i): str(tokenizer.id_to_token(int(i))) for i in token_ids}
    for role in ("start", "end", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            roles[int(token_id)] = role
    return roles


class TokenSurfaces:
    """What each token id of a tokenizer adds to the text, in UTF-8 bytes.

    Built from a tokenizer with `TokenSurfaces.from_tokenizer`; then
    `ends(token_ids, text)` places a tokenization on the text's bytes, or
    raises `AlignmentError` where the tokens do not spell the text.

    Args:
        pieces: A list, per token id, of the bytes the token adds to the
            text (`b""` for special tokens).
        special: `{id: role}` of the tokens that cover no text: `"start"`,
            `"end"`, `"pad"`, `"unknown"` or the token's own string.
        unknown: Ids that stand for text the vocabulary lacks (`<unk>`,
            whose characters are lost) or that text never gives (unused
            pieces); a tokenization holding one does not spell its text.
        byte_pieces: Ids of byte-fallback pieces (one byte each).
        prefix_space: Whether the tokenizer adds a space before the text
            (SentencePiece's dummy prefix, byte-level BPE's
            `add_prefix_space`); it is not counted as text.
        description: What the tokenizer is, for error messages.
        tokenizer: The tokenizer itself (called by `TokenAligner`), or
            `None`.

    Example:

    >>> surfaces = TokenSurfaces(
    ...     pieces=[b"", b"to", b" be", b","], special={0: "end"}, unknown=())
    >>> surfaces.ends([1, 2, 3, 0], "to be,").tolist()
    [2, 5, 6, 6]
    """

    def __init__(
        self,
        pieces,
        special,
        unknown,
        byte_pieces=(),
        prefix_space=False,
        description="tokenizer",
        tokenizer=None,
    ):
        self.pieces = list(pieces)
        self.special = dict(special)
        self.unknown = frozenset(int(i) for i in unknown)
        self.byte_pieces = frozenset(int(i) for i in byte_pieces)
        self.prefix_space = bool(prefix_space)
        self.description = description
        self.tokenizer = tokenizer
        self.widths = np.asarray([len(p) for p in self.pieces], "int64")

    @classmethod
    def from_tokenizer(cls, tokenizer):
        """Reads a KerasHub tokenizer's token surfaces.

        SentencePiece tokenizers (Gemma, Llama 2) are read through the
        `sentencepiece` package from their model proto: U+2581 is a space,
        byte pieces (`<0x0A>`) one byte each, control pieces cover nothing.
        Byte-level BPE (GPT-2, Llama 3) maps its vocabulary back through
        GPT-2's byte alphabet. WordPiece (BERT) drops the spaces between
        words and may lower-case, so its tokens spell a text only where it
        has neither: other texts raise `AlignmentError`, as they should.

        Args:
            tokenizer: A `keras_hub.tokenizers.Tokenizer` (SentencePiece,
                BytePair, WordPiece or Byte tokenizer, or a subclass).

        Returns:
            A `TokenSurfaces`.
        """
        names = _class_names(tokenizer)
        if "SentencePieceTokenizer" in names:
            return cls._from_sentencepiece(tokenizer)
        if "BytePairTokenizer" in names:
            return cls._from_byte_pair(tokenizer)
        if "WordPieceTokenizer" in names:
            return cls._from_word_piece(tokenizer)
        if "ByteTokenizer" in names:
            changes = [
                "lower-cases" if getattr(tokenizer, "lowercase", False) else None,
                getattr(tokenizer, "normalization_form", None),
            ]
            changes = ", ".join(change for change in changes if change)
            return cls(
                [bytes([i]) for i in range(256)],
                {},
                (),
                description=type(tokenizer).__name__ + (f" ({changes})" if changes else ""),
                tokenizer=tokenizer,
            )
        raise TypeError(
            "Cross-tokenizer alignment reads SentencePiece, byte-level BPE, "
            "WordPiece and byte tokenizers (keras_hub.tokenizers and their "
            f"subclasses, e.g. Gemma3Tokenizer), got {type(tokenizer).__name__}."
        )

    @classmethod
    def _from_sentencepiece(cls, tokenizer):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        proto = tokenizer.proto
        if proto is None:
            raise ValueError(
                f"The {type(tokenizer).__name__} has no vocabulary (its "
                "SentencePiece proto is not set)."
            )
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        normalizer = sentencepiece_model_pb2.ModelProto.FromString(proto).normalizer_spec
        size = processor.get_piece_size()
        # Control pieces never come from text; user-defined ones (Gemma's
        # `<start_of_turn>`) are matched in it, so they spell their string.
        special = _special_roles(
            tokenizer, [i for i in range(size) if processor.is_control(i)]
        )
        pieces, unknown, byte_pieces = [], [], []
        for token_id in range(size):
            piece = processor.id_to_piece(token_id)
            if processor.is_unknown(token_id) or processor.is_unused(token_id):
                # Never text: `<unk>` stands for lost characters, unused
                # pieces are never produced.
                unknown.append(token_id)
                special.setdefault(token_id, "unknown" if processor.is_unknown(token_id) else piece)
                pieces.append(b"")
            elif token_id in special:
                pieces.append(b"")
            elif processor.is_byte(token_id):
                byte_pieces.append(token_id)
                pieces.append(bytes([int(piece[3:5], 16)]))
            else:
                pieces.append(piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8"))
        description = (
            f"{type(tokenizer).__name__} (SentencePiece, normalizer "
            f"{normalizer.name or 'identity'!r}"
            + (", removes extra whitespace" if normalizer.remove_extra_whitespaces else "")
            + ")"
        )
        return cls(
            pieces,
            special,
            unknown,
            byte_pieces,
            prefix_space=normalizer.add_dummy_prefix,
            description=description,
            tokenizer=tokenizer,
        )

    @classmethod
    def _from_byte_pair(cls, tokenizer):
        alphabet = _byte_pair_alphabet()
        special = _special_roles(tokenizer, tokenizer.special_token_ids)
        pieces = []
        for token_id in range(tokenizer.vocabulary_size()):
            if token_id in special:
                pieces.append(b"")
            else:
                token = tokenizer.id_to_token(token_id)
                pieces.append(bytes(alphabet[c] for c in token if c in alphabet))
        return cls(
            pieces,
            special,
            (),
            prefix_space=getattr(tokenizer, "add_prefix_space", False),
            description=f"{type(tokenizer).__name__} (byte-level BPE)",
            tokenizer=tokenizer,
        )

    @classmethod
    def _from_word_piece(cls, tokenizer):
        special = _special_roles(tokenizer, tokenizer.special_token_ids)
        oov = getattr(tokenizer, "oov_token", None)
        unknown = [] if oov is None else [int(tokenizer.token_to_id(oov))]
        special.update({i: "unknown" for i in unknown})
        pieces = []
        for token_id, token in enumerate(tokenizer.get_vocabulary()):
            if token_id in special:
                pieces.append(b"")
            else:
                pieces.append(token.removeprefix("##").encode("utf-8"))
        lowercase = getattr(tokenizer, "lowercase", False)
        return cls(
            pieces,
            special,
            unknown,
            description=(
                f"{type(tokenizer).__name__} (WordPiece: drops the spaces between "
                f"words{', lower-cases' if lowercase else ''})"
            ),
            tokenizer=tokenizer,
        )

    @property
    def vocabulary_size(self):
        return len(self.pieces)

    def ends(self, token_ids, text, index=0, side="tokenizer"):
        """The byte offset in `text` where each token ends.

        Args:
            token_ids: The tokenization of `text` (special tokens allowed).
            text: The text, a `str`.
            index: The text's index in its batch, for the error message.
            side: `"student"` or `"teacher"`, for the error message.

        Returns:
            An int64 array of cumulative UTF-8 byte offsets, one per token;
            a special (or otherwise empty) token ends where the one before it
            does.

        Raises:
            AlignmentError: The tokens do not spell `text` exactly.
        """
        token_ids = np.asarray(token_ids, "int64").reshape(-1)
        expected = text.encode("utf-8")
        if token_ids.size and (
            token_ids.min() < 0 or token_ids.max() >= self.vocabulary_size
        ):
            raise ValueError(
                f"Token ids outside the {side} tokenizer's {self.vocabulary_size} "
                f"tokens in text {index}: {token_ids.min()} to {token_ids.max()}."
            )
        unknown = [i for i, t in enumerate(token_ids.tolist()) if t in self.unknown]
        widths = self.widths[token_ids] if token_ids.size else np.zeros(0, "int64")
        spelled = b"".join(self.pieces[t] for t in token_ids.tolist())
        if self.prefix_space and spelled.startswith(b" "):
            # The space the tokenizer writes before any text is not part of it.
            first = int(np.flatnonzero(widths)[0])
            widths = widths.copy()
            widths[first] -= 1
            spelled = spelled[1:]
        if unknown or spelled != expected:
            raise AlignmentError(
                self._mismatch(text, expected, spelled, unknown, index, side),
                text,
                index,
                side,
            )
        return np.cumsum(widths)

    def _mismatch(self, text, expected, spelled, unknown, index, side):
        if unknown:
            problem = (
                f"it maps some of its characters to the unknown token (token "
                f"{unknown[0]} of its tokenization), so they are lost"
            )
        else:
            first = next(
                (i for i, (a, b) in enumerate(zip(expected, spelled)) if a != b),
                min(len(expected), len(spelled)),
            )
            character = len(expected[:first].decode("utf-8", errors="ignore"))
            has = expected[first : first + _QUOTED_CONTEXT].decode("utf-8", "replace")
            spells = spelled[first : first + _QUOTED_CONTEXT].decode("utf-8", "replace")
            problem = (
                f"from character {character} the text has {has!r} but its "
                f"tokens spell {spells!r}"
            )
        quoted = text if len(text) <= 200 else text[:200] + "..."
        return (
            f"Text {index} cannot be aligned: the {side} tokenizer, "
            f"{self.description}, changes it ({problem}). Cross-tokenizer "
            "distillation places both tokenizations on the text's characters, "
            "so each must spell the text exactly: use a tokenizer without a "
            "normalizer that changes characters (e.g. SentencePiece with the "
            "identity normalizer and byte fallback, or byte-level BPE), or "
            "apply the same change to the texts first (e.g. "
            "`unicodedata.normalize('NFKC', text)`, `text.lower()`). "
            f"Text: {quoted!r}"
        )


def align_spans(student_widths, teacher_widths):
    """Spans of two tokenizations of one text: runs covering the same bytes.

    Walks both tokenizations along the text and closes a span at each
    offset where both have a token boundary, so every span is the minimal
    pair of runs (one student run, one teacher run) that cover the same
    characters. A token covering no characters (width 0) joins the span
    that follows it; trailing ones are in no span.

    Args:
        student_widths: The number of bytes each student token covers.
        teacher_widths: The same for the teacher; both must sum to the same
            total (the text's length).

    Returns:
        `(student_span, teacher_span, count)`: int32 arrays giving each
        token's span (`-1`: in no span) and the number of spans.

    Example:

    >>> # "to be,": student "to", " be", ","; teacher "to", " b", "e,"
    >>> student_span, teacher_span, count = align_spans([2, 3, 1], [2, 2, 2])
    >>> student_span.tolist(), teacher_span.tolist(), count
    ([0, 1, 1], [0, 1, 1], 2)
    """
    student_ends = np.cumsum(np.asarray(student_widths, "int64"))
    teacher_ends = np.cumsum(np.asarray(teacher_widths, "int64"))
    total = (student_ends[-1:].tolist() or [0])[0]
    if (teacher_ends[-1:].tolist() or [0])[0] != total:
        raise ValueError(
            "The two tokenizations cover different lengths of text: "
            f"{total} bytes against {(teacher_ends[-1:].tolist() or [0])[0]}."
        )
    student_span = np.full(len(student_ends), -1, "int32")
    teacher_span = np.full(len(teacher_ends), -1, "int32")
    i = j = count = 0
    span_student_start = span_teacher_start = 0
    start = 0
    while i < len(student_ends) and j < len(teacher_ends):
        student_end, teacher_end = student_ends[i], teacher_ends[j]
        if student_end == teacher_end and student_end > start:
            student_span[span_student_start : i + 1] = count
            teacher_span[span_teacher_start : j + 1] = count
            count += 1
            start = student_end
            i, j = i + 1, j + 1
            span_student_start, span_teacher_start = i, j
        elif student_end <= teacher_end:
            i += 1
        else:
            j += 1
    return student_span, teacher_span, count


class TokenAligner:
    """Tokenizes texts for a student and a teacher and aligns their tokens.

    Args:
        student_tokenizer: The student's `keras_hub` tokenizer.
        teacher_tokenizer: The teacher's.

    Example:

    >>> import keras_hub
    >>> byte_tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    >>> aligner = TokenAligner(byte_tokenizer, byte_tokenizer)
    >>> x, labels, weight = aligner.batch(["to be"], sequence_length=8)
    >>> labels[0].tolist()  # no start token: "t" is an input only
    [111, 32, 98, 101, 0, 0, 0, 0]
    >>> x["student_span"][0].tolist()
    [0, 1, 2, 3, -1, -1, -1, -1]
    """

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student = TokenSurfaces.from_tokenizer(student_tokenizer)
        self.teacher = TokenSurfaces.from_tokenizer(teacher_tokenizer)
        self._shared = None
        self.seconds = 0.0
        self.batches = 0

    def shared_vocabulary(self):
        """The tokens both vocabularies have: same text, or same special role.

        Where a vocabulary has several ids for the same text (a normal piece
        and a byte piece for "A"), they pair in order of preference: first
        the one its tokenizer writes that text as, then other normal pieces,
        then byte pieces. Identical vocabularies pair every id with itself.

        Returns:
            `(student_ids, teacher_ids)`: int32 arrays, pair `i` being the
            same token in both vocabularies, sorted by student id.
        """
        if self._shared is None:
            student = _ids_by_surface(self.student)
            teacher = _ids_by_surface(self.teacher)
            pairs = sorted(
                pair
                for key, student_ids in student.items()
                for pair in zip(student_ids, teacher.get(key, ()))
            )
            self._shared = tuple(
                np.asarray([pair[k] for pair in pairs], "int32") for k in (0, 1)
            )
        return self._shared

    def align(self, text, index=0, add_end=False):
        """Tokenizes and aligns one text.

        Args:
            text: The text, a `str`.
            index: Its index in a batch, for error messages.
            add_end: Whether both sequences end with their end token.

        Returns:
            A dict with the `"student"` and `"teacher"` token ids (with the
            start token when the tokenizer has one, and the end token with
            `add_end`), their `"student_span"` and `"teacher_span"` (each
            token's span, `-1`: none) and the span `"count"`.

        Raises:
            AlignmentError: A tokenization does not spell `text`.
        """
        if not isinstance(text, str):
            raise TypeError(f"Texts must be strings, got {type(text).__name__} at {index}.")
        sides = {}
        for side, surfaces in (("student", self.student), ("teacher", self.teacher)):
            token_ids = _tokenize(surfaces.tokenizer, text)
            ends = surfaces.ends(token_ids, text, index, side)
            token_ids, ends = _with_start_and_end(surfaces, token_ids, ends, add_end, side)
            roles = [surfaces.special.get(t) for t in token_ids.tolist()]
            sides[side] = (token_ids, ends, roles)
        spans = _align_sequences(sides["student"][1:], sides["teacher"][1:])
        return {
            "student": sides["student"][0],
            "teacher": sides["teacher"][0],
            STUDENT_SPAN: spans[0],
            TEACHER_SPAN: spans[1],
            "count": spans[2],
        }

    def batch(
        self,
        texts,
        sequence_length,
        teacher_sequence_length=None,
        add_end=False,
    ):
        """Fixed-shape training arrays of texts, both tokenizations aligned.

        Each text is tokenized by both tokenizers (after the start token),
        the two are aligned (`align`), then cut to the sequence lengths:
        inputs are the first `sequence_length` tokens, labels the next
        ones. A span with a token cut off on either side is dropped (its
        student tokens still train on their labels). Spans are numbered
        from 0 in each row; every array has a fixed shape, so the step
        compiles once.

        Args:
            texts: A list of strings.
            sequence_length: The student's tokens per row.
            teacher_sequence_length: The teacher's (default:
                `sequence_length`).
            add_end: Whether each text ends with the end token.

        Returns:
            `(x, labels, sample_weight)` NumPy arrays: `x` holds the student's
            `"token_ids"` and `"padding_mask"`, and `"teacher_token_ids"`,
            `"teacher_padding_mask"`, `"teacher_labels"` (the teacher's next
            tokens), `"student_span"` and `"teacher_span"` (each label
            position's span, `-1`: none); `labels` and `sample_weight` (1 at
            real label positions) are the student's. The time it took adds
            to `seconds` and `batches`.

        Raises:
            AlignmentError: A text's tokenization does not spell it.
        """
        checks.check_positive_int("sequence_length", sequence_length)
        checks.check_positive_int(
            "teacher_sequence_length", teacher_sequence_length, allow_none=True
        )
        if isinstance(texts, str):
            raise TypeError("`texts` must be a list of strings, got one string.")
        start = time.perf_counter()
        lengths = {
            "student": sequence_length,
            "teacher": teacher_sequence_length or sequence_length,
        }
        rows = len(texts)
        arrays = {}
        for side, length in lengths.items():
            arrays[side] = {
                "token_ids": np.zeros((rows, length), "int32"),
                "padding_mask": np.zeros((rows, length), "bool"),
                "labels": np.zeros((rows, length), "int32"),
                "span": np.full((rows, length), -1, "int32"),
            }
        for row, text in enumerate(texts):
            aligned = self.align(text, row, add_end)
            # Kept: spans whose tokens are all labels of both rows (the first
            # token is an input only, later ones may be cut off).
            dropped = set()
            for side, length in lengths.items():
                span = aligned[f"{side}_span"]
                dropped |= set(span[:1].tolist()) | set(span[length + 1 :].tolist())
            kept = np.setdiff1d(np.arange(aligned["count"]), list(dropped))
            renumber = np.full(aligned["count"] + 1, -1, "int32")
            renumber[kept] = np.arange(len(kept), dtype="int32")
            for side, length in lengths.items():
                token_ids = aligned[side]
                inputs = token_ids[:-1][:length]
                target = arrays[side]
                target["token_ids"][row, : len(inputs)] = inputs
                target["padding_mask"][row, : len(inputs)] = True
                target["labels"][row, : len(inputs)] = token_ids[1:][:length]
                # Index -1 (no span) reads `renumber`'s last entry, -1.
                target["span"][row, : len(inputs)] = renumber[
                    aligned[f"{side}_span"][1:][:length]
                ]
        student, teacher = arrays["student"], arrays["teacher"]
        x = {
            "token_ids": student["token_ids"],
            "padding_mask": student["padding_mask"],
            TEACHER_TOKEN_IDS: teacher["token_ids"],
            TEACHER_PADDING_MASK: teacher["padding_mask"],
            TEACHER_LABELS: teacher["labels"],
            STUDENT_SPAN: student["span"],
            TEACHER_SPAN: teacher["span"],
        }
        # Every input position has a label: the next token.
        sample_weight = student["padding_mask"].astype("float32")
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return x, student["labels"], sample_weight


def _tokenize(tokenizer, text):
    return np.asarray(keras.ops.convert_to_numpy(tokenizer(text)), "int64").reshape(-1)


def _with_start_and_end(surfaces, token_ids, ends, add_end, side):
    """The token ids with the start (and end) token, and their byte ends."""
    tokenizer = surfaces.tokenizer
    start = getattr(tokenizer, "start_token_id", None)
    if start is not None:
        token_ids = np.concatenate([[start], token_ids])
        ends = np.concatenate([[0], ends])
    if add_end:
        end = getattr(tokenizer, "end_token_id", None)
        if end is None:
            raise ValueError(
                f"add_end=True but the {side} tokenizer "
                f"{type(tokenizer).__name__} has no end token."
            )
        token_ids = np.concatenate([token_ids, [end]])
        ends = np.concatenate([ends, ends[-1:] if len(ends) else [0]])
    return token_ids.astype("int64"), ends


def _align_sequences(student, teacher):
    """Spans of two full token sequences, special tokens included.

    Text tokens are aligned by `align_spans`; a special token on each side
    with the same role and at the same offset is a span of its own.
    """
    (student_ends, student_roles), (teacher_ends, teacher_roles) = student, teacher
    student_span = np.full(len(student_ends), -1, "int32")
    teacher_span = np.full(len(teacher_ends), -1, "int32")
    student_text = [i for i, r in enumerate(student_roles) if r is None]
    teacher_text = [i for i, r in enumerate(teacher_roles) if r is None]
    text_spans = align_spans(
        _widths(student_ends)[student_text], _widths(teacher_ends)[teacher_text]
    )
    student_span[student_text] = text_spans[0]
    teacher_span[teacher_text] = text_spans[1]
    count = text_spans[2]
    teacher_specials = {}
    for i, role in enumerate(teacher_roles):
        if role is not None:
            teacher_specials.setdefault((int(teacher_ends[i]), role), []).append(i)
    for i, role in enumerate(student_roles):
        partners = teacher_specials.get((int(student_ends[i]), role)) if role else None
        if partners:
            student_span[i] = count
            teacher_span[partners.pop(0)] = count
            count += 1
    return student_span, teacher_span, count


def _widths(ends):
    ends = np.asarray(ends, "int64")
    return np.diff(np.concatenate([[0], ends])) if len(ends) else ends


def _ids_by_surface(surfaces):
    """`{surface or special role: ids}`, each list in order of preference."""
    by_key = {}
    for token_id, piece in enumerate(surfaces.pieces):
        role = surfaces.special.get(token_id)
        key = ("special", role) if role is not None else ("text", piece)
        by_key.setdefault(key, []).append(token_id)
    for key, token_ids in by_key.items():
        if len(token_ids) > 1:
            # A byte piece is the tokenizer's last resort for its byte.
            token_ids.sort(key=lambda t: (t in surfaces.byte_pieces, t))
            written = _written_id(surfaces, key) if key[0] == "text" else None
            if written in token_ids:
                token_ids.remove(written)
                token_ids.insert(0, written)
    return by_key


def _written_id(surfaces, key):
    """The id a tokenizer writes a text piece as, if it is one token."""
    try:
        written = _tokenize(surfaces.tokenizer, key[1].decode("utf-8")).tolist()
    except UnicodeDecodeError:
        return None
    return written[0] if len(written) == 1 else None
