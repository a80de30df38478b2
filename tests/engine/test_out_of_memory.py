"""A failed allocation in any kernel is ResourceExhausted and changes nothing; the process lives.

`oom_child.py` runs Load, Enqueue, Recv, Send and the fused apply in a child
process whose address space (RLIMIT_AS) leaves each op less than it must
allocate. Before the kernels caught std::bad_alloc, such a run died (SIGABRT
in a session, SIGSEGV eagerly).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tpu_embed_adam import _library

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(_library.load_library() is None, reason="kernel library not built")


@pytest.fixture(scope="module")
def outcomes() -> dict[str, list[str]]:
    child = subprocess.run(
        [sys.executable, os.path.join(HERE, "oom_child.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
    return {line.split()[0]: line.split()[1:] for line in child.stdout.splitlines()}


@pytest.mark.parametrize(
    "op,state",
    [
        ("Load", "False"),  # the shard is still not loaded
        ("Enqueue", "0"),  # nothing queued
        ("Recv", "1"),  # the batch is still queued
        ("Send", "0"),  # no step applied...
        ("TpuEmbedAdamApply", "0.0"),  # the table is untouched
    ],
)
def test_out_of_memory_is_resource_exhausted_and_changes_nothing(outcomes, op, state):
    assert outcomes[op] == ["ResourceExhausted", state]


def test_the_refused_send_kept_its_batch(outcomes):
    # ...and the batch still trains once memory is back.
    assert outcomes["Send-after"] == ["ok", "1"]
