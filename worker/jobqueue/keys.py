"""Every Redis key and stream name the job queue uses, under one configurable prefix.

Nothing else in latentserve spells a key: the service, the workers, the tests and the
benchmarks all build names through :class:`Keys`. With the default prefix
``latentserve:`` and one shard (``QueueConfig.stream_shards``, default 1) the layout
is::

    latentserve:{0}:stream:<pool>      stream of chunk tasks, one per model pool
                                       (entries: job, chunk, n [, prior]); consumer
                                       group "workers"; acked entries are deleted
    latentserve:{0}:dead               dead-letter stream (capped with MAXLEN ~)
    latentserve:{0}:jobs               sorted set: job id -> created (for ListJobs)
    latentserve:{0}:jobs:expiry        sorted set: job id -> when its keys expire (sweeper)
    latentserve:{0}:jobs:receiving     sorted set: id of a job still receiving inputs ->
                                       when its upload last made progress (the sweep
                                       fails those silent past receiving_timeout_s)
    latentserve:{0}:job:<id>           hash: the job's spec, state and progress (TTL)
    latentserve:{0}:job:<id>:in        hash: chunk index -> packed inputs (TTL; a field
                                       is deleted once its chunk's results are stored)
    latentserve:{0}:job:<id>:out       hash: chunk index -> packed results (TTL)
    latentserve:{0}:job:<id>:tasks     list: stream entry ids of the job's chunks (TTL),
                                       so a cancel can delete its queued entries
    latentserve:{0}:job:<id>:progress  pub/sub channel: a message per progress change
    latentserve:{0}:worker:<consumer>  string: a worker's health record (TTL'd heartbeat)

Every per-job key carries the job hash's TTL, so a finished job leaves nothing behind.

``{0}`` is a Redis Cluster hash tag: every key of a shard hashes to one slot, so each
Lua script and transaction (a job's keys, its pool's stream, the job indexes) touches
one slot and no CROSSSLOT error is possible. With ``stream_shards`` N > 1 there are N
such groups, each a whole copy of the layout above (a worker writes its health key in
each); a job lives on the shard its id picks (``shard_of``), and its chunks go on that
shard's stream of its pool, so jobs spread over N slots and workers read all N streams.
Shard k's tag is the first of ``k``, ``k.1``, ``k.2``... whose slot falls in the k-th of N
equal slot ranges, so on a cluster whose masters hold equal ranges (what ``redis-cli
--cluster create`` makes) N shards sit on N different masters. Changing N renames every
key: drain the queue first (docs/scaling.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache, cached_property

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from latentserve.errors import InvalidInput

DEFAULT_PREFIX = "latentserve:"
DEFAULT_POOL = "default"
GROUP = "workers"  # the one consumer group on every task stream
MAX_SHARDS = 128

_POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def check_pool(pool: str) -> str:
    """Return ``pool`` if it is a valid pool name, else raise InvalidInput."""
    if not _POOL_RE.fullmatch(pool):  # "$" would let a trailing newline through
        raise InvalidInput(f"pool name {pool!r} must be 1-64 characters of letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit")
    return pool


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it has the form of a job id (32 hex digits), else raise."""
    if not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidInput(f"job id {job_id!r} is not a job id (32 lowercase hex digits)")
    return job_id


@cache
def shard_tag(shard: int, shards: int) -> str:
    """The hash tag of shard ``shard`` of ``shards``: the first of "k", "k.1", "k.2"...
    whose slot lies in the k-th of ``shards`` equal slot ranges."""
    lo = shard * REDIS_CLUSTER_HASH_SLOTS // shards
    hi = (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    for n in range(100_000):  # about `shards` tries on average
        tag = f"{shard}.{n}" if n else str(shard)
        if lo <= key_slot(tag.encode()) < hi:
            return tag
    raise AssertionError(f"no hash tag found for shard {shard} of {shards}")


@dataclass(frozen=True)
class Keys:
    """Key and stream names under ``prefix`` (default ``latentserve:``), as seen from
    shard ``shard`` of ``shards`` (see the module docstring).

    The queue-wide names (``stream``, ``dead_letter``, the job indexes, ``worker``) are
    this shard's; ``on_shard(k)`` and ``all_shards()`` give the others. A job's own keys
    (``job``, ``job_inputs``...) are always on the shard its id picks, and
    ``for_job(id)`` is the view whose stream and indexes share that slot.
    """

    prefix: str = DEFAULT_PREFIX
    shards: int = 1
    shard: int = 0

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() or c in "{}" for c in self.prefix):
            # A brace would start a hash tag of its own and scatter a job's keys.
            raise InvalidInput(f"key prefix {self.prefix!r} must be non-empty, without "
                               "spaces or braces")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise InvalidInput(f"stream shards must be between 1 and {MAX_SHARDS}, got "
                               f"{self.shards}")
        if not 0 <= self.shard < self.shards:
            raise InvalidInput(f"shard {self.shard} is not one of 0..{self.shards - 1}")

    @cached_property
    def _base(self) -> str:
        return f"{self.prefix}{{{shard_tag(self.shard, self.shards)}}}:"

    # -- shards -----------------------------------------------------------------------
    def shard_of(self, job_id: str) -> int:
        """The shard a job lives on, read from its (random) id."""
        return int(job_id[:8], 16) % self.shards if self.shards > 1 else 0

    def on_shard(self, shard: int) -> Keys:
        """The names as seen from shard ``shard``."""
        return self if shard == self.shard else replace(self, shard=shard)

    def all_shards(self) -> tuple[Keys, ...]:
        """One view per shard, shard 0 first."""
        return tuple(self.on_shard(k) for k in range(self.shards))

    def for_job(self, job_id: str) -> Keys:
        """The view of the shard ``job_id`` lives on."""
        return self.on_shard(self.shard_of(job_id))

    def _job_base(self, job_id: str) -> str:
        return self.for_job(job_id)._base

    # -- queue-wide -------------------------------------------------------------------
    def stream(self, pool: str) -> str:
        """The task stream of a model pool (this shard's)."""
        return f"{self._base}stream:{check_pool(pool)}"

    def streams(self, pool: str) -> tuple[str, ...]:
        """The pool's task streams on every shard, shard 0 first."""
        return tuple(k.stream(pool) for k in self.all_shards())

    def stream_pattern(self) -> str:
        """SCAN pattern matching every task stream of every shard."""
        return f"{self.prefix}{{*}}:stream:*"

    @property
    def group(self) -> str:
        return GROUP

    @property
    def dead_letter(self) -> str:
        return f"{self._base}dead"

    @property
    def jobs(self) -> str:
        """Sorted set of job ids scored by creation time."""
        return f"{self._base}jobs"

    @property
    def jobs_expiry(self) -> str:
        """Sorted set of job ids scored by the time their keys expire."""
        return f"{self._base}jobs:expiry"

    @property
    def jobs_receiving(self) -> str:
        """Sorted set of ids of jobs still receiving inputs, scored by their last upload
        progress."""
        return f"{self._base}jobs:receiving"

    # -- per job ----------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        return f"{self._job_base(job_id)}job:{job_id}"

    def job_inputs(self, job_id: str) -> str:
        return f"{self._job_base(job_id)}job:{job_id}:in"

    def job_results(self, job_id: str) -> str:
        return f"{self._job_base(job_id)}job:{job_id}:out"

    def job_tasks(self, job_id: str) -> str:
        return f"{self._job_base(job_id)}job:{job_id}:tasks"

    def job_progress(self, job_id: str) -> str:
        """Pub/sub channel announcing progress and state changes of one job."""
        return f"{self._job_base(job_id)}job:{job_id}:progress"

    # -- workers ----------------------------------------------------------------------
    def worker(self, consumer: str) -> str:
        """A worker's health key on this shard (a worker writes one on every shard, so
        the dead-consumer check shares the slot of the stream it claims from)."""
        return f"{self._base}worker:{consumer}"

    def worker_pattern(self) -> str:
        """SCAN pattern of this shard's health keys (one per live worker)."""
        return f"{self._base}worker:*"

    def all_pattern(self) -> str:
        """SCAN pattern matching every key under the prefix (tests, cleanup)."""
        return f"{self.prefix}*"


def as_text(value: bytes | str | None) -> str:
    """A Redis reply (bytes, str or None) as text; None is ""."""
    return value.decode() if isinstance(value, bytes) else (value or "")
