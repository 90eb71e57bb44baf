"""Generalised divisive normalisation (Balle et al. 2016), the transform of learned codecs.

    GDN:  y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)
    IGDN: y_i = x_i * sqrt(beta_i + sum_j gamma_ij x_j^2)     (its approximate inverse)

beta > 0 and gamma >= 0 are kept so by a reparametrisation (CompressAI's): the stored
parameter p gives ``max(p, bound)^2 - pedestal``. The lower bound passes the gradient
through unchanged (straight-through), so a parameter that dips below it can come back;
the forward pass, and so the ONNX graph (Clip, Mul, Conv, Sqrt), always sees the bounded
value. Everything is per channel at one pixel: a 1x1 convolution of x^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PEDESTAL = 2.0 ** -18
BETA_MIN = 1e-6


def _bounded(p: Tensor, bound: float) -> Tensor:
    """max(p, bound), with the identity as its gradient."""
    return p + (p.clamp_min(bound) - p).detach()


class GDN(nn.Module):
    """GDN over the channels of (N, C, H, W); ``inverse=True`` is IGDN."""

    def __init__(self, channels: int, *, inverse: bool = False, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.inverse = inverse
        self.beta = nn.Parameter(torch.sqrt(torch.ones(channels) + PEDESTAL))
        self.gamma = nn.Parameter(torch.sqrt(gamma_init * torch.eye(channels) + PEDESTAL))

    def effective(self) -> tuple[Tensor, Tensor]:
        """(beta (C,), gamma (C, C)) as the forward pass uses them: beta > 0, gamma >= 0."""
        beta = _bounded(self.beta, (BETA_MIN + PEDESTAL) ** 0.5).pow(2) - PEDESTAL
        gamma = _bounded(self.gamma, PEDESTAL ** 0.5).pow(2) - PEDESTAL
        return beta, gamma

    def forward(self, x: Tensor) -> Tensor:
        beta, gamma = self.effective()
        norm = F.conv2d(x * x, gamma.reshape(self.channels, self.channels, 1, 1), beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)

    def extra_repr(self) -> str:
        return f"{self.channels}, inverse={self.inverse}"
