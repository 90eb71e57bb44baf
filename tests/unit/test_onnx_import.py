"""latentserve import: ONNX graphs made elsewhere (torch export, onnx.helper), right and wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from custom_graphs import (
    VQDec,
    VQEnc,
    block_decoder,
    helper_model,
    pool_encoder,
    samples,
    torch_onnx,
)
from latentserve.cli import main
from latentserve.errors import InvalidInput
from latentserve.export.publish.onnx_import import import_onnx
from latentserve.worker.runtime.images import encode_png
from latentserve.worker.runtime.pipeline import Pipeline

torch.set_num_threads(1)


def test_helper_ae_imports_with_range_wrapping(tmp_path: Path) -> None:
    x = samples()
    folder = import_onnx(family="ae", encoder=pool_encoder(tmp_path / "e.onnx"),
                         decoder=block_decoder(tmp_path / "d.onnx"), images=x, repo=tmp_path / "m",
                         name="pool-ae", version=1, input_range=255.0)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["latent"]["shape"] == [1, 4, 4] and manifest["source"]["kind"] == "onnx-import"
    enc = onnx.load(str(folder / "encoder.onnx"))
    assert [i.name for i in enc.graph.input] == ["image"]
    assert enc.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [o.name for o in enc.graph.output] == ["latent"]
    pipe = Pipeline(tmp_path / "m")
    back = pipe.reconstruct(pipe.compress("pool-ae", x))
    # The block decoder repeats each 4x4 block's rounded mean: within a few grey levels of it.
    means = x.reshape(16, 1, 4, 4, 4, 4).mean(axis=(3, 5))
    assert np.abs(back[:, :, ::4, ::4].astype(float) - means).max() <= 9
    assert manifest["quality"]["val_psnr_db"] > 20


def test_helper_vqvae_static_and_cli_import_then_check(tmp_path: Path) -> None:
    """A 4-level quantiser as a 'vqvae' (indices = round(mean / 85)), through the CLI."""
    enc_nodes = [
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Div", ["p", "step"], ["q"]),
        helper.make_node("Round", ["q"], ["r"]),
        helper.make_node("Squeeze", ["r", "axis1"], ["s"]),
        helper.make_node("Cast", ["s"], ["codes"], to=TensorProto.INT32)]
    enc = helper_model(enc_nodes,
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 16, 16])],
                       [helper.make_tensor_value_info("codes", TensorProto.INT32, ["b", 4, 4])],
                       [numpy_helper.from_array(np.array(1.0 / 3.0, np.float32), "step"),
                        numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    dec_nodes = [
        helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["f", "axis1"], ["u"]),
        helper.make_node("ConvTranspose", ["u", "w"], ["img"], strides=[4, 4])]
    dec = helper_model(dec_nodes,
                       [helper.make_tensor_value_info("i", TensorProto.INT32, ["b", 4, 4])],
                       [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 1, 16, 16])],
                       [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                        numpy_helper.from_array(np.full((1, 1, 4, 4), 1 / 3, np.float32), "w")])
    onnx.save(enc, str(tmp_path / "enc.onnx"))
    onnx.save(dec, str(tmp_path / "dec.onnx"))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(samples()):
        (folder / f"s{i:02d}.png").write_bytes(encode_png(im))
    repo = tmp_path / "m"
    argv = ["import", "--family", "vqvae", "--encoder", str(tmp_path / "enc.onnx"),
            "--decoder", str(tmp_path / "dec.onnx"), "--images", str(folder), "--repo", str(repo),
            "--name", "levels", "--version", "1"]
    assert main(argv) == 1  # no prior and no --num-codes
    assert main([*argv, "--num-codes", "4"]) == 0
    manifest = json.loads((repo / "levels" / "1" / "manifest.json").read_text())
    assert manifest["code"]["kind"] == "vq_static" and "prior" in manifest["files"]
    assert main(["models", "check", "levels", "--repo", str(repo), "--images", str(folder)]) == 0
    assert Pipeline(repo).sample("levels", 2, seed=0).shape == (2, 1, 16, 16)


# -- torch-made graphs with other names, types and layouts -----------------------------------------

class VAEEnc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = (self.conv(x) * 2).chunk(2, 1)
        return mu, logvar


class Prior(nn.Module):
    """Causal: logits at p from the index at p - 1; takes int32 indices."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.table = nn.Embedding(k + 1, k)

    def forward(self, idx: Tensor) -> Tensor:
        n, h, w = idx.shape
        flat = idx.long().reshape(n, -1)
        prev = torch.cat([torch.full_like(flat[:, :1], self.k), flat[:, :-1]], 1)
        return self.table(prev).reshape(n, h, w, self.k).permute(0, 3, 1, 2)


def test_torch_vae_two_outputs_float_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = samples((3, 16, 16))
    enc = torch_onnx(VAEEnc(), torch.zeros(2, 3, 16, 16), tmp_path / "e.onnx", ["x"],
                     ["mu", "logvar"])
    dec = torch_onnx(nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 4), nn.Sigmoid()),
                     torch.zeros(2, 4, 4, 4), tmp_path / "d.onnx", ["z"], ["image"])
    folder = import_onnx(family="vae", encoder=enc, decoder=dec, images=x, repo=tmp_path / "m",
                         name="their-vae", version=1)
    assert json.loads((folder / "manifest.json").read_text())["sampling"] == {"kind": "gaussian"}
    pipe = Pipeline(tmp_path / "m")
    assert pipe.reconstruct(pipe.compress("their-vae", x)).shape == x.shape
    with pytest.raises(InvalidInput, match="has no output 'sigma'; its outputs are 'mu', 'logvar'"):
        import_onnx(family="vae", encoder=enc, decoder=dec, images=x, repo=tmp_path / "m",
                    name="x", version=1, encoder_output="sigma")


def test_torch_vqvae_int32_with_prior_and_255_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = samples((3, 16, 16))
    book = torch.randn(8, 4)
    enc = torch_onnx(VQEnc(book), torch.zeros(2, 3, 16, 16), tmp_path / "e.onnx", ["img"], ["idx"])
    dec = torch_onnx(VQDec(book), torch.zeros(2, 4, 4, dtype=torch.int32), tmp_path / "d.onnx",
                     ["idx"], ["rgb"])
    prior = torch_onnx(Prior(8), torch.zeros(2, 4, 4, dtype=torch.int32), tmp_path / "p.onnx",
                       ["idx"], ["scores"])
    folder = import_onnx(family="vqvae", encoder=enc, decoder=dec, prior=prior, images=x,
                         repo=tmp_path / "m", name="their-vq", version=1, output_range=255.0)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["code"]["kind"] == "vq_prior"
    assert manifest["code"]["vq_static"]["num_codes"] == 8
    pipe = Pipeline(tmp_path / "m")
    codes = pipe.compress("their-vq", x)
    assert pipe.reconstruct(codes).shape == x.shape


def _wrong(tmp_path: Path, case: str) -> dict[str, object]:
    e, d = tmp_path / "e.onnx", tmp_path / "d.onnx"
    good = {"family": "ae", "encoder": pool_encoder(e), "decoder": block_decoder(d),
            "input_range": 255.0}
    if case == "two-inputs":
        return {**good, "encoder": pool_encoder(e, two_inputs=True)}
    if case == "fixed-batch":
        return {**good, "encoder": pool_encoder(e, batch=1)}
    if case == "vq-float":
        return {**good, "family": "vqvae", "num_codes": 4}
    if case == "ae-int-latent":
        return {**good, "encoder": pool_encoder(e, out_type=TensorProto.INT64)}
    if case == "decoder-size":
        return {**good, "decoder": block_decoder(d, out_hw=32)}
    if case == "not-onnx":
        e.write_bytes(b"\x00not a model")
        return good
    if case == "prior-for-ae":
        return {**good, "prior": d}
    raise AssertionError(case)


WRONG = {
    "two-inputs": "the encoder has 2 inputs ('pixels', 'other')",
    "fixed-batch": "encoder input 'pixels' has a fixed batch size 1",
    "vq-float": ("encoder output 'code' is float; a vqvae encoder must give integer codebook "
                 "indices"),
    "ae-int-latent": "encoder output 'code' is int64; an ae encoder must give a float latent",
    "decoder-size": "decoder output 'image' is float32 (8, 1, 32, 32); expected float images "
                    "(8, 1, 16, 16)",
    "not-onnx": "is not a valid ONNX model",
    "prior-for-ae": "a prior graph is for a vqvae",
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_graphs_are_refused_naming_the_tensor(case: str, tmp_path: Path) -> None:
    kwargs = _wrong(tmp_path, case)
    with pytest.raises(InvalidInput) as err:
        import_onnx(images=samples(), repo=tmp_path / "m", name="bad", version=1, **kwargs)  # type: ignore[arg-type]
    assert WRONG[case] in str(err.value)
    assert not (tmp_path / "m" / "bad").exists()


def test_static_shape_mismatch_names_axis(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="encoder input 'pixels' has 16 at axis 2, the sample "
                                           r"images 12"):
        import_onnx(family="ae", encoder=pool_encoder(tmp_path / "e.onnx"),
                    decoder=block_decoder(tmp_path / "d.onnx"), images=samples((1, 12, 16)),
                    repo=tmp_path / "m", name="bad", version=1)
