"""A learned sampling prior for an exported vae: the second stage of a two-stage VAE.

Dai & Wipf (2019): a first-stage vae's aggregate posterior q(z) is not N(0, I), so
decoding N(0, I) draws gives blobs; a small second VAE trained on the first stage's
latents of the training images maps its own N(0, I) onto q(z)::

    z (N, D = C*h*w) -> MLP -> q(u|z) = N(mu_u, diag var_u), u of d << D numbers
    u -> MLP -> z_hat;  p(z|u) = N(z_hat, gamma^2 I), gamma learned
    loss = -ELBO = ||z - z_hat||^2 / (2 gamma^2) + D log gamma + KL(q(u|z) || N(0, I))

(``export.nets.models.LatentVAE``, the same closed-form KL as the first stage). The
latents are the posterior means that the vae's ``encoder.onnx`` gives (run by
onnxruntime: no first-stage checkpoint is needed); the sampler is the decoder MLP,
u -> z_hat, with the vae's compression untouched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentserve.errors import InvalidInput
from latentserve.export.nets.models import LatentVAE
from latentserve.export.training.train import _batches, _run_steps, seed_everything

METHOD = "two-stage vae (Dai & Wipf 2019) on the encoder's posterior means"


@dataclass(frozen=True)
class SamplerConfig:
    """The second stage's size and training schedule."""

    noise_dim: int = 64
    hidden: int = 1024
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.noise_dim < 1 or self.hidden < 1 or self.steps < 1 or self.batch_size < 1:
            raise InvalidInput("noise_dim, hidden, steps and batch_size must be >= 1")
        if not self.lr > 0:
            raise InvalidInput(f"lr must be > 0, got {self.lr}")


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


def train_sampler(latents: np.ndarray, config: SamplerConfig
                  ) -> tuple[LatentVAE, dict[str, Any]]:
    """Fit the second stage to ``latents`` (N, ...) float; returns it (eval mode) and its
    provenance (config, steps, seconds, final loss terms)."""
    if latents.ndim < 2 or len(latents) < 2 or not np.all(np.isfinite(latents)):
        raise InvalidInput(f"latents must be finite floats (N >= 2, ...), got "
                           f"{latents.dtype} {tuple(latents.shape)}")
    gen = seed_everything(config.seed)
    z = torch.as_tensor(np.ascontiguousarray(latents, np.float32).reshape(len(latents), -1))
    model = LatentVAE(z.shape[1], config.hidden, config.noise_dim)
    model.train()
    bs = min(config.batch_size, len(z))
    started = time.monotonic()

    def step(idx: Tensor) -> dict[str, Tensor]:
        return model.loss(z[idx])

    history = _run_steps(list(model.parameters()), config.steps, config.lr, step,
                         _batches(len(z), bs, config.steps, gen), config.progress, "sampler")
    model.eval()
    provenance = {"method": METHOD, "config": {k: v for k, v in asdict(config).items()
                                               if k != "progress"},
                  "num_latents": int(len(z)), "seconds": round(time.monotonic() - started, 1),
                  "device": "cpu", "threads": torch.get_num_threads(),
                  "final": {k: round(float(v), 5) for k, v in history[-1].items()}}
    return model, provenance
