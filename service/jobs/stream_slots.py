"""Bounds on the job streams that wait (WatchJob, FetchResults) and their release.

The gRPC server is synchronous: a WatchJob or FetchResults stream holds one handler
thread for as long as it waits for the job to move, which may be hours. Left unbounded,
enough open streams take every thread, and then GetJob, SubmitJob and the health Check
wait behind them (DEADLINE_EXCEEDED), whether or not their clients are still there.

``StreamSlots`` admits at most ``total`` such streams at once, and at most ``per_caller``
of one identity; a stream past either limit is refused at once with RESOURCE_EXHAUSTED
naming the limit, so the threads left over always serve everything else.
``default_stream_limit`` keeps a quarter of the handler threads (at least two) for that.
``client_gone(context)`` is the test the stores' wait loops poll, so a stream whose
client went away gives its thread and slot back within one wait (half a second), even
when its job never changes. ``add_stream_arguments`` / ``stream_limits``: the ``serve``
flags ``--max-job-streams`` and ``--max-job-streams-per-caller`` and their env vars.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from latentserve.errors import InvalidInput, ResourceLimit


def default_stream_limit(grpc_threads: int) -> int:
    """Waiting job streams allowed on a server of ``grpc_threads`` handler threads:
    all but a reserve of a quarter of them (at least 2), and at least one."""
    return max(1, grpc_threads - max(2, grpc_threads // 4))


class StreamSlots:
    """A counted admission of waiting streams, overall and per caller identity."""

    def __init__(self, total: int, per_caller: int = 0) -> None:
        if total < 1:
            raise InvalidInput(f"the job stream limit must be at least 1, got {total}")
        if per_caller < 0:
            raise InvalidInput(f"the per-caller job stream limit must be >= 0 (0 = the "
                               f"overall limit), got {per_caller}")
        self.total = total
        self.per_caller = min(per_caller or total, total)
        self._lock = threading.Lock()
        self._open = 0
        self._by_caller: Counter[str] = Counter()

    @property
    def open(self) -> int:
        """Streams holding a slot now."""
        with self._lock:
            return self._open

    @contextmanager
    def hold(self, caller: str, rpc: str) -> Iterator[None]:
        """Hold one slot for the ``with`` body; ResourceLimit (naming the limit) if none."""
        with self._lock:
            if self._open >= self.total:
                raise ResourceLimit(
                    f"{rpc}: {self._open} job streams (WatchJob, FetchResults) are open, the "
                    f"server's limit (--max-job-streams {self.total}); close one, poll "
                    "GetJob, or retry later", limit="max_job_streams")
            if self._by_caller[caller] >= self.per_caller:
                who = f"identity {caller!r}" if caller else "anonymous callers"
                raise ResourceLimit(
                    f"{rpc}: {who} hold {self._by_caller[caller]} job streams (WatchJob, "
                    f"FetchResults), the limit per identity (--max-job-streams-per-caller "
                    f"{self.per_caller}); close one, or retry later",
                    limit="max_job_streams_per_caller")
            self._open += 1
            self._by_caller[caller] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                self._by_caller[caller] -= 1
                if not self._by_caller[caller]:
                    del self._by_caller[caller]


def client_gone(context: grpc.ServicerContext) -> Callable[[], bool]:
    """A ``should_stop`` for the store's wait loops: true once the RPC is over (its client
    cancelled or disconnected, its deadline passed, or the server stopped it)."""
    return lambda: not context.is_active()
