"""Prometheus metrics of a job worker, in a registry of their own (or the service's).

``latentserve worker --metrics-port N`` serves them on ``/metrics`` with the queue gauges
of its pools (``jobqueue.stats.QueueCollector``); the service's embedded worker reports
into the service's registry instead. Names (all prefixed ``latentserve_worker_``):

- ``chunks_total{model, op}``, ``items_total{model, op}``: chunks and items stored
  (rate() = items/s); ``chunk_seconds{model, op}``: from taking a chunk to storing it
- ``retries_total``: chunks taken again after an earlier delivery (it failed, or its
  worker died or hung); ``reclaims_total{reason}``: entries taken over from a dead
  consumer (``dead``: no health key) or after ``claim_idle_s`` (``idle``)
- ``dead_letters_total``, ``released_total`` (given back on shutdown), ``skipped_total``
  (chunks of cancelled, failed or expired jobs), ``chunks_in_flight``
- ``model_load_seconds{model}`` (preload), ``provider_info{model, provider}`` (1 per model)

``model`` is the ``name:version`` of a model in the repository, resolved from what the
job named (``mnist-vqvae`` counts as ``mnist-vqvae:1``), never the job's own text; ``op``
is the job kind. At most ``MAX_MODEL_LABELS`` model values exist; more read ``other``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from latentserve.metrics_http import MetricsHTTP, serve_metrics
from latentserve.worker.jobqueue.records import ChunkTask, JobKind

PREFIX = "latentserve_worker_"
MAX_MODEL_LABELS = 64
CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                 300.0, 600.0)


class WorkerMetrics:
    """A worker's metric families; the worker calls the hooks, ``watch`` binds its stats."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, PREFIX
        self.chunks = Counter(p + "chunks", "chunks stored, by model and op",
                              ["model", "op"], registry=r)
        self.items = Counter(p + "items", "items stored (rate() gives items/s)",
                             ["model", "op"], registry=r)
        self.chunk_seconds = Histogram(p + "chunk_seconds",
                                       "time from taking a chunk to storing its results",
                                       ["model", "op"], buckets=CHUNK_BUCKETS, registry=r)
        self.reclaims = Counter(p + "reclaims",
                                "entries taken over from a dead consumer or after claim_idle_s",
                                ["reason"], registry=r)
        self.model_load = Gauge(p + "model_load_seconds", "time the worker took to load a model",
                                ["model"], registry=r)
        self.provider = Gauge(p + "provider_info",
                              "1 for the execution provider running each loaded model",
                              ["model", "provider"], registry=r)
        self.port: int | None = None  # the HTTP endpoint's, once served
        self._lock = threading.Lock()
        self._models: set[str] = set()
        self._taken: dict[str, float] = {}  # entry id -> monotonic time it was taken

    def watch(self, stats: Any, in_flight: Callable[[], int]) -> None:
        """Export a worker's ``WorkerStats`` counts and its held chunks, read at scrape time."""
        self.registry.register(_StatsCollector(stats, in_flight))

    # -- hooks ------------------------------------------------------------------------
    def taken(self, entry_id: str) -> None:
        self._taken.setdefault(entry_id, time.monotonic())

    def forget(self, entry_id: str) -> None:
        self._taken.pop(entry_id, None)

    def stored(self, entry_id: str, task: ChunkTask, items: int, pipeline: Any,
               inputs: Any = None) -> None:
        """A chunk's results are stored: count it under the model that made them."""
        start = self._taken.pop(entry_id, None)
        model, op = self.model_label(pipeline, task, inputs), task.kind.value
        self.chunks.labels(model, op).inc()
        self.items.labels(model, op).inc(items)
        if start is not None:
            self.chunk_seconds.labels(model, op).observe(time.monotonic() - start)

    def reclaimed(self, reason: str, entries: int) -> None:
        self.reclaims.labels(reason).inc(entries)

    def model_loaded(self, runtime: Any, seconds: float) -> None:
        ref = self._bounded(str(runtime.manifest.ref))
        self.model_load.labels(ref).set(seconds)
        self.provider.labels(ref, str(runtime.provider)).set(1)

    # -- labels -----------------------------------------------------------------------
    def model_label(self, pipeline: Any, task: ChunkTask, inputs: Any = None) -> str:
        """The repository's ``name:version`` for the chunk's model, or ``unknown``.

        The chunk has just been computed, so its model resolves; a reconstruct job that
        named no model counts under the model of its chunk's first code.
        """
        try:
            if task.model:
                runtime = pipeline.runtime(task.model)
                ref = str(runtime.manifest.ref)
                self.provider.labels(self._bounded(ref), str(runtime.provider)).set(1)
            elif task.kind is JobKind.RECONSTRUCT and inputs is not None and len(inputs):
                ref = str(pipeline.identify(inputs[0]).manifest.ref)
            else:
                return "unknown"
        except Exception:  # noqa: BLE001 - a label must never fail a stored chunk
            return "unknown"
        return self._bounded(ref)

    def _bounded(self, ref: str) -> str:
        with self._lock:
            if ref in self._models:
                return ref
            if len(self._models) >= MAX_MODEL_LABELS:
                return "other"
            self._models.add(ref)
            return ref

    # -- HTTP -------------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> MetricsHTTP:
        """Start ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread."""
        server = serve_metrics(self.registry, host, port)
        self.port = server.port
        return server


class _StatsCollector:
    """The counts a worker already keeps (``WorkerStats``), so its failure paths need no
    hook of their own."""

    COUNTERS = (("retries", "chunks taken again after an earlier delivery", "retried"),
                ("dead_letters", "chunks this worker moved to the dead-letter stream",
                 "dead_lettered"),
                ("released", "chunks given back to the queue on shutdown", "released"),
                ("skipped", "chunks of cancelled, failed or expired jobs skipped", "skipped"))

    def __init__(self, stats: Any, in_flight: Callable[[], int]) -> None:
        self.stats = stats
        self.in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        for name, text, attr in self.COUNTERS:
            yield CounterMetricFamily(PREFIX + name, text, value=getattr(self.stats, attr))
        yield GaugeMetricFamily(PREFIX + "chunks_in_flight",
                                "chunks this worker holds (read, not yet stored)",
                                value=self.in_flight())
