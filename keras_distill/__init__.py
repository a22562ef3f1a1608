"""keras-distill: knowledge distillation for Keras 3 on TensorFlow, JAX and PyTorch.

The package's layers, each depending only on those before it:

- `losses`: the loss math (dense, sparse top-k, fused, features).
- `targets`: teacher targets (top-k, the compact codec, the on-disk cache).
- `distillers`: the `keras.Model`s that train a student.
- `language_models`: KerasHub glue, GGUF checkpoints, students cut from a
  teacher.
- `extras`: quantizing the student, layer dropout, sharding.
- `metrics` and `callbacks`: teacher agreement, throughput, peak memory.
- `backend`: the only module with code per backend.
"""

from keras_distill import callbacks
from keras_distill import distillers
from keras_distill import extras
from keras_distill import language_models
from keras_distill import losses
from keras_distill import metrics
from keras_distill import targets
from keras_distill.callbacks import PeakMemory
from keras_distill.callbacks import Throughput
from keras_distill.distillers import on_policy
from keras_distill.distillers.causal_lm import CausalLMDistiller
from keras_distill.distillers.cross_tokenizer import CrossTokenizerDistiller
from keras_distill.distillers.distiller import Distiller
from keras_distill.distillers.distiller import NonFiniteLossGuard
from keras_distill.distillers.feature_distillation import FeatureDistillation
from keras_distill.distillers.on_policy import OnPolicyGeneration
from keras_distill.distillers.on_policy import generate_sequences
from keras_distill.extras import layer_dropout
from keras_distill.extras import quantize
from keras_distill.language_models import gguf
from keras_distill.language_models import pruning
from keras_distill.losses import fused
from keras_distill.metrics import TeacherAgreement
from keras_distill.metrics import TeacherKL
from keras_distill.targets.cache import DamagedCacheError
from keras_distill.targets.cache import TeacherOutputCache

__version__ = "0.1.0"
__all__ = [
    "CausalLMDistiller",
    "CrossTokenizerDistiller",
    "DamagedCacheError",
    "Distiller",
    "FeatureDistillation",
    "NonFiniteLossGuard",
    "OnPolicyGeneration",
    "PeakMemory",
    "TeacherAgreement",
    "TeacherKL",
    "TeacherOutputCache",
    "Throughput",
    "generate_sequences",
]
