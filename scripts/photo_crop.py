"""docs/img/photo-crop.png: a crop of the shipped example photo beside a photo codec's
reconstruction (2x nearest-neighbour, an 8 px white gap), and the code's size.

    .venv/bin/python scripts/photo_crop.py --model photo-lo [--models models]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from latentserve.worker.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "photos" / "chelsea.jpg"
CROP = (60, 130, 130, 190)  # y, x, height, width: the eyes
SCALE, GAP = 2, 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="photo-lo")
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("-o", "--out", default=str(ROOT / "docs" / "img" / "photo-crop.png"))
    args = ap.parse_args()
    with Image.open(PHOTO) as img:
        rgb = np.asarray(img.convert("RGB"), np.uint8)
    pipe = Pipeline(args.models)
    code = pipe.compress(args.model, [rgb.transpose(2, 0, 1).copy()])[0]
    recon = np.asarray(pipe.reconstruct_each([code], ref=args.model)[0]).transpose(1, 2, 0)
    y, x, h, w = CROP
    parts = [np.kron(p[y:y + h, x:x + w], np.ones((SCALE, SCALE, 1), np.uint8))
             for p in (rgb, recon)]
    gap = np.full((h * SCALE, GAP, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([parts[0], gap, parts[1]], axis=1)).save(args.out)
    pixels = rgb.shape[0] * rgb.shape[1]
    print(f"{pipe.runtime(args.model).manifest.ref}: {len(code)} bytes for the whole "
          f"{rgb.shape[1]}x{rgb.shape[0]} photo, {len(code) * 8 / pixels:.3f} bpp -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
