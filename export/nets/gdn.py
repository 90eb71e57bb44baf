"""Generalized divisive normalization (Balle, Laparra, Simoncelli 2016), and its inverse.

    GDN:  y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)
    IGDN: y_i = x_i * sqrt(beta_i + sum_j gamma_ij x_j^2)

Both are a 1x1 convolution of x^2 (per pixel, across channels: the receptive field does
not grow). ``beta`` and ``gamma`` are kept non-negative by CompressAI's reparametrisation
(stored value p, used value max(p, sqrt(min + pedestal))^2 - pedestal), which keeps the
gradient alive near zero. In an exported ONNX graph the reparametrisation of constant
weights folds into two constants: nothing here is specific to training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PEDESTAL = 2.0 ** -36


class NonNegative(nn.Module):
    """p -> max(p, bound)^2 - pedestal, with bound = sqrt(minimum + pedestal)."""

    def __init__(self, minimum: float = 0.0) -> None:
        super().__init__()
        self.bound = float((minimum + PEDESTAL) ** 0.5)

    def init(self, value: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp_min(value + PEDESTAL, PEDESTAL))

    def forward(self, p: Tensor) -> Tensor:
        return torch.clamp_min(p, self.bound) ** 2 - PEDESTAL


class GDN(nn.Module):
    """GDN over ``channels`` (``inverse=True``: IGDN, for synthesis transforms)."""

    def __init__(self, channels: int, *, inverse: bool = False, beta_min: float = 1e-6,
                 gamma_init: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.inverse = inverse
        self.beta_param = NonNegative(beta_min)
        self.gamma_param = NonNegative(0.0)
        self.beta = nn.Parameter(self.beta_param.init(torch.ones(channels)))
        self.gamma = nn.Parameter(self.gamma_param.init(gamma_init * torch.eye(channels)))

    def forward(self, x: Tensor) -> Tensor:
        beta = self.beta_param(self.beta)
        gamma = self.gamma_param(self.gamma).reshape(self.channels, self.channels, 1, 1)
        norm = torch.sqrt(F.conv2d(x * x, gamma, beta))
        return x * norm if self.inverse else x / norm

    def extra_repr(self) -> str:
        return f"{self.channels}, inverse={self.inverse}"
