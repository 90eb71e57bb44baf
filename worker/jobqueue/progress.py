"""Waiting for a job to change: its progress channel (pub/sub), robust to reconnects.

Every Lua script that changes a job's progress or state publishes on the job's
``progress`` channel; ``JobStore.watch`` and ``JobStore.iter_chunk_results`` wait here
between reads instead of polling.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .cluster import TRANSIENT_ERRORS

if TYPE_CHECKING:
    from latentserve.worker.jobqueue.store import JobStore


class ProgressWaiter:
    """Wait for a job's next progress message (pub/sub), re-subscribing after a reconnect.

    Callers re-read the job after subscribing and after every wake-up, so a message
    that arrives between a read and a wait is never missed; ``wait`` returns at the
    latest after its timeout as a safety net.
    """

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.channel = store.keys.job_progress(job_id)
        self.pubsub: Any = None

    def __enter__(self) -> ProgressWaiter:
        self._subscribe()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            finally:
                self.pubsub = None

    def _subscribe(self) -> None:
        self.pubsub = self.store.r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(self.channel)

    def wait(self, timeout: float) -> bool:
        """True if a message arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            if self.pubsub is None:
                self._subscribe()
            while (left := deadline - time.monotonic()) > 0:
                if self.pubsub.get_message(timeout=left) is not None:
                    return True
        except TRANSIENT_ERRORS:
            # Redis went away: drop the subscription, wait out the timeout, and let the
            # next wait subscribe again (the caller re-reads the job in between).
            self._close()
            time.sleep(max(deadline - time.monotonic(), 0))
        return False
