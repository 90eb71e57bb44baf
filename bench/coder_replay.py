"""Why decoders stopped re-encoding: the cheapest exact check of the shortest payload
would replay the coder's integer state (lower, range) after the last symbol, since
constriction 0.5's RangeDecoder does not expose it. This times a lower bound of that
replay (numpy, vectorised over the batch, no carries, no model quantisation) against
constriction encoding the same symbols (the re-encode it would replace), side by side.

    python bench/coder_replay.py [--images 1000] [--repeat 5]

Shape: the AE ladder's latent (mnist-ae-q1..q9), 12 x 7 x 7 = 588 symbols per image, 16-symbol
alphabets, one fixed model per channel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import constriction
import numpy as np


def replay(sym: np.ndarray, cdf: np.ndarray, pmf: np.ndarray, per_model: int) -> None:
    """The minimal per-step state update of a range coder, for every image at once."""
    n = sym.shape[1]
    lower = np.zeros(n, np.uint64)
    width = np.full(n, np.uint64(2**64 - 1))
    for s in range(sym.shape[0]):
        c = s // per_model
        left, prob = cdf[c][sym[s]], pmf[c][sym[s]]
        scale = width >> np.uint64(24)
        lower += scale * left
        width = scale * prob
        small = width < np.uint64(1 << 32)
        width = np.where(small, width << np.uint64(32), width)
        lower = np.where(small, lower << np.uint64(32), lower)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    n, channels, per_model, k = args.images, 12, 49, 16
    rng = np.random.default_rng(0)
    sym = rng.integers(0, k, (channels * per_model, n))
    cdf = np.sort(rng.integers(0, 1 << 24, (channels, k + 1)), axis=1).astype(np.uint64)
    pmf = np.maximum(np.diff(cdf, axis=1), 1).astype(np.uint64)
    model = constriction.stream.model.Categorical(np.full(k, 1 / k), perfect=False)
    rows = [np.ascontiguousarray(sym[:, i].reshape(channels, per_model), np.int32)
            for i in range(n)]

    def encode() -> None:
        for r in rows:
            coder = constriction.stream.queue.RangeEncoder()
            for part in r:
                coder.encode(part, model)
            coder.get_compressed()

    ratios = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        replay(sym, cdf, pmf, per_model)
        a = time.perf_counter() - t
        t = time.perf_counter()
        encode()
        b = time.perf_counter() - t
        ratios.append(a / b)
    print(f"{n} images: numpy state replay (lower bound) / constriction encode, time: "
          f"median {statistics.median(ratios):.2f} [{min(ratios):.2f}..{max(ratios):.2f}] "
          f"over {args.repeat} rounds")


if __name__ == "__main__":
    main()
