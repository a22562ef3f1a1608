"""Teacher targets: what the student learns from, and how it is stored.

- `keys`: the names under which teacher outputs travel in a batch's `y`.
- `top_k`: a teacher's top-k or sampled-k log-probabilities and ids.
- `codec`: the compact top-k encoding (about 2 bytes per kept probability).
- `cache`: `TeacherOutputCache`, the teacher's outputs written once to disk
  and read back memory-mapped, with checksums and locking.
"""

from keras_distill.targets import cache
from keras_distill.targets import codec
from keras_distill.targets import keys
from keras_distill.targets import top_k
from keras_distill.targets.cache import CachedTeacherDataset
from keras_distill.targets.cache import CachedTeacherPyDataset
from keras_distill.targets.cache import DamagedCacheError
from keras_distill.targets.cache import TeacherOutputCache
from keras_distill.targets.codec import decode_top_k
from keras_distill.targets.codec import encode_top_k
from keras_distill.targets.codec import top_k_total_variation
from keras_distill.targets.keys import LABELS
from keras_distill.targets.keys import TEACHER_LOGITS
from keras_distill.targets.keys import TEACHER_TOP_INDICES
from keras_distill.targets.keys import TEACHER_TOP_LOG_PROBS
from keras_distill.targets.top_k import pack_sparse_targets
from keras_distill.targets.top_k import sampled_teacher_targets
from keras_distill.targets.top_k import top_k_teacher_targets
from keras_distill.targets.top_k import unpack_sparse_targets
