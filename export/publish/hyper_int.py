"""A trained float hyper-decoder h_s -> the integer network the runtime runs exactly.

``integer_hyper_decoder(h_s, z_bound)`` freezes a ``Sequential`` of Conv2d (stride 1,
'same') / ConvTranspose2d (stride 2, output twice the input) layers with ReLUs between
them and softplus after the last (export/nets/photo.py's h_s) into
``worker.codec.intnet`` layers: per output channel, weights rounded at 2^e (the largest
e with every |weight| * 2^e below 2^WEIGHT_BITS), biases at the accumulator's scale,
activations kept with HIDDEN_BITS fraction bits, the last layer's output (the softplus
argument) with OUT_BITS. The scale's table index is then an integer comparison with
``thresholds`` (``index_thresholds``): no exp, log or softplus at run time. The
quantisation moves scales by well under a table step (tested), which costs a little
rate and no quality: the decoder gets the same tables as the encoder either way.
"""

from __future__ import annotations

from decimal import localcontext

import numpy as np
import torch
from torch import nn

from latentserve.export.publish.tables import HYPER_LEVELS, decimal_scales
from latentserve.worker.codec.intnet import IntLayer, IntNet

WEIGHT_BITS = 15
HIDDEN_BITS = 10
OUT_BITS = 8


def _conv_form(module: nn.Module) -> tuple[str, np.ndarray, np.ndarray]:
    """(kind, weight (O, C, k, k) as the stride-1 conv intnet runs, bias)."""
    if isinstance(module, nn.ConvTranspose2d):
        k = module.kernel_size[0]
        if module.stride != (2, 2) or module.padding != ((k - 1) // 2,) * 2 \
                or module.output_padding != (1, 1) or module.groups != 1:
            raise ValueError(f"{module}: an integer deconv is stride 2, padding (k-1)/2, "
                             "output_padding 1")
        w = module.weight.detach().double().numpy().transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
        kind = "deconv"
    elif isinstance(module, nn.Conv2d):
        k = module.kernel_size[0]
        if module.stride != (1, 1) or module.padding != (k // 2,) * 2 or module.groups != 1:
            raise ValueError(f"{module}: an integer conv is stride 1 with 'same' padding")
        w = module.weight.detach().double().numpy()
        kind = "conv"
    else:
        raise ValueError(f"cannot make {type(module).__name__} an integer layer")
    b = (module.bias.detach().double().numpy() if module.bias is not None
         else np.zeros(w.shape[0]))
    return kind, np.ascontiguousarray(w), b


def integer_hyper_decoder(h_s: nn.Sequential, z_bound: int) -> tuple[IntNet, np.ndarray]:
    """(the exact network, its index thresholds) for a float h_s that ends before softplus."""
    convs = [m for m in h_s if not isinstance(m, nn.ReLU)]
    relus = [isinstance(b, nn.ReLU) for a, b in zip(h_s, list(h_s)[1:], strict=False)
             if not isinstance(a, nn.ReLU)] + [False]
    layers = []
    frac_in = 0  # z is integer
    for i, (module, relu) in enumerate(zip(convs, relus, strict=True)):
        kind, w, b = _conv_form(module)
        frac_out = HIDDEN_BITS if i + 1 < len(convs) else OUT_BITS
        peak = np.abs(w).reshape(len(w), -1).max(1)
        e = np.floor(np.log2((2 ** WEIGHT_BITS - 1) / np.maximum(peak, 1e-30))).astype(np.int64)
        e = np.clip(e, frac_out - frac_in, 40)  # shift >= 0
        weight = np.rint(w * np.exp2(e).reshape(-1, 1, 1, 1)).astype(np.int64)
        bias = np.rint(b * np.exp2(e + frac_in)).astype(np.int64)
        layers.append(IntLayer(kind, weight, bias, e + frac_in - frac_out, relu))
        frac_in = frac_out
    return IntNet(layers, z_bound), index_thresholds()


def index_thresholds() -> np.ndarray:
    """T_i = floor(2^OUT_BITS * softplus^-1(s_i)) for the table scales s_0..s_{L-2}: a
    scale's index is the number of T_i below its integer t, i.e. the smallest i with
    s_i >= softplus(t / 2^OUT_BITS) (CompressAI's rule). Decimal arithmetic: the same
    integers on every machine."""
    out = []
    with localcontext() as ctx:
        ctx.prec = 80
        for s in decimal_scales()[:HYPER_LEVELS - 1]:
            t = (s.exp() - 1).ln() * (1 << OUT_BITS)
            out.append(int(t.to_integral_value(rounding="ROUND_FLOOR")))
    return np.array(out, np.int64)


@torch.no_grad()
def float_reference(h_s: nn.Sequential, z: np.ndarray) -> np.ndarray:
    """The float h_s's softplus argument on integer z, for comparison in tests."""
    out: np.ndarray = h_s(torch.from_numpy(z).float()).double().numpy()
    return out

