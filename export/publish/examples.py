"""Write validation images as PNG files (the shipped ``examples/digits/``).

    python -m latentserve.export.publish.examples --data ../shared/data/mnist --out examples/digits
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from latentserve.export.training.data import DEFAULT_VAL_COUNT, load_dataset
from latentserve.worker.runtime.images import encode_png


def write_examples(data: str | Path, out: str | Path, *, count: int = 64,
                   val_count: int = DEFAULT_VAL_COUNT) -> list[Path]:
    """The first ``count`` validation images as ``val-0000.png`` ... in ``out``."""
    val = load_dataset(data, val_count=val_count).val[:count]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(val):
        path = out / f"val-{i:04d}.png"
        path.write_bytes(encode_png(image))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=64)
    args = p.parse_args(argv)
    paths = write_examples(args.data, args.out, count=args.count)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
