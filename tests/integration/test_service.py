"""The Inference service on a real loopback socket: every RPC and stream, against the
same Pipeline called in process; health, reflection and metrics."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import Server, create_server
from latentserve.service.server.config import ServiceConfig
from latentserve.service.wire import decode_reply_image, raw_batch, raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.images import encode_png
from latentserve.worker.runtime.pipeline import Pipeline

MODELS = ("tiny-ae", "tiny-vae", "tiny-vqvae")
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    config = ServiceConfig(jobs=JobSettings.off(),
                           host="127.0.0.1", port=0, metrics_port=0, models=tiny_repo,
                           intra_op_threads=1, compute_workers=2, grpc_threads=32)
    srv, _ = create_server(config)
    srv.start()
    yield srv
    srv.stop(0).wait(TIMEOUT)


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def local(tiny_repo: Path) -> Pipeline:
    return Pipeline(tiny_repo, EngineConfig(intra_op_threads=1))


@pytest.fixture(scope="module")
def digits(mnist_images: np.ndarray) -> np.ndarray:
    return mnist_images[:24]


def raw_request(model: str, images: np.ndarray) -> pb.CompressRequest:
    return pb.CompressRequest(model=model, images=[raw_image(im) for im in images])


def metrics_text(server: Server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                timeout=TIMEOUT) as r:
        return r.read().decode()


def sample_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- models ---------------------------------------------------------------------------------

def test_list_and_get_models_describe_what_is_served(stub: pb_grpc.InferenceStub) -> None:
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
    assert [m.ref for m in listed] == [f"{n}:1" for n in MODELS]
    by_name = {m.name: m for m in listed}
    vq = by_name["tiny-vqvae"]
    assert (vq.family, vq.code_kind, tuple(vq.latent_shape)) == ("vqvae", "vq_prior", (7, 7))
    assert (vq.channels, vq.height, vq.width) == (1, 28, 28)
    assert vq.newest and vq.loaded and vq.provider == "CPUExecutionProvider"
    assert "val_psnr_db" in vq.quality and len(vq.manifest_sha256) == 64
    assert stub.GetModel(pb.GetModelRequest(model="tiny-ae"), timeout=TIMEOUT).ref == "tiny-ae:1"
    assert stub.GetModel(pb.GetModelRequest(model="tiny-vae:1"), timeout=TIMEOUT).family == "vae"


# -- compress / reconstruct ---------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_compress_and_reconstruct_match_the_pipeline_in_process(
        stub: pb_grpc.InferenceStub, local: Pipeline, digits: np.ndarray, model: str) -> None:
    images = digits[:6]
    reply = stub.Compress(raw_request(model, images), timeout=TIMEOUT)
    assert reply.model == f"{model}:1"
    assert list(reply.codes) == local.compress(model, images)
    out = stub.Reconstruct(pb.ReconstructRequest(codes=reply.codes, format=pb.IMAGE_FORMAT_RAW),
                           timeout=TIMEOUT)
    got = np.stack([decode_reply_image(im) for im in out.images])
    np.testing.assert_array_equal(got, local.reconstruct(list(reply.codes)))
    assert list(out.models) == [f"{model}:1"] * len(images)


def test_png_in_and_png_out_agree_with_raw(stub: pb_grpc.InferenceStub,
                                            digits: np.ndarray) -> None:
    images = digits[:4]
    as_png = pb.CompressRequest(model="tiny-vae", images=[pb.Image(encoded=encode_png(im))
                                                          for im in images])
    codes = stub.Compress(as_png, timeout=TIMEOUT).codes
    again = stub.Compress(raw_request("tiny-vae", images), timeout=TIMEOUT)
    assert list(codes) == list(again.codes)
    png = stub.Reconstruct(pb.ReconstructRequest(codes=codes), timeout=TIMEOUT).images
    raw = stub.Reconstruct(pb.ReconstructRequest(codes=codes, format=pb.IMAGE_FORMAT_RAW),
                           timeout=TIMEOUT).images
    assert all(im.WhichOneof("pixels") == "encoded" for im in png)
    for a, b in zip(png, raw, strict=True):
        np.testing.assert_array_equal(decode_reply_image(a), decode_reply_image(b))


def test_a_raw_batch_compresses_like_separate_images(stub: pb_grpc.InferenceStub,
                                                    digits: np.ndarray) -> None:
    batch = pb.CompressRequest(model="tiny-vqvae", batch=raw_batch(digits[:7]))
    assert list(stub.Compress(batch, timeout=TIMEOUT).codes) == \
        list(stub.Compress(raw_request("tiny-vqvae", digits[:7]), timeout=TIMEOUT).codes)


def test_codes_of_several_models_reconstruct_in_one_call(stub: pb_grpc.InferenceStub,
                                                         digits: np.ndarray) -> None:
    codes = []
    for model in MODELS:
        codes += stub.Compress(raw_request(model, digits[:2]), timeout=TIMEOUT).codes
    out = stub.Reconstruct(pb.ReconstructRequest(codes=codes), timeout=TIMEOUT)
    assert list(out.models) == [f"{m}:1" for m in MODELS for _ in range(2)]
    assert len(out.images) == 6


def test_empty_requests_get_empty_replies(stub: pb_grpc.InferenceStub) -> None:
    assert list(stub.Compress(pb.CompressRequest(model="tiny-ae"), timeout=TIMEOUT).codes) == []
    assert list(stub.Reconstruct(pb.ReconstructRequest(), timeout=TIMEOUT).images) == []
    assert list(stub.Sample(pb.SampleRequest(model="tiny-ae"), timeout=TIMEOUT).images) == []


def test_streams_answer_each_message_in_order(stub: pb_grpc.InferenceStub, local: Pipeline,
                                              digits: np.ndarray) -> None:
    pieces = [digits[0:5], digits[5:6], digits[6:15], digits[15:24]]
    requests = [pb.CompressRequest(model="tiny-vqvae" if i == 0 else "",
                                   images=[raw_image(im) for im in p])
                for i, p in enumerate(pieces)]
    replies = list(stub.CompressStream(iter(requests), timeout=TIMEOUT))
    assert [len(r.codes) for r in replies] == [5, 1, 9, 9]
    codes = [c for r in replies for c in r.codes]
    assert codes == local.compress("tiny-vqvae", digits)
    back = list(stub.ReconstructStream(
        iter([pb.ReconstructRequest(codes=codes[:10], format=pb.IMAGE_FORMAT_RAW),
              pb.ReconstructRequest(codes=codes[10:], format=pb.IMAGE_FORMAT_RAW)]),
        timeout=TIMEOUT))
    got = np.stack([decode_reply_image(im) for r in back for im in r.images])
    np.testing.assert_array_equal(got, local.reconstruct(codes))


def test_a_stream_client_that_waits_for_each_reply_is_answered(
        stub: pb_grpc.InferenceStub, digits: np.ndarray) -> None:
    """Ping-pong: the next message is sent only after the previous reply arrived."""
    replied = threading.Semaphore(0)

    def requests() -> Iterator[pb.CompressRequest]:
        for i in range(3):
            yield pb.CompressRequest(model="tiny-ae", images=[raw_image(digits[i])])
            assert replied.acquire(timeout=TIMEOUT)

    counts = []
    for reply in stub.CompressStream(requests(), timeout=TIMEOUT):
        counts.append(len(reply.codes))
        replied.release()
    assert counts == [1, 1, 1]


# -- sample ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_same_seed_same_images_whatever_the_pieces(stub: pb_grpc.InferenceStub, local: Pipeline,
                                                   model: str) -> None:
    def draw(count: int, start: int = 0, seed: int = 7) -> np.ndarray:
        r = stub.Sample(pb.SampleRequest(model=model, count=count, seed=seed, start=start,
                                         temperature=0.8, format=pb.IMAGE_FORMAT_RAW),
                        timeout=TIMEOUT)
        assert r.model == f"{model}:1"
        return np.stack([decode_reply_image(im) for im in r.images])

    whole = draw(6)
    np.testing.assert_array_equal(whole, draw(6))
    np.testing.assert_array_equal(whole, np.concatenate([draw(2), draw(4, start=2)]))
    np.testing.assert_array_equal(whole, local.sample(model, 6, seed=7, temperature=0.8))
    assert not np.array_equal(whole, draw(6, seed=8))


def test_sample_temperature_defaults_to_one(stub: pb_grpc.InferenceStub, local: Pipeline) -> None:
    r = stub.Sample(pb.SampleRequest(model="tiny-vae", count=3, seed=1,
                                     format=pb.IMAGE_FORMAT_RAW), timeout=TIMEOUT)
    np.testing.assert_array_equal(np.stack([decode_reply_image(im) for im in r.images]),
                                  local.sample("tiny-vae", 3, seed=1, temperature=1.0))


# -- many clients ---------------------------------------------------------------------------------

def test_sixteen_concurrent_clients_get_exactly_their_own_results(
        server: Server, local: Pipeline, mnist_images: np.ndarray) -> None:
    expected, got, errors = {}, {}, []
    go = threading.Barrier(16)

    def client(i: int) -> None:
        model = MODELS[i % 3]
        images = mnist_images[40 + 7 * i: 40 + 7 * i + 1 + i % 4]
        expected[i] = (model, local.compress(model, images))
        try:
            with grpc.insecure_channel(server.target) as ch:
                s = pb_grpc.InferenceStub(ch)
                go.wait(TIMEOUT)
                reply = s.Compress(raw_request(model, images), timeout=TIMEOUT)
                back = s.Reconstruct(pb.ReconstructRequest(codes=reply.codes,
                                                           format=pb.IMAGE_FORMAT_RAW),
                                     timeout=TIMEOUT)
                got[i] = (reply.model.split(":")[0], list(reply.codes),
                          np.stack([decode_reply_image(im) for im in back.images]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    for i in range(16):
        model, codes = expected[i]
        assert got[i][0] == model and got[i][1] == codes
        np.testing.assert_array_equal(got[i][2], local.reconstruct(codes))


# -- health, reflection, metrics ---------------------------------------------------------------

def test_health_answers_for_the_server_the_service_and_each_model(server: Server) -> None:
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "latentserve.v1.Inference", "tiny-ae", "tiny-vqvae:1"):
            r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_serves_the_contract(server: Server) -> None:
    with grpc.insecure_channel(server.target) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(refl.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="latentserve.v1.Inference")]), timeout=TIMEOUT))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"latentserve.v1.Inference", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in replies[1].file_descriptor_response.file_descriptor_proto]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"Compress", "CompressStream", "Reconstruct", "ReconstructStream", "Sample",
            "ListModels", "GetModel"} <= methods


def test_metrics_parse_as_prometheus_text_and_count_the_work(
        server: Server, stub: pb_grpc.InferenceStub, digits: np.ndarray) -> None:
    before = metrics_text(server)
    stub.Compress(raw_request("tiny-ae", digits[:5]), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        stub.Compress(pb.CompressRequest(model="nope"), timeout=TIMEOUT)
    text = metrics_text(server)
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"latentserve_rpc_requests", "latentserve_rpc_latency_seconds",
            "latentserve_queue_wait_seconds", "latentserve_batch_compute_seconds",
            "latentserve_batch_size_images", "latentserve_images", "latentserve_models_loaded",
            "latentserve_model_provider_info"} <= families
    rpc = "latentserve.v1.Inference/Compress"

    def delta(name: str, **labels: str) -> float:
        return sample_value(text, name, **labels) - sample_value(before, name, **labels)

    assert delta("latentserve_rpc_requests_total", rpc=rpc, code="OK") == 1
    assert delta("latentserve_rpc_requests_total", rpc=rpc, code="NOT_FOUND") == 1
    assert delta("latentserve_images_total", model="tiny-ae:1", op="compress") == 5
    assert delta("latentserve_batch_size_images_sum", model="tiny-ae:1", op="compress") == 5
    assert delta("latentserve_queue_wait_seconds_count", model="tiny-ae:1", op="compress") == 5
    assert sample_value(text, "latentserve_models_loaded") == 3
    assert sample_value(text, "latentserve_model_provider_info", model="tiny-vae:1",
                        provider="CPUExecutionProvider") == 1


def test_a_server_with_coder_processes_gives_the_inline_codes(
        start_server, local: Pipeline, digits: np.ndarray) -> None:
    # --coder-processes 2 --coder-min-batch 4: batches of 4+ are coded in the processes
    # (header and CRC made there), a one-image call inline; the same bytes either way,
    # and the processes stop with the server.
    import os

    server = start_server(coder_processes=2, coder_min_batch=4, compute_workers=2)
    pool = server.pipeline.coder_pool
    assert pool is not None and pool.min_batch == 4
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for model, n in (("tiny-ae", 12), ("tiny-vae", 1), ("tiny-vqvae", 9)):
            images = digits[:n]
            reply = stub.Compress(raw_request(model, images), timeout=TIMEOUT)
            assert list(reply.codes) == local.compress(model, images)
            out = stub.Reconstruct(pb.ReconstructRequest(codes=reply.codes,
                                                         format=pb.IMAGE_FORMAT_RAW),
                                   timeout=TIMEOUT)
            got = np.stack([decode_reply_image(im) for im in out.images])
            np.testing.assert_array_equal(got, local.reconstruct(list(reply.codes)))
    pids = pool.pids()
    assert len(pids) == 2
    server.stop(0).wait(TIMEOUT)
    for pid in pids:  # stopped and reaped with the server
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
