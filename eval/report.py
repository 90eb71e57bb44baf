"""Write what ``latentserve eval`` measured: ``rd.json``, ``rd.png`` and ``rd.md``.

- ``rd.json``: every point with its per-image values, BD-rates, sample quality, settings.
- ``rd.png``: PSNR vs bytes/image (log x), one curve per model family and per codec,
  lossless references as vertical lines, the project's target region shaded.
- ``rd.md``: the same figures as Markdown tables (also printed by the CLI).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from latentserve.eval.bdrate import BDRateUndefined, bd_rate
from latentserve.eval.rd import RDPoint, curves
from latentserve.eval.samples import FidFloor, SampleQuality

ANCHOR_FAMILY = "webp"
# The project's goal (../shared/RD-NOTES.md): at >= 28.7 dB, <= 48 bytes/image all included.
TARGET_PSNR_DB = 28.7
TARGET_BYTES = 48.0
# The sample-quality target for the VQ-VAE with its prior.
class SampleTarget(TypedDict):
    family: str
    confident_share: float
    class_entropy_bits: float


SAMPLE_TARGET: SampleTarget = {"family": "vqvae", "confident_share": 0.8,
                               "class_entropy_bits": 3.2}

FAMILY_NAMES = {"ae": "AE", "vae": "VAE", "vqvae": "VQ-VAE", "jpeg": "JPEG",
                "webp": "WebP", "png": "PNG", "webp-lossless": "WebP lossless",
                "avif": "AVIF", "photo": "photo codec"}
BD_ANCHORS = ("jpeg", "webp", "avif")


def family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def bd_rates(points: Sequence[RDPoint], anchor: str = ANCHOR_FAMILY) -> dict[str, dict[str, Any]]:
    """BD-rate (percent) of each model family against the anchor codec's curve.

    An entry holds ``bd_rate_pct`` (None when undefined) and ``note`` saying why, or
    which PSNR range the two curves share.
    """
    groups = curves(points)
    base = groups.get(("codec", anchor))
    out: dict[str, dict[str, Any]] = {}
    for (kind, family), pts in groups.items():
        if kind != "model":
            continue
        if not base:
            out[family] = {"bd_rate_pct": None, "note": f"no {anchor} points measured"}
            continue
        try:
            # bits per pixel: bytes per image where every image has the same size
            value = bd_rate([p.bpp for p in base], [p.mean_psnr for p in base],
                            [p.bpp for p in pts], [p.mean_psnr for p in pts])
        except BDRateUndefined as exc:
            out[family] = {"bd_rate_pct": None, "note": str(exc)}
            continue
        lo = max(min(p.mean_psnr for p in base), min(p.mean_psnr for p in pts))
        hi = min(max(p.mean_psnr for p in base), max(p.mean_psnr for p in pts))
        out[family] = {"bd_rate_pct": value, "points": len(pts),
                       "note": f"over {lo:.2f}-{hi:.2f} dB"}
    return out


def interpolate_bytes(points: Sequence[RDPoint], psnr_db: float) -> float | None:
    """Bytes/image a curve needs at ``psnr_db``: log-bytes linear between neighbours."""
    pts = sorted(points, key=lambda p: p.mean_psnr)
    xs = [p.mean_psnr for p in pts]
    if not pts or psnr_db < xs[0] or psnr_db > xs[-1]:
        return None
    logs = [math.log(p.bytes_per_image) for p in pts]
    return float(math.exp(np.interp(psnr_db, xs, logs)))


def headline(points: Sequence[RDPoint]) -> dict[str, Any]:
    """The model point nearest the target PSNR, the smallest model point at or above it,
    and the anchor codec's interpolated bytes there."""
    models = [p for p in points if p.kind == "model"]
    out: dict[str, Any] = {"target_psnr_db": TARGET_PSNR_DB, "target_bytes": TARGET_BYTES}
    if models:
        near = min(models, key=lambda p: abs(p.mean_psnr - TARGET_PSNR_DB))
        out["nearest"] = {"label": near.label, "psnr_db": near.mean_psnr,
                          "bytes_per_image": near.bytes_per_image}
        above = [p for p in models if p.mean_psnr >= TARGET_PSNR_DB]
        if above:
            best = min(above, key=lambda p: p.bytes_per_image)
            out["smallest_at_target"] = {"label": best.label, "psnr_db": best.mean_psnr,
                                         "bytes_per_image": best.bytes_per_image,
                                         "meets_target": best.bytes_per_image <= TARGET_BYTES}
    anchor = curves(points).get(("codec", ANCHOR_FAMILY))
    if anchor:
        out[f"{ANCHOR_FAMILY}_bytes_at_target"] = interpolate_bytes(anchor, TARGET_PSNR_DB)
    return out


def to_json(points: Sequence[RDPoint], *, samples: Sequence[SampleQuality] = (),
            meta: dict[str, Any] | None = None,
            fid_floor: FidFloor | None = None) -> dict[str, Any]:
    return {"meta": meta or {}, "headline": headline(points),
            "bd_rate_vs_webp": bd_rates(points),
            "bd_rate_vs": {a: bd_rates(points, a) for a in BD_ANCHORS
                           if ("codec", a) in curves(points)},
            "points": [p.to_json() for p in points],
            "samples": [s.to_json() for s in samples],
            "fid_floor": None if fid_floor is None else fid_floor.to_json()}


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(points: Sequence[RDPoint], *, samples: Sequence[SampleQuality] = (),
             meta: dict[str, Any] | None = None, fid_floor: FidFloor | None = None) -> str:
    """The tables of ``rd.md``."""
    meta = meta or {}
    lines = []
    # MS-SSIM is a column only where it was measured (photos; digits are too small).
    ms = any(p.msssim is not None for p in points)
    if meta.get("images"):
        lines += [f"Images: {meta['images']} from `{meta.get('source', '?')}`. "
                  "Bytes are per image, all included (our code with its header; a codec's "
                  "whole file). PSNR: mean of per-image PSNRs (0-255, MSE floored at 1e-10). "
                  "SSIM: single-scale, Gaussian sigma 1.5 (scikit-image). "
                  + ("MS-SSIM: five scales, standard weights (pytorch-msssim). " if ms else "") +
                  f"Speeds: {meta.get('threads', '?')} onnxruntime thread(s); "
                  "models in one batched call, codecs one file per call.", ""]
    lines += ["| point | family | bytes/image | bits/pixel | PSNR dB | SSIM | "
              + ("MS-SSIM | " if ms else "") + "encode img/s | decode img/s |",
              "|---|---|---:|---:|---:|---:|" + ("---:|" if ms else "") + "---:|---:|"]
    for p in points:
        q = "lossless" if p.lossless else f"{p.mean_psnr:.2f}"
        m = f"{_fmt(p.mean_msssim, 4)} | " if ms else ""
        lines.append(f"| {p.label} | {family_name(p.family)} | {p.bytes_per_image:.1f} | "
                     f"{p.bpp:.3f} | {q} | {p.mean_ssim:.4f} | {m}{p.encode_ips:,.0f} | "
                     f"{p.decode_ips:,.0f} |")
    anchors = [a for a in BD_ANCHORS if ("codec", a) in curves(points)] or [ANCHOR_FAMILY]
    for anchor in anchors:
        bd = bd_rates(points, anchor)
        if not bd:
            continue
        lines += ["", f"BD-rate against {family_name(anchor)} (bits per pixel at equal PSNR; "
                  "negative = fewer bits):", "", "| family | BD-rate | points | range |",
                  "|---|---:|---:|---|"]
        for family, v in bd.items():
            lines.append(f"| {family_name(family)} | {_fmt(v['bd_rate_pct'], 1, ' %')} | "
                         f"{v.get('points', '')} | {v['note']} |")
    h = headline(points)
    # The 28.7 dB / 48-byte goal is the MNIST zoo's; a photo set's bytes are not comparable.
    if "nearest" in h and not any(p.family == "photo" for p in points):
        n = h["nearest"]
        lines += ["", f"Nearest {TARGET_PSNR_DB} dB: **{n['label']}** at {n['psnr_db']:.2f} dB, "
                  f"{n['bytes_per_image']:.1f} bytes/image."]
        if "smallest_at_target" in h:
            s = h["smallest_at_target"]
            verdict = "meets" if s["meets_target"] else "misses"
            lines.append(f"Smallest at >= {TARGET_PSNR_DB} dB: {s['label']}, "
                         f"{s['bytes_per_image']:.1f} bytes/image ({s['psnr_db']:.2f} dB): "
                         f"{verdict} the {TARGET_BYTES:.0f}-byte target.")
        wb = h.get(f"{ANCHOR_FAMILY}_bytes_at_target")
        if wb:
            lines.append(f"WebP at {TARGET_PSNR_DB} dB (interpolated): {wb:.1f} bytes/image.")
    if samples:
        lines += ["", "Sample quality (MNIST classifier: share with confidence >= 0.9; "
                  "entropy of the predicted classes, log2 10 = 3.32 bits is perfect; FID: "
                  "Frechet distance in the classifier's 64 penultimate features to the "
                  "evaluated images, lower is better, an MNIST FID not comparable with "
                  "Inception-FID):", "",
                  "| model | samples | confident | class entropy bits | FID | mean confidence "
                  "| samples/s | grid |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for s in samples:
            lines.append(f"| {s.model} | {s.count} | {s.confident_share:.1%} | "
                         f"{s.class_entropy_bits:.3f} | {_fmt(s.fid, 2)} | "
                         f"{s.mean_confidence:.3f} | {s.samples_per_s:,.0f} | {s.grid} |")
        if fid_floor is not None:
            f = fid_floor
            lines.append(f"| floor: real images from outside the evaluated range "
                         f"| {f.count} | {f.confident_share:.1%} | "
                         f"{f.class_entropy_bits:.3f} | {f.fid:.2f} | | | |")
        if meta.get("fid_note"):
            lines.append(f"\n{meta['fid_note']}.")
        t = SAMPLE_TARGET
        for s in samples:
            if s.family == t["family"]:
                met = (s.confident_share >= t["confident_share"]
                       and s.class_entropy_bits >= t["class_entropy_bits"])
                lines.append(f"\nTarget for {family_name(s.family)} samples (>= "
                             f"{t['confident_share']:.0%} confident, >= "
                             f"{t['class_entropy_bits']} bits): {s.model} "
                             f"{'meets' if met else 'misses'} it.")
    return "\n".join(lines) + "\n"


_STYLES = {"ae": ("tab:blue", "o"), "vae": ("tab:orange", "s"), "vqvae": ("tab:green", "D"),
           "jpeg": ("tab:gray", "v"), "webp": ("tab:red", "^"), "avif": ("tab:purple", "P"),
           "photo": ("tab:blue", "o")}


def plot(points: Sequence[RDPoint], path: str | Path, *, title: str = "") -> None:
    """PSNR vs bytes/image on a log x axis, one curve per family (photo sets: bits per
    pixel, and no digit target)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    photo = any(p.family == "photo" for p in points)

    def rate(p: RDPoint) -> float:
        return p.bpp if photo else p.bytes_per_image

    groups = curves(points)
    for (kind, family), pts in sorted(groups.items(), key=lambda kv: kv[0][0] == "codec"):
        color, marker = _STYLES.get(family, (None, "o"))
        xs = [rate(p) for p in pts]
        ys = [p.mean_psnr for p in pts]
        style = "-" if kind == "model" else "--"
        ax.plot(xs, ys, style, marker=marker, color=color, lw=2 if kind == "model" else 1.3,
                ms=7 if kind == "model" else 5, label=f"{family_name(family)}"
                + (f" ({len(pts)} models)" if kind == "model" and len(pts) > 1 else ""))
        for p in pts:
            text = p.label.split(":")[0] if kind == "model" else (
                f"q{p.quality}" if p.quality is not None else "")
            ax.annotate(text, (rate(p), p.mean_psnr), textcoords="offset points",
                        xytext=(5, -11 if kind == "codec" else 6), fontsize=7 if kind == "codec"
                        else 8, color=color)
    for p in points:
        if p.lossless:
            ax.axvline(rate(p), color="black", ls=":", lw=1)
            ax.text(rate(p), 0.98,
                    f" {family_name(p.family)}\n {p.bytes_per_image:.0f} B",
                    transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    if not photo:
        ax.axhline(TARGET_PSNR_DB, color="tab:purple", ls=":", lw=1)
        ax.fill_between([1, TARGET_BYTES], TARGET_PSNR_DB, 60, color="tab:purple", alpha=0.07,
                        label=f"target: >= {TARGET_PSNR_DB} dB at <= {TARGET_BYTES:.0f} B")
    lossy = [p for p in points if not p.lossless]
    if lossy:
        xs = [rate(p) for p in points]
        ys = [p.mean_psnr for p in lossy]
        ax.set_xlim(min(xs + ([] if photo else [TARGET_BYTES])) * 0.8, max(xs) * 1.25)
        ax.set_ylim(min(ys) - 1.5, max(ys) + 1.5)
    ax.set_xscale("log")
    # plain byte counts (20, 50, 100 ...) read better than 2 x 10^1
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("bits per pixel, all bytes included (log scale)" if photo
                  else "bytes per image, all included (log scale)")
    ax.set_ylabel("PSNR (dB), mean over images")
    ax.set_title(title or "Rate-distortion: learned codes vs classic codecs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


def write_report(out_dir: str | Path, points: Sequence[RDPoint], *,
                 samples: Sequence[SampleQuality] = (),
                 meta: dict[str, Any] | None = None,
                 fid_floor: FidFloor | None = None) -> dict[str, Path]:
    """Write rd.json, rd.png and rd.md into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "rd.json", "png": out / "rd.png", "md": out / "rd.md"}
    paths["json"].write_text(json.dumps(to_json(points, samples=samples, meta=meta,
                                                 fid_floor=fid_floor), indent=1) + "\n")
    plot(points, paths["png"])
    paths["md"].write_text("# Rate-distortion evaluation\n\n"
                           + markdown(points, samples=samples, meta=meta,
                                      fid_floor=fid_floor))
    return paths
