#!/usr/bin/env python
"""Give an exported MNIST classifier its ``features`` output, keeping its predictions.

    python scripts/add_classifier_features.py [DIR] [--data ../shared/data/mnist]

The shipped classifier (``models/classifiers/mnist-classifier/1``) was exported with
logits only; ``latentserve eval``'s Frechet distance needs its penultimate activations.
This adds them as a second graph output (``export.nets.classifier.add_features_output``),
checks that the logits on every image of the MNIST set are bit-identical to the old
file's, and records the new sha256 and the output in ``DIR/manifest.json``. A classifier
trained now (``scripts/train_classifier.py``) is exported with both outputs already.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=str(ROOT / "models" / "classifiers" /
                                                      "mnist-classifier" / "1"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                        help="folder with images-idx3-ubyte.gz (the bit-identity check)")
    args = parser.parse_args(argv)

    import numpy as np

    from latentserve.export.nets.classifier import (
        FEATURE_DIM,
        FEATURES_OUTPUT,
        add_features_output,
        onnx_logits,
    )
    from latentserve.worker.runtime.images import read_idx

    folder = Path(args.dir)
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    onnx_path = folder / manifest["files"]["classifier"]["path"]
    images = read_idx(Path(args.data) / "images-idx3-ubyte.gz")
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before.onnx"
        shutil.copyfile(onnx_path, before)
        digest = add_features_output(onnx_path)
        old, new = onnx_logits(before, images), onnx_logits(onnx_path, images)
    if not np.array_equal(old, new):
        shutil.copyfile(before, onnx_path)
        print(f"logits changed on {int((old != new).any(axis=1).sum())} images; "
              f"{onnx_path} restored", file=sys.stderr)
        return 1
    manifest["files"]["classifier"]["sha256"] = digest
    manifest["onnx"].update({"features": FEATURES_OUTPUT, "feature_dim": FEATURE_DIM})
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{onnx_path}: output '{FEATURES_OUTPUT}' ({FEATURE_DIM}) added; logits "
          f"bit-identical on {len(images)} images; sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
