"""Where a servicer's exceptions become gRPC statuses, for every RPC of the server.

Every RPC (Inference, ModelControl, Jobs alike) is wrapped, by the server's
``calls.CallInterceptor`` (or ``ErrorInterceptor`` on a server of your own): a servicer
just raises ``latentserve.errors.*`` and the client gets the status of ``service.status``'s
table with the exception's message and a google.rpc.ErrorInfo (its reason, its metadata).
Anything else is a bug: the client gets INTERNAL with the exception's type, the server
log gets the traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from latentserve import errors as E
from latentserve.service.status import INTERNAL_REASON, code_for, rich_status

log = logging.getLogger(__name__)


def supported_format_versions() -> list[int]:
    """The latent-code format versions this build reads."""
    from latentserve.worker.codec.codes import FORMAT_VERSION

    return [FORMAT_VERSION]


# gRPC sends the message percent-encoded in the trailers, and a client drops trailers over
# 8 KiB (at random between its soft and hard limits) for a RESOURCE_EXHAUSTED of its own:
# messages that quote a client's value (a model name, a job id) are cut to fit.
MAX_MESSAGE_BYTES = 2048


def _wire_size(text: str) -> int:
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text.encode())


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message``, its middle cut if its encoded form is over ``limit`` bytes."""
    if _wire_size(message) <= limit:
        return message
    budget = (limit - 40) // 2
    head = tail = 0
    size = 0
    while size + _wire_size(message[head]) <= budget:
        size += _wire_size(message[head])
        head += 1
    size = 0
    while size + _wire_size(message[-1 - tail]) <= budget:
        size += _wire_size(message[-1 - tail])
        tail += 1
    cut = len(message) - head - tail
    return f"{message[:head]}...({cut} characters cut)...{message[len(message) - tail:]}"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    code = code_for(exc)
    if code is None:
        return grpc.StatusCode.INTERNAL, (
            f"internal error ({type(exc).__name__}); the server log has the details")
    message = str(exc) or type(exc).__name__
    if isinstance(exc, E.UnknownFormatVersion) and not re.search(
            r"reads? version|supports? version", message):
        message += f" (this server reads code format versions: {_versions()})"
    return code, bounded(message)


def details_for(exc: BaseException) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata a client gets for ``exc``."""
    if code_for(exc) is None:
        return INTERNAL_REASON, {}
    assert isinstance(exc, E.LatentServeError)  # every STATUS_OF class is one
    metadata = {k: bounded(v, 256) for k, v in getattr(exc, "metadata", {}).items()}
    if isinstance(exc, E.UnknownFormatVersion):
        metadata.setdefault("supported", _versions())
    return exc.reason, metadata


def _versions() -> str:
    return ", ".join(map(str, supported_format_versions()))


def abort_for(exc: BaseException, context: grpc.ServicerContext) -> None:
    """Abort the RPC with the status of ``exc`` (re-raises if the servicer aborted it)."""
    from latentserve.service.server.request_log import (
        with_request_id,  # request_log builds on this module
    )

    # ServicerContext.code() exists at runtime (grpcio >= 1.38) but the grpc stubs omit it.
    if context.code() is not None:  # type: ignore[attr-defined]
        raise exc  # context.abort's own exception: gRPC ends the call quietly
    code, message = status_for(exc)
    message = with_request_id(message)
    reason, metadata = details_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in an RPC", exc_info=exc)
    if not context.is_active():
        # The client left (cancelled, deadline, connection gone) before the error: there
        # is nobody to tell. Aborting still marks the call ended, where re-raising made
        # gRPC log "Exception calling application" with a traceback for a handled case.
        log.debug("client gone before its %s: %s", code.name, message)
        context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the call")
    # set_code first: wrappers of the context (OpenTelemetry's) record the code there and
    # do not look inside abort_with_status.
    context.set_code(code)
    context.abort_with_status(rich_status(code, message, reason, metadata,
                                          trailing=tuple(context.trailing_metadata() or ())))


Behavior = Callable[[Any, grpc.ServicerContext], Any]


def rewrap_handler(handler: grpc.RpcMethodHandler[Any, Any],
                   around: Callable[[Behavior, bool], Behavior], *,
                   request_deserializer: Callable[[bytes], Any] | None = None,
                   ) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of ``handler`` whose behavior is ``around(behavior, response_streaming)``
    (and whose request deserializer is ``request_deserializer``, when given)."""
    behavior: Behavior | None
    if handler.request_streaming and handler.response_streaming:
        make, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        make, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        make, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        make, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    if behavior is None:
        # The streaming flags pick a behavior the handler lacks: gRPC could not call it
        # either, so say which instead of wrapping None.
        raise TypeError(f"RPC method handler {handler!r} has no behavior for "
                        f"request_streaming={handler.request_streaming}, "
                        f"response_streaming={handler.response_streaming}")
    return make(around(behavior, handler.response_streaming),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


def map_errors(behavior: Behavior, response_streaming: bool) -> Behavior:
    """Wrap one RPC behavior so raised exceptions become statuses (see ``status_for``)."""
    if response_streaming:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - every error gets a status
                abort_for(exc, context)
        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:  # noqa: BLE001 - every error gets a status
            abort_for(exc, context)
    return unary


class Undecodable:
    """What request bytes that are not a message of the method's request type decode to."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize`` returning an ``Undecodable`` instead of raising: gRPC itself would
    answer INTERNAL ("Exception deserializing request!") and log a traceback per bad
    request; ``refuse_undecodable`` answers INVALID_ARGUMENT naming the expected type."""
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "request")

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or any parser's
            return Undecodable(f"the request bytes are not a valid {name} message ({exc}); "
                               "send that message serialized by protobuf (proto/latentserve/v1)")
    return decode


def refuse_undecodable(request_streaming: bool) -> Callable[[Behavior, bool], Behavior]:
    """Raise InvalidInput where the behavior would get an ``Undecodable`` request."""
    def around(behavior: Behavior, response_streaming: bool) -> Behavior:
        if request_streaming:
            def checked(requests: Any, context: grpc.ServicerContext) -> Any:
                return behavior(_decoded(requests), context)
            return checked

        def check(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                raise E.InvalidInput(request.message)
            return behavior(request, context)
        return check
    return around


def _decoded(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Undecodable):
            raise E.InvalidInput(request.message)
        yield request


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to statuses for every RPC the server has, whoever wrote it; request
    bytes that do not decode get INVALID_ARGUMENT too."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        checked = rewrap_handler(handler, refuse_undecodable(handler.request_streaming))
        return rewrap_handler(checked, map_errors,
                              request_deserializer=lenient(handler.request_deserializer))
