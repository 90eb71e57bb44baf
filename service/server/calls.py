"""Every RPC's per-call jobs in one wrapper, built once per method.

The server's RPCs all get the same jobs, outermost first: metrics (``metrics``: count,
time, in flight), the request id and the debug log line (``request_log``), the bearer
token check and the caller's identity (``auth``), statuses for exceptions and for
request bytes that do not decode (``errors``), and, for request streams, the idle limit
(``stream_idle``). ``auth`` and ``errors`` keep interceptors of their own for servers
built by hand; chained, such interceptors rebuild a wrapped handler each in grpc's
polling thread for every call and stack their wrappers around each behavior (five did,
before this module). ``CallInterceptor`` does every job with
the same behaviour from one flat wrapper per method, made on the method's first call and
then only looked up: the per-call work (reading the metadata for the request id and the
token) runs in the handler thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc

from latentserve.errors import InvalidInput
from latentserve.service.server.auth import Authenticator, CallerContext
from latentserve.service.server.errors import Undecodable, abort_for, lenient
from latentserve.service.server.metrics import RpcSeries, ServiceMetrics
from latentserve.service.server.request_log import begin_call, end_call
from latentserve.service.server.stream_idle import idle_bounded

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


def _decoded(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Undecodable):
            raise InvalidInput(request.message)
        yield request


class CallInterceptor(grpc.ServerInterceptor):
    """Metrics, request ids and log lines, auth, error statuses and the stream idle limit
    for every RPC, from one wrapped handler per method (see the module's docstring)."""

    def __init__(self, metrics: ServiceMetrics, auth: Authenticator, *,
                 stream_idle_s: float | None = None) -> None:
        self.metrics = metrics
        self.auth = auth
        self.stream_idle_s = stream_idle_s or None
        # method -> (the handler as registered, its wrapped copy); the registered one is
        # compared so a handler registered anew (another servicer) is wrapped anew.
        self._built: dict[str, tuple[Handler, Handler]] = {}
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        built = self._built.get(details.method)
        if built is not None and built[0] is handler:
            return built[1]
        with self._lock:
            built = self._built.get(details.method)
            if built is None or built[0] is not handler:
                built = self._built[details.method] = (handler,
                                                       self._wrap(details.method, handler))
        return built[1]

    def _wrap(self, method: str, handler: Handler) -> Handler:
        behavior: Callable[[Any, grpc.ServicerContext], Any] | None = (
            handler.stream_stream if handler.request_streaming and handler.response_streaming
            else handler.stream_unary if handler.request_streaming
            else handler.unary_stream if handler.response_streaming
            else handler.unary_unary)
        if behavior is None:
            raise TypeError(f"RPC method handler {handler!r} of {method} has no behavior for "
                            f"request_streaming={handler.request_streaming}, "
                            f"response_streaming={handler.response_streaming}")
        call = behavior
        series = RpcSeries(self.metrics, method.lstrip("/"))
        start_call, finish = series.start, series.finish
        decide = self.auth.decide
        # Open methods (health) take no token and get the context as it is.
        checked = method not in self.auth.open_methods
        idle_s = self.stream_idle_s

        def enter(context: grpc.ServicerContext, metadata: Any) -> grpc.ServicerContext:
            """The caller's context for the servicer, or UNAUTHENTICATED (raises)."""
            name, why = decide(method, metadata)
            if why is not None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            return CallerContext(context, name)  # type: ignore[return-value]

        def requests_of(requests: Iterator[Any]) -> Iterator[Any]:
            requests = _decoded(requests)
            return idle_bounded(requests, idle_s) if idle_s else requests

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            start, failed = start_call(), True
            metadata = context.invocation_metadata()
            log_start, token = begin_call(context, metadata)
            try:
                ctx = enter(context, metadata) if checked else context
                reply = None
                try:
                    if isinstance(request, Undecodable):
                        raise InvalidInput(request.message)
                    reply = call(request, ctx)
                except Exception as exc:  # noqa: BLE001 - every error gets a status
                    abort_for(exc, ctx)
                failed = False
                return reply
            finally:
                end_call(method, context, log_start, failed, token)
                finish(context, start, failed)

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, failed = start_call(), True
            metadata = context.invocation_metadata()
            log_start, token = begin_call(context, metadata)
            try:
                ctx = enter(context, metadata) if checked else context
                try:
                    if isinstance(request, Undecodable):
                        raise InvalidInput(request.message)
                    yield from call(request, ctx)
                except Exception as exc:  # noqa: BLE001 - every error gets a status
                    abort_for(exc, ctx)
                failed = False
            finally:
                end_call(method, context, log_start, failed, token)
                finish(context, start, failed)

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            start, failed = start_call(), True
            metadata = context.invocation_metadata()
            log_start, token = begin_call(context, metadata)
            try:
                ctx = enter(context, metadata) if checked else context
                reply = None
                try:
                    reply = call(requests_of(requests), ctx)
                except Exception as exc:  # noqa: BLE001 - every error gets a status
                    abort_for(exc, ctx)
                failed = False
                return reply
            finally:
                end_call(method, context, log_start, failed, token)
                finish(context, start, failed)

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext
                          ) -> Iterator[Any]:
            start, failed = start_call(), True
            metadata = context.invocation_metadata()
            log_start, token = begin_call(context, metadata)
            try:
                ctx = enter(context, metadata) if checked else context
                try:
                    yield from call(requests_of(requests), ctx)
                except Exception as exc:  # noqa: BLE001 - every error gets a status
                    abort_for(exc, ctx)
                failed = False
            finally:
                end_call(method, context, log_start, failed, token)
                finish(context, start, failed)

        make: Any
        wrapped: Callable[[Any, grpc.ServicerContext], Any]
        if handler.request_streaming and handler.response_streaming:
            make, wrapped = grpc.stream_stream_rpc_method_handler, stream_stream
        elif handler.request_streaming:
            make, wrapped = grpc.stream_unary_rpc_method_handler, stream_unary
        elif handler.response_streaming:
            make, wrapped = grpc.unary_stream_rpc_method_handler, unary_stream
        else:
            make, wrapped = grpc.unary_unary_rpc_method_handler, unary_unary
        made: Handler = make(wrapped, request_deserializer=lenient(handler.request_deserializer),
                             response_serializer=handler.response_serializer)
        return made
