"""TF Recommenders: `TPUEmbedding`, TFRS's layer whose tables train on CPU with the layer's Adam.

Off a TPU, `tfrs.layers.embedding.TPUEmbedding` looks its tables up on the
CPU and leaves them to the model's Keras optimizer, whose Adam is not the
TPU's. `tpu_embed_adam.tfrs.TPUEmbedding` is TFRS's layer running its own
TPU code path on CPU instead, so the layer's
`tf.tpu.experimental.embedding.Adam` trains the tables. The one line to
change::

    embedding = tpu_embed_adam.tfrs.TPUEmbedding(feature_config, optimizer)
    # was: tfrs.layers.embedding.TPUEmbedding(feature_config, optimizer)

Needs `tensorflow-recommenders` (0.7.x), which `import tpu_embed_adam` does
not import. See `docs/tf2.md`, "TF Recommenders".
"""

from tpu_embed_adam.tfrs._layer import TPUEmbedding

__all__ = ["TPUEmbedding"]
