"""Serve your own model, end to end: a colour 3 x 64 x 64 autoencoder that is not in the zoo.

    python examples/custom_model.py --repo /tmp/my-models --steps 300

1. Makes synthetic colour images (discs and boxes on gradients; nothing is downloaded).
2. Defines a model of its own: a three-stride encoder to an 8 x 8 grid of 8 channels, a
   decoder with sub-pixel (PixelShuffle) upsampling, and latentserve's learned
   factorised density as the entropy model; trains it for a few steps (rate + distortion).
3. Exports it with ``latentserve.export.publish.custom.export_model`` (contract checks, ONNX,
   parity, integer tables, a repository version with digests).
4. Starts a real gRPC server on 127.0.0.1 (port 0), compresses the held-out images over
   gRPC, reconstructs them from the codes, and prints bytes per image and PSNR.
Walkthrough: docs/your-own-model.md.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentserve.export.nets.entropy_model import FactorizedDensity
from latentserve.export.publish.custom import Factorized, export_model

SHAPE = (3, 64, 64)
LATENT = 8


def synthetic_images(n: int, *, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3, 64, 64): a colour gradient with a disc and a box of random colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    out = np.empty((n, *SHAPE), np.uint8)
    for i in range(n):
        a, b = rng.random((2, 3, 1, 1))
        img = a * xx[None] + b * (1 - yy[None])
        cy, cx, r = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(6, 16)
        disc = (yy * 63 - cy) ** 2 + (xx * 63 - cx) ** 2 < r ** 2
        img = np.where(disc[None], rng.random((3, 1, 1)), img)
        y0, x0 = rng.integers(0, 48, 2)
        h, w = rng.integers(8, 24, 2)
        img[:, y0:y0 + h, x0:x0 + w] = rng.random((3, 1, 1))
        out[i] = np.clip(np.rint(img / max(1.0, img.max()) * 255), 0, 255).astype(np.uint8)
    return out


class Encoder(nn.Module):
    """x (N, 3, 64, 64) in [0, 1] -> conv s2 x3 (GELU) -> 1x1 -> latent (N, 8, 8, 8)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, hidden, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden, LATENT, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Decoder(nn.Module):
    """latent (N, 8, 8, 8) -> [conv -> PixelShuffle(2)] x3 -> image (N, 3, 64, 64)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(LATENT, hidden, 3, padding=1), nn.GELU()]
        for _ in range(3):
            layers += [nn.Conv2d(hidden, 4 * hidden, 3, padding=1), nn.PixelShuffle(2), nn.GELU()]
        layers.append(nn.Conv2d(hidden, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.body(z))


def train(images: np.ndarray, *, steps: int, lmbda: float = 0.01, seed: int = 0,
          ) -> tuple[Encoder, Decoder, FactorizedDensity]:
    """A few Adam steps on lambda * 255^2 * MSE + bits per pixel (noisy latent for the rate)."""
    torch.manual_seed(seed)
    enc, dec, density = Encoder(), Decoder(), FactorizedDensity(LATENT)
    params = [*enc.parameters(), *dec.parameters(), *density.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    data = torch.as_tensor(images).float() / 255.0
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (16,), generator=gen)]
        y = enc(x)
        _, likelihoods = density(y)
        y_hat = y + (torch.round(y) - y).detach()
        x_hat = dec(y_hat)
        bpp = -torch.log2(likelihoods).sum() / (len(x) * 64 * 64)
        loss = lmbda * 255.0 ** 2 * F.mse_loss(x_hat, x) + bpp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = -10 * math.log10(max(F.mse_loss(x_hat, x).item(), 1e-10))
            print(f"step {step}: loss {loss.item():.3f}, {bpp.item():.3f} bits/pixel, "
                  f"PSNR {psnr:.1f} dB")
    return enc, dec, density


def serve_round_trip(repo: Path, ref: str, images: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Compress and reconstruct ``images`` over gRPC against a server on 127.0.0.1:0."""
    from latentserve.service.client.inference import LatentServeClient
    from latentserve.service.jobs.settings import JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig

    config = ServiceConfig(jobs=JobSettings.off(),
                           host="127.0.0.1", port=0, metrics_port=None, models=repo,
                           intra_op_threads=1, compute_workers=1, grpc_threads=8)
    server, _ = create_server(config)
    server.start()
    try:
        with LatentServeClient(server.target, timeout=60) as client:
            codes = client.compress(images, model=ref)
            return codes, client.reconstruct(codes)
    finally:
        server.stop(0).wait(30)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the example; returns the figures it prints (bytes per image, PSNR)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path("models-custom"))
    p.add_argument("--name", default="shapes-ae")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    images = synthetic_images(args.images + 32)
    train_images, held_out = images[:args.images], images[args.images:]
    enc, dec, density = train(train_images, steps=args.steps)
    folder = export_model(family="ae", encoder=enc, decoder=dec, images=train_images,
                          latent_model=Factorized(density=density), repo=args.repo,
                          name=args.name, version=args.version, val_images=held_out,
                          overwrite=True)
    print(f"exported {args.name}:{args.version} to {folder}")

    codes, recon = serve_round_trip(args.repo, f"{args.name}:{args.version}", held_out)
    mse = ((recon.astype(np.float64) - held_out) ** 2).reshape(len(held_out), -1).mean(1)
    figures = {"images": float(len(held_out)),
               "bytes_per_image": float(np.mean([len(c) for c in codes])),
               "psnr_db": float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))),
               "raw_bytes_per_image": float(np.prod(SHAPE))}
    print(f"over gRPC: {len(codes)} images of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, "
          f"{figures['bytes_per_image']:.1f} bytes/image (raw {int(np.prod(SHAPE))}), "
          f"PSNR {figures['psnr_db']:.2f} dB")
    return figures


if __name__ == "__main__":
    main()
