"""The Inference servicer: requests in, batched pipeline calls, replies out.

Handlers validate and decode requests in the gRPC thread, queue the tensors on the
model's ``DynamicBatcher`` and wait for their results. Every error is raised as a
``latentserve.errors`` exception; ``service.errors`` turns it into a status.
A call's queued work is dropped as soon as the call is cancelled or its deadline
passes (``RpcScope``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from latentserve.errors import (
    CodeError,
    InvalidInput,
    LatentServeError,
    ResourceLimit,
    Unavailable,
)
from latentserve.service.models.catalog import ModelCatalog
from latentserve.service.server.batching import BatcherSet, ComputeLanes, DynamicBatcher, Ticket
from latentserve.service.server.config import ServiceConfig
from latentserve.service.server.metrics import BatchMetrics, ServiceMetrics
from latentserve.service.server.tracing import recording_span
from latentserve.service.wire import decode_batch, decode_request_image, encode_image, model_info
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.worker.codec.codes import with_index
from latentserve.worker.runtime.engine import unsupported
from latentserve.worker.runtime.pipeline import check_temperature
from latentserve.worker.runtime.repository import ModelEntry

# A batcher's key: (operation, model ref, the operation's argument or None).
BatcherKey = tuple[str, str, Any]
Reply = TypeVar("Reply", bound=Message)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
STREAM_WINDOW = 4  # stream messages decoded and queued ahead of the one being answered
RETIRE_RETRIES = 4  # a call racing reloads: each retry finds the batcher built after one


class RpcScope:
    """One call's deadline and queued work; cancels the work when the call ends early."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._tickets: set[Ticket] = set()
        self._lock = threading.Lock()
        self.ended = False
        remaining = context.time_remaining()
        # No deadline shows up as a huge remaining time.
        self.deadline = (time.monotonic() + remaining
                         if remaining is not None and remaining < 1e8 else None)
        if not context.add_callback(self.cancel_all):
            self.ended = True

    def track(self, ticket: Ticket) -> Ticket:
        with self._lock:
            if self.ended:
                ticket.cancel()
            else:
                self._tickets.add(ticket)
        return ticket

    def wait(self, ticket: Ticket) -> Any:
        try:
            return ticket.result()
        finally:
            with self._lock:
                self._tickets.discard(ticket)

    def cancel_all(self) -> None:
        """Called by gRPC when the call ends (cancelled, deadline, or done)."""
        with self._lock:
            self.ended = True
            tickets, self._tickets = self._tickets, set()
        for t in tickets:
            t.cancel()


class InferenceServicer(pb_grpc.InferenceServicer):
    """Compress, Reconstruct and Sample over a Pipeline, with per-model dynamic batching."""

    def __init__(self, catalog: ModelCatalog, config: ServiceConfig, *, lanes: ComputeLanes,
                 metrics: ServiceMetrics) -> None:
        self.catalog = catalog
        self.pipeline = catalog.pipeline
        self.config = config
        self.lanes = lanes
        self.metrics = metrics
        self.batchers: BatcherSet[BatcherKey] = BatcherSet(self._make_batcher)
        # Models with compute_lanes in their settings run on lanes of their own.
        self._own_lanes: dict[str, ComputeLanes] = {}
        self._lanes_lock = threading.Lock()
        catalog.on_retire = self.retire_model

    def close(self) -> None:
        """Finish queued work and stop the batchers' threads (after the server stopped)."""
        self.batchers.close(drain=True)
        with self._lanes_lock:
            owned, self._own_lanes = list(self._own_lanes.values()), {}
        for own in owned:
            own.shutdown()

    def retire_model(self, ref: str) -> None:
        """Drain and drop ``ref``'s batchers (and lanes); the next call builds new ones
        with the settings then in force."""
        with self._lanes_lock:
            own = self._own_lanes.pop(ref, None)
        self.batchers.retire(lambda key: ref in key[1:])
        if own is not None:
            own.shutdown()

    # -- batchers ------------------------------------------------------------------------
    def _lanes_for(self, ref: str, lanes: int | None) -> ComputeLanes:
        if not lanes:
            return self.lanes
        with self._lanes_lock:
            own = self._own_lanes.get(ref)
            if own is None:
                own = self._own_lanes[ref] = ComputeLanes(lanes, name=f"lanes-{ref}")
            return own

    def _make_batcher(self, key: BatcherKey) -> DynamicBatcher:
        op, model, arg = key
        c = self.config
        settings = self.catalog.settings(model)
        fn: Callable[[Any], Any]
        if op == "compress":
            fn = lambda images: self.pipeline.compress(model, images)  # noqa: E731
        elif op == "reconstruct":
            fn = lambda codes: self._reconstruct_batch(codes, model, arg)  # noqa: E731
        else:
            fn = lambda items: self._sample_batch(model, items)  # noqa: E731
        return DynamicBatcher(
            fn, lanes=self._lanes_for(model, settings.compute_lanes),
            max_batch_size=settings.batch_size(c.max_batch_size),
            max_queue_delay_us=settings.queue_delay_us(c.max_queue_delay_us),
            # Samples of different requests cannot share a network run (each has its own
            # random streams), so merging them would only make one wait for another.
            batching=c.batching and op != "sample",
            dispatch_when_idle=c.dispatch_when_idle, max_queue_items=c.max_queue_images,
            observer=BatchMetrics(self.metrics, model, op,
                                  count_images=op != "reconstruct"),
            name=f"{op} {model}")

    def _submit(self, key: BatcherKey, items: Any, scope: RpcScope) -> Ticket:
        for _ in range(RETIRE_RETRIES):
            batcher = self.batchers.get(key)
            span = recording_span()
            if span is not None:
                span.set_attributes({
                    "latentserve.model": key[1], "latentserve.op": key[0],
                    "latentserve.items": len(items),
                    "latentserve.batch.max_size": batcher.max_batch_size,
                    "latentserve.batch.max_queue_delay_us": round(batcher.delay_s * 1e6),
                    "latentserve.batch.lanes": batcher.lanes.count})
            try:
                return scope.track(batcher.submit(items, deadline=scope.deadline))
            except Unavailable:
                # Retired between get and submit (a reload): its successor takes the call.
                if self.batchers.get(key) is batcher:
                    raise
        raise Unavailable(f"the batcher of {key[1]} was replaced {RETIRE_RETRIES} times "
                          "during this call; retry")

    # -- checks ------------------------------------------------------------------------------
    def _check_request(self, request: Any, count: int, what: str, stream: str,
                       where: str) -> None:
        c = self.config
        if count > c.max_images_per_request:
            raise ResourceLimit(
                f"{where}{count} {what} in one message; the limit is "
                f"{c.max_images_per_request}: send them in several messages with {stream}",
                limit="max_images_per_request")
        size = request.ByteSize()
        if size > c.max_message_bytes:
            raise ResourceLimit(
                f"{where}the request is {size} bytes; the limit is {c.max_message_bytes}: "
                f"send the {what} in several smaller messages with {stream}",
                limit="max_message_bytes")

    def _check_reply(self, reply: Reply, what: str, where: str) -> Reply:
        size = reply.ByteSize()
        if size > self.config.max_message_bytes:
            raise ResourceLimit(
                f"{where}the reply would be {size} bytes; the limit is "
                f"{self.config.max_message_bytes}: ask for fewer {what} per message "
                "(or IMAGE_FORMAT_PNG instead of RAW)", limit="max_message_bytes")
        return reply

    def _entry(self, ref: str, where: str = "") -> ModelEntry:
        if not ref:
            raise InvalidInput(f"{where}no model named: set model to NAME or NAME:VERSION "
                               "(ListModels shows what is served)")
        entry = self.catalog.resolve(ref)
        self.catalog.ensure_loaded(entry)
        return entry

    # -- models ------------------------------------------------------------------------------
    def ListModels(self, request: pb.ListModelsRequest,
                   context: grpc.ServicerContext) -> pb.ListModelsResponse:
        newest = self.catalog.newest_refs()
        return pb.ListModelsResponse(models=[
            model_info(e.manifest, newest=e.manifest.ref in newest,
                       provider=self.catalog.provider(e)) for e in self.catalog.entries()])

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        if not request.model:
            raise InvalidInput("GetModel needs a model: NAME or NAME:VERSION")
        e = self.catalog.resolve(request.model)
        return model_info(e.manifest, newest=e.manifest.ref in self.catalog.newest_refs(),
                          provider=self.catalog.provider(e))

    # -- compress ----------------------------------------------------------------------------
    def _submit_compress(self, request: pb.CompressRequest, entry: ModelEntry, scope: RpcScope,
                         where: str = "") -> Callable[[], pb.CompressResponse]:
        has_batch = request.HasField("batch")
        if has_batch and request.images:
            raise InvalidInput(f"{where}set images or batch, not both")
        count = request.batch.count if has_batch else len(request.images)
        self._check_request(request, count, "images", "CompressStream", where)
        shape = entry.manifest.image_shape
        limit = self.config.max_pixels_per_image
        images: np.ndarray | list[np.ndarray]
        if has_batch:
            images = decode_batch(request.batch, shape, max_pixels=limit, name=f"{where}batch",
                                  resize=request.resize)
        elif entry.manifest.any_size:
            images = [decode_request_image(msg, shape, resize=request.resize, max_pixels=limit,
                                           name=f"{where}images[{i}]")
                      for i, msg in enumerate(request.images)]
        else:
            images = np.empty((count, *shape), np.uint8)
            for i, msg in enumerate(request.images):
                images[i] = decode_request_image(msg, shape, resize=request.resize,
                                                 max_pixels=limit, name=f"{where}images[{i}]")
        if entry.manifest.any_size:
            # Items of any size share one batcher as a list; the pipeline groups them
            # by size, so an odd image runs on its own and the others stay batched.
            images = list(images)
        ref = entry.manifest.ref
        ticket = self._submit(("compress", ref, None), images, scope)
        return lambda: pb.CompressResponse(model=ref, codes=scope.wait(ticket))

    def Compress(self, request: pb.CompressRequest,
                 context: grpc.ServicerContext) -> pb.CompressResponse:
        scope = RpcScope(context)
        return self._submit_compress(request, self._entry(request.model), scope)()

    def CompressStream(self, request_iterator: Iterable[pb.CompressRequest],
                       context: grpc.ServicerContext) -> Iterator[pb.CompressResponse]:
        scope = RpcScope(context)
        stream_entry: list[ModelEntry] = []

        def submit(i: int, request: pb.CompressRequest) -> Callable[[], pb.CompressResponse]:
            where = f"message {i}: "
            if not stream_entry:
                if not request.model:
                    raise InvalidInput(f"{where}the first CompressStream message must name "
                                       "the model (NAME or NAME:VERSION)")
                stream_entry.append(self._entry(request.model, where))
            elif request.model:
                entry = self.catalog.resolve(request.model)
                if entry.manifest.digest != stream_entry[0].manifest.digest:
                    raise InvalidInput(
                        f"{where}model {request.model!r} is not this stream's model "
                        f"{stream_entry[0].manifest.ref}: use one stream per model")
            return self._submit_compress(request, stream_entry[0], scope, where)

        yield from pipelined(request_iterator, submit, scope)

    # -- reconstruct ---------------------------------------------------------------------------
    def _reconstruct_batch(self, codes: list[bytes], ref: str,
                           wanted: str | None) -> list[Any]:
        """One batcher's batch: every code here was identified as ``ref``'s."""
        results = self.pipeline.reconstruct_each(codes, wanted)
        done = sum(not isinstance(r, (CodeError, ResourceLimit)) for r in results)
        # Refused codes are not images done (the batcher's own count would include them).
        self.metrics.images.labels(ref, "reconstruct").inc(done)
        return [(r, "" if isinstance(r, (CodeError, ResourceLimit)) else ref) for r in results]

    def _submit_reconstruct(self, request: pb.ReconstructRequest, scope: RpcScope,
                            where: str = "") -> Callable[[], pb.ReconstructResponse]:
        codes = list(request.codes)
        self._check_request(request, len(codes), "codes", "ReconstructStream", where)
        _check_format(request.format, where)
        wanted = self._entry(request.model, where).manifest.ref if request.model else None
        # Batchers are keyed by a model that is served, found from each code's header
        # and checksum: keyed by the bytes as sent, every made-up fingerprint would
        # start a batcher (a thread, a metric series) that never goes away.
        results: list[Any] = [None] * len(codes)
        groups: dict[str, tuple[ModelEntry, list[int]]] = {}
        for i, found in enumerate(self.pipeline.identify_each(codes)):
            if isinstance(found, CodeError):
                results[i] = (found, "")
            else:
                groups.setdefault(found.manifest.ref, (found, []))[1].append(i)
        # The reply is the first refusal by index: codes after it need no decoding.
        first_refused = next((i for i, r in enumerate(results) if r is not None), len(codes))
        pending = []
        for ref, (entry, idx) in groups.items():
            if idx[0] < first_refused:
                self.catalog.ensure_loaded(entry)  # once per model, not per code
                pending.append((idx, self._submit(("reconstruct", ref, wanted),
                                                  [codes[i] for i in idx], scope)))
        fmt = request.format

        def finish() -> pb.ReconstructResponse:
            for idx, ticket in pending:
                for i, r in zip(idx, scope.wait(ticket), strict=True):
                    results[i] = r
            for i, (r, _) in enumerate(results):
                if isinstance(r, LatentServeError):
                    err = with_index(r, i, len(codes)) if isinstance(r, CodeError) else r
                    raise type(err)(f"{where}{err}") if where else err
            reply = pb.ReconstructResponse(
                images=[encode_image(image, fmt) for image, _ in results],
                models=[ref for _, ref in results])
            return self._check_reply(reply, "codes", where)
        return finish

    def Reconstruct(self, request: pb.ReconstructRequest,
                    context: grpc.ServicerContext) -> pb.ReconstructResponse:
        return self._submit_reconstruct(request, RpcScope(context))()

    def ReconstructStream(self, request_iterator: Iterable[pb.ReconstructRequest],
                          context: grpc.ServicerContext) -> Iterator[pb.ReconstructResponse]:
        scope = RpcScope(context)
        yield from pipelined(
            request_iterator,
            lambda i, request: self._submit_reconstruct(request, scope, f"message {i}: "), scope)

    # -- sample ---------------------------------------------------------------------------------
    def _sample_batch(self, ref: str, items: list[tuple[int, float, int]]) -> np.ndarray:
        """Items are (seed, temperature, index); runs of consecutive indices share a call."""
        out = []
        i = 0
        while i < len(items):
            seed, temperature, first = items[i]
            j = i + 1
            while j < len(items) and items[j] == (seed, temperature, first + j - i):
                j += 1
            out.append(self.pipeline.sample(ref, j - i, seed=seed, temperature=temperature,
                                            start=first))
            i = j
        return np.concatenate(out)

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> pb.SampleResponse:
        scope = RpcScope(context)
        entry = self._entry(request.model)
        if "sample" not in entry.manifest.operations:
            raise unsupported(entry.manifest, "sample")
        limit = self.config.max_images_per_request
        if request.count > limit:
            raise ResourceLimit(f"count {request.count} is over the limit of {limit} samples "
                                "per request: fetch them in pieces with start = 0, "
                                f"{limit}, {2 * limit}, ...", limit="max_images_per_request")
        temperature = check_temperature(
            request.temperature if request.HasField("temperature") else 1.0)
        _check_format(request.format, "")  # before any work, and for count 0 too
        ref = entry.manifest.ref
        if request.count == 0:
            return pb.SampleResponse(model=ref)
        items = [(request.seed, float(temperature), request.start + j)
                 for j in range(request.count)]
        images = scope.wait(self._submit(("sample", ref, None), items, scope))
        reply = pb.SampleResponse(model=ref,
                                  images=[encode_image(im, request.format) for im in images])
        return self._check_reply(reply, "samples", "")


def _check_format(fmt: int, where: str) -> None:
    if fmt not in (pb.IMAGE_FORMAT_UNSPECIFIED, pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_RAW):
        raise InvalidInput(f"{where}format {fmt} is not one of IMAGE_FORMAT_PNG (1) or "
                           "IMAGE_FORMAT_RAW (2)")


_DONE = object()


def pipelined(requests: Iterable[Any], submit: Callable[[int, Any], Callable[[], Any]],
              scope: RpcScope, window: int = STREAM_WINDOW) -> Iterator[Any]:
    """Answer a request stream in order while reading and queueing up to ``window`` ahead.

    A reader thread takes requests and ``submit``s them (decode + queue); this generator
    waits for each one's result in turn. So decoding overlaps computing, and a client
    that waits for each reply before sending the next message still works.
    """
    pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
    slots = threading.Semaphore(window)
    stopped = threading.Event()

    def reader() -> None:
        try:
            for i, request in enumerate(requests):
                slots.acquire()
                if stopped.is_set():
                    return
                pending.put(submit(i, request))
        except Exception as exc:  # noqa: BLE001 - handed to the answering side
            pending.put(exc)
            return
        pending.put(_DONE)

    thread = threading.Thread(target=reader, name="stream-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = pending.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                if isinstance(item, grpc.RpcError):
                    return  # the client went away while we were reading
                raise item
            yield item()
            slots.release()
    finally:
        stopped.set()
        slots.release()  # wake the reader if it waits for a slot
        scope.cancel_all()
