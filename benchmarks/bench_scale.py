r"""One training step of TF's v1 `TPUEmbedding` graph on 1, 2 and 4 worker processes.

Each configuration trains the same table with the same global batch of ids
(`--ids`, split evenly over the hosts, one core per host), through TF's own
TPU embedding ops:

- `single process`: one host in this process (a plain `Session`), the
  engine as `bench_engine_step.py` times it;
- `N workers`: a `tpu_embed_adam.cluster.LocalCluster` of N worker processes,
  one host each, each holding its own shard of the table; with N > 1 every
  lookup and gradient crosses processes through TF's runtime.

A step is two `Session.run`s (the enqueue, then Recv -> loss -> gradients ->
Send). Reported per configuration: the median step time over `--iters` steps
after `--warmup`, its ratio to the single-process step measured in the same
run, and the bytes moved between processes in one step, counted from TF's
own records: every tensor that one of TF's `_Send` ops hands to a `_Recv` on
another task (from the step's partition graphs), sized from the step's
trace. Beside them, the bytes the model of `docs/scale.md` predicts for the
same batch: per (core, distinct row of another host) 16 + 4 * dim bytes to
look the row up and 16 + 4 * dim bytes to send its gradient.

With `--path=estimator` the same table and batches train through
`TPUEstimator` instead (feature `feature` of a `table_to_config_dict` spec,
the loss sum(act^2)): in one process, and as the chief of a `LocalCluster`
of N workers with `TF_CONFIG` as a TFJob sets it (docs/estimator.md, "On a
cluster"). There the whole batch goes to core 0 on worker 0, so the model
adds what crosses the chief's edge: the batch's ids and sample indices
(8 + 16 bytes per id) to worker 0, and the activations back and their
gradients out (4 * dim bytes per sample each way); the lookups and
gradients of rows other workers own are the graph path's count for one
core. A step is one `Session.run` of the estimator's train op, timed by a
hook (median after the warm-up).

All processes share this machine's cores: the figures show the cost of
routing, not a speed-up. `docs/scale.md` extrapolates them.

  python benchmarks/bench_scale.py --rows=1000000 --dim=64 --ids=16384
  python benchmarks/bench_scale.py --path=estimator --rows=200000 --ids=4096
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tensorflow.python.tpu import tpu_embedding  # noqa: E402

from tpu_embed_adam.cluster import LocalCluster  # noqa: E402  (registers the kernels)
from tpu_embed_adam.estimator import TPUEstimator  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Table rows.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dimension.")
_IDS = flags.DEFINE_integer("ids", 16_384, "Ids per step over all hosts (one per sample).")
_ZIPF = flags.DEFINE_float("zipf", 1.2, "Power-law exponent of the ids; 0 draws them uniformly.")
_HOSTS = flags.DEFINE_multi_integer("hosts", [1, 2, 4], "Worker processes, one run each.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
_PATH = flags.DEFINE_enum(
    "path", "graph", ["graph", "estimator"],
    "What trains: TF's v1 TPUEmbedding graph, or TPUEstimator (one process, then a chief "
    "from TF_CONFIG with the tables in the workers).",
)

_LR = 0.01


def _batches(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    def draw() -> np.ndarray:
        if _ZIPF.value > 0:
            return ((rng.zipf(_ZIPF.value, _IDS.value) - 1) % _ROWS.value).astype(np.int64)
        return rng.integers(0, _ROWS.value, _IDS.value).astype(np.int64)

    return [draw() for _ in range(count)]


def _device(job: str, host: int) -> str:
    return f"{job}/replica:0/task:{host}/device:CPU:0"


class _Step:
    """TF's TPUEmbedding training graph for `hosts` hosts of one core each."""

    def __init__(self, hosts: int, job: str, target: str):
        self.hosts = hosts
        self.graph = tf.Graph()
        with self.graph.as_default():
            emb = tpu_embedding.TPUEmbedding(
                {"table": tpu_embedding.TableConfig(
                    _ROWS.value, _DIM.value, combiner=None,
                    initializer=tf.compat.v1.random_uniform_initializer(-0.05, 0.05, seed=0))},
                {"feature": tpu_embedding.FeatureConfig("table")},
                batch_size=_IDS.value,
                mode=tpu_embedding.TRAINING,
                optimization_parameters=tpu_embedding.AdamParameters(_LR),
                device_config=tpu_embedding.DeviceConfig(hosts, hosts, job),
            )
            variables = emb.create_variables_and_ops()
            self.ids = []
            datas = []
            for h in range(hosts):
                with tf.device(_device(job, h)):
                    ids = tf.compat.v1.placeholder(tf.int64, [emb.batch_size_per_core])
                self.ids.append(ids)
                datas.append({"feature": tpu_embedding.EnqueueData(ids)})
            self.enqueue = emb.generate_enqueue_ops(datas)
            self.sends = []
            for h in range(hosts):
                with tf.device(_device(job, h)):
                    acts = emb.get_activations()["feature"]
                    (grad,) = tf.compat.v1.gradients(tf.reduce_sum(tf.square(acts)), [acts])
                    self.sends.append(emb.generate_send_gradients_op({"feature": grad}))
            init = tf.compat.v1.global_variables_initializer()
            load = variables.load_ops()
        self.session = tf.compat.v1.Session(target, graph=self.graph)
        self.session.run(init)
        self.session.run(load)

    def run(self, batch: np.ndarray, **kwargs: object) -> None:
        parts = np.split(batch, self.hosts)
        self.session.run(self.enqueue, dict(zip(self.ids, parts, strict=True)))
        self.session.run(self.sends, **kwargs)

    def time(self, batches: Iterator[np.ndarray]) -> float:
        for _ in range(_WARMUP.value):
            self.run(next(batches))
        times = []
        for _ in range(_ITERS.value):
            start = time.perf_counter()
            self.run(next(batches))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def bytes_between_processes(self, batch: np.ndarray) -> int:
        """Runs one traced step; returns the bytes TF moved from one task to another."""
        options = tf.compat.v1.RunOptions(
            trace_level=tf.compat.v1.RunOptions.FULL_TRACE, output_partition_graphs=True)
        metadata = tf.compat.v1.RunMetadata()
        self.run(batch, options=options, run_metadata=metadata)
        return _cross_task_bytes(metadata)

    def close(self) -> None:
        self.session.close()


def _task(device: str) -> str:
    """`/job:J/replica:R/task:T` of a device: the process it is in (chief 0 is not worker 0)."""
    return "/".join(part for part in device.split("/") if part.split(":")[0] in (
        "job", "replica", "task"))


def _cross_task_bytes(metadata: tf.compat.v1.RunMetadata) -> int:
    """Sums the sizes of the tensors that `_Send` ops hand to another task."""
    sent: list[tuple[str, str, int]] = []  # (device, producer, output)
    for partition in metadata.partition_graphs:
        for node in partition.node:
            if node.op not in ("_Send", "_HostSend"):
                continue
            if _task(node.attr["send_device"].s.decode()) == _task(
                node.attr["recv_device"].s.decode()
            ):
                continue
            producer, _, output = node.input[0].partition(":")
            sent.append((node.device, producer, int(output or 0)))
    sizes: dict[tuple[str, str], Sequence[int]] = {}
    for device in metadata.step_stats.dev_stats:
        for stats in device.node_stats:
            sizes[device.device, stats.node_name] = [_tensor_bytes(o) for o in stats.output]
    # A producer without stats did not run in this step (a branch not taken).
    return sum(
        sizes[device, producer][output] for device, producer, output in sent
        if (device, producer) in sizes
    )


def _tensor_bytes(output: Any) -> int:
    """A traced output's own size (its buffer may be part of a larger allocation)."""
    description = output.tensor_description
    try:
        dtype = tf.dtypes.as_dtype(description.dtype)
    except TypeError:  # no dtype recorded
        dtype = None
    if dtype is None or not dtype.is_numpy_compatible or dtype == tf.string:
        return description.allocation_description.requested_bytes
    return dtype.size * int(np.prod([d.size for d in description.shape.dim]))


def _model_bytes(batch: np.ndarray, hosts: int) -> int:
    """docs/scale.md's count: each host's core looks up its share of the batch."""
    return sum(
        _remote_row_bytes(part, h, hosts) for h, part in enumerate(np.split(batch, hosts))
    )


def _remote_row_bytes(ids: np.ndarray, host: int, hosts: int) -> int:
    """Per distinct row of `ids` another host owns, a (table, row) pair and a row each way."""
    shard = -(-_ROWS.value // hosts)  # div sharding: the first shards one row longer at most
    remote = np.count_nonzero(np.minimum(np.unique(ids) // shard, hosts - 1) != host)
    return remote * 2 * (16 + 4 * _DIM.value)


class _StepTimes(tf.compat.v1.train.SessionRunHook):
    """Times each step's `Session.run`; traces the last one for the bytes it moves."""

    def __init__(self, traced_step: int):
        self._traced_step = traced_step
        self._step = 0
        self._start = 0.0
        self.times: list[float] = []
        self.moved = 0

    def before_run(self, run_context: Any) -> Any:
        self._step += 1
        options = None
        if self._step == self._traced_step:
            options = tf.compat.v1.RunOptions(
                trace_level=tf.compat.v1.RunOptions.FULL_TRACE, output_partition_graphs=True
            )
        self._start = time.perf_counter()
        return tf.compat.v1.train.SessionRunArgs(None, options=options)

    def after_run(self, run_context: Any, run_values: Any) -> None:
        elapsed = time.perf_counter() - self._start
        if self._step == self._traced_step:
            self.moved = _cross_task_bytes(run_values.run_metadata)
        else:
            self.times.append(elapsed)


def _estimator_step(batches: Sequence[np.ndarray], tf_config: str | None) -> tuple[float, int]:
    """Trains `batches` with TPUEstimator; returns the median step and the traced step's bytes."""
    spec = tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        table_to_config_dict={"table": tpu_embedding.TableConfig(
            _ROWS.value, _DIM.value, combiner="sum",
            initializer=tf.compat.v1.random_uniform_initializer(-0.05, 0.05, seed=0))},
        feature_to_config_dict={"feature": tpu_embedding.FeatureConfig("table")},
        optimization_parameters=tpu_embedding.AdamParameters(_LR),
    )

    def model_fn(features: Any, labels: Any, mode: str, params: Any) -> Any:
        del labels, params
        loss = tf.reduce_sum(tf.square(features["feature"]))
        # The tables train in the engine; this minimize only carries the
        # activations' gradients to it (TPUEstimator's dummy variables).
        train_op = tf.compat.v1.train.GradientDescentOptimizer(0.0).minimize(
            loss, tf.compat.v1.train.get_global_step()
        )
        return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)

    def input_fn(params: Any) -> tf.data.Dataset:
        ids = np.stack(batches)
        rows = np.arange(_IDS.value)

        def to_sparse(batch: tf.Tensor) -> dict[str, tf.sparse.SparseTensor]:
            indices = tf.stack([rows, tf.zeros_like(rows)], 1)
            return {"feature": tf.sparse.SparseTensor(
                tf.cast(indices, tf.int64), batch, [params["batch_size"], 1])}

        return tf.data.Dataset.from_tensor_slices(ids).map(to_sparse)

    previous = os.environ.pop("TF_CONFIG", None)
    if tf_config is not None:
        os.environ["TF_CONFIG"] = tf_config
    try:
        estimator = TPUEstimator(
            model_fn=model_fn,
            config=tf.compat.v1.estimator.tpu.RunConfig(
                model_dir=tempfile.mkdtemp(prefix="bench_scale_"), save_checkpoints_steps=None,
                save_checkpoints_secs=None, log_step_count_steps=None, save_summary_steps=None,
                tpu_config=tf.compat.v1.estimator.tpu.TPUConfig(iterations_per_loop=100),
            ),
            use_tpu=False, train_batch_size=_IDS.value, embedding_config_spec=spec,
        )
    finally:
        os.environ.pop("TF_CONFIG", None)
        if previous is not None:
            os.environ["TF_CONFIG"] = previous
    hook = _StepTimes(traced_step=len(batches))
    estimator.train(input_fn, steps=len(batches), hooks=[hook])
    return statistics.median(hook.times[_WARMUP.value:]), hook.moved


def _estimator_model_bytes(batch: np.ndarray, hosts: int) -> int:
    """The graph path's count for the batch on one core (host 0), plus the chief's edge."""
    return _remote_row_bytes(batch, 0, hosts) + _chief_edge_bytes(batch)


def _chief_edge_bytes(batch: np.ndarray) -> int:
    # Ids (int64) and sample indices ([n, 2] int64) out; a row of activations
    # per sample back, and its gradient out again.
    return len(batch) * (8 + 16) + 2 * len(batch) * 4 * _DIM.value


def _estimator_results(batches: Sequence[np.ndarray]) -> list[tuple[str, float, int, int]]:
    seconds, _ = _estimator_step(batches, None)
    results = [("single process", seconds, 0, 0)]
    for hosts in _HOSTS.value:
        with LocalCluster(hosts, chief=True) as cluster:
            seconds, moved = _estimator_step(batches, cluster.tf_config("chief"))
        results.append(
            (f"{hosts} workers", seconds, moved, _estimator_model_bytes(batches[-1], hosts))
        )
    return results


def _graph_results(batches: Sequence[np.ndarray]) -> list[tuple[str, float, int, int]]:
    results = []
    single = _Step(1, "/job:localhost", "")
    base = single.time(iter(batches))
    single.close()
    results.append(("single process", base, 0, 0))
    for hosts in _HOSTS.value:
        with LocalCluster(hosts) as cluster:
            step = _Step(hosts, "/job:worker", cluster.target)
            seconds = step.time(iter(batches))
            moved = step.bytes_between_processes(batches[-1])
            step.close()
        results.append((f"{hosts} workers", seconds, moved, _model_bytes(batches[-1], hosts)))
    return results


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(0)
    count = 1 + _WARMUP.value + _ITERS.value
    batches = _batches(rng, count)
    if _PATH.value == "estimator":
        results = _estimator_results(batches)
    else:
        results = _graph_results(batches)
    base = results[0][1]
    logging.info("%s: table %d x %d, %d ids per step (%s), median of %d steps",
                 _PATH.value, _ROWS.value, _DIM.value, _IDS.value,
                 f"zipf {_ZIPF.value}" if _ZIPF.value > 0 else "uniform", _ITERS.value)
    logging.info("%-15s %10s %7s %22s %18s", "configuration", "step", "ratio",
                 "bytes between procs", "model of scale.md")
    for name, seconds, moved, model in results:
        logging.info("%-15s %7.1f ms %6.2fx %19.2f MB %15.2f MB", name, 1e3 * seconds,
                     seconds / base, moved / 1e6, model / 1e6)
    print(json.dumps([
        {"configuration": name, "step_ms": 1e3 * seconds, "ratio": seconds / base,
         "bytes_between_processes": moved, "model_bytes": model}
        for name, seconds, moved, model in results
    ]))


if __name__ == "__main__":
    app.run(main)
