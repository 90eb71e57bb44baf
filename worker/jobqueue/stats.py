"""The job queue's depth, read from Redis: per pool, and as Prometheus gauges.

``queue_stats(client, keys, pools)`` returns a ``QueueStats`` (one ``PoolStats`` per
pool plus the shared dead-letter stream) in one round trip; ``QueueCollector`` turns it
into gauges at scrape time, for the worker's and the service's ``/metrics``:

- ``latentserve_queue_stream_length{pool}``: entries on the task stream, waiting or held
  (acked entries are deleted, so this is the pool's backlog: scale workers on it)
- ``latentserve_queue_lag{pool}``: entries no worker has read yet (XINFO GROUPS ``lag``
  on Redis >= 7; else, or when the server cannot say, length minus pending)
- ``latentserve_queue_pending{pool}``: entries read by a worker and not yet acked
- ``latentserve_queue_oldest_pending_age_seconds{pool}``: age of the oldest pending
  entry since it was queued, on Redis's clock (alert on it: a stuck chunk grows it)
- ``latentserve_queue_consumers{pool}``: consumers in the pool's group
- ``latentserve_queue_dead_letter_length``: entries on the dead-letter stream (one stream
  for every pool, its entries name their pool; ``latentserve job`` lists them)
- ``latentserve_queue_up``: 1 if Redis answered this scrape, else 0 (and no other gauge)

Every worker and the service export the same queue gauges: aggregate with ``max by
(pool)``, not ``sum``. The label values are pool names from the configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.keys import DEFAULT_POOL, Keys
from latentserve.worker.jobqueue.keys import as_text as _s

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolStats:
    """One pool's task stream and its consumer group."""

    pool: str
    length: int                  # XLEN: waiting + pending entries
    lag: int                     # entries not yet delivered to any consumer
    pending: int                 # delivered, not yet acked
    oldest_pending_age_s: float  # since the oldest pending entry was queued; 0 if none
    consumers: int


@dataclass(frozen=True)
class QueueStats:
    """Every pool asked for, and the dead-letter stream they share."""

    pools: tuple[PoolStats, ...]
    dead_letter_length: int


def known_pools(queue: QueueConfig) -> tuple[str, ...]:
    """The pools a queue configuration routes models to (the default pool included)."""
    return tuple(sorted({DEFAULT_POOL, *(pool for _, pool in queue.pool_routes)}))


def queue_stats(client: redis.Redis, keys: Keys, pools: Iterable[str]) -> QueueStats:
    """Read every pool's stream length, lag, pending entries and oldest pending age.

    A pool whose stream or group does not exist yet reads as empty. With several stream
    shards a pool's figures add up its shards' (the oldest pending age is the oldest of
    all, the consumers the most any shard has), as does the dead-letter length. One round
    trip (two on a Redis Cluster, which cannot pipeline TIME). Raises redis errors when
    Redis cannot be reached.
    """
    from .cluster import is_cluster

    names = list(dict.fromkeys(pools))
    shards = keys.all_shards()
    with client.pipeline(transaction=False) as p:
        if not is_cluster(client):
            p.time()
        for k in shards:
            p.xlen(k.dead_letter)
            for pool in names:
                stream = k.stream(pool)
                p.xlen(stream)
                p.xinfo_groups(stream)
                p.xpending(stream, keys.group)
        replies = p.execute(raise_on_error=False)
    if is_cluster(client):
        replies.insert(0, client.time())
    seconds, micros = _raise_error(replies[0])
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    per_shard = 1 + 3 * len(names)
    dead = 0
    parts: dict[str, list[PoolStats]] = {pool: [] for pool in names}
    for s in range(len(shards)):
        base = 1 + s * per_shard
        dead += int(_raise_error(replies[base]))
        for i, pool in enumerate(names):
            length, groups, pending = replies[base + 1 + 3 * i: base + 4 + 3 * i]
            parts[pool].append(_pool_stats(pool, keys.group, now_ms, length, groups, pending))
    return QueueStats(pools=tuple(_sum_shards(parts[pool]) for pool in names),
                      dead_letter_length=dead)


def _raise_error(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


def _sum_shards(parts: list[PoolStats]) -> PoolStats:
    """One pool's figures over its shards' streams."""
    if len(parts) == 1:
        return parts[0]
    return PoolStats(pool=parts[0].pool, length=sum(p.length for p in parts),
                     lag=sum(p.lag for p in parts), pending=sum(p.pending for p in parts),
                     oldest_pending_age_s=max(p.oldest_pending_age_s for p in parts),
                     consumers=max(p.consumers for p in parts))


def _pool_stats(pool: str, group: str, now_ms: int, length: Any, groups: Any,
                pending: Any) -> PoolStats:
    for reply in (length, groups, pending):
        # "no such key" / NOGROUP: nothing was ever queued on this pool (or Redis was
        # flushed); anything else is a real error.
        if isinstance(reply, Exception) and not _missing(reply):
            raise reply
    n = length if isinstance(length, int) else 0
    info = next((g for g in groups if _s(g["name"]) == group), None) \
        if isinstance(groups, list) else None
    held = int(pending["pending"]) if isinstance(pending, dict) else 0
    lag = info.get("lag") if info else None
    oldest = 0.0
    if held and isinstance(pending, dict) and pending.get("min"):
        # Entry ids start with Redis's clock (ms) when queued: age on one clock, no skew.
        queued_ms = int(_s(pending["min"]).split("-", 1)[0])
        oldest = max(now_ms - queued_ms, 0) / 1000
    return PoolStats(pool=pool, length=n,
                     lag=int(lag) if lag is not None else max(n - held, 0),
                     pending=held, oldest_pending_age_s=oldest,
                     consumers=int(info["consumers"]) if info else 0)


def _missing(exc: Exception) -> bool:
    text = str(exc).lower()
    return "no such key" in text or "nogroup" in text


# (gauge name, help, PoolStats field) of the per-pool gauges.
_POOL_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("stream_length", "entries on the pool's task stream (waiting + pending)", "length"),
    ("lag", "entries of the pool's stream no worker has read yet", "lag"),
    ("pending", "entries read by a worker and not yet acked", "pending"),
    ("oldest_pending_age_seconds", "age of the oldest pending entry since it was queued",
     "oldest_pending_age_s"),
    ("consumers", "consumers in the pool's consumer group", "consumers"),
)
PREFIX = "latentserve_queue_"


class QueueCollector(Collector):
    """Queue gauges computed from Redis at each scrape (``registry.register(...)``)."""

    def __init__(self, client: redis.Redis, keys: Keys, pools: Sequence[str]) -> None:
        self.client = client
        self.keys = keys
        self.pools = tuple(pools)

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        try:
            stats: QueueStats | None = queue_stats(self.client, self.keys, self.pools)
        except redis.RedisError as exc:
            # A failed scrape must not hide the process's own metrics: report it as up 0.
            log.debug("queue gauges: Redis did not answer: %s", exc)
            stats = None
        yield from self._families(stats)

    def _families(self, stats: QueueStats | None) -> Iterator[Metric]:
        up = GaugeMetricFamily(PREFIX + "up", "1 if Redis answered the queue gauges' scrape")
        up.add_metric([], 0.0 if stats is None else 1.0)
        yield up
        for name, text, attr in _POOL_GAUGES:
            family = GaugeMetricFamily(PREFIX + name, text, labels=["pool"])
            for pool in stats.pools if stats else ():
                family.add_metric([pool.pool], float(getattr(pool, attr)))
            yield family
        dead = GaugeMetricFamily(PREFIX + "dead_letter_length",
                                 "entries on the dead-letter stream (all pools)")
        if stats is not None:
            dead.add_metric([], float(stats.dead_letter_length))
        yield dead
