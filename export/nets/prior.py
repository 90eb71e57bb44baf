"""An autoregressive PixelCNN prior over a VQ-VAE's index grid (raster order).

    indices (N, h, w) -> embed (N, E, h, w)
      -> masked conv "A", kernel (2h-1) x (2w-1): position p sees every position < p
      -> [ReLU -> masked conv "B" 3x3 -> ReLU -> 1x1 ] x L   (residual; B keeps p itself)
      -> ReLU -> 1x1 -> logits (N, K, h, w)

The first layer's kernel spans the whole grid, so there is no blind spot: the logits at
position p are a function of all earlier indices and of nothing else (``causal`` test).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PriorConfig:
    """Shapes and sizes of the prior; stored in the checkpoint to rebuild it."""

    num_codes: int
    grid: tuple[int, int]
    embed_dim: int = 64
    hidden: int = 128
    layers: int = 4
    dropout: float = 0.1

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PriorConfig:
        d = dict(d)
        d["grid"] = tuple(d["grid"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


class MaskedConv2d(nn.Module):
    """A convolution that only sees earlier positions (``A``) or also the centre (``B``).

    Only the causal half of a (kh, kw) kernel is stored: rows above the centre and the
    centre row up to (A: excluding, B: including) the centre. The input is padded on
    top, left and right only, so the lower half costs neither weights nor compute.
    """

    mask: Tensor  # a buffer (register_buffer), (1, 1, rows, kw)

    def __init__(self, mask_type: str, in_ch: int, out_ch: int, kernel: tuple[int, int]) -> None:
        super().__init__()
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask type {mask_type!r} is not 'A' or 'B'")
        kh, kw = kernel
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"masked conv kernel {kernel} must have odd sizes")
        rows = kh // 2 + 1
        self.pad = (kw // 2, kw // 2, kh // 2, 0)  # left, right, top, bottom
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, rows, kw))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        mask = torch.ones(rows, kw)
        mask[-1, kw // 2 + (mask_type == "B"):] = 0
        self.register_buffer("mask", mask[None, None])
        # Kaiming-uniform over the taps that are actually used.
        bound = 1.0 / math.sqrt(in_ch * float(mask.sum()))
        nn.init.uniform_(self.weight, -bound * math.sqrt(3), bound * math.sqrt(3))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Checkpoints from before the half kernel (runs/zoo v1) hold the full (kh, kw)
        # kernel and mask; their lower rows are masked to zero, so keep the causal rows.
        rows = self.weight.shape[2]
        for key in (prefix + "weight", prefix + "mask"):
            t = state_dict.get(key)
            if t is not None and t.dim() == 4 and t.shape[2] == 2 * rows - 1:
                state_dict[key] = t[:, :, :rows]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


class PixelCNNPrior(nn.Module):
    """Causal logits over K codes at every position of an h x w index grid."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        h, w = config.grid
        self.embed = nn.Embedding(config.num_codes, config.embed_dim)
        self.first = MaskedConv2d("A", config.embed_dim, config.hidden, (2 * h - 1, 2 * w - 1))
        self.blocks = nn.ModuleList(
            nn.ModuleList([MaskedConv2d("B", config.hidden, config.hidden, (3, 3)),
                           nn.Conv2d(config.hidden, config.hidden, 1)])
            for _ in range(config.layers))
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Conv2d(config.hidden, config.num_codes, 1)

    def forward(self, indices: Tensor) -> Tensor:
        """indices (N, h, w) int64 -> logits (N, K, h, w)."""
        x = self.embed(indices).permute(0, 3, 1, 2)
        x = self.first(x)
        for conv, mix in self.layers():
            x = x + self.drop(mix(F.relu(conv(F.relu(x)))))
        logits: Tensor = self.out(F.relu(x))
        return logits

    def layers(self) -> list[tuple[MaskedConv2d, nn.Conv2d]]:
        """Each block's (masked conv, 1x1 mix), typed: a ModuleList yields plain Modules."""
        return [(cast(MaskedConv2d, block[0]), cast(nn.Conv2d, block[1]))
                for block in cast(Iterable[nn.ModuleList], self.blocks)]

    def loss(self, indices: Tensor) -> Tensor:
        """Mean cross-entropy in nats per index."""
        return F.cross_entropy(self(indices), indices)

    @torch.no_grad()
    def sample(self, count: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral sampling in raster order: (count, h, w) int64."""
        h, w = self.config.grid
        grid = torch.zeros(count, h, w, dtype=torch.long)
        for pos in range(h * w):
            y, x = divmod(pos, w)
            probs = torch.softmax(self(grid)[:, :, y, x], dim=1)
            grid[:, y, x] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return grid
