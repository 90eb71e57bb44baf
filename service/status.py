"""One table from latentserve exceptions to gRPC statuses, read both ways.

The server (``server.errors``) turns a raised exception into its status code, its message
and a google.rpc.Status whose details carry an ``ErrorInfo`` (domain ``latentserve.v1``,
the exception's ``reason``, its ``metadata``) and, where it applies, a ``BadRequest`` or a
``ResourceInfo`` (proto/latentserve/v1/errors.proto documents each reason). The clients
read the same table backwards: the reason picks the exception class to raise, and with
no details (another server, a proxy's own refusal) the status code picks the classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message as ProtoMessage
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from latentserve import errors as E

DOMAIN = "latentserve.v1"


class RequestCancelled(E.LatentServeError):
    """The client cancelled; its queued work was dropped."""

    reason = "REQUEST_CANCELLED"


class DeadlineExpired(E.LatentServeError):
    """The request's deadline passed before its work ran; the work was dropped."""

    reason = "DEADLINE_EXPIRED"


# Most specific first: the first isinstance match wins.
STATUS_OF: tuple[tuple[type[E.LatentServeError], grpc.StatusCode], ...] = (
    (E.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (E.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (E.JobNotFound, grpc.StatusCode.NOT_FOUND),
    (E.CodeMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (E.NotExactlyDecodable, grpc.StatusCode.FAILED_PRECONDITION),
    (E.JobStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (E.UnsupportedOperation, grpc.StatusCode.FAILED_PRECONDITION),
    (E.CorruptCode, grpc.StatusCode.DATA_LOSS),
    (E.UnknownFormatVersion, grpc.StatusCode.DATA_LOSS),
    (E.CodeError, grpc.StatusCode.DATA_LOSS),
    (E.ResourceLimit, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (E.ProviderUnavailable, grpc.StatusCode.UNAVAILABLE),
    # A model whose files fail their digests cannot be served by this server.
    (E.ModelIntegrityError, grpc.StatusCode.FAILED_PRECONDITION),
    (E.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
)
INTERNAL_REASON = "INTERNAL_ERROR"
REASONS: dict[str, type[E.LatentServeError]] = {kind.reason: kind for kind, _ in STATUS_OF}
# Where a reason's metadata names a resource, ResourceInfo says which (type, metadata key).
RESOURCES = {"MODEL_NOT_FOUND": ("model", "model"), "JOB_NOT_FOUND": ("job", "job")}


def code_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of ``exc``; None for an exception that is not a refusal (a bug)."""
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


def exceptions_for(code: grpc.StatusCode) -> tuple[type[E.LatentServeError], ...]:
    """STATUS_OF read backwards: the ``latentserve.errors`` exceptions a server answers
    with ``code``, most specific first (a client without details raises a type of all of
    them, so a remote NOT_FOUND is catchable as ModelNotFound or JobNotFound)."""
    return tuple(kind for kind, c in STATUS_OF
                 if c == code and kind.__module__ == E.__name__)


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, Any], ...]


class Status(_Status, grpc.Status):
    """A grpc.Status (what ``context.abort_with_status`` takes)."""


def rich_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str],
                *, trailing: Sequence[tuple[str, Any]] = ()) -> Status:
    """The grpc.Status to abort with: ``code`` and ``message`` as before, the details in
    the ``grpc-status-details-bin`` trailer, after ``trailing`` (aborting with a status
    replaces the call's trailers, so the ones already set must be passed on)."""
    # Message, not ErrorInfo: BadRequest and ResourceInfo may follow.
    details: list[ProtoMessage] = [
        error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)]
    if reason == E.InvalidInput.reason and "field" in metadata:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=metadata["field"],
                                                        description=message)]))
    if reason in RESOURCES and RESOURCES[reason][1] in metadata:
        kind, key = RESOURCES[reason]
        details.append(error_details_pb2.ResourceInfo(
            resource_type=kind, resource_name=metadata[key], description=message))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    base = rpc_status.to_status(status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=packed))
    return Status(base.code, base.details, (*trailing, *base.trailing_metadata))


def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The latentserve ErrorInfo of a failed call, or None (no details, another domain)."""
    if not callable(getattr(exc, "trailing_metadata", None)):
        return None  # not a call's error (a client-side failure, a test double)
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # details that contradict the status code or message
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None
