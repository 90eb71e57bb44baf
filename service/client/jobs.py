"""A small typed Python client for the Jobs service (bulk jobs through the queue).

``JobsClient(target)`` submits compress jobs (numpy batches, image-file bytes or paths),
reconstruct jobs (codes) and sample jobs, and gets, lists, watches, cancels and fetches
jobs. Inputs are streamed in messages of at most ``batch`` items. Server errors are
raised as the matching ``latentserve.errors`` exception with the server's message.

The reads (get, list, watch, fetch) ride out a server restart or a Redis outage: on
UNAVAILABLE they retry with capped exponential backoff for up to ``retry_deadline_s``
(``service.retry``), a watch resuming with the job's current state and a fetch from
the first result it has not yet yielded, so the caller sees one uninterrupted stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import grpc
import numpy as np

from latentserve import errors as E
from latentserve.service.client.channel import open_channel
from latentserve.service.client.inference import error_from
from latentserve.service.client.retry import DEFAULT_DEADLINE_S, Retrier, RetryPolicy
from latentserve.service.client.settings import ClientSecurity
from latentserve.service.wire import decode_raw, raw_image
from latentserve.v1 import inference_pb2 as ipb
from latentserve.v1 import jobs_pb2 as pb
from latentserve.v1 import jobs_pb2_grpc as pb_grpc

MIB = 1 << 20
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
# gRPC's own reconnect backoff grows to 120 s; a retry must find the restarted server
# within about its own backoff instead.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)]


@dataclass(frozen=True)
class ItemFailed:
    """What ``fetch`` yields for an item that has no result (OnItemError PER_ITEM): the
    status code name and message the unary RPC gives for that item alone."""

    index: int
    code: str      # e.g. "DATA_LOSS"
    message: str


ON_ITEM_ERROR = {"per_item": pb.ON_ITEM_ERROR_PER_ITEM, "fail_fast": pb.ON_ITEM_ERROR_FAIL_FAST}


def _policy(on_item_error: str) -> pb.OnItemError:
    try:
        return ON_ITEM_ERROR[on_item_error]
    except KeyError:
        raise E.InvalidInput(f"on_item_error {on_item_error!r} is not one of "
                             f"{', '.join(ON_ITEM_ERROR)}") from None


def state_name(state: int) -> str:
    """``pb.JOB_STATE_RUNNING`` -> ``"running"``."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _image(item: Any) -> ipb.Image:
    if isinstance(item, np.ndarray):
        return raw_image(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return ipb.Image(encoded=bytes(item))
    if isinstance(item, (str, Path)):
        return ipb.Image(encoded=Path(item).read_bytes())
    raise E.InvalidInput(f"an image must be a uint8 (C, H, W) array, file bytes or a path, "
                         f"got {type(item).__name__}")


def _formats(fmt: str) -> ipb.ImageFormat:
    try:
        return {"png": ipb.IMAGE_FORMAT_PNG, "raw": ipb.IMAGE_FORMAT_RAW}[fmt]
    except KeyError:
        raise E.InvalidInput(f"image format {fmt!r} is not one of png, raw") from None


class JobsClient:
    """Calls the Jobs service at ``target`` (HOST:PORT).

    ``timeout``: deadline of each unary call; ``retry_deadline_s``: how long the reads
    keep retrying an outage (from its first failure; 0 = not at all).
    """

    def __init__(self, target: str, *, timeout: float | None = None, batch: int = 1024,
                 max_message_bytes: int = 64 * MIB,
                 security: ClientSecurity | None = None,
                 retry_deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.target = target
        self.timeout = timeout
        self.batch = batch
        self.retry = RetryPolicy(deadline_s=retry_deadline_s)
        self.channel = open_channel(target, security, max_message_bytes=max_message_bytes,
                                    extra_options=RECONNECT)
        self.stub = pb_grpc.JobsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from(exc, self.target) from None

    def _read(self, what: str, method: Any, request: Any) -> Any:
        """A unary read, retried through an outage."""
        retry = Retrier(self.retry, what, self.target)
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                retry.backoff_or_raise(exc)

    def _resumable(self, what: str, open_stream: Callable[[], Any],
                   seen: Callable[[Any], bool]) -> Iterator[Any]:
        """A server stream reopened by ``open_stream()`` after each retryable failure;
        ``seen(message)`` records a message and says whether the caller already has it."""
        retry = Retrier(self.retry, what, self.target)
        while True:
            call = open_stream()
            try:
                for message in call:
                    retry.progressed()
                    if not seen(message):
                        yield message
                return
            except grpc.RpcError as exc:
                retry.backoff_or_raise(exc)
            finally:
                call.cancel()  # a caller that stops early frees the server's handler now

    # -- submitting -----------------------------------------------------------------------
    def _submit(self, spec: pb.JobSpec, items: Iterable[pb.JobItems] = ()) -> pb.Job:
        def requests() -> Iterator[pb.SubmitJobRequest]:
            yield pb.SubmitJobRequest(spec=spec)
            for msg in items:
                yield pb.SubmitJobRequest(items=msg)
        return cast(pb.Job, self._call(self.stub.SubmitJob, requests()))  # SubmitJob's reply

    def _batches(self, items: Iterable[Any]) -> Iterator[list[Any]]:
        batch: list[Any] = []
        for item in items:
            batch.append(item)
            if len(batch) == self.batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def submit_compress(self, model: str, images: np.ndarray | Iterable[Any], *,
                        chunk_size: int = 0, resize: bool = False,
                        on_item_error: str = "per_item") -> pb.Job:
        """Images (a uint8 (N, C, H, W) array, or arrays / file bytes / paths) -> a job.

        ``on_item_error``: "per_item" (a bad image fails only itself) or "fail_fast".
        """
        expected = len(images) if isinstance(images, (np.ndarray, Sequence)) else 0
        spec = pb.JobSpec(kind=pb.JOB_KIND_COMPRESS, model=model, chunk_size=chunk_size,
                          resize=resize, expected_items=expected,
                          on_item_error=_policy(on_item_error))
        return self._submit(spec, (pb.JobItems(images=[_image(i) for i in b])
                                   for b in self._batches(images)))

    def submit_reconstruct(self, codes: Iterable[bytes], *, model: str = "",
                           chunk_size: int = 0, fmt: str = "png",
                           on_item_error: str = "per_item") -> pb.Job:
        """Latent codes -> a job; ``model`` optional (each code names its model).

        ``on_item_error``: "per_item" (a bad code fails only itself) or "fail_fast".
        """
        expected = len(codes) if isinstance(codes, Sequence) else 0
        spec = pb.JobSpec(kind=pb.JOB_KIND_RECONSTRUCT, model=model, chunk_size=chunk_size,
                          format=_formats(fmt), expected_items=expected,
                          on_item_error=_policy(on_item_error))
        return self._submit(spec, (pb.JobItems(codes=b) for b in self._batches(codes)))

    def submit_sample(self, model: str, count: int, *, seed: int = 0,
                      temperature: float = 1.0, chunk_size: int = 0,
                      fmt: str = "png") -> pb.Job:
        """Draw ``count`` images from ``model``'s prior, as a job."""
        spec = pb.JobSpec(kind=pb.JOB_KIND_SAMPLE, model=model, count=count, seed=seed,
                          temperature=temperature, chunk_size=chunk_size, format=_formats(fmt))
        return self._submit(spec)

    # -- the rest -------------------------------------------------------------------------
    def get(self, job_id: str) -> pb.Job:
        """The job's current state."""
        return cast(pb.Job, self._read(f"get of job {job_id}", self.stub.GetJob,
                                       pb.GetJobRequest(id=job_id)))  # GetJob's reply

    def list(self, limit: int = 100, states: Sequence[int] = ()) -> list[pb.Job]:
        """The caller's jobs, newest first, optionally only those in ``states``."""
        # Any int of the JobState enum is a valid value of the field (JobState is an int).
        reply = self._read("job list", self.stub.ListJobs,
                           pb.ListJobsRequest(limit=limit,
                                              states=cast("Sequence[pb.JobState]", states)))
        return list(reply.jobs)

    def cancel(self, job_id: str) -> pb.Job:
        return cast(pb.Job, self._call(self.stub.CancelJob,
                                       pb.CancelJobRequest(id=job_id)))  # CancelJob's reply

    def watch(self, job_id: str) -> Iterator[pb.Job]:
        """The job now, then at each change, ending with its terminal state."""
        last: list[tuple[int, ...]] = []

        def seen(job: pb.Job) -> bool:
            # A resumed stream starts with the job as it is now: the same as the last
            # state yielded unless it moved during the outage.
            key = (job.state, job.items_done, job.chunks_done, job.items_total,
                   job.chunks_total)
            if last and last[0] == key:
                return True
            last[:] = [key]
            return False

        return self._resumable(f"watch of job {job_id}",
                               lambda: self.stub.WatchJob(pb.WatchJobRequest(id=job_id)), seen)

    def wait(self, job_id: str) -> pb.Job:
        """Block until the job ends; returns its last state."""
        last = None
        for snapshot in self.watch(job_id):
            last = snapshot
        assert last is not None
        return last

    def fetch_messages(self, job_id: str, start: int = 0) -> Iterator[pb.JobResults]:
        """The raw JobResults messages from item ``start`` on."""
        following = [start]  # the first index not yet yielded: where a retry resumes

        def seen(msg: pb.JobResults) -> bool:
            following[0] = msg.start + len(msg.codes) + len(msg.images)
            return False

        return self._resumable(
            f"fetch of job {job_id}",
            lambda: self.stub.FetchResults(pb.FetchResultsRequest(id=job_id,
                                                                  start=following[0])), seen)

    def fetch(self, job_id: str, start: int = 0,
              ) -> Iterator[tuple[int, bytes | np.ndarray | ItemFailed]]:
        """(index, result): a code (bytes), PNG bytes, or a raw uint8 (C, H, W) image; or
        an ItemFailed for an item that failed (OnItemError PER_ITEM)."""
        for msg in self.fetch_messages(job_id, start):
            failed = {e.index: ItemFailed(e.index, e.code, e.message) for e in msg.errors}
            for i, code in enumerate(msg.codes, msg.start):
                yield i, failed.get(i, code)
            for i, image in enumerate(msg.images, msg.start):
                yield i, (failed[i] if i in failed else
                          image.encoded if image.WhichOneof("pixels") == "encoded"
                          else decode_raw(image.raw, max_pixels=1 << 62))


def run_demo_jobs(client: JobsClient, *, compress_model: str, images: np.ndarray,
                  sample_model: str, count: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """A compress job and a sample job, each timed from submit to its last result fetched
    (for ``latentserve demo``): one dict per job with kind, model, items, seconds, items/s."""
    import time

    rows = []
    jobs: tuple[tuple[str, str, Callable[[], pb.Job]], ...] = (
        ("compress", compress_model, lambda: client.submit_compress(compress_model, images)),
        ("sample", sample_model, lambda: client.submit_sample(sample_model, count, seed=seed)))
    for kind, model, submit in jobs:
        t0 = time.perf_counter()
        job = submit()
        items = sum(1 for _ in client.fetch(job.id))
        seconds = time.perf_counter() - t0
        rows.append({"job": kind, "model": model, "id": job.id, "items": items,
                     "seconds": seconds, "items_per_s": items / seconds})
    return rows
