"""Any-size colour and grey photos on every path, against real loopback servers: unary
and stream RPCs, jobs (real Redis, a real worker), the CLI, the Python client; the
channel rule, the pixel limit, the sample refusal and ModelInfo's operations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from fixtures_redis import JOBS_QUEUE, serve_tiny
from latentserve import errors as E
from latentserve.cli import main as cli_main
from latentserve.service.client.inference import LatentServeClient
from latentserve.service.client.jobs import JobsClient
from latentserve.v1 import inference_pb2 as pb
from latentserve.worker.codec.codes import parse_header
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.images import encode_png
from latentserve.worker.runtime.pipeline import Pipeline

SIZES = [(1, 1), (17, 33), (321, 481), (17, 33), (40, 16)]
# The factorized codec and the scale hyperprior (code kind 5, exact layout).
RGB_MODELS = pytest.mark.parametrize("model", ["tiny-photo", "tiny-photo-hyper"])


def photos(channels: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (channels, h, w), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def local(photo_repo: Path) -> Pipeline:
    return Pipeline(photo_repo, EngineConfig(intra_op_threads=1))


@pytest.fixture
def server(photo_repo: Path) -> Iterator[Any]:
    s = serve_tiny(photo_repo, max_pixels_per_image=200_000)
    yield s
    s.stop(0).wait(30)


@pytest.fixture
def client(server: Any) -> Iterator[LatentServeClient]:
    with LatentServeClient(server.target, timeout=60) as c:
        yield c


@RGB_MODELS
def test_unary_round_trip_at_odd_sizes(client: LatentServeClient, local: Pipeline,
                                       model: str) -> None:
    images = photos(3, SIZES[:2] + SIZES[3:]) + photos(3, [(150, 190)], seed=1)
    codes = client.compress(images, model)
    assert codes == local.compress(model, images)
    assert [parse_header(c).size for c in codes] == [im.shape[1:] for im in images]
    back = client.reconstruct_list(codes)
    want = local.reconstruct_each(codes)
    assert all(np.array_equal(a, b) for a, b in zip(back, want, strict=True))  # type: ignore[arg-type]


@RGB_MODELS
def test_streams_mix_sizes(server: Any, local: Pipeline, model: str) -> None:
    images = photos(3, [(1, 1), (17, 33), (17, 33), (64, 48)], seed=2)
    with LatentServeClient(server.target, timeout=60, chunk_images=1) as c:  # one per message
        codes = c.compress(images, model)
        back = c.reconstruct_list(codes)
    assert codes == local.compress(model, images)
    assert [b.shape for b in back] == [im.shape for im in images]


@RGB_MODELS
def test_the_481x321_photo_as_a_png(client: LatentServeClient, local: Pipeline,
                                    model: str) -> None:
    image = photos(3, [(321, 481)], seed=5)[0]
    (code,) = client.compress([encode_png(image)], model)
    assert code == local.compress(model, [image])[0]
    assert client.reconstruct_list([code])[0].shape == (3, 321, 481)


def test_grey_and_the_channel_rule(client: LatentServeClient, local: Pipeline) -> None:
    grey = photos(1, [(17, 33), (5, 3)], seed=3)
    codes = client.compress(grey, "tiny-photo-grey")
    assert [b.shape for b in client.reconstruct_list(codes)] == [(1, 17, 33), (1, 5, 3)]
    # Grey to a colour model: refused naming both, unless resize, which converts.
    refusal = r"1x17x33 .* takes 3xHxW \(RGB, any size\) \(pass --resize"
    with pytest.raises(E.InvalidInput, match=refusal):
        client.compress(grey[:1], "tiny-photo")
    with pytest.raises(E.InvalidInput, match="is L 33x17; the model takes RGB, any size"):
        client.compress([encode_png(grey[0])], "tiny-photo")
    rgb = np.repeat(grey[0], 3, axis=0)
    want = local.compress("tiny-photo", [rgb])
    assert client.compress(grey[:1], "tiny-photo", resize=True) == want
    assert client.compress([encode_png(grey[0])], "tiny-photo", resize=True) == want


def test_limits_and_sample(client: LatentServeClient, local: Pipeline) -> None:
    with pytest.raises(E.ResourceLimit, match="the limit is 200000") as info:
        client.compress(photos(3, [(500, 401)]), "tiny-photo")
    assert info.value.metadata["limit"] == "max_pixels_per_image"
    big = local.compress("tiny-photo", photos(3, [(500, 401)]))
    with pytest.raises(E.ResourceLimit, match="401x500 = 200500 pixel image"):
        client.reconstruct_list(big)
    with pytest.raises(E.UnsupportedOperation, match="supports compress, reconstruct") as err:
        client.sample("tiny-photo", 2)
    assert err.value.metadata["operation"] == "sample"
    info2 = client.model("tiny-photo")
    assert (list(info2.operations), info2.any_size, info2.stride, info2.height) == \
        (["compress", "reconstruct"], True, 16, 0)
    assert list(info2.latent_shape) == [8]


def test_sample_status_is_failed_precondition(server: Any) -> None:
    from latentserve.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Sample(pb.SampleRequest(model="tiny-photo", count=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tiny-photo:1 cannot sample" in info.value.details()


@pytest.mark.queue
@RGB_MODELS
def test_jobs_mix_sizes(photo_repo: Path, redis_url: str, make_worker: Any,
                        local: Pipeline, model: str) -> None:
    queue = QueueConfig(**JOBS_QUEUE)
    s = serve_tiny(photo_repo, redis_url)
    try:
        with JobsClient(s.target, timeout=60, batch=3) as jobs:
            images = photos(3, SIZES, seed=4)
            job = jobs.submit_compress(model, images, chunk_size=2)
            bad = jobs.submit_compress(model, photos(1, [(4, 4)]) + images[:1])
            make_worker(pipeline=local, queue=queue).run()
            codes = [c for _, c in jobs.fetch(job.id)]
            assert codes == local.compress(model, images)
            failed = list(jobs.fetch_messages(bad.id))
            assert [e.code for m in failed for e in m.errors] == ["INVALID_ARGUMENT"]
            raw = jobs.submit_reconstruct(codes, fmt="raw", chunk_size=4)
            png = jobs.submit_reconstruct(codes)
            make_worker(pipeline=local, queue=queue).run()
            got = [x for _, x in jobs.fetch(raw.id)]
            assert [g.shape for g in got] == [im.shape for im in images]
            assert all(np.array_equal(a, b) for a, b in
                       zip(got, local.reconstruct_each(codes), strict=True))  # type: ignore[arg-type]
            assert [x for _, x in jobs.fetch(png.id)] == [encode_png(g) for g in got]
            with pytest.raises(E.UnsupportedOperation):
                jobs.submit_sample(model, 3)
    finally:
        s.stop(0).wait(30)


@RGB_MODELS
def test_cli_compress_and_reconstruct(photo_repo: Path, tmp_path: Path, local: Pipeline,
                                      model: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    images = photos(3, [(17, 33), (1, 1), (40, 21)], seed=6)
    for i, im in enumerate(images):
        Image.fromarray(im.transpose(1, 2, 0)).save(src / f"p{i}.png")
    assert cli_main(["compress", str(src), "--models", str(photo_repo), "--model",
                     model, "--out", str(tmp_path / "codes")]) == 0
    codes = [(tmp_path / "codes" / f"p{i}.lsc").read_bytes() for i in range(3)]
    assert codes == local.compress(model, images)
    assert cli_main(["reconstruct", str(tmp_path / "codes"), "--models", str(photo_repo),
                     "--out", str(tmp_path / "out")]) == 0
    for i, im in enumerate(images):
        with Image.open(tmp_path / "out" / f"p{i}.png") as out:
            assert (out.mode, out.height, out.width) == ("RGB", *im.shape[1:])
