"""The one channel factory of every client: TLS, the bearer token, message limits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc

from latentserve.service.addresses import is_loopback_target
from latentserve.service.client.settings import ClientSecurity
from latentserve.service.tls import channel_credentials

log = logging.getLogger(__name__)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call.

    An interceptor rather than call credentials, because gRPC only attaches call
    credentials to TLS channels and a token on a loopback plaintext channel is legitimate.
    """

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._entry]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(target: str, security: ClientSecurity | None = None, *,
                 max_message_bytes: int,
                 extra_options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``target`` with ``security``'s TLS and token, sending and receiving
    messages up to ``max_message_bytes``; ``extra_options``: more gRPC channel arguments."""
    security = security or ClientSecurity()
    opts: list[tuple[str, Any]] = [("grpc.max_send_message_length", max_message_bytes),
                                   ("grpc.max_receive_message_length", max_message_bytes),
                                   *extra_options]
    if security.tls:
        if security.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", security.tls_server_name))
        creds = channel_credentials(security.tls_ca, security.tls_cert, security.tls_key)
        channel = grpc.secure_channel(target, creds, options=opts)
    else:
        if security.token and not is_loopback_target(target):
            log.warning("sending a bearer token to %s without TLS: anyone on the path can "
                        "read it (pass --tls-ca)", target)
        channel = grpc.insecure_channel(target, options=opts)
    if security.token:
        channel = grpc.intercept_channel(channel, _BearerToken(security.token))
    return channel
