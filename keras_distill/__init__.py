"""keras-distill: knowledge distillation for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_distill import losses
from keras_distill import sparse
from keras_distill.cache import TeacherOutputCache
from keras_distill.distiller import Distiller
from keras_distill.distiller import NonFiniteLossGuard

__version__ = "0.1.0"
__all__ = [
    "Distiller",
    "NonFiniteLossGuard",
    "TeacherOutputCache",
    "losses",
    "sparse",
]
