"""A user's program on a `LocalCluster`, written without any timeout: steps until killed.

Prints `pids <worker pids>` once its session has run a step, then runs steps
in a loop; the test SIGKILLs a worker. TF's sessions would then wait for the
dead worker forever (closing the session, creating one); the program must
instead end, with an error naming the dead task.

Usage: python plain_session_child.py HOSTS
"""

from __future__ import annotations

import sys

import tensorflow as tf

from tpu_embed_adam.cluster import LocalCluster


def main(hosts: int) -> None:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [])
        parts = []
        for task in range(hosts):
            with tf.device(f"/job:worker/replica:0/task:{task}/device:CPU:0"):
                parts.append(x * float(task + 1))
        total = tf.add_n(parts)
    with LocalCluster(hosts) as cluster:
        # No ConfigProto, no operation timeout: what a user writes.
        with tf.compat.v1.Session(cluster.target, graph=graph) as sess:
            sess.run(total, {x: 1.0})
            print("pids", *cluster.pids, flush=True)
            while True:
                sess.run(total, {x: 1.0})


if __name__ == "__main__":
    main(int(sys.argv[1]))
