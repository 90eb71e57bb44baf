#!/usr/bin/env python
"""GPU figures for one model: CUDA vs CPU parity, cross-provider decoding, throughput.

    python bench/gpu.py [--repo models] [--model mnist-ae-q3]
                        [--checkpoint runs/zoo/mnist-ae-q3.pt]
                        [--images ../shared/data/mnist/images-idx3-ubyte.gz]
                        [--batches 256,4096,32768] [--repeats 3] [--json out.json]

Needs a machine with an NVIDIA GPU and onnxruntime-gpu (CUDAExecutionProvider); without
one it prints why and exits 0 with nothing measured, so it is safe to run anywhere.

What it prints, all on the same model and the same images:

1. parity: max |CUDA - CPU| of the encoder's output (latents, or VQ indices mismatches)
   and of the decoder's output on the same symbols, and how many quantised symbols differ;
2. cross-provider codes: 1,000 codes made on CUDA decoded on CPU and 1,000 made on CPU
   decoded on CUDA; the symbols must be identical (the code format's promise) and the
   images are compared with the same-provider reconstruction;
3. images/s at each batch size for encode (network only), encode+code (network +
   quantise + entropy coding) and decode (entropy decoding + network), for:
   ORT CUDA, ORT CUDA with IO binding (inputs copied once, outputs bound on the device
   and copied back in one piece), torch CUDA eager (from the training checkpoint, if
   torch with CUDA and the checkpoint are present) and ORT CPU.

Timings: one warm-up run per configuration and batch, then the median of ``--repeats``.
The entropy coder runs on the CPU in every configuration, as in the workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BATCHES = (256, 4096, 32768)


def cuda_available() -> tuple[bool, str]:
    """(available, reason): whether onnxruntime can run CUDAExecutionProvider here."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        return False, f"onnxruntime is not installed ({exc})"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, (f"onnxruntime {ort.__version__} offers {', '.join(providers)}; "
                       "CUDAExecutionProvider needs the onnxruntime-gpu package and an NVIDIA GPU "
                       "with a CUDA 13 driver (see the gpu-worker image in the Dockerfile)")
    return True, ""


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds: one warm-up call, then the median of ``repeats`` timed calls."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tile(images: np.ndarray, n: int) -> np.ndarray:
    """``n`` images, repeating the set as needed (throughput does not depend on content)."""
    reps = -(-n // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:n])


class IOBoundRunner:
    """One ORT CUDA session run through IO binding: the input is copied to the device
    once, the output is allocated on the device and copied back as one array."""

    def __init__(self, session: Any, input_name: str, device_id: int) -> None:
        self.session = session
        self.input_name = input_name
        self.output_name = session.get_outputs()[0].name
        self.device_id = device_id

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        binding = self.session.io_binding()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id)
        binding.bind_ortvalue_input(self.input_name, x_dev)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def torch_runner(checkpoint: Path | None, device_id: int) -> tuple[Any, Any, str]:
    """(encode_fn, decode_fn, note) running the checkpoint's model eagerly on CUDA."""
    if checkpoint is None or not checkpoint.is_file():
        return None, None, f"no checkpoint at {checkpoint} (pass --checkpoint)"
    try:
        import torch

        from latentserve.export.training.train import load_checkpoint
    except ImportError as exc:
        return None, None, f"torch / latentserve.export not importable ({exc})"
    if not torch.cuda.is_available():
        return None, None, "torch has no CUDA here"
    _, model, _ = load_checkpoint(checkpoint)
    dev = torch.device("cuda", device_id)
    enc = model.onnx_encoder().to(dev).eval()
    dec = model.onnx_decoder().to(dev).eval()

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = enc(torch.from_numpy(x).to(dev))
            torch.cuda.synchronize(dev)
            return out.cpu().numpy()

    def decode(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = dec(torch.from_numpy(z).to(dev))
            torch.cuda.synchronize(dev)
            return out.cpu().numpy()

    return encode, decode, f"torch {torch.__version__} eager on {torch.cuda.get_device_name(dev)}"


def parity(cpu: Any, gpu: Any, images: np.ndarray) -> dict[str, Any]:
    """Max abs differences between the CPU and CUDA runtimes on the same inputs."""
    family = cpu.manifest.family
    out: dict[str, Any] = {"images": int(len(images))}
    e_cpu = cpu.encoder.run(None, {"image": images})[0]
    e_gpu = gpu.encoder.run(None, {"image": images})[0]
    if family == "vqvae":
        out["encoder_index_mismatches"] = int((e_cpu != e_gpu).sum())
    else:
        out["encoder_max_abs_diff"] = float(np.abs(e_cpu - e_gpu).max())
    s_cpu, s_gpu = cpu.encode(images), gpu.encode(images)
    out["symbol_mismatches"] = int((s_cpu != s_gpu).sum())
    out["symbols"] = int(s_cpu.size)
    feed_name = "indices" if family == "vqvae" else "latent"
    if family == "vqvae":
        feed = s_cpu.astype(np.int64)
    else:
        feed = s_cpu.astype(np.float32) * np.float32(cpu.manifest.factorized.step)
    d_cpu = cpu.decoder.run(None, {feed_name: feed})[0]
    d_gpu = gpu.decoder.run(None, {feed_name: feed})[0]
    out["decoder_max_abs_diff"] = float(np.abs(d_cpu - d_gpu).max())
    out["decoded_uint8_mismatches"] = int((cpu.decode(s_cpu) != gpu.decode(s_cpu)).sum())
    if cpu.prior is not None:
        l_cpu = cpu.prior_logits(s_cpu[:256])
        l_gpu = gpu.prior_logits(s_cpu[:256])
        out["prior_logits_max_abs_diff"] = float(np.abs(l_cpu - l_gpu).max())
    return out


def cross_decode(cpu_pipe: Any, gpu_pipe: Any, ref: str, images: np.ndarray) -> dict[str, Any]:
    """Codes made on one provider, decoded on the other: symbols must agree exactly."""
    out: dict[str, Any] = {"codes": int(len(images))}
    for made, read, name in ((gpu_pipe, cpu_pipe, "cuda_to_cpu"),
                             (cpu_pipe, gpu_pipe, "cpu_to_cuda")):
        codes = made.compress(ref, images)
        sym_read = read.codec(ref).decode(codes)
        sym_made = made.codec(ref).decode(codes)
        recon_read = read.reconstruct(codes, ref=ref)
        recon_made = made.reconstruct(codes, ref=ref)
        out[name] = {
            "symbol_mismatches": int((sym_read != sym_made).sum()),
            "image_max_abs_diff": int(np.abs(recon_read.astype(np.int16)
                                             - recon_made.astype(np.int16)).max()),
            "bytes_per_code": float(np.mean([len(c) for c in codes]))}
    out["identical_codes_both_ways"] = (cpu_pipe.compress(ref, images)
                                        == gpu_pipe.compress(ref, images))
    return out


def throughput(runtime: Any, codec: Any, images: np.ndarray, batches: list[int],
               repeats: int, *, encode_net: Callable[[np.ndarray], np.ndarray] | None = None,
               decode_net: Callable[[np.ndarray], np.ndarray] | None = None,
               ) -> list[dict[str, Any]]:
    """images/s per batch size for encode, encode+code and decode of one configuration.

    ``encode_net`` / ``decode_net`` replace the runtime's own session calls (IO binding,
    torch); quantisation, entropy coding and the uint8 conversion stay the runtime's.
    """
    from latentserve.worker.runtime.engine import to_uint8

    m = runtime.manifest
    family = m.family
    enc = encode_net or (lambda x: runtime.encoder.run(None, {"image": x})[0])
    name = "indices" if family == "vqvae" else "latent"
    dec = decode_net or (lambda z: runtime.decoder.run(None, {name: z})[0])

    def symbols_of(x: np.ndarray) -> np.ndarray:
        out = enc(x)
        return out.astype(np.int32) if family == "vqvae" else runtime.quantize(out)

    def feed_of(sym: np.ndarray) -> np.ndarray:
        if family == "vqvae":
            return sym.astype(np.int64)
        return sym.astype(np.float32) * np.float32(m.factorized.step)

    rows = []
    for n in batches:
        x = tile(images, n)
        codes = codec.encode(symbols_of(x))
        # Timed at once, in this iteration: the defaults only bind this batch's values.
        t_net = median_time(lambda x=x: enc(x), repeats)
        t_enc = median_time(lambda x=x: codec.encode(symbols_of(x)), repeats)
        t_dec = median_time(lambda codes=codes: to_uint8(dec(feed_of(codec.decode(codes)))),
                            repeats)
        sym = codec.decode(codes)
        t_dec_net = median_time(lambda sym=sym: dec(feed_of(sym)), repeats)
        rows.append({"batch": n, "encode_net_ips": n / t_net, "encode_code_ips": n / t_enc,
                     "decode_net_ips": n / t_dec_net, "decode_ips": n / t_dec})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(ROOT / "models"))
    parser.add_argument("--model", default="mnist-ae-q3")
    parser.add_argument("--checkpoint", default=None,
                        help="training checkpoint for the torch column [runs/zoo/MODEL.pt]")
    parser.add_argument("--images", default=str(
        ROOT.parent / "shared" / "data" / "mnist" / "images-idx3-ubyte.gz"))
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codes", type=int, default=1000,
                        help="images for the parity and cross-provider checks [1000]")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="ORT CPU intra-op threads (0 = all cores)")
    parser.add_argument("--max-cpu-batch", type=int, default=32768,
                        help="skip ORT CPU at batches above this (slow machines)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="no GPU: run every step with a second CPU session in CUDA's place, "
                             "to check the script itself (the figures mean nothing)")
    args = parser.parse_args(argv)

    ok, reason = cuda_available()
    if not ok and not args.dry_run_cpu:
        print(f"bench/gpu.py: no CUDA here, nothing measured: {reason}")
        return 0
    gpu_provider = "cpu" if args.dry_run_cpu else "cuda"

    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.images import load_images
    from latentserve.worker.runtime.pipeline import Pipeline

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    images = load_images(args.images)[-args.codes:]
    big = max(batches)
    cpu_pipe = Pipeline(args.repo, EngineConfig(provider="cpu", intra_op_threads=args.cpu_threads,
                                                max_batch=big))
    gpu_pipe = Pipeline(args.repo, EngineConfig(provider=gpu_provider, device_id=args.device_id,
                                                max_batch=big))
    ref = cpu_pipe.repository.resolve(args.model).manifest.ref
    cpu, gpu = cpu_pipe.runtime(ref), gpu_pipe.runtime(ref)
    if gpu.provider != "CUDAExecutionProvider" and not args.dry_run_cpu:
        print(f"bench/gpu.py: the CUDA session fell back to {gpu.provider}; nothing measured")
        return 1
    report: dict[str, Any] = {"model": ref, "family": cpu.manifest.family}
    where = "DRY RUN, CPU in CUDA's place" if args.dry_run_cpu else f"CUDA device {args.device_id}"
    print(f"model {ref} ({cpu.manifest.family}); {where}")

    report["parity"] = parity(cpu, gpu, images)
    print("parity:", json.dumps(report["parity"]))
    report["cross_decode"] = cross_decode(cpu_pipe, gpu_pipe, ref, images)
    print(f"cross-provider decode of {len(images):,} codes:", json.dumps(report["cross_decode"]))

    ckpt = Path(args.checkpoint) if args.checkpoint else ROOT / "runs" / "zoo" / f"{args.model}.pt"
    t_enc, t_dec, t_note = (None, None, "dry run") if args.dry_run_cpu else torch_runner(
        ckpt, args.device_id)
    gpu_codec = gpu_pipe.codec(ref)
    configs: list[tuple[str, Any, Any, Any, list[int]]] = [("ort-cuda", gpu, None, None, batches)]
    if not args.dry_run_cpu:  # IO binding to "cuda" memory needs a GPU
        dec_input = "indices" if gpu.manifest.family == "vqvae" else "latent"
        configs.append(("ort-cuda-iobinding", gpu,
                        IOBoundRunner(gpu.encoder, "image", args.device_id),
                        IOBoundRunner(gpu.decoder, dec_input, args.device_id), batches))
    if t_enc is not None:
        configs.append(("torch-cuda-eager", gpu, t_enc, t_dec, batches))
    else:
        print(f"torch CUDA eager skipped: {t_note}")
    configs.append(("ort-cpu", cpu, None, None, [b for b in batches if b <= args.max_cpu_batch]))
    report["throughput"] = {}
    print(f"\n{'config':<20} {'batch':>6} {'enc net/s':>11} {'enc+code/s':>11} "
          f"{'dec net/s':>11} {'dec+code/s':>11}")
    for label, runtime, enc, dec, bs in configs:
        codec = gpu_codec if runtime is gpu else cpu_pipe.codec(ref)
        rows = throughput(runtime, codec, images, bs, args.repeats, encode_net=enc, decode_net=dec)
        report["throughput"][label] = rows
        for r in rows:
            print(f"{label:<20} {r['batch']:>6} {r['encode_net_ips']:>11,.0f} "
                  f"{r['encode_code_ips']:>11,.0f} {r['decode_net_ips']:>11,.0f} "
                  f"{r['decode_ips']:>11,.0f}")
    report["torch"] = t_note
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
