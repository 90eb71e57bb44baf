"""KL divergences: the VAE's closed form against Monte Carlo, and the design's discrete example."""

from __future__ import annotations

import math

import pytest
import torch

from latentserve.export.nets.divergences import discrete_kl, gaussian_kl


def test_closed_form_gaussian_kl_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    mu = torch.tensor([0.0, 1.5, -0.7, 0.3])
    logvar = torch.tensor([0.0, -1.0, 0.8, -3.0])
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(400_000, 4, dtype=torch.float64)
    # log q(z) - log p(z), averaged over samples of q.
    log_q = -0.5 * (((z - mu) / std) ** 2 + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z**2 + math.log(2 * math.pi))
    mc = (log_q - log_p).mean(0)
    closed = gaussian_kl(mu, logvar).double()
    assert torch.allclose(mc, closed, atol=0.01), (mc, closed)
    assert closed[0] == 0.0  # N(0, 1) against itself


def test_discrete_kl_of_the_design_example() -> None:
    p = [0.36, 0.48, 0.16]
    q = [1 / 3, 1 / 3, 1 / 3]
    assert discrete_kl(p, q) == pytest.approx(0.0853, abs=5e-5)
    assert discrete_kl(q, p) == pytest.approx(0.0975, abs=5e-5)
    assert discrete_kl(p, p) == 0.0


def test_discrete_kl_edge_cases_and_bad_input() -> None:
    assert discrete_kl([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == pytest.approx(math.log(2))
    assert discrete_kl([0.5, 0.5], [1.0, 0.0]) == float("inf")
    with pytest.raises(ValueError, match="not a probability distribution"):
        discrete_kl([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(ValueError, match="one length"):
        discrete_kl([1.0], [0.5, 0.5])
