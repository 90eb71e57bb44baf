"""Kinds 1 and 2 coded in worker processes, so coding uses every core.

constriction keeps the GIL while it codes (two threads coding at once run at 0.8x of
one), so compute threads alone code on one core. ``CoderPool(processes)`` keeps that many
processes, each holding the fixed tables (``entropy.FactorizedTables`` /
``StaticTables``) of the models it has been sent, built once per process. A batch is
cut into one slice per process (the least loaded first), and the results are put back
in request order; a batch smaller than ``min_batch`` is coded inline, since a process
hop would cost a one-image request more than its coding. The processes do the whole
per-image job, so the caller's thread does almost none of it: encoding, the symbols'
table check, the payloads, headers and CRCs; decoding (``decode_codes``), the headers
read from whole codes, the checksums verified, the payloads decoded into one narrow
array. Slices queue on their process and its replies come back in send order, read by
whichever waiting thread gets there first and handed to the slice they answer, so calls
at once keep every process busy: while one call's thread does its own Python, the
processes code the other call's slices. A crashed process is replaced and every slice
queued on it is sent again (``retries`` times), so no work is lost or doubled: the
caller only ever sees one result per item. kind 3 stays in the calling process: its
tables come from the prior network, which releases the GIL anyway.

Why not ``concurrent.futures.ProcessPoolExecutor`` (measured, bench/codec_speed.py
--lanes): its calls cross two helper threads in the parent (queue management, queue
feeder), each needing the GIL, so a no-op call took 0.33 ms against 0.03 ms for one
pipe round trip, and much longer while another lane ran Python; slices of one call
could land on one process; and every call pickled the model's tables spec again. Here
the calling threads write to and read from each process's own socket (waiting releases
the GIL), a process gets a model's spec once, and symbols cross as the narrowest
integer type their tables allow (4x fewer bytes for ae/vae latents). Pickling and the
socket cost ~0.1 us an image (measured in process); shared memory would save little.
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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
class _Slot:
    """One slice of a call, queued on one process: its request, later its reply."""

    op: str
    spec: TableSpec
    args: tuple[Any, ...]
    items: int
    tries: int = 0  # how many times it was sent again to a fresh process
    reply: tuple[str, Any] | None = None


class _Worker:
    """One coding process and the slices queued on it. Its replies come back in the
    order the slices were sent, so whichever waiting thread reads a reply hands it to
    the slice at the head of the queue (its own or another call's)."""

    def __init__(self, process: Any, conn: Any) -> None:
        self.process = process
        self.conn = conn
        self.known: set[str] = set()  # keys whose spec this process has been sent
        self.send_lock = threading.Lock()  # sends and replacements, one at a time
        self.changed = threading.Condition()  # the queue, and who reads
        self.queue: deque[_Slot] = deque()
        self.queued_items = 0
        self.reading = False  # a thread is reading this process's socket now
        # A read was cut short (an exception mid-message): the stream may be out of step,
        # so the next reader replaces the process (and resends the queue) first.
        self.cut_short = False


class CoderPool:
    """Worker processes that code kinds 1 and 2; thread-safe, results in request order.

    ``min_batch``: smaller batches are coded inline (``wants``); ``min_slice``: a batch
    is cut into at most ``n // min_slice`` slices, one per process (the least loaded
    first). Slices queue on their process, so calls at once keep every process busy:
    while one call's thread does its own Python, the processes code the other's slices.
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
        self._calls_changed = threading.Condition()
        self._closed = False
        self._calls = 0  # calls in _run now (close waits for them)
        self.replaced = 0  # how many crashed processes were replaced (for tests, metrics)
        self._workers = [_Worker(*self._spawn()) for _ in range(processes)]

    def _spawn(self) -> tuple[Any, Any]:
        parent, child = self._context.Pipe(duplex=True)
        for conn in (parent, child):
            _widen(conn)
        process = self._context.Process(target=_serve, args=(child,), daemon=True,
                                        name="latentserve-coder")
        process.start()
        child.close()
        return process, parent

    def wants(self, n: int) -> bool:
        """Whether a batch of ``n`` items is worth the process hop."""
        return n >= self.min_batch

    def pids(self) -> list[int]:
        """The current processes' ids."""
        return sorted(w.process.pid for w in self._workers)

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
        """Every slice's result, in order; slices lost to a crashed process run again."""
        with self._calls_changed:
            if self._closed:
                raise Unavailable("the coder pool is closed")
            self._calls += 1
        try:
            k = max(1, min(self.processes, n // self.min_slice))
            # The least loaded processes, sent to in one fixed order: a thread blocked
            # writing to a process (its socket full) then never waits on a thread that
            # is blocked writing to one earlier in the order, so some thread always reads.
            chosen = set(sorted(self._workers, key=lambda w: w.queued_items)[:k])
            workers = [w for w in self._workers if w in chosen]
            edges = [n * i // k for i in range(k + 1)]
            slots = []
            # every slice is sent before any reply is read
            for w, (a, b) in zip(workers, itertools.pairwise(edges), strict=True):
                slot = _Slot(op, spec, args_of(a, b), b - a)
                self._send(w, slot)
                slots.append((w, slot))
            results = [self._wait(w, slot) for w, slot in slots]
        finally:
            with self._calls_changed:
                self._calls -= 1
                self._calls_changed.notify_all()
        for status, value in results:
            if status == "err":
                raise value
        return [value for _, value in results]

    def _send(self, w: _Worker, slot: _Slot) -> None:
        """Queue a slice on a process (a dead one's queue is sent again when its crash
        is read)."""
        with w.send_lock:
            with w.changed:
                w.queue.append(slot)
                w.queued_items += slot.items
            self._write(w, slot)

    @staticmethod
    def _write(w: _Worker, slot: _Slot) -> None:
        """Write a slice to the process (the caller holds ``w.send_lock``); a process
        gets a model's spec with its first slice."""
        first = slot.spec.key not in w.known
        data = pickle.dumps((slot.op, slot.spec.key, slot.spec if first else None,
                             slot.args), protocol=5)
        try:
            w.conn.send_bytes(data)
        except OSError:
            return  # gone: the reader sees it and sends the queue to a fresh process
        w.known.add(slot.spec.key)

    def _wait(self, w: _Worker, slot: _Slot) -> tuple[str, Any]:
        """The slice's reply: one waiting thread at a time reads the process's socket
        (the GIL released while it waits) and hands each reply to the head of the queue."""
        with w.changed:
            while slot.reply is None:
                if w.reading:
                    w.changed.wait()
                    continue
                w.reading = True
                try:
                    w.changed.release()
                    try:
                        self._read_one(w)
                    finally:
                        w.changed.acquire()
                finally:
                    w.reading = False
                    w.changed.notify_all()
            return slot.reply

    def _read_one(self, w: _Worker) -> None:
        """Read one reply (the caller is the only reader), or replace a crashed process."""
        if w.cut_short:
            w.cut_short = False
            self._replace(w)
            return
        try:
            data = w.conn.recv_bytes()
        except (EOFError, OSError):
            self._replace(w)
            return
        except BaseException:
            w.cut_short = True
            raise
        with w.changed:
            head = w.queue.popleft()
            w.queued_items -= head.items
        try:
            reply = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - the slice's caller raises it
            reply = ("err", exc)
        with w.changed:
            head.reply = reply

    def _replace(self, w: _Worker) -> None:
        """A fresh process in place of one that crashed, sent every slice still queued
        on the old one, in order; a slice sent ``retries`` times already gets Unavailable."""
        with w.send_lock:
            _stop(w.process, w.conn, wait_s=0.0)
            with w.changed:
                for s in w.queue:
                    s.tries += 1
                    if s.tries > self.retries:
                        s.reply = ("err", Unavailable(
                            f"the coder processes crashed {s.tries} times in a row; giving "
                            "up on this batch"))
                w.queue = deque(s for s in w.queue if s.reply is None)
                w.queued_items = sum(s.items for s in w.queue)
                again = list(w.queue)
            w.process, w.conn = self._spawn()
            w.known = set()
            self.replaced += 1
            for s in again:
                self._write(w, s)

    # -- the processes ------------------------------------------------------------------
    def close(self) -> None:
        """Stop the processes once the calls running now have finished."""
        with self._calls_changed:
            self._closed = True
            while self._calls:
                self._calls_changed.wait()
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.conn.send_bytes(pickle.dumps(("stop", "", None, ())))
        for w in self._workers:
            _stop(w.process, w.conn, wait_s=5.0)

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


def _stop(process: Any, conn: Any, *, wait_s: float) -> None:
    """Join a process (killing it if it outlives ``wait_s``) and close its socket."""
    process.join(wait_s)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


def _widen(conn: Any) -> None:
    """Ask for big socket buffers on a Pipe end (best effort: the kernel may cap them)."""
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=conn.fileno())
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        finally:
            sock.detach()  # the fd stays the connection's
