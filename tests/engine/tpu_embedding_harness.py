"""TF's own v1 `TPUEmbedding` training graph on a local CPU cluster, and a numpy model of it.

`EmbeddingGraph` builds `tensorflow.python.tpu.tpu_embedding.TPUEmbedding` exactly
as a TPU user would (`create_variables_and_ops` -> load ops -> `generate_enqueue_ops`
-> `get_activations` -> a loss -> `tf.compat.v1.gradients` ->
`generate_send_gradients_op` -> `retrieve_ops`), on an in-process cluster of
`tf.distribute.Server` workers (one per host, each with one logical CPU device per
core), or for one host as `/job:localhost` in a plain `Session`. `NumpyModel`
computes the same step with numpy: the lookup with each table's combiner and
weights, the backward pass to one gradient row per id, and
`tpu_embed_adam.reference.adam_update` per table. Tests drive both with the same
`Batch` and compare activations, losses, tables and slots.

The last section holds the helpers of the tests that call TF's TPU embedding
ops directly (`test_engine_*.py`): configurations built from
`AdamParameters.to_tf_proto()`, whole-table load and retrieve, enqueue in each
format, and snapshots of the engine for the bad-input tests.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as cfg_pb2
from tensorflow.python.tpu import tpu, tpu_embedding, tpu_embedding_gradient

from tpu_embed_adam import engine
from tpu_embed_adam.learning_rates import DynamicLearningRate
from tpu_embed_adam.params import AdamParameters
from tpu_embed_adam.reference import adam_update

JOB = "/job:worker"
LOCAL_JOB = "/job:localhost"
_F32 = np.float32


def core_device(host: int, core: int, job: str = JOB) -> str:
    """Returns the logical CPU device standing for `core` of `host`."""
    return f"{job}/replica:0/task:{host}/device:CPU:{core}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@functools.cache
def cluster(num_hosts: int, cores_per_host: int = 1) -> tuple[tf.distribute.Server, ...]:
    """Starts (once per shape, for the life of the process) a local worker cluster.

    One worker per host, each with one logical CPU device per core; a session
    on the first one's `target` is the master. In-process servers cannot be
    stopped, so clusters are cached and shared by every test that asks for the
    same shape; the engine is reset between tests.
    """
    spec = tf.train.ClusterSpec({"worker": [f"localhost:{_free_port()}" for _ in range(num_hosts)]})
    config = tf.compat.v1.ConfigProto(device_count={"CPU": cores_per_host})
    servers = tuple(
        tf.distribute.Server(spec, job_name="worker", task_index=i, config=config, start=True)
        for i in range(num_hosts)
    )
    return servers


def shard_ids(vocab: int, num_shards: int, strategy: str) -> list[np.ndarray]:
    """Global ids held by each shard, in local-row order.

    `div`: contiguous blocks, the first `vocab % num_shards` shards one row
    longer; `mod`: shard i holds i, i + S, i + 2S, ... Both give TF's
    `fixed_size_partitioner` part sizes, which is why TF builds the same
    variables for both.
    """
    if strategy == "mod":
        return [np.arange(i, vocab, num_shards) for i in range(num_shards)]
    sizes = [vocab // num_shards + (i < vocab % num_shards) for i in range(num_shards)]
    bounds = np.cumsum([0, *sizes])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def num_parts(vocab: int, num_hosts: int) -> int:
    """Number of real `part_i` variables TF creates (the rest are dummies)."""
    return min(vocab, num_hosts)


def split_table(full: np.ndarray, num_hosts: int, strategy: str) -> list[np.ndarray]:
    """Splits a [vocab, dim] array into the rows of each `part_i` variable."""
    return [full[ids] for ids in shard_ids(len(full), num_parts(len(full), num_hosts), strategy)]


def join_table(parts: Sequence[np.ndarray], vocab: int, strategy: str) -> np.ndarray:
    """Inverse of `split_table`: assembles `part_i` values into [vocab, dim]."""
    full = np.zeros((vocab, parts[0].shape[1]), _F32)
    for ids, part in zip(shard_ids(vocab, len(parts), strategy), parts, strict=True):
        full[ids] = part
    return full


@dataclasses.dataclass(frozen=True)
class FeatureInput:
    """One feature's ids on one core, sorted by sample.

    `sample_indices` is [nnz, 2] (sample, position within the sample), or None
    for one id per sample (TF's dense case).
    """

    ids: np.ndarray
    sample_indices: np.ndarray | None = None
    weights: np.ndarray | None = None

    def samples(self) -> np.ndarray:
        if self.sample_indices is None:
            return np.arange(len(self.ids))
        return self.sample_indices[:, 0]

    def positions(self) -> np.ndarray:
        if self.sample_indices is None:
            return np.zeros(len(self.ids), np.int64)
        return self.sample_indices[:, 1]

    def row_splits(self, batch_size: int) -> np.ndarray:
        """The same ids as a ragged tensor's [batch_size + 1] row splits."""
        counts = np.bincount(self.samples(), minlength=batch_size)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# One dict per core (global core order: host-major), feature name -> input.
Batch = list[dict[str, FeatureInput]]


@dataclasses.dataclass(frozen=True)
class Slots:
    """A whole table and its Adam slots, each [vocab, dim] float32."""

    w: np.ndarray
    m: np.ndarray
    v: np.ndarray


def table_params(emb: tpu_embedding.TPUEmbedding, table: str) -> tpu_embedding.AdamParameters:
    """The table's own `AdamParameters`, else the global ones (TF's rule)."""
    return (
        emb.table_to_config_dict[table].optimization_parameters or emb.optimization_parameters
    )


def constant_learning_rate(emb: tpu_embedding.TPUEmbedding, table: str) -> float | None:
    """The table's constant learning rate as TF writes it in the proto; None if dynamic."""
    config = emb.table_to_config_dict[table]
    if config.learning_rate:  # TF tests truthiness too: 0.0 falls through.
        return config.learning_rate
    if config.learning_rate_fn:
        return None
    return table_params(emb, table).learning_rate


def activation_shape(emb: tpu_embedding.TPUEmbedding, feature: str) -> tuple[int, ...]:
    """[batch_per_core, dim], or [batch_per_core, max_sequence_length, dim]."""
    config = emb.feature_to_config_dict[feature]
    dim = emb.table_to_config_dict[config.table_id].dimension
    if config.max_sequence_length:
        return (emb.batch_size_per_core, config.max_sequence_length, dim)
    return (emb.batch_size_per_core, dim)


def four_features() -> dict[str, tpu_embedding.FeatureConfig]:
    """Features of tables `users`, `items`, `tags`; `users` is shared by two
    features, so its update sums both features' gradients."""
    return {
        "user": tpu_embedding.FeatureConfig("users"),
        "friends": tpu_embedding.FeatureConfig("users"),
        "item": tpu_embedding.FeatureConfig("items"),
        "tag": tpu_embedding.FeatureConfig("tags"),
    }


def random_batch(
    rng: np.random.Generator,
    emb: tpu_embedding.TPUEmbedding,
    *,
    min_ids_per_sample: int = 1,
    max_ids_per_sample: int = 3,
    weighted: Sequence[str] = (),
    one_id_per_sample: Sequence[str] = (),
) -> Batch:
    """Draws ids for every feature on every core.

    Samples hold `min_ids_per_sample`..`max_ids_per_sample` ids (sequence
    features: up to one past `max_sequence_length`, so that the TPU's
    truncation is exercised), duplicates included, so that one row gets
    several gradients per step; with a minimum of 0 some samples are empty
    (but never a whole feature). Features in `weighted` get positive per-id
    weights; features in `one_id_per_sample` are enqueued without sample
    indices (TF's dense case).
    """
    batch: Batch = []
    for _ in range(emb.num_cores):
        core: dict[str, FeatureInput] = {}
        for feature, config in emb.feature_to_config_dict.items():
            vocab = emb.table_to_config_dict[config.table_id].vocabulary_size
            b = emb.batch_size_per_core
            if feature in one_id_per_sample:
                counts = np.ones(b, np.int64)
                indices = None
            else:
                most = config.max_sequence_length + 1 if config.max_sequence_length else (
                    max_ids_per_sample)
                counts = rng.integers(min_ids_per_sample, most + 1, b)
                counts[0] = max(counts[0], 1)
                rows = np.repeat(np.arange(b), counts)
                cols = np.concatenate([np.arange(c) for c in counts])
                indices = np.stack([rows, cols], 1).astype(np.int64)
            ids = rng.integers(0, vocab, counts.sum()).astype(np.int64)
            weights = rng.uniform(0.5, 1.5, len(ids)).astype(_F32) if feature in weighted else None
            core[feature] = FeatureInput(ids, indices, weights)
        batch.append(core)
    return batch


def random_targets(
    rng: np.random.Generator, emb: tpu_embedding.TPUEmbedding
) -> list[dict[str, np.ndarray]]:
    """Regression targets, one array of the activation's shape per core and feature."""
    return [
        {f: rng.normal(size=activation_shape(emb, f)).astype(_F32)
         for f in emb.feature_to_config_dict}
        for _ in range(emb.num_cores)
    ]


def _core_sum(
    ids: list[np.ndarray], grads: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One core's distinct ids (in order of first entry) and each one's gradient sum.

    Each sum starts from zero and adds the id's rows in entry order (features
    in order, then ids), in float32: what the engine forms on the core before
    it sums the cores' rows, in core order, into the update (docs/engine.md,
    "Training across processes"). With one core, `adam_update`'s own sum of
    the returned rows (0 + the row) is the row, so this is the same update as
    summing the occurrences directly.
    """
    all_ids, all_grads = np.concatenate(ids), np.concatenate(grads)
    distinct, first, inverse = np.unique(all_ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    sums = np.zeros((len(distinct), all_grads.shape[1]), _F32)
    np.add.at(sums, rank[inverse], all_grads)  # in index order: entry order per id
    return [distinct[order]], [sums]


class NumpyModel:
    """The step TF's graph runs, in numpy: lookup, loss, Adam per table.

    The loss is 0.5*|act - target|^2, or sum(act * target) with `linear_loss`.
    """

    def __init__(
        self, emb: tpu_embedding.TPUEmbedding, state: Mapping[str, Slots], linear_loss: bool = False
    ):
        self.emb = emb
        self.linear_loss = linear_loss
        self.state = {t: Slots(s.w.copy(), s.m.copy(), s.v.copy()) for t, s in state.items()}

    def _lookup_plan(
        self, feature: str, x: FeatureInput
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Returns (kept ids' positions in `x`, their activation slots, scales, slot count).

        A slot is a sample, or a (sample, position) cell of a sequence feature;
        ids at positions past `max_sequence_length` are dropped, as the TPU
        truncates. Each kept id contributes `scale * row` to its slot: its
        weight times the combiner's factor for the slot.
        """
        config = self.emb.feature_to_config_dict[feature]
        seq_len = config.max_sequence_length
        b = self.emb.batch_size_per_core
        kept = np.arange(len(x.ids))
        slots, n_slots = x.samples(), b
        if seq_len:
            kept = kept[x.positions() < seq_len]
            slots, n_slots = x.samples()[kept] * seq_len + x.positions()[kept], b * seq_len
        w = np.ones(len(kept), _F32) if x.weights is None else x.weights[kept].astype(_F32)
        combiner = self.emb.table_to_config_dict[config.table_id].combiner or "sum"
        if combiner == "sum":
            return kept, slots, w, n_slots
        # As the engine computes them (engine/batch.cc): each slot's
        # denominator in float64, each scale weight / denominator rounded once
        # to float32. Float32 arithmetic here would differ in the last bit
        # for some scales, and Adam turns that into visibly different tables
        # over a long run.
        w64 = w.astype(np.float64)
        total = np.zeros(n_slots)
        np.add.at(total, slots, w64 if combiner == "mean" else w64 * w64)
        denominator = (total if combiner == "mean" else np.sqrt(total))[slots]
        scale = np.divide(w64, denominator, out=np.zeros(len(kept)), where=denominator != 0)
        return kept, slots, scale.astype(_F32), n_slots

    def activations(self, core: Mapping[str, FeatureInput]) -> dict[str, np.ndarray]:
        """The lookup of one core, in the activations' shapes."""
        out = {}
        for feature, config in self.emb.feature_to_config_dict.items():
            x, table = core[feature], self.state[config.table_id].w
            kept, slots, scale, n_slots = self._lookup_plan(feature, x)
            act = np.zeros((n_slots, table.shape[1]), _F32)
            np.add.at(act, slots, scale[:, None] * table[x.ids[kept]])
            out[feature] = act.reshape(activation_shape(self.emb, feature))
        return out

    def forward_backward(
        self,
        batch: Batch,
        targets: Sequence[Mapping[str, np.ndarray]],
        backprop_from: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> tuple[list[dict[str, np.ndarray]], float, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Returns each core's activations, the loss, and each table's (ids, gradient rows).

        The loss gradient is taken at `backprop_from` (the activations TF
        computed the sent gradients from) when given, else at the numpy
        activations. Why: Adam scales every gradient element to a step of
        about the learning rate, so an element near 0 (activation ~ target)
        turns a 1-ulp difference between two correct lookups into a visible
        difference of the weights; the update must be checked on the gradients
        actually sent, the lookup separately.
        """
        acts, loss, ids, grads = self._per_core(batch, targets, backprop_from)
        return (
            acts,
            loss,
            {t: np.concatenate([np.concatenate(c) for c in i]) for t, i in ids.items()},
            {t: np.concatenate([np.concatenate(c) for c in g]) for t, g in grads.items()},
        )

    def _per_core(
        self,
        batch: Batch,
        targets: Sequence[Mapping[str, np.ndarray]],
        backprop_from: Sequence[Mapping[str, np.ndarray]] | None,
    ) -> tuple[
        list[dict[str, np.ndarray]],
        float,
        dict[str, list[list[np.ndarray]]],
        dict[str, list[list[np.ndarray]]],
    ]:
        """`forward_backward`, with each table's ids and gradient rows as [core][feature] lists."""
        acts = [self.activations(core) for core in batch]
        at = acts if backprop_from is None else backprop_from
        loss = 0.0
        ids: dict[str, list[list[np.ndarray]]] = {t: [] for t in self.state}
        grads: dict[str, list[list[np.ndarray]]] = {t: [] for t in self.state}
        for core, act, act_at, target in zip(batch, acts, at, targets, strict=True):
            for table in self.state:
                ids[table].append([])
                grads[table].append([])
            for feature, config in self.emb.feature_to_config_dict.items():
                x, table = core[feature], config.table_id
                if self.linear_loss:
                    loss += float(np.sum(act[feature].astype(np.float64) * target[feature]))
                    d_act = target[feature]
                else:
                    error = (act[feature] - target[feature]).astype(np.float64)
                    loss += 0.5 * float(np.sum(error**2))
                    d_act = act_at[feature] - target[feature]
                kept, slots, scale, n_slots = self._lookup_plan(feature, x)
                ids[table][-1].append(x.ids[kept])
                grads[table][-1].append(scale[:, None] * d_act.reshape(n_slots, -1)[slots])
        return acts, loss, ids, grads

    def step(
        self,
        batch: Batch,
        targets: Sequence[Mapping[str, np.ndarray]],
        learning_rates: Mapping[str, float],
        backprop_from: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> tuple[list[dict[str, np.ndarray]], float]:
        """Runs one training step; returns each core's activations and the loss.

        `backprop_from`: as for `forward_backward`.
        """
        acts, loss, ids, grads = self._per_core(batch, targets, backprop_from)
        for table, st in self.state.items():
            params = table_params(self.emb, table)
            table_ids, table_grads = ids[table], grads[table]
            if params.use_gradient_accumulation:
                table_ids, table_grads = zip(*map(_core_sum, table_ids, table_grads), strict=True)
            self.state[table] = Slots(
                *adam_update(
                    st.w, st.m, st.v, np.concatenate([np.concatenate(c) for c in table_ids]),
                    np.concatenate([np.concatenate(c) for c in table_grads]),
                    params, learning_rates[table],
                )
            )
        return acts, loss


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


def train_and_compare(
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


def random_state(emb: tpu_embedding.TPUEmbedding, seed: int) -> dict[str, Slots]:
    """Random tables and Adam slots (v >= 0) for every table of `emb`."""
    rng = np.random.default_rng(seed)
    out = {}
    for table, config in emb.table_to_config_dict.items():
        shape = (config.vocabulary_size, config.dimension)
        out[table] = Slots(
            rng.normal(size=shape).astype(np.float32),
            rng.normal(size=shape).astype(np.float32),
            rng.uniform(0.0, 2.0, size=shape).astype(np.float32),
        )
    return out


def assert_state_equal(got: Mapping[str, Slots], want: Mapping[str, Slots]) -> None:
    """Every table and slot bit for bit."""
    assert got.keys() == want.keys()
    for table in want:
        for slot in ("w", "m", "v"):
            np.testing.assert_array_equal(
                getattr(got[table], slot), getattr(want[table], slot), err_msg=f"{table} {slot}"
            )


# --------------------------------------------------------------------------
# TF's TPU embedding ops called directly (tests/engine/test_engine_*.py).

raw = tf.raw_ops


def adam_params(lr: float = 0.05, dynamic_tag: int | None = None, **kw: Any) -> AdamParameters:
    """A table's parameters for the raw-op tests: epsilon 1e-3 unless given;
    `dynamic_tag` makes the learning rate a `DynamicLearningRate`."""
    kw.setdefault("epsilon", 1e-3)
    return AdamParameters(lr if dynamic_tag is None else DynamicLearningRate(dynamic_tag), **kw)


def embedding_config(
    tables: list[tuple[str, int, int, AdamParameters]],
    features: list[tuple[int, list[int]]],
    num_hosts: int = 1,
    cores_per_host: int = 1,
    mod: bool = False,
    optimizer: str = "adam",
) -> bytes:
    """A serialized `TPUEmbeddingConfiguration`: each table's parameters are
    `AdamParameters.to_tf_proto()`; `optimizer="adagrad"` replaces Adam there."""
    cfg = cfg_pb2.TPUEmbeddingConfiguration()
    for name, vocab, dim, p in tables:
        t = cfg.table_descriptor.add(name=name, vocabulary_size=vocab, dimension=dim)
        t.optimization_parameters.CopyFrom(p.to_tf_proto())
        if optimizer != "adam":
            t.optimization_parameters.adagrad.SetInParent()  # a oneof: clears adam
    for table_id, shape in features:
        cfg.feature_descriptor.add(table_id=table_id, input_shape=shape)
    cfg.mode = cfg_pb2.TPUEmbeddingConfiguration.TRAINING
    cfg.num_hosts = num_hosts
    cfg.num_tensor_cores = num_hosts * cores_per_host
    cfg.sharding_strategy = (
        cfg_pb2.TPUEmbeddingConfiguration.MOD
        if mod
        else cfg_pb2.TPUEmbeddingConfiguration.DIV_DEFAULT
    )
    return cfg.SerializeToString()


def shard_rows(vocab: int, shards: int, shard: int, mod: bool) -> np.ndarray:
    """Global ids of shard `shard`'s rows, in local order; tables smaller than
    `shards` are padded with dummy rows, one per shard (as TF pads them)."""
    return shard_ids(max(vocab, shards), shards, "mod" if mod else "div")[shard]


def load_all(cfg: bytes, name: str, full: list[np.ndarray], shards: int, mod: bool) -> None:
    vocab = full[0].shape[0]
    for s in range(shards):
        rows = shard_rows(vocab, shards, s, mod)
        raw.LoadTPUEmbeddingADAMParameters(
            parameters=full[0][rows],
            momenta=full[1][rows],
            velocities=full[2][rows],
            num_shards=shards,
            shard_id=s,
            table_name=name,
            config=cfg if s == 0 else "",
        )


def retrieve_all(name: str, vocab: int, dim: int, shards: int, mod: bool) -> list[np.ndarray]:
    out = [np.zeros((vocab, dim), np.float32) for _ in range(3)]
    for s in range(shards):
        rows = shard_rows(vocab, shards, s, mod)
        got = raw.RetrieveTPUEmbeddingADAMParameters(num_shards=shards, shard_id=s, table_name=name)
        for full, part in zip(out, got, strict=True):
            full[rows] = part.numpy()
    return out


def random_slots(rng: np.random.Generator, vocab: int, dim: int) -> list[np.ndarray]:
    return [
        rng.normal(size=(vocab, dim)).astype(np.float32),
        rng.normal(size=(vocab, dim)).astype(np.float32) * 0.1,
        rng.uniform(0.01, 1.0, size=(vocab, dim)).astype(np.float32),
    ]


def random_bags(rng: np.random.Generator, batch: int, vocab: int, max_ids: int, weighted: bool):
    """Per sample, a list of (id, weight); every sample holds at least one id."""
    out = []
    for _ in range(batch):
        n = int(rng.integers(1, max_ids + 1))
        ids = rng.integers(0, vocab, size=n)
        weights = rng.uniform(0.5, 2.0, size=n) if weighted else np.ones(n)
        out.append([(int(i), float(w)) for i, w in zip(ids, weights, strict=True)])
    return out


def bag_formats(bags, weighted: bool, layout: str):
    """(index, ids, weights) tensors for one feature in the given layout."""
    ids = np.array([i for bag in bags for i, _ in bag], np.int64)
    weights = (
        np.array([w for bag in bags for _, w in bag], np.float32)
        if weighted
        else np.zeros((0,), np.float32)
    )
    if layout == "dense":
        index = np.zeros((0,), np.int64)
    elif layout == "splits":
        index = np.cumsum([0] + [len(b) for b in bags]).astype(np.int64)
    else:
        index = np.array(
            [[b, k] for b, bag in enumerate(bags) for k in range(len(bag))], np.int64
        ).reshape(-1, 2)
    return index, ids, weights


def numpy_lookup(table: np.ndarray, bags, combiner: str):
    """Numpy activations and, per id occurrence, its (slot, scale)."""
    out = np.zeros((len(bags), table.shape[1]), np.float32)
    scales = []
    for b, bag in enumerate(bags):
        ws = np.array([w for _, w in bag], np.float32)
        denom = {"sum": 1.0, "mean": ws.sum(), "sqrtn": np.sqrt((ws * ws).sum())}[combiner]
        for i, w in bag:
            out[b] += w * table[i]
            scales.append((b, w / denom))
        out[b] /= denom
    return out, scales


ENQUEUE_CASES = [
    ("arbitrary", "indices"),
    ("arbitrary", "splits"),
    ("arbitrary", "dense"),
    ("sparse", "indices"),
    ("ragged", "splits"),
]


def enqueue(kind: str, feats, combiners: list[str], table_ids: list[int], ordinal: int = 0):
    index, ids, weights = (list(x) for x in zip(*feats, strict=True))
    if kind == "arbitrary":
        return raw.EnqueueTPUEmbeddingArbitraryTensorBatch(
            sample_indices_or_row_splits=index,
            embedding_indices=ids,
            aggregation_weights=weights,
            mode_override="unspecified",
            device_ordinal=ordinal,
            combiners=combiners,
        )
    if kind == "sparse":
        return raw.EnqueueTPUEmbeddingSparseTensorBatch(
            sample_indices=index,
            embedding_indices=ids,
            aggregation_weights=weights,
            mode_override="unspecified",
            device_ordinal=ordinal,
            combiners=combiners,
            table_ids=table_ids,
        )
    return raw.EnqueueTPUEmbeddingRaggedTensorBatch(
        sample_splits=index,
        embedding_indices=ids,
        aggregation_weights=weights,
        mode_override="unspecified",
        device_ordinal=ordinal,
        combiners=combiners,
        table_ids=table_ids,
    )


def engine_snapshot() -> tuple[str, list]:
    tables = engine.tables()
    state = []
    for t in tables:
        for s in t["shards"]:
            if s["loaded"]:
                got = raw.RetrieveTPUEmbeddingADAMParameters(
                    num_shards=t["num_shards"], shard_id=s["shard"], table_name=t["name"]
                )
                state.append([x.numpy() for x in got])
    return str(engine.info()), state


def assert_engine_unchanged(before: tuple[str, list]) -> None:
    after = engine_snapshot()
    assert after[0] == before[0]
    for b, a in zip(before[1], after[1], strict=True):
        for x, y in zip(b, a, strict=True):
            np.testing.assert_array_equal(x, y)


def dense_ids(*features):
    return [bag_formats([[(i, 1.0)] for i in f], False, "dense") for f in features]


def system_config(**fields) -> bytes:
    """A valid one-table configuration with `fields` of the proto set (or, for
    `input_shape`, its feature's shape; `extra_tables`, copies of its table)."""
    cfg = cfg_pb2.TPUEmbeddingConfiguration.FromString(
        embedding_config([("t", 4, fields.pop("dim", 2), adam_params())], [(0, [2])])
    )
    if "input_shape" in fields:
        cfg.feature_descriptor[0].ClearField("input_shape")
        cfg.feature_descriptor[0].input_shape.extend(fields.pop("input_shape"))
    for i in range(fields.pop("extra_tables", 0)):
        cfg.table_descriptor.add().CopyFrom(cfg.table_descriptor[0])
        cfg.table_descriptor[-1].name = f"t{i}"
    if "num_features" in fields:
        cfg.ClearField("feature_descriptor")
        cfg.table_descriptor[0].num_features = fields.pop("num_features")
        cfg.batch_size_per_tensor_core = 2
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg.SerializeToString()
