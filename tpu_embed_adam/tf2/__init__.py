"""TF2's mid-level TPU embedding API on CPU: `TPUEmbedding`, trained with TPU Adam.

`tpu_embed_adam.TPUEmbedding` is TF's `tf.tpu.experimental.embedding.TPUEmbedding`
whose `enqueue`, `dequeue` and `apply_gradients` also run off a TPU (the
default strategy or a `OneDeviceStrategy`): lookups as TF's
`TPUEmbeddingForServing` computes them, updates by the TPU's embedding Adam
(`apply_adam`), checkpoints as TF's class writes them.
`tpu_embed_adam.install()` gives TF's own class the same methods. See
`docs/tf2.md`.
"""

from tpu_embed_adam.tf2._embedding import TPUEmbedding

__all__ = ["TPUEmbedding"]
