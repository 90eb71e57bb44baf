"""``latentserve import``: ONNX graphs made elsewhere -> a model repository version.

    latentserve import --family ae --encoder enc.onnx --decoder dec.onnx \\
        --images samples/ --repo models --name their-ae --version 1

Nothing heavy at import time: onnx and onnxruntime are loaded inside the handler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from latentserve.worker.runtime.settings import RuntimeSettings


def register(sub: Any) -> None:
    """Add the ``import`` subcommand."""
    p = sub.add_parser(
        "import", help="import ONNX encoder / decoder (/ prior) graphs as a model version",
        description="Fit ONNX graphs made elsewhere to a family's I/O contract (wrapping "
                    "their inputs and outputs), fit the entropy tables on sample images, "
                    "measure rate and PSNR on them and write a repository version. "
                    "Walkthrough: docs/your-own-model.md.")
    p.add_argument("--family", required=True, choices=("ae", "vae", "vqvae"))
    p.add_argument("--encoder", required=True, type=Path, help="encoder ONNX file")
    p.add_argument("--decoder", required=True, type=Path, help="decoder ONNX file")
    p.add_argument("--prior", type=Path, default=None,
                   help="vqvae: causal prior ONNX file (indices -> logits); without it the "
                        "indices are coded under static tables fitted on --images")
    p.add_argument("--images", required=True, type=Path,
                   help="sample images: a folder of PNG/JPEG, one image or an IDX file")
    RuntimeSettings.add_arguments(p, only=("models",))  # the repository written into
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, type=int)
    p.add_argument("--step", type=float, default=None,
                   help="ae / vae: latent quantisation step (default 1 for ae, 0.5 for vae)")
    p.add_argument("--num-codes", type=int, default=None,
                   help="vqvae: codebook size (default: the prior's K; required without one)")
    p.add_argument("--encoder-output", default=None,
                   help="the encoder output to serve (default: its first, e.g. a vae's mean)")
    p.add_argument("--input-range", type=float, default=1.0, choices=(1.0, 255.0),
                   help="a float encoder input takes pixels in [0, 1] (1, default) or [0, 255]")
    p.add_argument("--output-range", type=float, default=1.0, choices=(1.0, 255.0),
                   help="a float decoder output gives pixels in [0, 1] (1, default) or [0, 255]")
    p.add_argument("--resize", action="store_true",
                   help="resize / convert sample images to the encoder's fixed input shape")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from latentserve.export.publish.onnx_import import graph_image_shape, import_onnx
    from latentserve.worker.runtime.images import load_images

    shape = graph_image_shape(args.encoder)
    images = load_images(args.images, shape, resize=args.resize)
    repo = RuntimeSettings.from_sources(args).models
    folder = import_onnx(family=args.family, encoder=args.encoder, decoder=args.decoder,
                         prior=args.prior, images=images, repo=repo, name=args.name,
                         version=args.version, step=args.step, num_codes=args.num_codes,
                         encoder_output=args.encoder_output, input_range=args.input_range,
                         output_range=args.output_range, overwrite=args.overwrite)
    manifest = json.loads((folder / "manifest.json").read_text())
    q = manifest["quality"]
    print(f"imported {args.name}:{args.version} ({args.family}, {manifest['code']['kind']}) to "
          f"{folder}: on {q['val_images']} sample images PSNR {q['val_psnr_db']} dB, "
          f"{q['val_code_bytes_per_image']} bytes/image (estimate "
          f"{q['val_bytes_per_image_estimate']} + header)")
    return 0
