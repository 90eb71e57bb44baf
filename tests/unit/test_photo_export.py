"""The photo exporter's float16 weight storage (``--half-weights``): half the bytes, the
same graphs' arithmetic on the rounded net, codes that round-trip through the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from latentserve.export.nets.photo import PhotoCodec, PhotoConfig
from latentserve.export.publish.photo import export_photo
from latentserve.worker.codec.codes import LatentCodec
from latentserve.worker.runtime.engine import ModelRuntime
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)


def _export(repo: Path, name: str, half: bool) -> Path:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = PhotoCodec(PhotoConfig(channels=3, n=16, m=16))  # 5x5x16x16 convs: 6,400 weights
    fit = rng.integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    val = [rng.integers(0, 256, (3, 17, 33), dtype=np.uint8)]
    check = rng.integers(0, 256, (2, 3, 48, 64), dtype=np.uint8)
    return export_photo(net, repo=repo, name=name, version=1, fit_images=fit, val_images=val,
                        check_images=check, source={"kind": "test"}, half_weights=half)


def test_half_weight_photo_export_is_smaller_and_round_trips(tmp_path: Path) -> None:
    full = _export(tmp_path, "full", half=False)
    half = _export(tmp_path, "half", half=True)
    for role in ("encoder.onnx", "decoder.onnx"):
        assert (half / role).stat().st_size < 0.7 * (full / role).stat().st_size
        kinds = {i.data_type for i in onnx.load(str(half / role)).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in kinds
    manifest = json.loads((half / "manifest.json").read_text())
    assert manifest["training"]["half_weights"] is True
    assert json.loads((full / "manifest.json").read_text())["training"]["half_weights"] is False
    assert manifest["quality"]["onnx_max_rel_diff"] <= 1e-3  # parity with the rounded net
    model = ModelRepository(tmp_path).load("half:1")
    runtime = ModelRuntime(model)
    codec = LatentCodec(runtime)
    image = np.random.default_rng(1).integers(0, 256, (1, 3, 17, 33), dtype=np.uint8)
    symbols = runtime.encode(image)
    code = codec.encode(symbols, size=(17, 33))[0]
    assert np.array_equal(codec.decode([code])[0], symbols[0])
    assert runtime.decode(symbols, (17, 33)).shape == (1, 3, 17, 33)
