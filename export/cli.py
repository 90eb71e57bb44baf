"""``latentserve train`` and ``latentserve export`` (torch is imported inside the handlers).

    latentserve train --family vqvae --data ../shared/data/mnist --out runs/vq.pt --epochs 20
    latentserve export runs/vq.pt --repo models --name mnist-vqvae --version 1

For ``--family vqvae`` the same command trains the PixelCNN prior on the training codes
right after the VQ-VAE, and the checkpoint holds both. ``--family prior --vqvae CKPT``
(re)trains only the prior of an existing vqvae checkpoint, and ``--family decoder --vqvae
CKPT`` only its decoder on the frozen codes (a fresh one when --decoder-hidden or
--decoder-res-blocks change it); either writes the updated checkpoint to --out.
``--family parallel-prior --base DIR`` trains a parallel prior (code kind 4) on the index
grids that the exported vqvae version in DIR writes (its encoder.onnx); publish it with
``python -m latentserve.export.publish.parallel``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any, cast

from latentserve.errors import InvalidInput
from latentserve.worker.runtime.settings import RuntimeSettings


def register(sub: Any) -> None:
    """Add the ``train`` and ``export`` subcommands."""
    t = sub.add_parser("train", help="train an ae / vae / vqvae (+ prior) on images",
                       description="Train a model; the last --val-count images are held out.")
    t.add_argument("--family", required=True, choices=("ae", "vae", "vqvae", "prior", "decoder",
                                                         "parallel-prior"))
    t.add_argument("--vqvae", default=None,
                   help="--family prior / decoder: the vqvae checkpoint to refine")
    t.add_argument("--base", default=None,
                   help="--family parallel-prior: the exported vqvae version folder")
    t.add_argument("--prior-arch", choices=("conv", "mixer"), default="conv",
                   help="--family parallel-prior: 3x3 conv trunk, or position-mixing layers")
    t.add_argument("--data", default=None,
                   help="IDX(.gz) file, a folder of PNG/JPEG images, or a folder with an IDX file")
    t.add_argument("--out", required=True, help="checkpoint path to write")
    t.add_argument("--init", default=None,
                   help="ae / vae: start from this checkpoint's weights (same model options), "
                        "e.g. a ladder rung fine-tuned from a base at another --lambda")
    t.add_argument("--lambda", dest="lmbda", type=float, default=0.004,
                   help="ae: weight of 255^2 * MSE against bits per pixel (default 0.004)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--steps", type=int, default=None, help="train this many steps instead")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--vae-sigma", type=float, default=0.1,
                   help="vae: pixel noise std of the Gaussian likelihood")
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--res-blocks", type=int, default=1)
    t.add_argument("--decoder-hidden", type=int, default=0, help="0: same as --hidden")
    t.add_argument("--decoder-res-blocks", type=int, default=-1, help="-1: same as --res-blocks")
    t.add_argument("--decoder-epochs", type=int, default=0,
                   help="vqvae: afterwards train the decoder alone on the frozen codes")
    t.add_argument("--latent-channels", type=int, default=12)
    t.add_argument("--transform", choices=("relu", "gdn"), default="relu",
                   help="nonlinearity of the transforms: ReLU (+res blocks) or GDN / IGDN")
    t.add_argument("--latent-layout", choices=("grid", "flat"), default="grid",
                   help="ae / vae: latent of C x H/4 x W/4, or flat: C numbers per image "
                        "(through a linear layer)")
    t.add_argument("--learned-sigma", action="store_true",
                   help="vae: learn the likelihood's pixel std (--vae-sigma is then unused)")
    t.add_argument("--stage2-hidden", type=int, default=0,
                   help="vae (--latent-layout flat): width of a second-stage VAE over the "
                        "latent, trained after the first (two-stage VAE; 0: none)")
    t.add_argument("--stage2-steps", type=int, default=0,
                   help="training steps of the second stage (0: 4000)")
    t.add_argument("--stage2-lr", type=float, default=1e-3,
                   help="peak learning rate of the second stage")
    t.add_argument("--num-codes", type=int, default=256)
    t.add_argument("--code-dim", type=int, default=32)
    t.add_argument("--val-count", type=int, default=1000)
    t.add_argument("--train-limit", type=int, default=None)
    t.add_argument("--prior-epochs", type=int, default=20)
    t.add_argument("--prior-steps", type=int, default=None,
                   help="train the prior this many steps instead of --prior-epochs")
    t.add_argument("--prior-hidden", type=int, default=128)
    t.add_argument("--prior-layers", type=int, default=4)
    t.add_argument("--prior-embed", type=int, default=64)
    t.add_argument("--prior-dropout", type=float, default=0.1)
    t.add_argument("--prior-shifts", type=int, default=0,
                   help="prior: also train on codes of images shifted by up to this many px")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a checkpoint into a model repository",
                       description="Write <repo>/<name>/<version>/ with ONNX files and manifest.")
    e.add_argument("checkpoint")
    RuntimeSettings.add_arguments(e, only=("models",))  # the repository written into
    e.add_argument("--name", required=True)
    e.add_argument("--version", type=int, required=True)
    e.add_argument("--data", default=None,
                   help="the training data, if it moved since training (digest checked)")
    e.add_argument("--vae-step", type=float, default=None,
                   help="vae: quantisation step of the posterior mean (default 0.5)")
    e.add_argument("--gmm-components", type=int, default=10)
    e.add_argument("--half-weights", action="store_true",
                   help="ae / vae: round the large weights to float16 values and store them "
                        "so (half the file size; the figures are measured on the rounded net)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing version (only before anyone depends on it)")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "sampler", help="give an exported vae or fixed-size ae a learned sampling prior "
                        "(a new version)",
        description="Train the second stage of a two-stage VAE (Dai & Wipf 2019) on the "
                    "latents that BASE's encoder.onnx gives for the training split (a vae's "
                    "posterior means, an ae's continuous latents before rounding) "
                    "of --data, fit a Gaussian mixture over its u, and write it as "
                    "<repo>/<name>/<version>/ with BASE's encoder, decoder and code tables "
                    "unchanged (sampling kind 'learned').")
    s.add_argument("base", help="the vae or fixed-size ae version folder to start from "
                                "(…/<name>/<version>)")
    RuntimeSettings.add_arguments(s, only=("models",))  # the repository written into
    s.add_argument("--name", required=True)
    s.add_argument("--version", type=int, required=True)
    s.add_argument("--data", required=True, help="the vae's training data (IDX or folder)")
    s.add_argument("--val-count", type=int, default=1000,
                   help="the last N images are held out (as in training)")
    s.add_argument("--u-dim", type=int, default=16, help="d, the second stage's latent size")
    s.add_argument("--hidden", type=int, default=256, help="width of the second stage's MLPs")
    s.add_argument("--mixture", type=int, default=200,
                   help="components of the Gaussian mixture over u fitted afterwards "
                        "(0: u ~ N(0, I))")
    s.add_argument("--gamma-init", type=float, default=1.0,
                   help="start of the second stage's learned likelihood scale gamma")
    s.add_argument("--steps", type=int, default=8000)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing version (only before anyone depends on it)")
    s.set_defaults(func=cmd_sampler)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from latentserve.export.nets.models import ModelConfig
    from latentserve.export.nets.prior import PriorConfig
    from latentserve.export.training.data import load_dataset
    from latentserve.export.training.train import (
        TrainConfig,
        init_record,
        load_checkpoint,
        save_checkpoint,
        train_model,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family in ("prior", "decoder"):
        return _refine_vqvae(args)
    if args.family == "parallel-prior":
        return _train_parallel_prior(args)
    if not args.data:
        raise InvalidInput("--data is required (an IDX file or a folder of images)")
    data = load_dataset(args.data, val_count=args.val_count, train_limit=args.train_limit)
    mc = ModelConfig(family=args.family, image_shape=data.image_shape, hidden=args.hidden,
                     res_blocks=args.res_blocks, decoder_hidden=args.decoder_hidden,
                     decoder_res_blocks=args.decoder_res_blocks,
                     latent_channels=args.latent_channels, num_codes=args.num_codes,
                     code_dim=args.code_dim, transform=args.transform,
                     latent_layout=args.latent_layout, learned_sigma=args.learned_sigma,
                     stage2_hidden=args.stage2_hidden)
    tc = TrainConfig(lmbda=args.lmbda, vae_sigma=args.vae_sigma, epochs=args.epochs,
                     steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     prior_epochs=args.prior_epochs,
                     prior_steps=args.prior_steps, prior_shifts=args.prior_shifts,
                     decoder_epochs=args.decoder_epochs, stage2_steps=args.stage2_steps,
                     stage2_lr=args.stage2_lr,
                     progress=not args.no_progress)
    pc = PriorConfig(num_codes=args.num_codes, grid=mc.grid, embed_dim=args.prior_embed,
                     hidden=args.prior_hidden, layers=args.prior_layers,
                     dropout=args.prior_dropout) if args.family == "vqvae" else None
    init = None
    if args.init:
        init = load_checkpoint(args.init)[0]
        theirs = init["data"]["sha256"]
        if theirs != data.sha256:
            raise InvalidInput(f"--init {args.init} was trained on other data (sha256 "
                               f"{theirs[:12]}..., here {data.sha256[:12]}...)")
    ckpt = train_model(mc, tc, data, prior_config=pc, init=init)
    if init is not None:
        ckpt["init"] = init_record(init, args.init)
    path = save_checkpoint(ckpt, args.out)
    last = ckpt["history"][-1]
    print(f"wrote {path}: {args.family}, {len(data.train)} training images, last step "
          + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    return 0


def _train_parallel_prior(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from latentserve.export.nets.parallel_prior import ParallelPriorConfig
    from latentserve.export.training.data import load_dataset
    from latentserve.export.training.parallel_prior import train_from_model

    if not args.base or not args.data:
        raise InvalidInput("--family parallel-prior needs --base (a vqvae version folder) "
                           "and --data")
    raw = json.loads((Path(args.base) / "manifest.json").read_text())
    num_train = raw.get("training", {}).get("num_train")
    data = load_dataset(args.data, val_count=args.val_count,
                        train_limit=args.train_limit or num_train)
    pc = ParallelPriorConfig(num_codes=int(raw["code"]["vq_static"]["num_codes"]),
                             grid=tuple(raw["latent"]["shape"]), embed_dim=args.prior_embed,
                             hidden=args.prior_hidden, layers=args.prior_layers,
                             dropout=args.prior_dropout, arch=args.prior_arch)
    ckpt = train_from_model(args.base, data, pc, steps=args.steps or 1500,
                            shifts=args.prior_shifts, lr=args.lr,
                            batch_size=args.batch_size, seed=args.seed,
                            progress=not args.no_progress)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    print(f"wrote {path}: parallel prior on {args.base}, {ckpt['train']['num_grids']} grids, "
          f"{ckpt['train']['seconds']} s, validation "
          f"{ckpt['val_bits_per_index_float']:.4f} bits per index (float softmax)")
    return 0


def _refine_vqvae(args: argparse.Namespace) -> int:
    """--family prior / decoder: retrain one part of a trained vqvae checkpoint."""
    from latentserve.export.nets.models import VQVAE, ModelConfig, build_model
    from latentserve.export.nets.prior import PriorConfig
    from latentserve.export.publish.exporter import dataset_for
    from latentserve.export.training.train import (
        TrainConfig,
        load_checkpoint,
        save_checkpoint,
        seed_everything,
        train_decoder,
        train_prior,
    )

    if not args.vqvae:
        raise InvalidInput(f"--family {args.family} needs --vqvae CKPT (a trained vqvae)")
    ckpt, model, _ = load_checkpoint(args.vqvae)
    if ckpt["model_config"]["family"] != "vqvae":
        raise InvalidInput(f"{args.vqvae} holds a {ckpt['model_config']['family']} model, "
                           "not a vqvae")
    data = dataset_for(ckpt, args.data)
    tc = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     prior_epochs=args.prior_epochs, prior_steps=args.prior_steps,
                     prior_lr=args.lr, prior_shifts=args.prior_shifts,
                     decoder_epochs=args.decoder_epochs or args.epochs, decoder_steps=args.steps,
                     progress=not args.no_progress)
    gen = seed_everything(args.seed)
    if args.family == "prior":
        mc = model.config
        pc = PriorConfig(num_codes=mc.num_codes, grid=mc.grid, embed_dim=args.prior_embed,
                         hidden=args.prior_hidden, layers=args.prior_layers,
                         dropout=args.prior_dropout)
        prior, history = train_prior(cast(VQVAE, model), tc, data, gen, pc)  # family checked
        ckpt.update(prior_config=pc.to_dict(), prior_state=prior.state_dict(),
                    prior_history=history, prior_train_config=asdict(tc))
    else:
        mc = ModelConfig.from_dict({**ckpt["model_config"],
                                    "decoder_hidden": args.decoder_hidden,
                                    "decoder_res_blocks": args.decoder_res_blocks})
        if (mc.dec_hidden, mc.dec_res_blocks) != (model.config.dec_hidden,
                                                  model.config.dec_res_blocks):
            fresh = build_model(mc)  # a new decoder; encoder and codebook carried over
            keep = {k: v for k, v in model.state_dict().items() if not k.startswith("g_s.")}
            fresh.load_state_dict(keep, strict=False)
            model = fresh
        else:
            mc = model.config
        history = train_decoder(cast(VQVAE, model), tc, data, gen)  # a vqvae, as checked
        ckpt.update(model_config=mc.to_dict(), state_dict=model.state_dict(),
                    decoder_history=history, decoder_train_config=asdict(tc))
    path = save_checkpoint(ckpt, args.out)
    print(f"wrote {path}: {args.family} of {args.vqvae}, last step "
          + ", ".join(f"{k} {v:.4g}" for k, v in history[-1].items()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from latentserve.export.publish.exporter import DEFAULT_VAE_STEP, dataset_for, export_checkpoint
    from latentserve.export.training.train import load_checkpoint

    ckpt, _, _ = load_checkpoint(args.checkpoint)
    data = dataset_for(ckpt, args.data)
    repo = RuntimeSettings.from_sources(args).models
    folder = export_checkpoint(ckpt, repo=repo, name=args.name, version=args.version,
                               data=data, vae_step=args.vae_step or DEFAULT_VAE_STEP,
                               gmm_components=args.gmm_components, overwrite=args.overwrite,
                               half_weights=args.half_weights)
    import json

    quality = json.loads((folder / "manifest.json").read_text())["quality"]
    print(f"exported {args.name}:{args.version} to {folder}: "
          + ", ".join(f"{k} {v}" for k, v in quality.items()))
    return 0


def cmd_sampler(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from latentserve.export.publish.sampler import LearnedSampler, add_sampler
    from latentserve.export.training.data import load_dataset
    from latentserve.export.training.sampler import (
        SamplerConfig,
        encoder_latents,
        method_for,
        train_sampler,
    )
    from latentserve.worker.runtime.manifest import parse_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    base = Path(args.base)
    if not (base / "manifest.json").is_file():
        raise InvalidInput(f"{base} is not a model version folder (no manifest.json)")
    old = parse_manifest((base / "manifest.json").read_bytes(), where=str(base / "manifest.json"))
    data = load_dataset(args.data, val_count=args.val_count)
    trained_on = old.raw.get("training", {}).get("data_sha256")
    if trained_on and trained_on != data.sha256:
        raise InvalidInput(f"--data's training split (sha256 {data.sha256[:12]}) is not what "
                           f"{old.ref} was trained on ({str(trained_on)[:12]})")
    if old.family not in ("vae", "ae") or old.any_size:
        raise InvalidInput(f"{base} is a{'n any-size' if old.any_size else ''} {old.family}; "
                           "a learned sampler is for a fixed-size vae or ae")
    config = SamplerConfig(u_dim=args.u_dim, hidden=args.hidden,
                           mixture=args.mixture, gamma_init=args.gamma_init,
                           steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           progress=not args.no_progress)
    latents = encoder_latents(base / old.files["encoder"].path, data.train)
    stage2, provenance = train_sampler(latents, config)
    provenance["data_sha256"] = data.sha256
    repo = RuntimeSettings.from_sources(args).models
    folder = add_sampler(base=base, repo=repo, name=args.name, version=args.version,
                         sampler=LearnedSampler(stage2, stage2.noise_dim,
                                                        method_for(old.family)),
                         example_images=data.val, provenance=provenance,
                         overwrite=args.overwrite)
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"wrote {args.name}:{args.version} to {folder} (from {old.ref}): sampler "
          f"{provenance['seconds']} s, " + ", ".join(
              f"{k} {v}" for k, v in provenance["final"].items())
          + f"; sampling {manifest['sampling']}")
    return 0
