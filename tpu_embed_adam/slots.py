"""The arrays of a table under TPU Adam, in the one order everything holds them.

The parameters, then the first and second moments: TF's load/retrieve ops,
the engine's buffers, `apply_adam`'s arguments, TF's v1 checkpoint names and
TF2's slot names all follow it. The C++ counterpart is `cc/core/slots.h`.
"""

from __future__ import annotations

__all__ = ["APPLY_VARIABLES", "LOAD_ARRAYS", "V1_SLOT_SUFFIXES", "V2_SLOT_NAMES"]

# As TF's Load/RetrieveTPUEmbeddingADAMParameters ops name them.
LOAD_ARRAYS = ("parameters", "momenta", "velocities")
# `apply_adam`'s variable arguments (and the fused op's inputs).
APPLY_VARIABLES = ("var", "m", "v")
# TF's v1 slot variables: `{table}/Adam/m` and `{table}/Adam/v`.
V1_SLOT_SUFFIXES = ("m", "v")
# TF2's `tf.tpu.experimental.embedding.Adam` slots: `{table}/momenta`, ...
V2_SLOT_NAMES = LOAD_ARRAYS[1:]
