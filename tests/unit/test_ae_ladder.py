"""The ae ladder's tools: rungs fine-tuned from a base (``--init``) and exact float16
weight storage at export (``--half-weights``), issue 15."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fixtures_models import MNIST, tiny_configs
from latentserve.errors import InvalidInput
from latentserve.export.nets.models import ModelConfig
from latentserve.export.publish.exporter import export_checkpoint, onnx_export
from latentserve.export.publish.halves import round_to_halves, store_exact_halves
from latentserve.export.publish.sampler import session_run
from latentserve.export.training.data import split
from latentserve.export.training.train import TrainConfig, init_record, train_model
from latentserve.worker.runtime.engine import ModelRuntime
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small_data(mnist_images: np.ndarray):  # type: ignore[no-untyped-def]
    return split(mnist_images[:300], val_count=50, source="test")


def gdn_config(hidden: int = 16) -> ModelConfig:
    return ModelConfig(family="ae", hidden=hidden, res_blocks=0, latent_channels=4,
                       transform="gdn")


def test_a_rung_starts_from_its_base_weights(small_data) -> None:  # type: ignore[no-untyped-def]
    _, tc, _ = tiny_configs("ae")
    base = train_model(gdn_config(), TrainConfig(**{**tc.__dict__, "steps": 10}), small_data)
    # One step at a vanishing lr: the rung is the base (a fresh net would be far from it).
    tiny = TrainConfig(**{**tc.__dict__, "steps": 1, "lr": 1e-12, "lmbda": 0.02, "seed": 5})
    rung = train_model(gdn_config(), tiny, small_data, init=base)
    for key, value in base["state_dict"].items():
        torch.testing.assert_close(rung["state_dict"][key], value, atol=1e-9, rtol=0)
    fresh = train_model(gdn_config(), tiny, small_data)
    assert any(not torch.allclose(fresh["state_dict"][k], v) for k, v in base["state_dict"].items())
    rec = init_record(base, "base.pt")
    assert rec == {"path": "base.pt", "steps": 10, "total_steps": 10, "lmbda": tc.lmbda,
                   "seed": tc.seed}
    # A rung of a rung counts the steps of the whole chain.
    rung["init"] = rec
    assert init_record(rung, "rung.pt")["total_steps"] == 11


def test_a_rung_refuses_a_base_of_another_model(small_data) -> None:  # type: ignore[no-untyped-def]
    _, tc, _ = tiny_configs("ae")
    tc = TrainConfig(**{**tc.__dict__, "steps": 2})
    base = train_model(gdn_config(), tc, small_data)
    with pytest.raises(InvalidInput, match=r"hidden \(16, here 8\)"):
        train_model(gdn_config(hidden=8), tc, small_data, init=base)
    vq, vtc, pc = tiny_configs("vqvae")
    with pytest.raises(InvalidInput, match="family"):
        train_model(vq, vtc, small_data, prior_config=pc, init=base)


@pytest.mark.skipif(not MNIST.is_file(), reason="needs ../shared/data/mnist")
def test_train_init_command_fine_tunes_and_records_its_base(tmp_path: Path) -> None:
    from latentserve.cli import main
    from latentserve.export.training.train import load_checkpoint

    def train(*extra: str, hidden: int = 8) -> int:
        return main(["train", "--family", "ae", "--transform", "gdn", "--data",
                     str(MNIST.parent), "--train-limit", "64", "--hidden", str(hidden),
                     "--res-blocks", "0", "--latent-channels", "2", "--no-progress",
                     "--threads", "1", *extra])

    base, rung = tmp_path / "base.pt", tmp_path / "rung.pt"
    assert train("--out", str(base), "--steps", "3") == 0
    assert train("--out", str(rung), "--steps", "2", "--lambda", "0.02", "--init", str(base)) == 0
    ckpt = load_checkpoint(rung)[0]
    assert ckpt["init"]["path"] == str(base) and ckpt["init"]["total_steps"] == 3
    assert ckpt["train_config"]["lmbda"] == 0.02
    # Another width than the base's: refused with the field named (exit status 1).
    assert train("--out", str(tmp_path / "bad.pt"), "--steps", "1", "--init", str(base),
                 hidden=12) == 1
    assert not (tmp_path / "bad.pt").exists()


def test_stored_halves_compute_exactly_what_the_rounded_net_computes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 32, 5, padding=2),
                        nn.Conv2d(32, 1, 3, padding=1)).eval()
    assert round_to_halves(net) == 1  # only the 32x32x5x5 weight has >= 4096 values
    x = torch.rand(3, 1, 12, 12)
    plain, halved = tmp_path / "plain.onnx", tmp_path / "halved.onnx"
    onnx_export(net, x, plain, input_name="x", output_name="y")
    shutil.copy(plain, halved)
    assert store_exact_halves(halved) == 1
    assert halved.stat().st_size < 0.7 * plain.stat().st_size
    kinds = {i.name: i.data_type for i in onnx.load(str(halved)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds.values()
    feed = x.numpy()
    assert np.array_equal(session_run(plain)(feed), session_run(halved)(feed))
    # An unrounded net keeps its float32 weights (storing them as halves would change it).
    torch.manual_seed(0)
    other = nn.Sequential(nn.Conv2d(32, 32, 5, padding=2)).eval()
    path = tmp_path / "other.onnx"
    onnx_export(other, torch.rand(1, 32, 6, 6), path, input_name="x", output_name="y")
    assert store_exact_halves(path) == 0


def test_a_half_weight_export_is_smaller_and_measures_the_rounded_net(  # type: ignore[no-untyped-def]
        small_data, tmp_path: Path) -> None:
    _, tc, _ = tiny_configs("ae")
    ckpt = train_model(gdn_config(hidden=32), TrainConfig(**{**tc.__dict__, "steps": 20}),
                       small_data)
    full = export_checkpoint(ckpt, repo=tmp_path, name="full", version=1, data=small_data,
                             gmm_components=2)
    half = export_checkpoint(ckpt, repo=tmp_path, name="half", version=1, data=small_data,
                             gmm_components=2, half_weights=True)
    for role in ("encoder.onnx", "decoder.onnx"):
        assert (half / role).stat().st_size < 0.8 * (full / role).stat().st_size
    manifest = json.loads((half / "manifest.json").read_text())
    assert manifest["training"]["half_weights"] is True
    assert manifest["quality"]["onnx_max_abs_diff"] <= 1e-4  # parity against the rounded net
    q_full = json.loads((full / "manifest.json").read_text())["quality"]
    assert abs(manifest["quality"]["val_psnr_db"] - q_full["val_psnr_db"]) < 0.5
    runtime = ModelRuntime(ModelRepository(tmp_path).load("half:1"))
    symbols = runtime.encode(small_data.val[:4])
    assert runtime.decode(symbols).shape == (4, 1, 28, 28)
    vq, vtc, pc = tiny_configs("vqvae")
    vq_ckpt = train_model(vq, TrainConfig(**{**vtc.__dict__, "steps": 2, "prior_steps": 2}),
                          small_data, prior_config=pc)
    with pytest.raises(InvalidInput, match="prior"):
        export_checkpoint(vq_ckpt, repo=tmp_path, name="vq", version=1, data=small_data,
                          half_weights=True)
