"""Worker processes for a multi-host engine: one `tf.distribute.Server` process per host.

On a TPU system each host runs a process that feeds its TPU cores; here each
host is a worker process whose engine holds that host's shard of every table.
`LocalCluster(num_hosts, cores_per_host)` starts such processes on this
machine (tests, demos); on real hosts, run `tpu-embed-adam worker
--cluster_spec=JSON --task=I` on each (`run_worker`), or `tpu-embed-adam
worker` with `TF_CONFIG` set as a Kubernetes TFJob sets it
(`worker_task_from_tf_config`): job `worker` is the embedding hosts, job
`chief` the training program. Sessions connect to a
worker's `grpc://host:port` and place ops on
`/job:worker/replica:0/task:{host}/device:CPU:{core}`; docs/engine.md,
"Worker processes", has the details (set `operation_timeout_in_ms` on those
sessions: see `LocalCluster`).
"""

from tpu_embed_adam.cluster._local import MAX_LOCAL_HOSTS, LocalCluster
from tpu_embed_adam.cluster._tf_config import worker_task_from_tf_config
from tpu_embed_adam.cluster._worker import MAX_CORES_PER_HOST, parse_cluster_spec, run_worker

__all__ = [
    "MAX_CORES_PER_HOST",
    "MAX_LOCAL_HOSTS",
    "LocalCluster",
    "parse_cluster_spec",
    "run_worker",
    "worker_task_from_tf_config",
]
