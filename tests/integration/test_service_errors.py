"""Every refusal reaches the client with its status code and a message to act on;
cancelled and expired calls drop their queued work; the server keeps serving."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentserve import errors as E
from latentserve.service.client.inference import error_from
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import Server, create_server
from latentserve.service.server.config import ServiceConfig
from latentserve.service.server.errors import status_for
from latentserve.service.status import STATUS_OF
from latentserve.service.wire import raw_batch, raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.worker.runtime.images import encode_png

TIMEOUT = 60.0
C = grpc.StatusCode


def start(tiny_repo: Path, **overrides: Any) -> Server:
    config = ServiceConfig(jobs=JobSettings.off(),
                           host="127.0.0.1", port=0, metrics_port=None, models=tiny_repo,
                           intra_op_threads=1, compute_workers=1, grpc_threads=16, **overrides)
    srv, _ = create_server(config)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    """Small limits, so each one can be hit with a small request."""
    srv = start(tiny_repo, max_images_per_request=8, max_message_bytes=4096,
                max_pixels_per_image=10_000)
    yield srv
    srv.stop(0).wait(TIMEOUT)


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def codes(stub: pb_grpc.InferenceStub, mnist_images: np.ndarray) -> dict[str, bytes]:
    return {m: stub.Compress(pb.CompressRequest(model=m, images=[raw_image(mnist_images[0])]),
                             timeout=TIMEOUT).codes[0]
            for m in ("tiny-ae", "tiny-vae", "tiny-vqvae")}


def refused(call: Callable[[], Any], code: grpc.StatusCode, *phrases: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert err.value.code() == code, err.value.details()
    details = err.value.details()
    for phrase in phrases:
        assert phrase in details, f"{phrase!r} not in {details!r}"
    return details


def one(image: pb.Image, model: str = "tiny-ae", **kw: Any) -> pb.CompressRequest:
    return pb.CompressRequest(model=model, images=[image], **kw)


# -- INVALID_ARGUMENT ---------------------------------------------------------------------------

def test_bad_images_are_invalid_arguments_naming_the_expected_shape(
        stub: pb_grpc.InferenceStub, mnist_images: np.ndarray) -> None:
    c = stub.Compress
    refused(lambda: c(one(pb.Image(encoded=b"hello")), timeout=TIMEOUT), C.INVALID_ARGUMENT,
            "images[0] is not a readable PNG/JPEG")
    wrong = np.zeros((1, 20, 28), np.uint8)
    refused(lambda: c(one(raw_image(wrong)), timeout=TIMEOUT), C.INVALID_ARGUMENT,
            "images[0] is raw 1x20x28", "the model takes 1x28x28")
    short = pb.Image(raw=pb.RawImage(data=b"\0" * 10, channels=1, height=28, width=28))
    refused(lambda: c(one(short), timeout=TIMEOUT), C.INVALID_ARGUMENT, "holds 10 bytes", "784")
    big_png = encode_png(np.zeros((1, 32, 32), np.uint8))
    refused(lambda: c(one(pb.Image(encoded=big_png)), timeout=TIMEOUT), C.INVALID_ARGUMENT,
            "32x32", "28x28", "resize")
    assert len(c(one(pb.Image(encoded=big_png), resize=True), timeout=TIMEOUT).codes) == 1
    refused(lambda: c(one(pb.Image()), timeout=TIMEOUT), C.INVALID_ARGUMENT, "images[0] is empty")
    batch = raw_batch(mnist_images[:2])
    refused(lambda: c(pb.CompressRequest(model="tiny-ae", batch=batch,
                                         images=[raw_image(mnist_images[0])]), timeout=TIMEOUT),
            C.INVALID_ARGUMENT, "images or batch, not both")
    batch.count = 3
    refused(lambda: c(pb.CompressRequest(model="tiny-ae", batch=batch), timeout=TIMEOUT),
            C.INVALID_ARGUMENT, "batch: data holds 1568 bytes", "3x1x28x28 needs 2352")
    refused(lambda: c(pb.CompressRequest(model="tiny-ae", batch=raw_batch(
        np.zeros((1, 3, 28, 28), np.uint8))), timeout=TIMEOUT),
            C.INVALID_ARGUMENT, "batch holds 3x28x28", "the model takes 1x28x28")


def test_bad_parameters_are_invalid_arguments(stub: pb_grpc.InferenceStub,
                                              mnist_images: np.ndarray) -> None:
    image = raw_image(mnist_images[0])
    refused(lambda: stub.Compress(one(image, model=""), timeout=TIMEOUT), C.INVALID_ARGUMENT,
            "no model named", "NAME:VERSION")
    refused(lambda: stub.Compress(one(image, model="tiny-ae:x"), timeout=TIMEOUT),
            C.INVALID_ARGUMENT, "'x' must be a positive integer")
    refused(lambda: stub.Sample(pb.SampleRequest(model="tiny-ae", count=2, temperature=0),
                                timeout=TIMEOUT), C.INVALID_ARGUMENT,
            "temperature must be a positive number, got 0")
    refused(lambda: stub.Reconstruct(pb.ReconstructRequest(codes=[b"x" * 9], format=7),
                                     timeout=TIMEOUT), C.INVALID_ARGUMENT, "format 7")


def test_stream_rules_are_invalid_arguments_naming_the_message(
        stub: pb_grpc.InferenceStub, mnist_images: np.ndarray) -> None:
    image = raw_image(mnist_images[0])
    refused(lambda: stub.CompressStream(iter([pb.CompressRequest(images=[image])]),
                                        timeout=TIMEOUT),
            C.INVALID_ARGUMENT, "message 0", "must name the model")
    refused(lambda: stub.CompressStream(iter([one(image), one(image, model="tiny-vae")]),
                                        timeout=TIMEOUT),
            C.INVALID_ARGUMENT, "message 1", "one stream per model")
    refused(lambda: stub.CompressStream(iter([one(image), one(pb.Image(encoded=b"no"))]),
                                        timeout=TIMEOUT),
            C.INVALID_ARGUMENT, "message 1: images[0]")


# -- NOT_FOUND / FAILED_PRECONDITION / DATA_LOSS -----------------------------------------------

def test_unknown_models_are_not_found_listing_what_exists(stub: pb_grpc.InferenceStub,
                                                          mnist_images: np.ndarray) -> None:
    image = raw_image(mnist_images[0])
    refused(lambda: stub.Compress(one(image, model="mnist-gan"), timeout=TIMEOUT), C.NOT_FOUND,
            "'mnist-gan'", "tiny-ae, tiny-vae, tiny-vqvae")
    refused(lambda: stub.Sample(pb.SampleRequest(model="tiny-vae:9", count=1), timeout=TIMEOUT),
            C.NOT_FOUND, "no version 9", "versions: 1")
    refused(lambda: stub.GetModel(pb.GetModelRequest(model="x"), timeout=TIMEOUT), C.NOT_FOUND)


def test_a_code_of_another_model_is_a_failed_precondition_naming_its_model(
        stub: pb_grpc.InferenceStub, codes: dict[str, bytes]) -> None:
    refused(lambda: stub.Reconstruct(pb.ReconstructRequest(codes=[codes["tiny-vae"]],
                                                           model="tiny-ae"), timeout=TIMEOUT),
            C.FAILED_PRECONDITION, "made by tiny-vae:1", "not by the requested tiny-ae:1")
    unknown = codes["tiny-ae"][:2] + b"\x00\x00" + codes["tiny-ae"][4:]
    refused(lambda: stub.Reconstruct(pb.ReconstructRequest(codes=[unknown]), timeout=TIMEOUT),
            C.FAILED_PRECONDITION, "fingerprint 0000")


def test_corrupt_and_future_codes_are_data_loss(stub: pb_grpc.InferenceStub,
                                                codes: dict[str, bytes]) -> None:
    good = codes["tiny-vqvae"]
    flipped = good[:-1] + bytes([good[-1] ^ 0x40])
    details = refused(lambda: stub.Reconstruct(pb.ReconstructRequest(codes=[good, flipped]),
                                               timeout=TIMEOUT), C.DATA_LOSS, "code 1 of 2")
    assert "checksum" in details or "changed" in details
    refused(lambda: stub.Reconstruct(pb.ReconstructRequest(codes=[good[:5]]), timeout=TIMEOUT),
            C.DATA_LOSS, "truncated")
    future = bytes([0xA3]) + good[1:]
    refused(lambda: stub.Reconstruct(pb.ReconstructRequest(codes=[future]), timeout=TIMEOUT),
            C.DATA_LOSS, "version 3", "reads versions 1, 2")


def test_one_clients_bad_code_does_not_fail_a_neighbour_in_the_same_batch(
        tiny_repo: Path, codes: dict[str, bytes]) -> None:
    srv = start(tiny_repo, max_queue_delay_us=300_000, dispatch_when_idle=False)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.InferenceStub(ch)
            good = codes["tiny-ae"]
            bad = good[:-1] + bytes([good[-1] ^ 1])
            f_good = s.Reconstruct.future(pb.ReconstructRequest(codes=[good]), timeout=TIMEOUT)
            f_bad = s.Reconstruct.future(pb.ReconstructRequest(codes=[bad]), timeout=TIMEOUT)
            assert len(f_good.result().images) == 1
            assert f_bad.exception().code() == C.DATA_LOSS
    finally:
        srv.stop(0).wait(TIMEOUT)


# -- RESOURCE_EXHAUSTED --------------------------------------------------------------------------

def test_limits_are_resource_exhausted_and_name_the_stream_rpc(
        stub: pb_grpc.InferenceStub, mnist_images: np.ndarray, codes: dict[str, bytes]) -> None:
    nine = pb.CompressRequest(model="tiny-ae", images=[raw_image(im) for im in mnist_images[:9]])
    refused(lambda: stub.Compress(nine, timeout=TIMEOUT), C.RESOURCE_EXHAUSTED,
            "9 images in one message", "limit is 8", "CompressStream")
    # 6 noisy PNGs (880 bytes each) pass the count limit but not the 4 kB message limit.
    noise = np.random.default_rng(0).integers(0, 255, (6, 1, 28, 28), dtype=np.uint8)
    heavy = pb.CompressRequest(model="tiny-ae", images=[pb.Image(encoded=encode_png(im))
                                                        for im in noise])
    refused(lambda: stub.Compress(heavy, timeout=TIMEOUT), C.RESOURCE_EXHAUSTED,
            "bytes; the limit is 4096", "CompressStream")
    refused(lambda: stub.Reconstruct(pb.ReconstructRequest(codes=[codes["tiny-ae"]] * 9),
                                     timeout=TIMEOUT), C.RESOURCE_EXHAUSTED, "ReconstructStream")
    bomb = encode_png(np.zeros((1, 120, 120), np.uint8))
    refused(lambda: stub.Compress(one(pb.Image(encoded=bomb), resize=True), timeout=TIMEOUT),
            C.RESOURCE_EXHAUSTED, "14400 pixels", "limit is 10000")
    refused(lambda: stub.Sample(pb.SampleRequest(model="tiny-ae", count=9), timeout=TIMEOUT),
            C.RESOURCE_EXHAUSTED, "limit of 8", "start")
    # 8 samples fit the count limit, but not as raw pixels (6.3 kB) in a 4 kB reply.
    refused(lambda: stub.Sample(pb.SampleRequest(model="tiny-ae", count=8,
                                                 format=pb.IMAGE_FORMAT_RAW), timeout=TIMEOUT),
            C.RESOURCE_EXHAUSTED, "reply would be")
    # The same images go through the stream, a message at a time.
    chunks = [pb.CompressRequest(model="tiny-ae" if i == 0 else "",
                                 images=[raw_image(im) for im in mnist_images[i:i + 4]])
              for i in range(0, 12, 4)]
    assert sum(len(r.codes) for r in stub.CompressStream(iter(chunks), timeout=TIMEOUT)) == 12


def test_the_server_keeps_serving_after_every_refusal(stub: pb_grpc.InferenceStub,
                                                      mnist_images: np.ndarray) -> None:
    reply = stub.Compress(one(raw_image(mnist_images[1])), timeout=TIMEOUT)
    assert len(reply.codes) == 1


# -- deadlines, cancellation, draining ---------------------------------------------------------

def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Wait on a condition the server exposes (its metrics), not for a fixed time."""
    tick = threading.Event()
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        tick.wait(0.01)


def gauge(srv: Server, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(s.value for m in srv.metrics.registry.collect() for s in m.samples
               if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture
def slow_server(tiny_repo: Path) -> Iterator[Server]:
    """Batches start only when full (64) or after 30 s: queued work stays queued."""
    srv = start(tiny_repo, max_queue_delay_us=30_000_000, dispatch_when_idle=False,
                max_batch_size=64)
    yield srv
    srv.stop(0).wait(TIMEOUT)


def test_a_missed_deadline_is_deadline_exceeded_and_its_work_dropped(
        slow_server: Server, mnist_images: np.ndarray) -> None:
    with grpc.insecure_channel(slow_server.target) as ch:
        s = pb_grpc.InferenceStub(ch)
        refused(lambda: s.Compress(one(raw_image(mnist_images[0])), timeout=0.3),
                C.DEADLINE_EXCEEDED)
    labels = {"model": "tiny-ae:1", "op": "compress"}
    wait_for(lambda: gauge(slow_server, "latentserve_dropped_images_total", **labels) == 1,
             "the expired image to be dropped")
    assert gauge(slow_server, "latentserve_queued_images", **labels) == 0
    assert gauge(slow_server, "latentserve_images_total", **labels) == 0


def test_a_cancelled_stream_frees_its_queued_work(slow_server: Server,
                                                  mnist_images: np.ndarray) -> None:
    hold = threading.Event()

    def requests() -> Iterator[pb.CompressRequest]:
        yield pb.CompressRequest(model="tiny-vae",
                                 images=[raw_image(im) for im in mnist_images[:5]])
        yield pb.CompressRequest(images=[raw_image(im) for im in mnist_images[5:8]])
        hold.wait(TIMEOUT)  # keep the stream open until the test is done

    labels = {"model": "tiny-vae:1", "op": "compress"}
    with grpc.insecure_channel(slow_server.target) as ch:
        call = pb_grpc.InferenceStub(ch).CompressStream(requests(), timeout=TIMEOUT)
        wait_for(lambda: gauge(slow_server, "latentserve_queued_images", **labels) == 8,
                 "8 images to be queued")
        call.cancel()
        wait_for(lambda: gauge(slow_server, "latentserve_dropped_images_total", reason="cancelled",
                               **labels) == 8, "the cancelled images to be dropped")
        hold.set()
    assert gauge(slow_server, "latentserve_queued_images", **labels) == 0
    assert gauge(slow_server, "latentserve_images_total", **labels) == 0
    rpc = "latentserve.v1.Inference/CompressStream"
    wait_for(lambda: gauge(slow_server, "latentserve_rpc_in_flight", rpc=rpc) == 0,
             "the stream to end")


def test_a_draining_server_answers_in_flight_calls_and_refuses_new_ones(
        tiny_repo: Path, mnist_images: np.ndarray) -> None:
    srv = start(tiny_repo, max_queue_delay_us=500_000, dispatch_when_idle=False)
    with grpc.insecure_channel(srv.target) as ch:
        s = pb_grpc.InferenceStub(ch)
        futures = [s.Compress.future(one(raw_image(mnist_images[i])), timeout=TIMEOUT)
                   for i in range(4)]
        wait_for(lambda: gauge(srv, "latentserve_queued_images", model="tiny-ae:1",
                               op="compress") == 4, "4 queued images")
        stopped = srv.stop(grace=TIMEOUT)
        refused(lambda: s.Compress(one(raw_image(mnist_images[0])), timeout=TIMEOUT),
                C.UNAVAILABLE)
        assert [len(f.result().codes) for f in futures] == [1, 1, 1, 1]
    assert stopped.wait(TIMEOUT)


# -- the mapping itself, and a model that fails its digests ---------------------------------------

@pytest.mark.parametrize(("exc", "code"), [
    (E.InvalidInput("x"), C.INVALID_ARGUMENT), (E.ModelNotFound("x"), C.NOT_FOUND),
    (E.JobNotFound("x"), C.NOT_FOUND), (E.CodeMismatch("x"), C.FAILED_PRECONDITION),
    (E.NotExactlyDecodable("x"), C.FAILED_PRECONDITION),
    (E.JobStateError("x"), C.FAILED_PRECONDITION), (E.CorruptCode("x"), C.DATA_LOSS),
    (E.UnknownFormatVersion("x"), C.DATA_LOSS), (E.ResourceLimit("x"), C.RESOURCE_EXHAUSTED),
    (E.Unavailable("x"), C.UNAVAILABLE), (E.ModelIntegrityError("x"), C.FAILED_PRECONDITION),
    (KeyError("secret"), C.INTERNAL),
])
def test_every_error_type_has_its_status(exc: BaseException, code: grpc.StatusCode) -> None:
    got, message = status_for(exc)
    assert got == code
    if code == C.INTERNAL:
        assert "secret" not in message and "KeyError" in message
    if isinstance(exc, E.UnknownFormatVersion):
        assert "reads code format versions: 1" in message


@pytest.mark.parametrize("kind", [k for k, _ in STATUS_OF if k.__module__ == E.__name__],
                         ids=lambda k: k.__name__)
def test_the_client_raises_what_the_server_raised(kind: type) -> None:
    """Both directions from one table: the status a server gives an error comes back on
    the client as an exception that is an instance of that error's type."""
    code, _ = status_for(kind("x"))

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return "x"

    err = error_from(Failed(), "host:1")
    assert isinstance(err, kind) and err.code == code


def test_a_tampered_model_is_refused_and_not_serving_while_the_others_serve(
        tiny_repo: Path, tmp_path: Path, mnist_images: np.ndarray) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    with open(repo / "tiny-ae" / "1" / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    srv = start(repo)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            status = {name: health.Check(health_pb2.HealthCheckRequest(service=name),
                                         timeout=TIMEOUT).status
                      for name in ("", "tiny-ae", "tiny-ae:1", "tiny-vae")}
            serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                    health_pb2.HealthCheckResponse.NOT_SERVING)
            assert status == {"": serving, "tiny-ae": not_serving, "tiny-ae:1": not_serving,
                              "tiny-vae": serving}
            s = pb_grpc.InferenceStub(ch)
            refused(lambda: s.Compress(one(raw_image(mnist_images[0])), timeout=TIMEOUT),
                    C.FAILED_PRECONDITION, "decoder.onnx has sha256", "re-export")
            assert len(s.Compress(one(raw_image(mnist_images[0]), model="tiny-vae"),
                                  timeout=TIMEOUT).codes) == 1
    finally:
        srv.stop(0).wait(TIMEOUT)
