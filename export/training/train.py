"""Training loops for the zoo's families and the VQ-VAE's prior; checkpoints that rebuild.

Losses (pixels in [0, 1], per image, averaged over the batch):

- ae:    lambda * 255^2 * MSE + bits per pixel  (rate from the factorised density, noisy y)
- vae:   (sum (x - x_hat)^2 / (2 sigma^2) + KL) / pixels   (Gaussian likelihood, sigma fixed,
         or learned: + pixels * log sigma, the exact negative ELBO up to a constant)
- vqvae: MSE + beta * commitment                             (codebook by EMA)
- prior: cross-entropy of the training index grids under the PixelCNN (nats per index)

A checkpoint is a dict: ``model_config``, ``train_config``, ``state_dict``, ``data``
(source, digest, split), ``history`` and, for vqvae, ``prior_config`` + ``prior_state``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentserve.errors import InvalidInput
from latentserve.export.nets.models import (
    VQVAE,
    LatentModel,
    ModelConfig,
    VariationalAutoEncoder,
    build_model,
)
from latentserve.export.nets.prior import PixelCNNPrior, PriorConfig
from latentserve.export.training.data import Dataset

CHECKPOINT_FORMAT = "latentserve-checkpoint-1"


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (stored in the checkpoint beside the model config)."""

    lmbda: float = 0.004        # ae rate-distortion trade-off
    vae_sigma: float = 0.1      # vae: std of the Gaussian likelihood of a pixel
    epochs: int = 10
    steps: int | None = None    # overrides epochs when set (tests)
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    prior_epochs: int = 20
    prior_steps: int | None = None
    prior_lr: float = 1e-3
    prior_shifts: int = 0       # prior data: also encode images shifted by up to this many px
    decoder_epochs: int = 0     # vqvae: then train the decoder alone on the frozen codes
    decoder_steps: int | None = None
    stage2_steps: int = 0       # vae with a second stage: its training steps (0: 4000)
    stage2_lr: float = 1e-3     # ... and its peak learning rate (cosine decay like the rest)
    progress: bool = True


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def to_float(images: np.ndarray | Tensor) -> Tensor:
    t = torch.as_tensor(images)
    return t.float() / 255.0


def psnr_db(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-image PSNR on 0-255 values of uint8-rounded reconstructions (MSE floored at 1e-10)."""
    a = (x * 255).round()
    b = (x_hat.clamp(0, 1) * 255).round()
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


def loss_terms(family: str, model: LatentModel, x: Tensor,
               cfg: TrainConfig) -> dict[str, Tensor]:
    """The training loss and what the progress bar shows: loss, rate (bits/image), psnr."""
    out = model(x)
    mse = F.mse_loss(out["x_hat"], x)
    pixels = x[0].numel()
    if family == "ae":
        bits = out["bits"].mean()
        loss = cfg.lmbda * 255.0**2 * mse + bits / (x.shape[2] * x.shape[3])
        rate = bits
    elif family == "vae":
        sq = (out["x_hat"] - x).pow(2).flatten(1).sum(1)
        kl = out["kl"]
        log_sigma = getattr(model, "log_sigma", None)
        if log_sigma is None:
            loss = (sq / (2 * cfg.vae_sigma**2) + kl).mean() / pixels
        else:
            # -ELBO with a learned pixel std (+ the constant 0.5 log 2 pi per pixel, dropped)
            nll = sq * torch.exp(-2 * log_sigma) / 2 + pixels * log_sigma
            loss = (nll + kl).mean() / pixels
        rate = kl.mean() / math.log(2)
    else:
        loss = mse + out["commitment"]
        rate = torch.log2(out["perplexity"]) * out["indices"][0].numel()
    return {"loss": loss, "rate": rate.detach(), "mse": mse.detach(),
            "psnr": psnr_db(x, out["x_hat"].detach()).mean()}


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    """``steps`` index batches from reshuffled epochs."""
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i:i + batch_size]
            done += 1
            if done >= steps:
                return


def _run_steps(params: list[nn.Parameter], steps: int, lr: float,
               step_fn: Callable[[Tensor], dict[str, Tensor]], batches: Iterable[Tensor],
               progress: bool, desc: str) -> list[dict[str, float]]:
    """Adam with cosine decay; ``step_fn(batch) -> dict`` with a ``loss`` to minimise."""
    from tqdm import tqdm

    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.97 + 0.03)
    history: list[dict[str, float]] = []
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, mininterval=2.0)
    for step, batch in enumerate(bar):
        terms = step_fn(batch)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        sched.step()
        row = {k: float(v.detach()) for k, v in terms.items()}
        history.append(row)
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()})
    return history


def init_record(init: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """What a fine-tuned checkpoint keeps of the one it started from (provenance)."""
    earlier = init.get("init") or {}
    return {"path": str(path), "steps": len(init.get("history", [])),
            "total_steps": int(earlier.get("total_steps", 0)) + len(init.get("history", [])),
            "lmbda": init["train_config"].get("lmbda"), "seed": init["train_config"].get("seed")}


def check_init(model_config: ModelConfig, init: dict[str, Any]) -> None:
    """Refuse an ``init`` checkpoint whose model is not ``model_config`` (names the fields)."""
    theirs = init["model_config"]
    ours = model_config.to_dict()
    diff = sorted(k for k in ours if ours[k] != theirs.get(k))
    if diff:
        raise InvalidInput("the --init checkpoint's model differs in "
                           + ", ".join(f"{k} ({theirs.get(k)!r}, here {ours[k]!r})" for k in diff))
    if init.get("prior_config") or model_config.family == "vqvae":
        raise InvalidInput("--init fine-tunes an ae or vae; a vqvae's prior is retrained by "
                           "--family prior")


def train_model(model_config: ModelConfig, train_config: TrainConfig, data: Dataset, *,
                prior_config: PriorConfig | None = None,
                init: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a model (and a vqvae's prior) on ``data.train``; returns the checkpoint dict.

    ``init`` (a checkpoint dict of the same model config) starts from its weights instead
    of fresh ones: a ladder's rungs are fine-tuned from one base at other lambdas. The
    result records it under ``init`` (set by the caller, see ``init_record``)."""
    if data.image_shape != model_config.image_shape:
        raise InvalidInput(f"data images are {data.image_shape}, the model takes "
                           f"{model_config.image_shape}")
    gen = seed_everything(train_config.seed)
    model = build_model(model_config)
    if init is not None:
        check_init(model_config, init)
        model.load_state_dict(init["state_dict"])
    x_all = torch.as_tensor(data.train)
    n = len(x_all)
    bs = min(train_config.batch_size, n)
    steps = train_config.steps or train_config.epochs * max(1, n // bs)
    model.train()
    history = _run_steps(
        list(model.parameters()), steps, train_config.lr,
        lambda idx: loss_terms(model_config.family, model, to_float(x_all[idx]), train_config),
        _batches(n, bs, steps, gen), train_config.progress, model_config.family)
    model.eval()
    if model_config.family == "vqvae" and (train_config.decoder_epochs or
                                           train_config.decoder_steps):
        history += train_decoder(cast(VQVAE, model), train_config, data, gen)
    if getattr(model, "stage2", None) is not None:
        history += train_stage2(model, train_config, data, gen)
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config.to_dict(),
        "train_config": asdict(train_config),
        "state_dict": model.state_dict(),
        "data": {"source": data.source, "sha256": data.sha256, "num_train": len(data.train),
                 "num_val": len(data.val)},
        "history": history,
        "init": None,
        "prior_config": None, "prior_state": None, "prior_history": None,
    }
    if model_config.family == "vqvae":
        prior, prior_history = train_prior(cast(VQVAE, model), train_config, data, gen,
                                           prior_config)
        ckpt.update(prior_config=prior.config.to_dict(), prior_state=prior.state_dict(),
                    prior_history=prior_history)
    return ckpt


@torch.no_grad()
def encode_indices(model: VQVAE, images: np.ndarray, batch: int = 500) -> Tensor:
    """uint8 images -> index grids (N, h, w) under a trained vqvae (eval mode)."""
    model.eval()
    out = [model.encode_indices(to_float(images[i:i + batch]))
           for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def shifted(images: np.ndarray, max_shift: int) -> np.ndarray:
    """The images and their copies translated by up to ``max_shift`` px (zero fill)."""
    if max_shift <= 0:
        return images
    out = []
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            s = np.roll(images, (dy, dx), axis=(2, 3))
            if dy > 0:
                s[:, :, :dy] = 0
            elif dy < 0:
                s[:, :, dy:] = 0
            if dx > 0:
                s[:, :, :, :dx] = 0
            elif dx < 0:
                s[:, :, :, dx:] = 0
            out.append(s)
    return np.concatenate(out)


def train_prior(vqvae: VQVAE, cfg: TrainConfig, data: Dataset,
                gen: torch.Generator, prior_config: PriorConfig | None = None
                ) -> tuple[PixelCNNPrior, list[dict[str, float]]]:
    """Fit a PixelCNN to the training images' index grids (optionally of shifted copies)."""
    mc = vqvae.config
    pc = prior_config or PriorConfig(num_codes=mc.num_codes, grid=mc.grid)
    codes = encode_indices(vqvae, shifted(data.train, cfg.prior_shifts))
    prior = PixelCNNPrior(pc)
    prior.train()
    n = len(codes)
    bs = min(cfg.batch_size, n)
    steps = cfg.prior_steps or cfg.prior_epochs * max(1, n // bs)

    def step(idx: Tensor) -> dict[str, Tensor]:
        loss = prior.loss(codes[idx])
        return {"loss": loss, "bits_per_index": loss.detach() / math.log(2)}

    history = _run_steps(list(prior.parameters()), steps, cfg.prior_lr, step,
                         _batches(n, bs, steps, gen), cfg.progress, "prior")
    prior.eval()
    return prior, history


def train_stage2(vae: LatentModel, cfg: TrainConfig, data: Dataset,
                 gen: torch.Generator) -> list[dict[str, float]]:
    """Fit a two-stage VAE's second stage to z ~ q(z|x) of the training images.

    The first stage is frozen; each step draws fresh z for a batch from the stored
    posterior means and variances (Dai & Wipf 2019 train on samples, not on the means).
    """
    model = cast(VariationalAutoEncoder, vae)
    stage2 = model.stage2
    assert stage2 is not None  # train() calls this only for a model with a second stage
    model.eval()
    with torch.no_grad():
        parts = [model.posterior(to_float(data.train[i:i + 500]))
                 for i in range(0, len(data.train), 500)]
    mu = torch.cat([p[0] for p in parts]).flatten(1)
    std = torch.exp(0.5 * torch.cat([p[1] for p in parts])).flatten(1)
    stage2.train()
    n = len(mu)
    bs = min(cfg.batch_size, n)
    steps = cfg.stage2_steps or 4000

    def step(idx: Tensor) -> dict[str, Tensor]:
        z = mu[idx] + std[idx] * torch.randn(len(idx), mu.shape[1], generator=gen)
        return stage2.loss(z)

    history = _run_steps(list(stage2.parameters()), steps, cfg.stage2_lr, step,
                         _batches(n, bs, steps, gen), cfg.progress, "stage2")
    vae.eval()
    return history


def train_decoder(vqvae: VQVAE, cfg: TrainConfig, data: Dataset,
                  gen: torch.Generator) -> list[dict[str, float]]:
    """Train a vqvae's decoder alone on the frozen training codes (encoder and codebook fixed).

    The codes, hence the prior and the bits, do not change; only the reconstruction does.
    With ``prior_shifts`` the shifted copies (and their codes) are used as extra pairs.
    """
    images = shifted(data.train, cfg.prior_shifts)
    codes = encode_indices(vqvae, images)
    x_all = torch.as_tensor(images)
    n = len(codes)
    bs = min(cfg.batch_size, n)
    steps = cfg.decoder_steps or cfg.decoder_epochs * max(1, n // bs)
    g_s = vqvae.g_s
    book = vqvae.vq.codebook
    g_s.train()

    def step(idx: Tensor) -> dict[str, Tensor]:
        x = to_float(x_all[idx])
        with torch.no_grad():
            z_q = book.lookup(codes[idx]).permute(0, 3, 1, 2)
        x_hat = g_s(z_q)
        loss = F.mse_loss(x_hat, x)
        return {"loss": loss, "psnr": psnr_db(x, x_hat.detach()).mean()}

    history = _run_steps(list(g_s.parameters()), steps, cfg.lr, step,
                         _batches(n, bs, steps, gen), cfg.progress, "decoder")
    vqvae.eval()
    return history


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def load_checkpoint(path: str | Path
                    ) -> tuple[dict[str, Any], LatentModel, PixelCNNPrior | None]:
    """Read a checkpoint and rebuild its model (eval mode) and prior, if any."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{path} is not a latentserve checkpoint ({CHECKPOINT_FORMAT})")
    return (ckpt, *rebuild(ckpt))


def rebuild(ckpt: dict[str, Any]) -> tuple[LatentModel, PixelCNNPrior | None]:
    """Model (and prior) from a checkpoint dict, in eval mode."""
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    prior = None
    if ckpt.get("prior_config"):
        prior = PixelCNNPrior(PriorConfig.from_dict(ckpt["prior_config"]))
        prior.load_state_dict(ckpt["prior_state"])
        prior.eval()
    return model, prior

