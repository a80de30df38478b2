r"""Trains a two-table `TPUEmbedding` model on CPU through the software engine.

TF's own v1 `tensorflow.python.tpu.tpu_embedding.TPUEmbedding` graph, unchanged:
`create_variables_and_ops` -> load -> `generate_enqueue_ops` ->
`get_activations` -> loss -> gradients -> `generate_send_gradients_op` ->
`retrieve_ops`. Importing `tpu_embed_adam` registers CPU kernels for TF's TPU
embedding ops, so the tables live in the engine and train with TPU sparse Adam.

The task is synthetic and learnable: user and item ids follow power laws
(numpy zipf), and each (user, item) pair's rating is the dot product of hidden
per-id factors. The model is a pure embedding model, `rating = <u, i>`, so
every drop of the loss comes from the engine's Adam updates.

Each host is a `tf.distribute.Server` worker (here all in this process); each
core is a logical CPU device of its host's worker.

  python examples/train_tpu_embedding.py --steps=1000 --cores_per_host=2
"""

from __future__ import annotations

import os
import socket
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tensorflow.python.tpu import tpu, tpu_embedding  # noqa: E402

import tpu_embed_adam  # noqa: E402, F401  (registers the engine's CPU kernels)

_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 512, "Global batch size (all cores).")
_NUM_HOSTS = flags.DEFINE_integer("num_hosts", 1, "Hosts: one worker each, one shard each.")
_CORES_PER_HOST = flags.DEFINE_integer("cores_per_host", 2, "Cores (logical CPU devices) per host.")
_USERS = flags.DEFINE_integer("users", 20_000, "Rows of the `users` table.")
_ITEMS = flags.DEFINE_integer("items", 5_000, "Rows of the `items` table.")
_DIM = flags.DEFINE_integer("dim", 16, "Embedding dimension of both tables.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.02, "Adam learning rate.")
_ZIPF = flags.DEFINE_float("zipf", 1.3, "Power-law exponent of the id distributions (> 1).")
_PARTITION = flags.DEFINE_enum("partition_strategy", "div", ["div", "mod"], "Table sharding.")
_LOG_EVERY = flags.DEFINE_integer(
    "log_every", 100, "Log the mean loss and steps/s of every this many steps (and of step 1)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the synthetic task and data.")

_JOB = "/job:worker"
_HIDDEN_RANK = 4


class SyntheticRatings:
    """Power-law (user, item) pairs rated by hidden factors: a learnable target."""

    def __init__(self, users: int, items: int, zipf: float, seed: int):
        self._rng = np.random.default_rng(seed)
        scale = _HIDDEN_RANK**-0.25  # ratings have unit variance
        self._user_factors = self._rng.normal(0.0, scale, (users, _HIDDEN_RANK))
        self._item_factors = self._rng.normal(0.0, scale, (items, _HIDDEN_RANK))
        self._zipf = zipf

    def _ids(self, vocab: int, n: int) -> np.ndarray:
        # Rank 1 is the most frequent id; folding the long tail keeps ids in range.
        return (self._rng.zipf(self._zipf, n) - 1) % vocab

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns `n` user ids, item ids, and their float32 ratings."""
        users = self._ids(len(self._user_factors), n)
        items = self._ids(len(self._item_factors), n)
        ratings = np.sum(self._user_factors[users] * self._item_factors[items], axis=1)
        return users, items, ratings.astype(np.float32)


def _start_cluster(num_hosts: int, cores_per_host: int) -> list[tf.distribute.Server]:
    """One in-process worker per host, each with one CPU device per core."""
    ports = []
    for _ in range(num_hosts):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    spec = tf.train.ClusterSpec({"worker": [f"localhost:{p}" for p in ports]})
    config = tf.compat.v1.ConfigProto(device_count={"CPU": cores_per_host})
    return [
        tf.distribute.Server(spec, job_name="worker", task_index=i, config=config)
        for i in range(num_hosts)
    ]


def _core_device(host: int, core: int) -> str:
    return f"{_JOB}/replica:0/task:{host}/device:CPU:{core}"


def main(argv: list[str]) -> None:
    del argv
    num_hosts, cores_per_host = _NUM_HOSTS.value, _CORES_PER_HOST.value
    num_cores = num_hosts * cores_per_host
    if _BATCH_SIZE.value % num_cores:
        raise app.UsageError(f"--batch_size must be a multiple of the {num_cores} cores.")
    per_core = _BATCH_SIZE.value // num_cores
    servers = _start_cluster(num_hosts, cores_per_host)

    graph = tf.Graph()
    with graph.as_default():
        emb = tpu_embedding.TPUEmbedding(
            {
                # combiner=None: one id per sample (TF then sums, i.e. passes the row on).
                "users": tpu_embedding.TableConfig(_USERS.value, _DIM.value, combiner=None),
                "items": tpu_embedding.TableConfig(_ITEMS.value, _DIM.value, combiner=None),
            },
            {"user": tpu_embedding.FeatureConfig("users"),
             "item": tpu_embedding.FeatureConfig("items")},
            batch_size=_BATCH_SIZE.value,
            mode=tpu_embedding.TRAINING,
            optimization_parameters=tpu_embedding.AdamParameters(_LEARNING_RATE.value),
            partition_strategy=_PARTITION.value,
            device_config=tpu_embedding.DeviceConfig(num_hosts, num_cores, _JOB),
        )
        variables = emb.create_variables_and_ops()
        load_ops, retrieve_ops = variables.load_ops(), variables.retrieve_ops()

        id_feeds, enqueue_datas = [], []
        for c in range(num_cores):
            with tf.device(_core_device(c // cores_per_host, 0)):
                feeds = {f: tf.compat.v1.placeholder(tf.int64, [per_core], f"{f}_ids_{c}")
                         for f in ("user", "item")}
            id_feeds.append(feeds)
            # One id per sample: no sample indices, TF's dense case.
            enqueue_datas.append({f: tpu_embedding.EnqueueData(t) for f, t in feeds.items()})
        enqueue_ops = emb.generate_enqueue_ops(enqueue_datas)

        rating_feeds, losses, send_ops = [], [], []
        for c in range(num_cores):
            with tf.device(_core_device(*divmod(c, cores_per_host))):
                acts = emb.get_activations()
                ratings = tf.compat.v1.placeholder(tf.float32, [per_core])
                predicted = tf.reduce_sum(acts["user"] * acts["item"], axis=1)
                loss = tf.reduce_mean(tf.square(predicted - ratings))
                grads = tf.compat.v1.gradients(loss, list(acts.values()))
                send_ops.append(emb.generate_send_gradients_op(dict(zip(acts, grads, strict=True))))
            rating_feeds.append(ratings)
            losses.append(loss)
        mean_loss = tf.add_n(losses) / num_cores
        init_ops = [tf.compat.v1.global_variables_initializer(),
                    tf.compat.v1.local_variables_initializer()]
        # As a TPU program does before loading; on CPU it runs ConfigureTPUEmbedding.
        initialize_system = tpu.initialize_system_for_tpu_embedding(emb.config_proto, job="worker")

    data = SyntheticRatings(_USERS.value, _ITEMS.value, _ZIPF.value, _SEED.value)
    # TF pins the configure op to `device:TPU_SYSTEM:0`; soft placement moves it to a CPU.
    config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    with tf.compat.v1.Session(servers[0].target, graph=graph, config=config) as sess:
        sess.run(init_ops)
        sess.run(initialize_system)
        sess.run(load_ops)
        window_start, window_losses, first_loss = time.perf_counter(), [], None
        for step in range(1, _STEPS.value + 1):
            enqueue_feed, train_feed = {}, {}
            for c in range(num_cores):
                users, items, ratings = data.batch(per_core)
                enqueue_feed[id_feeds[c]["user"]] = users
                enqueue_feed[id_feeds[c]["item"]] = items
                train_feed[rating_feeds[c]] = ratings
            sess.run(enqueue_ops, enqueue_feed)
            loss, _ = sess.run((mean_loss, send_ops), train_feed)
            window_losses.append(loss)
            if step == 1 or step % _LOG_EVERY.value == 0 or step == _STEPS.value:
                now = time.perf_counter()
                avg = float(np.mean(window_losses))
                first_loss = avg if first_loss is None else first_loss
                logging.info(
                    "step %d  loss %.4f  %.1f steps/s", step, avg,
                    len(window_losses) / (now - window_start),
                )
                window_start, window_losses = now, []
        # Back into TF's variables, ready for a tf.compat.v1.train.Saver checkpoint.
        sess.run(retrieve_ops)
        logging.info("loss %.4f -> %.4f over %d steps", first_loss, avg, _STEPS.value)

if __name__ == "__main__":
    app.run(main)
