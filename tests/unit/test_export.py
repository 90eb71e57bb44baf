"""The exporter: ONNX parity, integer tables, other image shapes, the CLI, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_models import MNIST, tiny_configs
from latentserve.errors import InvalidInput
from latentserve.export.publish import tables
from latentserve.export.publish.exporter import ExportParityError, _parity, export_checkpoint
from latentserve.export.training.data import split
from latentserve.export.training.train import rebuild, train_model
from latentserve.worker.runtime.engine import ModelRuntime
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)


def test_quantized_tables_sum_to_2_16_with_every_frequency_at_least_1() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300, 4096):
        pmf = rng.dirichlet(np.full(n, 0.05))
        f = tables.quantize_pmf(pmf)
        assert len(f) == n and sum(f) == 65536 and min(f) >= 1
    with pytest.raises(ValueError, match="symbols"):
        tables.quantize_pmf(np.ones(70_000))


def test_prior_lut_ends_at_its_first_weight_of_1() -> None:
    lut = tables.prior_lut(2.0)
    assert lut[0] == 65536 and lut[-1] == 1 and min(lut[:-1]) > 1
    assert len(lut) == 23  # 65536 * exp(-22 / 2) rounds to 1


def test_the_tiny_manifests_follow_the_schema(tiny_repo: Path) -> None:
    vq = json.loads((tiny_repo / "tiny-vqvae" / "1" / "manifest.json").read_text())
    assert vq["code"]["kind"] == "vq_prior" and vq["sampling"] == {"kind": "prior"}
    static = vq["code"]["vq_static"]
    assert len(static["freqs"]) == 7 * 7
    assert all(len(row) == static["num_codes"] and sum(row) == 65536 for row in static["freqs"])
    assert vq["code"]["vq_prior"]["lut"] == tables.prior_lut(2.0)
    for key in ("val_psnr_db", "val_bits_per_image", "val_bits_per_index_prior",
                "val_bits_per_index_static", "onnx_max_abs_diff"):
        assert key in vq["quality"]
    ae = json.loads((tiny_repo / "tiny-ae" / "1" / "manifest.json").read_text())
    fac = ae["code"]["factorized"]
    assert fac["step"] == 1.0 and len(fac["offsets"]) == ae["latent"]["shape"][0]
    assert all(sum(row) == 65536 and min(row) >= 1 for row in fac["freqs"])
    gmm = ae["sampling"]
    assert gmm["kind"] == "gmm" and len(gmm["means"][0]) == np.prod(ae["latent"]["shape"])
    assert sum(gmm["weights"]) == pytest.approx(1.0)
    for m in (vq, ae):
        assert m["training"]["data_sha256"] and m["onnx"]["opset"] == 17


@pytest.fixture(scope="module")
def small_data(mnist_images: np.ndarray):  # type: ignore[no-untyped-def]
    return split(mnist_images[:200], val_count=40, source="test")


def test_parity_check_fails_loudly_when_onnx_is_not_the_model(tiny_repo: Path,
                                                              small_data) -> None:  # type: ignore[no-untyped-def]
    mc, tc, _ = tiny_configs("ae")
    ckpt = train_model(mc, tc.__class__(**{**tc.__dict__, "steps": 3}), small_data)
    model, _ = rebuild(ckpt)
    runtime = ModelRuntime(ModelRepository(tiny_repo).load("tiny-ae"))  # another model's graphs
    with pytest.raises(ExportParityError, match="the limit is 0.0001"):
        _parity("ae", model, None, runtime, small_data.val[:8])


def test_export_of_a_3x32x32_model_runs_in_the_runtime(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Smooth colour blobs: something an AE can learn a little of in a few steps.
    yy, xx = np.mgrid[0:32, 0:32]
    centres = rng.integers(4, 28, (160, 3, 2))
    images = np.stack([[255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
                        for cy, cx in c] for c in centres]).astype(np.uint8)
    data = split(images, val_count=32, source="blobs")
    for family in ("ae", "vqvae"):
        mc, tc, pc = tiny_configs(family, (3, 32, 32))
        tc = tc.__class__(**{**tc.__dict__, "steps": 10, "prior_steps": 3})
        ckpt = train_model(mc, tc, data, prior_config=pc)
        export_checkpoint(ckpt, repo=tmp_path, name=f"rgb-{family}", version=1, data=data,
                          gmm_components=2)
        runtime = ModelRuntime(ModelRepository(tmp_path).load(f"rgb-{family}"))
        assert runtime.manifest.image_shape == (3, 32, 32)
        symbols = runtime.encode(images[:3])
        assert runtime.decode(symbols).shape == (3, 3, 32, 32)
        assert runtime.sample(2, seed=0).shape == (2, 3, 32, 32)
        assert runtime.manifest.quality["onnx_max_abs_diff"] <= 1e-4
    with pytest.raises(InvalidInput, match="already exists"):
        export_checkpoint(ckpt, repo=tmp_path, name="rgb-vqvae", version=1, data=data)
    with pytest.raises(InvalidInput, match="model name"):
        export_checkpoint(ckpt, repo=tmp_path, name="Bad Name", version=2, data=data)


@pytest.mark.skipif(not MNIST.is_file(), reason="needs ../shared/data/mnist")
def test_train_and_export_commands(tmp_path: Path) -> None:
    from latentserve.cli import main

    ckpt = tmp_path / "vae.pt"
    assert main(["train", "--family", "vae", "--data", str(MNIST.parent), "--out", str(ckpt),
                 "--steps", "3", "--train-limit", "64", "--hidden", "8", "--res-blocks", "0",
                 "--latent-channels", "2", "--no-progress", "--threads", "1"]) == 0
    assert main(["export", str(ckpt), "--repo", str(tmp_path / "models"), "--name", "cli-vae",
                 "--version", "3", "--vae-step", "0.25"]) == 0
    entry = ModelRepository(tmp_path / "models").load("cli-vae")
    assert entry.manifest.version == 3 and entry.manifest.factorized.step == 0.25
    assert main(["export", str(tmp_path / "missing.pt"), "--repo", str(tmp_path),
                 "--name", "x", "--version", "1"]) == 1
