"""``latentserve eval``: rate-distortion and sample quality against JPEG, WebP and PNG.

Imports nothing heavy at module level (the CLI loads every area's ``register``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from latentserve.worker.runtime.settings import RuntimeSettings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "eval", help="rate-distortion (and sample quality) of models vs JPEG/WebP/PNG",
        description="Compress a set of images with every model and every classic codec, "
                    "write rd.json, rd.png and rd.md into -o DIR and print the table.")
    p.add_argument("--images", required=True, metavar="PATH",
                   help="an IDX(.gz) file, a folder of images (photos of any sizes), or one "
                        "image")
    p.add_argument("--only", nargs="*", metavar="NAME", default=None,
                   help="model refs (name or name:version); default every model in --models; "
                        "pass --only with no names for codecs only")
    RuntimeSettings.add_arguments(p, only=("models",))
    p.add_argument("--codecs", default="jpeg,webp,png", metavar="LIST",
                   help="comma-separated classic codecs: jpeg, webp, avif, png; '' for none "
                        "[default jpeg,webp,png]")
    p.add_argument("--no-lossless", action="store_true",
                   help="skip the lossless references (PNG, WebP lossless: WebP lossless at "
                        "method 6 takes ~20 s per 481x321 photo)")
    p.add_argument("--reuse-codecs", default=None, metavar="RD_JSON",
                   help="take the classic codec points of an earlier run's rd.json on the "
                        "same images (checked by digest) instead of measuring them again "
                        "(the sweeps are the slow part on photos); their speeds are that "
                        "run's")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="also draw N samples per model and score them with the classifier")
    p.add_argument("--classifier", default=None, metavar="DIR",
                   help="classifier folder (manifest.json + ONNX) [default "
                        "REPO/classifiers/mnist-classifier/1]")
    p.add_argument("--offset", type=int, default=0, metavar="N",
                   help="start at image N; negative counts from the end (-1000 = the last "
                        "1000 images, the project's validation split) [default 0]")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="use at most N images from --offset on (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed [default 0]")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="onnxruntime intra-op threads for timing [default 1]")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from latentserve.errors import InvalidInput
    from latentserve.eval.classic_codecs import codec_settings, parse_codecs
    from latentserve.eval.rd import images_digest, run_rd, unfit_reason
    from latentserve.eval.report import markdown, write_report
    from latentserve.eval.samples import (
        CLASSIFIER_SUBPATH,
        Classifier,
        FidReference,
        evaluate_samples,
    )
    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.images import load_image_list
    from latentserve.worker.runtime.pipeline import Pipeline

    for name in ("limit", "samples"):
        if getattr(args, name) < 0:
            raise InvalidInput(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.threads < 1:
        raise InvalidInput(f"--threads must be >= 1, got {args.threads}")
    every = load_image_list(args.images)
    start, end, _ = slice(args.offset, None).indices(len(every))
    if args.limit:
        end = min(end, start + args.limit)
    listed = every[start:end]
    # Real images outside the evaluated range (with --offset -1000: the training split),
    # the FID floor's "samples".
    others = every[:start] + every[end:]
    # One array when every image has one shape (the digit sets), else a list of photos.
    images: Any = np.stack(listed) if len({im.shape for im in listed}) == 1 else listed
    if len(images) == 0:
        raise InvalidInput(f"no images left in {args.images} after --offset {args.offset}")
    codecs = [c for c in codec_settings(parse_codecs(args.codecs))
              if not (args.no_lossless and c.lossless)]
    pipeline = None
    refs: list[str] = []
    repo = RuntimeSettings.from_sources(args).models
    if args.only is None or args.only or args.samples:
        pipeline = Pipeline(repo, EngineConfig(intra_op_threads=args.threads))
        refs = list(args.only) if args.only else sorted(
            {e.manifest.name for e in pipeline.models()})
        # one point per version asked for; a bare name means its newest version
        manifests = [pipeline.repository.resolve(r).manifest for r in refs]
        if not args.only:  # every model: those that take these images (named: an error)
            fit = []
            for manifest in manifests:
                reason = unfit_reason(manifest, images)
                if reason is None:
                    fit.append(manifest)
                elif not args.quiet:
                    print(f"  skipped: {reason}", file=sys.stderr, flush=True)
            manifests = fit
        refs = [m.ref for m in manifests]
    if not refs and not codecs:
        raise InvalidInput("nothing to evaluate: no models found or named, and --codecs is empty")

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"  {line}", file=sys.stderr, flush=True)

    digest = images_digest(images)
    reused = reused_codec_points(args.reuse_codecs, digest, images) if args.reuse_codecs else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = run_rd(images, pipeline=pipeline, refs=refs, codecs=codecs, progress=progress,
                    reused=reused)
    samples = []
    classifier_info = None
    fid_floor = None
    fid_note = ""
    if args.samples:
        clf_dir = Path(args.classifier) if args.classifier else Path(repo) / CLASSIFIER_SUBPATH
        clf = Classifier.load(clf_dir)
        classifier_info = {"path": str(clf_dir), "val_accuracy": clf.val_accuracy}
        reference = None
        if not clf.has_features:
            fid_note = f"no FID: the classifier in {clf_dir} has no features output"
        elif not (isinstance(images, np.ndarray) and images.dtype == np.uint8
                  and tuple(images.shape[1:]) == clf.image_shape and len(images) >= 2):
            fid_note = (f"no FID: the evaluated images are not >= 2 uint8 "
                        f"{clf.image_shape} images like the samples")
        else:
            reference = FidReference(clf, images)
            real = [im for im in others if im.shape == images.shape[1:]][:args.samples]
            if len(real) >= 2:
                fid_floor = reference.floor(np.stack(real))
            else:
                fid_note = ("no FID floor: no real images outside the evaluated range "
                            "(use --offset -1000 on the whole set)")
        samples = evaluate_samples(pipeline, refs, clf, count=args.samples, out_dir=out,
                                   seed=args.seed, reference=reference)
    meta = {"images": int(len(images)), "source": str(args.images), "offset": args.offset,
            "limit": args.limit, "repo": str(repo), "models": refs,
            "codecs": [c.label for c in codecs], "threads": args.threads,
            "seed": args.seed, "classifier": classifier_info, "images_sha256": digest,
            "reused_codecs": {"from": str(args.reuse_codecs),
                              "labels": [p.label for p in reused]} if reused else None}
    if fid_note:
        meta["fid_note"] = fid_note
    paths = write_report(out, points, samples=samples, meta=meta, fid_floor=fid_floor)
    print(markdown(points, samples=samples, meta=meta, fid_floor=fid_floor))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def reused_codec_points(path: str, digest: str, images: Any) -> list[Any]:
    """The codec points of an earlier ``rd.json``, refused unless it measured these images."""
    import json

    from latentserve.errors import InvalidInput
    from latentserve.eval.rd import RDPoint, pixel_counts

    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"--reuse-codecs {path}: cannot read it as an rd.json ({e})") from e
    theirs = report.get("meta", {}).get("images_sha256")
    if theirs != digest:
        raise InvalidInput(f"--reuse-codecs {path}: measured other images (images_sha256 "
                           f"{str(theirs)[:16]}..., these are {digest[:16]}...)")
    pixels = pixel_counts(images)
    return [RDPoint.from_json(p, pixels) for p in report["points"] if p["kind"] == "codec"]
