"""Exact float16 weight storage for ONNX files: half the bytes, the same arithmetic.

A network whose large weights were rounded to float16 values (``round_to_halves``, after
training and before export) computes in float32 exactly as before when each such weight
is stored as float16 plus a Cast back to float32 (``store_exact_halves``). Used by the
vae's second-stage sampler and by the ae ladder's ``--half-weights`` export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HALF_MIN_ELEMENTS = 4096  # smaller tensors are not worth a Cast node


def store_exact_halves(path: Path) -> int:
    """Store each large float32 weight of the ONNX file at ``path`` as float16 plus a Cast
    back to float32, where every one of its values is exactly a float16 (so the graph
    computes exactly what it did; only the file shrinks). Returns how many were stored so.

    The zoo's second stage rounds its decoder weights to float16 after training
    (``export.training.sampler``), which halves the shipped ``sampler.onnx``.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts, kept, count = [], [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            kept.append(init)
            continue
        value = numpy_helper.to_array(init)
        half = value.astype(np.float16)
        if value.size < HALF_MIN_ELEMENTS or not np.array_equal(half.astype(np.float32), value):
            kept.append(init)
            continue
        kept.append(numpy_helper.from_array(half, init.name + "__f16"))
        casts.append(onnx.helper.make_node("Cast", [init.name + "__f16"], [init.name],
                                           to=onnx.TensorProto.FLOAT))
        count += 1
    if count:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return count


@torch.no_grad()
def round_to_halves(module: nn.Module) -> int:
    """Round every float32 parameter of ``module`` with >= HALF_MIN_ELEMENTS values to the
    nearest float16 value (kept float32); returns how many tensors were rounded."""
    count = 0
    for param in module.parameters():
        if param.dtype == torch.float32 and param.numel() >= HALF_MIN_ELEMENTS:
            param.copy_(param.half().float())
            count += 1
    return count
