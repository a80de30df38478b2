"""Shared by the tests of TF2's `TPUEmbedding` on CPU.

Named after its directory so that it cannot shadow a helper module of another
test directory (pytest puts each one on `sys.path`).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import tensorflow as tf

from tpu_embed_adam import AdamParameters, reference

E = tf.tpu.experimental.embedding



def table(name: str, rows: int = 32, dim: int = 4, **kwargs: Any) -> Any:
    """A TableConfig with a seeded, non-trivial initializer."""
    values = np.random.default_rng(zlib.crc32(name.encode())).normal(size=(rows, dim))
    return E.TableConfig(
        rows,
        dim,
        name=name,
        initializer=tf.constant_initializer(values.astype(np.float32)),
        **kwargs,
    )


def feature(t: Any, name: str, **kwargs: Any) -> Any:
    return E.FeatureConfig(t, name=name, **kwargs)


def numpy_state(embedding: Any, table_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(table, momenta, velocities) of one table, as numpy arrays (building it if not yet)."""
    embedding.build()
    variables = embedding._variables[table_name]
    return tuple(variables[k].numpy() for k in ("parameters", "momenta", "velocities"))


def reference_step(
    state: tuple[np.ndarray, np.ndarray, np.ndarray],
    ids: list[np.ndarray],
    grads: list[np.ndarray],
    optimizer: Any,
    learning_rate: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`reference.adam_update` of one table, its features' ids and grads concatenated in order."""
    params = (
        optimizer
        if isinstance(optimizer, AdamParameters)
        else AdamParameters(**_v1_arguments(optimizer))
    )
    return reference.adam_update(
        *state,
        np.concatenate([np.reshape(i, [-1]) for i in ids]),
        np.concatenate([np.reshape(g, [-1, state[0].shape[1]]) for g in grads]),
        params,
        learning_rate=learning_rate,
    )


def _v1_arguments(optimizer: Any) -> dict[str, Any]:
    """TF2 Adam's fields as AdamParameters arguments; a callable rate reads as 1.0."""
    rate = optimizer.learning_rate
    return dict(
        learning_rate=1.0 if callable(rate) else rate,
        beta1=optimizer.beta_1,
        beta2=optimizer.beta_2,
        epsilon=optimizer.epsilon,
        lazy_adam=optimizer.lazy_adam,
        sum_inside_sqrt=optimizer.sum_inside_sqrt,
        use_gradient_accumulation=optimizer.use_gradient_accumulation,
        clip_weight_min=optimizer.clip_weight_min,
        clip_weight_max=optimizer.clip_weight_max,
        weight_decay_factor=optimizer.weight_decay_factor,
        multiply_weight_decay_factor_by_learning_rate=(
            optimizer.multiply_weight_decay_factor_by_learning_rate
        ),
        clip_gradient_min=optimizer.clip_gradient_min,
        clip_gradient_max=optimizer.clip_gradient_max,
    )


def serving_oracle(feature_config: Any, tables: dict[str, np.ndarray]) -> Any:
    """TF's `TPUEmbeddingForServing` holding `tables` (by name): the forward oracle."""
    serving = E.TPUEmbeddingForServing(feature_config, optimizer=None)
    for config, variable in serving.embedding_tables.items():
        variable.assign(tables[config.name])
    return serving
