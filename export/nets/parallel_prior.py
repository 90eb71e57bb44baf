"""A parallel (group-by-group) prior over a VQ-VAE's index grid: few sequential passes.

A fixed schedule splits the h x w positions into S groups. One non-causal pass predicts
the logits of group g's positions from the indices of groups < g; every other position
reads a mask token (index K)::

    indices (N, h, w), group g -> tokens = index where rank < g else K (in the graph)
      -> embed (K + 1 -> E) + position embedding -> conv3x3 -> [ReLU -> conv3x3 -> ReLU
      -> 1x1]*L (residual) -> ReLU -> gather group g's positions (padded to P)
      -> 1x1 -> logits (N, P, K)

The mask is applied inside the network, so what the input holds at positions of groups
>= g cannot reach the logits (``test_parallel_prior``: the decoding order): a
teacher-forced encoder and a decoder that fills the grid group by group feed the same
tokens. Logits come only at the group's positions (the output layer is the widest),
padded to the largest group by repeating the group's first position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("mixer", "conv")


def default_schedule(h: int, w: int) -> list[list[int]]:
    """A coarse-to-fine schedule (raster positions y * w + x per group), 7 groups on 7 x 7.

    The centre cell alone first (a group's positions are coded as if independent given
    the earlier groups, so the first group, which has no context, is kept to one cell),
    then the rest of the odd-odd lattice in two quincunx halves, the even-even lattice in
    two checkerboard halves, then the odd-even and the even-odd positions: no two
    positions of a group are 4-neighbours.
    """
    centre = (2 * ((h - 1) // 4) + 1, 2 * ((w - 1) // 4) + 1)

    def group_of(y: int, x: int) -> int:
        if y % 2 == 1 and x % 2 == 1:
            return 0 if (y, x) == centre else 1 if (y + x) % 4 == 0 else 2
        if y % 2 == 0 and x % 2 == 0:
            return 3 if (y + x) % 4 == 0 else 4
        return 5 if y % 2 == 1 else 6

    groups: list[list[int]] = [[] for _ in range(7)]
    for y in range(h):
        for x in range(w):
            groups[group_of(y, x)].append(y * w + x)
    return [g for g in groups if g]


def check_schedule(schedule: Sequence[Sequence[int]], positions: int) -> None:
    """Raise ValueError unless the groups are non-empty and partition range(positions)."""
    flat = [int(p) for g in schedule for p in g]
    if not schedule or any(len(g) == 0 for g in schedule):
        raise ValueError("a schedule needs at least one group, and no empty group")
    if sorted(flat) != list(range(positions)):
        raise ValueError(f"a schedule's groups must partition the {positions} grid positions "
                         "(each exactly once)")


@dataclass(frozen=True)
class ParallelPriorConfig:
    """Shapes, sizes and the schedule; stored in the checkpoint to rebuild the prior."""

    num_codes: int
    grid: tuple[int, int]
    schedule: tuple[tuple[int, ...], ...] = ()  # () : default_schedule(grid)
    embed_dim: int = 32
    hidden: int = 64
    layers: int = 4
    dropout: float = 0.1
    arch: str = "conv"  # mixer: token + channel mixing layers; conv: 3x3 residual convs

    def groups(self) -> list[list[int]]:
        """The schedule as lists (the default one when none is given)."""
        if self.schedule:
            return [list(g) for g in self.schedule]
        return default_schedule(*self.grid)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["schedule"] = self.groups()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ParallelPriorConfig:
        d = dict(d)
        d["grid"] = tuple(d["grid"])  # type: ignore[arg-type]
        d["schedule"] = tuple(tuple(int(p) for p in g)
                              for g in d.get("schedule", ()))  # type: ignore[attr-defined]
        return cls(**d)  # type: ignore[arg-type]


class ParallelPrior(nn.Module):
    """Logits of one schedule group's positions given the indices of the earlier groups."""

    rank: Tensor       # (h*w,) int64: the group of each position
    positions: Tensor  # (S, P) int64: each group's positions, padded with its first one

    def __init__(self, config: ParallelPriorConfig) -> None:
        super().__init__()
        self.config = config
        h, w = config.grid
        groups = config.groups()
        check_schedule(groups, h * w)
        rank = torch.zeros(h * w, dtype=torch.long)
        for g, members in enumerate(groups):
            rank[members] = g
        width = max(len(g) for g in groups)
        table = torch.tensor([g + [g[0]] * (width - len(g)) for g in groups], dtype=torch.long)
        self.register_buffer("rank", rank)
        self.register_buffer("positions", table)
        if config.arch not in ARCHS:
            raise ValueError(f"parallel prior arch {config.arch!r} is not one of {ARCHS}")
        e, c, hw = config.embed_dim, config.hidden, h * w
        self.embed = nn.Embedding(config.num_codes + 1, e)  # K: the mask token
        self.pos = nn.Parameter(torch.zeros(1, e, h, w))
        if config.arch == "conv":
            self.first: nn.Module = nn.Conv2d(e, c, 3, padding=1)
            self.blocks = nn.ModuleList(
                nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)])
                for _ in range(config.layers))
        else:  # every layer mixes all positions (a learned hw x hw map), then channels
            self.first = nn.Conv2d(e, c, 1)
            self.blocks = nn.ModuleList(
                nn.ModuleList([nn.Linear(hw, hw), nn.Conv1d(c, c, 1), nn.Conv1d(c, c, 1)])
                for _ in range(config.layers))
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Linear(c, config.num_codes)

    @property
    def num_groups(self) -> int:
        return int(self.positions.shape[0])

    def group_sizes(self) -> list[int]:
        return [len(g) for g in self.config.groups()]

    def trunk(self, indices: Tensor, group: Tensor) -> Tensor:
        """Features (N, C, h*w) with positions of groups >= ``group`` (per image, (N,)
        or a scalar) read as the mask token."""
        n, h, w = indices.shape
        known = self.rank.view(1, h, w) < group.reshape(-1, 1, 1)
        tokens = torch.where(known, indices, torch.full_like(indices, self.config.num_codes))
        x = self.embed(tokens).permute(0, 3, 1, 2) + self.pos
        x = self.first(x)
        blocks = cast(Iterable[nn.ModuleList], self.blocks)
        if self.config.arch == "conv":
            for conv, mix in blocks:
                x = x + self.drop(mix(F.relu(conv(F.relu(x)))))
            return F.relu(x).reshape(n, x.shape[1], h * w)
        x = x.reshape(n, x.shape[1], h * w)
        for mix_positions, a, b in blocks:
            x = x + mix_positions(F.relu(x))
            x = x + self.drop(b(F.relu(a(F.relu(x)))))
        return F.relu(x)

    def forward(self, indices: Tensor, group: Tensor) -> Tensor:
        """indices (N, h, w) int64, group () int64 -> logits (N, P, K) at the group's
        positions (``positions[group]``; columns past the group's size repeat its first)."""
        feats = self.trunk(indices, group)
        where = self.positions[group]  # (P,)
        picked = feats.index_select(2, where).transpose(1, 2)  # (N, P, C)
        logits: Tensor = self.out(picked)
        return logits

    def loss(self, indices: Tensor, group: Tensor) -> Tensor:
        """Mean cross-entropy (nats per index) of each image's group ``group[i]`` (N,)."""
        feats = self.trunk(indices, group).transpose(1, 2)  # (N, h*w, C)
        mine = self.rank.view(1, -1) == group.view(-1, 1)  # (N, h*w): the targets
        # The output layer (the widest) only at the targets.
        logits = self.out(feats[mine])
        return F.cross_entropy(logits, indices.reshape(len(indices), -1)[mine])

    @torch.no_grad()
    def all_logits(self, indices: Tensor) -> Tensor:
        """Teacher forcing: logits (N, h*w, K) of every position under its own group."""
        n, h, w = indices.shape
        out = torch.zeros(n, h * w, self.config.num_codes)
        for g, members in enumerate(self.config.groups()):
            out[:, members] = self(indices, torch.tensor(g))[:, :len(members)]
        return out
