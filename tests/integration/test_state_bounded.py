"""Nothing a client sends grows server state: floods of made-up fingerprints, model
names, versions and methods leave threads, batchers, metric series and memory flat."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fixtures_redis import serve_tiny
from latentserve.service.server.assemble import Server
from latentserve.service.wire import raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc

TIMEOUT = 30.0
FLOOD = 300
C = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    srv = serve_tiny(tiny_repo, grpc_threads=16, preload=True)
    yield srv
    srv.stop(0).wait(TIMEOUT)


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def series(server: Server) -> int:
    """Metric samples the server exports (a new label value is a new sample)."""
    return sum(len(m.samples) for m in server.metrics.registry.collect())


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def state(server: Server) -> dict[str, int]:
    # gRPC's handler pool starts its threads lazily, up to grpc_threads: bounded by the
    # config, so it is checked against that instead of against the count before.
    handlers = sum(t.name.startswith("grpc") for t in threading.enumerate())
    assert handlers <= server.config.grpc_threads
    return {"threads": threading.active_count() - handlers, "series": series(server),
            "batchers": len(server.servicer.batchers._batchers)}


def flood(stub: pb_grpc.InferenceStub, server: Server, send: Callable[[int], Any],
          code: grpc.StatusCode) -> None:
    """Warm up with a few, then ``FLOOD`` more: each refused with ``code``; state flat."""
    def refused(i: int) -> None:
        with pytest.raises(grpc.RpcError) as err:
            send(i)
        assert err.value.code() == code, (i, err.value.details())

    for i in range(5):
        refused(-1 - i)
    before, rss_before = state(server), rss_kib()
    for i in range(FLOOD):
        refused(i)
    after = state(server)
    assert after == before, f"server state grew over {FLOOD} refused calls: {before} -> {after}"
    # Generous: the allocator may keep a little; a leak per call would show as far more.
    assert rss_kib() - rss_before < 16 * 1024


def test_made_up_fingerprints_start_no_batchers(stub: pb_grpc.InferenceStub,
                                                server: Server) -> None:
    # The reproduction: 10-byte codes whose fingerprint (bytes 2-3) runs over
    # values no model has; each took a thread and a metric series before.
    def send(i: int) -> Any:
        i %= 1 << 16
        code = bytes([0xA1, 3, i & 0xFF, i >> 8, 0, 0, 0, 1, 2, 3])
        return stub.Reconstruct(pb.ReconstructRequest(codes=[code]), timeout=TIMEOUT)

    flood(stub, server, send, C.FAILED_PRECONDITION)


def test_refused_codes_are_not_counted_as_images_done(stub: pb_grpc.InferenceStub,
                                                      server: Server,
                                                      mnist_images: np.ndarray) -> None:
    good = stub.Compress(pb.CompressRequest(model="tiny-vae",
                                            images=[raw_image(mnist_images[0])]),
                         timeout=TIMEOUT).codes[0]
    bad = good[:-1] + bytes([good[-1] ^ 0x5A])  # the right model, a damaged payload

    def done() -> float:
        return sum(s.value for m in server.metrics.registry.collect() for s in m.samples
                   if s.name == "latentserve_images_total"
                   and s.labels == {"model": "tiny-vae:1", "op": "reconstruct"})

    before = done()
    stub.Reconstruct(pb.ReconstructRequest(codes=[good]), timeout=TIMEOUT)
    assert done() == before + 1
    with pytest.raises(grpc.RpcError) as err:
        stub.Reconstruct(pb.ReconstructRequest(codes=[good, bad]), timeout=TIMEOUT)
    assert err.value.code() == C.DATA_LOSS
    assert done() == before + 2  # the good one of the pair; the damaged one is not done
    labels = {s.labels.get("model") for m in server.metrics.registry.collect()
              for s in m.samples if "model" in s.labels}
    assert labels <= {"tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"}, labels


def test_unknown_models_and_versions_leave_no_state(stub: pb_grpc.InferenceStub,
                                                    server: Server,
                                                    mnist_images: np.ndarray) -> None:
    image = raw_image(mnist_images[0])
    calls = [
        lambda i: stub.Compress(pb.CompressRequest(model=f"no-such-{i}", images=[image]),
                                timeout=TIMEOUT),
        lambda i: stub.Compress(pb.CompressRequest(model=f"tiny-ae:{1000 + abs(i)}",
                                                   images=[image]), timeout=TIMEOUT),
        lambda i: stub.Sample(pb.SampleRequest(model=f"no-such-{i}", count=1),
                              timeout=TIMEOUT),
        lambda i: stub.GetModel(pb.GetModelRequest(model=f"no-such-{i}"), timeout=TIMEOUT),
    ]
    for send in calls:
        flood(stub, server, send, C.NOT_FOUND)


def test_unknown_methods_leave_no_metric_series(server: Server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        def send(i: int) -> Any:
            method = channel.unary_unary(f"/latentserve.v1.Inference/NoSuch{i}",
                                         request_serializer=None, response_deserializer=None)
            return method(b"", timeout=TIMEOUT)

        flood(None, server, send, C.UNIMPLEMENTED)  # type: ignore[arg-type]
