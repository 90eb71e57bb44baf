"""The photo codec: a factorized-prior autoencoder with GDN transforms, stride 16.

The architecture of CompressAI's ``bmshj2018-factorized`` (Balle, Minnen, Singh, Hwang,
Johnston 2018), narrower (N, M below) so that a ladder of qualities ships in a few MB:

    g_a: x -> conv5 s2 -> GDN -> conv5 s2 -> GDN -> conv5 s2 -> GDN -> conv5 s2 -> y (M, H/16, W/16)
    g_s: y -> deconv5 s2 -> IGDN -> deconv5 s2 -> IGDN -> deconv5 s2 -> IGDN -> deconv5 s2 -> x_hat

Fully convolutional: any H, W that are multiples of ``STRIDE`` (the runtime pads other
sizes, worker/runtime/pipeline.py). Rate: ``FactorizedDensity`` per latent channel, noise
in training, rounding (straight-through) for the decoder, as the zoo's ``ae``; the
exported model is family ``ae`` with code kind ``factorized`` and the manifest's
``image.size: "any"`` (docs/code-format.md, format version 2).

``PhotoConfig.hyper > 0`` adds bmshj2018-hyperprior's scale hyperprior with that many
hyper channels: z = h_a(|y|) at 1/4 of y's grid under a factorized density, and one
Gaussian scale per element of y from h_s(z_hat). h_s is built from the layers the
runtime evaluates in exact integer arithmetic (worker/codec/intnet.py), so the encoder
and every decoder pick the same tables on any machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentserve.export.nets.entropy_model import FactorizedDensity
from latentserve.export.nets.gdn import GDN
from latentserve.export.nets.hyperprior import gaussian_likelihood

STRIDE = 16


@dataclass(frozen=True)
class PhotoConfig:
    """What fixes the photo codec's shapes (stored in its checkpoint)."""

    channels: int = 3
    n: int = 48   # hidden channels (CompressAI: 128)
    m: int = 96   # latent channels (CompressAI: 192)
    hyper: int = 0  # > 0: a scale hyperprior with this many channels of z (CompressAI: n)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 5, stride=2, padding=2)


def _deconv(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1)


class PhotoCodec(nn.Module):
    """bmshj2018-factorized at width (n, m). ``forward`` returns x_hat, y, likelihoods, bits."""

    stride = STRIDE

    def __init__(self, config: PhotoConfig = PhotoConfig()) -> None:
        super().__init__()
        self.config = config
        c, n, m = config.channels, config.n, config.m
        self.g_a = nn.Sequential(_conv(c, n), GDN(n), _conv(n, n), GDN(n), _conv(n, n), GDN(n),
                                 _conv(n, m))
        self.g_s = nn.Sequential(_deconv(m, n), GDN(n, inverse=True), _deconv(n, n),
                                 GDN(n, inverse=True), _deconv(n, n), GDN(n, inverse=True),
                                 _deconv(n, c))
        k = config.hyper
        if k:
            # CompressAI's h_a / h_s at width k; z at 1/64 of the image.
            self.h_a = nn.Sequential(nn.Conv2d(m, k, 3, padding=1), nn.ReLU(),
                                     _conv(k, k), nn.ReLU(), _conv(k, k))
            self.h_s = nn.Sequential(_deconv(k, k), nn.ReLU(), _deconv(k, k), nn.ReLU(),
                                     nn.Conv2d(k, m, 3, padding=1))
        self.density = FactorizedDensity(k or m)

    def scales(self, z_hat: Tensor) -> Tensor:
        """The Gaussian scale of every element of y, from the (rounded or noisy) z."""
        return F.softplus(self.h_s(z_hat))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.g_a(x)
        y_hat = y + (torch.round(y) - y).detach()
        x_hat = self.g_s(y_hat)
        if not self.config.hyper:
            _, likelihoods = self.density(y)
            bits = -torch.log2(likelihoods).flatten(1).sum(1)
            return {"x_hat": x_hat, "y": y, "likelihoods": likelihoods, "bits": bits}
        z_tilde, z_lik = self.density(self.h_a(y.abs()))
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else y_hat
        y_lik = gaussian_likelihood(y_tilde, self.scales(z_tilde))
        bits_y = -torch.log2(y_lik).flatten(1).sum(1)
        bits_z = -torch.log2(z_lik).flatten(1).sum(1)
        return {"x_hat": x_hat, "y": y, "likelihoods": y_lik, "bits": bits_y + bits_z,
                "bits_z": bits_z}

    def onnx_encoder(self) -> nn.Module:
        return _Encoder(self)

    def onnx_decoder(self) -> nn.Module:
        return _Decoder(self)


class _Encoder(nn.Module):
    """uint8 (N, C, H, W), H and W multiples of 16 -> latent float32 (N, M, H/16, W/16)."""

    def __init__(self, net: PhotoCodec) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        y: Tensor = self.net.g_a(image.float() / 255.0)
        return y


class _Decoder(nn.Module):
    """latent (N, M, h, w) -> image float32 (N, C, 16h, 16w) in [0, 1]."""

    def __init__(self, net: PhotoCodec) -> None:
        super().__init__()
        self.net = net

    def forward(self, latent: Tensor) -> Tensor:
        x: Tensor = self.net.g_s(latent)
        return x.clamp(0.0, 1.0)
