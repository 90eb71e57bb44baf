"""The model zoo's three families, registered by name: ``ae``, ``vae``, ``vqvae``.

Every model takes float images in [0, 1] of shape (N, C, H, W) (H and W divisible by
4; nothing assumes 28) and ``forward`` returns a dict of named tensors, always with
``x_hat``. ``onnx_encoder()`` / ``onnx_decoder()`` give the modules that the exporter
turns into ONNX graphs with the I/O contract of ``latentserve.worker.runtime.manifest``.

Shared trunk (h = H/4, w = W/4), ``transform="relu"`` (the default):

    encoder: x -> conv5 s2 -> ReLU -> conv5 s2 -> [res]*R -> ReLU -> conv3 -> (N, C', h, w)
    decoder: (N, C', h, w) -> conv3 -> [res]*R -> ReLU -> deconv4 s2 -> ReLU -> deconv4 s2
             -> (N, C, H, W)   (clamped to [0, 1] in the ONNX decoder)

``transform="gdn"`` (Balle 2017 style, ``export.gdn``; the compression ladder's transforms):

    encoder: x -> conv5 s2 -> GDN -> conv5 s2 -> GDN -> [res]*R -> conv3 -> GDN -> conv3
    decoder: conv3 -> IGDN -> conv3 -> [res]*R -> IGDN -> deconv5 s2 -> IGDN -> deconv5 s2

``latent_layout="flat"`` (ae / vae) puts a linear layer between the trunk and a latent of
``latent_channels`` numbers per image, shape (C', 1, 1): the VAE that samples digits from
N(0, I) uses it (a small dense latent has no prior holes between independent positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar, cast

import torch
from torch import Tensor, nn

from latentserve.export.nets.divergences import gaussian_kl
from latentserve.export.nets.entropy_model import FactorizedDensity
from latentserve.export.nets.gdn import GDN
from latentserve.export.nets.quantizer import VectorQuantizer

FAMILIES = ("ae", "vae", "vqvae")
TRANSFORMS = ("relu", "gdn")
LAYOUTS = ("grid", "flat")
MODELS: dict[str, type[LatentModel]] = {}
M = TypeVar("M", bound="LatentModel")


def register_model(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: make a model buildable by family name."""
    def deco(cls: type[M]) -> type[M]:
        MODELS[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a model's shapes; stored in checkpoints and manifests."""

    family: str
    image_shape: tuple[int, int, int] = (1, 28, 28)
    hidden: int = 64
    res_blocks: int = 1
    decoder_hidden: int = 0      # 0: same as hidden
    decoder_res_blocks: int = -1  # -1: same as res_blocks
    latent_channels: int = 12   # ae / vae
    num_codes: int = 256        # vqvae
    code_dim: int = 32          # vqvae
    beta: float = 0.25          # vqvae commitment weight
    ema_decay: float = 0.99     # vqvae codebook EMA
    dead_threshold: float = 1.0  # vqvae: EMA usage below this restarts a code
    transform: str = "relu"     # relu | gdn (GDN / IGDN nonlinearities)
    latent_layout: str = "grid"  # grid: (C', h, w); flat: (C', 1, 1) through a linear layer
    learned_sigma: bool = False  # vae: learn the Gaussian likelihood's pixel std (exact ELBO)
    stage2_hidden: int = 0      # vae (flat): width of a second-stage VAE over z (0: none)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform {self.transform!r} is not one of {TRANSFORMS}")
        if self.latent_layout not in LAYOUTS:
            raise ValueError(f"latent layout {self.latent_layout!r} is not one of {LAYOUTS}")
        if self.latent_layout == "flat" and self.family == "vqvae":
            raise ValueError("a vqvae codes a grid of indices; latent_layout must be 'grid'")
        if self.stage2_hidden and (self.family != "vae" or self.latent_layout != "flat"):
            raise ValueError("a second stage (stage2_hidden) needs family 'vae' with a flat latent")
        c, h, w = self.image_shape
        if c not in (1, 3) or h % 4 or w % 4 or h < 4 or w < 4:
            raise ValueError(f"image shape {self.image_shape} needs C in (1, 3) and H, W "
                             "positive multiples of 4")

    @property
    def dec_hidden(self) -> int:
        return self.decoder_hidden or self.hidden

    @property
    def dec_res_blocks(self) -> int:
        return self.res_blocks if self.decoder_res_blocks < 0 else self.decoder_res_blocks

    @property
    def grid(self) -> tuple[int, int]:
        """Latent grid (h, w)."""
        return self.image_shape[1] // 4, self.image_shape[2] // 4

    @property
    def latent_grid(self) -> tuple[int, int]:
        """Spatial shape of the ae / vae latent: the grid, or (1, 1) when flat."""
        return (1, 1) if self.latent_layout == "flat" else self.grid

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelConfig:
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


class LatentModel(nn.Module):
    """What every registered model has: the config that built it and its two ONNX halves
    (uint8 images -> latent or indices, and back to images in [0, 1])."""

    config: ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def onnx_encoder(self) -> nn.Module:
        raise NotImplementedError

    def onnx_decoder(self) -> nn.Module:
        raise NotImplementedError


def build_model(config: ModelConfig) -> LatentModel:
    """Instantiate the registered model of ``config.family``."""
    return MODELS[config.family](config)


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.body(x)
        return out


def make_encoder(c_in: int, hidden: int, c_out: int, res_blocks: int,
                 transform: str = "relu") -> nn.Sequential:
    if transform == "gdn":
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, 5, stride=2, padding=2), GDN(hidden),
            nn.Conv2d(hidden, hidden, 5, stride=2, padding=2), GDN(hidden),
            *[ResBlock(hidden) for _ in range(res_blocks)],
            nn.Conv2d(hidden, hidden, 3, padding=1), GDN(hidden),
            nn.Conv2d(hidden, c_out, 3, padding=1))
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 5, stride=2, padding=2),
        *[ResBlock(hidden) for _ in range(res_blocks)], nn.ReLU(),
        nn.Conv2d(hidden, c_out, 3, padding=1))


def make_decoder(c_in: int, hidden: int, c_out: int, res_blocks: int,
                 transform: str = "relu") -> nn.Sequential:
    if transform == "gdn":
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), GDN(hidden, inverse=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            *[ResBlock(hidden) for _ in range(res_blocks)], GDN(hidden, inverse=True),
            nn.ConvTranspose2d(hidden, hidden, 5, stride=2, padding=2, output_padding=1),
            GDN(hidden, inverse=True),
            nn.ConvTranspose2d(hidden, c_out, 5, stride=2, padding=2, output_padding=1))
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1),
        *[ResBlock(hidden) for _ in range(res_blocks)], nn.ReLU(),
        nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),
        # Linear output (clamped to [0, 1] only in the exported graph): a sigmoid here
        # saturates early on MNIST's black background and training stalls.
        nn.ConvTranspose2d(hidden, c_out, 4, stride=2, padding=1))


class _ToFlat(nn.Module):
    """(N, ch, h, w) trunk features -> ReLU -> linear -> (N, c_out, 1, 1)."""

    def __init__(self, ch: int, grid: tuple[int, int], c_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(ch * grid[0] * grid[1], c_out)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.linear(torch.relu(x).flatten(1)))[:, :, None, None]


class _FromFlat(nn.Module):
    """(N, c_in, 1, 1) latent -> linear -> (N, ch, h, w) features for the decoder trunk."""

    def __init__(self, c_in: int, ch: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.ch, self.grid = ch, grid
        self.linear = nn.Linear(c_in, ch * grid[0] * grid[1])

    def forward(self, z: Tensor) -> Tensor:
        return cast(Tensor, self.linear(z.flatten(1))).reshape(-1, self.ch, *self.grid)


def build_encoder(config: ModelConfig, c_out: int) -> nn.Sequential:
    """The family's analysis transform: images -> (N, c_out, *config.latent_grid)."""
    c = config.image_shape[0]
    if config.latent_layout == "flat":
        trunk = make_encoder(c, config.hidden, config.hidden, config.res_blocks,
                             config.transform)
        return nn.Sequential(*trunk, _ToFlat(config.hidden, config.grid, c_out))
    return make_encoder(c, config.hidden, c_out, config.res_blocks, config.transform)


def build_decoder(config: ModelConfig, c_in: int) -> nn.Sequential:
    """The family's synthesis transform: (N, c_in, *config.latent_grid) -> images."""
    c = config.image_shape[0]
    hid = config.dec_hidden
    if config.latent_layout == "flat":
        trunk = make_decoder(hid, hid, c, config.dec_res_blocks, config.transform)
        return nn.Sequential(_FromFlat(c_in, hid, config.grid), nn.ReLU(), *trunk)
    return make_decoder(c_in, hid, c, config.dec_res_blocks, config.transform)


class _FromUint8(nn.Module):
    """ONNX encoder: uint8 image -> x / 255 -> the model's encode step."""

    def __init__(self, fn: Callable[[Tensor], Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, image: Tensor) -> Tensor:
        return self.fn(image.float() / 255.0)


class _Decode(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, latent: Tensor) -> Tensor:
        return self.fn(latent)


@register_model("ae")
class AutoEncoder(LatentModel):
    """Compression autoencoder with a learned factorised entropy model.

        x -> g_a -> y -> round (train: noise for R, straight-through for D) -> y_hat -> g_s -> x_hat
                          \\-> FactorizedDensity -> likelihoods -> R = -sum log2
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.g_a = build_encoder(config, config.latent_channels)
        self.g_s = build_decoder(config, config.latent_channels)
        self.density = FactorizedDensity(config.latent_channels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.g_a(x)
        _, likelihoods = self.density(y)
        y_hat = y + (torch.round(y) - y).detach()  # straight-through rounding for the decoder
        x_hat = self.g_s(y_hat)
        bits = -torch.log2(likelihoods).flatten(1).sum(1)
        return {"x_hat": x_hat, "y": y, "y_hat": y_hat, "likelihoods": likelihoods,
                "bits": bits}

    def encode_latent(self, x: Tensor) -> Tensor:
        y: Tensor = self.g_a(x)
        return y

    def onnx_encoder(self) -> nn.Module:
        return _FromUint8(self.g_a, self)

    def onnx_decoder(self) -> nn.Module:
        return _Decode(lambda z: self.g_s(z).clamp(0.0, 1.0), self)


STAGE2_GAMMA_INIT = 1.0


class LatentVAE(nn.Module):
    """The second stage of a two-stage VAE (Dai & Wipf 2019): a small VAE over z.

        z (N, C) -> MLP -> (mu_u, logvar_u) -> u -> MLP -> z_hat;  p(z|u) = N(z_hat, gamma^2 I)
        loss = -ELBO = ||z - z_hat||^2 / (2 gamma^2) + C log gamma + KL(q(u|z) || N(0, I))

    with the same closed-form KL as the first stage and a learned scale gamma. Trained
    after the first stage on z ~ q(z|x) of the training images, it maps N(0, I) onto the
    first stage's aggregate posterior, which is not N(0, I) (the prior holes are what make
    one-stage samples look like no digit).
    """

    def __init__(self, dim: int, hidden: int, u_dim: int = 0,
                 gamma_init: float = STAGE2_GAMMA_INIT) -> None:
        super().__init__()
        # u_dim (0: dim): the noise's size. A large first-stage latent (the zoo's 12x7x7 =
        # 588 numbers, half of them inactive) needs far fewer u dims than z has.
        u_dim = u_dim or dim
        self.u_dim = u_dim
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 2 * u_dim))
        self.dec = nn.Sequential(nn.Linear(u_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, dim))
        # gamma starts at 1. Measured (issue 15): over a 16-d first stage this reaches
        # gamma ~0.45 and the best samples; over 32-d (many inactive, pure-noise dims) it
        # collapses (q(u|z) = N(0, I)), and starting at 0.1 instead encodes the noise too
        # (gamma 0.18, worse samples). Use it over a first stage with few inactive dims.
        # Over whitened (unit-variance) inputs gamma 1 is the collapsed solution itself
        # (z_hat = 0, q(u|z) = N(0, I)): export.training.sampler starts lower.
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma_init)))

    def posterior(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.enc(z).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def loss(self, z: Tensor) -> dict[str, Tensor]:
        mu, logvar = self.posterior(z)
        u = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        sq = (self.dec(u) - z).pow(2).sum(1)
        kl = gaussian_kl(mu, logvar).sum(1)
        dim = z.shape[1]
        nll = sq * torch.exp(-2 * self.log_gamma) / 2 + dim * self.log_gamma
        return {"loss": (nll + kl).mean() / dim, "kl_u": kl.mean().detach(),
                "gamma": torch.exp(self.log_gamma).detach()}


@register_model("vae")
class VariationalAutoEncoder(LatentModel):
    """Gaussian VAE: q(z|x) = N(mu, diag exp(logvar)), prior N(0, I).

        x -> g_a -> (mu, logvar) -> z = mu + eps * exp(logvar / 2) -> g_s -> x_hat
        KL(q || p) = 0.5 * sum(mu^2 + exp(logvar) - logvar - 1)      (nats per image)

    At inference the encoder's output is ``mu``; compression codes mu quantised with a
    step (see ``export.tables.histogram_tables``). With ``learned_sigma`` the likelihood's
    pixel std is a parameter (``log_sigma``) trained with the rest: the loss stays the
    negative ELBO, and sigma settles at the reconstruction RMSE.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.g_a = build_encoder(config, 2 * config.latent_channels)
        self.g_s = build_decoder(config, config.latent_channels)
        if config.learned_sigma:
            # log of the pixel std of p(x|z) = N(x_hat, sigma^2 I), learned with the ELBO
            self.log_sigma = nn.Parameter(torch.tensor(math.log(0.1)))
        # two-stage: the served latent is the second stage's u (training.train.train_stage2)
        self.stage2 = (LatentVAE(config.latent_channels, config.stage2_hidden)
                       if config.stage2_hidden else None)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.g_a(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        x_hat = self.g_s(z)
        return {"x_hat": x_hat, "mu": mu, "logvar": logvar, "z": z,
                "kl": gaussian_kl(mu, logvar).flatten(1).sum(1)}

    def encode_latent(self, x: Tensor) -> Tensor:
        """The served latent: mu of q(z|x), or with a second stage mu of q(u|mu_z)."""
        mu = self.posterior(x)[0]
        if self.stage2 is None:
            return mu
        return self.stage2.posterior(mu.flatten(1))[0][:, :, None, None]

    def decode_latent(self, latent: Tensor) -> Tensor:
        """The served latent (z, or u with a second stage) -> images (unclamped)."""
        if self.stage2 is None:
            return cast(Tensor, self.g_s(latent))
        z = cast(Tensor, self.stage2.dec(latent.flatten(1)))
        return cast(Tensor, self.g_s(z[:, :, None, None]))

    def onnx_encoder(self) -> nn.Module:
        return _FromUint8(self.encode_latent, self)

    def onnx_decoder(self) -> nn.Module:
        return _Decode(lambda z: self.decode_latent(z).clamp(0.0, 1.0), self)


@register_model("vqvae")
class VQVAE(LatentModel):
    """VQ-VAE with an EMA codebook (see ``export.quantizer``).

        x -> g_a -> z_e (N, D, h, w) -> nearest code -> indices (N, h, w)
                                     -> z_q (straight-through) -> g_s -> x_hat
        loss = D(x, x_hat) + beta * ||z_e - sg[e]||^2    (codebook: EMA, no loss term)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config.image_shape[0]
        self.g_a = make_encoder(c, config.hidden, config.code_dim, config.res_blocks,
                                config.transform)
        self.g_s = make_decoder(config.code_dim, config.dec_hidden, c, config.dec_res_blocks,
                                config.transform)
        self.vq = VectorQuantizer(config.num_codes, config.code_dim, beta=config.beta,
                                  decay=config.ema_decay, dead_threshold=config.dead_threshold)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z_e = self.g_a(x)
        q = self.vq(z_e)
        return {"x_hat": self.g_s(q["z_q"]), "z_e": z_e, **q}

    def encode_indices(self, x: Tensor) -> Tensor:
        """Float images -> indices (N, h, w) int64."""
        z_e = self.g_a(x)
        n, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        return self.vq.codebook.nearest(flat).reshape(n, h, w)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Indices (N, h, w) -> images in [0, 1]."""
        z_q = self.vq.codebook.lookup(indices).permute(0, 3, 1, 2)
        x_hat: Tensor = self.g_s(z_q)
        return x_hat.clamp(0.0, 1.0)

    def onnx_encoder(self) -> nn.Module:
        return _FromUint8(self.encode_indices, self)

    def onnx_decoder(self) -> nn.Module:
        return _Decode(self.decode_indices, self)
