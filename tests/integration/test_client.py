"""The typed client and the CLI against a real server, and the CLI's --local path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentserve.cli import main
from latentserve.errors import CodeMismatch, InvalidInput, ModelNotFound
from latentserve.service.client.inference import LatentServeClient, ServiceError
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import Server, create_server
from latentserve.service.server.config import ServiceConfig
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.images import encode_png, read_image_file
from latentserve.worker.runtime.pipeline import Pipeline

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    config = ServiceConfig(jobs=JobSettings.off(),
                           host="127.0.0.1", port=0, metrics_port=None, models=tiny_repo,
                           intra_op_threads=1, compute_workers=1, grpc_threads=16)
    srv, _ = create_server(config)
    srv.start()
    yield srv
    srv.stop(0).wait(TIMEOUT)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[LatentServeClient]:
    with LatentServeClient(server.target, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_repo: Path) -> Pipeline:
    return Pipeline(tiny_repo, EngineConfig(intra_op_threads=1))


def rpc_count(server: Server, method: str) -> float:
    return sum(s.value for m in server.metrics.registry.collect() for s in m.samples
               if s.name == "latentserve_rpc_requests_total"
               and s.labels["rpc"] == f"latentserve.v1.Inference/{method}")


def test_numpy_pil_bytes_and_paths_compress_alike(client: LatentServeClient, local: Pipeline,
                                                  mnist_images: np.ndarray, tmp_path: Path) -> None:
    images = mnist_images[:3]
    want = local.compress("tiny-vae", images)
    assert client.compress(images, model="tiny-vae") == want
    assert client.compress(list(images), model="tiny-vae") == want
    assert client.compress([im[0] for im in images], model="tiny-vae") == want  # (H, W)
    assert client.compress([Image.fromarray(im[0]) for im in images], model="tiny-vae") == want
    pngs = [encode_png(im) for im in images]
    assert client.compress(pngs, model="tiny-vae") == want
    paths = []
    for i, data in enumerate(pngs):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    assert client.compress(paths, model="tiny-vae") == want
    assert client.compress(images[0], model="tiny-vae") == want[:1]  # one (C, H, W) image


def test_reconstruct_and_sample_return_arrays_or_pil(client: LatentServeClient, local: Pipeline,
                                                     mnist_images: np.ndarray) -> None:
    codes = local.compress("tiny-ae", mnist_images[:4])
    out = client.reconstruct(codes)
    assert out.dtype == np.uint8 and out.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(out, local.reconstruct(codes))
    pil = client.reconstruct(codes, as_pil=True)
    np.testing.assert_array_equal(np.asarray(pil[2]), out[2, 0])
    drawn = client.sample("tiny-vqvae", 5, seed=3, temperature=0.9)
    np.testing.assert_array_equal(drawn, local.sample("tiny-vqvae", 5, seed=3, temperature=0.9))
    assert client.sample("tiny-ae", 0).shape == (0, 1, 28, 28)


def test_large_inputs_stream_under_the_hood(server: Server, tiny_repo: Path, local: Pipeline,
                                            mnist_images: np.ndarray) -> None:
    images = mnist_images[:23]
    before = {m: rpc_count(server, m)
              for m in ("Compress", "CompressStream", "ReconstructStream", "Sample")}
    with LatentServeClient(server.target, timeout=TIMEOUT, chunk_images=5) as small:
        codes = small.compress(images, model="tiny-ae")
        assert codes == local.compress("tiny-ae", images)
        np.testing.assert_array_equal(small.reconstruct(codes), local.reconstruct(codes))
        np.testing.assert_array_equal(small.sample("tiny-vae", 12, seed=4),
                                      local.sample("tiny-vae", 12, seed=4))
    assert rpc_count(server, "CompressStream") == before["CompressStream"] + 1
    assert rpc_count(server, "ReconstructStream") == before["ReconstructStream"] + 1
    assert rpc_count(server, "Compress") == before["Compress"]
    assert rpc_count(server, "Sample") == before["Sample"] + 3  # 5 + 5 + 2, same images


def test_server_errors_are_raised_as_latentserve_errors(client: LatentServeClient,
                                                        local: Pipeline,
                                                        mnist_images: np.ndarray) -> None:
    with pytest.raises(ModelNotFound, match="no model named 'nope'") as err:
        client.compress(mnist_images[:1], model="nope")
    assert isinstance(err.value, ServiceError) and err.value.code.name == "NOT_FOUND"
    with pytest.raises(InvalidInput, match="the model takes 1x28x28"):
        client.compress(np.zeros((1, 1, 27, 27), np.uint8), model="tiny-ae")
    code = local.compress("tiny-vae", mnist_images[:1])
    with pytest.raises(CodeMismatch, match="made by tiny-vae:1"):
        client.reconstruct(code, model="tiny-ae")
    with pytest.raises(InvalidInput, match="uint8"):
        client.compress(np.zeros((1, 1, 28, 28), np.float32), model="tiny-ae")


def test_models_and_model(client: LatentServeClient) -> None:
    assert [m.ref for m in client.models()] == ["tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"]
    assert client.model("tiny-vqvae").code_kind == "vq_prior"


# -- CLI --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_files(tmp_path_factory: pytest.TempPathFactory, mnist_images: np.ndarray) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    for i, im in enumerate(mnist_images[:18]):
        (folder / f"digit-{i:02d}.png").write_bytes(encode_png(im))
    return folder


def test_cli_compress_gives_the_same_codes_locally_and_remotely(
        server: Server, tiny_repo: Path, digit_files: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    remote, here = tmp_path / "remote", tmp_path / "local"
    assert main(["compress", str(digit_files), "--model", "tiny-vqvae:1", "-o", str(remote),
                 "--target", server.target, "--batch", "7"]) == 0
    assert "compressed 18 images with tiny-vqvae:1" in capsys.readouterr().out
    assert main(["compress", *map(str, sorted(digit_files.iterdir())), "--model", "tiny-vqvae",
                 "-o", str(here), "--local", "--models", str(tiny_repo)]) == 0
    names = sorted(p.name for p in remote.iterdir())
    assert names == [f"digit-{i:02d}.lsc" for i in range(18)]
    for name in names:
        assert (remote / name).read_bytes() == (here / name).read_bytes()


def test_cli_reconstruct_writes_pngs_and_a_comparison_grid(
        server: Server, tiny_repo: Path, digit_files: Path, tmp_path: Path,
        local: Pipeline) -> None:
    codes = tmp_path / "codes"
    assert main(["compress", str(digit_files), "--model", "tiny-ae", "-o", str(codes),
                 "--local", "--models", str(tiny_repo)]) == 0
    out, grid = tmp_path / "out", tmp_path / "compare.png"
    assert main(["reconstruct", str(codes), "-o", str(out), "--target", server.target,
                 "--compare", str(grid), "--originals", str(digit_files)]) == 0
    first = read_image_file(out / "digit-00.png", (1, 28, 28))
    code = (codes / "digit-00.lsc").read_bytes()
    np.testing.assert_array_equal(first, local.reconstruct([code])[0])
    with Image.open(grid) as g:  # 18 pairs wrap after 16 columns: 4 rows of 30 px + 2
        assert g.size == (16 * 30 + 2, 4 * 30 + 2)


def test_cli_sample_writes_files_and_a_grid_identical_both_ways(
        server: Server, tiny_repo: Path, tmp_path: Path) -> None:
    for where, flags in (("remote", ["--target", server.target]),
                         ("local", ["--local", "--models", str(tiny_repo)])):
        assert main(["sample", "--model", "tiny-vae", "-n", "6", "--seed", "5",
                     "-o", str(tmp_path / where), "--grid", str(tmp_path / f"{where}.png"),
                     "--batch", "4", *flags]) == 0
    files = sorted(p.name for p in (tmp_path / "remote").iterdir())
    assert files == [f"sample-5-{i:05d}.png" for i in range(6)]
    for name in files:
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()


def test_cli_errors_are_clear_exit_codes(tmp_path: Path, digit_files: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # No target (flag or LATENTSERVE_TARGET): the models run in this process, from the
    # default repository, which has no tiny-ae.
    assert main(["compress", str(digit_files), "--model", "tiny-ae", "-o", str(tmp_path)]) == 1
    assert "no model named 'tiny-ae' in models" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "missing.lsc"), "-o", str(tmp_path),
                 "--local"]) == 1
    assert "does not exist" in capsys.readouterr().err
