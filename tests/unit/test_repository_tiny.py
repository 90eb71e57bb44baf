"""The tiny exported models load through the worker's repository and run in its runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from latentserve.errors import ModelIntegrityError
from latentserve.worker.runtime.engine import ModelRuntime
from latentserve.worker.runtime.repository import ModelRepository, read_registry


@pytest.mark.parametrize("name", ["tiny-ae", "tiny-vae", "tiny-vqvae"])
def test_tiny_models_encode_decode_sample(tiny_repo: Path, mnist_images: np.ndarray,
                                          name: str) -> None:
    runtime = ModelRuntime(ModelRepository(tiny_repo).load(name))
    images = mnist_images[:5]
    symbols = runtime.encode(images)
    assert symbols.shape == (5, *runtime.manifest.latent_shape)
    recon = runtime.decode(symbols)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    samples = runtime.sample(2, seed=3)
    assert samples.shape == (2, 1, 28, 28)
    q = runtime.manifest.quality
    assert q["onnx_max_abs_diff"] <= 1e-4
    assert q["val_bits_per_image"] > 0


def test_registry_lists_every_export(tiny_repo: Path) -> None:
    entries = read_registry(tiny_repo)
    assert sorted(e["name"] for e in entries) == ["tiny-ae", "tiny-vae", "tiny-vqvae"]
    for e in entries:
        manifest = (tiny_repo / str(e["name"]) / "1" / "manifest.json").read_bytes()
        import hashlib
        assert hashlib.sha256(manifest).hexdigest() == e["manifest_sha256"]
        assert json.loads(manifest)["version"] == 1


def test_tampered_onnx_file_is_refused(tiny_repo: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(tiny_repo, copy)
    decoder = copy / "tiny-ae" / "1" / "decoder.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0x01
    decoder.write_bytes(bytes(data))
    repo = ModelRepository(copy)
    with pytest.raises(ModelIntegrityError, match="decoder.onnx"):
        repo.load("tiny-ae")
    repo.load("tiny-vae")  # the others are untouched
