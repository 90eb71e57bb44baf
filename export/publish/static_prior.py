"""A prior graph for a VQ model without a learned prior: the static tables as logits.

A vqvae manifest needs ``prior.onnx`` (sampling draws index grids from it). For a model
coded under static per-position tables (code kind ``vq_static``), the prior is those
tables: ``logits[n, k, y, x] = log(freqs[y*w + x][k] / 2^16)``, the same for every image,
so it is causal trivially and sampling draws what the codes are coded under::

    indices (N, h, w) int64 -> Shape -> N -> Expand(constant (1, K, h, w)) -> logits (N, K, h, w)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def static_logits(spec: dict[str, Any], grid: tuple[int, int]) -> np.ndarray:
    """float32 (1, K, h, w) log-probabilities of the per-position tables."""
    freqs = np.asarray(spec["freqs"], np.float64)           # (h*w, K)
    logp: np.ndarray = np.log(freqs / freqs.sum(axis=1, keepdims=True))
    h, w = grid
    return logp.T.reshape(1, -1, h, w).astype(np.float32)


def write_static_prior(spec: dict[str, Any], grid: tuple[int, int], path: Path, *,
                       opset: int = 17) -> None:
    """Write the constant-logits prior of ``spec`` (a ``vq_static`` table) to ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w = grid
    logits = static_logits(spec, grid)
    k = logits.shape[1]
    nodes = [
        helper.make_node("Shape", ["indices"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "khw"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["table", "out_shape"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(logits, "table"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([k, h, w], np.int64), "khw")]
    graph = helper.make_graph(
        nodes, "static_prior",
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["N", h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, h, w])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="latentserve")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
