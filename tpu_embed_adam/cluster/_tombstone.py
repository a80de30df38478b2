"""A tombstone: a gRPC server at a dead worker's address that answers every call with why.

TF 2.15's sessions wait for a dead worker without end: a client's
`Session.close()` or a new session's first run waits for the master, which
waits for the dead task (gRPC calls that wait until a server answers). Once
something answers at the dead task's address, those waits end: TF's
master gets this server's error, and a session that is created or run
fails with it, naming the task, at once. Nothing here pretends to be a
worker: every method of every service fails.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
from absl import logging

__all__ = ["Tombstone"]

# FAILED_PRECONDITION, not UNAVAILABLE or ABORTED: TF's MonitoredSession
# recreates its session on those two ("a preempted worker") and would keep
# retrying against the tombstone.
_CODE = grpc.StatusCode.FAILED_PRECONDITION
_THREADS = 2


class _AnswerEveryCall(grpc.GenericRpcHandler):
    """Fails every unary call (all of TF's worker and master methods) with one message."""

    def __init__(self, message: str):
        self._message = message

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        del handler_call_details

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            del request
            context.abort(_CODE, self._message)
            raise AssertionError("unreachable: abort raises")

        # No (de)serializers: the raw bytes of any method's request.
        return grpc.unary_unary_rpc_method_handler(fail)


class Tombstone:
    """Answers at `address`, every call failing with FAILED_PRECONDITION and `message`.

    Args:
      address: the dead task's `host:port`.
      message: what every call gets; name the task and what happened to it.
    """

    def __init__(self, address: str, message: str):
        self._address = address
        self._server: grpc.Server | None = grpc.server(
            futures.ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="tombstone")
        )
        self._server.add_generic_rpc_handlers([_AnswerEveryCall(message)])
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError:
            # grpcio >= 1.60 raises where older versions returned 0.
            port = 0
        if port == 0:
            self._server = None
            logging.warning(
                "could not listen at %s (another process took the port?): sessions that wait "
                "for the dead task there keep waiting until their operation timeout",
                address,
            )
            return
        self._server.start()

    @property
    def serving(self) -> bool:
        """Whether it listens at its address."""
        return self._server is not None

    def stop(self) -> None:
        """Stops answering (at once; a no-op once stopped)."""
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
