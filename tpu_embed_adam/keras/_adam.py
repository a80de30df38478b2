"""`Adam`: Keras Adam for dense gradients, TPU embedding Adam for sparse ones.

A TPU program trains its embedding tables with the TPU's embedding Adam and
its dense layers with a Keras optimizer on the TensorCore. This optimizer
does both in one Keras optimizer, by the kind of gradient a variable gets: a
`tf.IndexedSlices` (the gradient of `tf.keras.layers.Embedding`, `tf.gather`,
`tf.nn.embedding_lookup`) goes to `apply_adam` with the embedding's
`AdamParameters`, duplicates and all (Keras would sum them first, which
would give one step per row even with gradient accumulation off); a dense
gradient goes to `tf.keras.optimizers.Adam`, of which this is a subclass
(its arguments, its slots `m` and `v`, which the sparse path uses too).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tpu_embed_adam.learning_rates import DynamicLearningRate
from tpu_embed_adam.ops.apply import apply_adam
from tpu_embed_adam.params import AdamParameters, as_adam_parameters

__all__ = ["Adam"]

_SCHEDULE = tf.keras.optimizers.schedules.LearningRateSchedule


def _embedding_parameters(params: Any) -> AdamParameters:
    """Our `AdamParameters` from ours, TF's v1 class, or TF2's embedding Adam."""
    if isinstance(params, tf.tpu.experimental.embedding.Adam):
        return AdamParameters.from_tpu_embedding_v2(params)
    return as_adam_parameters(params)


@tf.keras.utils.register_keras_serializable(package="tpu_embed_adam")
class Adam(tf.keras.optimizers.Adam):
    """Keras Adam whose sparse (`tf.IndexedSlices`) updates are the TPU's embedding Adam.

    Sparse gradients (embedding tables) step by `tpu_embed_adam.apply_adam`
    with `embedding_params`: TPU Adam, lazy unless the parameters say
    otherwise, no bias correction, gradient accumulation, clipping and
    weight decay as configured (`reference.adam_update`, bit for bit).
    Dense gradients step by `tf.keras.optimizers.Adam` with the Keras
    arguments, unchanged: a TPU program's dense layers train with such an
    optimizer on the TensorCore. Keras's own `weight_decay`, `clipnorm`,
    `clipvalue` and `global_clipnorm` act on every variable, the tables
    included (Keras's rule); for the tables, set decay and clipping in
    `embedding_params` instead.

    Example:
      >>> model.compile(
      ...     optimizer=Adam(tpu_embed_adam.AdamParameters(0.05), learning_rate=0.003),
      ...     loss="binary_crossentropy")
    """

    def __init__(
        self,
        embedding_params: Any,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-07,
        amsgrad: bool = False,
        embedding_learning_rate: Any = None,
        jit_compile: bool = False,
        name: str = "TPUEmbeddingAdam",
        **kwargs: Any,
    ):
        """Builds the optimizer.

        Args:
          embedding_params: the tables' TPU Adam: an `AdamParameters` (ours or
            `tf.compat.v1.tpu.experimental`'s) or a
            `tf.tpu.experimental.embedding.Adam` with a constant rate.
          learning_rate: Keras Adam's rate for dense gradients (a float or a
            Keras schedule).
          beta_1: Keras Adam's, for dense gradients.
          beta_2: Keras Adam's, for dense gradients.
          epsilon: Keras Adam's, for dense gradients.
          amsgrad: Keras Adam's, for dense gradients.
          embedding_learning_rate: None for `embedding_params`' constant rate,
            or a `tf.keras.optimizers.schedules.LearningRateSchedule` called
            with the optimizer's `iterations` at every step (required when
            the parameters' rate is a `DynamicLearningRate`).
          jit_compile: Keras's; off by default, since the fused kernel has no
            XLA kernel (under XLA, `apply_adam` takes its TF path).
          name: the optimizer's name.
          **kwargs: Keras optimizer arguments (`weight_decay`, `clipnorm`, ...),
            which act on every variable.

        Raises:
          TypeError: `embedding_params` of another type, or an
            `embedding_learning_rate` that is not a Keras schedule.
          ValueError: parameters our `AdamParameters` refuses, or a dynamic
            rate without `embedding_learning_rate`.
        """
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            jit_compile=jit_compile,
            name=name,
            **kwargs,
        )
        params = _embedding_parameters(embedding_params)
        if embedding_learning_rate is not None and not isinstance(
            embedding_learning_rate, _SCHEDULE
        ):
            raise TypeError(
                "Argument `embedding_learning_rate` must be None or a "
                "tf.keras.optimizers.schedules.LearningRateSchedule; received "
                f"{type(embedding_learning_rate).__name__}."
            )
        if embedding_learning_rate is None and isinstance(
            params.learning_rate, DynamicLearningRate
        ):
            raise ValueError(
                "Argument `embedding_params` has a dynamic learning rate; pass the schedule "
                "that feeds it as `embedding_learning_rate`."
            )
        self._embedding_params = params
        self._embedding_learning_rate = embedding_learning_rate

    @property
    def embedding_params(self) -> AdamParameters:
        """The tables' TPU Adam, as our `AdamParameters`."""
        return self._embedding_params

    def _deduplicate_sparse_grad(self, grads: list[Any]) -> list[Any]:
        # apply_adam sums a row's duplicates itself (in order, as the
        # reference does), or steps each one with gradient accumulation off.
        return grads

    def update_step(self, gradient: Any, variable: Any) -> Any:
        """Steps one variable: TPU embedding Adam if `gradient` is sparse, else Keras Adam."""
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        index = self._index_dict[self._var_key(variable)]
        rate = None
        if self._embedding_learning_rate is not None:
            rate = self._embedding_learning_rate(self.iterations)
        return apply_adam(
            variable,
            self._momentums[index],
            self._velocities[index],
            None,
            gradient,
            self._embedding_params,
            learning_rate=rate,
        )

    def get_config(self) -> dict[str, Any]:
        """Keras Adam's config, with the embedding's parameters and rate schedule."""
        config = super().get_config()
        schedule = self._embedding_learning_rate
        config.update(
            {
                "embedding_params": self._embedding_params.to_dict(),
                "embedding_learning_rate": (
                    None if schedule is None else tf.keras.optimizers.schedules.serialize(schedule)
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Adam:
        """Builds the optimizer from `get_config()`'s output."""
        config = dict(config)
        config["embedding_params"] = AdamParameters.from_dict(config["embedding_params"])
        if config.get("embedding_learning_rate") is not None:
            config["embedding_learning_rate"] = tf.keras.optimizers.schedules.deserialize(
                config["embedding_learning_rate"], custom_objects=custom_objects
            )
        return super().from_config(config, custom_objects=custom_objects)
