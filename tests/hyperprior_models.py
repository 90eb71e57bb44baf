"""A user's own scale hyperprior (not the zoo's architecture), 16 x 16 grey images:
trained a few steps and exported through ``export.custom.Hyperprior`` (tests of kind 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latentserve.export.publish.custom import Hyperprior, export_model


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 4, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * 4.0


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(4, 8, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 1, 4, 2, 1))

    def forward(self, y: Tensor) -> Tensor:
        return torch.sigmoid(self.net(y / 4.0))


class HyperEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 2, 3, 2, 1))

    def forward(self, y: Tensor) -> Tensor:
        return self.net(y.abs())


class HyperDecoder(nn.Module):
    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(2, 8, 3, 2, 1, 1), nn.ReLU(),
                                 nn.Conv2d(8, 4, 3, 1, 1))
        self.shift = shift

    def forward(self, z: Tensor) -> Tensor:
        return nn.functional.softplus(self.net(z)) + 0.05 + self.shift


def digits(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    c = rng.uniform(3, 13, (n, 2, 1, 1))
    img = 255 * np.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / 8.0)
    return np.clip(img + rng.uniform(0, 40, img.shape), 0, 255).astype(np.uint8)[:, None]


def train_few_steps(modules: list[nn.Module], x: np.ndarray, steps: int = 30) -> None:
    torch.manual_seed(0)
    enc, dec, h_a, h_s = modules
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    xt = torch.as_tensor(x).float() / 255.0
    for _ in range(steps):
        y = enc(xt)
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        z = h_a(y_tilde)
        scale = h_s(z + (torch.round(z) - z).detach())
        bits = -torch.log2(torch.special.ndtr((0.5 - y_tilde.abs()) / scale)
                           - torch.special.ndtr((-0.5 - y_tilde.abs()) / scale) + 1e-9).mean()
        loss = ((dec(y_tilde) - xt) ** 2).mean() * 100 + bits
        opt.zero_grad()
        loss.backward()
        opt.step()


def built_repo(root: Path) -> Path:
    repo = root / "repo"
    if (repo / "hp" / "1").exists():
        return repo
    torch.manual_seed(0)
    modules: list[nn.Module] = [Encoder(), Decoder(), HyperEncoder(), HyperDecoder()]
    x = digits(64)
    train_few_steps(modules, x)
    enc, dec, h_a, h_s = modules
    export_model(family="ae", encoder=enc, decoder=dec, images=x,
                 latent_model=Hyperprior(h_a, h_s), repo=repo, name="hp", version=1)
    return repo
