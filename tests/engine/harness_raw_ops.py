"""Helpers of the tests that call TF's TPU embedding ops directly (`test_engine_*.py`).

Configurations built from `AdamParameters.to_tf_proto()` (`adam_params`,
`embedding_config`, `system_config`), whole-table load and retrieve over every
shard (`load_all`, `retrieve_all`, `random_slots`), bags of ids in each enqueue
format with their numpy lookup (`random_bags`, `bag_formats`, `dense_ids`,
`numpy_lookup`, `ENQUEUE_CASES`, `enqueue`), and snapshots of the engine for
the bad-input tests (`engine_snapshot`, `assert_engine_unchanged`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from harness_sharding import shard_rows
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as cfg_pb2

from tpu_embed_adam import engine
from tpu_embed_adam.learning_rates import DynamicLearningRate
from tpu_embed_adam.params import AdamParameters

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
