"""The exporters' shared tail (``writer.finish_version``): the photo exporter and
``write_version`` (``export.custom``, ``latentserve import``) write manifests key for key
alike, a check record the manifest lists by digest, and the registry entry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentserve.export.publish.custom import Factorized, export_model
from latentserve.worker.runtime.model_check import check_model
from latentserve.worker.runtime.repository import ModelRepository, read_registry

torch.set_num_threads(1)

MANIFEST_KEYS = ["schema", "name", "version", "family", "image", "latent", "files", "onnx",
                 "code", "sampling", "quality", "source", "training"]


def _custom_version(repo: Path) -> Path:
    from torch import nn

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
    enc = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 2, 4, 2, 1))
    dec = nn.Sequential(nn.ConvTranspose2d(2, 4, 4, 2, 1), nn.ReLU(),
                        nn.ConvTranspose2d(4, 1, 4, 2, 1), nn.Sigmoid())
    return export_model(family="ae", encoder=enc, decoder=dec, images=x,
                        latent_model=Factorized(), repo=repo, name="custom-ae", version=1)


def _sealed(folder: Path, repo: Path) -> dict[str, Any]:
    text = (folder / "manifest.json").read_bytes()
    manifest: dict[str, Any] = json.loads(text)
    check = manifest["files"]["check"]
    assert check["path"] == "check.npz"
    assert check["sha256"] == hashlib.sha256((folder / "check.npz").read_bytes()).hexdigest()
    entry = next(e for e in read_registry(repo)
                 if (e["name"], e["version"]) == (manifest["name"], manifest["version"]))
    assert entry["manifest_sha256"] == hashlib.sha256(text).hexdigest()
    assert not list(repo.glob(".export-*"))  # the staging folder is gone
    ref = f"{manifest['name']}:{manifest['version']}"
    verdicts = check_model(ModelRepository(repo), ref, timing_s=0.05)
    assert [v.check for v in verdicts if v.status == "FAIL"] == [], verdicts
    return manifest


def test_photo_and_write_version_share_the_tail(photo_repo: Path, tmp_path: Path) -> None:
    photo = _sealed(photo_repo / "tiny-photo" / "1", photo_repo)
    custom = _sealed(_custom_version(tmp_path), tmp_path)
    assert list(photo) == list(custom) == MANIFEST_KEYS
    assert list(photo["files"])[-1] == list(custom["files"])[-1] == "check"
    assert list(photo["quality"]) == ["val_images", "val_bpp", "val_psnr_db", "onnx_max_rel_diff"]
    assert list(custom["quality"]) == ["val_images", "val_psnr_db", "val_bits_per_image",
                                       "val_bytes_per_image_estimate", "val_code_bytes_per_image",
                                       "onnx_max_abs_diff"]
