"""Export a checkpoint of ``scripts/measure_hyperprior.py`` as a code-kind-5 repository version.

It goes through the public export API (``export.custom.Hyperprior``), as a user's own
hyperprior would: the integer tables are fitted on the training split (y's fallback
histogram, z under the model's own factorised density), quality is measured on the
validation split with the real range coder.

    python scripts/export_hyperprior.py --checkpoint runs/hp.pt --config runs/hp.json \\
        --repo runs/hp-repo --name mnist-hp --version 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from latentserve.export.nets.hyperprior import HyperAnalysis, HyperSynthesis, ScaleHyperprior
from latentserve.export.publish.custom import Hyperprior, export_model
from latentserve.export.training.data import load_dataset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", required=True, help="the training run's JSON (--out)")
    ap.add_argument("--data", default="../shared/data/mnist")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--name", default="mnist-hp")
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with open(args.config) as f:
        run = json.load(f)
    cfg = run["config"]
    model = ScaleHyperprior(cfg["hidden"], cfg["latent_channels"], cfg["hyper_channels"],
                            res_blocks=cfg.get("res_blocks", 0),
                            transform=cfg.get("transform", "gdn"))
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    model.eval()
    data = load_dataset(args.data)
    t0 = time.time()
    folder = export_model(
        family="ae", encoder=model.g_a, decoder=model.g_s, images=data.train,
        latent_model=Hyperprior(HyperAnalysis(model), HyperSynthesis(model),
                                density=model.density),
        val_images=data.val, repo=args.repo, name=args.name, version=args.version,
        overwrite=args.overwrite, seed=int(cfg["seed"]))
    manifest = json.loads((folder / "manifest.json").read_text())
    print(json.dumps({"folder": str(folder), "seconds": round(time.time() - t0, 1),
                      "training": {k: run[k] for k in ("lambda", "steps", "minutes")},
                      "quality": manifest["quality"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
