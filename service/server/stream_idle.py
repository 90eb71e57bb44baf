"""Ends request streams whose client stops sending.

An open request stream holds a handler thread and one of the server's concurrent-call
slots (``max_concurrent_rpcs``) for as long as the client keeps it open, so a few
forgotten or hostile streams that never send could lock every other caller out. gRPC's
own request iterator waits without a limit; ``idle_bounded`` (which
``calls.CallInterceptor`` puts around every request-streaming RPC) gives each one: a
stream whose client sends nothing for ``idle_s`` while the server waits for its next
message ends with DEADLINE_EXCEEDED and a message saying so.
Time the server spends computing (or the client spends reading replies) never counts.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

from latentserve.service.status import DeadlineExpired


class StreamIdle(DeadlineExpired):
    """The client sent no message for the server's idle limit while the server waited."""


_END = object()


def idle_bounded(requests: Iterator[Any], idle_s: float) -> Iterator[Any]:
    """Yield ``requests``; raise ``StreamIdle`` when the next one takes over ``idle_s``.

    A reader thread hands messages over one at a time (a queue of one, so nothing is read
    ahead of the consumer); it ends with the RPC, whose iterator then stops.
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=1)
    stopped = threading.Event()

    def read() -> None:
        try:
            for request in requests:
                handoff.put(request)
                if stopped.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            handoff.put(exc)
            return
        handoff.put(_END)

    threading.Thread(target=read, name="stream-idle-reader", daemon=True).start()
    try:
        while True:
            try:
                item = handoff.get(timeout=idle_s)
            except queue.Empty:
                raise StreamIdle(
                    f"no message on this stream for {idle_s:g} s: the server ends idle "
                    "streams (--stream-idle-timeout-s); send the next message sooner, or "
                    "close the stream when done") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        # free the reader if it waits to hand over a message no one will take
        with contextlib.suppress(queue.Empty):
            handoff.get_nowait()
