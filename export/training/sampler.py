"""A learned sampling prior for an exported vae: a second-stage VAE and a mixture over u.

Dai & Wipf (2019): a first-stage vae's aggregate posterior q(z) is not N(0, I), so
decoding N(0, I) draws gives blobs; a small second VAE trained on the first stage's
latents of the training images maps its own noise onto q(z)::

    z (N, D = C*h*w) -> MLP -> q(u|z) = N(mu_u, diag var_u), u of d << D numbers
    u -> MLP -> z_hat;  p(z|u) = N(z_hat, gamma^2 I), gamma learned
    loss = -ELBO = ||z - z_hat||^2 / (2 gamma^2) + D log gamma + KL(q(u|z) || N(0, I))

(``export.nets.models.LatentVAE``, the same closed-form KL as the first stage). The
second stage's own aggregate posterior is still not N(0, I) after a few CPU minutes, so
the sampler draws u from a diagonal Gaussian mixture fitted afterwards to the training
latents' mu_u (an ex-post density, Ghosh et al. 2020), then decodes it::

    noise (N, 2 + d) ~ N(0, I):  c = the component whose cumulative weight interval holds
    atan(n0 / n1) / pi + 1/2 (uniform on (0, 1), and unchanged when the temperature
    scales the noise);  u = means[c] + stds[c] * n[2:];  latent = MLP(u)

Measured on mnist-vae (docs/model-experiments.md): decoding N(0, I) u gave 54% confident
digits, the 50-component mixture 76% and more (the table has the final figures). The
latents are the posterior means that the vae's ``encoder.onnx`` gives (run by
onnxruntime: no first-stage checkpoint is needed); the vae's compression is untouched.
A fixed-size ae (the zoo's mnist-ae-q0..q10 ladder) gets one the same way: its
``encoder.onnx`` gives the continuous latent before rounding, the sampler learns that, and
the runtime rounds the sampler's output as it rounds an encoder's (replacing the fitted
"gmm" density, whose draws are rounded the same way).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from latentserve.errors import InvalidInput
from latentserve.export.nets.models import LatentVAE
from latentserve.export.publish.tables import fit_diag_gmm
from latentserve.export.training.train import _batches, _run_steps, seed_everything

METHOD = ("two-stage vae (Dai & Wipf 2019) on the encoder's posterior means, u drawn from "
          "a diagonal Gaussian mixture fitted to the training latents' mu_u")
# An ae's second stage models its encoder's continuous latent before rounding (what the
# runtime rounds onto the tables' support and decodes, for a sample as for a code).
METHOD_AE = ("second-stage vae (as Dai & Wipf 2019) on the ae encoder's continuous latents "
             "before rounding, u drawn from a diagonal Gaussian mixture fitted to the "
             "training latents' mu_u; the runtime rounds the output")


def method_for(family: str) -> str:
    """The manifest's ``sampling.method`` for a second stage over a ``family`` model."""
    return METHOD_AE if family == "ae" else METHOD


@dataclass(frozen=True)
class SamplerConfig:
    """The second stage's size and training schedule."""

    u_dim: int = 16             # d, the second stage's latent (the noise has d + 2 numbers)
    hidden: int = 256
    mixture: int = 200          # components of the ex-post mixture over u (0: u ~ N(0, I))
    gamma_init: float = 1.0
    # Round the sampler's weights to float16 values once trained: sampler.onnx then
    # stores them as float16 (export.publish.sampler.store_exact_halves), half the bytes
    # (the zoo's size budget), computing in float32 as before.
    half_weights: bool = True
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.u_dim, self.hidden, self.steps, self.batch_size) < 1 or self.mixture < 0:
            raise InvalidInput("u_dim, hidden, steps and batch_size must be >= 1, mixture "
                               ">= 0")
        if not (self.lr > 0 and self.gamma_init > 0):
            raise InvalidInput(f"lr and gamma_init must be > 0, got {self.lr}, "
                               f"{self.gamma_init}")


def encoder_latents(encoder_onnx: str | Path, images: np.ndarray,
                    batch: int = 500) -> np.ndarray:
    """uint8 images -> the encoder's float32 latents (N, C, h, w), one onnxruntime thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(encoder_onnx), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    out = [sess.run(None, {"image": np.ascontiguousarray(images[i:i + batch])})[0]
           for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float32)


class TwoStageSampler(nn.Module):
    """noise (N, noise_dim) -> u (N(0, I), or the mixture) -> the second stage's decoder
    -> flat latent (N, D). ``noise_dim`` is d, or d + 2 with a mixture."""

    def __init__(self, stage2: LatentVAE, mixture: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.stage2 = stage2
        self.u_dim = stage2.u_dim
        self.has_mixture = mixture is not None
        if mixture is not None:
            w = torch.as_tensor(np.asarray(mixture["weights"], np.float64))
            cdf = torch.cumsum(w / w.sum(), 0)
            self.register_buffer("cdf", cdf[:-1].float())  # K - 1 inner boundaries
            self.register_buffer("means", torch.as_tensor(np.asarray(mixture["means"]),
                                                          dtype=torch.float32))
            self.register_buffer("stds", torch.as_tensor(np.asarray(mixture["stds"]),
                                                         dtype=torch.float32))

    @property
    def noise_dim(self) -> int:
        return self.u_dim + (2 if self.has_mixture else 0)

    def forward(self, noise: Tensor) -> Tensor:
        u = noise
        if self.has_mixture:
            # n0 / n1 is standard Cauchy: atan(.) / pi + 1/2 is uniform, and a temperature
            # (which scales all of the noise) leaves it, so T changes only the spread.
            uniform = torch.atan(noise[:, 0] / noise[:, 1]) / math.pi + 0.5
            cdf, means, stds = (self.get_buffer(n) for n in ("cdf", "means", "stds"))
            c = (uniform[:, None] > cdf[None, :]).sum(1)
            u = means[c] + stds[c] * noise[:, 2:]
        out: Tensor = self.stage2.dec(u)
        return out


def train_sampler(latents: np.ndarray, config: SamplerConfig
                  ) -> tuple[TwoStageSampler, dict[str, Any]]:
    """Fit the second stage to ``latents`` (N, ...) float, then the mixture over its u;
    returns the sampler (eval mode: noise (N, sampler.noise_dim) -> flat latent (N, D))
    and its provenance (config, seconds, final loss terms)."""
    if latents.ndim < 2 or len(latents) < 2 or not np.all(np.isfinite(latents)):
        raise InvalidInput(f"latents must be finite floats (N >= 2, ...), got "
                           f"{latents.dtype} {tuple(latents.shape)}")
    gen = seed_everything(config.seed)
    flat = torch.as_tensor(np.ascontiguousarray(latents, np.float32).reshape(len(latents), -1))
    z = flat
    model = LatentVAE(z.shape[1], config.hidden, config.u_dim, config.gamma_init)
    model.train()
    bs = min(config.batch_size, len(z))
    started = time.monotonic()

    def step(idx: Tensor) -> dict[str, Tensor]:
        return model.loss(z[idx])

    history = _run_steps(list(model.parameters()), config.steps, config.lr, step,
                         _batches(len(z), bs, config.steps, gen), config.progress, "sampler")
    model.eval()
    if config.half_weights:
        with torch.no_grad():
            for param in model.dec.parameters():
                param.copy_(param.half().float())
    mixture = None
    if config.mixture:
        with torch.no_grad():
            mu_u = model.posterior(z)[0].double().numpy()
        mixture = fit_diag_gmm(mu_u, config.mixture, seed=config.seed)
    provenance = {"method": METHOD, "config": {k: v for k, v in asdict(config).items()
                                               if k != "progress"},
                  "num_latents": int(len(z)),
                  "seconds": round(time.monotonic() - started, 1),
                  "device": "cpu", "threads": torch.get_num_threads(),
                  "final": {k: round(float(v), 5) for k, v in history[-1].items()}}
    sampler = TwoStageSampler(model, mixture).eval()
    provenance["noise_dim"] = sampler.noise_dim
    return sampler, provenance
