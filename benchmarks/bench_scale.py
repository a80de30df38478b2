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

All processes share this machine's cores: the figures show the cost of
routing, not a speed-up. `docs/scale.md` extrapolates them.

  python benchmarks/bench_scale.py --rows=1000000 --dim=64 --ids=16384
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tensorflow.python.tpu import tpu_embedding  # noqa: E402

from tpu_embed_adam.cluster import LocalCluster  # noqa: E402  (registers the kernels)

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Table rows.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dimension.")
_IDS = flags.DEFINE_integer("ids", 16_384, "Ids per step over all hosts (one per sample).")
_ZIPF = flags.DEFINE_float("zipf", 1.2, "Power-law exponent of the ids; 0 draws them uniformly.")
_HOSTS = flags.DEFINE_multi_integer("hosts", [1, 2, 4], "Worker processes, one run each.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")

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
    return next(part for part in device.split("/") if part.startswith("task:"))


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
            sizes[device.device, stats.node_name] = [
                o.tensor_description.allocation_description.requested_bytes for o in stats.output
            ]
    return sum(sizes[device, producer][output] for device, producer, output in sent)


def _model_bytes(batch: np.ndarray, hosts: int) -> int:
    """docs/scale.md's count: per core and distinct row owned by another host, a
    (table, row) pair and a row each way (lookup, then gradient)."""
    if hosts == 1:
        return 0
    shard = -(-_ROWS.value // hosts)  # div sharding: the first shards one row longer at most
    total = 0
    for h, part in enumerate(np.split(batch, hosts)):
        rows = np.unique(part)
        remote = np.count_nonzero(np.minimum(rows // shard, hosts - 1) != h)
        total += remote * 2 * (16 + 4 * _DIM.value)
    return total


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(0)
    count = 1 + _WARMUP.value + _ITERS.value
    results = []
    single = _Step(1, "/job:localhost", "")
    batches = _batches(rng, count)
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
    logging.info("table %d x %d, %d ids per step (%s), median of %d steps",
                 _ROWS.value, _DIM.value, _IDS.value,
                 f"zipf {_ZIPF.value}" if _ZIPF.value > 0 else "uniform", _ITERS.value)
    logging.info("%-15s %10s %7s %22s %18s", "configuration", "step", "ratio",
                 "bytes between procs", "model of scale.md")
    for name, seconds, moved, model in results:
        logging.info("%-15s %7.1f ms %6.2fx %19.2f MB %15.2f MB", name, 1e3 * seconds,
                     seconds / base, moved / 1e6, model / 1e6)


if __name__ == "__main__":
    app.run(main)
