"""Prometheus metrics of the service, in their own registry, served over HTTP.

Names (all prefixed ``latentserve_``):

- ``rpc_requests_total{rpc, code}``, ``rpc_latency_seconds{rpc}``, ``rpc_in_flight{rpc}``
- ``queue_wait_seconds{model, op}`` (enqueue to batch start) vs
  ``batch_compute_seconds{model, op}`` (one merged batch through onnxruntime + coder)
- ``batch_size_images{model, op}``, ``images_total{model, op}`` (rate() = images/s),
  ``queued_images{model, op}``, ``dropped_images_total{model, op, reason}``
- ``models_loaded``, ``model_provider_info{model, provider}`` (1 per loaded model)

What counts what: ``images_total`` and the batch metrics above cover the unary and
streaming Inference RPCs only (Compress / Reconstruct / Sample), never job work. Jobs
are counted where they run, by ``latentserve_worker_*`` (``worker/metrics.py``:
``items_total{model, op}``, ``chunks_total``, ``chunk_seconds``, retries, reclaims,
dead letters): on each ``latentserve worker --metrics-port``, and here too for the
worker the server runs in process (``--embedded-worker``). With the Jobs API on, this
registry also carries the queue gauges ``latentserve_queue_*`` (``worker/jobqueue/stats.py``:
stream length, lag, pending, oldest pending age, dead letters per pool). So the
service's whole output is ``images_total`` (unary) + the workers' ``items_total`` (jobs).
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from latentserve.metrics_http import MetricsHTTP, serve_metrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                   5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServiceMetrics:
    """The service's metric families, registered in a private registry (one per server)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "latentserve_"
        self.requests = Counter(p + "rpc_requests", "RPCs finished, by method and status code",
                                ["rpc", "code"], registry=r)
        self.latency = Histogram(p + "rpc_latency_seconds", "RPC wall time in the server",
                                 ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(p + "rpc_in_flight", "RPCs being served now", ["rpc"], registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds",
                                    "time an image waited in the batching queue",
                                    ["model", "op"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram(p + "batch_compute_seconds",
                                 "time one merged batch spent in onnxruntime + the coder",
                                 ["model", "op"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(p + "batch_size_images", "images per merged batch",
                                    ["model", "op"], buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter(p + "images", "images processed (rate() gives images/s)",
                              ["model", "op"], registry=r)
        self.queued = Gauge(p + "queued_images", "images waiting for a batch",
                            ["model", "op"], registry=r)
        self.dropped = Counter(p + "dropped_images",
                               "queued images dropped before computing (cancelled, deadline)",
                               ["model", "op", "reason"], registry=r)
        self.models_loaded = Gauge(p + "models_loaded", "models with loaded sessions",
                                   registry=r)
        self.provider = Gauge(p + "model_provider_info",
                              "1 for the execution provider running each loaded model",
                              ["model", "provider"], registry=r)

    # -- hooks used by the batcher ------------------------------------------------------
    def observe_batch(self, model: str, op: str, size: int, seconds: float, *,
                      count_images: bool = True) -> None:
        self.batch_size.labels(model, op).observe(size)
        self.compute.labels(model, op).observe(seconds)
        if count_images:
            self.images.labels(model, op).inc(size)

    def observe_wait(self, model: str, op: str, seconds: float, count: int) -> None:
        hist = self.queue_wait.labels(model, op)
        for _ in range(min(count, 64)):  # per image, capped: a huge request is one wait
            hist.observe(seconds)

    def set_queued(self, model: str, op: str, images: int) -> None:
        self.queued.labels(model, op).set(images)

    def observe_dropped(self, model: str, op: str, reason: str, images: int) -> None:
        self.dropped.labels(model, op, reason).inc(images)

    def model_loaded(self, model: str, provider: str) -> None:
        self.provider.labels(model, provider).set(1)
        self.models_loaded.set(len({s.labels["model"] for s in self._provider_samples()}))

    def _provider_samples(self) -> list[Any]:
        return [s for m in self.provider.collect() for s in m.samples if s.value == 1]

    # -- HTTP -----------------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> MetricsHTTP:
        """Start ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread."""
        return serve_metrics(self.registry, host, port)


def _final_code(context: grpc.ServicerContext, failed: bool) -> str:
    # grpcio's server context has code() (None until the handler sets one); types-grpcio
    # leaves it out of ServicerContext.
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    if code is not None:
        return code.name
    if not context.is_active() and failed:
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name if failed else grpc.StatusCode.OK.name


class RpcSeries:
    """One method's series, each child looked up once (on first use, as ``labels`` would
    create it then): ``labels()`` takes a lock and builds its key on every call."""

    __slots__ = ("metrics", "rpc", "in_flight", "latency", "requests")

    def __init__(self, metrics: ServiceMetrics, rpc: str) -> None:
        self.metrics, self.rpc = metrics, rpc
        self.in_flight: Any = None
        self.latency: Any = None
        self.requests: dict[str, Any] = {}

    def start(self) -> float:
        gauge = self.in_flight
        if gauge is None:
            gauge = self.in_flight = self.metrics.in_flight.labels(self.rpc)
        gauge.inc()
        return time.perf_counter()

    def finish(self, context: grpc.ServicerContext, start: float, failed: bool) -> None:
        self.in_flight.dec()
        latency = self.latency
        if latency is None:
            latency = self.latency = self.metrics.latency.labels(self.rpc)
        latency.observe(time.perf_counter() - start)
        code = _final_code(context, failed)
        counter = self.requests.get(code)
        if counter is None:
            counter = self.requests[code] = self.metrics.requests.labels(self.rpc, code)
        counter.inc()


class BatchMetrics:
    """A batcher's observer (see batching.BatchObserver) feeding one (model, op) series."""

    def __init__(self, metrics: ServiceMetrics, model: str, op: str, *,
                 count_images: bool = True) -> None:
        # count_images False: the batch function counts the images it really made
        # (a reconstruct batch can hold refused codes).
        self.metrics, self.model, self.op = metrics, model, op
        self.count_images = count_images
        # The (model, op) children, each looked up on first use (when labels() would
        # have created it), then kept: labels() costs a lock and a key per call.
        self._batch: tuple[Any, Any, Any] | None = None
        self._wait: Any = None
        self._queued: Any = None

    def on_batch(self, size: int, seconds: float) -> None:
        children = self._batch
        if children is None:
            m, key = self.metrics, (self.model, self.op)
            children = self._batch = (m.batch_size.labels(*key), m.compute.labels(*key),
                                      m.images.labels(*key) if self.count_images else None)
        children[0].observe(size)
        children[1].observe(seconds)
        if children[2] is not None:
            children[2].inc(size)

    def on_wait(self, seconds: float, count: int) -> None:
        hist = self._wait
        if hist is None:
            hist = self._wait = self.metrics.queue_wait.labels(self.model, self.op)
        for _ in range(min(count, 64)):  # per image, capped: a huge request is one wait
            hist.observe(seconds)

    def on_queued(self, count: int) -> None:
        gauge = self._queued
        if gauge is None:
            gauge = self._queued = self.metrics.queued.labels(self.model, self.op)
        gauge.set(count)

    def on_dropped(self, reason: str, count: int) -> None:
        self.metrics.observe_dropped(self.model, self.op, reason, count)
