"""A learned factorised entropy model (Balle et al. 2018, CompressAI's EntropyBottleneck).

Each latent channel has its own univariate density, given as a learned monotone
cumulative function ``c(x)`` (a tiny per-channel MLP with softplus weights, so it is
non-decreasing). The probability of an integer ``k`` is ``c(k + 1/2) - c(k - 1/2)``.
In training the latent gets additive uniform noise for the rate term (a continuous
relaxation of rounding); at export ``pmf_table`` tabulates the pmf over integers, and
``export.tables`` freezes it into 16-bit integer frequencies.

    y (N, C, h, w) --+-- noise --> likelihoods (N, C, h, w)   (rate = -sum log2)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LIKELIHOOD_BOUND = 1e-9


class FactorizedDensity(nn.Module):
    """Per-channel learned CDF; ``likelihood(y)`` is the mass of [y - 1/2, y + 1/2]."""

    def __init__(self, channels: int, *, filters: tuple[int, ...] = (3, 3, 3),
                 init_scale: float = 10.0) -> None:
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def _logits_cumulative(self, x: Tensor) -> Tensor:
        """x (C, 1, M) -> logit of the CDF at x, (C, 1, M)."""
        for i, matrix in enumerate(self.matrices):
            x = torch.matmul(F.softplus(matrix), x) + self.biases[i]
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def likelihood(self, y: Tensor) -> Tensor:
        """Mass of the unit interval around each value of y (N, C, h, w)."""
        n, c, h, w = y.shape
        if c != self.channels:
            raise ValueError(f"latent has {c} channels, the entropy model {self.channels}")
        v = y.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self._logits_cumulative(v - 0.5)
        upper = self._logits_cumulative(v + 0.5)
        # Subtract in the tail where the sigmoid is flat, for numerical accuracy.
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        lik = lik.clamp_min(LIKELIHOOD_BOUND)
        return lik.reshape(c, n, h, w).permute(1, 0, 2, 3)

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Training: (noisy y, its likelihoods). Eval: (rounded y, its likelihoods)."""
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else torch.round(y)
        return y_tilde, self.likelihood(y_tilde)

    @torch.no_grad()
    def pmf_table(self, lo: list[int], hi: list[int]) -> list[list[float]]:
        """Per channel c, the pmf over the integers lo[c]..hi[c], tails folded into the ends."""
        tables = []
        for c in range(self.channels):
            ks = torch.arange(lo[c], hi[c] + 1, dtype=torch.float32)
            v = ks.reshape(1, 1, -1).expand(self.channels, 1, -1)
            lower = torch.sigmoid(self._logits_cumulative(v - 0.5))[c, 0]
            upper = torch.sigmoid(self._logits_cumulative(v + 0.5))[c, 0]
            pmf = (upper - lower).clamp_min(0).double()
            # Symbols outside the support are clipped onto its ends by the engine.
            pmf[0] += float(lower[0])
            pmf[-1] += float(1.0 - upper[-1])
            tables.append((pmf / pmf.sum()).tolist())
        return tables
