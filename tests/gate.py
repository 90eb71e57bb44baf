"""A gate the test holds on a worker's pipeline calls, so a test decides how far a job
gets instead of hoping the machine is slow (or fast) enough.

``GatedPipeline(inner, gate)`` is the real pipeline whose calls (the worker's compress /
reconstruct / sample, in halves) each wait for one pass of ``gate``. ``Gate`` keeps its
count in Redis, so a test drives a worker in another process too
(``tests/gated_worker.py``): ``allow(n)`` lets n more calls through, ``open()`` lets
every call through, ``passed()`` says how many went through, ``waiting()`` whether a
call is waiting at the gate.
"""

from __future__ import annotations

import time
from typing import Any

import redis

OPEN = 1 << 40


class Gate:
    """A counter of allowed calls in Redis under ``test-gate:<name>:*``."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.r = client
        self.allowed_key = f"test-gate:{name}:allowed"
        self.ticket_key = f"test-gate:{name}:ticket"
        self.passed_key = f"test-gate:{name}:passed"
        self.waiting_key = f"test-gate:{name}:waiting"

    def allow(self, n: int = 1) -> None:
        self.r.incrby(self.allowed_key, n)

    def open(self) -> None:
        self.r.set(self.allowed_key, OPEN)

    def passed(self) -> int:
        return int(self.r.get(self.passed_key) or 0)

    def waiting(self) -> bool:
        return int(self.r.get(self.waiting_key) or 0) > 0

    def pass_through(self, timeout_s: float = 120.0) -> None:
        """Block until the test allows one more call (the worker's side).

        Each call first takes a ticket (INCR, atomic): call k passes once allowed >= k.
        Comparing allowed with passed() instead let two workers polling at once both pass
        on one allowance, so passed() overshot n and a test waiting for it hung."""
        end = time.monotonic() + timeout_s
        self.r.incr(self.waiting_key)
        try:
            ticket = int(self.r.incr(self.ticket_key))
            while int(self.r.get(self.allowed_key) or 0) < ticket:
                if time.monotonic() > end:
                    raise TimeoutError(f"{self.allowed_key}: no call allowed in {timeout_s}s")
                time.sleep(0.005)
        finally:
            self.r.decr(self.waiting_key)
        # Counted once no longer waiting: a test that sees passed() == n and waiting()
        # knows call n has passed and call n + 1 waits (counting first let it see both
        # while call n was only starting).
        self.r.incr(self.passed_key)


class GatedPipeline:
    """The real pipeline; each call the worker makes (``compress_staged`` /
    ``reconstruct_staged`` / ``sample_staged``, ``chunkwork.JobPipeline``) passes the gate
    before its first half runs."""

    def __init__(self, inner: Any, gate: Gate) -> None:
        self.inner = inner
        self.gate = gate

    def compress_staged(self, ref: str, images: Any) -> Any:
        self.gate.pass_through()
        return self.inner.compress_staged(ref, images)

    def reconstruct_staged(self, codes: Any, ref: str | None = None) -> Any:
        self.gate.pass_through()
        return self.inner.reconstruct_staged(codes, ref)

    def sample_staged(self, ref: str, count: int, *, seed: int, temperature: float = 1.0,
                      start: int = 0) -> Any:
        self.gate.pass_through()
        return self.inner.sample_staged(ref, count, seed=seed, temperature=temperature,
                                        start=start)

    def __getattr__(self, name: str) -> Any:  # models(), runtime(): not gated
        return getattr(self.inner, name)
