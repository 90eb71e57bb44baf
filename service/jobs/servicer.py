"""The ``latentserve.v1.Jobs`` servicer, and the extension that adds it to the server.

SubmitJob cuts the streamed inputs into chunks of ``chunk_size`` items and queues each
as soon as it is full (workers start before the upload ends); the job is sealed, and
thereby accepted, when the stream ends. Limits: at most ``max_queued_chunks`` chunks
waiting or running per pool (beyond it RESOURCE_EXHAUSTED, naming the depth) and at
most ``max_job_items`` items per job. The servicer raises ``latentserve.errors``
exceptions only; the server's ``calls.CallInterceptor`` maps them to status codes
(``errors.abort_for``).

Under OnItemError PER_ITEM (the default) an input refused on arrival becomes an item
error in its chunk, and FetchResults returns item errors in their slots (``job_items``).
Each message of an upload keeps its job alive; one silent for ``receiving_timeout_s``
is failed, here by ``job_sweeper`` as by the workers.

WatchJob and FetchResults wait for the job, each holding a handler thread meanwhile:
``stream_slots.StreamSlots`` bounds how many may be open (RESOURCE_EXHAUSTED beyond),
and each ends within one wait (0.5 s) of its client going away, moving job or not.

``add_jobs(ctx, settings)`` is how ``create_server`` adds the job API when
``ServiceConfig.jobs`` names a queue: it connects to Redis (or starts the embedded
Valkey), registers the servicer and, with the embedded Valkey, runs a worker in process
so one command serves jobs end to end.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np

from latentserve.errors import InvalidInput, JobStateError, ResourceLimit, Unavailable
from latentserve.service.jobs.items import POLICY_PB, chunk_payload, policy_of, with_item_errors
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.jobs.stream_slots import StreamSlots, client_gone, default_stream_limit
from latentserve.service.server.auth import caller
from latentserve.service.wire import decode_request_image, raw_image
from latentserve.v1 import inference_pb2 as ipb
from latentserve.v1 import jobs_pb2 as pb
from latentserve.v1 import jobs_pb2_grpc as pb_grpc
from latentserve.worker.jobqueue.cluster import TRANSIENT_ERRORS
from latentserve.worker.jobqueue.records import ITEM_ERRORS, ItemFailure, OnItemError
from latentserve.worker.jobqueue.store import (
    ImageFormat,
    JobInfo,
    JobKind,
    JobState,
    JobStore,
    job_not_found,
)
from latentserve.worker.runtime.engine import unsupported
from latentserve.worker.runtime.pipeline import check_temperature
from latentserve.worker.tracing import current_traceparent

log = logging.getLogger(__name__)
SERVICE_NAME = "latentserve.v1.Jobs"

KINDS = {pb.JOB_KIND_COMPRESS: JobKind.COMPRESS, pb.JOB_KIND_RECONSTRUCT: JobKind.RECONSTRUCT,
         pb.JOB_KIND_SAMPLE: JobKind.SAMPLE}
KIND_PB = {v: k for k, v in KINDS.items()}
STATE_PB = {JobState.RECEIVING: pb.JOB_STATE_RECEIVING, JobState.QUEUED: pb.JOB_STATE_QUEUED,
            JobState.RUNNING: pb.JOB_STATE_RUNNING, JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
            JobState.FAILED: pb.JOB_STATE_FAILED, JobState.CANCELLED: pb.JOB_STATE_CANCELLED}
STATES = {v: k for k, v in STATE_PB.items()}
FORMAT_PB = {ImageFormat.PNG: ipb.IMAGE_FORMAT_PNG, ImageFormat.RAW: ipb.IMAGE_FORMAT_RAW}


def job_message(info: JobInfo) -> pb.Job:
    """A JobInfo snapshot as the API's Job message."""
    return pb.Job(
        id=info.id, kind=KIND_PB[info.kind], model=info.model, state=STATE_PB[info.state],
        items_total=info.items_total if info.sealed else 0, items_done=info.items_done,
        chunks_total=info.chunks_total if info.sealed else 0, chunks_done=info.chunks_done,
        chunk_size=info.chunk_size, items_per_second=info.items_per_s(), error=info.error,
        created_time=info.created, started_time=info.started, finished_time=info.finished,
        seed=info.seed if info.kind is JobKind.SAMPLE else 0,
        temperature=info.temperature if info.kind is JobKind.SAMPLE else 0.0,
        format=FORMAT_PB[info.image_format], pool=info.pool, owner=info.owner,
        items_failed=info.items_failed, on_item_error=POLICY_PB[info.on_item_error])


def redis_unavailable(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a Redis outage inside an RPC into ``Unavailable`` (gRPC UNAVAILABLE)."""
    def reraise(exc: BaseException) -> NoReturn:  # TRANSIENT_ERRORS holds BaseException types
        raise Unavailable(f"the job queue's Redis cannot be reached ({exc}); retry later") \
            from exc

    if getattr(method, "_streams", False):
        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except TRANSIENT_ERRORS as exc:
                reraise(exc)
        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except TRANSIENT_ERRORS as exc:
            reraise(exc)
    return unary


def streams(method: Callable[..., Any]) -> Callable[..., Any]:
    method._streams = True  # type: ignore[attr-defined]
    return method


@dataclass(frozen=True)
class JobLimits:
    """Per-message limits, taken from the server's ServiceConfig."""

    max_items_per_message: int = 4096
    max_pixels_per_image: int = 25_000_000
    max_message_bytes: int = 64 << 20


class JobsServicer(pb_grpc.JobsServicer):
    """SubmitJob, GetJob, ListJobs, WatchJob, CancelJob, FetchResults over a JobStore."""

    def __init__(self, store: JobStore, pipeline: Any, limits: JobLimits = JobLimits(),
                 slots: StreamSlots | None = None) -> None:
        self.store = store
        self.pipeline = pipeline
        self.limits = limits
        self.queue = store.config
        # The default fits the server's default 64 handler threads.
        self.slots = slots or StreamSlots(default_stream_limit(64))

    # -- SubmitJob ----------------------------------------------------------------------
    @redis_unavailable
    def SubmitJob(self, request_iterator: Iterator[pb.SubmitJobRequest],
                  context: grpc.ServicerContext) -> pb.Job:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "spec":
            raise InvalidInput("the first SubmitJob message must carry the JobSpec "
                               "(kind, model, ...); inputs follow in later messages")
        spec = first.spec
        kind = KINDS.get(spec.kind)
        if kind is None:
            raise InvalidInput(f"JobSpec.kind {spec.kind} is not one of COMPRESS (1), "
                               "RECONSTRUCT (2), SAMPLE (3)")
        fmt = self._format(spec.format)
        policy = policy_of(spec)
        model = self._model(spec.model, kind)
        if spec.chunk_size > self.queue.max_job_items:
            raise InvalidInput(f"chunk_size {spec.chunk_size} is over the maximum job size "
                               f"{self.queue.max_job_items}")
        chunk_size = spec.chunk_size or None
        if kind is JobKind.SAMPLE:
            manifest = self.pipeline.repository.resolve(model).manifest
            if "sample" not in manifest.operations:
                raise unsupported(manifest, "sample")
            # Refused now, not by a worker later: the same (0, 1000] as the Sample RPC.
            temperature = check_temperature(
                spec.temperature if spec.HasField("temperature") else 1.0)
            if spec.seed >= 2**63:
                raise InvalidInput(f"seed {spec.seed} must be below 2**63")
            if next(request_iterator, None) is not None:
                raise InvalidInput("a sample job takes no inputs: send the JobSpec only")
            info = self.store.submit(kind, model, count=spec.count, chunk_size=chunk_size,
                                     seed=spec.seed, temperature=temperature,
                                     image_format=fmt, owner=caller(context),
                                     traceparent=current_traceparent())
            return job_message(info)
        if spec.expected_items:
            self.store.check_size(spec.expected_items)
        pool = self.queue.pool_for(model)
        depth = self.store.depth(pool)
        if depth >= self.queue.max_queued_chunks:
            raise ResourceLimit(f"the queue of pool {pool!r} holds {depth} chunks, its limit "
                                f"is {self.queue.max_queued_chunks}: retry later",
                                limit="max_queued_chunks")
        job = self.store.create(kind, model, chunk_size=chunk_size, image_format=fmt,
                                owner=caller(context), on_item_error=policy,
                                traceparent=current_traceparent())
        try:
            total, chunks = self._receive(job, kind, spec, request_iterator, context)
            if total == 0:
                raise InvalidInput(f"the {kind.value} job received no inputs: send "
                                   f"JobItems.{'images' if kind is JobKind.COMPRESS else 'codes'}"
                                   " after the JobSpec")
            if spec.expected_items and total != spec.expected_items:
                # grpc's sync server ends the request iterator as for a finished upload
                # when a receive ends before the client's cancel is seen: a client that
                # died mid-upload must not leave a job it never got the id of.
                raise InvalidInput(f"the job announced {spec.expected_items} items "
                                   f"(JobSpec.expected_items) and {total} arrived: "
                                   "nothing was queued, submit it again")
            return job_message(self.store.seal(job, total, chunks))
        except JobStateError:
            info = self.store.get(job.id)
            if not info.state.terminal:
                self.store.delete(job.id)
                raise
            # A worker failed a chunk for good (or the job was cancelled) while inputs were
            # still arriving: the job is over, and the client gets it like any ended job,
            # its error saying why (not FAILED_PRECONDITION naming an id it never saw).
            return job_message(info)
        except BaseException:
            # Never accepted (the client gets no id): leave nothing behind.
            self.store.delete(job.id)
            raise

    def _receive(self, job: JobInfo, kind: JobKind, spec: pb.JobSpec,
                 requests: Iterator[pb.SubmitJobRequest],
                 context: grpc.ServicerContext) -> tuple[int, int]:
        """Read, check and queue the inputs; returns (items, chunks)."""
        shape = (self.pipeline.repository.resolve(job.model).manifest.image_shape
                 if kind is JobKind.COMPRESS else None)
        pending: list[Any] = []
        total = chunks = 0
        # A message that fills no chunk still shows the upload alive (receiving_timeout_s).
        touch_every = min(1.0, self.queue.receiving_timeout_s / 4)
        progress = time.monotonic()

        def flush(final: bool) -> None:
            nonlocal chunks, pending, progress
            cs = job.chunk_size
            while len(pending) >= cs or (final and pending):
                part, pending = pending[:cs], pending[cs:]
                self.store.enqueue(job, [(chunks, len(part), chunk_payload(kind, part, shape))])
                chunks += 1
                progress = time.monotonic()

        for req in requests:
            if req.WhichOneof("part") != "items":
                raise InvalidInput("only the first SubmitJob message may carry a JobSpec")
            got = req.items.images if kind is JobKind.COMPRESS else req.items.codes
            wrong = req.items.codes if kind is JobKind.COMPRESS else req.items.images
            if len(wrong):
                raise InvalidInput(f"a {kind.value} job takes JobItems."
                                   f"{'images' if kind is JobKind.COMPRESS else 'codes'}, "
                                   f"got {len(wrong)} "
                                   f"{'codes' if kind is JobKind.COMPRESS else 'images'}")
            if len(got) > self.limits.max_items_per_message:
                raise ResourceLimit(f"{len(got)} items in one message; the limit is "
                                    f"{self.limits.max_items_per_message}: send more messages",
                                    limit="max_images_per_request")
            if total + len(got) > self.queue.max_job_items:
                raise ResourceLimit(f"the job has more than {self.queue.max_job_items} items, "
                                    "the maximum job size; split it into several jobs",
                                    limit="max_job_items")
            for i, item in enumerate(got):
                pending.append(self._input(kind, item, total + i, shape, spec.resize,
                                           job.on_item_error))
            total += len(got)
            flush(final=False)
            if time.monotonic() - progress >= touch_every:
                self.store.touch(job.id)
                progress = time.monotonic()
        if not context.is_active():
            raise InvalidInput("the SubmitJob stream was cancelled by the client")
        flush(final=True)
        return total, chunks

    def _input(self, kind: JobKind, item: Any, index: int, shape: Any, resize: bool,
               policy: OnItemError) -> Any:
        """One input checked: an image array or code bytes, or (PER_ITEM) the
        ItemFailure that refused it, its message the unary RPC's for that item alone."""
        from latentserve.errors import CodeError
        from latentserve.worker.codec.codes import parse_header

        try:
            if kind is JobKind.COMPRESS:
                return decode_request_image(item, shape, resize=resize,
                                            max_pixels=self.limits.max_pixels_per_image,
                                            name=f"image {index}")
            parse_header(item)  # cheap: magic, version, length (the worker checks the rest)
            return bytes(item)
        except ITEM_ERRORS as exc:
            if policy is OnItemError.PER_ITEM:
                return ItemFailure.of(exc)
            if isinstance(exc, CodeError):
                raise type(exc)(f"code {index}: {exc}") from None
            raise

    def _model(self, model: str, kind: JobKind) -> str:
        if not model:
            if kind is JobKind.RECONSTRUCT:
                return ""
            raise InvalidInput(f"a {kind.value} job needs JobSpec.model (NAME or NAME:VERSION)")
        self.pipeline.repository.resolve(model)  # NOT_FOUND now rather than in a worker
        return model

    @staticmethod
    def _format(fmt: int) -> ImageFormat:
        if fmt in (ipb.IMAGE_FORMAT_UNSPECIFIED, ipb.IMAGE_FORMAT_PNG):
            return ImageFormat.PNG
        if fmt == ipb.IMAGE_FORMAT_RAW:
            return ImageFormat.RAW
        raise InvalidInput(f"image format {fmt} is not one of PNG (1) or RAW (2)")

    # -- reading ------------------------------------------------------------------------
    def _own(self, job_id: str, context: grpc.ServicerContext) -> JobInfo:
        """The caller's job ``job_id``; someone else's job answers exactly like an
        unknown one, so ids leak nothing about other identities' jobs."""
        info = self.store.get(job_id)
        if info.owner != caller(context):
            raise job_not_found(job_id)
        return info

    @redis_unavailable
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return job_message(self._own(request.id, context))

    @redis_unavailable
    def ListJobs(self, request: pb.ListJobsRequest,
                 context: grpc.ServicerContext) -> pb.ListJobsResponse:
        limit = request.limit or 100
        if limit > 1000:
            raise InvalidInput(f"ListJobs limit {limit} is over 1000")
        try:
            states = [STATES[s] for s in request.states]
        except KeyError as exc:
            raise InvalidInput(f"job state {exc.args[0]} is not a JobState") from None
        mine = self.store.list(limit, states, owner=caller(context))
        return pb.ListJobsResponse(jobs=[job_message(j) for j in mine])

    @redis_unavailable
    @streams
    def WatchJob(self, request: pb.WatchJobRequest,
                 context: grpc.ServicerContext) -> Iterator[pb.Job]:
        self._own(request.id, context)
        with self.slots.hold(caller(context), "WatchJob"):
            for info in self.store.watch(request.id, wait_s=0.5,
                                         should_stop=client_gone(context)):
                if not context.is_active():
                    return
                yield job_message(info)

    @redis_unavailable
    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        self._own(request.id, context)
        return job_message(self.store.cancel(request.id))

    @redis_unavailable
    @streams
    def FetchResults(self, request: pb.FetchResultsRequest,
                     context: grpc.ServicerContext) -> Iterator[pb.JobResults]:
        info = self._own(request.id, context)
        budget = max(self.limits.max_message_bytes // 2, 1 << 20)
        with self.slots.hold(caller(context), "FetchResults"):
            for lo, items, failed in self.store.iter_chunk_results(
                    request.id, request.start, wait_s=0.5, should_stop=client_gone(context)):
                if not context.is_active():
                    return
                info = self.store.get(request.id) if not info.sealed else info
                total = info.items_total if info.sealed else 0
                for msg in _results_messages(info.kind, lo, items, total, budget):
                    yield with_item_errors(msg, failed)


def _results_messages(kind: JobKind, lo: int, items: Any, total: int,
                      budget: int) -> Iterator[pb.JobResults]:
    """One chunk's results as JobResults messages of at most ``budget`` bytes each."""
    i = 0
    while i < len(items):
        size = 0
        j = i
        while j < len(items) and (j == i or size + _nbytes(items[j]) <= budget):
            size += _nbytes(items[j])
            j += 1
        part = items[i:j]
        if kind is JobKind.COMPRESS:
            yield pb.JobResults(start=lo + i, codes=list(part), items_total=total)
        elif isinstance(part, np.ndarray):
            yield pb.JobResults(start=lo + i, images=[raw_image(im) for im in part],
                                items_total=total)
        else:  # PNG files, or raw images of several sizes (an any-size model's)
            yield pb.JobResults(start=lo + i, images=[
                raw_image(b) if isinstance(b, np.ndarray) else ipb.Image(encoded=b)
                for b in part], items_total=total)
        i = j


def _nbytes(item: Any) -> int:
    return int(item.nbytes) if isinstance(item, np.ndarray) else len(item)


# -- the server extension ---------------------------------------------------------------------
def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (mode 0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def add_jobs(ctx: Any, settings: JobSettings) -> list[str]:
    """Add the Jobs service (and, maybe, a worker) to a server being built; returns its
    service names. Whatever it starts (Valkey, worker, sweeper, Redis client) is stopped
    through ``ctx.on_stop``, registered as each one starts, so that a failure later in
    the build stops it too."""
    if not settings.enabled:
        log.info("job API off (--redis none)")
        return []
    from latentserve.service.jobs.sweeper import start_sweeper
    from latentserve.service.server.embedded_redis import start_embedded_redis
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.consumer import create_worker
    from latentserve.worker.jobqueue.redis_url import redact_url
    from latentserve.worker.jobqueue.stats import QueueCollector, known_pools
    from latentserve.worker.jobqueue.store import connect
    from latentserve.worker.metrics import WorkerMetrics

    url, embedded = settings.redis_url, None
    if settings.embedded:
        # The embedded Valkey listens on loopback, where every local user could read and
        # rewrite any job: it gets a fresh random password each start, and its URL goes
        # to a file only this user can read, for extra local workers (REDIS_URL="$(cat ...)").
        embedded = start_embedded_redis(settings.state_dir, password=secrets.token_urlsafe(24))
        ctx.on_stop(embedded.stop)
        url = embedded.url
        write_private(embedded.data_dir / "url", url + "\n")
    client = connect(url)
    ctx.on_stop(client.close)
    store = JobStore(client, settings.queue)
    # The queue's gauges (depth, lag, pending, dead letters) on the service's /metrics
    # too, read from Redis at each scrape.
    ctx.metrics.registry.register(QueueCollector(client, settings.queue.keys,
                                                 known_pools(settings.queue)))
    config = ctx.config
    limits = JobLimits(max_items_per_message=config.max_images_per_request,
                       max_pixels_per_image=config.max_pixels_per_image,
                       max_message_bytes=config.max_message_bytes)
    slots = settings.stream_slots(config.grpc_threads)
    pb_grpc.add_JobsServicer_to_server(JobsServicer(store, ctx.pipeline, limits, slots),
                                       ctx.server)
    ctx.on_stop(start_sweeper(store))  # silent uploads end even with no worker running
    shown = redact_url(url)  # never log a password
    where = (f"embedded Valkey {shown} (data in {embedded.data_dir}; its URL with the "
             f"password in {embedded.data_dir / 'url'})" if embedded else shown)
    log.info("job queue on %s; at most %d WatchJob/FetchResults streams open",
             where, slots.total)
    if settings.embedded_worker == "yes" or (settings.embedded_worker == "auto" and embedded):
        wcfg = WorkerConfig(redis_url=url, queue=settings.queue,
                            models=str(config.models), provider=config.provider,
                            intra_op_threads=config.ort_threads,
                            batch_items=config.max_batch_size, grace_s=config.grace_s)
        # Its job counts go on the service's /metrics (latentserve_worker_*).
        worker = create_worker(wcfg, ctx.pipeline, client, WorkerMetrics(ctx.metrics.registry))
        thread = worker.start_thread()

        def stop_worker() -> None:
            worker.request_stop()
            thread.join(config.grace_s + 5)
        ctx.on_stop(stop_worker)
    return [SERVICE_NAME]
