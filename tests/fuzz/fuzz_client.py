"""Send raw request bytes to a real server and record every answer's status.

``Fuzzer`` talks to the server with identity serializers (``channel.unary_unary(path)``
without serializers sends and returns bytes as they are), so a case can be any byte
string, a truncated message or a message of another type. Every call carries a deadline;
each answer is recorded per status code and per case category for the terminal summary,
and ``check`` asserts it is a definite answer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

C = grpc.StatusCode
INFERENCE = "/latentserve.v1.Inference/"
JOBS = "/latentserve.v1.Jobs/"

# Every method the fuzz suite calls, and its streaming kind: u = unary, s = stream
# (request kind, then response kind).
METHODS: dict[str, str] = {
    INFERENCE + "ListModels": "uu", INFERENCE + "GetModel": "uu",
    INFERENCE + "Compress": "uu", INFERENCE + "CompressStream": "ss",
    INFERENCE + "Reconstruct": "uu", INFERENCE + "ReconstructStream": "ss",
    INFERENCE + "Sample": "uu",
    JOBS + "SubmitJob": "su", JOBS + "GetJob": "uu", JOBS + "ListJobs": "uu",
    JOBS + "WatchJob": "us", JOBS + "CancelJob": "uu", JOBS + "FetchResults": "us",
    "/grpc.health.v1.Health/Check": "uu",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "ss",
    # Not served: gRPC answers UNIMPLEMENTED.
    INFERENCE + "NoSuchMethod": "uu", "/latentserve.v2.Inference/Compress": "uu",
}

# Share of the requests per case category (each a test); they add up to 1.
WEIGHTS = {
    "wire-random": 0.10, "wire-damaged": 0.10, "compress": 0.15, "compress-image": 0.10,
    "reconstruct": 0.14, "sample": 0.08, "get-model": 0.04, "compress-stream": 0.05,
    "reconstruct-stream": 0.04, "job-submit": 0.10, "job-ids": 0.09, "list-jobs": 0.01,
}

# A hang (DEADLINE_EXCEEDED), an unhandled exception (UNKNOWN / INTERNAL), a call
# dropped by the server (CANCELLED), a server gone (UNAVAILABLE): never an answer to
# a bad request.
NEVER = frozenset({C.DEADLINE_EXCEEDED, C.UNKNOWN, C.INTERNAL, C.CANCELLED, C.UNAVAILABLE})


@dataclass
class Outcome:
    """One call's answer: its status, details and the reply messages (bytes)."""

    method: str
    code: grpc.StatusCode
    details: str
    replies: list[bytes] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.method} -> {self.code.name}: {self.details[:300]!r}"


class FuzzError(AssertionError):
    """An answer that is not a definite status, or not one the case allows."""


@dataclass
class Stats:
    """Counts of every call made, per status code and per case category."""

    tried: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    by_category: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: float = 0.0  # spent in calls
    category_seconds: Counter[str] = field(default_factory=Counter)

    def add(self, category: str, code: grpc.StatusCode, seconds: float) -> None:
        self.tried += 1
        self.seconds += seconds
        self.category_seconds[category] += seconds
        self.by_code[code.name] += 1
        self.by_category[category][code.name] += 1

    def lines(self) -> list[str]:
        """The histogram, one line per status code and per category."""
        if not self.tried:
            return ["no fuzz requests were sent"]
        rate = (f" in {self.seconds:.1f} s of calls ({self.tried / self.seconds:.0f}/s)"
                if self.seconds else "")
        out = [f"fuzz requests tried: {self.tried}{rate}", "by status code:"]
        out += [f"  {name:<20} {n:>7}" for name, n in self.by_code.most_common()]
        out.append("by case category:")
        width = max(len(c) for c in self.by_category)
        for cat in sorted(self.by_category):
            counts = self.by_category[cat]
            parts = ", ".join(f"{k} {v}" for k, v in counts.most_common())
            out.append(f"  {cat:<{width}} {sum(counts.values()):>6} "
                       f"{self.category_seconds[cat]:5.1f} s  {parts}")
        return out


STATS = pytest.StashKey[Stats]()  # the session's counts, on pytest's config


class Fuzzer:
    """Calls any method with raw bytes under a deadline; records and checks the answers."""

    def __init__(self, channel: grpc.Channel, stats: Stats, *, deadline_s: float) -> None:
        self.channel = channel
        self.stats = stats
        self.deadline_s = deadline_s
        self._calls: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _callable(self, method: str) -> Any:
        with self._lock:
            call = self._calls.get(method)
            if call is None:
                kind = METHODS[method]
                make = {"uu": self.channel.unary_unary, "us": self.channel.unary_stream,
                        "su": self.channel.stream_unary, "ss": self.channel.stream_stream}[kind]
                call = self._calls[method] = make(method)  # no serializers: bytes in and out
            return call

    def call(self, category: str, method: str, payload: bytes | Sequence[bytes]) -> Outcome:
        """Send ``payload`` (bytes, or a sequence of messages for a request stream)."""
        kind = METHODS[method]
        request: Any = iter(list(payload)) if kind[0] == "s" else payload
        if kind[0] == "u" and not isinstance(payload, bytes):
            raise TypeError(f"{method} takes one message, got {type(payload).__name__}")
        replies: list[bytes] = []
        started = time.perf_counter()
        try:
            answer = self._callable(method)(request, timeout=self.deadline_s)
            if kind[1] == "s":
                replies.extend(answer)
            else:
                replies.append(answer)
            outcome = Outcome(method, C.OK, "", replies)
        except grpc.RpcError as exc:
            outcome = Outcome(method, exc.code(), exc.details() or "", replies)
        self.stats.add(category, outcome.code, time.perf_counter() - started)
        return outcome

    def check(self, outcome: Outcome, allowed: Iterable[grpc.StatusCode] | None = None,
              case: object = None) -> Outcome:
        """Assert a definite answer: never NEVER, details for every error, ``allowed``."""
        allowed = frozenset(allowed) if allowed is not None else None
        where = f"{outcome}\n  case: {_short(case)}"
        if outcome.code in NEVER:
            raise FuzzError(f"not a definite answer: {where}")
        if outcome.code is not C.OK and not outcome.details.strip():
            raise FuzzError(f"error status without a message: {where}")
        if allowed is not None and outcome.code not in allowed:
            names = sorted(c.name for c in allowed)
            raise FuzzError(f"expected one of {names}: {where}")
        return outcome


def _short(value: object, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def fuzz_settings(max_examples: int) -> Any:
    """Hypothesis settings of every fuzz test: reproducible, no deadline, no database."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.large_base_example])
