r"""Runs each kernel of the package once with too little address space; prints the outcomes.

A child process of `test_out_of_memory.py`: RLIMIT_AS is lowered (soft limit
only, so it can be raised again) to the process's size plus a margin smaller
than what the op must allocate, the op runs, and the limit goes back. Each
line is `{op} {outcome} {state}`: the outcome is `ResourceExhausted` (the
kernel's error), `ok`, or another error's name; the state tells whether the
engine (or the variables) changed. A std::bad_alloc that escaped a kernel
would kill this process instead (SIGABRT, or SIGSEGV eagerly).

  python tests/engine/oom_child.py
"""

from __future__ import annotations

import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as cfg_pb2  # noqa: E402

from tpu_embed_adam import AdamParameters, engine  # noqa: E402
from tpu_embed_adam.engine._state import library  # noqa: E402

_MB = 1 << 20
_ROWS, _DIM, _IDS = 1 << 22, 4, 1 << 24
raw = tf.raw_ops


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _limited(margin: int, op) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + margin, hard))
    try:
        op()
        return "ok"
    except tf.errors.ResourceExhaustedError:
        return "ResourceExhausted"
    except Exception as e:  # noqa: BLE001 (reported to the parent)
        return type(e).__name__
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _config() -> bytes:
    cfg = cfg_pb2.TPUEmbeddingConfiguration(
        num_hosts=1, num_tensor_cores=1, mode=cfg_pb2.TPUEmbeddingConfiguration.TRAINING
    )
    table = cfg.table_descriptor.add(name="t", vocabulary_size=_ROWS, dimension=_DIM)
    table.optimization_parameters.CopyFrom(AdamParameters(0.1).to_tf_proto())
    cfg.feature_descriptor.add(table_id=0, input_shape=[_IDS])
    return cfg.SerializeToString()


def main() -> None:
    raw.ConfigureTPUEmbedding(config=_config())
    # One 64 MB input for all three arrays; a first load allocates 192 MB.
    x = tf.zeros([_ROWS, _DIM])

    def load():
        raw.LoadTPUEmbeddingADAMParameters(
            parameters=x, momenta=x, velocities=x, num_shards=1, shard_id=0, table_name="t"
        )

    print("Load", _limited(100 * _MB, load), engine.tables()[0]["shards"][0]["loaded"], flush=True)
    load()
    # 16M ids: the engine's batch holds 32 bytes per id.
    ids = tf.range(_IDS, dtype=tf.int32) % _ROWS

    def enqueue():
        raw.EnqueueTPUEmbeddingArbitraryTensorBatch(
            sample_indices_or_row_splits=[tf.zeros([0], tf.int64)], embedding_indices=[ids],
            aggregation_weights=[tf.zeros([0])], mode_override="unspecified", combiners=[],
        )

    print("Enqueue", _limited(100 * _MB, enqueue), engine.info()["queued_batches"], flush=True)
    enqueue()
    recv = lambda: raw.RecvTPUEmbeddingActivations(num_outputs=1, config=b"")  # noqa: E731
    print("Recv", _limited(100 * _MB, recv), engine.info()["queued_batches"], flush=True)
    (activations,) = recv()
    grads = tf.ones_like(activations)
    del activations

    def send():
        raw.SendTPUEmbeddingGradients(inputs=[grads], learning_rates=[], config=b"")

    print("Send", _limited(100 * _MB, send),
          engine.tables()[0]["shards"][0]["steps_since_retrieve"], flush=True)
    send()
    print("Send-after", "ok", engine.tables()[0]["shards"][0]["steps_since_retrieve"], flush=True)

    variables = [tf.Variable(tf.zeros([_ROWS, _DIM])) for _ in range(3)]
    rows = tf.ones([_IDS, _DIM])

    def apply():
        library().tpu_embed_adam_apply(
            var=variables[0].handle, m=variables[1].handle, v=variables[2].handle, ids=ids,
            grads=rows, learning_rate=np.float32(0.1),
            optimization_parameters=AdamParameters(0.1).to_tf_proto().SerializeToString(),
        )

    outcome = _limited(100 * _MB, apply)
    print("TpuEmbedAdamApply", outcome, float(tf.reduce_max(tf.abs(variables[0]))), flush=True)


if __name__ == "__main__":
    main()
