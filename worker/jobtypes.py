"""The job queue's value types: job states and kinds, a job snapshot, a chunk task.

``JobState`` is the one set of states shared by the store, the workers and the API
(``jobs.proto`` mirrors it); a ``JobInfo`` is parsed from a job hash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum


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
    items_done: int
    chunks_done: int
    chunks_queued: int
    created: float
    started: float          # 0 until a worker begins its first chunk
    finished: float         # 0 until the job reaches a terminal state
    error: str
    seed: int
    temperature: float
    owner: str = ""         # the identity that submitted it ("" = anonymous)

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> JobInfo:
        s = {k.decode(): v.decode() for k, v in h.items() if not k.startswith(b"err:")}
        return cls(
            id=s["id"], kind=JobKind(s["kind"]), model=s["model"], pool=s["pool"],
            state=JobState(s["state"]), chunk_size=int(s["chunk_size"]),
            image_format=ImageFormat(s["image_format"]), sealed=s.get("sealed") == "1",
            items_total=int(s.get("items_total", 0)), chunks_total=int(s.get("chunks_total", 0)),
            items_done=int(s.get("items_done", 0)), chunks_done=int(s.get("chunks_done", 0)),
            chunks_queued=int(s.get("chunks_queued", 0)), created=float(s["created"]),
            started=float(s.get("started", 0)), finished=float(s.get("finished", 0)),
            error=s.get("error", ""), seed=int(s.get("seed", 0)),
            temperature=float(s.get("temperature", 1.0)), owner=s.get("owner", ""))

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
