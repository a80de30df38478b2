"""Where the engine's ops of a TPUEstimator graph run: this process, or a cluster's workers.

In one process the engine is this process's: one host, one core,
`/job:localhost`. On a cluster (`_cluster.EngineCluster`) the engine spans
the workers: host `h` is task `h` of job `worker`, holding shard `h` of every
table (TF places each table's partition `h` there), and the step's batch goes
whole to one core, core 0 of host 0, so that a step adds every gradient of a
row in the same order as one process does: the results are the same floats.
The engine's routing pass sends the rows each lookup needs from their owners
and each owner's gradient rows to it (docs/engine.md, "Training across
processes"); every other core of the configuration gets no batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding

from tpu_embed_adam.estimator._cluster import WORKER, EngineCluster

__all__ = ["EnginePlacement"]

# The host of the one-host, one-core configuration: the Estimator's own
# local session.
_LOCAL = tf_tpu_embedding.DeviceConfig(1, 1, "/job:localhost")


class EnginePlacement:
    """The engine's layout for an estimator: one process or a cluster's workers.

    Args:
      cluster: the cluster, or None for one process.
    """

    def __init__(self, cluster: EngineCluster | None):
        self._cluster = cluster

    @property
    def cluster(self) -> EngineCluster | None:
        """The cluster, or None for one process."""
        return self._cluster

    @property
    def device_config(self) -> Any:
        """TF's `DeviceConfig`: one core per host, the hosts being the workers."""
        if self._cluster is None:
            return _LOCAL
        hosts = self._cluster.num_hosts
        return tf_tpu_embedding.DeviceConfig(hosts, hosts, f"/job:{WORKER}")

    @property
    def num_cores(self) -> int:
        """The configuration's cores (one per host); only the first gets batches."""
        return 1 if self._cluster is None else self._cluster.num_hosts

    @property
    def configure_devices(self) -> list[str] | None:
        """Where to run `ConfigureTPUEmbedding`: each worker, or (None) where TF places it."""
        if self._cluster is None:
            return None
        return [self._cluster.host_device(h) for h in range(self._cluster.num_hosts)]

    @contextlib.contextmanager
    def on_core(self) -> Iterator[None]:
        """Places the ops built inside on the core that takes the batch (none in one process)."""
        if self._cluster is None:
            yield
            return
        with tf.device(self._cluster.host_device(0)):
            yield

    def enqueue_datas_on_core(
        self, enqueue_datas_list: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """The core's enqueue data, copied to its host (TF's enqueue runs where its ids are).

        Args:
          enqueue_datas_list: one mapping of feature to `EnqueueData` (TF's
            `split_inputs` gives one, for the batch's one core).

        Returns:
          The same data, each tensor an identity on the core's host.
        """
        if self._cluster is None:
            return [dict(datas) for datas in enqueue_datas_list]
        copied = []
        with self.on_core():
            for datas in enqueue_datas_list:
                copied.append(
                    {
                        feature: data._replace(
                            **{
                                field: tf.identity(value)
                                for field, value in data._asdict().items()
                                if value is not None
                            }
                        )
                        for feature, data in datas.items()
                    }
                )
        return copied
