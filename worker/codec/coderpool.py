"""Kinds 1 and 2 coded in worker processes, so coding uses every core.

constriction keeps the GIL while it codes (two threads coding at once run at 0.8x of
one), so compute threads alone code on one core. ``CoderPool(processes)`` keeps that many
processes, each holding the fixed tables (``entropy.FactorizedTables`` /
``StaticTables``) of the models it has been sent, built once per process. A batch is
cut into one slice per idle process and the results are put back in request order; a
batch smaller than ``min_batch`` is coded inline, since a process hop would cost a
one-image request more than its coding. A crashed process is replaced and every slice it
had not returned is coded again (``retries`` times), so no work is lost or doubled: the
caller only ever sees one result per item. kind 3 stays in the calling process: its
tables come from the prior network, which releases the GIL anyway.

Why not ``concurrent.futures.ProcessPoolExecutor`` (measured, bench/codec_speed.py
--lanes): its calls cross two helper threads in the parent (queue management, queue
feeder), each needing the GIL, so a no-op call took 0.33 ms against 0.03 ms for one
pipe round trip, and much longer while another lane ran Python; slices of one call
could land on one process; and every call pickled the model's tables spec again. Here
the calling thread writes to and reads from each process's own socket (waiting
releases the GIL), a process gets a model's spec once, and symbols cross as the
narrowest integer type their tables allow (4x fewer bytes for ae/vae latents).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import pickle
import signal
import socket
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentserve.errors import CorruptCode, Unavailable
from latentserve.worker.codec.entropy import FactorizedTables, StaticTables
from latentserve.worker.runtime.manifest import FactorizedSpec, VQStaticSpec

# Big enough for a few thousand images' symbols in one write: every write that blocks
# on a full socket buffer must take the GIL back before the next, which costs up to
# the switch interval (5 ms) while another lane runs Python. The kernel caps it.
SOCKET_BUFFER = 4 << 20


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

    @functools.cached_property
    def wire_dtype(self) -> np.dtype:
        """The narrowest integer type that holds every symbol the tables allow."""
        if isinstance(self.spec, FactorizedSpec):
            lo = min(self.spec.offsets, default=0)
            hi = max((o + len(f) - 1
                      for o, f in zip(self.spec.offsets, self.spec.freqs, strict=True)),
                     default=0)
        else:
            lo, hi = 0, self.spec.num_codes - 1
        for dtype in (np.int8, np.int16):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dtype)
        return np.dtype(np.int32)


# -- the worker process side ------------------------------------------------------------

def _encode(tables: FactorizedTables | StaticTables, symbols: np.ndarray,
            pack_as: tuple[str, int] | None = None, check: bool = False) -> list[bytes]:
    """Payloads, or with ``pack_as`` (manifest digest, kind id) finished codes: the
    header and its CRC made here, not in the caller's thread. ``check``: the tables'
    support check first (InvalidInput), also taken off the caller's thread."""
    if check:
        tables.check(symbols)
    payloads = tables.encode_batch(symbols)
    if pack_as is None:
        return payloads
    from latentserve.worker.codec.codes import pack_all  # codes imports this module

    digest, kind = pack_as
    return pack_all(digest, [(kind, p) for p in payloads])


def _decode(tables: FactorizedTables | StaticTables, payloads: list[bytes], canonical: bool,
            dtype: np.dtype) -> tuple[np.ndarray, dict[int, CorruptCode]]:
    """One stacked array back (rows of refused payloads zero) and the refusals by index:
    one narrow array instead of one int32 array per image keeps the hop cheap."""
    out, errors = tables.decode_stacked(payloads, canonical=canonical)
    out = out.astype(dtype)
    for i in errors:
        out[i] = 0
    return out, errors


def _decode_codes(tables: FactorizedTables | StaticTables, codes: list[bytes], state: int,
                  dtype: np.dtype) -> tuple[np.ndarray, dict[int, CorruptCode], list[int]]:
    """Whole version-1 codes of one head (checked by the caller: >= 7 bytes, the same
    bytes 0..3), their checksums verified here from ``state`` (the CRC every code of
    that head continues over its payload): ``_decode``'s answer, plus the indices whose
    checksum does not match (rows zero, no refusal: the caller names why)."""
    from latentserve.worker.codec.codes import HEADER_SIZE  # codes imports this module

    crc32, take = zlib.crc32, int.from_bytes
    payloads = [c[HEADER_SIZE:] for c in codes]
    unmatched = [i for i, (c, p) in enumerate(zip(codes, payloads, strict=True))
                 if crc32(p, state) & 0xFFFFFF != take(c[4:HEADER_SIZE], "big")]
    out, errors = _decode(tables, payloads, False, dtype)
    for i in unmatched:
        errors.pop(i, None)
        out[i] = 0
    return out, errors, unmatched


_OPS: dict[str, Callable[..., Any]] = {"encode": _encode, "decode": _decode,
                                       "decode_codes": _decode_codes}


def _serve(conn: Any) -> None:
    """A coding process: (op, key, spec or None, args) in, ("ok", result) or ("err", exc)
    out, until the parent says stop or goes away."""
    # Ctrl-C reaches the whole process group: the parent decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tables: dict[str, FactorizedTables | StaticTables] = {}
    while True:
        try:
            op, key, spec, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if op == "stop":
            return
        try:
            if key not in tables:
                tables[key] = spec.build()
            reply: tuple[str, Any] = ("ok", _OPS[op](tables[key], *args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
            reply = ("err", exc)
        try:
            data = pickle.dumps(reply, protocol=5)
        except Exception as exc:  # noqa: BLE001 - it does not pickle: keep its words
            data = pickle.dumps(("err", RuntimeError(f"{type(exc).__name__}: {reply[1]!r}")))
        conn.send_bytes(data)


# -- the parent side --------------------------------------------------------------------

@dataclass(eq=False)
class _Worker:
    process: Any
    conn: Any
    known: set[str] = field(default_factory=set)  # keys whose spec this process has
    awaited: bool = False  # sent a slice, reply not read yet
    # Replace before the next use: the socket failed, or a call ended before reading a
    # reply (which would otherwise answer the next call).
    broken: bool = False


class _Crashed(Exception):
    """The process died (or its socket broke) before it answered."""


class CoderPool:
    """Worker processes that code kinds 1 and 2; thread-safe, results in request order.

    ``min_batch``: smaller batches are coded inline (``wants``); ``min_slice``: a batch
    is cut into at most ``n // min_slice`` slices, one per process idle at the time.
    """

    def __init__(self, processes: int, *, min_batch: int = 64, min_slice: int = 16,
                 retries: int = 3, start_method: str = "spawn") -> None:
        if processes < 1:
            raise ValueError(f"a coder pool needs >= 1 process, got {processes}")
        self.processes = processes
        self.min_batch = min_batch
        self.min_slice = max(1, min_slice)
        self.retries = retries
        # spawn: the service and the worker run threads (gRPC, Redis); forking them is unsafe.
        self._context: Any = multiprocessing.get_context(start_method)
        self._idle_changed = threading.Condition()
        self._closed = False
        self._callers = 0  # calls in _run now (each takes its share of the processes)
        self.replaced = 0  # how many crashed processes were replaced (for tests, metrics)
        self._idle = [self._start() for _ in range(processes)]
        self._all = list(self._idle)

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        for conn in (parent, child):
            _widen(conn)
        process = self._context.Process(target=_serve, args=(child,), daemon=True,
                                        name="latentserve-coder")
        process.start()
        child.close()
        return _Worker(process, parent)

    def wants(self, n: int) -> bool:
        """Whether a batch of ``n`` items is worth the process hop."""
        return n >= self.min_batch

    def pids(self) -> list[int]:
        """The current processes' ids."""
        with self._idle_changed:
            return sorted(w.process.pid for w in self._all)

    def encode(self, spec: TableSpec, symbols: np.ndarray, *,
               pack_as: tuple[str, int] | None = None, check: bool = False) -> list[bytes]:
        """Symbols (N, *latent_shape) -> one payload each, in order; with ``pack_as``
        (manifest digest, kind id) one finished version-1 code each (``codes.pack``,
        done in the processes). ``check``: the processes check the symbols against the
        tables (InvalidInput from the first slice that fails); without it they must be
        checked already. Either way they must fit ``spec.wire_dtype``."""
        wire = symbols.astype(spec.wire_dtype, copy=False)
        parts = self._run(spec, "encode", len(symbols),
                          lambda a, b: (wire[a:b], pack_as, check))
        return [p for part in parts for p in part]

    def decode(self, spec: TableSpec, payloads: Sequence[bytes], *,
               canonical: bool = True) -> list[np.ndarray | CorruptCode]:
        """Payloads -> per payload its symbols or the CorruptCode that refused it, in order."""
        symbols, errors = self.decode_stacked(spec, payloads, canonical=canonical)
        return [errors.get(i, row) for i, row in enumerate(symbols)]

    def decode_stacked(self, spec: TableSpec, payloads: Sequence[bytes], *,
                       canonical: bool = True) -> tuple[np.ndarray, dict[int, CorruptCode]]:
        """Payloads -> their symbols as one int32 array (N, *latent_shape), rows of
        refused payloads zero, and the refusals by index."""
        dtype = spec.wire_dtype
        parts = self._run(spec, "decode", len(payloads),
                          lambda a, b: (list(payloads[a:b]), canonical, dtype))
        symbols, errors, _ = _joined([(s, e, []) for s, e in parts], spec)
        return symbols, errors

    def decode_codes(self, spec: TableSpec, codes: Sequence[bytes], state: int
                     ) -> tuple[np.ndarray, dict[int, CorruptCode], list[int]]:
        """Whole version-1 codes that all share bytes 0..3 (format, kind, fingerprint;
        the caller checks that, and that each has >= 7 bytes), checksums verified in the
        processes (``state``: CRC32 of the manifest digest and those 4 bytes) ->
        (symbols as in ``decode_stacked``, the refusals by index, the indices whose
        checksum does not match, rows zero, for the caller to name why)."""
        dtype = spec.wire_dtype
        parts = self._run(spec, "decode_codes", len(codes),
                          lambda a, b: (list(codes[a:b]), state, dtype))
        return _joined(parts, spec)

    # -- running slices -----------------------------------------------------------------
    def _run(self, spec: TableSpec, op: str, n: int, args_of: Any) -> list[Any]:
        """Every slice's result, in order; slices lost to a crashed process run again.

        A call takes its share of the processes (all of them when it is the only one):
        two lanes calling at once get one process each, so each lane's own work (checks,
        headers) overlaps the other's coding instead of waiting for both processes.
        """
        with self._idle_changed:
            self._callers += 1
            share = -(-self.processes // self._callers)
        try:
            workers = self._checkout(max(1, min(share, n // self.min_slice)))
        except BaseException:
            self._leave()
            raise
        try:
            edges = [n * i // len(workers) for i in range(len(workers) + 1)]
            slices = [args_of(a, b) for a, b in itertools.pairwise(edges)]
            sent: list[bool] = []
            # every process starts before any is read
            for w, args in zip(workers, slices, strict=True):
                sent.append(self._send(w, spec, op, args))
            results: list[tuple[str, Any]] = []
            for i, args in enumerate(slices):
                results.append(self._answer(workers, i, spec, op, args, sent[i]))
        finally:
            self._checkin(workers)
            self._leave()
        for status, value in results:
            if status == "err":
                raise value
        return [value for _, value in results]

    def _answer(self, workers: list[_Worker], i: int, spec: TableSpec, op: str,
                args: tuple[Any, ...], sent: bool) -> tuple[str, Any]:
        """Slice ``i``'s reply, replacing its process and sending it again after a crash."""
        for _ in range(self.retries + 1):
            if not sent:
                workers[i] = self._replace(workers[i])
                sent = self._send(workers[i], spec, op, args)
                if not sent:
                    continue
            try:
                return self._receive(workers[i])
            except _Crashed:
                sent = False
        raise Unavailable(f"the coder processes crashed {self.retries + 1} times in a row; "
                          "giving up on this batch")

    def _send(self, w: _Worker, spec: TableSpec, op: str, args: tuple[Any, ...]) -> bool:
        """Hand a slice to a process; False if it is already gone."""
        first = spec.key not in w.known
        data = pickle.dumps((op, spec.key, spec if first else None, args), protocol=5)
        try:
            w.conn.send_bytes(data)
        except OSError:
            w.broken = True
            return False
        w.known.add(spec.key)  # its reply, or its crash (a fresh process), comes first
        w.awaited = True
        return True

    @staticmethod
    def _receive(w: _Worker) -> tuple[str, Any]:
        try:
            data = w.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            w.broken = True
            raise _Crashed from exc
        w.awaited = False
        return pickle.loads(data)  # type: ignore[no-any-return]

    # -- the processes ------------------------------------------------------------------
    def _checkout(self, want: int) -> list[_Worker]:
        """At least one process, up to ``want`` of those idle now; dead ones replaced."""
        with self._idle_changed:
            while not self._idle:
                if self._closed:
                    raise Unavailable("the coder pool is closed")
                self._idle_changed.wait()
            if self._closed:
                raise Unavailable("the coder pool is closed")
            taken, self._idle = self._idle[:want], self._idle[want:]
        return [self._replace(w) if w.broken or not w.process.is_alive() else w
                for w in taken]

    def _leave(self) -> None:
        with self._idle_changed:
            self._callers -= 1

    def _checkin(self, workers: list[_Worker]) -> None:
        for w in workers:
            w.broken = w.broken or w.awaited
        with self._idle_changed:
            self._idle += workers
            self._idle_changed.notify_all()

    def _replace(self, dead: _Worker) -> _Worker:
        """A fresh process in place of one that crashed (the caller holds it checked out)."""
        _stop(dead, wait_s=0.0)
        fresh = self._start()
        with self._idle_changed:
            self._all = [fresh if w is dead else w for w in self._all]
            self.replaced += 1
        return fresh

    def close(self) -> None:
        """Stop the processes once the calls running now have finished."""
        with self._idle_changed:
            self._closed = True
            while len(self._idle) < len(self._all):
                self._idle_changed.wait()
            workers, self._idle = self._all, []
        for w in workers:
            with contextlib.suppress(OSError):
                w.conn.send_bytes(pickle.dumps(("stop", "", None, ())))
        for w in workers:
            _stop(w, wait_s=5.0)

    def __enter__(self) -> CoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _joined(parts: list[tuple[np.ndarray, dict[int, CorruptCode], list[int]]], spec: TableSpec
            ) -> tuple[np.ndarray, dict[int, CorruptCode], list[int]]:
    """Slices' (narrow symbols, refusals, unmatched) as one int32 array and indices
    counted over the whole call."""
    errors: dict[int, CorruptCode] = {}
    unmatched: list[int] = []
    at = 0
    for symbols, errs, unm in parts:
        errors.update((at + i, exc) for i, exc in errs.items())
        unmatched += [at + i for i in unm]
        at += len(symbols)
    if not parts:
        return np.zeros((0, *spec.latent_shape), np.int32), errors, unmatched
    joined = np.concatenate([p[0] for p in parts]).astype(np.int32)
    return joined, errors, unmatched


def _stop(w: _Worker, *, wait_s: float) -> None:
    """Join a process (killing it if it outlives ``wait_s``) and close its socket."""
    w.process.join(wait_s)
    if w.process.is_alive():
        w.process.kill()
        w.process.join()
    w.conn.close()


def _widen(conn: Any) -> None:
    """Ask for big socket buffers on a Pipe end (best effort: the kernel may cap them)."""
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=conn.fileno())
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        finally:
            sock.detach()  # the fd stays the connection's
