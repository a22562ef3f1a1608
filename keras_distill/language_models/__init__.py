"""Language-model pieces: KerasHub glue, GGUF checkpoints, students cut from a teacher.

- `hub`: the one place that touches KerasHub: its import, tokenizer and
  vocabulary checks, output embeddings, attention adapters, text windows.
- `gguf`: Gemma 3 GGUF files to and from KerasHub models.
- `pruning`: students made from a teacher's own blocks and vocabulary.
"""

from keras_distill.language_models import alignment
from keras_distill.language_models import gguf
from keras_distill.language_models import hub
from keras_distill.language_models import pruning
from keras_distill.language_models.alignment import AlignmentError
from keras_distill.language_models.alignment import TokenAligner
from keras_distill.language_models.alignment import TokenSurfaces
from keras_distill.language_models.hub import language_model_windows
from keras_distill.language_models.hub import shared_vocabulary
from keras_distill.language_models.hub import train_gemma3_tokenizer
from keras_distill.language_models.hub import vocabulary_fingerprint
