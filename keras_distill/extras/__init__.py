"""Tools around distillation: quantizing the student, layer dropout, sharding.

- `quantize`: int8 / int4 / float8 students and the comparison table.
- `layer_dropout`: stochastic depth added to (and removed from) a model.
- `distribution`: layout maps and `ShardedDistribution` for scaling out.
"""

from keras_distill.extras import distribution
from keras_distill.extras import layer_dropout
from keras_distill.extras import quantize
