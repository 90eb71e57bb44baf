"""OpenTelemetry tracing (the optional ``tracing`` extra), checked with the SDK's
in-memory exporter: a span per RPC with model and batch attributes, and a job's trace
carried through Redis into the worker's chunk spans. Nothing is exported anywhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from fixtures_redis import JOBS_QUEUE
from latentserve.service.client.jobs import JobsClient
from latentserve.service.wire import raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.worker.jobqueue.config import QueueConfig

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.instrumentation.grpc")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

TIMEOUT = 60.0
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans_provider() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process: reuse an SDK one if a test
    # before this module installed it.
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(_EXPORTER)
    provider.add_span_processor(processor)
    yield _EXPORTER
    _EXPORTER.clear()
    processor.shutdown()  # later tests record nothing here


@pytest.fixture
def exporter(spans_provider: InMemorySpanExporter) -> InMemorySpanExporter:
    spans_provider.clear()
    return spans_provider


def test_a_span_per_rpc_with_model_and_batch_attributes(
        start_server: Callable[..., Any], exporter: InMemorySpanExporter,
        mnist_images: np.ndarray) -> None:
    srv = start_server(tracing=True)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        stub.Compress(pb.CompressRequest(model="tiny-ae",
                                         images=[raw_image(im) for im in mnist_images[:3]]),
                      timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError):
            stub.Compress(pb.CompressRequest(model="no-such-model"), timeout=TIMEOUT)
    compress = [s for s in exporter.get_finished_spans()
                if s.name == "/latentserve.v1.Inference/Compress"]
    assert len(compress) == 2
    ok = compress[0]  # spans end in call order
    assert ok.kind is trace.SpanKind.SERVER
    attrs = dict(ok.attributes or {})
    assert attrs["latentserve.model"] == "tiny-ae:1" and attrs["latentserve.op"] == "compress"
    assert attrs["latentserve.items"] == 3
    assert attrs["latentserve.batch.max_size"] == 256
    assert attrs["latentserve.batch.lanes"] == 1
    # The refused call's span carries its code (a client error: not a span ERROR).
    assert [dict(s.attributes or {}).get("rpc.grpc.status_code") for s in compress] == [
        0, grpc.StatusCode.NOT_FOUND.value[0]]


@pytest.mark.queue
def test_a_jobs_trace_reaches_the_workers_chunk_spans(
        start_server: Callable[..., Any], redis_url: str, make_worker: Callable[..., Any],
        exporter: InMemorySpanExporter, mnist_images: np.ndarray) -> None:
    srv = start_server(jobs_redis=redis_url, tracing=True)
    with JobsClient(srv.target, timeout=TIMEOUT) as client:
        job = client.submit_compress("tiny-ae", mnist_images[:40])  # 3 chunks of 16
        make_worker(queue=QueueConfig(**JOBS_QUEUE)).run()
        assert client.get(job.id).items_done == 40
    spans = exporter.get_finished_spans()
    submit = next(s for s in spans if s.name == "/latentserve.v1.Jobs/SubmitJob")
    chunks = [s for s in spans if s.name == "latentserve.chunk"]
    assert sorted(dict(s.attributes or {})["latentserve.chunk"] for s in chunks) == [0, 1, 2]
    for s in chunks:
        assert s.context.trace_id == submit.context.trace_id
        assert s.parent is not None and s.parent.span_id == submit.context.span_id
        assert dict(s.attributes or {})["latentserve.model"] == "tiny-ae"


def test_latentserve_worker_tracing_installs_the_otlp_provider(redis_url: str) -> None:
    """`latentserve worker --tracing` (or LATENTSERVE_TRACING): the standalone worker
    installs the OTLP provider, so its chunk spans leave the process. Checked in a
    subprocess (the global provider is set once per process) that makes no span, so
    nothing is sent anywhere."""
    import os
    import subprocess
    import sys

    from latentserve.worker.config import WorkerConfig

    assert WorkerConfig.from_env({"LATENTSERVE_TRACING": "true"}, redis_url=redis_url).tracing
    assert not WorkerConfig.from_env({}, redis_url=redis_url).tracing
    probe = ("from latentserve.worker.tracing import configure_exporter, enabled\n"
             "from opentelemetry import trace\n"
             "assert not enabled()\n"
             "configure_exporter('latentserve-worker')\n"
             "print(enabled(), trace.get_tracer_provider().resource.attributes['service.name'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items()
                                          if not k.startswith("OTEL_")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "latentserve-worker"]
