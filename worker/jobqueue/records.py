"""The job queue's value types: job states and kinds, a job snapshot, a chunk task.

``JobState`` is the one set of states shared by the store, the workers and the API
(``jobs.proto`` mirrors it); a ``JobInfo`` is parsed from a job hash; an
``ItemFailure`` is what a bad input item leaves in its result slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

from latentserve import errors
from latentserve.errors import CodeError, InvalidInput, ResourceLimit


class JobState(str, Enum):
    """The one set of job states, shared by the store, the workers and the API."""

    RECEIVING = "receiving"  # inputs still streaming in; chunks may already run
    QUEUED = "queued"        # all inputs in, no chunk started yet
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(str, Enum):
    COMPRESS = "compress"        # images in, one latent code per image out
    RECONSTRUCT = "reconstruct"  # codes in, one image per code out
    SAMPLE = "sample"            # (model, count, seed, temperature) in, images out


class ImageFormat(str, Enum):
    PNG = "png"  # one PNG file per image
    RAW = "raw"  # uint8 (C, H, W) bytes per image


class OnItemError(str, Enum):
    """What a bad input item (an error of its own input) does to its job."""

    PER_ITEM = "per_item"    # the item gets an ItemFailure; the rest of the job runs
    FAIL_FAST = "fail_fast"  # the first bad item fails the whole job


# Errors a job keeps (its failure reason, a chunk's last error, an item's error) are cut
# to this, so a Job message, and a ListJobs reply of up to 1,000 of them, stays small
# whatever was raised.
MAX_ERROR_CHARS = 2000

# Errors of one item's own input; anything else (the model, the runtime) is the chunk's.
ITEM_ERRORS: tuple[type[Exception], ...] = (InvalidInput, CodeError, ResourceLimit)


@dataclass(frozen=True)
class ItemFailure:
    """Why one item has no result: the ``latentserve.errors`` class that refused
    it, by name (the service maps it to a status code), and its message."""

    error: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> ItemFailure:
        """The failure ``exc`` (an ITEM_ERRORS instance) stands for, its message cut."""
        return cls(type(exc).__name__, str(exc)[:MAX_ERROR_CHARS])

    def exception(self) -> Exception:
        """The refusal as an exception of its class again (LatentServeError if unknown)."""
        kind = getattr(errors, self.error, None)
        if not (isinstance(kind, type) and issubclass(kind, errors.LatentServeError)):
            kind = errors.LatentServeError
        return kind(self.message)


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of a job hash."""

    id: str
    kind: JobKind
    model: str
    pool: str
    state: JobState
    chunk_size: int
    image_format: ImageFormat
    sealed: bool            # every input received: items_total and chunks_total are final
    items_total: int
    chunks_total: int
    items_done: int          # items whose result or ItemFailure is stored
    chunks_done: int
    chunks_submitted: int    # chunks the upload has added so far (a running total)
    created: float
    started: float          # 0 until a worker begins its first chunk
    finished: float         # 0 until the job reaches a terminal state
    error: str
    seed: int
    temperature: float
    owner: str = ""         # the identity that submitted it ("" = anonymous)
    items_failed: int = 0   # items of items_done that got an ItemFailure
    on_item_error: OnItemError = OnItemError.PER_ITEM
    upload_seen: float = 0  # RECEIVING: when the upload last made progress (0 = unknown)
    traceparent: str = ""   # W3C trace context of SubmitJob's span ("" = not traced)

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> JobInfo:
        s = {k.decode(): v.decode() for k, v in h.items() if not k.startswith(b"err:")}
        return cls(
            id=s["id"], kind=JobKind(s["kind"]), model=s["model"], pool=s["pool"],
            state=JobState(s["state"]), chunk_size=int(s["chunk_size"]),
            image_format=ImageFormat(s["image_format"]), sealed=s.get("sealed") == "1",
            items_total=int(s.get("items_total", 0)), chunks_total=int(s.get("chunks_total", 0)),
            items_done=int(s.get("items_done", 0)), chunks_done=int(s.get("chunks_done", 0)),
            # Hashes written before the rename hold the count as "chunks_queued".
            chunks_submitted=int(s.get("chunks_submitted", 0)) + int(s.get("chunks_queued", 0)),
            created=float(s["created"]),
            started=float(s.get("started", 0)), finished=float(s.get("finished", 0)),
            error=s.get("error", ""), seed=int(s.get("seed", 0)),
            temperature=float(s.get("temperature", 1.0)), owner=s.get("owner", ""),
            items_failed=int(s.get("items_failed", 0)),
            # Jobs from before the policy existed were all fail-fast.
            on_item_error=OnItemError(s.get("on_item_error", OnItemError.FAIL_FAST.value)),
            upload_seen=float(s.get("upload_seen", 0)), traceparent=s.get("traceparent", ""))

    @property
    def fraction(self) -> float:
        """Share of items done; 1.0 only once every result is stored."""
        if not self.sealed or self.items_total == 0:
            return 1.0 if self.state is JobState.SUCCEEDED else 0.0
        return self.items_done / self.items_total

    def items_per_s(self, now: float | None = None) -> float:
        """Mean throughput since the first chunk started."""
        if not self.started or not self.items_done:
            return 0.0
        end = self.finished or (time.time() if now is None else now)
        return self.items_done / max(end - self.started, 1e-6)

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        """Global [start, stop) item indices of a chunk (the last one may be short)."""
        start = chunk * self.chunk_size
        stop = start + self.chunk_size
        return start, min(stop, self.items_total) if self.sealed else stop


@dataclass(frozen=True)
class ChunkTask:
    """What a worker learns when it begins a chunk."""

    kind: JobKind
    model: str
    chunk_size: int
    seed: int
    temperature: float
    image_format: ImageFormat
    payload: bytes | None
    on_item_error: OnItemError = OnItemError.FAIL_FAST


class ChunkResults(NamedTuple):
    """One stored chunk's results as a reader gets them (``JobStore.iter_chunk_results``)."""

    start: int   # global index of the first item in ``items``
    items: Any   # list of bytes, or uint8 (N, C, H, W); failed slots hold placeholders
    failures: dict[int, ItemFailure]  # global index -> why that item has no result
