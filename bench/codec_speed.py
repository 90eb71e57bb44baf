"""Coder speed, side by side in one run: constriction alone, the old coder, the new one.

    python bench/codec_speed.py [--repo models] [--limit 1000] [--repeat 5] [--models ...]

Per model and kind (factorized; vq_static; vq_prior), on the same symbols, images/s of:

- ``raw``: constriction itself, one RangeEncoder (RangeDecoder) per image, each table a
  model built once (per channel / per grid position); vq_prior: one per-symbol family
  call under the same float64 tables (decode: one call per grid position, as a decoder
  must go). The library's own per-image speed.
- ``old``: the reference coder (``worker/codec/entropy_reference.py``: per-image float64
  tables, the payload bisected and checked by decoding; vq_prior: the dense table rule,
  ``entropy.plan_offsets``), with the header and checks (decode: re-encoded).
- ``new``: ``Pipeline.compress`` / ``Pipeline.reconstruct`` minus the time inside their
  networks (the encoder / decoder; vq_prior: the prior is counted apart as ``prior s``).

``new/raw`` is the goal's ratio (>= 0.5). Each figure is the median of ``--repeat``
rounds; every round runs raw, old and new one after the other, so all three share the
machine's load. The cores are shared: repeat and read ranges, not single figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_codec", HERE / "codec.py")
assert _spec is not None and _spec.loader is not None
bench_codec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_codec)
Timed, load_validation = bench_codec.Timed, bench_codec.load_validation

from latentserve.errors import CodeError
from latentserve.worker.codec import entropy_reference as ref
from latentserve.worker.codec.codes import (
    FACTORIZED,
    VQ_PRIOR,
    VQ_STATIC,
    LatentCodec,
    pack,
)
from latentserve.worker.codec.entropy import (
    FAMILY,
    RangeDecoder,
    RangeEncoder,
    fixed_model,
    not_canonical,
    plan_offsets,
)
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


# -- raw constriction -----------------------------------------------------------------

def raw_encode(models: list[Any], rows: list[np.ndarray]) -> list[np.ndarray]:
    """One coder per image, one call per (model, symbols) part; the sealed words."""
    out = []
    for parts in rows:
        coder = RangeEncoder()
        for model, s in zip(models, parts, strict=True):
            coder.encode(s, model)
        out.append(coder.get_compressed())
    return out


def raw_decode(models: list[Any], words: list[np.ndarray], amounts: list[int]) -> None:
    for w in words:
        coder = RangeDecoder(w)
        for model, amount in zip(models, amounts, strict=True):
            coder.decode(model, amount) if amount > 1 else coder.decode(model)


def raw_parts(codec: LatentCodec, symbols: np.ndarray,
              kind: int) -> tuple[list[Any], list[list[Any]], list[int]]:
    """Models, per image the symbols each model codes, and how many per model."""
    if kind == FACTORIZED:
        t = codec.factorized
        assert t is not None
        coded = [c for c, p in enumerate(t.probs) if len(p) > 1]
        models = [fixed_model(t.probs[c]) for c in coded]
        rel = (symbols.reshape(len(symbols), t.shape[0], -1)
               - t.offsets.reshape(1, -1, 1)).astype(np.int32)
        return models, [[img[c] for c in coded] for img in rel], [rel.shape[2]] * len(coded)
    t = codec.static
    assert t is not None
    models = [fixed_model(p) for p in t.probs]
    return models, symbols.reshape(len(symbols), -1).tolist(), [1] * len(models)


# -- the old coder (the reference path) ------------------------------------------------

def old_encode(codec: LatentCodec, symbols: np.ndarray, kind: int,
               plan: tuple[np.ndarray, np.ndarray] | None = None) -> list[bytes]:
    """LatentCodec.encode as it was: per-image checks, per-symbol tables, decode check."""
    digest = codec.manifest.digest
    if kind == FACTORIZED:
        assert codec.factorized is not None
        for s in symbols:
            codec.factorized.check(s)
        return [pack(digest, kind, ref.factorized_encode(codec.factorized, s)) for s in symbols]
    assert codec.static is not None
    codec.static.check(symbols)
    if kind == VQ_STATIC:
        return [pack(digest, kind, ref.static_encode(codec.static, s)) for s in symbols]
    # The dense rule of entropy.py, as the coder computed it before prior_sparse.
    offsets, probs = (plan if plan is not None
                      else plan_offsets(codec.prior_logits(symbols), codec.prior))  # type: ignore[arg-type]
    return [pack(digest, VQ_PRIOR, ref.prior_payload(int(j), s, p)) if j >= 0
            else pack(digest, VQ_STATIC, ref.static_encode(codec.static, s))
            for s, j, p in zip(symbols, offsets, probs, strict=True)]


def old_decode(codec: LatentCodec, codes: list[bytes]) -> list[np.ndarray | CodeError]:
    """Kinds 1 and 2 as decode_each did it: check, decode, re-encode, compare, per code."""
    out: list[np.ndarray | CodeError] = []
    for code in codes:
        header = codec.check(code)
        if header.kind == FACTORIZED:
            t = codec.factorized
            s = ref.factorized_decode(t, header.payload)  # type: ignore[arg-type]
            again = ref.factorized_encode(t, s)  # type: ignore[arg-type]
        else:
            t = codec.static  # type: ignore[assignment]
            s = ref.static_decode(t, header.payload)  # type: ignore[arg-type]
            again = ref.static_encode(t, s)  # type: ignore[arg-type]
        out.append(s if again == header.payload else not_canonical())
    return out


# -- timing ---------------------------------------------------------------------------

def best_of(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def clock(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_kind(pipe: Pipeline, ref_name: str, images: np.ndarray, kind: int,
               repeat: int) -> dict[str, Any]:
    codec = pipe.codec(ref_name)
    timed = Timed(codec.runtime)
    tcodec = LatentCodec(timed)  # type: ignore[arg-type]
    # Pipeline.compress / reconstruct through the timed runtime: their networks' seconds
    # are subtracted, leaving the coder, the header and the checks.
    pipe._codecs[codec.manifest.digest] = tcodec
    kind_arg = "vq_static" if kind == VQ_STATIC and codec.prior is not None else None
    symbols = codec.runtime.encode(images)
    n = len(images)
    plan = codec.prior_plan(symbols) if kind == VQ_PRIOR else None
    rounds = []
    for _ in range(repeat):
        r: dict[str, float] = {}
        if kind == VQ_PRIOR:
            assert plan is not None
            offsets, probs = plan
            mask = offsets >= 0
            flat = np.ascontiguousarray(symbols.reshape(n, -1), np.int32)

            coded = np.flatnonzero(mask)

            def raw_prior(coded: np.ndarray = coded, flat: np.ndarray = flat,
                          probs: np.ndarray = probs) -> None:
                for i in coded:
                    coder = RangeEncoder()
                    coder.encode(flat[i], FAMILY, probs[i])
                    coder.get_compressed()
            r["raw_enc"] = clock(raw_prior) * n / max(1, int(mask.sum()))
            # Decoding can only go step by step (a table depends on the indices before
            # it): one family call per grid position, under the same tables.
            words = []
            for i in coded:
                coder = RangeEncoder()
                coder.encode(flat[i], FAMILY, probs[i])
                words.append(coder.get_compressed())

            def raw_prior_dec(coded: np.ndarray = coded, words: list[np.ndarray] = words,
                              probs: np.ndarray = probs) -> None:
                for i, w in zip(coded, words, strict=True):
                    coder = RangeDecoder(w)
                    for p in range(probs.shape[1]):
                        coder.decode(FAMILY, probs[i, p:p + 1])
            r["raw_dec"] = clock(raw_prior_dec) * n / max(1, int(mask.sum()))
            timed.seconds = 0.0
            t = clock(lambda: old_encode(tcodec, symbols, kind))
            r["old_enc"] = t - timed.seconds  # the prior's network excluded, its tables not
            timed.seconds = 0.0
            t = clock(lambda: pipe.compress(ref_name, images))
            r["new_enc"] = t - timed.seconds
            timed.seconds = 0.0
            tcodec.prior_plan(symbols)
            r["prior_enc"] = timed.seconds
            codes = pipe.compress(ref_name, images)
            timed.seconds = 0.0
            t = clock(lambda codes=codes: pipe.reconstruct(codes))
            r["new_dec"], r["prior_dec"] = t - timed.seconds, timed.seconds
            rounds.append(r)
            continue
        models, rows, amounts = raw_parts(codec, symbols, kind)
        words: list[np.ndarray] = []
        # The lambdas run at once, in this round: the defaults only bind this round's values.
        r["raw_enc"] = clock(lambda words=words, models=models, rows=rows:
                             words.extend(raw_encode(models, rows)))
        r["raw_dec"] = clock(lambda models=models, words=words, amounts=amounts:
                             raw_decode(models, words, amounts))
        old_codes: list[bytes] = []
        r["old_enc"] = clock(lambda old_codes=old_codes:
                             old_codes.extend(old_encode(codec, symbols, kind)))
        r["old_dec"] = clock(lambda old_codes=old_codes: old_decode(codec, old_codes))
        timed.seconds = 0.0
        codes: list[bytes] = []
        t = clock(lambda codes=codes:
                  codes.extend(pipe.compress(ref_name, images, kind=kind_arg)))
        r["new_enc"] = t - timed.seconds
        assert codes == old_codes, "the new coder must write the old bytes"
        timed.seconds = 0.0
        t = clock(lambda codes=codes: pipe.reconstruct(codes))
        r["new_dec"] = t - timed.seconds
        rounds.append(r)
    pipe._codecs[codec.manifest.digest] = codec
    row: dict[str, Any] = {"model": ref_name, "kind": {1: "factorized", 2: "vq_static",
                                                       3: "vq_prior"}[kind]}
    for key in rounds[0]:
        row[key] = n / max(best_of(rounds, key), 1e-12)
        row[key + "_range"] = (n / max(r[key] for r in rounds),
                               n / max(min(r[key] for r in rounds), 1e-12))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=os.environ.get("LATENTSERVE_MODELS", str(ROOT / "models")))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--models", nargs="*", default=["mnist-ae-q3:1", "mnist-vqvae:1"])
    p.add_argument("--lanes", action="store_true",
                   help="only the lanes figures: 1 vs 2 compute lanes, inline vs CoderPool")
    p.add_argument("--lane-images", type=int, default=16384,
                   help="images per setup and round in --lanes (the symbols tiled)")
    args = p.parse_args(argv)
    if args.lanes:
        print_lanes(args.repo, load_validation(args.data, args.limit), args.models,
                    rounds=args.repeat, total=args.lane_images)
        return 0
    images = load_validation(args.data, args.limit)
    pipe = Pipeline(args.repo, EngineConfig(provider="cpu", intra_op_threads=1))
    print(f"{len(images)} images, one thread, median of {args.repeat} rounds "
          "(img/s; range min..max in brackets)")
    for name in args.models:
        codec = pipe.codec(name)
        kinds = ([FACTORIZED] if codec.factorized is not None and codec.static is None
                 else [VQ_STATIC] + ([VQ_PRIOR] if codec.prior is not None else []))
        for kind in kinds:
            r = bench_kind(pipe, name, images, kind, args.repeat)

            def fig(key: str, r: dict[str, Any] = r) -> str:
                lo, hi = r[key + "_range"]
                return f"{r[key]:>9.0f} [{lo:.0f}..{hi:.0f}]"
            print(f"{r['model']} {r['kind']}")
            print(f"  encode: raw {fig('raw_enc')}  old {fig('old_enc')}  new {fig('new_enc')}"
                  f"  new/raw {r['new_enc'] / r['raw_enc']:.2f}  old/raw "
                  f"{r['old_enc'] / r['raw_enc']:.2f}  new/old {r['new_enc'] / r['old_enc']:.1f}x")
            if "old_dec" in r:
                print(f"  decode: raw {fig('raw_dec')}  old {fig('old_dec')}  new {fig('new_dec')}"
                      f"  new/raw {r['new_dec'] / r['raw_dec']:.2f}  old/raw "
                      f"{r['old_dec'] / r['raw_dec']:.2f}  new/old "
                      f"{r['new_dec'] / r['old_dec']:.1f}x")
            else:
                print(f"  decode (coder, prior steps excluded): raw {fig('raw_dec')}  new "
                      f"{fig('new_dec')}  new/raw {r['new_dec'] / r['raw_dec']:.2f}; "
                      f"prior network alone: encode {r['prior_enc']:.0f}, decode "
                      f"{r['prior_dec']:.0f} img/s")
    return 0



# -- lanes: coding on every core --------------------------------------------------------

LANE_SETUPS = ("inline_1", "inline_2", "pool_1", "pool_2")


def lanes_rounds(repo: str, images: np.ndarray, name: str, *, batch: int, total: int,
                 rounds: int, processes: int = 2) -> list[dict[str, float]]:
    """Per round, codec-stage images/s (encode + decode of kinds 1/2 as the service and
    the worker run them: ``LatentCodec.encode`` and ``reconstruct_staged``, networks excluded:
    the symbols are computed once, tiled to ``total`` images) of 1 and 2 compute lanes
    (threads), inline and with a CoderPool of ``processes``. A round runs every setup
    once, one after the other, so a round's ratios share the machine's load."""
    import threading

    from latentserve.worker.codec.coderpool import CoderPool

    engine = EngineConfig(provider="cpu", intra_op_threads=1)
    inline = Pipeline(repo, engine)
    symbols = inline.codec(name).runtime.encode(images)
    symbols = np.concatenate([symbols] * -(-total // len(symbols)))[:total]
    kind = "vq_static" if inline.codec(name).static is not None else None
    batches = [symbols[i:i + batch] for i in range(0, len(symbols), batch)]

    def stage(pipe: Pipeline, lanes: int, row: dict[str, float], setup: str) -> None:
        codec = pipe.codec(name)

        def lane(k: int) -> None:
            # The service's coder halves: LatentCodec.encode (compress_staged's second
            # half) and reconstruct_staged's first (codes -> symbols, no decoder network).
            for b in batches[k::lanes]:
                pipe.reconstruct_staged(codec.encode(b, kind=kind))
        threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
        pids = codec.pool.pids() if codec.pool is not None else []
        cpu = time.process_time(), children_cpu(pids)
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        row[setup] = len(symbols) / wall
        # CPU seconds per 1000 images, in this process and in the coder processes: what
        # a setup costs whatever the load (the wall figures depend on free cores).
        row[setup + "_cpu"] = (time.process_time() - cpu[0]) * 1000 / len(symbols)
        row[setup + "_child_cpu"] = (children_cpu(pids) - cpu[1]) * 1000 / len(symbols)

    out = []
    with CoderPool(processes, min_batch=64) as pool:
        pooled = Pipeline(repo, engine, coder_pool=pool)
        stage(pooled, 2, {}, "warm")  # every process builds its tables
        for _ in range(rounds):
            row: dict[str, float] = {}
            stage(inline, 1, row, "inline_1")
            stage(inline, 2, row, "inline_2")
            stage(pooled, 1, row, "pool_1")
            stage(pooled, 2, row, "pool_2")
            out.append(row)
    return out


def children_cpu(pids: list[int]) -> float:
    """CPU seconds the given processes have used so far (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_ceiling(n: int = 3_000_000) -> float:
    """How much faster 2 processes burn pure Python than 1 right now, both timed in
    worker processes (the cores are shared: this, not 2.0, is what any 2-lane figure can
    reach)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_burn, [10, 10])
        t = time.perf_counter()
        pool.apply(_burn, (n,))
        one = time.perf_counter() - t
        t = time.perf_counter()
        pool.map(_burn, [n, n], chunksize=1)
        two = time.perf_counter() - t
    return 2 * one / two


def print_lanes(repo: str, images: np.ndarray, names: list[str], *,
                batches: tuple[int, ...] = (256, 512, 1024), total: int = 16384,
                rounds: int = 5) -> None:
    """The lanes table: per model and batch size, each setup's images/s and its ratio to
    1 lane inline in the same round (median [min..max] over ``rounds``)."""
    print(f"codec stage (encode + decode, kinds 1/2, {total} images per setup and round), "
          f"{os.cpu_count()} cores, {rounds} rounds; ratio = setup / 1 lane inline, same round, "
          "median [min..max]")
    print(f"machine ceiling before: 2 processes = {machine_ceiling():.2f}x one")
    for name in names:
        for batch in batches:
            rs = lanes_rounds(repo, images, name, batch=batch, total=total, rounds=rounds)
            cells = []
            for setup in LANE_SETUPS:
                speed = statistics.median(r[setup] for r in rs)
                ratios = [r[setup] / r["inline_1"] for r in rs]
                cells.append(f"{setup} {speed:>6.0f}/s {statistics.median(ratios):.2f}x "
                             f"[{min(ratios):.2f}..{max(ratios):.2f}]")
            print(f"  {name} batch {batch}: " + "  ".join(cells))
            cpu = {k: statistics.median(r[k + "_cpu"] for r in rs) for k in LANE_SETUPS}
            kid = {k: statistics.median(r[k + "_child_cpu"] for r in rs) for k in LANE_SETUPS}
            print("    CPU s per 1000 images (this process + coder processes): "
                  + "  ".join(f"{k} {cpu[k]:.3f}+{kid[k]:.3f}" for k in LANE_SETUPS))
    print(f"machine ceiling after: 2 processes = {machine_ceiling():.2f}x one")


if __name__ == "__main__":
    sys.exit(main())
