"""Kinds 1 and 2 coded in worker processes, so coding uses every core.

constriction keeps the GIL while it codes (two threads coding at once run at 0.8x of
one), so compute threads alone code on one core. ``CoderPool(processes)`` keeps that many
processes, each holding the fixed tables (``entropy.FactorizedTables`` /
``StaticTables``) of the models it has been sent, built once per process. A batch is
cut into one slice per process and the results are put back in request order; a batch
smaller than ``min_batch`` is coded inline, since a process hop (~0.2 ms) would cost a
one-image request more than its coding. A crashed process is replaced and every slice it
had not returned is coded again (``retries`` times), so no work is lost or doubled: the
caller only ever sees one result per item. kind 3 stays in the calling process: its
tables come from the prior network, which releases the GIL anyway.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .entropy import FactorizedTables, StaticTables
from .errors import CorruptCode, Unavailable
from .manifest import FactorizedSpec, VQStaticSpec

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor


@dataclass(frozen=True)
class TableSpec:
    """What a process needs to build one model's fixed tables: picklable, small."""

    key: str  # manifest digest + kind: tables are built once per key per process
    spec: FactorizedSpec | VQStaticSpec
    latent_shape: tuple[int, ...]

    def build(self) -> FactorizedTables | StaticTables:
        """The tables, as ``LatentCodec`` builds them."""
        if isinstance(self.spec, FactorizedSpec):
            return FactorizedTables(self.spec, self.latent_shape)
        return StaticTables(self.spec, self.latent_shape)


# Per worker process: its tables by key (lives and dies with the process).
_TABLES: dict[str, FactorizedTables | StaticTables] = {}


def _tables(spec: TableSpec) -> FactorizedTables | StaticTables:
    tables = _TABLES.get(spec.key)
    if tables is None:
        tables = _TABLES[spec.key] = spec.build()
    return tables


def _encode_slice(spec: TableSpec, symbols: np.ndarray) -> list[bytes]:
    return _tables(spec).encode_batch(symbols)


def _decode_slice(spec: TableSpec, payloads: list[bytes],
                  canonical: bool) -> tuple[np.ndarray, dict[int, CorruptCode]]:
    """One stacked array back (rows of refused payloads zero) and the refusals by index:
    pickling one array instead of one per image keeps the hop cheap."""
    tables = _tables(spec)
    results = tables.decode_batch(payloads, canonical=canonical)
    out = np.zeros((len(payloads), *tables.shape), np.int32)
    errors: dict[int, CorruptCode] = {}
    for i, r in enumerate(results):
        if isinstance(r, CorruptCode):
            errors[i] = r
        else:
            out[i] = r
    return out, errors


def _broken_pool() -> type[Exception]:
    """concurrent.futures' BrokenProcessPool, imported lazily (see ``_new_executor``)."""
    from concurrent.futures.process import BrokenProcessPool

    return BrokenProcessPool


def _pid() -> int:
    return os.getpid()


class CoderPool:
    """Worker processes that code kinds 1 and 2; thread-safe, results in request order."""

    def __init__(self, processes: int, *, min_batch: int = 64, retries: int = 3,
                 start_method: str = "spawn") -> None:
        if processes < 1:
            raise ValueError(f"a coder pool needs >= 1 process, got {processes}")
        self.processes = processes
        self.min_batch = min_batch
        self.retries = retries
        # spawn: the service and the worker run threads (gRPC, Redis); forking them is unsafe.
        self._context = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._executor = self._new_executor()
        self.replaced = 0  # how many times a broken pool was replaced (for tests, metrics)

    def _new_executor(self) -> ProcessPoolExecutor:
        # Imported here: importing the codec must not pull in multiprocessing (whose
        # ``from queue import ...`` a script's own queue.py, as in bench/, would shadow).
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.processes, mp_context=self._context)

    def wants(self, n: int) -> bool:
        """Whether a batch of ``n`` items is worth the process hop."""
        return n >= self.min_batch

    def pids(self) -> list[int]:
        """The current processes' ids (starting them if needed)."""
        executor = self._executor
        futures = [executor.submit(_pid) for _ in range(self.processes)]
        [f.result() for f in futures]
        return sorted(executor._processes)  # type: ignore[attr-defined]

    def encode(self, spec: TableSpec, symbols: np.ndarray) -> list[bytes]:
        """Checked symbols (N, *latent_shape) -> one payload each, in order."""
        cuts = self._cuts(len(symbols))
        parts = self._run([(_encode_slice, (spec, symbols[a:b])) for a, b in cuts])
        return [p for part in parts for p in part]

    def decode(self, spec: TableSpec, payloads: Sequence[bytes], *,
               canonical: bool = True) -> list[np.ndarray | CorruptCode]:
        """Payloads -> per payload its symbols or the CorruptCode that refused it, in order."""
        cuts = self._cuts(len(payloads))
        parts = self._run([(_decode_slice, (spec, list(payloads[a:b]), canonical))
                           for a, b in cuts])
        out: list[np.ndarray | CorruptCode] = []
        for symbols, errors in parts:
            out += [errors.get(i, row) for i, row in enumerate(symbols)]  # type: ignore[misc]
        return out

    def _cuts(self, n: int) -> list[tuple[int, int]]:
        k = max(1, min(self.processes, n))
        edges = [n * i // k for i in range(k + 1)]
        return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    def _run(self, jobs: list[tuple[object, tuple[object, ...]]]) -> list:  # type: ignore[type-arg]
        """Every job's result, in order; jobs lost to a crashed process are run again."""
        results: list[list | None] = [None] * len(jobs)  # type: ignore[type-arg]
        broken_pool = _broken_pool()
        for _ in range(self.retries + 1):
            executor = self._executor
            todo = [i for i, r in enumerate(results) if r is None]
            futures: dict[int, Future] = {}  # type: ignore[type-arg]
            try:
                for i in todo:
                    fn, args = jobs[i]
                    futures[i] = executor.submit(fn, *args)  # type: ignore[arg-type]
                for i, f in futures.items():
                    results[i] = f.result()
                return results  # type: ignore[return-value]
            except broken_pool:
                # Keep what finished; replace the pool once (other threads may race here).
                for i, f in futures.items():
                    if f.done() and not f.cancelled() and f.exception() is None:
                        results[i] = f.result()
                self._replace(executor)
        raise Unavailable(f"the coder processes crashed {self.retries + 1} times in a row; "
                          "giving up on this batch")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
                self.replaced += 1

    def close(self) -> None:
        """Stop the processes (waits for running slices)."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> CoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
