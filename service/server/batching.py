"""Dynamic batching: concurrent requests for one model merged into one onnxruntime call.

A ``DynamicBatcher`` owns one queue (one model, one operation) and one dispatcher
thread; merged batches run on a shared ``ComputeLanes`` of a few threads. A batch
starts when a compute worker is free and one of these holds (Triton's semantics
plus an idle shortcut):

- the queue holds ``max_batch_size`` items;
- the oldest queued item has waited ``max_queue_delay_us``;
- ``dispatch_when_idle`` and no batch of this batcher is running (so a lone request
  pays no delay, and under load batches grow while earlier ones compute). A request
  that finds the queue empty, nothing running and a worker free runs at once in the
  caller's thread, skipping two thread hand-offs.

Who runs a batch: the thread that finishes a batch takes the next one if it is ready
(keeping its compute slot) and hands it to a thread already waiting for one of its
requests (which had to wake up for its result anyway), else to a lane thread; the
dispatcher thread only wakes when a timer matters (the queue delay, a deadline) or a
submission makes a batch ready. So under load a batch costs one thread wake-up per
request, not three.

A request larger than ``max_batch_size`` is cut into max-size batches; its results
come back whole and in order. Cancelled and deadline-expired requests are dropped
from the queue without computing. If a merged batch fails, each request in it is run
again on its own, so one client's bad input never fails another client's request.

The batcher is generic: ``fn`` takes a sequence (a numpy array, concatenated along
axis 0, or a list) and returns one result per item (an array or a list).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from latentserve.errors import ResourceLimit, Unavailable
from latentserve.service.status import DeadlineExpired, RequestCancelled

Items = Any  # np.ndarray or a list: anything sliceable along its first axis
BatchFn = Callable[[Items], Items]


def concat(pieces: Sequence[Items]) -> Items:
    """Join slices along the first axis: arrays with np.concatenate, anything else as a list."""
    if len(pieces) == 1:
        return pieces[0]
    if all(isinstance(p, np.ndarray) for p in pieces):
        return np.concatenate(pieces)
    return list(itertools.chain.from_iterable(pieces))


class BatchObserver(Protocol):
    """What a batcher reports (the service forwards it to Prometheus)."""

    def on_batch(self, size: int, seconds: float) -> None: ...
    def on_wait(self, seconds: float, count: int) -> None: ...
    def on_queued(self, count: int) -> None: ...
    def on_dropped(self, reason: str, count: int) -> None: ...


class NullObserver:
    def on_batch(self, size: int, seconds: float) -> None: pass
    def on_wait(self, seconds: float, count: int) -> None: pass
    def on_queued(self, count: int) -> None: pass
    def on_dropped(self, reason: str, count: int) -> None: pass


class ComputeLanes:
    """A few threads that run batches. A dispatcher takes a slot before forming a batch,
    so while every worker is busy, requests keep accumulating into the next batch."""

    def __init__(self, count: int, *, name: str = "latentserve-compute") -> None:
        if count < 1:
            raise ValueError(f"compute lanes need >= 1 lane, got {count}")
        self.count = count
        self._executor = ThreadPoolExecutor(count, thread_name_prefix=name)
        self._slots = threading.Semaphore(count)

    def acquire(self) -> None:
        self._slots.acquire()

    def try_acquire(self) -> bool:
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        self._slots.release()

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a worker; the caller holds a slot, released when ``job`` ends."""
        def wrapped() -> None:
            try:
                job()
            finally:
                self._slots.release()
        self._executor.submit(wrapped)

    def spawn(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a worker; the caller holds a slot, which ``job`` itself hands on
        or releases."""
        self._executor.submit(job)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class Ticket:
    """One caller's submission: ``n`` items whose results arrive, in order, in ``result()``.

    A thread waiting in ``result()`` may be handed a batch to run meanwhile (one holding
    some of its items, taken by the batcher): it runs it, then goes on waiting.
    """

    def __init__(self, batcher: DynamicBatcher | None, items: Items,
                 deadline: float | None) -> None:
        self.items = items
        self.n = len(items)
        self.deadline = deadline  # time.monotonic() value, or None
        self.enqueued = time.monotonic()
        self.taken = 0  # items handed to batches so far (guarded by the batcher's lock)
        self._batcher = batcher
        self._cond = threading.Condition(threading.Lock())
        self._parts: dict[int, Items] | None = None
        self._done = 0
        # (True, results) or (False, exception) once finished.
        self._outcome: tuple[bool, Any] | None = None
        self._job: list[_Part] | None = None  # a batch handed to a thread waiting here
        self._waiting = 0  # threads in result()
        self._busy = False  # one of them is running a handed batch
        self.cancelled = False

    def result(self, timeout: float | None = None) -> Items:
        """Block until every item's result is in; raises the request's error (TimeoutError
        after ``timeout`` seconds)."""
        cond = self._cond
        with cond:
            if self._outcome is None or self._job is not None:
                self._wait_locked(timeout)
            ok, value = self._outcome  # type: ignore[misc]
        if ok:
            return value
        raise value

    def _wait_locked(self, timeout: float | None) -> None:
        cond = self._cond
        end = None if timeout is None else time.monotonic() + timeout
        self._waiting += 1
        try:
            while True:
                job = self._job
                if job is not None:
                    self._job, self._busy = None, True
                    cond.release()
                    try:
                        self._run_job(job)
                    finally:
                        cond.acquire()
                        self._busy = False
                    continue
                if self._outcome is not None:
                    return
                if end is None:
                    cond.wait()
                else:
                    left = end - time.monotonic()
                    if left <= 0:
                        raise TimeoutError()
                    cond.wait(left)
        finally:
            self._waiting -= 1
            leftover, self._job = self._job, None
            if leftover is not None:  # handed over just as this wait ended: a lane runs it
                cond.release()
                try:
                    self._spawn_job(leftover)
                finally:
                    cond.acquire()

    def _run_job(self, parts: list[_Part]) -> None:
        assert self._batcher is not None
        # A fresh context, as on a lane thread: the batch is not this call's alone.
        contextvars.Context().run(self._batcher._execute, parts)

    def _spawn_job(self, parts: list[_Part]) -> None:
        assert self._batcher is not None
        self._batcher.lanes.spawn(functools.partial(self._batcher._execute, parts))

    def _offer(self, parts: list[_Part]) -> bool:
        """Hand ``parts`` (a taken batch, with its compute slot) to a thread waiting here."""
        with self._cond:
            if (self._waiting and not self._busy and self._job is None
                    and self._outcome is None):
                self._job = parts
                self._cond.notify()
                return True
        return False

    def cancel(self) -> None:
        """Drop what is still queued and fail the ticket with RequestCancelled (idempotent)."""
        if self._outcome is not None:
            return
        self.cancelled = True
        if self._batcher is not None:
            self._batcher._wake()
        self._fail(RequestCancelled("the request was cancelled"))

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    def _deliver(self, start: int, results: Items) -> None:
        with self._cond:
            if self._outcome is not None:
                return
            if start == 0 and len(results) == self.n:  # the whole request in one batch
                self._outcome = (True, results)
                self._cond.notify_all()
                return
            parts = self._parts
            if parts is None:
                parts = self._parts = {}
            parts[start] = results
            self._done += len(results)
            if self._done < self.n:
                return
            ordered = [parts[k] for k in sorted(parts)]
            self._outcome = (True, concat(ordered))
            self._cond.notify_all()

    def _set(self, results: Items) -> None:
        with self._cond:
            if self._outcome is None:
                self._outcome = (True, results)
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._outcome is not None:
                return
            self._outcome = (False, exc)
            self._cond.notify_all()


@dataclass(frozen=True)
class _Part:
    ticket: Ticket
    start: int
    stop: int

    @property
    def items(self) -> Items:
        return self.ticket.items[self.start:self.stop]


class DynamicBatcher:
    """Merges submissions into batches of at most ``max_batch_size`` items for ``fn``."""

    def __init__(self, fn: BatchFn, *, lanes: ComputeLanes, max_batch_size: int,
                 max_queue_delay_us: int, batching: bool = True,
                 dispatch_when_idle: bool = True, max_queue_items: int = 1 << 30,
                 observer: BatchObserver | None = None, name: str = "batcher") -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.fn = fn
        self.lanes = lanes
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self.batching = batching
        self.dispatch_when_idle = dispatch_when_idle
        self.max_queue_items = max_queue_items
        self.observer: BatchObserver = observer or NullObserver()
        self.name = name
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._queued = 0  # items not yet taken into a batch
        self._running = 0  # batches of this batcher computing now
        self._closed = False
        # When the dispatcher sleeps in the condition: the time it wakes up by itself
        # (inf: not before a notify); None while it is awake (it looks again anyway).
        self._asleep_until: float | None = None
        self._thread = threading.Thread(target=self._dispatch_loop, name=f"dispatch-{name}",
                                        daemon=True)
        self._thread.start()

    # -- callers ---------------------------------------------------------------------
    def submit(self, items: Items, *, deadline: float | None = None) -> Ticket:
        """Queue ``items``; ``deadline`` is a time.monotonic() after which they are dropped."""
        ticket = Ticket(self, items, deadline)
        if ticket.n == 0:
            ticket._set(items[:0])
            return ticket
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down; retry on another instance")
            if self._queued + ticket.n > self.max_queue_items:
                raise ResourceLimit(
                    f"the queue of {self.name} holds {self._queued} images; adding "
                    f"{ticket.n} would pass its limit of {self.max_queue_items}; retry later",
                    limit="max_queue_images")
            # Fast path: nothing to wait for and nothing to merge with, so run the batch
            # in the caller's thread (no hand-off to the dispatcher and a lane thread).
            inline = (not self._queue and ticket.n <= self.max_batch_size
                      and (not self.batching or self.dispatch_when_idle and self._running == 0)
                      and self.lanes.try_acquire())
            if inline:
                self._running += 1
                ticket.taken = ticket.n
                self.observer.on_wait(0.0, ticket.n)
            else:
                self._queue.append(ticket)
                self._queued += ticket.n
                self.observer.on_queued(self._queued)
                self._wake_dispatcher_locked(ticket.enqueued)
        if inline:
            self._execute([_Part(ticket, 0, ticket.n)])  # hands on or releases the slot
        return ticket

    def _wake_dispatcher_locked(self, now: float) -> None:
        """After a submission: wake the dispatcher if it sleeps past when it must act now
        (a batch became ready, or an earlier deadline). A batch running now takes the
        next one itself when it ends."""
        asleep_until = self._asleep_until
        if asleep_until is None:
            return
        ready, wait = self._ready_locked(now)
        if ready or now + wait < asleep_until:
            self._cond.notify()

    def close(self, *, drain: bool = True) -> None:
        """Stop accepting; finish (``drain``) or fail with Unavailable what is queued."""
        with self._cond:
            self._closed = True
            if not drain:
                for t in self._queue:
                    t._fail(Unavailable("the server is shutting down; retry elsewhere"))
                self._queue.clear()
                self._queued = 0
            self._cond.notify_all()
        self._thread.join()
        if drain:  # and the batches taken from the queue (running on other threads)
            with self._cond:
                while self._running:
                    self._cond.wait()

    @property
    def queued(self) -> int:
        return self._queued

    # -- dispatcher ------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _drop_dead_locked(self) -> None:
        if not self._queue:
            return
        now = time.monotonic()
        keep: deque[Ticket] = deque()
        for t in self._queue:
            reason = ("cancelled" if t.cancelled else "failed" if t.finished else
                      "deadline" if t.deadline is not None and now >= t.deadline else None)
            if reason is None:
                keep.append(t)
                continue
            left = t.n - t.taken
            self._queued -= left
            self.observer.on_dropped(reason, left)
            if reason == "deadline":
                t._fail(DeadlineExpired(
                    f"the deadline passed after {now - t.enqueued:.3f} s in the queue; "
                    "the request was dropped (raise the client's timeout)"))
        if len(keep) != len(self._queue):
            self._queue = keep
            self.observer.on_queued(self._queued)

    def _ready_locked(self, now: float) -> tuple[bool, float]:
        """(start a batch now?, else how long to wait before looking again, seconds)."""
        if not self.batching or self._closed or self._queued >= self.max_batch_size:
            return True, 0.0
        if self.dispatch_when_idle and self._running == 0:
            return True, 0.0
        wait = self._queue[0].enqueued + self.delay_s - now
        if wait <= 0:
            return True, 0.0
        # Wake up for the first deadline too, to drop that request on time.
        deadlines = [t.deadline for t in self._queue if t.deadline is not None]
        if deadlines:
            wait = min(wait, min(deadlines) - now)
        return False, max(0.0, wait)

    def _sleep_locked(self, wait: float | None) -> None:
        self._asleep_until = math.inf if wait is None else time.monotonic() + wait
        try:
            self._cond.wait(wait)
        finally:
            self._asleep_until = None

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._drop_dead_locked()
                    if not self._queue:
                        if self._closed:
                            return
                        self._sleep_locked(None)
                        continue
                    ready, wait = self._ready_locked(time.monotonic())
                    if ready:
                        break
                    self._sleep_locked(wait)
            # Wait for a compute worker outside the lock: submissions keep queueing.
            self.lanes.acquire()
            with self._cond:
                self._drop_dead_locked()
                parts = self._take_locked()
                if parts:
                    self._running += 1
            if not parts:
                self.lanes.release()
                continue
            self._launch(parts)

    def _launch(self, parts: list[_Part]) -> None:
        """Start a taken batch (its compute slot held): on a thread already waiting for
        one of its requests, else on a lane thread."""
        for p in parts:
            if p.ticket._offer(parts):
                return
        self.lanes.spawn(functools.partial(self._execute, parts))

    def _take_locked(self) -> list[_Part]:
        parts: list[_Part] = []
        room = self.max_batch_size
        now = time.monotonic()
        while self._queue and room > 0:
            t = self._queue[0]
            k = min(room, t.n - t.taken)
            parts.append(_Part(t, t.taken, t.taken + k))
            self.observer.on_wait(now - t.enqueued, k)
            t.taken += k
            room -= k
            self._queued -= k
            if t.taken == t.n:
                self._queue.popleft()
            if not self.batching:
                break  # one request (or one max-size piece of it) per batch
        self.observer.on_queued(self._queued)
        return parts

    def _execute(self, parts: list[_Part]) -> None:
        """Run a taken batch (holding a compute slot, counted in ``_running``); then give
        the slot to the next batch if one is ready now, else release it."""
        nxt: list[_Part] = []
        try:
            live = [p for p in parts if not p.ticket.finished]
            if live:
                self._run_parts(live)
        finally:
            with self._cond:
                self._running -= 1
                if self._queue:
                    self._drop_dead_locked()
                    if self._queue and self._ready_locked(time.monotonic())[0]:
                        nxt = self._take_locked()
                        if nxt:
                            self._running += 1
                if self._closed:
                    self._cond.notify_all()  # close() waits for the running batches
            if not nxt:
                self.lanes.release()
        if nxt:
            self._launch(nxt)

    def _run_parts(self, parts: list[_Part]) -> None:
        try:
            results = self._call(concat([p.items for p in parts]))
        except Exception as exc:  # noqa: BLE001 - delivered to the callers
            if len({id(p.ticket) for p in parts}) == 1:
                parts[0].ticket._fail(exc)
                return
            # Several requests: run each alone, so the error reaches only its owner.
            for p in parts:
                if p.ticket.finished:
                    continue
                try:
                    p.ticket._deliver(p.start, self._call(p.items))
                except Exception as own:  # noqa: BLE001
                    p.ticket._fail(own)
            return
        offset = 0
        for p in parts:
            size = p.stop - p.start
            p.ticket._deliver(p.start, results[offset:offset + size])
            offset += size

    def _call(self, items: Items) -> Items:
        start = time.perf_counter()
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: batch function returned {len(results)} results "
                               f"for {len(items)} items")
        self.observer.on_batch(len(items), time.perf_counter() - start)
        return results


K = TypeVar("K", bound=Hashable)


class BatcherSet(Generic[K]):
    """One DynamicBatcher per key (e.g. (operation, model)), created on first use."""

    def __init__(self, factory: Callable[[K], DynamicBatcher]) -> None:
        self._factory = factory
        self._batchers: dict[K, DynamicBatcher] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, key: K) -> DynamicBatcher:
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down; retry on another instance")
            batcher = self._batchers.get(key)
            if batcher is None:
                batcher = self._batchers[key] = self._factory(key)
            return batcher

    def retire(self, which: Callable[[K], bool]) -> None:
        """Close (draining) the batchers whose key ``which`` picks; the next ``get`` of
        such a key builds a new one (a model unloaded, or its settings changed)."""
        with self._lock:
            gone = [self._batchers.pop(k) for k in list(self._batchers) if which(k)]
        for b in gone:
            b.close(drain=True)

    def close(self, *, drain: bool = True) -> None:
        with self._lock:
            self._closed = True
            batchers = list(self._batchers.values())
        for b in batchers:
            b.close(drain=drain)
