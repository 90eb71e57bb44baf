"""Every Redis key and stream name the job queue uses, under one configurable prefix.

Nothing else in latentserve spells a key: the service, the workers, the tests and the
benchmarks all build names through :class:`Keys`. With the default prefix
``latentserve:`` the layout is::

    latentserve:stream:<pool>          stream of chunk tasks, one per model pool
                                       (entries: job, chunk, n [, prior]); consumer
                                       group "workers"; acked entries are deleted
    latentserve:dead                   dead-letter stream (capped with MAXLEN ~)
    latentserve:jobs                   sorted set: job id -> created (for ListJobs)
    latentserve:jobs:expiry            sorted set: job id -> when its keys expire (sweeper)
    latentserve:jobs:receiving         sorted set: id of a job still receiving inputs ->
                                       when its upload last made progress (the sweep
                                       fails those silent past receiving_timeout_s)
    latentserve:job:<id>               hash: the job's spec, state and progress (TTL)
    latentserve:job:<id>:in            hash: chunk index -> packed inputs (TTL; a field
                                       is deleted once its chunk's results are stored)
    latentserve:job:<id>:out           hash: chunk index -> packed results (TTL)
    latentserve:job:<id>:tasks         list: stream entry ids of the job's chunks (TTL),
                                       so a cancel can delete its queued entries
    latentserve:job:<id>:progress      pub/sub channel: a message per progress change
    latentserve:worker:<consumer>      string: a worker's health record (TTL'd heartbeat)

Every per-job key carries the job hash's TTL, so a finished job leaves nothing behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from latentserve.errors import InvalidInput

DEFAULT_PREFIX = "latentserve:"
DEFAULT_POOL = "default"
GROUP = "workers"  # the one consumer group on every task stream

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


@dataclass(frozen=True)
class Keys:
    """Key and stream names under ``prefix`` (default ``latentserve:``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise InvalidInput(f"key prefix {self.prefix!r} must be non-empty, without spaces")

    # -- queue-wide -------------------------------------------------------------------
    def stream(self, pool: str) -> str:
        """The task stream of a model pool."""
        return f"{self.prefix}stream:{check_pool(pool)}"

    def stream_pattern(self) -> str:
        """SCAN pattern matching every task stream."""
        return f"{self.prefix}stream:*"

    @property
    def group(self) -> str:
        return GROUP

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead"

    @property
    def jobs(self) -> str:
        """Sorted set of job ids scored by creation time."""
        return f"{self.prefix}jobs"

    @property
    def jobs_expiry(self) -> str:
        """Sorted set of job ids scored by the time their keys expire."""
        return f"{self.prefix}jobs:expiry"

    @property
    def jobs_receiving(self) -> str:
        """Sorted set of ids of jobs still receiving inputs, scored by their last upload
        progress."""
        return f"{self.prefix}jobs:receiving"

    # -- per job ----------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def job_inputs(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:in"

    def job_results(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:out"

    def job_tasks(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:tasks"

    def job_progress(self, job_id: str) -> str:
        """Pub/sub channel announcing progress and state changes of one job."""
        return f"{self.prefix}job:{job_id}:progress"

    # -- workers ----------------------------------------------------------------------
    def worker(self, consumer: str) -> str:
        return f"{self.prefix}worker:{consumer}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}worker:*"

    def all_pattern(self) -> str:
        """SCAN pattern matching every key under the prefix (tests, cleanup)."""
        return f"{self.prefix}*"


def as_text(value: bytes | str | None) -> str:
    """A Redis reply (bytes, str or None) as text; None is ""."""
    return value.decode() if isinstance(value, bytes) else (value or "")
