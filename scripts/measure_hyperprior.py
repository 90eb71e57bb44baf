"""Measure what a Balle-2018 scale hyperprior would give on MNIST, by likelihood bits only.

Not a shipped model: it trains the GDN autoencoder of the ladder
(``--transform gdn``) with a scale hyperprior beside it and reports, on the validation
split, the PSNR of the rounded latents' reconstructions and the ideal code length
(-log2 of the discretised likelihoods: y under N(0, sigma(z)) convolved with U(-1/2, 1/2),
z under a factorised density), i.e. what a range coder would spend before its flush and
header. Its checkpoint (``--out``'s .pt) is exported as code kind 5 (hyperprior, the real
range coder) by ``scripts/export_hyperprior.py``.

    python scripts/measure_hyperprior.py --lambda 0.004 --minutes 12 --out runs/hp.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from latentserve.export.nets.hyperprior import ScaleHyperprior
from latentserve.export.training.data import load_dataset
from latentserve.export.training.train import psnr_db, to_float


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mnist")
    ap.add_argument("--lambda", dest="lmbda", type=float, default=0.004)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--latent-channels", type=int, default=12)
    ap.add_argument("--hyper-channels", type=int, default=8)
    ap.add_argument("--transform", choices=("gdn", "relu"), default="gdn",
                    help="g_a / g_s: the GDN trunk, or the shipped ladder's ReLU one")
    ap.add_argument("--res-blocks", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--minutes", type=float, default=12.0, help="stop after this long")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_dataset(args.data)
    x_all = torch.as_tensor(data.train)
    model = ScaleHyperprior(args.hidden, args.latent_channels, args.hyper_channels,
                            res_blocks=args.res_blocks, transform=args.transform)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # steps fixed from a first timing so that the cosine schedule ends with the budget
    t0 = time.time()
    step, total = 0, args.steps
    model.train()
    while step < total:
        perm = torch.randperm(len(x_all))
        for i in range(0, len(x_all) - 63, 64):
            frac = min(step / total, 1.0)
            for g in opt.param_groups:
                g["lr"] = args.lr * (0.5 * (1 + math.cos(math.pi * frac)) * 0.97 + 0.03)
            x = to_float(x_all[perm[i:i + 64]])
            out = model(x)
            mse = F.mse_loss(out["x_hat"], x)
            bits = (out["bits_y"] + out["bits_z"]).mean()
            loss = args.lmbda * 255.0**2 * mse + bits / 784
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == 50:
                t50 = time.time()
            if step == 250:  # fit the step count (hence the cosine schedule) to the budget
                per = (time.time() - t50) / 200
                total = min(args.steps, 250 + int((args.minutes * 60 - (time.time() - t0)) / per))
                print(f"{per:.3f} s/step -> {total} steps", flush=True)
            if step % 500 == 0:
                print(f"step {step}/{total} loss {loss.item():.4f} bits {bits.item():.1f} "
                      f"psnr {psnr_db(x, out['x_hat'].detach()).mean().item():.2f}", flush=True)
            if step >= total:
                break
    model.eval()
    with torch.no_grad():
        x = to_float(data.val)
        out = model(x)
        psnr = float(psnr_db(x, out["x_hat"]).mean())
        by, bz = float(out["bits_y"].mean()), float(out["bits_z"].mean())
    result = {"lambda": args.lmbda, "steps": step, "minutes": (time.time() - t0) / 60,
              "val_psnr_db": round(psnr, 3), "val_bits_y": round(by, 1),
              "val_bits_z": round(bz, 1), "val_bytes_ideal": round((by + bz) / 8, 2),
              "config": vars(args)}
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    torch.save(model.state_dict(), args.out.rsplit(".", 1)[0] + ".pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
