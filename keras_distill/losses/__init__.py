"""Distillation losses: pure functions on `keras.ops`, in log space and float32.

- `divergences`: forward / reverse KL, generalized JSD, total variation and
  skew KL between a teacher's and a student's logits, and their loss classes.
- `sparse`: the forward KL against a teacher's top-k (or sampled-k) targets.
- `fused`: the same divergences computed from hidden states and an embedding
  in vocabulary tiles, so the full `[tokens, vocabulary]` logits never exist.
- `features`: hidden-state and attention-map losses.
- `cross_tokenizer`: ULD and span-level losses between two vocabularies
  (teacher and student with different tokenizers).
- `weighting`: sample weights, padding masks and reductions shared by all,
  and `WeightedMeanLoss`, the base of the loss classes: every loss class and
  its function reduce alike, to the weighted mean over positions
  `sum(w · d) / sum(w)` by default.
"""

from keras_distill.losses import cross_tokenizer
from keras_distill.losses import divergences
from keras_distill.losses import features
from keras_distill.losses import fused
from keras_distill.losses import sparse
from keras_distill.losses import weighting
from keras_distill.losses.cross_tokenizer import shared_vocabulary_divergence
from keras_distill.losses.cross_tokenizer import span_distillation_loss
from keras_distill.losses.cross_tokenizer import uld_distance
from keras_distill.losses.divergences import DIVERGENCES
from keras_distill.losses.divergences import DistillationLoss
from keras_distill.losses.divergences import ForwardKL
from keras_distill.losses.divergences import GeneralizedJSD
from keras_distill.losses.divergences import ReverseKL
from keras_distill.losses.divergences import SkewKL
from keras_distill.losses.divergences import TotalVariation
from keras_distill.losses.divergences import forward_kl
from keras_distill.losses.divergences import generalized_jsd
from keras_distill.losses.divergences import reverse_kl
from keras_distill.losses.divergences import skew_kl
from keras_distill.losses.divergences import total_variation
from keras_distill.losses.features import HIDDEN_LOSSES
from keras_distill.losses.features import attention_map_loss
from keras_distill.losses.features import hidden_state_loss
from keras_distill.losses.features import layer_normalize
from keras_distill.losses.features import map_heads
from keras_distill.losses.fused import TEACHER_FORMS
from keras_distill.losses.fused import chunked_distillation_loss
from keras_distill.losses.fused import fused_distillation_loss
from keras_distill.losses.sparse import TAILS
from keras_distill.losses.sparse import SparseForwardKL
from keras_distill.losses.sparse import sparse_forward_kl
from keras_distill.losses.weighting import WeightedMeanLoss
from keras_distill.losses.weighting import broadcast_weights
from keras_distill.losses.weighting import real_positions
from keras_distill.losses.weighting import token_count
from keras_distill.losses.weighting import weighted_reduce
