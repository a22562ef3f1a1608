"""Character alignment of two tokenizations (`language_models.alignment`).

Tokenizers are trained on the fly on a few inline lines; expected spans come
from the `sentencepiece` library's own pieces and an independent
boundary-intersection reference, not from the code under test.
"""

import numpy as np
import pytest

from keras_distill import language_models
from keras_distill.language_models import alignment
from keras_distill.language_models import train_gemma3_tokenizer
from keras_distill.language_models.alignment import AlignmentError
from keras_distill.language_models.alignment import TokenAligner
from keras_distill.language_models.alignment import TokenSurfaces
from keras_distill.language_models.alignment import align_spans

keras_hub = pytest.importorskip("keras_hub")
sentencepiece = pytest.importorskip("sentencepiece")


# No digits, no "é", no "☃" in the student's corpus: those take byte fallback.
STUDENT_LINES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n",
    "We know it, we know it.  Let us kill him, and we'll have corn at our own price.\n",
]
TEACHER_LINES = [
    "Before we proceed, a café au lait: 1234 cups, 56 spoons.\n",
    "Speak, speak!  You are all resolved to die?\n\nWe know it.\n",
    "Let us kill him, and we'll have corn at our own price, café or not.\n",
]
TEXTS = [
    "Before we proceed, a café au lait: 1234 cups.",
    "Speak,  speak\n\nAll:\n   We know it.\n",
    "a snowman \u2603 and \U0001d518\n",
    "",
]


@pytest.fixture(scope="module")
def student_tokenizer():
    return language_models.train_gemma3_tokenizer(STUDENT_LINES * 30, 320, lossless=True)


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return language_models.train_gemma3_tokenizer(TEACHER_LINES * 30, 318, lossless=True)


def _pieces(tokenizer, text):
    """The bytes of each SentencePiece token of `text`, read by sentencepiece."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
    pieces = []
    for piece in processor.encode(text, out_type=str):
        if piece.startswith("<0x") and len(piece) == 6:
            pieces.append(bytes([int(piece[3:5], 16)]))
        else:
            pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
    return pieces


def _reference_spans(student_pieces, teacher_pieces):
    """Spans by intersecting the two tokenizations' boundary sets."""
    student_ends = np.cumsum([len(p) for p in student_pieces])
    teacher_ends = np.cumsum([len(p) for p in teacher_pieces])
    common = np.intersect1d(student_ends, teacher_ends)
    return (
        np.searchsorted(common, student_ends).tolist(),
        np.searchsorted(common, teacher_ends).tolist(),
    )


def test_align_spans_of_hand_written_widths():
    # "to be,": student "to" " be" ","; teacher "to" " b" "e,".
    student, teacher, count = align_spans([2, 3, 1], [2, 2, 2])
    assert (student.tolist(), teacher.tolist(), count) == ([0, 1, 1], [0, 1, 1], 2)
    student, teacher, count = align_spans([1, 1, 1], [1, 1, 1])
    assert (student.tolist(), teacher.tolist(), count) == ([0, 1, 2], [0, 1, 2], 3)
    # A token covering nothing joins the next span; a trailing one is in none.
    student, teacher, count = align_spans([0, 2, 3, 0], [2, 3])
    assert (student.tolist(), teacher.tolist(), count) == ([0, 0, 1, -1], [0, 1], 2)
    student, teacher, count = align_spans([], [])
    assert (student.tolist(), teacher.tolist(), count) == ([], [], 0)
    with pytest.raises(ValueError, match="different lengths of text: 3 bytes against 4"):
        align_spans([1, 2], [4])


def test_surfaces_count_bytes_and_drop_the_prefix_space():
    surfaces = TokenSurfaces([b"", b" to", b" be", b"\xc3", b"\xa9"], {0: "end"}, (),
                             byte_pieces=(3, 4), prefix_space=True)
    assert surfaces.ends([1, 2, 0], "to be").tolist() == [2, 5, 5]
    # Byte offsets: the two byte pieces of "é" end inside and after it.
    assert surfaces.ends([1, 3, 4], "to\u00e9").tolist() == [2, 3, 4]
    with pytest.raises(AlignmentError, match="from character 3 the text has 'e' but its "
                       "tokens spell 'be'"):
        surfaces.ends([1, 2], "to e", index=2, side="teacher")


def test_each_sentencepiece_token_is_a_span_against_bytes(student_tokenizer):
    byte_tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    aligner = TokenAligner(student_tokenizer, byte_tokenizer)
    processor = sentencepiece.SentencePieceProcessor(model_proto=student_tokenizer.proto)
    assert any(
        p.startswith("<0x") for p in processor.encode(TEXTS[2], out_type=str)
    ), "the snowman should take byte fallback"
    for text in TEXTS:
        aligned = aligner.align(text)
        pieces = _pieces(student_tokenizer, text)
        # The student's `<bos>` has no partner (bytes have no start token).
        assert aligned["student_span"].tolist() == [-1, *range(len(pieces))]
        expected = [i for i, piece in enumerate(pieces) for _ in piece]
        assert aligned["teacher_span"].tolist() == expected
        assert aligned["teacher"].tolist() == list(text.encode("utf-8"))
        assert aligned["count"] == len(pieces)


def test_two_sentencepiece_tokenizers_match_the_reference(student_tokenizer, teacher_tokenizer):
    aligner = TokenAligner(student_tokenizer, teacher_tokenizer)
    for text in TEXTS:
        student_pieces = _pieces(student_tokenizer, text)
        teacher_pieces = _pieces(teacher_tokenizer, text)
        aligned = aligner.align(text)
        student_span, teacher_span = _reference_spans(student_pieces, teacher_pieces)
        # Both `<bos>` pair as a span of their own, numbered after the text's.
        count = len(set(student_span))
        assert aligned["student_span"].tolist() == [count, *student_span]
        assert aligned["teacher_span"].tolist() == [count, *teacher_span]
        for span in range(count):
            student_text = b"".join(p for p, s in zip(student_pieces, student_span) if s == span)
            teacher_text = b"".join(p for p, s in zip(teacher_pieces, teacher_span) if s == span)
            assert student_text == teacher_text and student_text


def test_byte_fallback_pieces_share_a_span_with_the_whole_character(
    student_tokenizer, teacher_tokenizer
):
    aligner = TokenAligner(student_tokenizer, teacher_tokenizer)
    aligned = aligner.align("caf\u00e9")
    student_pieces = [aligner.student.pieces[t] for t in aligned["student"][1:]]
    teacher_pieces = [aligner.teacher.pieces[t] for t in aligned["teacher"][1:]]
    assert b"\xc3" in student_pieces and b"\xa9" in student_pieces
    assert any("\u00e9".encode() in piece for piece in teacher_pieces)
    spans = dict(zip(student_pieces, aligned["student_span"][1:].tolist()))
    assert spans[b"\xc3"] == spans[b"\xa9"]


def test_batch_has_fixed_shapes_pairs_end_tokens_and_drops_cut_spans(
    student_tokenizer, teacher_tokenizer
):
    aligner = TokenAligner(student_tokenizer, teacher_tokenizer)
    x, labels, weight = aligner.batch(TEXTS, 64, 72, add_end=True)
    assert {k: v.shape for k, v in x.items()} == {
        "token_ids": (4, 64), "padding_mask": (4, 64), "teacher_token_ids": (4, 72),
        "teacher_padding_mask": (4, 72), "teacher_labels": (4, 72), "student_span": (4, 64),
        "teacher_span": (4, 72),
    }
    assert labels.shape == weight.shape == (4, 64)
    np.testing.assert_array_equal(weight, x["padding_mask"])
    for row, text in enumerate(TEXTS):
        student_count = int(x["padding_mask"][row].sum())
        teacher_count = int(x["teacher_padding_mask"][row].sum())
        assert student_count == len(_pieces(student_tokenizer, text)) + 1
        # Inputs start with <bos>, labels end with <eos>, whose spans pair.
        assert x["token_ids"][row, 0] == student_tokenizer.start_token_id
        assert labels[row, student_count - 1] == student_tokenizer.end_token_id
        assert x["teacher_labels"][row, teacher_count - 1] == teacher_tokenizer.end_token_id
        end_span = x["student_span"][row, student_count - 1]
        assert end_span >= 0 and end_span == x["teacher_span"][row, teacher_count - 1]
        # Padding is in no span.
        assert (x["student_span"][row, student_count:] == -1).all()
        assert (x["teacher_span"][row, teacher_count:] == -1).all()
    # The empty text: only the <eos> span.
    assert x["student_span"][3].max() == 0 and (x["student_span"][3] >= 0).sum() == 1
    # Cut after 6 student tokens: the spans left cover the same text.
    x, labels, _ = aligner.batch(TEXTS[:2], 6, 9)
    for row in range(2):
        student_span, teacher_span = x["student_span"][row], x["teacher_span"][row]
        for span in range(student_span.max() + 1):
            student_text = b"".join(
                aligner.student.pieces[t] for t in labels[row][student_span == span]
            )
            teacher_text = b"".join(
                aligner.teacher.pieces[t] for t in x["teacher_labels"][row][teacher_span == span]
            )
            assert student_text == teacher_text and student_text
    assert aligner.batches == 2 and aligner.seconds > 0


def test_a_lower_casing_byte_tokenizer_is_reported(student_tokenizer):
    aligner = TokenAligner(student_tokenizer, keras_hub.tokenizers.ByteTokenizer())
    assert aligner.align("we know")["count"] >= 2
    with pytest.raises(AlignmentError, match=r"ByteTokenizer \(lower-cases\), changes it "
                       r"\(from character 0 the text has 'We' but its tokens spell 'we'\)"):
        aligner.align("We")


def test_the_first_token_without_a_start_token_is_no_label():
    byte_tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    aligner = TokenAligner(byte_tokenizer, byte_tokenizer)
    x, labels, weight = aligner.batch(["to be"], sequence_length=6)
    # "t" is an input only; "o", " ", "b", "e" are labels and spans 0 to 3.
    assert labels[0].tolist() == [111, 32, 98, 101, 0, 0]
    assert x["student_span"][0].tolist() == [0, 1, 2, 3, -1, -1]
    assert x["teacher_span"][0].tolist() == [0, 1, 2, 3, -1, -1]
    assert weight[0].tolist() == [1, 1, 1, 1, 0, 0]


def test_shared_vocabulary(student_tokenizer, teacher_tokenizer):
    same = TokenAligner(student_tokenizer, student_tokenizer)
    student_ids, teacher_ids = same.shared_vocabulary()
    size = student_tokenizer.vocabulary_size()
    np.testing.assert_array_equal(student_ids, np.arange(size))
    np.testing.assert_array_equal(teacher_ids, np.arange(size))

    aligner = TokenAligner(student_tokenizer, teacher_tokenizer)
    student_ids, teacher_ids = aligner.shared_vocabulary()
    student = sentencepiece.SentencePieceProcessor(model_proto=student_tokenizer.proto)
    teacher = sentencepiece.SentencePieceProcessor(model_proto=teacher_tokenizer.proto)

    def normal_pieces(processor):
        return {
            processor.id_to_piece(i) for i in range(processor.get_piece_size())
            if not (processor.is_byte(i) or processor.is_control(i)
                    or processor.is_unknown(i) or processor.is_unused(i))
        }

    # Normal pieces with the same text, the 256 byte pieces, <pad> <eos> <bos> <unk>.
    expected = len(normal_pieces(student) & normal_pieces(teacher)) + 256 + 4
    assert len(student_ids) == len(set(student_ids.tolist())) == expected
    assert len(set(teacher_ids.tolist())) == expected
    # Same text (a normal piece may pair with the other's byte piece for its
    # byte, how each writes it), or the same special role.
    for s, t in zip(student_ids.tolist(), teacher_ids.tolist()):
        assert aligner.student.pieces[s] == aligner.teacher.pieces[t]
        assert aligner.student.special.get(s) == aligner.teacher.special.get(t)


def test_byte_level_bpe_surfaces():
    vocabulary = {"<|endoftext|>": 0, "t": 1, "o": 2, "b": 3, "e": 4, "\u0120": 5, "to": 6,
                  "\u0120b": 7, "\u0120be": 8}
    merges = ["t o", "\u0120 b", "\u0120b e"]
    tokenizer = keras_hub.tokenizers.BytePairTokenizer(
        vocabulary=vocabulary, merges=merges, unsplittable_tokens=["<|endoftext|>"]
    )
    surfaces = TokenSurfaces.from_tokenizer(tokenizer)
    assert surfaces.pieces[8] == b" be" and surfaces.pieces[5] == b" "
    aligner = TokenAligner(tokenizer, keras_hub.tokenizers.ByteTokenizer(lowercase=False))
    aligned = aligner.align("to be")
    assert aligned["student"].tolist() == [6, 8]
    assert aligned["student_span"].tolist() == [0, 1]
    assert aligned["teacher_span"].tolist() == [0, 0, 1, 1, 1]


def test_normalizing_tokenizers_are_reported_with_the_text(student_tokenizer):
    # SentencePiece's default normalizer: NFKC, folded spaces, a dummy prefix.
    normalizing = train_gemma3_tokenizer(STUDENT_LINES * 30, 60)
    aligner = TokenAligner(normalizing, student_tokenizer)
    with pytest.raises(AlignmentError) as error:
        aligner.batch(["we know it", "we  know it"], 16)
    message = str(error.value)
    assert "Text 1 cannot be aligned: the student tokenizer" in message
    assert "'nmt_nfkc', removes extra whitespace" in message
    assert "from character 3 the text has ' know it' but its tokens spell 'know it'" in message
    assert "Text: 'we  know it'" in message
    assert (error.value.index, error.value.side, error.value.text) == (1, "student", "we  know it")
    # NFKC turns the ligature into two letters.
    with pytest.raises(AlignmentError, match="from character 3 the text has '\ufb01re'"):
        aligner.align("we \ufb01re")
    # Characters outside a vocabulary without byte fallback are lost.
    with pytest.raises(AlignmentError, match="unknown token"):
        aligner.align("we \u2603")


def test_a_lower_casing_word_piece_tokenizer_is_reported(student_tokenizer):
    word_piece = keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "we", "know", "it", "##s"],
        lowercase=True,
    )
    aligner = TokenAligner(student_tokenizer, word_piece)
    # No spaces and lower case: its tokens spell the text.
    aligned = aligner.align("knows")
    assert aligned["teacher"].tolist() == [6, 8] and (aligned["teacher_span"] >= 0).all()
    with pytest.raises(AlignmentError, match=r"the teacher tokenizer, WordPieceTokenizer "
                       r"\(WordPiece: drops the spaces between words, lower-cases\).*"
                       r"from character 0 the text has 'We' but its tokens spell 'we'"):
        aligner.align("We")
    with pytest.raises(AlignmentError, match="from character 2 the text has ' know'"):
        aligner.align("we know")


def test_bad_arguments(student_tokenizer):
    aligner = TokenAligner(student_tokenizer, student_tokenizer)
    with pytest.raises(TypeError, match="must be strings, got bytes at 0"):
        aligner.align(b"we")
    with pytest.raises(TypeError, match="a list of strings, got one string"):
        aligner.batch("we know it", 8)
    with pytest.raises(ValueError, match="`sequence_length` must be a Python int >= 1"):
        aligner.batch(["we"], 0)
    with pytest.raises(TypeError, match="reads SentencePiece, byte-level BPE"):
        TokenAligner(student_tokenizer, object())
    assert alignment.ALIGNMENT_KEYS[-1] == "teacher_span"
