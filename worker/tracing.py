"""Optional OpenTelemetry spans for job chunks, parented by the job's W3C ``traceparent``.

SubmitJob stores the ``traceparent`` of its RPC span in the job's hash
(``JobStore.create(traceparent=...)``); a worker computing a chunk of that job opens a
``latentserve.chunk`` span with that parent, so one trace runs from the client's call
to every chunk. Everything here is a no-op when the ``tracing`` extra is not installed
or no tracer provider was configured (``opentelemetry.trace.set_tracer_provider``): no
Redis read, no span object.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

try:
    from opentelemetry import propagate, trace
except ImportError:  # the optional extra is not installed
    trace = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]

from latentserve.errors import InvalidInput

TRACER_NAME = "latentserve"
MISSING = ("--tracing needs the tracing extra: pip install 'latentserve[tracing]' "
           "(opentelemetry-sdk, -instrumentation-grpc, -exporter-otlp-proto-grpc)")


def configure_exporter(service_name: str = "latentserve") -> None:
    """Install a tracer provider exporting over OTLP, configured by ``OTEL_*`` env vars
    (endpoint, headers, sampler; ``service_name`` unless OTEL_SERVICE_NAME says)."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise InvalidInput(MISSING) from None
    assert trace is not None
    # Resource.create() reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, but an
    # attribute passed here would win over them: name the service only when they do not.
    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create(
        {} if named else {"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


class _Store(Protocol):
    def traceparent(self, job_id: str) -> str: ...


def enabled() -> bool:
    """Whether a real tracer provider is installed (else spans cost nothing)."""
    return trace is not None and not isinstance(trace.get_tracer_provider(),
                                                trace.ProxyTracerProvider)


def current_traceparent() -> str:
    """The W3C ``traceparent`` of this thread's current span ("" when none)."""
    if not enabled():
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@contextlib.contextmanager
def chunk_spans(store: _Store, held: Sequence[Any], *, model: str, op: str) -> Iterator[None]:
    """One span per chunk of ``held`` (objects with ``job_id``, ``chunk``, ``n``) around
    the computation of their merged batch; each span's parent is its job's traceparent."""
    if not enabled() or not held:
        yield
        return
    tracer = trace.get_tracer(TRACER_NAME)
    spans = []
    for h in {id(h): h for h in held}.values():
        parent = propagate.extract({"traceparent": store.traceparent(h.job_id)})
        spans.append(tracer.start_span(
            "latentserve.chunk", context=parent, kind=trace.SpanKind.CONSUMER,
            attributes={"latentserve.job": h.job_id, "latentserve.chunk": h.chunk,
                        "latentserve.items": h.n, "latentserve.model": model,
                        "latentserve.op": op, "latentserve.batch.chunks": len(held)}))
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:200]))
        raise
    finally:
        for span in spans:
            span.end()
