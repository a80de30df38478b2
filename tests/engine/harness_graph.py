"""TF's own v1 `TPUEmbedding` training graph on a local CPU cluster, checked against numpy.

`EmbeddingGraph` builds `tensorflow.python.tpu.tpu_embedding.TPUEmbedding` exactly
as a TPU user would (`create_variables_and_ops` -> load ops -> `generate_enqueue_ops`
-> `get_activations` -> a loss -> `tf.compat.v1.gradients` ->
`generate_send_gradients_op` -> `retrieve_ops`), on an in-process cluster of
`tf.distribute.Server` workers (`harness_cluster`: one per host, each with one
logical CPU device per core), or for one host as `/job:localhost` in a plain
`Session`. `assert_trains_like_numpy` drives it and `harness_numpy_model.NumpyModel`
with the same batches and asserts that activations, losses, tables and slots agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from harness_cluster import JOB, LOCAL_JOB, cluster, core_device
from harness_numpy_model import (
    Batch,
    NumpyModel,
    Slots,
    constant_learning_rate,
    random_batch,
    random_targets,
)
from harness_sharding import join_table, num_parts, split_table
from tensorflow.python.tpu import tpu, tpu_embedding, tpu_embedding_gradient


class EmbeddingGraph:
    """TF's own `TPUEmbedding` training graph, with a session on a local cluster.

    Args:
      table_to_config_dict: as for `TPUEmbedding`.
      feature_to_config_dict: as for `TPUEmbedding`.
      batch_size_per_core: samples per core and step.
      optimization_parameters: the global `AdamParameters`.
      num_hosts: hosts, each a worker task holding its shard of every table.
      cores_per_host: cores per host, each a logical CPU device of its worker.
      partition_strategy: 'div' or 'mod'.
      weighted: features fed with per-id weights.
      one_id_per_sample: features fed without sample indices.
      mode_override: passed to `generate_enqueue_ops`.
      ragged: enqueue `RaggedEnqueueData` (row splits) instead of `EnqueueData`.
      min_ids_per_sample: 0 lets `random_batch` draw empty samples.
      local: one host as `/job:localhost` in a plain `Session` (no cluster).
      initialize_system: whether `load()` first runs TF's
        `initialize_system_for_tpu_embedding` (`ConfigureTPUEmbedding`), as a
        TPU program does; if not, the config attr of TF's first load op is
        the engine's only source of configuration.
      mode: `tpu_embedding.TRAINING`, or `INFERENCE` (what TPUEstimator builds
        for EVAL/PREDICT: SGD load/retrieve ops, no slots, no loss or Send).
      dummy_table_variables: capture the activations' gradients as
        TPUEstimator does (TF's `tpu_embedding_gradient` helpers and an
        optimizer's `minimize`) instead of `tf.compat.v1.gradients`; one core.
      linear_loss: the loss is sum(act * target), whose gradient does not
        depend on the activations (TF then prunes Recv from a Send-only step).
      target: the master to run on (e.g. a `LocalCluster`'s, one worker
        process per host); default an in-process cluster of this shape.
      operation_timeout_ms: the session's bound on any one run, and on
        closing it after a worker died (LocalCluster says why TF would
        otherwise wait forever).
    """

    def __init__(
        self,
        table_to_config_dict: Mapping[str, tpu_embedding.TableConfig],
        feature_to_config_dict: Mapping[str, tpu_embedding.FeatureConfig],
        *,
        batch_size_per_core: int = 4,
        optimization_parameters: Any = None,
        num_hosts: int = 1,
        cores_per_host: int = 1,
        partition_strategy: str = "div",
        weighted: Sequence[str] = (),
        one_id_per_sample: Sequence[str] = (),
        mode_override: str | None = None,
        initialize_system: bool = True,
        ragged: bool = False,
        min_ids_per_sample: int = 1,
        local: bool = False,
        mode: int = tpu_embedding.TRAINING,
        dummy_table_variables: bool = False,
        linear_loss: bool = False,
        target: str | None = None,
        operation_timeout_ms: int = 60_000,
    ):
        if local and num_hosts != 1:
            raise ValueError(f"local=True runs one host; got num_hosts={num_hosts}.")
        if dummy_table_variables and num_hosts * cores_per_host != 1:
            raise ValueError("dummy_table_variables captures one core's gradients.")
        self.training = mode == tpu_embedding.TRAINING
        self.dummy_table_variables = dummy_table_variables
        self.linear_loss = linear_loss
        self.num_hosts = num_hosts
        self.job = LOCAL_JOB if local else JOB
        self.mode_override = mode_override
        self.ragged = ragged
        self.min_ids_per_sample = min_ids_per_sample
        if target is None:
            target = "" if local else cluster(num_hosts, cores_per_host)[0].target
        self.target = target
        self.weighted = tuple(weighted)
        self.one_id_per_sample = tuple(one_id_per_sample)
        self.strategy = partition_strategy
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.emb = tpu_embedding.TPUEmbedding(
                dict(table_to_config_dict),
                dict(feature_to_config_dict),
                batch_size=batch_size_per_core * num_hosts * cores_per_host,
                mode=mode,
                optimization_parameters=optimization_parameters,
                partition_strategy=partition_strategy,
                device_config=tpu_embedding.DeviceConfig(
                    num_hosts, num_hosts * cores_per_host, self.job
                ),
            )
            self.vars = self.emb.create_variables_and_ops()
            self.load_ops = self.vars.load_ops()
            self.retrieve_ops = self.vars.retrieve_ops()
            self.init_ops = [
                tf.compat.v1.global_variables_initializer(),
                tf.compat.v1.local_variables_initializer(),
            ]
            self._build_enqueue()
            self._build_train()
            self.saver = tf.compat.v1.train.Saver()
            self.initialize_system_op = (
                tpu.initialize_system_for_tpu_embedding(
                    self.emb.config_proto, job=self.job.removeprefix("/job:")
                )
                if initialize_system
                else None
            )
        # TF pins the configure op to `device:TPU_SYSTEM:0`; soft placement moves
        # it to a CPU. Every other op names a device that exists.
        self.session = tf.compat.v1.Session(
            self.target,
            graph=self.graph,
            config=tf.compat.v1.ConfigProto(
                allow_soft_placement=True,
                device_count={"CPU": cores_per_host},
                operation_timeout_in_ms=operation_timeout_ms,
            ),
        )

    @property
    def tables(self) -> list[str]:
        return list(self.emb.table_to_config_dict)

    def _build_enqueue(self) -> None:
        # Per core and feature: (ids, sample indices or row splits or None, weights or None).
        self._inputs: list[dict[str, tuple[Any, Any, Any]]] = []
        datas = []
        for c in range(self.emb.num_cores):
            inputs, data = {}, {}
            with tf.device(core_device(c // self.emb.num_cores_per_host, 0, self.job)):
                for feature in self.emb.feature_to_config_dict:
                    ids = tf.compat.v1.placeholder(tf.int64, [None], f"ids_{c}_{feature}")
                    where = None
                    if feature not in self.one_id_per_sample:
                        shape = [self.emb.batch_size_per_core + 1] if self.ragged else [None, 2]
                        where = tf.compat.v1.placeholder(tf.int64, shape, f"where_{c}_{feature}")
                    wts = (
                        tf.compat.v1.placeholder(tf.float32, [None], f"w_{c}_{feature}")
                        if feature in self.weighted
                        else None
                    )
                    inputs[feature] = (ids, where, wts)
                    data[feature] = (
                        tpu_embedding.RaggedEnqueueData(ids, where, wts)
                        if self.ragged
                        else tpu_embedding.EnqueueData(ids, where, wts)
                    )
            self._inputs.append(inputs)
            datas.append(data)
        self.enqueue_ops = self.emb.generate_enqueue_ops(
            datas, mode_override=self.mode_override, ragged=self.ragged
        )

    def _build_train(self) -> None:
        self.step_ph = tf.compat.v1.placeholder(tf.int64, [], "global_step")
        self._targets: list[dict[str, tf.Tensor]] = []
        self.activations: list[dict[str, tf.Tensor]] = []
        self.send_ops = []
        losses = []
        for c in range(self.emb.num_cores):
            host, core = divmod(c, self.emb.num_cores_per_host)
            with tf.device(core_device(host, core, self.job)):
                acts = self.emb.get_activations()
                self.activations.append(acts)
                if not self.training:
                    continue
                targets = {
                    f: tf.compat.v1.placeholder(tf.float32, a.shape, f"target_{c}_{f}")
                    for f, a in acts.items()
                }
                self._targets.append(targets)
                losses.append(self._loss_and_send(acts, targets))
        if not self.training:
            return
        self.loss = tf.add_n(losses)
        # TF's own evaluation of each table's dynamic rate, for the numpy model.
        self.learning_rates = {
            t: tf.cast(c.learning_rate_fn(self.step_ph), tf.float32)
            for t, c in self.emb.table_to_config_dict.items()
            if constant_learning_rate(self.emb, t) is None
        }

    def _loss_and_send(
        self, acts: dict[str, tf.Tensor], targets: dict[str, tf.Tensor]
    ) -> tf.Tensor:
        """Builds one core's loss and Send op (appended to `send_ops`); returns the loss."""
        if self.dummy_table_variables:
            # TPUEstimator's flow: the loss reads the activations through
            # TPUEmbeddingActivations ops, whose gradient function captures
            # the activations' gradients while the optimizer minimizes.
            dummies, dummy_init = tpu_embedding_gradient.create_dummy_table_variables(self.emb)
            self.init_ops.append(dummy_init)
            acts = tpu_embedding_gradient.hook_dummy_table_variables_to_activations(
                self.emb, acts, dummies
            )
        if self.linear_loss:
            loss = tf.add_n([tf.reduce_sum(acts[f] * targets[f]) for f in acts])
        else:
            loss = tf.add_n([0.5 * tf.reduce_sum(tf.square(acts[f] - targets[f])) for f in acts])
        if self.dummy_table_variables:
            minimize = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(
                loss, var_list=list(dummies.values())
            )
            grads = tpu_embedding_gradient.get_gradients_through_dummy_table_variables(self.emb)
            with tf.control_dependencies([minimize]):
                self.send_ops.append(
                    self.emb.generate_send_gradients_op(grads, step=self.step_ph)
                )
        else:
            grads = dict(
                zip(acts, tf.compat.v1.gradients(loss, list(acts.values())), strict=True)
            )
            self.send_ops.append(self.emb.generate_send_gradients_op(grads, step=self.step_ph))
        return loss

    def run_init(self) -> None:
        """Runs TF's variable initializers (tables from their initializers, slots 0)."""
        self.session.run(self.init_ops)

    def read_tables(self) -> dict[str, np.ndarray]:
        """Reads TF's table variables (not the engine, no slots) as whole tables."""
        out = {}
        for t in self.tables:
            vocab = self.emb.table_to_config_dict[t].vocabulary_size
            parts = self.session.run(
                self.vars.embedding_variables_by_table[t][: num_parts(vocab, self.num_hosts)]
            )
            out[t] = join_table(parts, vocab, self.strategy)
        return out

    def read(self) -> dict[str, Slots]:
        """Reads TF's variables (not the engine) as whole tables."""
        out = {}
        for t in self.tables:
            vocab = self.emb.table_to_config_dict[t].vocabulary_size
            n = num_parts(vocab, self.num_hosts)
            w, m, v = self.session.run(
                (self.vars.embedding_variables_by_table[t][:n],
                 self.vars.slot_variables_by_table[t].m[:n],
                 self.vars.slot_variables_by_table[t].v[:n])
            )
            out[t] = Slots(*(join_table(p, vocab, self.strategy) for p in (w, m, v)))
        return out

    def write(self, state: Mapping[str, Slots]) -> None:
        """Assigns whole tables into TF's `part_i` variables (not the engine)."""
        with self.graph.as_default():
            for t, s in state.items():
                n = num_parts(len(s.w), self.num_hosts)
                groups = (
                    self.vars.embedding_variables_by_table[t][:n],
                    self.vars.slot_variables_by_table[t].m[:n],
                    self.vars.slot_variables_by_table[t].v[:n],
                )
                for variables, full in zip(groups, (s.w, s.m, s.v), strict=True):
                    for var, part in zip(
                        variables, split_table(full, self.num_hosts, self.strategy),
                        strict=True,
                    ):
                        var.load(part, self.session)

    def save(self, path: str) -> str:
        """Writes TF's global variables with `tf.compat.v1.train.Saver`; returns the prefix."""
        with self.graph.as_default():
            return self.saver.save(self.session, path)

    def restore(self, path: str) -> None:
        """Restores TF's global variables from a `Saver` checkpoint."""
        with self.graph.as_default():
            self.saver.restore(self.session, path)

    def load(self) -> None:
        """Runs TF's load ops (variables -> engine), after configuring if asked to."""
        if self.initialize_system_op is not None:
            self.session.run(self.initialize_system_op)
        self.session.run(self.load_ops)

    def retrieve(self) -> dict[str, Slots]:
        """Runs TF's retrieve ops (engine -> variables) and reads the variables."""
        self.session.run(self.retrieve_ops)
        return self.read()

    def enqueue(self, batch: Batch) -> None:
        """Runs TF's enqueue ops, one per core, on `batch`."""
        feed: dict[Any, np.ndarray | None] = {}
        for inputs, core in zip(self._inputs, batch, strict=True):
            for feature, (ids, where, wts) in inputs.items():
                x = core[feature]
                feed[ids] = x.ids
                if where is not None:
                    feed[where] = (
                        x.row_splits(self.emb.batch_size_per_core)
                        if self.ragged
                        else x.sample_indices
                    )
                if wts is not None:
                    feed[wts] = x.weights
        self.session.run(self.enqueue_ops, feed)

    def train_step(
        self, batch: Batch, targets: Sequence[Mapping[str, np.ndarray]], step: int
    ) -> tuple[list[dict[str, np.ndarray]], float, dict[str, float]]:
        """Enqueues, receives, sends gradients; returns activations, loss, learning rates."""
        self.enqueue(batch)
        feed: dict[Any, Any] = {self.step_ph: step}
        for phs, target in zip(self._targets, targets, strict=True):
            feed.update({phs[f]: target[f] for f in phs})
        acts, loss, rates, _ = self.session.run(
            (self.activations, self.loss, self.learning_rates, self.send_ops), feed
        )
        for t in self.tables:
            rate = constant_learning_rate(self.emb, t)
            if rate is not None:
                rates[t] = rate
        return acts, float(loss), rates

    def send_step(
        self, batch: Batch, targets: Sequence[Mapping[str, np.ndarray]], step: int
    ) -> None:
        """Enqueues, then runs only the Send ops (TF prunes what they do not need)."""
        self.enqueue(batch)
        feed: dict[Any, Any] = {self.step_ph: step}
        for phs, target in zip(self._targets, targets, strict=True):
            feed.update({phs[f]: target[f] for f in phs})
        self.session.run(self.send_ops, feed)

    def lookup(self, batch: Batch) -> list[dict[str, np.ndarray]]:
        """Enqueues `batch` and returns each core's activations (Recv only)."""
        self.enqueue(batch)
        return self.session.run(self.activations)

    def random_batch(self, rng: np.random.Generator, **kwargs: Any) -> Batch:
        return random_batch(
            rng, self.emb, weighted=self.weighted, one_id_per_sample=self.one_id_per_sample,
            min_ids_per_sample=self.min_ids_per_sample, **kwargs,
        )

    def close(self) -> None:
        """Closes the session and drops the workers' variables.

        Workers keep resource variables across sessions by name; the next test
        may build `users/part_0` with another shape on the same cached cluster.
        """
        self.session.close()
        if self.target:
            tf.compat.v1.Session.reset(self.target)


def assert_trains_like_numpy(
    graph: EmbeddingGraph,
    steps: int,
    seed: int = 0,
    initialize: Callable[[EmbeddingGraph], None] = EmbeddingGraph.run_init,
) -> NumpyModel:
    """Initializes, loads, trains `steps` steps through TF's ops and the numpy model, retrieves.

    Asserts, step by step, that the activations equal the numpy lookup bit for
    bit and the loss matches it, and at the end that every table and slot
    equals `reference.adam_update`'s bit for bit: the engine's floats are
    fixed in every configuration (docs/engine.md, "Numerics"). Returns the
    numpy model (its final state).

    Args:
      graph: the graph to train.
      steps: training steps.
      seed: seeds the ids, weights and targets.
      initialize: sets TF's variables before the load (default: initializers).
    """
    rng = np.random.default_rng(seed)
    initialize(graph)
    model = NumpyModel(graph.emb, graph.read())
    graph.load()
    for step in range(1, steps + 1):
        batch = graph.random_batch(rng)
        targets = random_targets(rng, graph.emb)
        got_acts, got_loss, rates = graph.train_step(batch, targets, step)
        want_acts, want_loss = model.step(batch, targets, rates, backprop_from=got_acts)
        for c, (got, want) in enumerate(zip(got_acts, want_acts, strict=True)):
            for f in want:
                np.testing.assert_array_equal(
                    got[f], want[f], err_msg=f"step {step} core {c} activation {f}")
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4, err_msg=f"step {step} loss")
    final = graph.retrieve()
    for t in graph.tables:
        for slot in ("w", "m", "v"):
            got, want = getattr(final[t], slot), getattr(model.state[t], slot)
            np.testing.assert_array_equal(got, want, err_msg=f"table {t} slot {slot}")
    return model
