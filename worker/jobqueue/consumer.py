"""The Redis Streams job worker: ``create_worker(config, pipeline).run()``.

One consumer group (``workers``) on one task stream per model pool; each worker is a
consumer. The loop:

1. Reclaim the entries of dead consumers (no health key: ``recovery``) at once, and
   (XAUTOCLAIM) entries that sat pending longer than ``claim_idle_s``, which no live
   worker extends (a failed chunk's retry). A chunk delivered more than
   ``max_deliveries`` times goes to the dead-letter stream and its job fails with the
   reason; other jobs keep flowing.
2. Otherwise read new entries (XREADGROUP, blocking up to ``block_ms``).
3. Begin each chunk (skips chunks of cancelled, failed or expired jobs, and fails a job
   whose upload went silent past ``receiving_timeout_s``), cut the work
   into pipeline calls of at most ``batch_items`` items, merging small chunks of one
   model (and contiguous sample chunks of one job) into one call.
4. Between calls: stop chunks whose job was cancelled; on shutdown past the grace
   period, give unfinished chunks back to the queue (``release``).
5. Store each finished chunk through ``JobStore.store_chunk`` (idempotent; XACKs).

With ``overlap`` (the default; ``--overlap false`` runs every step in this thread) step 5
and the PNG encoding of image results run in a store thread, so packing, PNG encoding
and the STORE round trips of finished chunks overlap the next pipeline calls and the
next reads; this thread reads, begins, plans,
checks and computes exactly as without it (what a worker holds, when it looks for
cancels and shutdown, what a SIGTERM finishes or releases). A chunk stays in ``_held``
until stored, so the heartbeat extends it while it waits for the store thread; the
backlog is bounded (a call waits while over ``2 * batch_items`` items wait to be
stored); on shutdown the store thread stores what it holds within the grace, then
whatever is left is released. With ``pipeline_calls`` (the default too) each call runs
in two halves, the second in a stage thread (``_stage_loop``, ``_hand_over``).

A heartbeat thread extends this worker's claims (XCLAIM ... JUSTID) so a healthy long
chunk is never reclaimed, refreshes the worker's TTL'd health key and sweeps expired
job ids and abandoned uploads. An item's own bad input is an ItemFailure in its slot
(OnItemError PER_ITEM, ``chunkwork``); other errors of the input (InvalidInput,
CodeError, ResourceLimit) fail the job at once; anything else is retried by redelivery
until the delivery cap.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis

from latentserve.errors import CodeError, InvalidInput, LatentServeError, ResourceLimit
from latentserve.worker.config import WorkerConfig
from latentserve.worker.jobqueue.chunkwork import (
    Held,
    JobPipeline,
    Segment,
    chunk_failures,
    compute_batch,
    encode_parts,
    pack_results,
    plan_batches,
    start_batch,
)
from latentserve.worker.jobqueue.cluster import TRANSIENT_ERRORS
from latentserve.worker.jobqueue.keys import as_text as _s
from latentserve.worker.jobqueue.packing import unpack_failures
from latentserve.worker.jobqueue.recovery import Recovery
from latentserve.worker.jobqueue.store import JobKind, JobStore, connect
from latentserve.worker.metrics import WorkerMetrics
from latentserve.worker.tracing import chunk_spans

log = logging.getLogger(__name__)

# A shard's blocking read waits at most this long when there are several shards, so work
# queued on another shard waits at most (shards - 1) times it (jobqueue/keys.py).
SHARD_BLOCK_MS = 100
# How long shutdown waits for a stage or store thread still inside one call past the grace
# (a Redis round trip is bounded by the client's socket timeout, a network run by its batch).
LINGER_S = 30.0

# Errors of the job's own input: another delivery would fail the same way.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (InvalidInput, CodeError, ResourceLimit)


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass
class WorkerStats:
    chunks: int = 0
    items: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    released: int = 0
    retried: int = 0


class Worker:
    """A consumer of the task streams; ``run()`` blocks until stopped (or idle, in burst)."""

    def __init__(self, config: WorkerConfig, pipeline: JobPipeline,
                 client: redis.Redis | None = None,
                 metrics: WorkerMetrics | None = None, *,
                 owned: Sequence[Closeable] = ()) -> None:
        self.config = config
        self.pipeline = pipeline
        # What was built for this worker alone (its coder pool; its Redis client unless
        # the caller passed one): closed when run() returns, so no socket outlives it.
        self.r = client or connect(config.redis_url)
        self._owned = (*owned, *(() if client is not None else (self.r,)))
        self.store = JobStore(self.r, config.queue)
        self.keys = config.keys
        self.consumer = config.consumer
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._done = threading.Event()   # run() has returned: the heartbeat ends
        self._deadline = float("inf")   # monotonic time by which held chunks are released
        self._held: dict[str, Held] = {}
        self._held_lock = threading.Lock()
        self._last_reclaim = 0.0
        self._last_dead_check = 0.0
        self._backlog = False  # the last reclaim pass took a full batch: more may wait
        self.recovery = Recovery(self.r, self.keys, self.consumer)
        self.metrics = metrics or WorkerMetrics()
        self.metrics.watch(self.stats, lambda: len(self._held))
        self._started = time.time()
        self._taking = False  # models preloaded, taking work
        self._shards = self.keys.all_shards()
        self._next_shard = 0  # where the next read starts, so every shard gets its turn
        # Overlap mode: computed chunks for the store thread, and how many items they
        # hold (under _store_cond, notified as each is stored).
        self._store_q: queue.SimpleQueue[Held | None] = queue.SimpleQueue()
        self._store_backlog = 0
        self._store_cond = threading.Condition()
        self._store_thread: threading.Thread | None = None
        # pipeline_calls (with overlap): the second halves of calls (chunkwork.start_batch)
        # for the stage thread, and how many items they hold (under _store_cond too).
        self._stage_q: queue.SimpleQueue[tuple[list[Segment], Callable[[], list[Any]]]
                                         | None] = queue.SimpleQueue()
        self._stage_backlog = 0
        self._stage_thread: threading.Thread | None = None
        # A stage or store thread still inside a call when its join timed out (past the
        # grace): run() waits for it once its chunks are released, before closing Redis.
        self._lingering: list[threading.Thread] = []
        # The last call's second half, held back by the loop's thread until its next
        # Redis round trips are done (``_hand_over``).
        self._handoff: tuple[list[Segment], Callable[[], list[Any]]] | None = None

    # -- lifecycle --------------------------------------------------------------------
    def request_stop(self, grace_s: float | None = None) -> None:
        """Stop taking work; finish held chunks within the grace period, else release them.

        Safe to call from a signal handler. A second call shortens the grace to ``grace_s``
        (default: now).
        """
        grace = self.config.grace_s if grace_s is None else grace_s
        if self._stop.is_set():
            grace = 0.0 if grace_s is None else grace_s
        self._deadline = min(self._deadline, time.monotonic() + grace)
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start_thread(self) -> threading.Thread:
        """Run in a daemon thread (the service's embedded worker)."""
        t = threading.Thread(target=self.run, name=f"worker-{self.consumer}", daemon=True)
        t.start()
        return t

    def run(self) -> WorkerStats:
        """Consume until ``request_stop`` (or, in burst mode, until the queues are empty)."""
        for pool in self.config.pools:
            self._retry_redis(lambda pool=pool: self.store.ensure_group(pool))
        # The health key exists before the first read: other workers take a consumer
        # that holds entries without one for dead and claim its entries at once.
        self._retry_redis(self._heartbeat)
        beat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                name=f"heartbeat-{self.consumer}")
        beat.start()
        backoff = 0.05
        down_since: float | None = None  # when Redis stopped answering the loop
        overlap = self.config.overlap
        switch = sys.getswitchinterval()
        if overlap and self.config.gil_switch_ms > 0:
            # Several stage threads share the GIL: one that needs it back (after I/O or
            # a network call) waits up to the interval while another runs Python.
            sys.setswitchinterval(self.config.gil_switch_ms / 1000)
        try:
            if self.config.preload:
                self._preload()
            if overlap:
                self._start_store_thread()
                if self.config.pipeline_calls:
                    self._stage_thread = threading.Thread(
                        target=self._stage_loop, daemon=True, name=f"stage-{self.consumer}")
                    self._stage_thread.start()
            self._taking = True
            while not self._stop.is_set():
                try:
                    entries = self._reclaim() or self._read()
                    if entries:
                        self._process(entries)
                    elif self.config.burst and self._queues_empty():
                        break
                    backoff = 0.05
                    if down_since is not None:
                        log.info("worker %s: Redis reachable again after %.1fs",
                                 self.consumer, time.monotonic() - down_since)
                        down_since = None
                except TRANSIENT_ERRORS as exc:  # first: a cluster's are ResponseErrors too
                    log.warning("worker %s: Redis unavailable (%s); retrying in %.2fs",
                                self.consumer, exc, backoff)
                    down_since = down_since or time.monotonic()
                    with self._held_lock:
                        for eid in self._held:
                            self.metrics.forget(eid)
                        # Stop extending what we read: those entries stay pending in
                        # Redis and are reclaimed after claim_idle_s (by us or another).
                        self._held.clear()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # The stream or group vanished (a Redis without persistence restarted,
                    # a FLUSHDB, or a failover that lost the group's creation): create them
                    # again and go on.
                    log.warning("worker %s: %s; creating the consumer group again",
                                self.consumer, exc)
                    for pool in self.config.pools:
                        self.store.ensure_group(pool)
        finally:
            sys.setswitchinterval(switch)
            self._stop.set()
            self._stop_store_thread()
            self._release_all()
            self._join_lingering()
            self._done.set()
            beat.join(timeout=5)
            self._goodbye()
            self.close()
        return self.stats

    def close(self) -> None:
        """Release what this worker owns (its coder processes, the Redis client it
        opened); run() does it on return."""
        owned, self._owned = self._owned, ()
        for thing in owned:
            thing.close()

    def _preload(self) -> None:
        """Load the newest version of every model now, so no chunk waits for a load.

        A model that fails to load is only logged: its chunks fail (and are retried,
        then dead-lettered) while every other model keeps being served.
        """
        models = getattr(self.pipeline, "models", None)
        if models is None:
            return
        newest = {e.manifest.name: e.manifest.ref for e in models()}
        for ref in newest.values():
            if self._stop.is_set():
                return
            try:
                start = time.monotonic()
                runtime = self.pipeline.runtime(ref)  # type: ignore[attr-defined]
                self.metrics.model_loaded(runtime, time.monotonic() - start)
            except Exception as exc:  # noqa: BLE001 - one bad model must not stop the rest
                log.error("worker %s: cannot load %s: %s", self.consumer, ref, exc)

    def _retry_redis(self, fn: Any, limit_s: float = 60.0) -> Any:
        """Call ``fn`` until Redis answers (it may be restarting), up to ``limit_s``."""
        start = time.monotonic()
        delay = 0.05
        failed = False
        while True:
            try:
                result = fn()
            except TRANSIENT_ERRORS as exc:
                if time.monotonic() > start + limit_s:
                    raise
                if not failed:
                    log.warning("worker %s: Redis unavailable (%s); retrying for up to %.0fs",
                                self.consumer, exc, limit_s)
                failed = True
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if failed:
                log.info("worker %s: Redis reachable again after %.1fs", self.consumer,
                         time.monotonic() - start)
            return result

    # -- taking work ------------------------------------------------------------------
    def _read(self) -> list[Held]:
        """New entries of one shard: the first, from a rotating start, that has some.

        A shard's streams of every pool share its slot and are read in one XREADGROUP.
        With one shard that read blocks up to ``block_ms``; with several, each shard is
        first asked without blocking, then one (in turn) blocks up to SHARD_BLOCK_MS.
        """
        block = 50 if self._stop.is_set() else self.config.block_ms
        n = len(self._shards)
        start, self._next_shard = self._next_shard, (self._next_shard + 1) % n
        order = [(start + i) % n for i in range(n)]
        if self._handoff is not None or (self.config.burst and self._in_flight()):
            # Work is held back or in flight: look without blocking, and if nothing is
            # queued hand it over (a blocking read would hold it back up to block_ms)
            # and, in burst mode, wait for it instead of for Redis (whose BLOCK
            # timeouts run late by up to 1/hz, 100 ms by default).
            for shard in order:
                out = self._read_shard(shard, None)
                if out:
                    return out
            self._hand_over()
            if self.config.burst:
                self._wait_idle()
                return []
        if n == 1:
            return self._read_shard(order[0], block)
        for shard in order:
            out = self._read_shard(shard, None)
            if out:
                return out
        return self._read_shard(start, min(block, SHARD_BLOCK_MS))

    def _read_shard(self, shard: int, block: int | None) -> list[Held]:
        keys = self._shards[shard]
        pools = {keys.stream(p): p for p in self.config.pools}
        # Binary replies (RESP2, see store.connect): None when the block timed out, else
        # one [stream, entries] pair per stream, each entry (entry id, its fields).
        reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                     self.r.xreadgroup(self.keys.group, self.consumer,
                                       dict.fromkeys(pools, ">"),
                                       count=self.config.read_count, block=block))
        out = []
        for stream, entries in reply or []:
            pool = pools[_s(stream)]
            for eid, fields in entries:
                out.append(self._hold(pool, _s(eid), fields, delivered=1, shard=shard))
        return out

    def _reclaim(self) -> list[Held]:
        """Take over entries of dead consumers, else entries idle past ``claim_idle_s``;
        dead-letter those over the delivery cap.

        Dead consumers are looked for every heartbeat, idle entries every claim_idle_s / 4.
        A pass takes at most ``read_count`` entries; after a full one (a backlog, such as
        several killed workers' chunks) the next pass runs at once.
        """
        now = time.monotonic()
        backlog, self._backlog = self._backlog, False
        out: list[Held] = []
        if backlog or now - self._last_dead_check >= self.config.heartbeat_s:
            self._last_dead_check = now
            out = self._reclaim_dead()
        if not out and (backlog or now - self._last_reclaim >= max(self.config.claim_idle_s / 4,
                                                                    0.05)):
            self._last_reclaim = now
            out = self._reclaim_idle()
        return out

    def _reclaim_dead(self) -> list[Held]:
        """Claim the entries of consumers whose health key is gone (killed workers)."""
        out: list[Held] = []
        room = self.config.read_count
        for pool, shard in self._pool_shards():
            for consumer, pending in self.recovery.dead_consumers(pool, shard):
                if room <= 0:
                    self._backlog = True
                    return out
                claim = self.recovery.claim(pool, consumer, room, shard)
                if claim.left < 0:  # its health key came back between the two reads
                    continue
                log.info("worker %s: consumer %s is dead (no health key) holding %d entries "
                         "on pool %s; reclaimed %d now", self.consumer, consumer, pending,
                         pool, len(claim.entries))
                room -= len(claim.entries)
                self._backlog = self._backlog or claim.left > 0
                self.metrics.reclaimed("dead", len(claim.entries))
                out += self._adopt(pool, shard, [(e.entry_id, e.fields, e.delivered)
                                                 for e in claim.entries])
        return out

    def _reclaim_idle(self) -> list[Held]:
        """XAUTOCLAIM entries pending longer than ``claim_idle_s`` (nobody extends them)."""
        idle_ms = int(self.config.claim_idle_s * 1000)
        out: list[Held] = []
        for pool, shard in self._pool_shards():
            stream = self._shards[shard].stream(pool)
            reply = self.r.xautoclaim(stream, self.keys.group, self.consumer, idle_ms,
                                      start_id="0-0", count=self.config.read_count)
            # Redis 6.2 returns entries deleted meanwhile (a cancelled job's) without
            # fields; 7+ lists them apart and drops them from the pending list itself.
            gone = [eid for eid, fields in reply[1] if not fields]
            if gone:
                self.r.xack(stream, self.keys.group, *gone)
            claimed = [(eid, fields) for eid, fields in reply[1] if fields]
            if not claimed:
                continue
            log.info("worker %s: reclaimed %d entries idle over %.1fs on pool %s",
                     self.consumer, len(claimed), self.config.claim_idle_s, pool)
            self._backlog = self._backlog or len(reply[1]) >= self.config.read_count
            self.metrics.reclaimed("idle", len(claimed))
            with self.r.pipeline(transaction=False) as p:
                for eid, _ in claimed:
                    p.xpending_range(stream, self.keys.group, min=eid, max=eid, count=1)
                counts = p.execute()
            out += self._adopt(pool, shard, [
                (_s(eid), fields, int(pending[0]["times_delivered"]) if pending else 1)
                for (eid, fields), pending in zip(claimed, counts, strict=True)])
        return out

    def _pool_shards(self) -> list[tuple[str, int]]:
        """(pool, shard) of every task stream this worker reads."""
        return [(pool, shard) for pool in self.config.pools for shard in range(len(self._shards))]

    def _adopt(self, pool: str, shard: int,
               claimed: list[tuple[str, dict[bytes, bytes], int]]) -> list[Held]:
        """Hold reclaimed entries (id, fields, times delivered) of shard ``shard``'s
        stream; dead-letter those over ``max_deliveries``."""
        out = []
        for eid, fields, times in claimed:
            held = self._hold(pool, eid, fields, delivered=times, shard=shard)
            if held.deliveries > self.config.max_deliveries:
                self._dead_letter(held)
            else:
                self.stats.retried += 1
                out.append(held)
        return out

    def _hold(self, pool: str, eid: str, fields: dict[bytes, bytes], *, delivered: int,
              shard: int) -> Held:
        f = {_s(k): _s(v) for k, v in fields.items()}
        held = Held(pool=pool, entry_id=eid, job_id=f["job"], chunk=int(f["chunk"]),
                    n=int(f["n"]), deliveries=delivered + int(f.get("prior", 0)), shard=shard)
        with self._held_lock:
            self._held[eid] = held
        self.metrics.taken(eid)
        return held

    def _drop(self, held: Held) -> None:
        with self._held_lock:
            self._held.pop(held.entry_id, None)
        self.metrics.forget(held.entry_id)

    def _dead_letter(self, held: Held) -> None:
        last = self.store.chunk_error(held.job_id, held.chunk)
        reason = last or (f"the worker holding it stopped responding "
                          f"{held.deliveries - 1} times (killed or stuck mid-chunk)")
        log.error("job %s chunk %d: dead-lettered after %d deliveries: %s",
                  held.job_id, held.chunk, held.deliveries, reason)
        self.store.dead_letter(held.pool, held.job_id, held.chunk, held.entry_id,
                               deliveries=held.deliveries, reason=reason,
                               consumer=self.consumer)
        self.stats.dead_lettered += 1
        self._drop(held)

    def _queues_empty(self) -> bool:
        with self._held_lock:
            if self._held:
                return False
        return all(self.store.depth(p) == 0 for p in self.config.pools)

    # -- doing work -------------------------------------------------------------------
    def _process(self, entries: list[Held]) -> None:
        runnable = self._begin(entries)
        for i, batch in enumerate(plan_batches(runnable, self.config.batch_items)):
            # Before the first call BEGIN has just read every job's state; after it, look
            # again between calls (cancels, shutdown).
            if i and not self._checkpoint(runnable):
                break
            self._run_batch(batch)
        # Whatever the checkpoint stopped (not what has started: it is finished and stored).
        for held in runnable:
            if held.entry_id in self._held and held.started < held.n:
                self._release(held)

    def _begin(self, entries: list[Held]) -> list[Held]:
        """BEGIN and unpack each chunk; returns those with items to compute (the rest are
        skipped, failed, released or, every input refused on arrival, stored)."""
        runnable = []
        for held in entries:
            if self._stop.is_set():
                self._release(held)
                continue
            task = self.store.begin_chunk(held.pool, held.job_id, held.chunk, held.entry_id)
            if isinstance(task, str):  # cancelled, failed or expired: already acked
                self.stats.skipped += 1
                self._drop(held)
                continue
            held.task = task
            try:
                if task.kind is not JobKind.SAMPLE:
                    if task.payload is None:
                        raise InvalidInput(f"job {held.job_id} chunk {held.chunk}: its inputs "
                                           "are missing from Redis (expired?)")
                    held.inputs, held.failures = unpack_failures(task.payload)
                    if len(held.inputs) != held.n:
                        raise InvalidInput(f"job {held.job_id} chunk {held.chunk} holds "
                                           f"{len(held.inputs)} items, its task says {held.n}")
            except InvalidInput as exc:
                self._fail_chunk(held, exc)
                continue
            if len(held.failures) == held.n:  # every input refused on arrival: nothing to run
                if self.config.overlap:
                    self._to_store(held)
                else:
                    self._finish(held)
                continue
            runnable.append(held)
        return runnable

    # -- overlap mode: a store thread packs and stores while this one computes --------
    def _start_store_thread(self) -> None:
        self._store_thread = threading.Thread(target=self._store_loop, daemon=True,
                                              name=f"store-{self.consumer}")
        self._store_thread.start()

    def _to_store(self, h: Held) -> None:
        with self._store_cond:
            self._store_backlog += h.n
        self._store_q.put(h)

    def _wait_store(self, most: int, until: float = float("inf")) -> bool:
        """Until at most ``most`` items wait for the store thread (or ``until``, a
        monotonic time); True if they do."""
        with self._store_cond:
            while self._store_backlog > most:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._store_cond.wait(min(left, 1.0))
        return True

    def _stop_store_thread(self) -> None:
        """Let the stage thread, then the store thread, finish what they have (within the
        grace when stopping), then end them. Chunks they did not get to stay held: run()
        releases them."""
        self._hand_over()
        stage = self._stage_thread
        if stage is not None:
            with self._store_cond:
                while self._stage_backlog > 0 and time.monotonic() < self._deadline:
                    self._store_cond.wait(min(max(self._deadline - time.monotonic(), 0.0), 1.0))
            self._stage_q.put(None)
            self._join_or_linger(stage)
            self._stage_thread = None
        thread = self._store_thread
        if thread is None:
            return
        self._wait_store(0, self._deadline)
        self._store_q.put(None)
        self._join_or_linger(thread)
        self._store_thread = None

    def _join_or_linger(self, thread: threading.Thread) -> None:
        """Join ``thread`` within what is left of the grace (1-30 s); if it is still inside
        a call, keep it for ``_join_lingering``."""
        thread.join(timeout=max(min(self._deadline - time.monotonic(), 30.0), 1.0))
        if thread.is_alive():
            self._lingering.append(thread)

    def _join_lingering(self) -> None:
        """Wait for a stage or store thread that was still in a call (a Redis round trip,
        a network run) when its join timed out. Its chunks are released by now, so it skips
        the rest of its queue and ends after that call; closing the Redis client under it
        instead would make redis-py open a new connection that nothing closes."""
        for thread in self._lingering:
            thread.join(timeout=LINGER_S)
            if thread.is_alive():
                log.warning("worker %s: %s still busy %.0f s after shutdown",
                            self.consumer, thread.name, LINGER_S)
        self._lingering.clear()

    def _store_loop(self) -> None:
        while (h := self._store_q.get()) is not None:
            try:
                if h.entry_id in self._held:  # else released, cancelled or lost meanwhile
                    encode_parts(h)
                    self._finish(h)
            except TRANSIENT_ERRORS as exc:
                # Left pending: reclaimed after claim_idle_s, here or elsewhere.
                log.warning("worker %s: cannot store job %s chunk %d (%s); it will be "
                            "redone", self.consumer, h.job_id, h.chunk, exc)
                self._drop(h)
            except Exception as exc:  # noqa: BLE001 - stored or retried, like a compute error
                try:
                    self._fail_chunk(h, exc)
                except TRANSIENT_ERRORS:
                    self._drop(h)  # left pending: redelivered later
            finally:
                with self._store_cond:
                    self._store_backlog -= h.n
                    self._store_cond.notify_all()

    def _checkpoint(self, chunks: list[Held]) -> bool:
        """At a batch boundary: drop cancelled chunks; on shutdown, release what must go.

        Returns False when nothing more should run.
        """
        live = [h for h in chunks if h.entry_id in self._held]
        if not live:
            return False
        self._drop_cancelled(live)
        if self._stop.is_set():
            past = time.monotonic() >= self._deadline
            for h in live:
                # Past the grace period release everything not yet started through;
                # before it, only chunks not yet started (finishing a started chunk is
                # what the grace is for). A chunk in the stage thread's hands, or
                # computed and waiting for the store thread, is stored, not released.
                if h.entry_id in self._held and h.started < h.n and (past or h.started == 0):
                    self._release(h)
        return any(h.entry_id in self._held and h.started < h.n for h in live)

    def _drop_cancelled(self, chunks: list[Held]) -> None:
        """Ack and drop the chunks whose job was cancelled or failed meanwhile."""
        states = self.store.states(sorted({h.job_id for h in chunks}))
        for h in chunks:
            state = states[h.job_id]
            if state is None or state.terminal:
                # Cancelled or failed meanwhile: stop here, at the batch boundary.
                self.store.ack(h.pool, h.entry_id, h.shard)
                self.stats.skipped += 1
                self._drop(h)

    def _run_batch(self, batch: list[Segment]) -> None:
        """One pipeline call; finished chunks are stored (overlap: by the store thread)."""
        batch = [s for s in batch if s.held.entry_id in self._held]
        if not batch:
            return
        overlap = self.config.overlap
        staged = overlap and self.config.pipeline_calls
        self._hand_over()  # the last call's second half, before this call can wait for it
        if overlap:  # the store thread's backlog stays under two batches
            self._wait_store(2 * self.config.batch_items)
        if staged:  # one second half runs while this first half does, none waits
            self._wait_stage(self.config.batch_items)
        try:
            task = batch[0].held.task
            model, op = (task.model, task.kind.value) if task else ("", "")
            with chunk_spans(self.store, [s.held for s in batch], model=model, op=op):
                second = start_batch(self.pipeline, batch, png=not overlap)
                outputs = None if staged else second()
        except Exception as exc:  # noqa: BLE001 - every failure is stored or retried
            if len({id(s.held) for s in batch}) > 1:
                # A merged call failed: run each chunk alone so only the culprit fails.
                for seg in batch:
                    self._run_batch([seg])
                return
            self._fail_chunk(batch[0].held, exc)
            return
        if outputs is None:  # staged: the stage thread runs the second half
            for seg in batch:
                seg.held.started += seg.hi - seg.lo
            self._handoff = (batch, second)
            return
        self._record(batch, outputs)

    def _record(self, batch: list[Segment], outputs: list[Any]) -> None:
        """Each segment's results into its chunk; finished chunks are stored (overlap: by
        the store thread)."""
        for seg, out in zip(batch, outputs, strict=True):
            h = seg.held
            h.parts.append(out)
            h.done += seg.hi - seg.lo
            if h.started < h.done:  # never true when staged: the loop's thread counted it
                # (and writing it here could lose an increment that thread makes meanwhile)
                h.started = h.done
            if h.done == h.n:
                if self.config.overlap:
                    self._to_store(h)
                else:
                    self._finish(h)

    # -- pipeline_calls: a stage thread runs each call's second half --------------------
    def _hand_over(self) -> None:
        """Give the held-back second half to the stage thread.

        The loop's thread holds each call's second half back until it starts the next
        call, waits, or finds nothing queued: its reads and BEGINs in between then do
        not compete for the GIL with a second half that holds it (a compress call's
        coder), which made each of their round trips wait up to the switch interval
        (5 ms) per socket read; the held-back half runs while the next first half's
        network, which releases the GIL, does.
        """
        item, self._handoff = self._handoff, None
        if item is None:
            return
        with self._store_cond:
            self._stage_backlog += sum(seg.hi - seg.lo for seg in item[0])
        self._stage_q.put(item)

    def _in_flight(self) -> bool:
        """Computed or half-computed chunks wait for the stage or store thread."""
        with self._store_cond:
            return self._stage_backlog > 0 or self._store_backlog > 0

    def _wait_idle(self) -> None:
        """Until the stage and store threads have nothing left (or stopping)."""
        with self._store_cond:
            while (self._stage_backlog > 0 or self._store_backlog > 0) \
                    and not self._stop.is_set():
                self._store_cond.wait(0.1)

    def _wait_stage(self, most: int) -> None:
        """Until at most ``most`` items wait for (or are in) the stage thread."""
        with self._store_cond:
            while self._stage_backlog > most:
                self._store_cond.wait(1.0)

    def _stage_loop(self) -> None:
        """Second halves in order (a chunk split over two calls gets its parts in order),
        while the loop's thread runs the next first half: the network of one batch and
        the coder of another overlap, since onnxruntime (and a coder pool's wait)
        releases the GIL."""
        while (item := self._stage_q.get()) is not None:
            batch, second = item
            try:
                late = self._stop.is_set() and time.monotonic() >= self._deadline
                if not late and any(s.held.entry_id in self._held for s in batch):
                    self._second_half(batch, second)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("worker %s: a call's second half failed", self.consumer)
            finally:
                with self._store_cond:
                    self._stage_backlog -= sum(s.hi - s.lo for s in batch)
                    self._store_cond.notify_all()

    def _second_half(self, batch: list[Segment], second: Callable[[], list[Any]]) -> None:
        try:
            outputs = second()
        except Exception as exc:  # noqa: BLE001 - every failure is stored or retried
            if len({id(s.held) for s in batch}) > 1:
                # A merged call failed: run each chunk alone so only the culprit fails.
                for seg in batch:
                    if seg.held.entry_id in self._held:
                        self._second_half([seg], functools.partial(
                            compute_batch, self.pipeline, [seg], png=False))
                return
            try:
                self._fail_chunk(batch[0].held, exc)
            except TRANSIENT_ERRORS:
                self._drop(batch[0].held)  # left pending: redelivered later
            return
        self._record(batch, outputs)

    def _finish(self, h: Held) -> None:
        try:
            packed = pack_results(h)
        except InvalidInput as exc:  # per-item images of several shapes in one RAW chunk
            self._fail_chunk(h, exc)
            return
        failed = len(chunk_failures(h))
        self._retry_redis(lambda: self.store.store_chunk(h.pool, h.job_id, h.chunk, h.n,
                                                         packed, h.entry_id, failed))
        self.stats.chunks += 1
        self.stats.items += h.n
        if h.task is not None:
            self.metrics.stored(h.entry_id, h.task, h.n, self.pipeline, h.inputs)
        self._drop(h)

    def _fail_chunk(self, h: Held, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if h.task is not None:
            lo = h.chunk * h.task.chunk_size
            reason = f"chunk {h.chunk} (items {lo}-{lo + h.n - 1}): {reason}"
        if isinstance(exc, PERMANENT_ERRORS):
            log.warning("job %s chunk %d failed for good: %s", h.job_id, h.chunk, reason)
            self.store.dead_letter(h.pool, h.job_id, h.chunk, h.entry_id,
                                   deliveries=h.deliveries, reason=reason,
                                   consumer=self.consumer)
            self.stats.dead_lettered += 1
        else:
            # Leave it pending (no ack): it is redelivered after claim_idle_s, here or
            # on another worker, until the delivery cap sends it to the dead letters.
            log.warning("job %s chunk %d failed (delivery %d, will retry): %s",
                        h.job_id, h.chunk, h.deliveries, reason,
                        exc_info=None if isinstance(exc, LatentServeError) else exc)
            self.store.note_chunk_error(h.job_id, h.chunk, f"delivery {h.deliveries}: {reason}")
        self._drop(h)

    def _release(self, h: Held) -> None:
        try:
            if self.store.release(h.pool, self.consumer, h.entry_id, h.job_id, h.chunk, h.n,
                                  h.deliveries):
                self.stats.released += 1
        except TRANSIENT_ERRORS:
            pass  # left pending: another worker reclaims it after claim_idle_s
        self._drop(h)

    def _release_all(self) -> None:
        with self._held_lock:
            held = list(self._held.values())
        for h in held:
            self._release(h)

    # -- heartbeat ----------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        last_sweep = 0.0
        while not self._done.is_set():
            try:
                self._heartbeat()
                if time.monotonic() - last_sweep > min(60.0, self.config.queue.result_ttl_s,
                                                       self.config.queue.receiving_timeout_s / 2):
                    last_sweep = time.monotonic()
                    self.store.sweep()
                    self._forget_dead_consumers()
            except TRANSIENT_ERRORS:
                pass  # the main loop reports it; claims are extended once Redis is back
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.exception("worker %s: heartbeat failed", self.consumer)
            self._done.wait(self.config.heartbeat_s)

    def _heartbeat(self) -> None:
        with self._held_lock:
            held = list(self._held.values())
        by_stream: dict[tuple[str, int], list[str]] = {}
        for h in held:
            by_stream.setdefault((h.pool, h.shard), []).append(h.entry_id)
        for (pool, shard), ids in by_stream.items():
            status = self.store.extend(pool, self.consumer, ids, shard)
            lost = [i for i, s in status.items() if s == "stolen"]
            if lost:  # reclaimed by another worker: its result will be the same
                log.warning("worker %s: lost the claim on %s", self.consumer, lost)
        record = {"consumer": self.consumer, "pid": os.getpid(), "host": socket.gethostname(),
                  "pools": list(self.config.pools), "provider": self.config.provider,
                  "started": self._started, "beat": time.time(), "chunks": self.stats.chunks,
                  "items": self.stats.items, "ready": self._taking,
                  "stopping": self._stop.is_set(), "metrics_port": self.metrics.port,
                  "holding": [{"job": h.job_id, "chunk": h.chunk, "done": h.done, "n": h.n}
                              for h in held]}
        ttl_ms = int(self.config.health_ttl_s * 1000)
        if len(self._shards) == 1:
            self.r.set(self.keys.worker(self.consumer), json.dumps(record), px=ttl_ms)
            return
        # One key per shard: the dead-consumer check reads the key in its stream's slot.
        with self.r.pipeline(transaction=False) as p:
            for keys in self._shards:
                p.set(keys.worker(self.consumer), json.dumps(record), px=ttl_ms)
            p.execute()

    def _forget_dead_consumers(self) -> None:
        """Delete group consumers with nothing pending that have been idle a long time."""
        limit_ms = max(self.config.claim_idle_s * 10, 600) * 1000
        for pool, shard in self._pool_shards():
            stream = self._shards[shard].stream(pool)
            for c in self.r.xinfo_consumers(stream, self.keys.group):
                if c["pending"] == 0 and c["idle"] > limit_ms and _s(c["name"]) != self.consumer:
                    self.r.xgroup_delconsumer(stream, self.keys.group, c["name"])

    def _goodbye(self) -> None:
        try:
            for keys in self._shards:
                self.r.delete(keys.worker(self.consumer))
            for pool, shard in self._pool_shards():
                stream = self._shards[shard].stream(pool)
                pending = self.r.xpending_range(stream, self.keys.group, "-", "+", 1,
                                                consumername=self.consumer)
                if not pending:
                    self.r.xgroup_delconsumer(stream, self.keys.group, self.consumer)
        except TRANSIENT_ERRORS:
            pass


def worker_health(client: redis.Redis, config: WorkerConfig | None = None, *,
                  prefix: str | None = None) -> list[dict[str, Any]]:
    """Health records of every live worker (their keys expire 3 heartbeats after death)."""
    from latentserve.worker.jobqueue.keys import Keys

    keys = config.keys if config is not None else Keys(prefix or "latentserve:")
    out = []
    for key in client.scan_iter(match=keys.worker_pattern(), count=500):
        raw = client.get(key)
        if raw:
            out.append(json.loads(raw))
    return sorted(out, key=lambda r: r["consumer"])


def create_worker(config: WorkerConfig, pipeline: JobPipeline | None = None,
                  client: redis.Redis | None = None,
                  metrics: WorkerMetrics | None = None) -> Worker:
    """Build a worker (nothing runs until ``run()``); the pipeline defaults to the
    model repository at ``config.models`` on ``config.provider``, the metrics to a
    registry of its own (pass ``WorkerMetrics(registry)`` to report into another)."""
    from latentserve.worker.runtime.engine import process_memory

    process_memory()  # before any thread: glibc's arena limit binds only later arenas
    owned: list[Closeable] = []
    if pipeline is None:
        from latentserve.worker.codec.coderpool import CoderPool
        from latentserve.worker.runtime.engine import EngineConfig
        from latentserve.worker.runtime.pipeline import Pipeline

        pool = CoderPool(config.coder_processes) if config.coder_processes else None
        if pool is not None:
            owned.append(pool)
        pipeline = Pipeline(config.models,
                            EngineConfig(provider=config.provider,
                                         intra_op_threads=config.intra_op_threads,
                                         max_batch=config.batch_items),
                            coder_pool=pool)
    return Worker(config, pipeline, client, metrics, owned=owned)
