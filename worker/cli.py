"""``latentserve models [--json] [--repo DIR]``: list a model repository.

Reads manifests only (no ONNX session is built, no file digest is checked), so it is
instant even for a large repository.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def register(sub: Any) -> None:
    """Add the ``models`` subcommand."""
    p = sub.add_parser("models", help="list the models of a model repository",
                       description="List every model version: family, code kind, shapes, "
                                   "fingerprint and validation figures.")
    p.add_argument("--repo", default=os.environ.get("LATENTSERVE_MODELS", "models"),
                   metavar="DIR", help="model repository [env LATENTSERVE_MODELS; default models]")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_models)


def model_rows(repo: str) -> list[dict[str, Any]]:
    """One dict per model version of ``repo`` (what ``--json`` prints)."""
    from .repository import ModelRepository

    rows = []
    for e in ModelRepository(repo).entries():
        m = e.manifest
        rows.append({
            "name": m.name, "version": m.version, "ref": m.ref, "family": m.family,
            "code_kind": m.code_kind, "image_shape": list(m.image_shape),
            "latent_shape": list(m.latent_shape), "fingerprint": m.fingerprint.hex(),
            "manifest_sha256": m.digest, "path": str(e.path),
            "val_psnr_db": m.quality.get("val_psnr_db"),
            "val_bits_per_image": m.quality.get("val_bits_per_image"),
        })
    return rows


def cmd_models(args: argparse.Namespace) -> int:
    rows = model_rows(args.repo)
    if args.json:
        print(json.dumps({"repo": str(args.repo), "models": rows}, indent=1))
        return 0
    if not rows:
        print(f"no models in {args.repo}")
        return 0
    head = ("MODEL", "FAMILY", "CODE", "IMAGE", "LATENT", "FP", "PSNR dB", "BYTES est")
    table = [head] + [(
        r["ref"], r["family"], r["code_kind"], "x".join(map(str, r["image_shape"])),
        "x".join(map(str, r["latent_shape"])), r["fingerprint"],
        "-" if r["val_psnr_db"] is None else f"{r['val_psnr_db']:.2f}",
        "-" if r["val_bits_per_image"] is None else f"{r['val_bits_per_image'] / 8:.1f}",
    ) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0
