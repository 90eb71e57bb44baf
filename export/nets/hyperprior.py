"""A scale hyperprior autoencoder (Balle et al. 2018) for MNIST, and its export halves.

``ScaleHyperprior`` is the ladder's GDN autoencoder (g_a, g_s) with a hyper-encoder h_a
(on |y|), a hyper-decoder h_s (scales through softplus) and a factorised density of z;
``scripts/measure_hyperprior.py`` trains it. ``HyperAnalysis`` and ``HyperSynthesis`` are
the two hyper graphs as code kind 5 serves them (``export.custom.Hyperprior``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentserve.export.nets.entropy_model import LIKELIHOOD_BOUND, FactorizedDensity
from latentserve.export.nets.models import make_decoder, make_encoder

SCALE_MIN = 0.11


def gaussian_likelihood(y: Tensor, scale: Tensor) -> Tensor:
    """Mass of [y - 1/2, y + 1/2] under N(0, scale^2)."""
    scale = scale.clamp_min(SCALE_MIN)
    v = y.abs()
    upper = 0.5 * torch.erfc(-(0.5 - v) / (scale * math.sqrt(2)))
    lower = 0.5 * torch.erfc(-(-0.5 - v) / (scale * math.sqrt(2)))
    return (upper - lower).clamp_min(LIKELIHOOD_BOUND)


class ScaleHyperprior(nn.Module):
    """g_a, g_s (GDN), h_a, h_s and the density of z; forward gives x_hat and the bits."""

    def __init__(self, hidden: int, latent: int, hyper: int, *, res_blocks: int = 0,
                 transform: str = "gdn") -> None:
        super().__init__()
        self.g_a = make_encoder(1, hidden, latent, res_blocks, transform)
        self.g_s = make_decoder(latent, hidden, 1, res_blocks, transform)
        # 7x7 -> 4x4 -> 7x7 (the hyper-latent grid)
        self.h_a = nn.Sequential(nn.Conv2d(latent, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hyper, 3, padding=1))
        self.h_s = nn.Sequential(nn.ConvTranspose2d(hyper, hidden, 3, stride=2, padding=1),
                                 nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, latent, 3, padding=1))
        self.density = FactorizedDensity(hyper)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.g_a(x)
        z = self.h_a(y.abs())
        z_tilde, z_lik = self.density(z)
        if not self.training:
            z_tilde = torch.round(z)
            z_lik = self.density.likelihood(z_tilde)
        scale = F.softplus(self.h_s(z_tilde))
        y_noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else torch.round(y)
        y_lik = gaussian_likelihood(y_noisy, scale)
        y_hat = y + (torch.round(y) - y).detach()
        x_hat = self.g_s(y_hat)
        bits_y = -torch.log2(y_lik).flatten(1).sum(1)
        bits_z = -torch.log2(z_lik).flatten(1).sum(1)
        return {"x_hat": x_hat, "bits_y": bits_y, "bits_z": bits_z}


class HyperAnalysis(nn.Module):
    """h_a as served: the rounded latent -> z (the |y| is part of the graph)."""

    def __init__(self, model: ScaleHyperprior) -> None:
        super().__init__()
        self.h_a = model.h_a

    def forward(self, y: Tensor) -> Tensor:
        z: Tensor = self.h_a(y.abs())
        return z


class HyperSynthesis(nn.Module):
    """h_s as served: the rounded z -> the scales of y (softplus, > 0)."""

    def __init__(self, model: ScaleHyperprior) -> None:
        super().__init__()
        self.h_s = model.h_s

    def forward(self, z: Tensor) -> Tensor:
        return F.softplus(self.h_s(z))
