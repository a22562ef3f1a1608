"""Distillers: `keras.Model`s whose train and test steps distill a teacher.

- `distiller`: `Distiller`, any teacher and student that output logits.
- `causal_lm`: `CausalLMDistiller`, KerasHub causal language models, with
  fused, sparse and cached losses.
- `on_policy`: the student's own generations as training data.
- `cross_tokenizer`: `CrossTokenizerDistiller`, a teacher and a student with
  different tokenizers, aligned span by span.
- `feature_distillation`: `FeatureDistillation`, hidden-state and attention
  terms added to a `Distiller`.

Every distiller's `compute_loss` ends with `Distiller._finish_loss`. Imports
flow one way: `causal_lm` -> `on_policy` -> `language_models.hub`.
"""

from keras_distill.distillers import causal_lm
from keras_distill.distillers import cross_tokenizer
from keras_distill.distillers import distiller
from keras_distill.distillers import feature_distillation
from keras_distill.distillers import on_policy
from keras_distill.distillers.causal_lm import CausalLMDistiller
from keras_distill.distillers.cross_tokenizer import AlignedTextDataset
from keras_distill.distillers.cross_tokenizer import CrossTokenizerDistiller
from keras_distill.distillers.distiller import Distiller
from keras_distill.distillers.distiller import NonFiniteLossGuard
from keras_distill.distillers.feature_distillation import STRATEGIES
from keras_distill.distillers.feature_distillation import FeatureDistillation
from keras_distill.distillers.feature_distillation import attention_similarity
from keras_distill.distillers.feature_distillation import candidate_layers
from keras_distill.distillers.feature_distillation import layer_mapping
from keras_distill.distillers.on_policy import OnPolicyGeneration
from keras_distill.distillers.on_policy import generate_sequences
