"""Codec figures per model: bytes per code vs the model's own cross-entropy, PSNR, speed.

    python bench/codec.py [--repo models] [--data ../shared/data/mnist] [--limit 1000]

For every model of the repository, on the validation split (the last 1000 images of
the MNIST IDX file, or examples/digits): mean payload and header bytes per code, the
model's cross-entropy under the integer tables each code used (bytes), their ratio and
the goal ``payload <= 1.01 x cross-entropy + 3``, PSNR (mean of per-image PSNRs, MSE
floored at 1e-10), encode and decode images/s at batch 256 on the CPU provider, and the
share of the time spent in onnxruntime (the networks, the prior included) vs the coder.
vq_prior and vq_parallel models also report how many images fell back to vq_static (the
guard) and the ideal float-softmax cost of the prior. Timings are medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from latentserve.worker.codec.codes import HEADER_SIZE, LatentCodec
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
from latentserve.worker.runtime.pipeline import Pipeline
from latentserve.worker.runtime.quality import mean_psnr

ROOT = Path(__file__).resolve().parents[1]


class Timed:
    """A real runtime that adds up the seconds spent in its onnxruntime calls."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._rt = runtime
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)

    def _timed(self, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._timed(self._rt.encode, images)

    def decode(self, symbols: np.ndarray) -> np.ndarray:
        return self._timed(self._rt.decode, symbols)

    def prior_logits(self, indices: np.ndarray) -> np.ndarray:
        return self._timed(self._rt.prior_logits, indices)

    def group_logits(self, indices: np.ndarray, group: int) -> np.ndarray:
        return self._timed(self._rt.group_logits, indices, group)

    def parallel_logits(self, indices: np.ndarray) -> np.ndarray:
        # The runtime's own loop, through the timed group_logits above.
        return ModelRuntime.parallel_logits(self, indices)  # type: ignore[arg-type]

    def prior_stepper(self, n: int) -> Any:
        from latentserve.worker.runtime.engine import PriorStepper

        return PriorStepper(self, n)  # type: ignore[arg-type]

    @property
    def prior_step(self) -> Any:
        session = getattr(self._rt, "prior_step", None)
        return None if session is None else TimedSession(session, self)


class TimedSession:
    """The prior's step graph, its runs counted in the owner's seconds."""

    def __init__(self, session: Any, owner: Timed) -> None:
        self._session, self.owner = session, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
        return self.owner._timed(self._session.run, names, feed)


def load_validation(data: str, limit: int) -> np.ndarray:
    from latentserve.worker.runtime.images import load_images, read_idx

    idx = Path(data) / "images-idx3-ubyte.gz" if Path(data).is_dir() else Path(data)
    if idx.is_file():
        return read_idx(idx)[-1000:][:limit]
    return load_images(ROOT / "examples" / "digits")[:limit]


def softmax_bits(codec: LatentCodec, symbols: np.ndarray) -> float:
    """Mean bits per image under the prior's float softmax: the ideal for kinds 3 and 4."""
    logits = codec.prior_logits(symbols).astype(np.float64)  # (N, h*w, K)
    logits -= logits.max(2, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(2, keepdims=True))
    chosen = np.take_along_axis(logp, symbols.reshape(len(symbols), -1, 1).astype(np.int64),
                                2)[..., 0]
    return float(-(chosen / np.log(2)).reshape(len(symbols), -1).sum(1).mean())


def bench_model(pipe: Pipeline, ref: str, images: np.ndarray, *, batch: int,
                repeat: int) -> dict[str, Any]:
    codec = pipe.codec(ref)
    timed = Timed(codec.runtime)
    tcodec = LatentCodec(timed)  # type: ignore[arg-type]
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    enc_runs, dec_runs = [], []
    codes: list[bytes] = []
    for _ in range(repeat):
        timed.seconds, codes = 0.0, []
        t = time.perf_counter()
        for b in batches:
            codes += tcodec.encode(timed.encode(b))
        enc_runs.append((time.perf_counter() - t, timed.seconds))
        timed.seconds, recon = 0.0, []
        t = time.perf_counter()
        for i in range(0, len(codes), batch):
            recon.append(timed.decode(tcodec.decode(codes[i:i + batch])))
        dec_runs.append((time.perf_counter() - t, timed.seconds))
    enc_total, enc_net = sorted(enc_runs)[len(enc_runs) // 2]
    dec_total, dec_net = sorted(dec_runs)[len(dec_runs) // 2]
    out = np.concatenate(recon)
    symbols = codec.runtime.encode(images)
    kinds = [c[1] for c in codes]
    payload = np.array([len(c) - HEADER_SIZE for c in codes], np.float64)
    ce_bytes = codec.cross_entropy_bits(symbols, kinds) / 8
    row = {
        "model": ref, "kind": codec.manifest.code_kind, "n": len(images),
        "payload": float(payload.mean()), "header": float(HEADER_SIZE),
        "ce": float(ce_bytes.mean()), "ratio": float(payload.mean() / ce_bytes.mean()),
        "goal_ok": bool(payload.mean() <= 1.01 * ce_bytes.mean() + 3),
        "over": float((payload - ce_bytes).mean()),
        "psnr": mean_psnr(images, out),
        "enc_ips": len(images) / enc_total, "dec_ips": len(images) / dec_total,
        "enc_net": enc_net / enc_total, "dec_net": dec_net / dec_total,
    }
    if codec.prior is not None:
        row["fallback"] = 1.0 - kinds.count(codec.prior_kind) / len(kinds)
        row["softmax_bytes"] = softmax_bits(codec, symbols) / 8
        static_bits = codec.cross_entropy_bits(symbols, [2] * len(symbols))
        row["static_bytes"] = float(static_bits.mean() / 8)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=os.environ.get("LATENTSERVE_MODELS", str(ROOT / "models")))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--limit", type=int, default=1000, help="validation images (default 1000)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads (default 1: the cores are shared)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--models", nargs="*", help="refs to bench (default: every model)")
    args = p.parse_args(argv)

    images = load_validation(args.data, args.limit)
    pipe = Pipeline(args.repo, EngineConfig(provider="cpu", intra_op_threads=args.threads))
    entries = pipe.models()
    if args.models:
        refs = args.models
    else:  # every model that takes these images (the photo codecs: bench/photo.py)
        refs = [e.manifest.ref for e in entries
                if not e.manifest.any_size and tuple(e.manifest.image_shape) == images.shape[1:]]
        for e in entries:
            if e.manifest.ref not in refs:
                print(f"  {e.manifest.ref}: skipped, it takes {e.manifest.image_shape} images "
                      "(photo codecs: bench/photo.py)", file=sys.stderr)
    print(f"repo {args.repo}: {len(images)} validation images, batch {args.batch}, "
          f"CPU, {args.threads} onnxruntime thread(s), median of {args.repeat}")
    head = ("model", "kind", "payload B", "header B", "total B", "x-ent B", "ratio",
            "goal", "PSNR dB", "enc img/s", "dec img/s", "enc net%", "dec net%")
    rows = []
    for ref in refs:
        r = bench_model(pipe, ref, images, batch=args.batch, repeat=args.repeat)
        rows.append(r)
        print(f"  {ref}: done", file=sys.stderr)
    table = [head] + [(
        r["model"], r["kind"], f"{r['payload']:.2f}", f"{r['header']:.0f}",
        f"{r['payload'] + r['header']:.2f}", f"{r['ce']:.2f}", f"{r['ratio']:.3f}",
        "ok" if r["goal_ok"] else "MISS", f"{r['psnr']:.2f}", f"{r['enc_ips']:.0f}",
        f"{r['dec_ips']:.0f}", f"{100 * r['enc_net']:.0f}", f"{100 * r['dec_net']:.0f}",
    ) for r in rows]
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    for t in table:
        print("  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w)
                        for i, (v, w) in enumerate(zip(t, widths, strict=True))))
    print("goal: payload <= 1.01 x cross-entropy + 3 bytes; net% = share of time in "
          "onnxruntime (encoder/decoder/prior), the rest is the coder")
    for r in rows:
        if "fallback" in r:
            print(f"{r['model']}: {100 * r['fallback']:.1f}% of images coded as vq_static "
                  f"(guard fallback); ideal softmax prior {r['softmax_bytes']:.2f} B, "
                  f"integer prior tables {r['ce']:.2f} B (mix of kinds), static tables "
                  f"{r['static_bytes']:.2f} B per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
