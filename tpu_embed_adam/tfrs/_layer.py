"""TFRS's `TPUEmbedding` layer taking its TPU code path on CPU, on our TF2 `TPUEmbedding`.

On a TPU, TFRS's layer hands its features to TF's mid-level `TPUEmbedding`
and wraps `dequeue` in a gradient trap: the activations' gradients reach
`apply_gradients`, so the layer's optimizer, not the model's, trains the
tables, which are not Keras trainable variables. Off a TPU it builds TF's
`TPUEmbeddingForServing` instead and lets the model's Keras optimizer train
the tables. Here, off a TPU, the layer takes the TPU path with
`tpu_embed_adam.TPUEmbedding` as the mid-level API; under a `TPUStrategy` it
is TFRS's layer unchanged.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.util import nest
from tensorflow_recommenders.layers.embedding import tpu_embedding_layer

from tpu_embed_adam.tf2._embedding import WARN_UNAPPLIED_ATTR
from tpu_embed_adam.tf2._embedding import TPUEmbedding as CpuTPUEmbedding

__all__ = ["TPUEmbedding"]


def _untrainable(next_creator: Any, **kwargs: Any) -> Any:
    kwargs["trainable"] = False
    return next_creator(**kwargs)


class _LayerEmbedding(CpuTPUEmbedding):
    """Our CPU `TPUEmbedding` as TFRS's TPU path drives it.

    Three differences, each what the layer's TPU path assumes or needs on
    CPU: the tables are not trainable variables (as on a TPU: only the
    gradient trap trains them, and `tf.custom_gradient` refuses a function
    that reads trainable variables it does not declare); the layer enqueues
    with `training=True` for evaluation too (a TPU graph pass turns it off
    when no gradients follow), so a batch without `apply_gradients` is
    expected; and the output shapes follow each batch, as Keras calls the
    layer with any batch size (evaluate, predict, a last partial batch).
    """

    def _create_variables_and_slots(self) -> Any:
        with tf.variable_creator_scope(_untrainable):
            return super()._create_variables_and_slots()

    def _get_and_update_output_shapes_from_input(
        self, per_replica_input_shapes: Any = None, per_replica_batch_size: Any = None
    ) -> None:
        if per_replica_input_shapes is None:
            return
        incoming = self._get_output_shapes_from_input_shapes(nest.flatten(per_replica_input_shapes))
        configured = [feature.output_shape for feature in nest.flatten(self._feature_config)]
        self._output_shapes = [
            known if known else shape for known, shape in zip(configured, incoming, strict=True)
        ]


setattr(_LayerEmbedding, WARN_UNAPPLIED_ATTR, False)


class TPUEmbedding(tpu_embedding_layer.TPUEmbedding):
    """`tfrs.layers.embedding.TPUEmbedding` whose tables train with the layer's Adam on CPU.

    Same arguments as TFRS's layer. Off a TPU (the default strategy or a
    `OneDeviceStrategy`), the layer's optimizer must be (or translate to)
    `tf.tpu.experimental.embedding.Adam`: `"adam"`, a
    `tf.keras.optimizers.legacy.Adam` (TFRS's translation) or TF2's Adam;
    its lookups are TF's serving lookups and its tables step by TPU Adam
    (`apply_adam`) in the backward pass, as on a TPU. The model's Keras
    optimizer trains only the other variables.
    """

    def _create_tpu_embedding_mid_level_api(
        self,
        using_tpu: bool,
        embedding_feature: Any,
        pipeline_execution_with_tensor_core: bool,
    ) -> Any:
        if using_tpu:
            return super()._create_tpu_embedding_mid_level_api(
                using_tpu, embedding_feature, pipeline_execution_with_tensor_core
            )
        # TFRS's build and call take the TPU path (the gradient trap) for V1.
        self._embedding_feature = tf.tpu.experimental.HardwareFeature.EmbeddingFeature.V1
        return _LayerEmbedding(
            self._feature_config, self._optimizer, pipeline_execution_with_tensor_core
        )
