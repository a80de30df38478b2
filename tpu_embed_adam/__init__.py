"""tpu_embed_adam: TPU embedding sparse Adam for TensorFlow, on any machine.

`AdamParameters` configures the optimizer (a validated, immutable drop-in for
`tf.compat.v1.tpu.experimental.AdamParameters`); `reference.adam_update`
states the update; `install()` makes TF's public alias resolve to ours.
"""

from tpu_embed_adam import optimization_parameters_pb2
from tpu_embed_adam.params import AdamParameters, DynamicLearningRate
from tpu_embed_adam.patch import install, installed, uninstall
from tpu_embed_adam.reference import bias_corrected_learning_rate

__all__ = [
    "AdamParameters",
    "DynamicLearningRate",
    "bias_corrected_learning_rate",
    "install",
    "installed",
    "optimization_parameters_pb2",
    "uninstall",
]

__version__ = "0.1.0"
