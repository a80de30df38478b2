"""A step's lookup runs before its send whatever order TF's executor picks (graph/step_order_pass).

With a loss linear in the activations, the gradients do not depend on
`RecvTPUEmbeddingActivations`, so nothing in the graph orders it before
`SendTPUEmbeddingGradients`. Before the pass, TF ran the send first in a few
percent of runs; the send took the core's batch and the lookup of the same
run then failed with "nothing was enqueued for this core".
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_cluster import cluster, core_device
from tensorflow.python.tpu import tpu
from tensorflow.python.tpu import tpu_embedding as te

from tpu_embed_adam import engine, reference

VOCAB, DIM, PER_CORE, SLOPE = 50, 4, 8, 0.5
PARAMS = te.AdamParameters(learning_rate=0.05)


@pytest.fixture(autouse=True)
def fresh_engine(monkeypatch: pytest.MonkeyPatch):
    # A lost batch fails the step within 2 s instead of the default 20.
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "2000")
    engine.reset()
    yield
    engine.reset()


class LinearLossGraph:
    """One table, one feature; every core's loss is SLOPE * sum(activations)."""

    def __init__(self, cores: int):
        servers = cluster(1, cores)
        self.graph = tf.Graph()
        with self.graph.as_default():
            emb = te.TPUEmbedding(
                {"t": te.TableConfig(VOCAB, DIM, combiner=None)},
                {"f": te.FeatureConfig("t")},
                batch_size=PER_CORE * cores,
                mode=te.TRAINING,
                optimization_parameters=PARAMS,
                device_config=te.DeviceConfig(1, cores, "/job:worker"),
            )
            variables = emb.create_variables_and_ops()
            self.ids = []
            for _ in range(cores):
                with tf.device(core_device(0, 0)):  # the host's enqueue device
                    self.ids.append(tf.compat.v1.placeholder(tf.int64, [PER_CORE]))
            self.enqueue = emb.generate_enqueue_ops([{"f": te.EnqueueData(i)} for i in self.ids])
            self.losses, sends = [], []
            for c in range(cores):
                with tf.device(core_device(0, c)):
                    acts = emb.get_activations()["f"]
                    loss = tf.reduce_sum(acts * SLOPE)
                    (grad,) = tf.compat.v1.gradients(loss, [acts])
                    sends.append(emb.generate_send_gradients_op({"f": grad}))
                self.losses.append(loss)
            self.send = tf.group(sends)
            init = tf.compat.v1.global_variables_initializer()
            load, self.retrieve = variables.load_ops(), variables.retrieve_ops()
            (self.table,) = [
                v for v in tf.compat.v1.global_variables() if v.name.startswith("t/part")
            ]
            system = tpu.initialize_system_for_tpu_embedding(emb.config_proto, job="worker")
        self.session = tf.compat.v1.Session(servers[0].target, graph=self.graph)
        self.session.run(system)
        self.session.run(init)
        self.session.run(load)
        self.initial = self.session.run(self.table)


def _assert_trains_like_reference(cores: int, steps: int, fetch_loss_every: int) -> None:
    """Trains `steps` steps on `cores` cores; asserts each fetched loss (the lookup before the
    step's update) and the final table equal `reference.adam_update`'s."""
    g = LinearLossGraph(cores)
    table = g.initial.copy()
    m = np.zeros_like(table)
    v = np.zeros_like(table)
    rng = np.random.default_rng(cores)
    try:
        for step in range(steps):
            batches = [rng.integers(0, VOCAB, PER_CORE) for _ in range(cores)]
            g.session.run(g.enqueue, dict(zip(g.ids, batches, strict=True)))
            if step % fetch_loss_every == 0:
                losses, _ = g.session.run([g.losses, g.send])
                # The lookup ran before this step's update: its loss is the
                # loss of the tables as they were.
                want = [np.float32(SLOPE) * table[b].sum(dtype=np.float32) for b in batches]
                np.testing.assert_allclose(losses, want, rtol=1e-5, err_msg=f"step {step}")
            else:
                g.session.run(g.send)  # the lookup is pruned: the send pairs with the batch
            ids = np.concatenate(batches)
            grads = np.full((len(ids), DIM), SLOPE, np.float32)
            table, m, v = reference.adam_update(table, m, v, ids, grads, PARAMS)
        g.session.run(g.retrieve)
        np.testing.assert_array_equal(g.session.run(g.table), table)
    finally:
        g.session.close()


@pytest.mark.parametrize("cores", [1, 2])
def test_linear_loss_steps_never_lose_their_batch(cores):
    _assert_trains_like_reference(cores, steps=300, fetch_loss_every=1)


def test_a_send_whose_lookup_is_pruned_still_pairs_with_its_batch():
    _assert_trains_like_reference(1, steps=40, fetch_loss_every=3)
