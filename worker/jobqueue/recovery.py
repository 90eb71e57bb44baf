"""Find dead consumers of a pool's group and take over their entries at once.

Each worker writes its TTL'd health key (``Keys.worker``) before it reads its first
entry and refreshes it every heartbeat; the key expires three heartbeats after the
worker stops. So a consumer that holds pending entries and has no health key is dead
(SIGKILLed, or gone without giving its chunks back), and its entries need not wait for
``claim_idle_s``. ``CLAIM_DEAD`` checks the key and claims in one script, so two
survivors never both take an entry, and each entry's delivery count rises by one per
death, as with XAUTOCLAIM: ``max_deliveries`` still counts deaths. A live worker keeps
its key; of its entries, only those it no longer extends (a failed chunk awaiting its
retry, chunks let go on a Redis outage) are reclaimed, after ``claim_idle_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from latentserve.worker.jobqueue.keys import Keys
from latentserve.worker.jobqueue.keys import as_text as _s

# KEYS: stream, the consumer's health key. ARGV: group, dead consumer, claimer, count.
# -> {entries still pending on the dead consumer, {id, fields, times delivered}...,
#     ids gone from the stream}. A consumer left with nothing is deleted from the group.
CLAIM_DEAD = r"""
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, {}, {}} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
local ids, times = {}, {}
for i, p in ipairs(pending) do
  ids[i] = p[1]
  times[p[1]] = p[4]
end
local claimed, gone = {}, {}
if #ids > 0 then
  for _, e in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))) do
    if e[2] then
      claimed[#claimed + 1] = {e[1], e[2], times[e[1]] + 1}
    else  -- Redis 6.2 returns a deleted entry without fields (7+ drops it itself)
      gone[#gone + 1] = e[1]
    end
  end
  if #gone > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(gone)) end
end
local left = #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if left == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return {left, claimed, gone}
"""


@dataclass(frozen=True)
class ClaimedEntry:
    """A stream entry now owned by the claimer, and how often it has been delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    delivered: int


@dataclass(frozen=True)
class DeadClaim:
    """What one ``claim`` took from a dead consumer."""

    consumer: str
    entries: tuple[ClaimedEntry, ...]
    gone: int   # entries deleted meanwhile (a cancelled job's), acked
    left: int   # still pending on the dead consumer (over ``count``); -1: it is alive


class Recovery:
    """Dead-consumer detection and claiming for one worker (``me``)."""

    def __init__(self, client: redis.Redis, keys: Keys, me: str) -> None:
        self.r = client
        self.keys = keys
        self.me = me
        self._claim = client.register_script(CLAIM_DEAD)

    def dead_consumers(self, pool: str, shard: int = 0) -> list[tuple[str, int]]:
        """(consumer, pending entries) of the group members on shard ``shard``'s stream of
        the pool that hold entries and have no health key there; never this worker."""
        keys = self.keys.on_shard(shard)
        stream = keys.stream(pool)
        holders = [(_s(c["name"]), int(c["pending"]))
                   for c in self.r.xinfo_consumers(stream, self.keys.group)
                   if int(c["pending"]) > 0 and _s(c["name"]) != self.me]
        if not holders:
            return []
        with self.r.pipeline(transaction=False) as p:
            for name, _ in holders:
                p.exists(keys.worker(name))
            alive = p.execute()
        return [(name, n) for (name, n), up in zip(holders, alive, strict=True) if not up]

    def claim(self, pool: str, consumer: str, count: int, shard: int = 0) -> DeadClaim:
        """Take up to ``count`` of a dead consumer's entries on shard ``shard``'s stream,
        if it is still dead."""
        keys = self.keys.on_shard(shard)
        left, claimed, gone = self._claim(
            keys=[keys.stream(pool), keys.worker(consumer)],
            args=[self.keys.group, consumer, self.me, count])
        entries = tuple(
            ClaimedEntry(entry_id=_s(eid), delivered=int(times),
                         fields=dict(zip(flat[::2], flat[1::2], strict=True)))
            for eid, flat, times in claimed)
        return DeadClaim(consumer=consumer, entries=entries, gone=len(gone), left=int(left))
