"""Optional OpenTelemetry tracing of the server (``--tracing``, extra ``tracing``).

``server_interceptor()`` is opentelemetry-instrumentation-grpc's: a span per RPC,
continuing the client's trace when its call carries W3C ``traceparent`` metadata.
``annotate`` adds the batch and model attributes to the current RPC's span.
``configure_exporter`` (``worker/tracing.py``, shared with ``latentserve worker``)
installs the OTLP exporter that the standard ``OTEL_*`` variables configure. Tests
install their own provider (the SDK's in-memory exporter) instead.
"""

from __future__ import annotations

from typing import Any

from latentserve.errors import InvalidInput
from latentserve.worker.tracing import MISSING, configure_exporter

try:
    from opentelemetry import trace
except ImportError:  # the optional extra is not installed
    trace = None  # type: ignore[assignment]

__all__ = ["MISSING", "annotate", "configure_exporter", "recording_span", "server_interceptor"]


def server_interceptor() -> Any:
    """The gRPC server interceptor that opens a span per RPC (the global provider)."""
    try:
        from opentelemetry.instrumentation.grpc import server_interceptor as make
    except ImportError:
        raise InvalidInput(MISSING) from None
    return make()


def annotate(attributes: dict[str, Any]) -> None:
    """Set ``attributes`` on the current span (nothing without tracing)."""
    span = recording_span()
    if span is not None:
        span.set_attributes(attributes)


def recording_span() -> Any:
    """The current span if it records (tracing on), else None: callers build attributes
    only when someone keeps them."""
    if trace is None:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None
