"""What a worker computes for the chunks it holds, free of Redis.

``plan_batches`` cuts chunks into pipeline calls of at most ``batch_items`` items,
merging small chunks of one model (and contiguous sample chunks of one job) into one
call; ``compute_batch`` runs one call and splits its output per chunk (PNG-encoding
images when the job asks for PNG); ``pack_results`` packs a finished chunk for Redis.
The worker loop (``consumer``) and the benchmark's in-process baseline both use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .images import encode_png
from .jobtypes import ChunkTask, ImageFormat, JobKind
from .packing import pack_images, pack_items


class JobPipeline(Protocol):
    """What a worker calls (``latentserve.worker.pipeline.Pipeline`` implements it)."""

    def compress(self, ref: str, images: np.ndarray) -> list[bytes]: ...

    def reconstruct(self, codes: Sequence[bytes], ref: str | None = None) -> np.ndarray: ...

    def sample(self, ref: str, count: int, *, seed: int, temperature: float = 1.0,
               start: int = 0) -> np.ndarray: ...


@dataclass(eq=False)
class Held:
    """A chunk this worker has read and owns until it is stored, dropped or released."""

    pool: str
    entry_id: str
    job_id: str
    chunk: int
    n: int
    deliveries: int
    task: ChunkTask | None = None
    inputs: Any = None                 # unpacked payload (images or codes), or None
    done: int = 0                      # items computed so far
    parts: list[Any] = field(default_factory=list)  # result pieces, in order


@dataclass
class Segment:
    held: Held
    lo: int   # item offset within the chunk
    hi: int


def plan_batches(chunks: list[Held], limit: int) -> list[list[Segment]]:
    """Cut chunks into pipeline calls of <= batch_items items, merging compatible ones."""
    groups: dict[tuple[Any, ...], list[Held]] = {}
    for h in chunks:
        t = h.task
        assert t is not None
        key: tuple[Any, ...] = (t.kind, t.model, t.image_format)
        if t.kind is JobKind.SAMPLE:
            key += (h.job_id, t.seed, t.temperature)
        groups.setdefault(key, []).append(h)
    batches: list[list[Segment]] = []
    for members in groups.values():
        batch: list[Segment] = []
        room = limit
        for h in sorted(members, key=lambda h: h.chunk):
            lo = 0
            while lo < h.n:
                take = min(room, h.n - lo)
                batch.append(Segment(h, lo, lo + take))
                lo += take
                room -= take
                if room == 0:
                    batches.append(batch)
                    batch, room = [], limit
        if batch:
            batches.append(batch)
    return batches


def compute_batch(pipeline: JobPipeline, batch: list[Segment]) -> list[Any]:
    """One pipeline call for the batch; returns each segment's results."""
    task = batch[0].held.task
    assert task is not None
    sizes = [s.hi - s.lo for s in batch]
    if task.kind is JobKind.COMPRESS:
        images = np.concatenate([s.held.inputs[s.lo:s.hi] for s in batch])
        codes = pipeline.compress(task.model, images)
        return _split(codes, sizes)
    if task.kind is JobKind.RECONSTRUCT:
        codes = [c for s in batch for c in s.held.inputs[s.lo:s.hi]]
        images = pipeline.reconstruct(codes, task.model or None)
    else:
        runs: list[np.ndarray] = []
        i = 0
        while i < len(batch):  # one call per run of contiguous global indices
            start = _global(batch[i])
            count = 0
            j = i
            while j < len(batch):
                s = batch[j]
                if _global(s) != start + count:
                    break
                count += s.hi - s.lo
                j += 1
            runs.append(pipeline.sample(task.model, count, seed=task.seed,
                                             temperature=task.temperature, start=start))
            i = j
        images = np.concatenate(runs)
    pieces = _split(images, sizes)
    if task.image_format is ImageFormat.PNG:
        return [[encode_png(im) for im in piece] for piece in pieces]
    return pieces


def pack_results(h: Held) -> bytes:
    """A finished chunk's results as one Redis value (raw images stay an array)."""
    assert h.task is not None
    if h.task.kind is not JobKind.COMPRESS and h.task.image_format is ImageFormat.RAW:
        return pack_images(np.concatenate(h.parts))
    return pack_items([b for part in h.parts for b in part])


def _global(seg: Segment) -> int:
    """Global item index of a segment's first item (every chunk but the last is full)."""
    assert seg.held.task is not None
    return seg.held.chunk * seg.held.task.chunk_size + seg.lo


def _split(items: Any, sizes: list[int]) -> list[Any]:
    out, lo = [], 0
    for n in sizes:
        out.append(items[lo:lo + n])
        lo += n
    return out
