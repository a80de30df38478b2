"""Keras: `Adam`, a Keras optimizer whose sparse updates are the TPU's embedding Adam.

`model.compile(optimizer=tpu_embed_adam.keras.Adam(AdamParameters(0.05)))`
trains the tables of `tf.keras.layers.Embedding` layers (any variable whose
gradient is a `tf.IndexedSlices`) by `apply_adam`, lazily as a TPU does, and
every other variable by Keras Adam. Not imported by `import tpu_embed_adam`
(it loads Keras); import `tpu_embed_adam.keras`. See `docs/tf2.md`, "Keras".
"""

from tpu_embed_adam.keras._adam import Adam

__all__ = ["Adam"]
