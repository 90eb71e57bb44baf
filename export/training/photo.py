"""Training the photo codec (export/nets/photo.py) on folders of colour photos.

Data: every image of the ``--data`` folders (bsds500 ``train/`` and ``val/``), decoded once
into memory; each step draws ``batch`` random ``crop`` x ``crop`` crops (random image,
position, horizontal flip). Loss, per image: ``lambda * 255^2 * MSE + bits per pixel``
(CompressAI's convention, so its lambdas compare). Validation (progress only, never a
training signal): the centre 256x256 crops of the ``--val`` folder (bsds500 ``test/``).

A ladder: ``--base-steps`` at ``--base-lambda``, then for each ``--rung NAME=LAMBDA`` a
copy of that base fine-tuned for ``--rung-steps`` at its own lambda (the usual way to
get several rates out of little compute). One checkpoint per rung, ``OUT/NAME.pt``,
which ``python -m latentserve.export.publish.photo`` exports; the base is ``OUT/base.pt``.

``--init CKPT`` starts from a photo checkpoint's weights instead of a fresh net (to
resume a training in several sittings; the checkpoint's shapes win over ``--n``/``--m``,
its history is kept and its step count recorded). Every run's schedule: ``--warmup``
steps of linear warm-up to ``lr``, then cosine decay to ``--min-lr`` (a warm restart when
resuming). ``--base-steps 0`` with ``--init`` fine-tunes the rungs of an existing base.

    python -m latentserve.export.training.photo --data ../shared/data/bsds500/train \\
        --data ../shared/data/bsds500/val --val ../shared/data/bsds500/test --out runs/photo \\
        --base-lambda 0.01 --rung photo-lo=0.003 --rung photo-mid=0.01 --rung photo-hi=0.03
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from latentserve.export.nets.photo import PhotoCodec, PhotoConfig
from latentserve.worker.runtime.images import list_image_files

PHOTO_CHECKPOINT = "latentserve-photo-checkpoint-1"


@dataclass(frozen=True)
class PhotoTrainConfig:
    lmbda: float = 0.01
    steps: int = 1000
    batch: int = 8
    crop: int = 128
    lr: float = 1e-3
    min_lr: float = 3e-5
    warmup: int = 0
    seed: int = 0
    budget_s: float = 0.0  # > 0: also end after this many seconds, the schedule on time
    hyper_lr_scale: float = 1.0  # the hyperprior's and z density's lr as a multiple of lr


def run_share(step: int, elapsed_s: float, cfg: PhotoTrainConfig) -> float:
    """How much of the run is done: of its steps, or of its time budget if that is ahead
    (a shared machine's speed varies; the decay still reaches ``min_lr`` in time)."""
    by_steps = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    if cfg.budget_s <= 0:
        return by_steps
    return max(by_steps, elapsed_s / cfg.budget_s)


def lr_factor(step: int, cfg: PhotoTrainConfig, done: float | None = None) -> float:
    """The schedule as a factor of ``cfg.lr``: linear warm-up over ``warmup`` steps, then
    cosine decay to ``min_lr`` as the run's share ``done`` goes 0 -> 1 (by default the
    share of ``steps`` after the warm-up)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if done is None:
        done = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    t = min(max(done, 0.0), 1.0)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def read_photos(folders: list[str | Path]) -> tuple[list[np.ndarray], str]:
    """uint8 (H, W, 3) arrays of every image in the folders, and a digest of their bytes."""
    photos, digest = [], hashlib.sha256()
    for folder in folders:
        for f in list_image_files(folder):
            data = f.read_bytes()
            digest.update(data)
            with Image.open(f) as img:
                photos.append(np.asarray(img.convert("RGB"), np.uint8))
    return photos, digest.hexdigest()


def random_crops(photos: list[np.ndarray], batch: int, crop: int,
                 rng: np.random.Generator) -> Tensor:
    out = np.empty((batch, crop, crop, 3), np.uint8)
    for i in range(batch):
        p = photos[int(rng.integers(len(photos)))]
        y = int(rng.integers(p.shape[0] - crop + 1))
        x = int(rng.integers(p.shape[1] - crop + 1))
        c = p[y:y + crop, x:x + crop]
        out[i] = c[:, ::-1] if rng.random() < 0.5 else c
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def centre_crops(photos: list[np.ndarray], size: int = 256) -> Tensor:
    crops = []
    for p in photos:
        y, x = (p.shape[0] - size) // 2, (p.shape[1] - size) // 2
        crops.append(p[y:y + size, x:x + size])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0


def rd_terms(net: PhotoCodec, x: Tensor, lmbda: float) -> dict[str, Tensor]:
    out = net(x)
    mse = F.mse_loss(out["x_hat"], x)
    bpp = out["bits"].mean() / (x.shape[2] * x.shape[3])
    psnr = 10 * torch.log10(1.0 / F.mse_loss(out["x_hat"].clamp(0, 1), x).clamp_min(1e-10))
    return {"loss": lmbda * 255.0**2 * mse + bpp, "bpp": bpp.detach(), "psnr": psnr.detach()}


@torch.no_grad()
def validate(net: PhotoCodec, val: Tensor, lmbda: float) -> dict[str, float]:
    net.eval()
    rows = [rd_terms(net, val[i:i + 4], lmbda) for i in range(0, len(val), 4)]
    net.train()
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}


def train(net: PhotoCodec, photos: list[np.ndarray], cfg: PhotoTrainConfig, val: Tensor | None,
          log: Any, tag: str,
          save: Callable[[list[dict[str, float]]], None] | None = None) -> list[dict[str, float]]:
    """Adam on the ``lr_factor`` schedule, for ``cfg.steps`` or until ``cfg.budget_s``
    has passed; one line to ``log`` every 50 steps, and
    ``save(history)`` every 500 (a long run stopped early keeps its last checkpoint)."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    hyper = [p for n, p in net.named_parameters() if n.startswith(("h_a.", "h_s.", "density."))]
    ids = {id(p) for p in hyper}
    scales = [1.0, cfg.hyper_lr_scale]
    opt = torch.optim.Adam([{"params": [p for p in net.parameters() if id(p) not in ids]},
                            {"params": hyper}], lr=cfg.lr)
    net.train()
    history, t0, window = [], time.monotonic(), []
    for step in range(cfg.steps):
        done = run_share(step, time.monotonic() - t0, cfg)
        last = step + 1 == cfg.steps or done >= 1.0
        for group, scale in zip(opt.param_groups, scales, strict=True):
            group["lr"] = scale * cfg.lr * lr_factor(step, cfg, done)
        terms = rd_terms(net, random_crops(photos, cfg.batch, cfg.crop, rng), cfg.lmbda)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        window.append({k: float(v.detach()) for k, v in terms.items()})
        if (step + 1) % 50 == 0 or last:
            row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            row.update(step=step + 1, s=round(time.monotonic() - t0, 1),
                       lr=float(opt.param_groups[0]["lr"]))
            if val is not None and ((step + 1) % 500 == 0 or last):
                row.update({f"val_{k}": v for k, v in validate(net, val, cfg.lmbda).items()})
            history.append(row)
            print(tag, json.dumps(row), file=log, flush=True)
            window = []
            if save is not None and (step + 1) % 500 == 0:
                save(history)
        if last:
            break
    net.eval()
    return history


def checkpoint(net: PhotoCodec, cfg: PhotoTrainConfig, history: list[dict[str, float]],
               data: dict[str, Any]) -> dict[str, Any]:
    return {"format": PHOTO_CHECKPOINT, "model_config": net.config.to_dict(),
            "train_config": asdict(cfg), "state_dict": net.state_dict(),
            "history": history, "data": data}


def load_photo_checkpoint(path: str | Path) -> tuple[dict[str, Any], PhotoCodec]:
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != PHOTO_CHECKPOINT:
        raise ValueError(f"{path} is not a photo checkpoint ({PHOTO_CHECKPOINT})")
    net = PhotoCodec(PhotoConfig(**ckpt["model_config"]))
    net.load_state_dict(ckpt["state_dict"])
    net.eval()
    return ckpt, net


def with_hyperprior(net: PhotoCodec, hyper: int) -> PhotoCodec:
    """A hyperprior net of width ``hyper`` whose g_a and g_s are ``net``'s (a factorized
    checkpoint's transforms as the start of a hyperprior's training)."""
    out = PhotoCodec(replace(net.config, hyper=hyper))
    transforms = {k: v for k, v in net.state_dict().items() if k.startswith(("g_a.", "g_s."))}
    missing, _ = out.load_state_dict(transforms, strict=False)
    assert all(k.startswith(("h_a.", "h_s.", "density.")) for k in missing), missing
    return out


def parse_rung(text: str) -> tuple[str, float]:
    """``NAME=LAMBDA`` -> (name, lambda), or a ValueError naming the bad argument."""
    name, sep, lam = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(lam)
    except ValueError:
        raise ValueError(f"--rung {text!r}: expected NAME=LAMBDA, e.g. photo-lo=0.002") from None


def total_steps(ckpt: dict[str, Any]) -> int:
    """Training steps behind a checkpoint, every sitting it resumed from included."""
    if "total_steps" in ckpt:
        return int(ckpt["total_steps"])
    if "base_config" in ckpt:  # a rung of a one-sitting run (version 1's checkpoints)
        return int(ckpt["base_config"]["steps"]) + int(ckpt["train_config"]["steps"])
    return int(ckpt["train_config"]["steps"])


def steps_run(history: list[dict[str, float]]) -> int:
    return int(history[-1]["step"]) if history else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True, help="training folder (repeat)")
    ap.add_argument("--val", default=None, help="validation folder (progress only)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--m", type=int, default=96)
    ap.add_argument("--hyper", type=int, default=0,
                    help="> 0: a scale hyperprior with this many z channels (an --init "
                         "checkpoint without one keeps its transforms and gains it)")
    ap.add_argument("--hyper-lr-scale", type=float, default=1.0,
                    help="the hyperprior's lr as a multiple of --lr / --rung-lr")
    ap.add_argument("--base-lambda", type=float, default=0.01)
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--rung", action="append", default=[], help="NAME=LAMBDA (repeat)")
    ap.add_argument("--rung-steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rung-lr", type=float, default=3e-4)
    ap.add_argument("--min-lr", type=float, default=3e-5, help="where the cosine decay ends")
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps of each run")
    ap.add_argument("--base-budget-s", type=float, default=0.0,
                    help="end the base after this many seconds (0 = no limit), its "
                         "schedule on time when that comes before --base-steps")
    ap.add_argument("--rung-budget-s", type=float, default=0.0, help="the same per rung")
    ap.add_argument("--init", default=None, help="photo checkpoint to start from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos, digest = read_photos(args.data)
    val = centre_crops(read_photos([args.val])[0]) if args.val else None
    data = {"folders": [str(d) for d in args.data], "images": len(photos), "sha256": digest}
    with open(out / "train.log", "a") as log:
        print(f"photos {len(photos)} digest {digest[:16]} args {vars(args)}", file=log, flush=True)
        torch.manual_seed(args.seed)
        rungs = [parse_rung(r) for r in args.rung]
        init: dict[str, Any] = {}
        prior_hist: list[dict[str, float]] = []
        if args.init:
            ckpt0, net = load_photo_checkpoint(args.init)
            prior_hist = list(ckpt0.get("history", []))
            init = {"path": str(args.init), "steps": total_steps(ckpt0)}
            if args.hyper and net.config.hyper != args.hyper:
                net = with_hyperprior(net, args.hyper)
                init["hyper_added"] = args.hyper
        else:
            net = PhotoCodec(PhotoConfig(n=args.n, m=args.m, hyper=args.hyper))
        base_cfg = PhotoTrainConfig(lmbda=args.base_lambda, steps=args.base_steps, batch=args.batch,
                                    crop=args.crop, lr=args.lr, min_lr=args.min_lr,
                                    warmup=args.warmup, seed=args.seed,
                                    budget_s=args.base_budget_s,
                                    hyper_lr_scale=args.hyper_lr_scale)
        t0 = time.monotonic()
        base_hist = prior_hist
        base_total = init.get("steps", 0)

        def save_base(hist: list[dict[str, float]]) -> None:
            ckpt = checkpoint(net, base_cfg, prior_hist + hist, data)
            ckpt.update(init=init, total_steps=base_total + steps_run(hist))
            torch.save(ckpt, out / "base.tmp")
            (out / "base.tmp").replace(out / "base.pt")  # never a half-written base.pt

        if args.base_steps > 0:
            hist = train(net, photos, base_cfg, val, log, "base", save_base)
            save_base(hist)
            base_hist = prior_hist + hist
            base_total += steps_run(hist)
        for i, (name, lam) in enumerate(rungs):
            fine = copy.deepcopy(net)
            cfg = PhotoTrainConfig(lmbda=lam, steps=args.rung_steps, batch=args.batch,
                                   crop=args.crop, lr=args.rung_lr, min_lr=args.min_lr,
                                   warmup=args.warmup, seed=args.seed + 1 + i,
                                   budget_s=args.rung_budget_s,
                                   hyper_lr_scale=args.hyper_lr_scale)
            hist = train(fine, photos, cfg, val, log, name)
            ckpt = checkpoint(fine, cfg, base_hist + hist, data)
            ckpt.update(base_config=asdict(base_cfg), init=init, base_steps=base_total,
                        total_steps=base_total + steps_run(hist))
            torch.save(ckpt, out / f"{name}.pt")
        print(f"done in {time.monotonic() - t0:.0f} s", file=log, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
