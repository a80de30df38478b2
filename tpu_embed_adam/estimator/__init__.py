"""TF's `TPUEstimator` on CPU, with the embedding tables trained by TPU Adam.

`tpu_embed_adam.estimator.TPUEstimator` is TF's `TPUEstimator` whose
`use_tpu=False` path serves the `EmbeddingConfigSpec`'s tables from the
software TPU embedding engine (TF's own TPU embedding code path, on CPU);
`tpu_embed_adam.install()` gives TF's class the same behaviour. The two
lines that train a TPUEstimator program on CPU::

    tpu_embed_adam.install()
    estimator = tf.compat.v1.estimator.tpu.TPUEstimator(..., use_tpu=False,
        embedding_config_spec=spec)  # spec's AdamParameters now apply

`docs/estimator.md` explains the mechanism and what is and is not supported.
"""

from tpu_embed_adam.estimator._estimator import TPUEstimator

__all__ = ["TPUEstimator"]
