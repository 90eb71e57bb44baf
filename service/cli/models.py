"""``latentserve models [--json] [--models DIR | --target HOST:PORT]``: list models;
``latentserve models check NAME[:VERSION] [--images DIR]``: check one before serving it.

Locally it reads manifests only (no ONNX session is built, no file digest is checked),
so it is instant even for a large repository; with ``--target`` it asks a server
(ListModels), which also says which models are loaded and on which provider.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from latentserve.service.client.settings import (
    ClientSecurity,
    add_client_arguments,
    client_settings,
)
from latentserve.worker.runtime.settings import RuntimeSettings


def register(sub: Any) -> None:
    """Add the ``models`` subcommand."""
    p = sub.add_parser("models", help="list the models of a model repository",
                       description="List every model version: family, code kind, shapes, "
                                   "fingerprint and validation figures.")
    RuntimeSettings.add_arguments(p, only=("models",))
    p.add_argument("--json", action="store_true", help="print one JSON document")
    add_client_arguments(p)  # --target: list what that server serves instead
    p.set_defaults(func=cmd_models)
    actions = p.add_subparsers(dest="models_command", metavar="ACTION")
    c = actions.add_parser(
        "check", help="check a model before serving it (one verdict per check)",
        description="Digests, ONNX parity against the values recorded at export, a round "
                    "trip, batch-size invariance of the codes, code sizes against the "
                    "entropy estimate, and images/s. Exit status 1 if any check fails.")
    c.add_argument("model", metavar="NAME[:VERSION]")
    RuntimeSettings.add_arguments(c)
    c.add_argument("--images", default=None, metavar="PATH",
                   help="images for the round trip (folder, file or IDX); default: those "
                        "recorded at export, else the model's own samples")
    c.add_argument("--limit", type=int, default=64, help="use at most this many images")
    c.add_argument("--json", action="store_true", help="print one JSON document")
    c.set_defaults(func=cmd_check)
    from latentserve.service.cli.model_control import (
        register_actions,  # load / unload / reload, after check
    )

    register_actions(p)


def cmd_check(args: argparse.Namespace) -> int:
    """Run every check of one model and print a verdict per check."""
    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.images import load_images
    from latentserve.worker.runtime.model_check import check_model
    from latentserve.worker.runtime.repository import ModelRepository

    local = RuntimeSettings.from_sources(args)
    repo = ModelRepository(local.models)
    entry = repo.resolve(args.model)
    images = None
    if args.images:
        images = load_images(args.images, entry.manifest.image_shape)[:max(1, args.limit)]
    verdicts = check_model(repo, entry.manifest.ref, images=images,
                           engine_config=EngineConfig(provider=local.provider))
    failed = any(v.status == "FAIL" for v in verdicts)
    if args.json:
        print(json.dumps({"model": entry.manifest.ref, "ok": not failed, "checks": [
            {"check": v.check, "status": v.status, "detail": v.detail, "figures": v.figures}
            for v in verdicts]}, indent=1))
    else:
        print(f"{entry.manifest.ref} ({entry.manifest.family}, {entry.manifest.code_kind}, "
              f"{entry.path})")
        width = max(len(v.check) for v in verdicts)
        for v in verdicts:
            print(f"  {v.status:<4}  {v.check:<{width}}  {v.detail}")
        print(f"{'FAIL' if failed else 'OK'}: {sum(v.status == 'PASS' for v in verdicts)} of "
              f"{len(verdicts)} checks pass")
    return 1 if failed else 0


def model_rows(repo: Path | str) -> list[dict[str, Any]]:
    """One dict per model version of ``repo`` (what ``--json`` prints)."""
    from latentserve.worker.runtime.repository import ModelRepository

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
            "any_size": m.any_size, "stride": m.stride, "operations": list(m.operations),
            "val_bpp": m.quality.get("val_bpp"),
        })
    return rows


def server_rows(target: str, security: ClientSecurity | None = None) -> list[dict[str, Any]]:
    """The same dicts from a server's ListModels, plus ``loaded`` and ``provider``."""
    from latentserve.service.client.inference import LatentServeClient

    with LatentServeClient(target, timeout=30, security=security) as client:
        infos = client.models()
    return [{
        "name": m.name, "version": m.version, "ref": m.ref, "family": m.family,
        "code_kind": m.code_kind, "image_shape": [m.channels, m.height, m.width],
        "latent_shape": list(m.latent_shape),
        "fingerprint": m.manifest_sha256[:4], "manifest_sha256": m.manifest_sha256,
        "val_psnr_db": m.quality.get("val_psnr_db"),
        "val_bits_per_image": m.quality.get("val_bits_per_image"),
        "loaded": m.loaded, "provider": m.provider,
        "any_size": m.any_size, "stride": m.stride, "operations": list(m.operations),
        "val_bpp": m.quality.get("val_bpp"),
    } for m in infos]


def _image_column(r: dict[str, Any]) -> str:
    """``1x28x28``, or ``3xHxW/16`` for an any-size model (stride 16)."""
    if r.get("any_size"):
        return f"{r['image_shape'][0]}xHxW/{r['stride']}"
    return "x".join(map(str, r["image_shape"]))


def _size_column(r: dict[str, Any]) -> str:
    """Bytes per image (fixed-size models) or bits per pixel (photo codecs), estimated."""
    if r.get("val_bpp") is not None:
        return f"{r['val_bpp']:.3f} bpp"
    return "-" if r["val_bits_per_image"] is None else f"{r['val_bits_per_image'] / 8:.1f}"


def cmd_models(args: argparse.Namespace) -> int:
    client = client_settings(args)
    repo = RuntimeSettings.from_sources(args).models
    where = client.target or repo
    rows = (server_rows(client.target, client.security()) if client.target
            else model_rows(repo))
    if args.json:
        key = "target" if client.target else "repo"
        print(json.dumps({key: str(where), "models": rows}, indent=1))
        return 0
    if not rows:
        print(f"no models in {where}")
        return 0
    head = ("MODEL", "FAMILY", "CODE", "IMAGE", "LATENT", "FP", "PSNR dB", "BYTES est")
    table = [head] + [(
        r["ref"], r["family"], r["code_kind"], _image_column(r),
        "x".join(map(str, r["latent_shape"][:1] if r.get("any_size") else r["latent_shape"])),
        r["fingerprint"], "-" if r["val_psnr_db"] is None else f"{r['val_psnr_db']:.2f}",
        _size_column(r),
    ) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0
