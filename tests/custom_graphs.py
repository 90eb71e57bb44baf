"""ONNX graphs made outside latentserve, for the import tests: onnx.helper graphs and
torch exports with other names, types and layouts than the contract's."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn


def samples(shape: tuple[int, int, int] = (1, 16, 16), n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    out = (rng.random((n, shape[0], 1, 1)) * xx + rng.random((n, shape[0], 1, 1)) * yy) * 8
    return np.clip(out, 0, 255).astype(np.uint8)


def torch_onnx(module: nn.Module, example: Tensor, path: Path, inputs: list[str],
               outputs: list[str], *, dynamic: bool = True) -> Path:
    axes = {n: {0: "batch"} for n in inputs + outputs} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=inputs,
                          output_names=outputs, opset_version=17, dynamo=False,
                          dynamic_axes=axes)
    return path


# -- onnx.helper graphs -----------------------------------------------------------------------

def helper_model(nodes: list, inputs: list, outputs: list,
                 inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="helper-test")
    model.ir_version = 8
    return model


def pool_encoder(path: Path, *, batch: int | str = "N", out_type: int = TensorProto.FLOAT,
                 two_inputs: bool = False) -> Path:
    """float pixels in [0, 255] (N, 1, 16, 16) -> average-pool 4x4 / 16 -> latent (N, 1, 4, 4)."""
    nodes = [helper.make_node("AveragePool", ["pixels"], ["pooled"], kernel_shape=[4, 4],
                              strides=[4, 4]),
             helper.make_node("Div", ["pooled", "sixteen"], ["code"])]
    if out_type != TensorProto.FLOAT:
        nodes[-1].output[0] = "code_f"
        nodes.append(helper.make_node("Cast", ["code_f"], ["code"], to=out_type))
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 1, 16, 16])]
    if two_inputs:
        inputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [batch, 1]))
    model = helper_model(nodes, inputs,
                         [helper.make_tensor_value_info("code", out_type, [batch, 1, 4, 4])],
                         [numpy_helper.from_array(np.array(16.0, np.float32), "sixteen")])
    onnx.save(model, str(path))
    return path


def block_decoder(path: Path, *, out_hw: int = 16) -> Path:
    """latent (N, 1, 4, 4) -> ConvTranspose with a constant 4x4 kernel -> pixels / 255 * 16."""
    k = out_hw // 4
    weight = np.full((1, 1, k, k), 16.0 / 255.0, np.float32)
    nodes = [helper.make_node("ConvTranspose", ["z", "w"], ["out"], strides=[k, k])]
    model = helper_model(
        nodes, [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1, None, None])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(model, str(path))
    return path


class VQEnc(nn.Module):
    def __init__(self, book: Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, book.shape[1], 4, 4)
        self.book = book

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x).permute(0, 2, 3, 1)
        return ((z[..., None, :] - self.book) ** 2).sum(-1).argmin(-1).to(torch.int32)


class VQDec(nn.Module):
    def __init__(self, book: Tensor) -> None:
        super().__init__()
        self.book = book
        self.up = nn.ConvTranspose2d(book.shape[1], 3, 4, 4)

    def forward(self, idx: Tensor) -> Tensor:
        return torch.sigmoid(self.up(self.book[idx.long()].permute(0, 3, 1, 2))) * 255
