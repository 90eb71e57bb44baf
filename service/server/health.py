"""grpc.health.v1 for the server: Check, Watch and List, over every name it serves.

Names with a status: "" (the whole server), each gRPC service, each model as
``NAME:VERSION`` and ``NAME`` (its newest version). grpcio-health-checking's servicer
lacks ``List`` (it answered UNIMPLEMENTED and logged a traceback) and kept an entry per
service name any client ever watched, even names that do not exist; this one answers
List and forgets a watched name when its last watcher leaves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# List answers RESOURCE_EXHAUSTED past this many names (the protocol's advice): a
# repository of thousands of model versions should be probed with Check instead.
LIST_LIMIT = 10_000
# types-grpcio-health-checking predates List: health_pb2 has its messages, the stubs do not.
HealthListResponse: Any = health_pb2.HealthListResponse  # type: ignore[attr-defined]


class HealthServicer(health.HealthServicer):
    """The stock servicer plus ``List``, with watchers of a name dropped as they leave."""

    # The stock servicer's state (its __init__ sets it; the stubs leave it out), which
    # List, clear and the close callback read and change under its lock.
    _lock: threading.RLock
    _server_status: dict[str, int]
    _send_response_callbacks: dict[str, set[Callable[[Any], None]]]
    _gracefully_shutting_down: bool

    def __init__(self) -> None:
        # Non-blocking Watch: a watcher holds no handler thread while it waits.
        super().__init__(experimental_non_blocking=True)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        """HealthListRequest -> HealthListResponse: every name with its status."""
        with self._lock:
            statuses = dict(self._server_status)
        if len(statuses) > LIST_LIMIT:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(statuses)} names have a health status, over List's limit of "
                          f"{LIST_LIMIT}: ask for each with Check")
        return HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in statuses.items()})

    def clear(self, service: str) -> None:
        """Forget ``service``'s status (a model version removed from the repository):
        Check answers NOT_FOUND and List leaves it out, as for a name never served;
        a watcher sees SERVICE_UNKNOWN."""
        with self._lock:
            if self._gracefully_shutting_down or service not in self._server_status:
                return
            del self._server_status[service]
            for send in self._send_response_callbacks.get(service, ()):
                send(health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN))

    def _on_close_callback(self, send_response_callback: Any, service: str) -> Any:
        def callback() -> None:
            with self._lock:
                watchers = self._send_response_callbacks.get(service)
                if watchers is not None:
                    watchers.discard(send_response_callback)
                    if not watchers:  # else every name ever watched would stay
                        del self._send_response_callbacks[service]
            send_response_callback(None)

        return callback
