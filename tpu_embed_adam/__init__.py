"""tpu_embed_adam: TPU embedding sparse Adam for TensorFlow, on any machine.

`AdamParameters` configures the optimizer (a validated, immutable drop-in for
`tf.compat.v1.tpu.experimental.AdamParameters`); `reference.adam_update`
states the update and `apply_adam` runs it fast; `engine` is the software TPU
embedding engine, and `cluster` starts its worker processes (one per host);
`TPUEmbedding` is TF2's mid-level embedding API training on CPU;
`install()` makes TF's public alias resolve to ours.

Importing the package loads its kernel library (when built): that registers
the CPU kernels behind TF's own TPU embedding ops. With the library loaded,
it also makes `tf.compat.v1.train.Saver.save` warn when the engine holds
tables trained since their last retrieve (`engine.warn_unretrieved_saves`:
the why, and how to turn it off); that is the one change it makes to TF's
Python API. `install()` makes the others.
"""

from tpu_embed_adam import _library, cluster, engine, optimization_parameters_pb2, tf2
from tpu_embed_adam.ops.apply import apply_adam
from tpu_embed_adam.params import AdamParameters, DynamicLearningRate
from tpu_embed_adam.patch import install, installed, uninstall
from tpu_embed_adam.reference import bias_corrected_learning_rate
from tpu_embed_adam.tf2 import TPUEmbedding

__all__ = [
    "AdamParameters",
    "DynamicLearningRate",
    "TPUEmbedding",
    "apply_adam",
    "cluster",
    "engine",
    "bias_corrected_learning_rate",
    "install",
    "installed",
    "optimization_parameters_pb2",
    "tf2",
    "uninstall",
]

__version__ = "0.1.0"

if _library.load_library() is not None:
    engine.warn_unretrieved_saves()
