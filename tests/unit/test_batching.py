"""Dynamic batching with plain callables: merging, cutting, dropping, isolation, limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from latentserve.errors import ResourceLimit, Unavailable
from latentserve.service.server.batching import (
    BatcherSet,
    ComputeLanes,
    DynamicBatcher,
    Ticket,
    concat,
)
from latentserve.service.status import DeadlineExpired, RequestCancelled

WAIT = 10.0  # seconds: only ever reached when a test fails


class Recorder:
    """A batch function that records each batch it gets and can hold the first one."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: np.ndarray) -> np.ndarray:
        self.batches.append([int(v) for v in items])
        self.entered.set()
        assert self.release.wait(WAIT)
        if (items < 0).any():
            raise ValueError(f"negative item in {items.tolist()}")
        return items * 10

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


class Events:
    """An observer that lets a test await drops instead of sleeping."""

    def __init__(self) -> None:
        self.dropped: list[tuple[str, int]] = []
        self.dropped_event = threading.Event()
        self.batches: list[int] = []

    def on_batch(self, size: int, seconds: float) -> None:
        self.batches.append(size)

    def on_wait(self, seconds: float, count: int) -> None:
        pass

    def on_queued(self, count: int) -> None:
        pass

    def on_dropped(self, reason: str, count: int) -> None:
        self.dropped.append((reason, count))
        self.dropped_event.set()


@pytest.fixture
def lanes() -> Iterator[ComputeLanes]:
    p = ComputeLanes(1)
    yield p
    p.shutdown()


def make(fn, lanes: ComputeLanes, **kw) -> DynamicBatcher:  # type: ignore[no-untyped-def]
    opts = dict(max_batch_size=64, max_queue_delay_us=60_000_000, name="test")
    opts.update(kw)
    return DynamicBatcher(fn, lanes=lanes, **opts)  # type: ignore[arg-type]


def arr(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


class Background:
    """Submit from another thread: a request that finds the batcher idle runs inline."""

    def __init__(self, batcher: DynamicBatcher, items: np.ndarray) -> None:
        self.ticket: list[Ticket] = []
        self.thread = threading.Thread(target=lambda: self.ticket.append(batcher.submit(items)))
        self.thread.start()

    def result(self, timeout: float) -> np.ndarray:
        self.thread.join(timeout)
        return self.ticket[0].result(timeout)


def test_a_lone_request_runs_at_once_in_the_callers_thread(lanes: ComputeLanes) -> None:
    threads = []

    def fn(items: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return items * 10

    b = make(fn, lanes)
    try:
        ticket = b.submit(arr(1, 2, 3))
        assert ticket.finished and ticket.result(0).tolist() == [10, 20, 30]
        assert threads == [threading.current_thread()]
    finally:
        b.close()


def test_requests_arriving_during_a_batch_are_merged_into_the_next(lanes: ComputeLanes) -> None:
    rec = Recorder(hold_first=True)
    b = make(rec, lanes)
    try:
        first = Background(b, arr(1))
        assert rec.entered.wait(WAIT)
        waiting = [b.submit(arr(10 + i)) for i in range(5)]
        assert b.queued == 5
        rec.release.set()
        assert first.result(WAIT).tolist() == [10]
        assert [t.result(WAIT).tolist() for t in waiting] == [[100 + 10 * i] for i in range(5)]
        assert rec.sizes == [1, 5]
    finally:
        b.close()


def test_a_large_request_is_cut_into_max_size_batches_in_order(lanes: ComputeLanes) -> None:
    rec = Recorder()
    b = make(rec, lanes, max_batch_size=4)
    try:
        out = b.submit(np.arange(10)).result(WAIT)
        assert out.tolist() == [10 * i for i in range(10)]
        assert rec.sizes == [4, 4, 2]
    finally:
        b.close()


def test_a_full_batch_starts_without_waiting_for_the_delay(lanes: ComputeLanes) -> None:
    rec = Recorder()
    b = make(rec, lanes, max_batch_size=3, dispatch_when_idle=False)  # delay 60 s
    try:
        tickets = [b.submit(arr(i)) for i in range(3)]
        assert [t.result(WAIT).tolist() for t in tickets] == [[0], [10], [20]]
        assert rec.sizes == [3]
    finally:
        b.close()


def test_the_queue_delay_gathers_requests_then_fires(lanes: ComputeLanes) -> None:
    rec = Recorder()
    b = make(rec, lanes, max_queue_delay_us=300_000, dispatch_when_idle=False)
    try:
        start = time.monotonic()
        tickets = [b.submit(arr(i)) for i in range(3)]
        assert [t.result(WAIT).tolist() for t in tickets] == [[0], [10], [20]]
        assert time.monotonic() - start >= 0.3
        assert rec.sizes == [3]
    finally:
        b.close()


def test_batching_off_runs_every_request_alone(lanes: ComputeLanes) -> None:
    rec = Recorder(hold_first=True)
    b = make(rec, lanes, batching=False, max_batch_size=2)
    try:
        first = Background(b, arr(1))
        assert rec.entered.wait(WAIT)
        rest = [b.submit(arr(2)), b.submit(arr(3, 4, 5))]
        rec.release.set()
        assert [t.result(WAIT).tolist() for t in [first, *rest]] == [[10], [20], [30, 40, 50]]
        assert rec.sizes == [1, 1, 2, 1]
    finally:
        b.close()


def test_a_cancelled_request_is_dropped_from_the_queue(lanes: ComputeLanes) -> None:
    rec = Recorder()
    events = Events()
    b = make(rec, lanes, dispatch_when_idle=False, observer=events)
    try:
        t = b.submit(arr(1, 2))
        t.cancel()
        with pytest.raises(RequestCancelled):
            t.result(WAIT)
        assert events.dropped_event.wait(WAIT)
        assert events.dropped == [("cancelled", 2)]
        assert b.queued == 0 and rec.batches == []
    finally:
        b.close()


def test_a_request_past_its_deadline_is_dropped_with_a_clear_error(lanes: ComputeLanes) -> None:
    rec = Recorder()
    events = Events()
    b = make(rec, lanes, dispatch_when_idle=False, observer=events)
    try:
        t = b.submit(arr(1), deadline=time.monotonic() + 0.05)
        with pytest.raises(DeadlineExpired, match="deadline passed"):
            t.result(WAIT)
        assert events.dropped == [("deadline", 1)]
        assert rec.batches == []
    finally:
        b.close()


def test_cancelling_a_large_request_stops_its_remaining_batches(lanes: ComputeLanes) -> None:
    rec = Recorder(hold_first=True)
    b = make(rec, lanes, max_batch_size=2)
    try:
        t = b.submit(np.arange(10))
        assert rec.entered.wait(WAIT)
        t.cancel()
        rec.release.set()
        with pytest.raises(RequestCancelled):
            t.result(WAIT)
        b.close()  # drains: whatever was still queued for t must not run
        assert rec.sizes == [2]
    finally:
        b.close()


def test_one_bad_request_in_a_merged_batch_fails_only_itself(lanes: ComputeLanes) -> None:
    rec = Recorder(hold_first=True)
    b = make(rec, lanes)
    try:
        first = Background(b, arr(1))
        assert rec.entered.wait(WAIT)
        good1, bad, good2 = b.submit(arr(2)), b.submit(arr(-1)), b.submit(arr(3, 4))
        rec.release.set()
        assert first.result(WAIT).tolist() == [10]
        assert good1.result(WAIT).tolist() == [20]
        assert good2.result(WAIT).tolist() == [30, 40]
        with pytest.raises(ValueError, match="negative item in \\[-1\\]"):
            bad.result(WAIT)
    finally:
        b.close()


def test_a_full_queue_refuses_with_its_depth_and_limit(lanes: ComputeLanes) -> None:
    rec = Recorder(hold_first=True)
    b = make(rec, lanes, max_queue_items=3)
    try:
        first = Background(b, arr(1))
        assert rec.entered.wait(WAIT)
        queued = b.submit(arr(2, 3))
        with pytest.raises(ResourceLimit, match="holds 2 images.*limit of 3"):
            b.submit(arr(4, 5))
        rec.release.set()
        assert first.result(WAIT).tolist() == [10]
        assert queued.result(WAIT).tolist() == [20, 30]
    finally:
        b.close()


def test_close_answers_what_is_queued_then_refuses(lanes: ComputeLanes) -> None:
    rec = Recorder(hold_first=True)
    b = make(rec, lanes)
    first = Background(b, arr(1))
    assert rec.entered.wait(WAIT)
    queued = b.submit(arr(2))
    closer = threading.Thread(target=b.close)
    closer.start()
    rec.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    # first's own thread ran its batch inline and may not have returned from submit yet:
    # give it the time to (close already waited for the batch itself).
    assert first.result(WAIT).tolist() == [10] and queued.result(0).tolist() == [20]
    with pytest.raises(Unavailable, match="shutting down"):
        b.submit(arr(3))


def test_lists_batch_like_arrays() -> None:
    lanes = ComputeLanes(2)
    b = DynamicBatcher(lambda items: [x.upper() for x in items], lanes=lanes, max_batch_size=2,
                       max_queue_delay_us=0, name="lists")
    try:
        assert b.submit([b"ab", b"cd", b"ef"]).result(WAIT) == [b"AB", b"CD", b"EF"]
        assert b.submit([]).result(WAIT) == []
    finally:
        b.close()
        lanes.shutdown()
    assert concat([[1], [2, 3]]) == [1, 2, 3]


def test_concurrent_submitters_each_get_exactly_their_own_results() -> None:
    lanes = ComputeLanes(2)
    seen: list[int] = []
    b = DynamicBatcher(lambda x: (seen.append(len(x)), x * 3)[1], lanes=lanes, max_batch_size=8,
                       max_queue_delay_us=1000, name="many")
    results: dict[int, list[int]] = {}
    go = threading.Barrier(16)

    def client(i: int) -> None:
        go.wait(WAIT)
        values = np.arange(i * 100, i * 100 + 1 + i % 5)
        results[i] = b.submit(values).result(WAIT).tolist()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        for i in range(16):
            assert results[i] == [3 * v for v in range(i * 100, i * 100 + 1 + i % 5)]
        assert max(seen) <= 8
    finally:
        b.close()
        lanes.shutdown()


def test_a_batcher_set_keeps_keys_apart() -> None:
    lanes = ComputeLanes(1)
    batches: list[tuple[str, list[str]]] = []

    def factory(key: object) -> DynamicBatcher:
        def fn(items: list[str]) -> list[str]:
            batches.append((str(key), list(items)))
            return [f"{key}:{x}" for x in items]
        return DynamicBatcher(fn, lanes=lanes, max_batch_size=16, max_queue_delay_us=1000,
                              name=str(key))

    s = BatcherSet(factory)
    try:
        ta = s.get("a").submit(["1", "2"])
        tb = s.get("b").submit(["3"])
        assert s.get("a") is s.get("a")
        assert ta.result(WAIT) == ["a:1", "a:2"] and tb.result(WAIT) == ["b:3"]
        for key, items in batches:
            assert all((x in "12") == (key == "a") for x in items)
    finally:
        s.close()
        lanes.shutdown()
    with pytest.raises(Unavailable):
        s.get("a")
