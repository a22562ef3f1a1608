"""keras-distill: knowledge distillation for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_distill import callbacks
from keras_distill import features
from keras_distill import fused
from keras_distill import gguf
from keras_distill import hub
from keras_distill import layer_dropout
from keras_distill import losses
from keras_distill import on_policy
from keras_distill import pruning
from keras_distill import quantize
from keras_distill import sparse
from keras_distill.cache import DamagedCacheError
from keras_distill.cache import TeacherOutputCache
from keras_distill.callbacks import PeakMemory
from keras_distill.callbacks import TeacherAgreement
from keras_distill.callbacks import TeacherKL
from keras_distill.callbacks import Throughput
from keras_distill.distiller import Distiller
from keras_distill.distiller import NonFiniteLossGuard
from keras_distill.features import FeatureDistillation
from keras_distill.hub import CausalLMDistiller
from keras_distill.on_policy import OnPolicyGeneration
from keras_distill.on_policy import generate_sequences

__version__ = "0.1.0"
__all__ = [
    "CausalLMDistiller",
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
    "callbacks",
    "features",
    "fused",
    "gguf",
    "generate_sequences",
    "hub",
    "layer_dropout",
    "losses",
    "on_policy",
    "pruning",
    "quantize",
    "sparse",
]
