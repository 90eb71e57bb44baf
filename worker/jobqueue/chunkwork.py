"""What a worker computes for the chunks it holds, free of Redis.

``plan_batches`` cuts chunks into pipeline calls of at most ``batch_items`` items,
merging small chunks of one model (and contiguous sample chunks of one job) into one
call; ``compute_batch`` runs one call and splits its output per chunk (PNG-encoding
images when the job asks for PNG); ``start_batch`` is the same call in two halves
(network | coder), for the overlapped worker; ``pack_results`` packs a finished chunk
for Redis.
The worker loop (``consumer``) and the benchmark's in-process baseline both use them.
The overlapped worker calls ``compute_batch(..., png=False)`` and PNG-encodes a finished
chunk's images later, in its store thread (``encode_parts``): the same bytes, off the
compute thread.

Bad items (OnItemError PER_ITEM): a chunk's inputs may arrive with items already failed
(refused by SubmitJob; ``Held.failures``), and a reconstruct call decodes code by code
(``reconstruct_each``), so a code that cannot be decoded becomes an ``ItemFailure`` in
its slot instead of failing the chunk. FAIL_FAST chunks keep the all-or-nothing call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from latentserve.errors import CodeError, ResourceLimit
from latentserve.worker.codec.codes import with_index
from latentserve.worker.jobqueue.packing import (
    pack_failures,
    pack_images,
    pack_items,
    pack_shaped,
)
from latentserve.worker.jobqueue.records import (
    ChunkTask,
    ImageFormat,
    ItemFailure,
    JobKind,
    OnItemError,
)
from latentserve.worker.runtime.images import encode_png


class JobPipeline(Protocol):
    """What a worker calls (``latentserve.worker.runtime.pipeline.Pipeline`` implements it):
    each call in two halves, the first run at once, the returned function running the
    second (``Pipeline.compress(...) == compress_staged(...)()``, and so on), so the
    pipelined worker can run one batch's second half while the next batch's first runs."""

    def compress_staged(self, ref: str, images: np.ndarray | Sequence[np.ndarray]
                        ) -> Callable[[], list[bytes]]: ...

    def reconstruct_staged(self, codes: Sequence[bytes], ref: str | None = None
                           ) -> Callable[[], list[np.ndarray | CodeError | ResourceLimit]]: ...

    def sample_staged(self, ref: str, count: int, *, seed: int, temperature: float = 1.0,
                      start: int = 0) -> Callable[[], np.ndarray]: ...


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
    # Items refused on arrival (index in the chunk -> why); their inputs are placeholders.
    failures: dict[int, ItemFailure] = field(default_factory=dict)
    done: int = 0                      # items computed so far
    # Items whose call has started (overlap: handed on to the second half); a chunk all
    # of whose items have started is finished and stored, not released, on shutdown.
    started: int = 0
    parts: list[Any] = field(default_factory=list)  # result pieces, in order
    shard: int = 0                     # the stream shard it was read from (jobqueue/keys.py)


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
        if t.kind is JobKind.RECONSTRUCT:
            key += (t.on_item_error,)  # one call decodes all or nothing, the other each
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


def compute_batch(pipeline: JobPipeline, batch: list[Segment], *, png: bool = True) -> list[Any]:
    """One pipeline call for the batch; returns each segment's results.

    ``png=False``: images of a PNG job stay arrays, for ``encode_parts`` to encode.
    """
    return start_batch(pipeline, batch, png=png)()


def start_batch(pipeline: JobPipeline, batch: list[Segment], *,
                png: bool = True) -> Callable[[], list[Any]]:
    """``compute_batch`` in two halves: the first runs now (the network of a compress
    call, the coder of a reconstruct call, a sample call's draws), the returned function
    runs the rest and returns each segment's results, so a worker can run one batch's
    second half in another thread while the next batch's first half runs
    (``JobPipeline``'s ``compress_staged``, ``reconstruct_staged``, ``sample_staged``)."""
    task = batch[0].held.task
    assert task is not None
    png = png and task.image_format is ImageFormat.PNG
    sizes = [s.hi - s.lo for s in batch]
    if task.kind is JobKind.COMPRESS:
        pieces = [s.held.inputs[s.lo:s.hi] for s in batch]
        # Arrays of one shape join; images of several sizes (an any-size model) go as a
        # list, which the pipeline groups by size.
        inputs: Any = (np.concatenate(pieces) if all(isinstance(p, np.ndarray) for p in pieces)
                       and len({p.shape[1:] for p in pieces}) == 1
                       else [im for p in pieces for im in p])
        coding = pipeline.compress_staged(task.model, inputs)
        return lambda: _split(coding(), sizes)
    if task.kind is JobKind.RECONSTRUCT:
        codes = [c for s in batch for c in s.held.inputs[s.lo:s.hi]]
        rendering = pipeline.reconstruct_staged(codes, task.model or None)
        return functools.partial(_reconstructed, rendering, task, sizes, png)
    runs: list[Callable[[], np.ndarray]] = []
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
        runs.append(pipeline.sample_staged(task.model, count, seed=task.seed,
                                           temperature=task.temperature, start=start))
        i = j
    # the decoder runs in the second half
    return lambda: _image_parts(np.concatenate([run() for run in runs]), sizes, png)


def _reconstructed(rendering: Callable[[], list[Any]], task: ChunkTask, sizes: list[int],
                   png: bool) -> list[Any]:
    """A reconstruct call's second half: the decoder network, then each segment's images
    (PER_ITEM: a refused code is an ItemFailure in its slot; else the first refusal
    fails the call)."""
    each = rendering()
    if task.on_item_error is OnItemError.PER_ITEM:
        return _split([ItemFailure.of(r) if isinstance(r, (CodeError, ResourceLimit)) else
                       encode_png(r) if png else r for r in each], sizes)
    for i, r in enumerate(each):  # all or nothing: the first refusal fails the chunk
        if isinstance(r, CodeError):
            raise with_index(r, i, len(each))
        if isinstance(r, ResourceLimit):
            raise r
    # One array when the images share a shape; a list when they do not (any size).
    decoded = cast(list[np.ndarray], each)
    images = np.stack(decoded) if len({r.shape for r in decoded}) == 1 else decoded
    return _image_parts(images, sizes, png)


def _image_parts(images: Any, sizes: list[int], png: bool) -> list[Any]:
    pieces = _split(images, sizes)
    if png:
        return [[encode_png(im) for im in piece] for piece in pieces]
    return pieces


def encode_parts(h: Held) -> None:
    """PNG-encode a finished chunk's images in place when its job asks for PNG (parts made
    by ``compute_batch(..., png=False)``); ItemFailures and bytes stay. The parts are
    then what ``compute_batch(..., png=True)`` would have made."""
    t = h.task
    if t is None or t.kind is JobKind.COMPRESS or t.image_format is not ImageFormat.PNG:
        return
    h.parts = [[x if isinstance(x, ItemFailure | bytes) else encode_png(x) for x in part]
               for part in h.parts]


def chunk_failures(h: Held) -> dict[int, ItemFailure]:
    """A finished chunk's failed items (index in the chunk -> why): refused on arrival,
    or by the worker."""
    found = {i: x for i, x in enumerate(x for part in h.parts for x in part)
             if isinstance(x, ItemFailure)}
    return found | h.failures


def pack_results(h: Held) -> bytes:
    """A finished chunk's results as one Redis value (raw images stay an array); failed
    items keep their slots, as placeholders, and are listed (``packing.pack_failures``)."""
    assert h.task is not None
    raw = h.task.kind is not JobKind.COMPRESS and h.task.image_format is ImageFormat.RAW
    failures = chunk_failures(h)
    if not failures and not raw:
        return pack_items([b for part in h.parts for b in part])
    if not failures and all(isinstance(part, np.ndarray) for part in h.parts):
        return pack_images(np.concatenate(h.parts))  # one all-or-nothing call's arrays
    # A chunk whose every input was refused on arrival is not computed: no parts.
    items = [x for part in h.parts for x in part] or [b""] * h.n
    good = [x for i, x in enumerate(items) if i not in failures]
    if raw and good and len({im.shape for im in good}) > 1:
        # Images of several sizes (any-size models, or codes of several models).
        blank = np.zeros((good[0].shape[0], 1, 1), np.uint8)
        inner = pack_shaped([blank if i in failures else x for i, x in enumerate(items)])
    elif raw and good:
        array = np.zeros((h.n, *good[0].shape), np.uint8)
        for i, x in enumerate(items):
            if i not in failures:
                array[i] = x
        inner = pack_images(array)
    else:  # PNG files, codes, or raw images of which none succeeded
        inner = pack_items([b"" if i in failures or not isinstance(x, bytes) else x
                            for i, x in enumerate(items)])
    return pack_failures(inner, failures)


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
