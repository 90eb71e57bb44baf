#!/usr/bin/env python
"""Train the MNIST sample-quality classifier and ship it as ONNX.

    python scripts/train_classifier.py [--data ../shared/data/mnist] [--out DIR]

Writes ``models/classifiers/mnist-classifier/1/{classifier.onnx,manifest.json}``: outside
``models/<name>/<version>`` so the model repository does not list it as a servable model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                        help="folder with images-idx3-ubyte.gz and labels-idx1-ubyte.gz")
    parser.add_argument("--out", default=str(ROOT / "models" / "classifiers" /
                                             "mnist-classifier" / "1"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the build machine is shared)")
    args = parser.parse_args(argv)

    import torch

    from latentserve.export.nets.classifier import ClassifierConfig, build

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    manifest = build(data / "images-idx3-ubyte.gz", data / "labels-idx1-ubyte.gz", args.out,
                     config=ClassifierConfig(epochs=args.epochs))
    quality: dict[str, float] = manifest["quality"]  # type: ignore[assignment]
    print(f"wrote {args.out}: validation accuracy {quality['val_accuracy']:.4f} "
          f"on {quality['val_images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
