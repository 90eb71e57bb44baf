"""Vector quantisation: a ``Codebook`` (state in buffers, EMA updates, dead-code
restarts) and the ``VectorQuantizer`` layer that uses it (nearest code, commitment
loss, straight-through gradient).

    z_e (N, D, h, w) -> nearest code e_k -> z_q = z_e + sg[e_k - z_e]   (straight-through)
                     -> indices (N, h, w)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Codebook(nn.Module):
    """K code vectors of dimension D, learned by exponential moving averages.

    Buffers (saved with the weights, never touched by the optimiser): ``embed`` (K, D),
    ``cluster_size`` (K) and ``embed_avg`` (K, D), the EMA statistics, and
    ``initialised``. A code whose EMA usage falls below ``dead_threshold`` is restarted
    on a random encoder output of the current batch, so no code stays unused.
    """

    # The buffers register_buffer adds (declared for type checkers; nn.Module holds them).
    embed: Tensor
    cluster_size: Tensor
    embed_avg: Tensor
    initialised: Tensor

    def __init__(self, num_codes: int, dim: int, *, decay: float = 0.99,
                 dead_threshold: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_codes, self.dim, self.decay = num_codes, dim, decay
        self.dead_threshold, self.eps = dead_threshold, eps
        self.register_buffer("embed", torch.randn(num_codes, dim) * 0.1)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_avg", self.embed.clone())
        self.register_buffer("initialised", torch.tensor(False))
        self.restarts = 0  # how many codes were restarted (for logs and tests)

    def distances(self, flat: Tensor) -> Tensor:
        """Squared distances (M, K) from flat vectors (M, D) to every code."""
        return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
                + self.embed.pow(2).sum(1)[None])

    def nearest(self, flat: Tensor) -> Tensor:
        return self.distances(flat).argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Indices (...) -> code vectors (..., D): the decoder's inverse of ``nearest``."""
        return F.embedding(indices, self.embed)

    @torch.no_grad()
    def init_from(self, flat: Tensor) -> None:
        """Seed the codes with random encoder outputs (k-means++-free data init)."""
        pick = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        self.embed.copy_(flat[pick])
        self.embed_avg.copy_(self.embed)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, flat: Tensor, indices: Tensor) -> None:
        """One EMA step towards the mean of the vectors assigned to each code."""
        onehot = F.one_hot(indices, self.num_codes).type(flat.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        size = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embed.copy_(self.embed_avg / size[:, None])

    @torch.no_grad()
    def restart_dead(self, flat: Tensor) -> int:
        """Move codes used less than ``dead_threshold`` onto random batch vectors."""
        dead = self.cluster_size < self.dead_threshold
        count = int(dead.sum())
        if count:
            pick = torch.randint(0, flat.shape[0], (count,), device=flat.device)
            self.embed[dead] = flat[pick]
            self.cluster_size[dead] = self.dead_threshold
            self.embed_avg[dead] = self.embed[dead] * self.dead_threshold
            self.restarts += count
        return count


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with a commitment loss and a straight-through gradient."""

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, decay: float = 0.99,
                 dead_threshold: float = 1.0) -> None:
        super().__init__()
        self.beta = beta
        self.codebook = Codebook(num_codes, dim, decay=decay, dead_threshold=dead_threshold)

    def forward(self, z_e: Tensor) -> dict[str, Tensor]:
        """z_e (N, D, h, w) -> {"z_q", "indices" (N, h, w), "commitment", "perplexity"}."""
        n, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        book = self.codebook
        if self.training and not bool(book.initialised):
            book.init_from(flat.detach())
        indices = book.nearest(flat.detach())
        if self.training:
            book.update(flat.detach(), indices)
            book.restart_dead(flat.detach())
        e = book.lookup(indices)
        commitment = self.beta * F.mse_loss(flat, e.detach())
        z_q = (flat + (e - flat).detach()).reshape(n, h, w, d).permute(0, 3, 1, 2)
        usage = torch.bincount(indices, minlength=book.num_codes).float() / indices.numel()
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        return {"z_q": z_q, "indices": indices.reshape(n, h, w), "commitment": commitment,
                "perplexity": perplexity}
