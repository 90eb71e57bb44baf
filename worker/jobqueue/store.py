"""Job state in Redis: the job hash, chunk payloads, idempotent results, TTLs.

A job is a hash (``Keys.job``) holding its spec, its ``JobState`` and its progress
counters; its inputs are cut into chunks whose packed payloads sit in one hash
(``job_inputs``, field = chunk index) and whose tasks are entries on the pool's stream.
A worker stores a chunk's packed results with ``STORE``, a Lua script that writes the
result field only if it is absent (HSETNX), and only then advances the progress
counters, finishes the job when the last chunk lands, XACKs and XDELs the entry: a
duplicate delivery changes nothing but the ack. Every per-job key gets the job hash's
TTL (``job_ttl_s`` while running, ``result_ttl_s`` once finished), the two sorted sets
that index jobs are swept past that TTL, and acked entries are deleted, so a finished
workload leaves Redis at its baseline.

The worker-side scripts (begin, store, dead-letter, release, extend) are methods here
too, so that every write to a job's keys lives in this one module.
"""

from __future__ import annotations

import builtins
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import redis
from redis.typing import EncodableT

from latentserve.errors import InvalidInput, JobNotFound, JobStateError, ResourceLimit
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.keys import Keys, check_job_id
from latentserve.worker.jobqueue.keys import as_text as _s
from latentserve.worker.jobqueue.packing import pack_images, pack_items, unpack, unpack_failures
from latentserve.worker.jobqueue.progress import ProgressWaiter
from latentserve.worker.jobqueue.records import (
    MAX_ERROR_CHARS,
    ChunkResults,
    ChunkTask,
    ImageFormat,
    ItemFailure,
    JobInfo,
    JobKind,
    JobState,
    OnItemError,
)
from latentserve.worker.jobqueue.scripts import (
    ABANDON,
    BEGIN,
    DEAD_LETTER,
    END,
    ENQUEUE,
    EXTEND,
    RELEASE,
    SEAL,
    STORE,
    SWEEP,
    TOUCH,
)

__all__ = ["MAX_ERROR_CHARS", "ChunkResults", "ChunkTask", "ImageFormat", "ItemFailure",
           "JobInfo", "JobKind", "JobState", "JobStore", "OnItemError", "connect", "pack_images",
           "pack_items", "unpack"]


def connect(url: str, *, check: bool = True) -> redis.Redis:
    """A client for ``url`` (binary replies) that retries briefly on a dropped connection.

    The URL carries everything (docs/redis.md): ``redis://:PASSWORD@HOST:PORT/DB``,
    ``redis://USER:PASSWORD@...`` for an ACL user, ``rediss://`` for TLS with ``ssl_*``
    query parameters (CA, client certificate and key), ``unix://PATH``. ``check``: send
    one PING now, so that refused credentials or a failed TLS handshake stop start-up
    with a message naming the URL (redacted) and why (Unavailable; a malformed URL is
    InvalidInput); a server that is only unreachable is logged, as callers retry.
    ``?cluster=true``: a ``RedisCluster`` client (worker/cluster.py).
    """
    import logging

    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.retry import Retry

    from latentserve.errors import Unavailable
    from latentserve.worker.jobqueue.redis_url import check_redis_url, explain_redis_failure

    check_redis_url(url)
    from latentserve.worker.jobqueue.cluster import connect_cluster, is_cluster_url

    if is_cluster_url(url):
        return connect_cluster(url, check=check)  # type: ignore[return-value]
    if check:  # a throwaway client without retries: one attempt, its error as it came
        probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5,
                                     retry=Retry(NoBackoff(), 0))
        try:
            probe.ping()
        except redis.RedisError as exc:
            permanent, message = explain_redis_failure(url, exc)
            if permanent:
                raise Unavailable(message) from None  # the message says all; no traceback
            logging.getLogger(__name__).warning("%s; retrying when used", message)
        finally:
            probe.close()
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30,
                                retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3))


def job_not_found(job_id: str) -> JobNotFound:
    """The one answer for a job that is unknown, expired, or not the caller's."""
    return JobNotFound(f"no job {job_id} (unknown, or expired after its TTL)", job=job_id)


class JobStore:
    """All reads and writes of job state. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, config: QueueConfig) -> None:
        self.r = client
        self.config = config
        self.keys: Keys = config.keys
        self._enqueue = client.register_script(ENQUEUE)
        self._seal = client.register_script(SEAL)
        self._begin = client.register_script(BEGIN)
        self._store = client.register_script(STORE)
        self._end = client.register_script(END)
        self._dead = client.register_script(DEAD_LETTER)
        self._release = client.register_script(RELEASE)
        self._extend = client.register_script(EXTEND)
        self._sweep = client.register_script(SWEEP)
        self._touch = client.register_script(TOUCH)
        self._abandon = client.register_script(ABANDON)
        self._last_sweep = 0.0

    # -- key sets ---------------------------------------------------------------------
    def _job_keys(self, job_id: str, pool: str) -> list[str]:
        k = self.keys.for_job(job_id)  # the stream and indexes on the job's own slot
        return [k.job(job_id), k.job_inputs(job_id), k.job_results(job_id), k.job_tasks(job_id),
                k.stream(pool), k.jobs_expiry, k.jobs_receiving]

    def ensure_group(self, pool: str) -> None:
        """Create the pool's streams and consumer group if missing (idempotent)."""
        for stream in self.keys.streams(pool):
            try:
                self.r.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- submitting -------------------------------------------------------------------
    def create(self, kind: JobKind, model: str, *, chunk_size: int | None = None,
               image_format: ImageFormat = ImageFormat.PNG, seed: int = 0,
               temperature: float = 1.0, owner: str = "",
               on_item_error: OnItemError = OnItemError.PER_ITEM,
               traceparent: str = "") -> JobInfo:
        """A new job in RECEIVING state with no chunks yet; add them, then ``seal``.

        ``owner``: the identity that submitted it (``""`` = anonymous); the service shows
        the job to that identity only. Until sealed the job must make progress (``enqueue``,
        ``touch``) at least every ``receiving_timeout_s``, or it is failed as abandoned.
        """
        cs = chunk_size or self.config.chunk_size
        if not 1 <= cs <= self.config.max_job_items:
            raise InvalidInput(f"chunk size {cs} must be between 1 and "
                               f"{self.config.max_job_items}")
        if not model and JobKind(kind) is not JobKind.RECONSTRUCT:
            raise InvalidInput(f"a {JobKind(kind).value} job needs a model reference "
                               "(NAME or NAME:VERSION)")
        pool = self.config.pool_for(model)
        # 128 bits from the OS's CSPRNG: an id cannot be guessed, only handed over.
        job_id = secrets.token_hex(16)
        now = time.time()
        k = self.keys.for_job(job_id)
        fields = {"id": job_id, "kind": JobKind(kind).value, "model": model, "pool": pool,
                  "state": JobState.RECEIVING.value, "chunk_size": cs,
                  "image_format": ImageFormat(image_format).value, "seed": int(seed),
                  "temperature": repr(float(temperature)), "created": repr(now), "sealed": 0,
                  "owner": owner, "on_item_error": OnItemError(on_item_error).value,
                  "items_total": 0, "chunks_total": 0, "items_done": 0, "chunks_done": 0,
                  "items_failed": 0, "chunks_submitted": 0, "upload_seen": repr(now)}
        if traceparent:  # W3C trace context of SubmitJob: workers parent chunk spans on it
            fields["traceparent"] = traceparent
        ttl_ms = int(self.config.job_ttl_s * 1000)
        with self.r.pipeline(transaction=True) as p:  # one round trip
            p.xgroup_create(k.stream(pool), k.group, id="0", mkstream=True)
            # str keys are valid fields: only Mapping's invariant key type needs the cast.
            p.hset(k.job(job_id), mapping=cast(Mapping[EncodableT, EncodableT], fields))
            p.pexpire(k.job(job_id), ttl_ms)
            p.zadd(k.jobs, {job_id: now})
            p.zadd(k.jobs_expiry, {job_id: now + self.config.job_ttl_s})
            p.zadd(k.jobs_receiving, {job_id: now})
            for reply in p.execute(raise_on_error=False):
                if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                    raise reply
        if now - self._last_sweep > 1.0:  # workers sweep too; once a second is plenty
            self._last_sweep = now
            self.sweep(now)
        return JobInfo.from_hash({a.encode(): str(b).encode() for a, b in fields.items()})

    def traceparent(self, job_id: str) -> str:
        """The W3C ``traceparent`` the job was submitted under ("" when none)."""
        return _s(self.r.hget(self.keys.job(job_id), "traceparent") or b"")

    def enqueue(self, job: JobInfo, chunks: Sequence[tuple[int, int, bytes]]) -> int:
        """Add ``(chunk index, item count, packed payload)`` tasks; returns the new depth.

        All or none: beyond ``max_queued_chunks`` on the pool's stream nothing is added
        and ResourceLimit names the current depth.
        """
        if not chunks:
            return self.depth(job.pool)
        argv: list[Any] = [job.id, self.config.max_queued_chunks, repr(time.time())]
        for chunk, n, payload in chunks:
            if len(payload) > self.config.max_chunk_bytes:
                raise ResourceLimit(f"chunk {chunk} of job {job.id} packs {len(payload)} bytes; "
                                    f"the limit is {self.config.max_chunk_bytes}: use a "
                                    "smaller chunk size", limit="max_chunk_bytes")
            argv += [chunk, n, payload]
        k = self.keys.for_job(job.id)
        code, info = self._enqueue(keys=[k.job(job.id), k.job_inputs(job.id),
                                         k.job_tasks(job.id), k.stream(job.pool),
                                         k.jobs_receiving], args=argv)
        if code == -1:
            raise ResourceLimit(
                f"the queue of pool {job.pool!r} holds {info} chunks; adding {len(chunks)} "
                f"would pass the limit of {self.config.max_queued_chunks}: retry later",
                limit="max_queued_chunks")
        if code == -2:
            raise JobNotFound(f"job {job.id} does not exist (it may have expired)")
        if code == -3:
            raise JobStateError(f"job {job.id} is {_s(info)}; it takes no more inputs")
        return int(code)

    def touch(self, job_id: str) -> None:
        """Record that a receiving job's upload made progress (a message arrived that
        queued no chunk), so it is not failed as abandoned; JobStateError if the job
        ended meanwhile (e.g. failed as abandoned after a long stall), JobNotFound if
        it expired."""
        k = self.keys.for_job(job_id)
        state = _s(self._touch(keys=[k.job(job_id), k.jobs_receiving],
                               args=[job_id, repr(time.time())]))
        if state == "expired":
            raise JobNotFound(f"job {job_id} does not exist (it may have expired)")
        if JobState(state).terminal:
            raise JobStateError(f"job {job_id} is {state}; it takes no more inputs")

    def seal(self, job: JobInfo, items_total: int, chunks_total: int) -> JobInfo:
        """Mark every input received; the job succeeds once all its chunks are stored."""
        code = self._seal(keys=self._job_keys(job.id, job.pool),
                          args=[job.id, items_total, chunks_total, repr(time.time()),
                                int(self.config.result_ttl_s * 1000),
                                self.keys.job_progress(job.id)])
        if code == -2:
            raise JobNotFound(f"job {job.id} does not exist (it may have expired)")
        if code == -3:
            info = self.get(job.id)
            if info.state in (JobState.FAILED, JobState.CANCELLED):
                # It ended before its inputs were all in (a worker failed a chunk for
                # good, or a cancel): sealing is moot, the caller gets the ended job.
                return info
            raise JobStateError(f"job {job.id} is {info.state.value}; it cannot be sealed")
        if code == -4:
            raise InvalidInput(f"job {job.id}: sealed with {chunks_total} chunks but "
                               f"{self.get(job.id).chunks_submitted} were submitted")
        return self.get(job.id)

    def submit(self, kind: JobKind, model: str, *, items: Any = None, count: int = 0,
               chunk_size: int | None = None, seed: int = 0, temperature: float = 1.0,
               image_format: ImageFormat = ImageFormat.PNG, owner: str = "",
               on_item_error: OnItemError = OnItemError.PER_ITEM,
               traceparent: str = "") -> JobInfo:
        """Create, fill and seal a whole job in one call (tests, benchmarks, the service).

        ``items``: uint8 (N, C, H, W) images for compress, a list of code bytes for
        reconstruct; ``count`` for sample. A refused job (limits) leaves nothing behind.
        """
        kind = JobKind(kind)
        n = count if kind is JobKind.SAMPLE else len(items)
        self.check_size(n)
        job = self.create(kind, model, chunk_size=chunk_size, image_format=image_format,
                          seed=seed, temperature=temperature, owner=owner,
                          on_item_error=on_item_error, traceparent=traceparent)
        cs = job.chunk_size
        chunks = []
        for c, lo in enumerate(range(0, n, cs)):
            part = None if kind is JobKind.SAMPLE else items[lo:lo + cs]
            payload = (b"" if part is None else
                       pack_images(part) if kind is JobKind.COMPRESS else pack_items(part))
            chunks.append((c, min(cs, n - lo), payload))
        try:
            self.enqueue(job, chunks)
        except Exception:
            self.delete(job.id)
            raise
        return self.seal(job, n, len(chunks))

    def check_size(self, items: int) -> None:
        """Refuse a job of more than ``max_job_items`` items (or fewer than one)."""
        if items < 1:
            raise InvalidInput(f"a job needs at least one item, got {items}")
        if items > self.config.max_job_items:
            raise ResourceLimit(f"a job of {items} items is over the limit of "
                                f"{self.config.max_job_items}; split it into several jobs",
                                limit="max_job_items")

    def delete(self, job_id: str) -> None:
        """Remove every key of a job (a submit that failed half-way: never accepted)."""
        k = self.keys.for_job(job_id)
        # first end it, so its queued chunks leave the stream and none starts
        with contextlib.suppress(JobNotFound, JobStateError):
            self.fail(job_id, "the submission did not complete")
        self.r.delete(k.job(job_id), k.job_inputs(job_id), k.job_results(job_id),
                      k.job_tasks(job_id))
        self.r.zrem(k.jobs, job_id)
        self.r.zrem(k.jobs_expiry, job_id)
        self.r.zrem(k.jobs_receiving, job_id)

    # -- reading ----------------------------------------------------------------------
    def get(self, job_id: str) -> JobInfo:
        """The job's current snapshot; JobNotFound if it never existed or expired."""
        check_job_id(job_id)
        # connect() makes the client with binary replies: field -> value, both bytes.
        h = cast(dict[bytes, bytes], self.r.hgetall(self.keys.job(job_id)))
        if not h:
            raise job_not_found(job_id)
        return JobInfo.from_hash(h)

    def states(self, job_ids: Sequence[str]) -> dict[str, JobState | None]:
        """Each job's state in one round trip (per node on a cluster); None for a job that
        expired or never was."""
        with self.r.pipeline(transaction=False) as p:
            for job_id in job_ids:
                p.hget(self.keys.job(job_id), "state")
            replies = p.execute()
        return {job_id: JobState(_s(v)) if v else None
                for job_id, v in zip(job_ids, replies, strict=True)}

    def list(self, limit: int = 100, states: Sequence[JobState] = (),
             owner: str | None = None) -> builtins.list[JobInfo]:
        """Newest jobs first, at most ``limit``, optionally only in ``states`` and only
        ``owner``'s (None: everyone's)."""
        self.sweep()
        # Binary replies; WITHSCORES pairs each member with its score as a float.
        scored = [(score, _s(i)) for k in self.keys.all_shards()
                  for i, score in cast(builtins.list[tuple[bytes, float]],
                                       self.r.zrevrange(k.jobs, 0, -1, withscores=True))]
        ids = [i for _, i in sorted(scored, reverse=True)]
        out: builtins.list[JobInfo] = []
        for start in range(0, len(ids), 200):
            with self.r.pipeline(transaction=False) as p:
                for job_id in ids[start:start + 200]:
                    p.hgetall(self.keys.job(job_id))
                for h in p.execute():
                    if h:
                        info = JobInfo.from_hash(h)
                        if (not states or info.state in states) and \
                                (owner is None or info.owner == owner):
                            out.append(info)
            if len(out) >= limit:
                break
        return out[:limit]

    def depth(self, pool: str) -> int:
        """Chunks queued or running on a pool's streams (acked entries are deleted)."""
        return sum(int(self.r.xlen(stream)) for stream in self.keys.streams(pool))

    def chunk_results(self, job_id: str, chunk: int) -> bytes | None:
        # Binary replies: the packed results, or None while the chunk is not stored.
        return cast(bytes | None, self.r.hget(self.keys.job_results(job_id), str(chunk)))

    def iter_chunks(self, job_id: str, start: int = 0, wait_s: float = 1.0,
                    should_stop: Callable[[], bool] | None = None,
                    ) -> Iterator[tuple[int, builtins.list[bytes] | Any]]:
        """(index of the first item, results) per chunk, in input order from item ``start``,
        waiting for chunks not stored yet (see ``iter_chunk_results``). The slots of
        failed items hold placeholders: ``iter_chunk_results`` says which they are."""
        for part in self.iter_chunk_results(job_id, start, wait_s, should_stop):
            yield part.start, part.items

    def iter_chunk_results(self, job_id: str, start: int = 0, wait_s: float = 1.0,
                           should_stop: Callable[[], bool] | None = None,
                           ) -> Iterator[ChunkResults]:
        """Per chunk, in input order from item ``start``, its results and the ItemFailures
        of its failed items, waiting for chunks not stored yet.

        Raises JobStateError at the first missing result of a failed or cancelled job
        (a job whose upload went silent is failed here first: see ``abandon_if_silent``).
        ``should_stop`` (asked after every wait) ends the iteration early, e.g. once an
        RPC's client has gone: a job that never moves would otherwise keep it waiting.
        """
        info = self.get(job_id)
        if start < 0 or (info.sealed and start > info.items_total):
            raise InvalidInput(f"start index {start} is outside job {job_id}'s "
                               f"{info.items_total} items")
        chunk = start // info.chunk_size
        with ProgressWaiter(self, job_id) as waiter:
            while True:
                info = self.get(job_id)
                if info.sealed and chunk >= info.chunks_total:
                    return
                data = self.chunk_results(job_id, chunk)
                if data is None and self.abandon_if_silent(info):
                    continue
                if data is None:
                    if info.state in (JobState.FAILED, JobState.CANCELLED):
                        raise JobStateError(
                            f"job {job_id} is {info.state.value}"
                            f"{': ' + info.error if info.error else ''}; results from index "
                            f"{chunk * info.chunk_size} on were not produced")
                    waiter.wait(wait_s)
                    if should_stop is not None and should_stop():
                        return
                    continue
                lo = chunk * info.chunk_size
                skip = max(start - lo, 0)
                items, failures = unpack_failures(data)
                yield ChunkResults(lo + skip, items[skip:],
                                   {lo + i: f for i, f in failures.items() if i >= skip})
                chunk += 1

    def iter_results(self, job_id: str, start: int = 0,
                     wait_s: float = 1.0) -> Iterator[tuple[int, bytes | Any]]:
        """(index, result or ItemFailure) in input order from ``start``."""
        for part in self.iter_chunk_results(job_id, start, wait_s):
            for i, item in enumerate(part.items, part.start):
                yield i, part.failures.get(i, item)

    def watch(self, job_id: str, wait_s: float = 1.0,
              should_stop: Callable[[], bool] | None = None) -> Iterator[JobInfo]:
        """Snapshots of the job each time it changes, ending with its terminal state
        (or early, once ``should_stop()``, asked after every wait, is true)."""
        last = None
        with ProgressWaiter(self, job_id) as waiter:
            while True:
                info = self.get(job_id)
                key = (info.state, info.items_done, info.chunks_done, info.sealed)
                if key != last:
                    last = key
                    yield info
                if info.state.terminal:
                    return
                if self.abandon_if_silent(info):
                    continue
                waiter.wait(wait_s)
                if should_stop is not None and should_stop():
                    return

    def dead_letters(self, count: int = 100) -> builtins.list[dict[str, str]]:
        """Newest dead-letter entries (job, chunk, deliveries, reason, consumer, time)."""
        # Binary replies: (entry id, its fields), each a bytes; XREVRANGE lists entries.
        entries = [{_s(k): _s(v) for k, v in fields.items()} | {"entry": _s(eid)}
                   for shard in self.keys.all_shards()
                   for eid, fields in cast(
                       builtins.list[tuple[bytes, dict[bytes, bytes]]],
                       self.r.xrevrange(shard.dead_letter, count=count))]
        # Newest first across the shards' streams (one per shard: their ids come from
        # several servers' clocks, the time field from the workers').
        return sorted(entries, key=lambda e: float(e.get("time") or 0), reverse=True)[:count]

    # -- ending -----------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a job: queued chunks are dropped, running ones stop at a batch boundary."""
        return self._finish(job_id, JobState.CANCELLED, "cancelled by request")

    def fail(self, job_id: str, reason: str) -> JobInfo:
        """Fail a job with ``reason`` (an aborted upload, a permanent chunk error), cut to
        MAX_ERROR_CHARS."""
        return self._finish(job_id, JobState.FAILED, reason[:MAX_ERROR_CHARS])

    def _finish(self, job_id: str, state: JobState, reason: str) -> JobInfo:
        info = self.get(job_id)
        res = self._end(keys=self._job_keys(job_id, info.pool),
                        args=[job_id, state.value, reason, repr(time.time()),
                              int(self.config.result_ttl_s * 1000),
                              self.keys.job_progress(job_id)])
        if res != 1:
            raise JobStateError(f"job {job_id} is already {_s(res)}; it cannot be "
                                f"{state.value}")
        return self.get(job_id)

    def sweep(self, now: float | None = None, limit: int = 1000) -> int:
        """Drop ids of expired jobs from the job indexes, and fail jobs whose upload went
        silent past ``receiving_timeout_s`` (``abandon_if_silent``); returns how many
        ids were dropped. Workers (heartbeat) and servers call it: no client is needed."""
        now = time.time() if now is None else now
        dropped = 0
        cutoff = now - self.config.receiving_timeout_s
        for k in self.keys.all_shards():
            dropped += int(self._sweep(keys=[k.jobs, k.jobs_expiry, k.jobs_receiving],
                                       args=[repr(now), limit]))
            # Binary replies: the members (job ids) as bytes, without scores.
            for job_id in cast(builtins.list[bytes],
                               self.r.zrangebyscore(k.jobs_receiving, "-inf", repr(cutoff),
                                                    start=0, num=limit)):
                pool = self.r.hget(k.job(_s(job_id)), "pool")
                if pool is None:  # expired meanwhile
                    self.r.zrem(k.jobs_receiving, job_id)
                else:
                    self._abandon_now(_s(job_id), _s(pool), now)
        return dropped

    def abandon_if_silent(self, info: JobInfo) -> bool:
        """Fail ``info``'s job if it is an upload silent past ``receiving_timeout_s``
        (never sealed: the client or the server died mid-upload, or Redis lost the
        seal), dropping its queued chunks unrun; True if it was failed now."""
        now = time.time()
        if info.state is not JobState.RECEIVING or info.sealed or not info.upload_seen or \
                info.upload_seen >= now - self.config.receiving_timeout_s:
            return False  # the snapshot says no: spare the round trip
        return self._abandon_now(info.id, info.pool, now)

    def _abandon_now(self, job_id: str, pool: str, now: float) -> bool:
        return bool(self._abandon(keys=self._job_keys(job_id, pool),
                                  args=[job_id, *self._abandon_args(job_id, now)]))

    def _abandon_args(self, job_id: str, now: float) -> builtins.list[Any]:
        """ARGV cutoff, reason, now, ttl_ms, channel of the scripts that fail silent uploads."""
        t = self.config.receiving_timeout_s
        reason = (f"upload never finished: no SubmitJob message for over {t:g} s and the "
                  "job was never sealed (the client or the server died mid-upload, or Redis "
                  "lost the seal); resubmit it")
        return [repr(now - t), reason, repr(now), int(self.config.result_ttl_s * 1000),
                self.keys.job_progress(job_id)]

    # -- worker side ------------------------------------------------------------------
    def begin_chunk(self, pool: str, job_id: str, chunk: int, entry_id: str) -> ChunkTask | str:
        """Mark the job running and fetch the chunk's inputs, or say why to skip it.

        A job whose upload went silent past ``receiving_timeout_s`` is failed here
        instead (``abandon_if_silent``), so no chunk of it is computed for nothing.
        """
        now = time.time()
        res = self._begin(keys=self._job_keys(job_id, pool),
                          args=[chunk, entry_id, self.keys.group, repr(now), job_id,
                                *self._abandon_args(job_id, now)])
        if _s(res[0]) == "skip":
            return _s(res[1])
        _, kind, model, seed, temp, fmt, size, payload, policy = res
        return ChunkTask(kind=JobKind(_s(kind)), model=_s(model), chunk_size=int(size),
                         seed=int(seed),
                         temperature=float(temp), image_format=ImageFormat(_s(fmt)),
                         payload=payload or None,
                         # Jobs from before the policy existed were all fail-fast.
                         on_item_error=OnItemError(_s(policy) or OnItemError.FAIL_FAST.value))

    def store_chunk(self, pool: str, job_id: str, chunk: int, n: int, result: bytes,
                    entry_id: str, failed: int = 0) -> bool:
        """Store a chunk's packed results once, advance progress (``failed`` of its ``n``
        items are ItemFailures), XACK; True if new."""
        return bool(self._store(
            keys=self._job_keys(job_id, pool),
            args=[job_id, chunk, n, result, entry_id, self.keys.group, repr(time.time()),
                  int(self.config.result_ttl_s * 1000), self.keys.job_progress(job_id),
                  failed]))

    def ack(self, pool: str, entry_id: str, shard: int = 0) -> None:
        """Acknowledge and delete an entry of shard ``shard``'s stream of ``pool`` without
        storing anything (a stopped chunk)."""
        stream = self.keys.on_shard(shard).stream(pool)
        with self.r.pipeline(transaction=True) as p:
            p.xack(stream, self.keys.group, entry_id)
            p.xdel(stream, entry_id)
            p.execute()

    def note_chunk_error(self, job_id: str, chunk: int, error: str) -> None:
        """Remember a retryable chunk error; the dead letter quotes the last one."""
        self.r.hset(self.keys.job(job_id), f"err:{chunk}", error[:MAX_ERROR_CHARS])

    def chunk_error(self, job_id: str, chunk: int) -> str:
        return _s(self.r.hget(self.keys.job(job_id), f"err:{chunk}"))

    def dead_letter(self, pool: str, job_id: str, chunk: int, entry_id: str, *,
                    deliveries: int, reason: str, consumer: str) -> None:
        """Move a chunk to the dead-letter stream and fail its job with ``reason``."""
        k = self.keys.for_job(job_id)
        fields: builtins.list[str | int] = [
            "job", job_id, "chunk", chunk, "pool", pool, "entry", entry_id,
            "deliveries", deliveries, "reason", reason, "consumer", consumer,
            "time", repr(time.time())]
        self._dead(keys=[k.stream(pool), k.dead_letter],
                   args=[k.group, entry_id, self.config.dead_letter_maxlen, *fields])
        # A job already over: the dead letter still records the chunk.
        with contextlib.suppress(JobStateError, JobNotFound):
            self.fail(job_id, f"chunk {chunk} dead-lettered after {deliveries} "
                              f"deliveries: {reason}")

    def release(self, pool: str, consumer: str, entry_id: str, job_id: str, chunk: int,
                n: int, deliveries: int) -> bool:
        """Give a chunk we own back to the queue now (shutdown), keeping its delivery count."""
        k = self.keys.for_job(job_id)
        return bool(self._release(keys=[k.stream(pool), k.job(job_id), k.job_tasks(job_id)],
                                  args=[k.group, consumer, entry_id, job_id, chunk, n,
                                        deliveries]))

    def extend(self, pool: str, consumer: str, entry_ids: Sequence[str],
               shard: int = 0) -> dict[str, str]:
        """Reset the idle time of entries we still own on shard ``shard``'s stream of
        ``pool``: per id 'kept', 'stolen' (another consumer reclaimed it) or 'gone'
        (acked meanwhile)."""
        if not entry_ids:
            return {}
        status = self._extend(keys=[self.keys.on_shard(shard).stream(pool)],
                              args=[self.keys.group, consumer, *entry_ids])
        return dict(zip(entry_ids, (_s(x) for x in status), strict=True))
