#!/usr/bin/env python
"""Photo codecs: speed on one 768x512 photo, and server memory on a 24-megapixel one.

    python bench/photo.py speed [--models models] [--model photo-mid] [--threads 0]
    python bench/photo.py big [--models models] [--model photo-mid] [--width 6000]
                              [--height 4000] [--limit-mib 2048]

speed: in process, the pipeline the server runs (``Pipeline.compress`` and
``reconstruct``: the networks and the coder together), on a bsds500 test photo resized
to 768x512 (bench input only; nothing of it is shipped), onnxruntime with ``--threads``
intra-op threads (0 = every core). Median of ``--repeats`` timed runs after one warm-up.

big: a real ``latentserve serve`` process (``--max-pixels-per-image 25000000``,
``--max-message-bytes 128 MiB``) gets one W x H photo (a bsds500 photo resized, as a
JPEG file in the request), Compress, then Reconstruct with a PNG reply; the server's
peak RSS (VmHWM in /proc/PID/status) before and after is printed. PASS when the peak
stays under ``--limit-mib``. The engine tiles the image (docs/code-format.md, "Any size").
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
PHOTO = ROOT.parent / "shared" / "data" / "bsds500" / "test"


def photo(width: int, height: int) -> np.ndarray:
    first = sorted(PHOTO.glob("*.jpg"))[0]
    with Image.open(first) as img:
        return np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def speed(args: argparse.Namespace) -> int:
    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.pipeline import Pipeline

    image = photo(768, 512).transpose(2, 0, 1).copy()
    pipe = Pipeline(args.models, EngineConfig(intra_op_threads=args.threads))
    pipe.reconstruct(pipe.compress(args.model, [image]))
    enc, dec, enc_cpu, dec_cpu = [], [], [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        codes = pipe.compress(args.model, [image])
        t1, c1 = time.perf_counter(), time.process_time()
        pipe.reconstruct(codes)
        dec.append(time.perf_counter() - t1)
        dec_cpu.append(time.process_time() - c1)
        enc.append(t1 - t0)
        enc_cpu.append(c1 - c0)
    bpp = len(codes[0]) * 8 / (768 * 512)
    # CPU seconds beside wall seconds: on a shared machine the wall time is mostly the
    # other processes' (with one thread, CPU time is what the call costs on a free core)
    print(f"{args.model}, 768x512, {args.threads or 'all'} thread(s): compress "
          f"{statistics.median(enc):.3f} s ({statistics.median(enc_cpu):.3f} s CPU), "
          f"reconstruct {statistics.median(dec):.3f} s ({statistics.median(dec_cpu):.3f} s "
          f"CPU) (median of {args.repeats}); {len(codes[0])} bytes = {bpp:.3f} bpp; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


def big(args: argparse.Namespace) -> int:
    import grpc

    from latentserve.v1 import inference_pb2 as pb
    from latentserve.v1 import inference_pb2_grpc as pb_grpc
    from serve_process import start_serve

    buf = io.BytesIO()
    Image.fromarray(photo(args.width, args.height)).save(buf, format="JPEG", quality=92)
    jpeg = buf.getvalue()
    limit = 128 << 20
    server = start_serve(Path(args.models), "--max-pixels-per-image", "25000000",
                         "--max-message-bytes", str(limit), "--intra-op-threads", "0",
                         merge_logs=False)
    pid = server.proc.pid
    try:
        opts = [("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit)]
        with grpc.insecure_channel(server.target, options=opts) as channel:
            stub = pb_grpc.InferenceStub(channel)
            stub.GetModel(pb.GetModelRequest(model=args.model), timeout=600)
            before = status_kib(pid, "VmHWM")
            t0 = time.perf_counter()
            code = stub.Compress(pb.CompressRequest(
                model=args.model, images=[pb.Image(encoded=jpeg)]), timeout=600).codes[0]
            t1 = time.perf_counter()
            after_compress = status_kib(pid, "VmHWM")
            reply = stub.Reconstruct(pb.ReconstructRequest(
                codes=[code], format=pb.IMAGE_FORMAT_PNG), timeout=600)
            t2 = time.perf_counter()
            peak = status_kib(pid, "VmHWM")
        with Image.open(io.BytesIO(reply.images[0].encoded)) as out:
            size = out.size
    finally:
        server.proc.terminate()
        server.proc.wait(60)
    mp = args.width * args.height / 1e6
    ok = peak / 1024 < args.limit_mib
    print(f"{args.model}, {args.width}x{args.height} ({mp:.1f} MP, JPEG in {len(jpeg) / 1e6:.1f} "
          f"MB): code {len(code)} bytes ({len(code) * 8 / (mp * 1e6):.3f} bpp), compress "
          f"{t1 - t0:.1f} s, reconstruct {t2 - t1:.1f} s (PNG reply, {size[0]}x{size[1]})")
    print(f"server peak RSS: {before / 1024:.0f} MiB before, {after_compress / 1024:.0f} MiB "
          f"after compress, {peak / 1024:.0f} MiB after reconstruct: "
          f"{'PASS' if ok else 'FAIL'} (limit {args.limit_mib} MiB)")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("speed", "big"))
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--model", default="photo-mid")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--limit-mib", type=int, default=2048)
    args = ap.parse_args()
    return speed(args) if args.what == "speed" else big(args)


if __name__ == "__main__":
    raise SystemExit(main())
