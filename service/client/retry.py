"""Retrying a client's reads through an outage: capped exponential backoff, a deadline.

A server restart, or a Redis outage behind the server, fails open calls with
UNAVAILABLE for a few seconds; the job reads (GetJob, ListJobs, WatchJob,
FetchResults) change nothing, so the client may repeat them, and the streams resume
where they stopped (``job_client``). Every other status is an answer (NOT_FOUND,
PERMISSION_DENIED, INVALID_ARGUMENT ...) and is raised at once.

``deadline_s`` counts from the first failure since the call last made progress (a
message received): a watch may last hours, an outage may not last longer than that.
No grpc import at module level: the CLI modules read ``DEFAULT_DEADLINE_S`` cheaply.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from latentserve.errors import InvalidInput

log = logging.getLogger(__name__)
RETRYABLE = frozenset({"UNAVAILABLE"})  # grpc.StatusCode names
DEFAULT_DEADLINE_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a read is retried; ``deadline_s`` 0 = never."""

    deadline_s: float = DEFAULT_DEADLINE_S
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.deadline_s >= 0:
            raise InvalidInput(f"retry deadline {self.deadline_s} s must be >= 0 (0 = no "
                               "retries)")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise InvalidInput(f"retry backoff from {self.initial_backoff_s} s up to "
                               f"{self.max_backoff_s} s must be positive and increasing")


class Retrier:
    """The retry state of one logical call (``what``, e.g. "watch of job X") on ``target``."""

    def __init__(self, policy: RetryPolicy, what: str, target: str) -> None:
        self.policy = policy
        self.what = what
        self.target = target
        self.attempt = 0
        self._failing_since: float | None = None

    def progressed(self) -> None:
        """The call got through (a reply or a message): the next outage starts afresh."""
        self.attempt = 0
        self._failing_since = None

    def backoff_or_raise(self, exc: Any) -> None:
        """Sleep before the next attempt, or raise ``exc`` (a ``grpc.RpcError``) as a
        latentserve error when it is not retryable or the deadline has passed."""
        from latentserve.service.client.inference import error_from

        code = exc.code()
        policy = self.policy
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        failing = now - self._failing_since
        retryable = code.name in RETRYABLE
        if not retryable or failing >= policy.deadline_s:
            err = error_from(exc, self.target)
            if retryable and policy.deadline_s > 0:
                err.args = (f"{err}; gave up on the {self.what} after {self.attempt + 1} "
                            f"attempts over {failing:.1f} s (retry deadline "
                            f"{policy.deadline_s:g} s)",)
            raise err from None
        self.attempt += 1
        # Jitter, so that clients cut off together do not all come back at the same instant.
        delay = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** (self.attempt - 1))
        delay = min(delay * random.uniform(0.5, 1.0), policy.deadline_s - failing)
        log.warning("%s: %s on %s (%s); retry %d in %.2f s (failing for %.1f s, retry "
                    "deadline %g s)", self.what, code.name, self.target, exc.details(),
                    self.attempt, delay, failing, policy.deadline_s)
        time.sleep(max(delay, 0.0))
