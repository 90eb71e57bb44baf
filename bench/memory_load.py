"""The loads of bench/memory.py: mixed gRPC calls against a server, job rounds for a worker.

``CallMix`` is one client thread's random calls (each kind in ``WEIGHTS``; the statuses
a kind may end with in ``EXPECTED``), ``drive`` runs a range of them from a few
threads, ``load_models`` fetches what they need from the server. ``JobRounds`` submits
jobs of every kind to a ``JobStore`` and reads their results back.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# -- the server's load -------------------------------------------------------------------

# Share of each kind of call in the mix.
WEIGHTS = {"compress": 20, "compress_stream": 8, "reconstruct": 18, "reconstruct_stream": 7,
           "sample": 12, "info": 5, "bad": 8, "cancel": 12, "deadline": 6, "job": 4}
# Statuses a kind may end with; anything else is a failure of the run.
EXPECTED = {"cancel": {"OK", "CANCELLED"}, "deadline": {"OK", "DEADLINE_EXCEEDED"},
            "bad": {"INVALID_ARGUMENT", "NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION"},
            "job": {"OK", "CANCELLED"}}


@dataclass
class ModelData:
    ref: str
    family: str
    images: np.ndarray          # uint8 (N, C, H, W) of the model's shape
    pngs: list[bytes]           # the same images as PNG files
    codes: list[bytes] = field(default_factory=list)


class CallMix:
    """One client thread's calls: its own channel, random generator and model data."""

    def __init__(self, target: str, models: list[ModelData], *, seed: int, max_images: int,
                 max_codes: int, max_samples: int, timeout: float, kinds: list[str]) -> None:
        import grpc

        from latentserve.service.client.jobs import JobsClient
        from latentserve.v1 import inference_pb2 as pb
        from latentserve.v1 import inference_pb2_grpc as pb_grpc

        self.grpc, self.pb = grpc, pb
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.jobs = JobsClient(target, timeout=timeout) if "job" in kinds else None
        self.models = models
        self.rng = np.random.default_rng(seed)
        self.max_images, self.max_codes = max_images, max_codes
        self.max_samples, self.timeout = max_samples, timeout
        w = np.array([WEIGHTS[k] for k in kinds], float)
        self.kinds, self.p = kinds, w / w.sum()

    def close(self) -> None:
        self.channel.close()
        if self.jobs is not None:
            self.jobs.close()

    def call(self) -> tuple[str, str, str]:
        """One random call: (kind, status name, detail of an error)."""
        kind = str(self.rng.choice(self.kinds, p=self.p))
        try:
            return kind, getattr(self, kind)() or "OK", ""
        except self.grpc.RpcError as exc:
            return kind, exc.code().name, str(exc.details())  # type: ignore[attr-defined]
        except self.grpc.FutureCancelledError:
            return kind, "CANCELLED", ""
        except Exception as exc:  # noqa: BLE001 - reported as an unexpected outcome
            return kind, type(exc).__name__, str(exc)

    # -- building blocks --------------------------------------------------------------
    def _model(self) -> ModelData:
        return self.models[int(self.rng.integers(len(self.models)))]

    def _compress_request(self, m: ModelData, n: int, name: bool = True) -> Any:
        from latentserve.service.wire import raw_batch, raw_image

        idx = self.rng.integers(len(m.images), size=n)
        form = int(self.rng.integers(3))
        model = m.ref if name else ""
        if form == 0:
            return self.pb.CompressRequest(model=model, batch=raw_batch(m.images[idx]))
        if form == 1:
            return self.pb.CompressRequest(model=model, images=[raw_image(m.images[i])
                                                                for i in idx])
        return self.pb.CompressRequest(model=model, images=[self.pb.Image(encoded=m.pngs[i])
                                                            for i in idx])

    def _codes(self, n: int) -> list[bytes]:
        """Codes of one model, or (a third of the time) of several mixed."""
        pools = [m.codes for m in self.models] if self.rng.random() < 0.33 else \
            [self._model().codes]
        return [pools[int(self.rng.integers(len(pools)))][int(self.rng.integers(64))]
                for _ in range(n)]

    def _format(self) -> int:
        return self.pb.IMAGE_FORMAT_PNG if self.rng.random() < 0.5 else self.pb.IMAGE_FORMAT_RAW

    def _n(self, most: int) -> int:
        return int(self.rng.integers(1, most + 1))

    @staticmethod
    def _expect(got: int, want: int, what: str) -> None:
        if got != want:
            raise AssertionError(f"{what}: {got} results for {want} inputs")

    # -- the kinds of call --------------------------------------------------------------
    def compress(self) -> None:
        m, n = self._model(), self._n(self.max_images)
        reply = self.stub.Compress(self._compress_request(m, n), timeout=self.timeout)
        self._expect(len(reply.codes), n, "Compress")

    def compress_stream(self) -> None:
        m = self._model()
        sizes = [self._n(self.max_images // 2 or 1) for _ in range(self._n(3) + 1)]
        requests = [self._compress_request(m, n, name=i == 0) for i, n in enumerate(sizes)]
        got = sum(len(r.codes) for r in self.stub.CompressStream(iter(requests),
                                                                 timeout=self.timeout))
        self._expect(got, sum(sizes), "CompressStream")

    def reconstruct(self) -> None:
        n = self._n(self.max_codes)
        reply = self.stub.Reconstruct(self.pb.ReconstructRequest(
            codes=self._codes(n), format=self._format()), timeout=self.timeout)
        self._expect(len(reply.images), n, "Reconstruct")

    def reconstruct_stream(self) -> None:
        sizes = [self._n(self.max_codes // 2 or 1) for _ in range(self._n(3) + 1)]
        fmt = self._format()
        requests = [self.pb.ReconstructRequest(codes=self._codes(n), format=fmt) for n in sizes]
        got = sum(len(r.images) for r in self.stub.ReconstructStream(iter(requests),
                                                                     timeout=self.timeout))
        self._expect(got, sum(sizes), "ReconstructStream")

    def _sample_request(self, m: ModelData, n: int) -> Any:
        return self.pb.SampleRequest(model=m.ref, count=n, seed=int(self.rng.integers(1 << 31)),
                                     temperature=float(self.rng.uniform(0.5, 1.5)),
                                     start=int(self.rng.integers(1000)), format=self._format())

    def sample(self) -> None:
        m, n = self._model(), self._n(self.max_samples)
        reply = self.stub.Sample(self._sample_request(m, n), timeout=self.timeout)
        self._expect(len(reply.images), n, "Sample")

    def info(self) -> None:
        if self.rng.random() < 0.5:
            self.stub.ListModels(self.pb.ListModelsRequest(), timeout=self.timeout)
        else:
            self.stub.GetModel(self.pb.GetModelRequest(model=self._model().ref),
                               timeout=self.timeout)

    def bad(self) -> None:
        m, pb, which = self._model(), self.pb, int(self.rng.integers(5))
        if which == 0:
            req = self._compress_request(m, self._n(4))
            req.model = f"no-such-model-{int(self.rng.integers(1000))}"
            self.stub.Compress(req, timeout=self.timeout)
        elif which == 1:  # a code cut short
            code = self._codes(1)[0]
            self.stub.Reconstruct(pb.ReconstructRequest(codes=[code[:len(code) // 2]]),
                                  timeout=self.timeout)
        elif which == 2:  # a code of an unknown format version
            code = self._codes(1)[0]
            self.stub.Reconstruct(pb.ReconstructRequest(codes=[bytes([code[0] ^ 0x7F]) +
                                                               code[1:]]), timeout=self.timeout)
        elif which == 3:
            junk = self.rng.integers(256, size=200, dtype=np.uint8).tobytes()
            self.stub.Compress(pb.CompressRequest(model=m.ref, images=[pb.Image(encoded=junk)]),
                               timeout=self.timeout)
        else:
            self.stub.Sample(pb.SampleRequest(model=m.ref, count=2, temperature=-1.0),
                             timeout=self.timeout)
        raise AssertionError("a bad request was answered OK")

    def cancel(self) -> None:
        """A call cancelled after 0-5 ms: in the queue, computing, or already answered."""
        m, which = self._model(), int(self.rng.integers(4))
        delay = float(self.rng.uniform(0, 0.005))
        if which == 3:  # a stream cancelled after its first reply
            def requests() -> Any:
                for i in range(4):
                    yield self._compress_request(m, self._n(self.max_images), name=i == 0)
            call = self.stub.CompressStream(requests(), timeout=self.timeout)
            next(call)
            call.cancel()
            for _ in call:
                pass
            return
        if which == 0:
            future = self.stub.Compress.future(
                self._compress_request(m, self.max_images), timeout=self.timeout)
        elif which == 1:
            future = self.stub.Reconstruct.future(self.pb.ReconstructRequest(
                codes=self._codes(self.max_codes)), timeout=self.timeout)
        else:
            future = self.stub.Sample.future(self._sample_request(m, self.max_samples),
                                             timeout=self.timeout)
        time.sleep(delay)  # a random point of the call's life, not an event to wait for
        future.cancel()
        future.result()

    def deadline(self) -> None:
        """A call whose deadline (1-20 ms) may pass while it is queued or computing."""
        m = self._model()
        timeout = float(self.rng.uniform(0.001, 0.02))
        if self.rng.random() < 0.5:
            self.stub.Compress(self._compress_request(m, self.max_images), timeout=timeout)
        else:
            self.stub.Sample(self._sample_request(m, self.max_samples), timeout=timeout)

    def job(self) -> str | None:
        """A small job through the server's Jobs service: fetched whole, or cancelled."""
        from latentserve.v1 import jobs_pb2

        assert self.jobs is not None
        m = self._model()
        if self.rng.random() < 0.5:
            n = self._n(16)
            job = self.jobs.submit_compress(m.ref, m.images[self.rng.integers(len(m.images),
                                                                             size=n)],
                                            chunk_size=4)
        else:
            n = self._n(8)
            job = self.jobs.submit_sample(m.ref, n, seed=int(self.rng.integers(1000)),
                                          chunk_size=4, fmt="raw" if self.rng.random() < 0.5
                                          else "png")
        if self.rng.random() < 0.25:
            try:
                self.jobs.cancel(job.id)
            except Exception as exc:  # noqa: BLE001 - it may have finished first
                if "already" not in str(exc):
                    raise
            return "CANCELLED"
        replies = self.jobs.stub.FetchResults(jobs_pb2.FetchResultsRequest(id=job.id),
                                              timeout=self.timeout)
        self._expect(sum(len(r.codes) + len(r.images) for r in replies), n, "job")
        return None


def load_models(target: str, images: np.ndarray | None, timeout: float) -> list[ModelData]:
    """Every newest model of the server, 256 images of its shape each and 64 codes."""
    import grpc

    from latentserve.service.wire import raw_batch
    from latentserve.v1 import inference_pb2 as pb
    from latentserve.v1 import inference_pb2_grpc as pb_grpc
    from latentserve.worker.runtime.images import encode_png

    rng = np.random.default_rng(0)
    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for info in stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models:
            if not info.newest:
                continue
            shape = (info.channels, info.height, info.width)
            pool = (images[rng.choice(len(images), 256)] if images is not None
                    and images.shape[1:] == shape else
                    rng.integers(256, size=(256, *shape), dtype=np.uint8))
            m = ModelData(info.ref, info.family, pool, [encode_png(im) for im in pool])
            m.codes = list(stub.Compress(pb.CompressRequest(model=m.ref,
                                                            batch=raw_batch(pool[:64])),
                                         timeout=timeout).codes)
            out.append(m)
    if not out:
        raise SystemExit(f"the server at {target} serves no models")
    return out


def drive(make: Callable[[int], Any], clients: int, start: int, stop: int, deadline: float,
          outcomes: Counter[str], unexpected: list[str],
          on_call: Callable[[int], None] = lambda done: None) -> int:
    """Calls ``start`` .. ``stop`` - 1 from ``clients`` threads (``make(i)`` builds thread
    i's ``CallMix``), until ``deadline`` (monotonic); returns how many ran."""
    counter = itertools.count(start)
    lock = threading.Lock()
    ran = [0]

    def loop(i: int) -> None:
        mix = make(i)
        try:
            while time.monotonic() < deadline:
                with lock:
                    n = next(counter)
                if n >= stop:
                    return
                kind, status, detail = mix.call()
                with lock:
                    outcomes[f"{kind} {status}"] += 1
                    ok = status in EXPECTED.get(kind, {"OK"})
                    if not ok and len(unexpected) < 10:
                        unexpected.append(f"{kind} -> {status}: {detail[:300]}")
                    ran[0] += 1
                on_call(n + 1)
        finally:
            mix.close()

    threads = [threading.Thread(target=loop, args=(i,), name=f"client-{i}")
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ran[0]


# -- the worker's load -------------------------------------------------------------------

class JobRounds:
    """Rounds of a few jobs of every kind on a JobStore, results read back and deleted."""

    def __init__(self, store: Any, refs: list[str], images: np.ndarray, *, chunk_size: int,
                 seed: int = 0, timeout: float = 60.0) -> None:
        self.store, self.refs, self.images = store, refs, images
        self.chunk_size, self.timeout = chunk_size, timeout
        self.rng = np.random.default_rng(seed)
        self.codes: dict[str, list[bytes]] = {}
        self.chunks = 0  # chunks whose results were read back
        self.outcomes: Counter[str] = Counter()

    def _items(self) -> int:
        """1 to 6 chunks' worth, the last one often partial."""
        return int(self.rng.integers(1, 6 * self.chunk_size + 1))

    def _read(self, job_id: str, stop_after: int | None = None) -> int:
        """Read the job's results (its first ``stop_after`` chunks only); items read."""
        items = 0
        for i, (_, results) in enumerate(self.store.iter_chunks(job_id, wait_s=self.timeout)):
            items += len(results)
            self.chunks += 1
            if stop_after is not None and i + 1 >= stop_after:
                break
        return items

    def round(self) -> None:
        """Submit one job of each kind (and sometimes one to cancel), read all back."""
        from latentserve.worker.jobqueue.records import ImageFormat, JobKind

        s, rng = self.store, self.rng
        fmt = ImageFormat.PNG if rng.random() < 0.5 else ImageFormat.RAW
        jobs = []
        for ref in self.refs if not self.codes else [self.refs[int(rng.integers(len(self.refs)))]]:
            n = self._items()
            jobs.append(("compress", ref, n, s.submit(
                JobKind.COMPRESS, ref, items=self.images[rng.integers(len(self.images), size=n)],
                chunk_size=self.chunk_size)))
        if self.codes:
            codes = [c for ref in rng.permutation(list(self.codes))[:2]
                     for c in self.codes[str(ref)]]
            n = min(self._items(), len(codes))
            jobs.append(("reconstruct", "", n, s.submit(
                JobKind.RECONSTRUCT, "", items=[codes[i] for i in rng.permutation(len(codes))[:n]],
                chunk_size=self.chunk_size, image_format=fmt)))
        ref = self.refs[int(rng.integers(len(self.refs)))]
        n = self._items()
        jobs.append(("sample", ref, n, s.submit(
            JobKind.SAMPLE, ref, count=n, chunk_size=self.chunk_size, image_format=fmt,
            seed=int(rng.integers(1 << 31)), temperature=float(rng.uniform(0.5, 1.5)))))
        cancel = None
        if rng.random() < 0.3:  # cancelled after its first chunk: the rest is dropped
            ref = self.refs[int(rng.integers(len(self.refs)))]
            cancel = s.submit(JobKind.SAMPLE, ref, count=4 * self.chunk_size,
                              chunk_size=self.chunk_size, seed=int(rng.integers(1 << 31)))
        for kind, ref, n, job in jobs:
            if kind == "compress":
                codes = [c for _, part in s.iter_chunks(job.id, wait_s=self.timeout)
                         for c in part]
                self.chunks += job.chunks_total
                got = len(codes)
                self.codes[ref] = codes[-64:] + self.codes.get(ref, [])[:64]
            else:
                got = self._read(job.id)
            self.outcomes[f"{kind} {'OK' if got == n else 'SHORT'}"] += 1
            s.delete(job.id)
        if cancel is not None:
            self._read(cancel.id, stop_after=1)
            try:
                s.cancel(cancel.id)
                self.outcomes["cancel CANCELLED"] += 1
            except Exception:  # noqa: BLE001 - it finished first
                self.outcomes["cancel OK"] += 1
            s.delete(cancel.id)

    def run_until(self, chunks: int, deadline: float) -> bool:
        """Rounds until ``chunks`` chunks were read back; False if ``deadline`` came first."""
        while self.chunks < chunks:
            if time.monotonic() > deadline:
                return False
            self.round()
        return True
