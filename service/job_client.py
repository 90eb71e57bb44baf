"""A small typed Python client for the Jobs service (bulk jobs through the queue).

``JobsClient(target)`` submits compress jobs (numpy batches, image-file bytes or paths),
reconstruct jobs (codes) and sample jobs, and gets, lists, watches, cancels and fetches
jobs. Inputs are streamed in messages of at most ``batch`` items. Server errors are
raised as the matching ``latentserve.worker.errors`` exception with the server's message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from latentserve.v1 import inference_pb2 as ipb
from latentserve.v1 import jobs_pb2 as pb
from latentserve.v1 import jobs_pb2_grpc as pb_grpc
from latentserve.worker import errors as E

from .channel import open_channel
from .client_config import ClientSecurity
from .client import error_from
from .wire import decode_raw, raw_image

MIB = 1 << 20
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


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


def _formats(fmt: str) -> int:
    try:
        return {"png": ipb.IMAGE_FORMAT_PNG, "raw": ipb.IMAGE_FORMAT_RAW}[fmt]
    except KeyError:
        raise E.InvalidInput(f"image format {fmt!r} is not one of png, raw") from None


class JobsClient:
    """Calls the Jobs service at ``target`` (HOST:PORT)."""

    def __init__(self, target: str, *, timeout: float | None = None, batch: int = 1024,
                 max_message_bytes: int = 64 * MIB,
                 security: ClientSecurity | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.batch = batch
        self.channel = open_channel(target, security, max_message_bytes=max_message_bytes)
        self.stub = pb_grpc.JobsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, method: Any, request: Any, *, stream: bool = False) -> Any:
        try:
            return method(request, timeout=None if stream else self.timeout)
        except grpc.RpcError as exc:
            raise error_from(exc, self.target) from None

    def _iterate(self, responses: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from responses
        except grpc.RpcError as exc:
            raise error_from(exc, self.target) from None

    # -- submitting -----------------------------------------------------------------------
    def _submit(self, spec: pb.JobSpec, items: Iterable[pb.JobItems] = ()) -> pb.Job:
        def requests() -> Iterator[pb.SubmitJobRequest]:
            yield pb.SubmitJobRequest(spec=spec)
            for msg in items:
                yield pb.SubmitJobRequest(items=msg)
        return self._call(self.stub.SubmitJob, requests())

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
                        chunk_size: int = 0, resize: bool = False) -> pb.Job:
        """Images (a uint8 (N, C, H, W) array, or arrays / file bytes / paths) -> a job."""
        expected = len(images) if isinstance(images, (np.ndarray, Sequence)) else 0
        spec = pb.JobSpec(kind=pb.JOB_KIND_COMPRESS, model=model, chunk_size=chunk_size,
                          resize=resize, expected_items=expected)
        return self._submit(spec, (pb.JobItems(images=[_image(i) for i in b])
                                   for b in self._batches(images)))

    def submit_reconstruct(self, codes: Iterable[bytes], *, model: str = "",
                           chunk_size: int = 0, fmt: str = "png") -> pb.Job:
        """Latent codes -> a job; ``model`` optional (each code names its model)."""
        expected = len(codes) if isinstance(codes, Sequence) else 0
        spec = pb.JobSpec(kind=pb.JOB_KIND_RECONSTRUCT, model=model, chunk_size=chunk_size,
                          format=_formats(fmt), expected_items=expected)
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
        return self._call(self.stub.GetJob, pb.GetJobRequest(id=job_id))

    def list(self, limit: int = 100, states: Sequence[int] = ()) -> list[pb.Job]:
        reply = self._call(self.stub.ListJobs, pb.ListJobsRequest(limit=limit, states=states))
        return list(reply.jobs)

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(id=job_id))

    def watch(self, job_id: str) -> Iterator[pb.Job]:
        """The job now, then at each change, ending with its terminal state."""
        return self._iterate(self._call(self.stub.WatchJob, pb.WatchJobRequest(id=job_id),
                                        stream=True))

    def wait(self, job_id: str) -> pb.Job:
        """Block until the job ends; returns its last state."""
        last = None
        for last in self.watch(job_id):
            pass
        assert last is not None
        return last

    def fetch_messages(self, job_id: str, start: int = 0) -> Iterator[pb.JobResults]:
        """The raw JobResults messages from item ``start`` on."""
        return self._iterate(self._call(
            self.stub.FetchResults, pb.FetchResultsRequest(id=job_id, start=start), stream=True))

    def fetch(self, job_id: str, start: int = 0) -> Iterator[tuple[int, bytes | np.ndarray]]:
        """(index, result): a code (bytes), PNG bytes, or a raw uint8 (C, H, W) image."""
        for msg in self.fetch_messages(job_id, start):
            for i, code in enumerate(msg.codes):
                yield msg.start + i, code
            for i, image in enumerate(msg.images):
                yield msg.start + i, (image.encoded if image.WhichOneof("pixels") == "encoded"
                                      else decode_raw(image.raw, max_pixels=1 << 62))


def run_demo_jobs(client: JobsClient, *, compress_model: str, images: np.ndarray,
                  sample_model: str, count: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """A compress job and a sample job, each timed from submit to its last result fetched
    (for ``latentserve demo``): one dict per job with kind, model, items, seconds, items/s."""
    import time

    rows = []
    for kind, model, submit in (
            ("compress", compress_model, lambda: client.submit_compress(compress_model, images)),
            ("sample", sample_model, lambda: client.submit_sample(sample_model, count,
                                                                  seed=seed))):
        t0 = time.perf_counter()
        job = submit()
        items = sum(1 for _ in client.fetch(job.id))
        seconds = time.perf_counter() - t0
        rows.append({"job": kind, "model": model, "id": job.id, "items": items,
                     "seconds": seconds, "items_per_s": items / seconds})
    return rows
