"""``idle_bounded``: the per-stream idle limit, on plain iterators (the gRPC side is in
tests/integration/test_security.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from latentserve.service.server.stream_idle import StreamIdle, idle_bounded


def readers() -> int:
    return sum(t.name == "stream-idle-reader" for t in threading.enumerate())


def wait_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def test_a_steady_stream_passes_through_in_order_and_its_reader_ends() -> None:
    def steady() -> Iterator[int]:
        for i in range(5):
            time.sleep(0.02)
            yield i

    assert list(idle_bounded(steady(), idle_s=5)) == [0, 1, 2, 3, 4]
    wait_until(lambda: readers() == 0, "the reader thread outlived its stream")


def test_a_silent_client_ends_the_stream_with_stream_idle() -> None:
    silence, spoke = threading.Event(), threading.Event()

    def stalls() -> Iterator[int]:
        yield 1
        silence.wait(30)  # a client that stops sending but keeps the stream open
        spoke.set()
        yield 2

    got = []
    with pytest.raises(StreamIdle, match=r"no message on this stream for 0\.3 s"):
        for item in idle_bounded(stalls(), idle_s=0.3):
            got.append(item)
    assert got == [1]
    assert not spoke.is_set(), "the stream ended only after the client spoke again"
    silence.set()  # the RPC ending is what ends a real stream's iterator
    wait_until(lambda: readers() == 0, "the reader thread outlived its stream")


def test_time_the_consumer_spends_never_counts_as_idle() -> None:
    seen = []
    for item in idle_bounded(iter(range(3)), idle_s=0.2):
        time.sleep(0.4)  # the server computing a reply: longer than the idle limit
        seen.append(item)
    assert seen == [0, 1, 2]


def test_the_sources_errors_reach_the_consumer() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise ValueError("the client sent garbage")

    with pytest.raises(ValueError, match="garbage"):
        list(idle_bounded(broken(), idle_s=5))


def test_a_consumer_that_stops_early_frees_the_reader() -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    stream = idle_bounded(endless(), idle_s=5)
    assert next(stream) == 0
    stream.close()  # the servicer raised on message 0 and let the stream go
    wait_until(lambda: readers() == 0, "a reader blocked handing over a message leaked")
