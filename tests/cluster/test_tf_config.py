"""TF_CONFIG: `tpu-embed-adam worker` serves from it alone; bad ones are named; resolvers.

The parser is checked in-process on every kind of bad TF_CONFIG (each error
names what is wrong in it); one worker process, started with nothing but
TF_CONFIG as a TFJob starts it, serves its task; `LocalCluster` hands its
workers the same.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import tensorflow as tf

from tpu_embed_adam import _library, cli, engine
from tpu_embed_adam.cluster import LocalCluster, run_worker, worker_task_from_tf_config

needs_kernels = pytest.mark.skipif(
    _library.load_library() is None, reason="kernel library not built: workers refuse to start"
)

CLUSTER = {"chief": ["chief-0:2222"], "worker": ["worker-0:2222", "worker-1:2222"]}


def _env(config) -> dict[str, str]:
    return {"TF_CONFIG": config if isinstance(config, str) else json.dumps(config)}


def test_a_tfjob_workers_config_gives_the_whole_cluster_and_its_index():
    spec, index = worker_task_from_tf_config(
        _env({"cluster": CLUSTER, "task": {"type": "worker", "index": 1}, "environment": "cloud"})
    )
    assert spec.as_dict() == CLUSTER and index == 1
    # TF's Estimator reads the index with int(): a string of digits is one too.
    assert worker_task_from_tf_config(
        _env({"cluster": CLUSTER, "task": {"type": "worker", "index": "0"}})
    )[1] == 0


def test_it_reads_os_environ_by_default(monkeypatch):
    config = {"cluster": CLUSTER, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert worker_task_from_tf_config()[1] == 0


@pytest.mark.parametrize(
    "config, message",
    [
        (None, "TF_CONFIG is not set: give --cluster_spec and --task, or set TF_CONFIG"),
        ("", "TF_CONFIG is not set"),
        ("{cluster", "TF_CONFIG is not JSON ("),
        ("[1, 2]", "TF_CONFIG must be a JSON object; received: '[1, 2]'."),
        (
            {"task": {"type": "worker", "index": 0}},
            "TF_CONFIG has no `cluster`; received keys ['task']",
        ),
        ({"cluster": ["h:1"]}, "TF_CONFIG's `cluster` must be an object of job name to addresses"),
        ({"cluster": {"worker": "h:1"}}, "TF_CONFIG's `cluster.worker` must be a non-empty list"),
        ({"cluster": {"worker": []}}, "TF_CONFIG's `cluster.worker` must be a non-empty list"),
        ({"cluster": {"worker": ["h"]}}, "`cluster.worker` has the address 'h', not 'host:port'"),
        ({"cluster": {"worker": ["grpc://h:1"]}}, "'grpc://h:1', not 'host:port' (no scheme)"),
        ({"cluster": {"worker": ["h:0"]}}, "with a port in [1, 65535]"),
        (
            {"cluster": {"chief": ["h:1"]}},
            "TF_CONFIG's `cluster` has no job 'worker' (the embedding hosts); it has ['chief']",
        ),
        ({"cluster": CLUSTER}, "TF_CONFIG must have a `task` object"),
        (
            {"cluster": CLUSTER, "task": {"type": "chief", "index": 0}},
            "TF_CONFIG's `task.type` is 'chief': `tpu-embed-adam worker` serves the embedding "
            "hosts, the tasks of job 'worker'; the 'chief' runs the training program",
        ),
        (
            {"cluster": CLUSTER, "task": {"type": "worker"}},
            "TF_CONFIG's `task.index` must be an int; received: None.",
        ),
        (
            {"cluster": CLUSTER, "task": {"type": "worker", "index": True}},
            "`task.index` must be an int; received: True.",
        ),
        (
            {"cluster": CLUSTER, "task": {"type": "worker", "index": 2}},
            "TF_CONFIG's `task.index` is 2, but `cluster.worker` has 2 tasks (indices 0 to 1).",
        ),
        ({"cluster": CLUSTER, "task": {"type": "worker", "index": -1}}, "`task.index` is -1,"),
    ],
)
def test_a_bad_tf_config_is_named(config, message):
    env = {} if config is None else _env(config)
    with pytest.raises(ValueError) as raised:
        worker_task_from_tf_config(env)
    assert message in str(raised.value), str(raised.value)


def test_the_worker_command_exits_2_naming_what_is_wrong_in_tf_config(capsys, monkeypatch):
    config = {"cluster": CLUSTER, "task": {"type": "chief", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    code = cli.main(["tpu-embed-adam", "worker"])
    out = capsys.readouterr()
    assert (code, out.out) == (2, "")
    assert out.err.startswith("tpu-embed-adam worker: error: TF_CONFIG's `task.type` is 'chief'")
    assert out.err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task=0"], "argument --cluster_spec: required with --task; give neither to read"),
        (
            ['--cluster_spec={"worker": ["localhost:2222"]}'],
            "argument --task: required with --cluster_spec",
        ),
    ],
)
def test_the_worker_command_takes_both_flags_or_neither(capsys, monkeypatch, args, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = cli.main(["tpu-embed-adam", "worker", *args])
    out = capsys.readouterr()
    assert code == 2 and message in out.err, out.err


@pytest.mark.parametrize(
    "make",
    [
        lambda: tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": ["localhost:2222"]})
        ),
        lambda: tf.distribute.cluster_resolver.TFConfigClusterResolver(),
    ],
)
def test_run_worker_takes_a_cluster_resolver(make, monkeypatch):
    # The checks run before anything starts: a task outside the resolver's
    # worker job names it, which shows the resolver's spec was read.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:2222"]}}))
    with pytest.raises(ValueError, match=r"Argument `task` must be in \[0, 0\]; received: 1"):
        run_worker(make(), 1)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"ps": ["localhost:2222"]}}))
    if isinstance(make(), tf.distribute.cluster_resolver.TFConfigClusterResolver):
        with pytest.raises(ValueError, match="Argument `cluster_spec` has no job 'worker'"):
            run_worker(make(), 0)


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return f"localhost:{s.getsockname()[1]}"


@needs_kernels
def test_a_worker_serves_from_tf_config_alone():
    spec = {"chief": [_free_address()], "worker": [_free_address()]}
    config = {"cluster": spec, "task": {"type": "worker", "index": 0}, "environment": "cloud"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpu_embed_adam.cli", "worker"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, **_env(config)),
    )
    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline().rstrip("\n")
        timer.cancel()
        address = spec["worker"][0]
        assert line == f"worker task 0 serving at {address} (pid {proc.pid})", proc.stderr.read()
        assert engine.info(f"grpc://{address}", 0)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()


@needs_kernels
def test_local_cluster_starts_its_workers_and_describes_its_chief_as_a_tfjob_does():
    with LocalCluster(2, chief=True) as cluster:
        spec = cluster.cluster_spec.as_dict()
        assert sorted(spec) == ["chief", "worker"] and len(spec["worker"]) == 2
        assert len(set(spec["chief"] + spec["worker"])) == 3
        assert [engine.info(cluster.target, task)["pid"] for task in range(2)] == list(
            cluster.pids
        )
        for task_type, index in (("chief", 0), ("worker", 1), ("evaluator", 0)):
            assert json.loads(cluster.tf_config(task_type, index)) == {
                "cluster": spec, "task": {"type": task_type, "index": index},
                "environment": "cloud",
            }
        assert json.loads(cluster.tf_config()) == json.loads(cluster.tf_config("chief", 0))
        # What a worker of the cluster got is what the worker command reads.
        assert worker_task_from_tf_config(_env(cluster.tf_config("worker", 1)))[1] == 1
        with pytest.raises(ValueError, match="Argument `index` must be in"):
            cluster.tf_config("worker", 2)
        with pytest.raises(ValueError, match="Argument `task_type` must be 'chief', 'worker'"):
            cluster.tf_config("ps")
    with LocalCluster(1) as plain:
        assert plain.cluster_spec.jobs == ["worker"]
        with pytest.raises(ValueError, match="has no such job: make it with LocalCluster"):
            plain.tf_config("chief")


def test_local_cluster_refuses_a_chief_that_is_not_a_bool():
    with pytest.raises(TypeError, match="Argument `chief` must be a bool"):
        LocalCluster(1, chief=1)
