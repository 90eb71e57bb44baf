"""The server's own sweep of the job queue, so that it needs no client and no worker.

``JobStore.sweep`` drops expired job ids and fails uploads silent past
``receiving_timeout_s`` (a client or a server that died mid-SubmitJob, a seal Redis
lost). Workers sweep from their heartbeat; ``start_sweeper`` does it in the server too,
so a job whose upload died ends FAILED even while no worker runs and nobody watches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from latentserve.worker.jobqueue.cluster import TRANSIENT_ERRORS
from latentserve.worker.jobqueue.store import JobStore

log = logging.getLogger(__name__)


def sweep_period(store: JobStore) -> float:
    """Often enough that a silent upload ends within 1.5 timeouts; at most once a minute."""
    return min(60.0, store.config.receiving_timeout_s / 2)


def start_sweeper(store: JobStore, period_s: float | None = None) -> Callable[[], None]:
    """Sweep every ``period_s`` (default ``sweep_period``) in a daemon thread; returns
    the function that stops it."""
    period = sweep_period(store) if period_s is None else period_s
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period):
            try:
                store.sweep()
            except TRANSIENT_ERRORS as exc:
                log.warning("job sweep: Redis unavailable (%s); next try in %.0fs", exc,
                            period)
            except Exception:  # noqa: BLE001 - the sweeper must outlive any one failure
                log.exception("job sweep failed")

    thread = threading.Thread(target=loop, name="job-sweeper", daemon=True)
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join(5)
    return halt
