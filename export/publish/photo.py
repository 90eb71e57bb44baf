"""Photo codec checkpoints -> any-size repository versions (``image.size: "any"``).

``export_photo(net, ...)`` writes ``<repo>/<name>/<version>/`` through the same machinery
as the zoo: ONNX graphs with dynamic N, H and W (encoder uint8 -> latent, decoder latent ->
image in [0, 1]), onnxruntime-vs-torch parity (or the export fails), the factorized
density frozen into integer tables over the support of the fitting images' symbols
(``tables.ae_tables``), a manifest with ``stride`` 16 and ``sampling.kind`` "none", the
quality measured through the worker's own runtime and codec on held-out photos (bits
per pixel of whole codes, PSNR-RGB), ``check.npz`` and ``registry.json`` (that tail is
``writer.finish_version``, the same as every other exporter's).

    python -m latentserve.export.publish.photo runs/photo2/photo-lo.pt --repo models \\
        --name photo-lo --version 2 --fit ../shared/data/bsds500/train \\
        --val ../shared/data/bsds500/test --overwrite

A hyperprior net (``PhotoConfig.hyper`` > 0) is exported as code kind ``hyperprior``
with the exact layout: ``hyper_encoder.onnx`` (the float y -> z; ``z.input``
"latent"), ``hyper_decoder.npz`` (h_s
as an integer network, export/publish/hyper_int.py), z's factorized tables fitted on the
fitting crops' z, the 64 Gaussian tables over y's support (y's histogram is kept as the
manifest's ``code.factorized``, which fixes that support).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latentserve.export.nets.photo import STRIDE, PhotoCodec
from latentserve.export.publish import tables
from latentserve.export.publish.exporter import OPSET, onnx_export
from latentserve.export.publish.halves import round_to_halves, store_exact_halves
from latentserve.export.publish.hyper_int import integer_hyper_decoder
from latentserve.export.publish.writer import append_registry, check_target, finish_version
from latentserve.worker.codec.intnet import save_intnet
from latentserve.worker.runtime.manifest import manifest_fields
from latentserve.worker.runtime.quality import mean_psnr

PARITY_TOLERANCE = 1e-3   # relative to the latent's scale; float32 convs on both sides
FIT_CROP = 256
CHECK_SIZE = (48, 64)     # the check record's images: multiples of the stride
Z_STRIDE = 4              # h_a's two stride-2 convolutions


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, *, input_name: str,
                 output_name: str) -> None:
    """Trace to ONNX with dynamic batch, height and width."""
    onnx_export(module, example, path, input_name=input_name, output_name=output_name,
                opset=OPSET, axes={0: "N", 2: "H", 3: "W"})


def crops(photos: list[np.ndarray], size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random size x size crops, uint8 (N, 3, size, size)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        p = photos[int(rng.integers(len(photos)))]
        y = int(rng.integers(p.shape[0] - size + 1))
        x = int(rng.integers(p.shape[1] - size + 1))
        out.append(p[y:y + size, x:x + size].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


@torch.no_grad()
def _latents(net: PhotoCodec, images: np.ndarray) -> torch.Tensor:
    return torch.cat([net.g_a(torch.from_numpy(images[i:i + 8]).float() / 255.0)
                      for i in range(0, len(images), 8)])


class _HyperEncoder(nn.Module):
    """The float latent y (N, M, h, w), h and w multiples of 4 -> z (N, K, h/4, w/4)."""

    def __init__(self, net: PhotoCodec) -> None:
        super().__init__()
        self.h_a = net.h_a

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.h_a(latent.abs())
        return z


def _support(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the lowest and highest symbol of factorized tables."""
    lo = np.array(spec["offsets"], np.int64)
    return lo, lo + np.array([len(f) for f in spec["freqs"]], np.int64) - 1


def _hyper_code(net: PhotoCodec, folder: Path, symbols: np.ndarray,
                latents: torch.Tensor) -> dict[str, Any]:
    """Write hyper_encoder.onnx and hyper_decoder.npz; the manifest's code block. The
    fitting symbols' crops are multiples of 64 px, so no padding is involved."""
    export_graph(_HyperEncoder(net), torch.zeros(1, net.config.m, 4, 8),
                 folder / "hyper_encoder.onnx", input_name="latent", output_name="hyper_latent")
    y_spec = tables.histogram_tables(symbols, step=1.0)
    with torch.no_grad():  # h_a reads the float latent (z.input "latent")
        z = torch.round(net.h_a(latents.abs())).numpy().astype(np.int64)
    z_spec = tables.ae_tables(net.density, z)
    bound = int(np.abs(np.concatenate(_support(z_spec))).max())
    intnet, thresholds = integer_hyper_decoder(net.h_s, bound)
    (folder / "hyper_decoder.npz").write_bytes(save_intnet(intnet.layers, bound, thresholds))
    spec = tables.hyperprior_spec(y_spec, z_spec, [net.config.hyper, 0, 0])
    spec["z"].update(stride=Z_STRIDE, input="latent")  # type: ignore[attr-defined]
    return {"kind": "hyperprior", "factorized": y_spec, "hyperprior": spec}


def measure(pipeline_codec: Any, val: list[np.ndarray]) -> dict[str, Any]:
    """bpp (whole codes, headers included) and mean PSNR-RGB over the photos."""
    from latentserve.worker.codec.codes import parse_header

    codec, runtime = pipeline_codec, pipeline_codec.runtime
    bpp, psnr = [], []
    for im in val:
        size = (int(im.shape[1]), int(im.shape[2]))
        code = codec.compress_images(im[None], size=size)[0]
        header = parse_header(code)
        recon = runtime.decode(codec.decode_headers([header])[0][None], size)
        bpp.append(len(code) * 8 / (size[0] * size[1]))
        psnr.append(mean_psnr(im[None], recon))
    return {"val_images": len(val), "val_bpp": round(float(np.mean(bpp)), 4),
            "val_psnr_db": round(float(np.mean(psnr)), 3)}


def export_photo(net: PhotoCodec, *, repo: str | Path, name: str, version: int,
                 fit_images: np.ndarray, val_images: list[np.ndarray],
                 check_images: np.ndarray, source: dict[str, Any],
                 overwrite: bool = False, half_weights: bool = False) -> Path:
    """Write one any-size version of ``net``; returns its folder.

    ``half_weights`` rounds ``net``'s large weights to float16 values first (in place) and
    stores them so in the ONNX files: half the bytes; the tables, the parity check and the
    quality figures are all taken on the rounded net.
    """
    net.eval()
    if half_weights:
        round_to_halves(net)
    repo = Path(repo)
    target = check_target(repo, name, version, overwrite)
    repo.mkdir(parents=True, exist_ok=True)
    c, m = net.config.channels, net.config.m
    with tempfile.TemporaryDirectory(dir=repo, prefix=".export-") as tmp:
        folder = Path(tmp) / name / str(version)
        folder.mkdir(parents=True)
        example = torch.zeros(1, c, 2 * STRIDE, 3 * STRIDE, dtype=torch.uint8)
        export_graph(net.onnx_encoder(), example, folder / "encoder.onnx",
                     input_name="image", output_name="latent")
        export_graph(net.onnx_decoder(), torch.zeros(1, m, 2, 3), folder / "decoder.onnx",
                     input_name="latent", output_name="image")
        files = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
        latents = _latents(net, fit_images)
        symbols = torch.round(latents).numpy().astype(np.int64)
        if net.config.hyper:
            code = _hyper_code(net, folder, symbols, latents)
            files.update(hyper_encoder="hyper_encoder.onnx", hyper_decoder_int="hyper_decoder.npz")
        else:
            code = {"kind": "factorized", "factorized": tables.ae_tables(net.density, symbols)}
        if half_weights:
            for role in files.values():
                if role.endswith(".onnx"):
                    store_exact_halves(folder / role)
        manifest = manifest_fields(
            name=name, version=version, family="ae", image_shape=(c, 0, 0), latent_shape=[m],
            folder=folder, files=files,
            opset=OPSET, producer=f"torch {torch.__version__}", code=code,
            sampling={"kind": "none"}, stride=STRIDE)
        manifest["source"] = source
        manifest["training"] = {**source.get("training", {}), "half_weights": half_weights}

        def quality(runtime: Any, codec: Any) -> dict[str, Any]:
            # Parity: the ONNX encoder against torch on the check images.
            with torch.no_grad():
                want = net.g_a(torch.from_numpy(check_images).float() / 255.0).numpy()
            got = runtime._run(runtime.encoder, "image", check_images)
            diff = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
            if diff > PARITY_TOLERANCE:
                raise ValueError(f"{name}: onnxruntime and torch differ by {diff:.3g} "
                                 "(relative)")
            out = measure(codec, val_images)
            out["onnx_max_rel_diff"] = diff
            return out

        digest = finish_version(Path(tmp), folder, target, manifest, measure=quality,
                                check_images=check_images)
    append_registry(repo, name, version, digest)
    return target


def main(argv: list[str] | None = None) -> int:
    from latentserve.export.training.photo import (
        load_photo_checkpoint,
        read_photos,
        total_steps,
    )

    ap = argparse.ArgumentParser(description="export a photo codec checkpoint")
    ap.add_argument("checkpoint")
    ap.add_argument("--repo", default="models")
    ap.add_argument("--name", required=True)
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--fit", action="append", required=True,
                    help="folder of training photos the tables are fitted on (repeat)")
    ap.add_argument("--val", required=True, help="folder of held-out photos (quality)")
    ap.add_argument("--val-count", type=int, default=24)
    ap.add_argument("--fit-crops", type=int, default=128)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--half-weights", action="store_true",
                    help="round the large weights to float16 values and store them so (half "
                         "the file size; the figures are measured on the rounded net)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ckpt, net = load_photo_checkpoint(args.checkpoint)
    photos, _ = read_photos(args.fit)
    val = [p.transpose(2, 0, 1).copy() for p in read_photos([args.val])[0][:args.val_count]]
    fit = crops(photos, FIT_CROP, args.fit_crops)
    h, w = CHECK_SIZE
    check = np.ascontiguousarray(np.stack([v[:, :h, :w] for v in val[:2]]))
    source = {"kind": "photo", "checkpoint": Path(args.checkpoint).name,
              "model_config": ckpt["model_config"], "train_config": ckpt["train_config"],
              "base_config": ckpt.get("base_config"),
              "training": {"data": ckpt["data"], "steps": total_steps(ckpt),
                           "resumed_from": ckpt.get("init") or None}}
    target = export_photo(net, repo=args.repo, name=args.name, version=args.version,
                          fit_images=fit, val_images=val, check_images=check, source=source,
                          overwrite=args.overwrite, half_weights=args.half_weights)
    print(f"exported {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
