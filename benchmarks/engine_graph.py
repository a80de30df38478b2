"""TF's v1 `TPUEmbedding` training graph of one table, run on CPU through the engine.

Shared by the benchmarks that time an engine step (`bench_engine_step.py`,
`bench_scaling.py`): one host, one core, one table, one feature with one id
per sample. A step is two `Session.run`s, as on a TPU host: the enqueue (ids
in), then Recv -> loss -> gradients -> Send (the lookup, the backward pass
into the hidden accumulator and one sparse Adam update).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding

import tpu_embed_adam  # noqa: F401  (the import registers the engine's kernels)


class EngineGraph:
    """The graph and a session on it; `load()` initializes the table and loads it.

    Args:
      rows: table rows.
      dim: embedding dimension.
      batch: ids per step (one per sample).
      learning_rate: Adam's constant rate.
    """

    def __init__(self, rows: int, dim: int, batch: int, learning_rate: float):
        self.graph = tf.Graph()
        with self.graph.as_default():
            emb = tpu_embedding.TPUEmbedding(
                {"table": tpu_embedding.TableConfig(
                    rows, dim, initializer=tf.compat.v1.random_uniform_initializer(
                        -0.05, 0.05, seed=0), combiner=None)},
                {"feature": tpu_embedding.FeatureConfig("table")},
                batch_size=batch,
                mode=tpu_embedding.TRAINING,
                optimization_parameters=tpu_embedding.AdamParameters(learning_rate),
                # One host in this process: a plain Session places every op.
                device_config=tpu_embedding.DeviceConfig(1, 1, "/job:localhost"),
            )
            variables = emb.create_variables_and_ops()
            self.ids = tf.compat.v1.placeholder(tf.int64, [batch])
            self.enqueue = emb.generate_enqueue_ops(
                [{"feature": tpu_embedding.EnqueueData(self.ids)}])
            self.activations = emb.get_activations()["feature"]
            loss = tf.reduce_sum(tf.square(self.activations))
            (grad,) = tf.compat.v1.gradients(loss, [self.activations])
            self.send = emb.generate_send_gradients_op({"feature": grad})
            self._init = tf.compat.v1.global_variables_initializer()
            self._load, self._retrieve = variables.load_ops(), variables.retrieve_ops()
        self.session = tf.compat.v1.Session(graph=self.graph)

    def load(self) -> float:
        """Initializes TF's variables and loads them into the engine; returns the load's seconds."""
        self.session.run(self._init)
        start = time.perf_counter()
        self.session.run(self._load)
        return time.perf_counter() - start

    def step(self, ids: np.ndarray) -> tuple[float, float]:
        """Runs one training step; returns the seconds of the enqueue and of Recv..Send."""
        start = time.perf_counter()
        self.session.run(self.enqueue, {self.ids: ids})
        middle = time.perf_counter()
        self.session.run(self.send)
        return middle - start, time.perf_counter() - middle

    def split_step(self, ids: np.ndarray) -> tuple[float, float]:
        """Runs a step with Recv and Send in separate runs; returns the seconds of each.

        Feeding Recv's output runs Send (and the loss) without Recv; Send then
        backpropagates through the batch the previous run received.
        """
        self.session.run(self.enqueue, {self.ids: ids})
        start = time.perf_counter()
        activations = self.session.run(self.activations)
        middle = time.perf_counter()
        self.session.run(self.send, {self.activations: activations})
        return middle - start, time.perf_counter() - middle

    def retrieve(self) -> float:
        """Copies the engine's table and slots into TF's variables; returns the seconds."""
        start = time.perf_counter()
        self.session.run(self._retrieve)
        return time.perf_counter() - start

    def close(self) -> None:
        self.session.close()
