"""``latentserve demo``: the whole service on one machine, in one command.

Starts the gRPC service in this process on the model repository (loopback only,
no metrics port), compresses the example digits over gRPC with every fixed-size model
and the example photos (examples/photos) with every any-size one, reconstructs them,
samples the models that can sample, prints a table (model, bytes/image, PSNR, images/s)
and writes PNG grids (originals above reconstructions; samples) into a folder. Then
it runs a compress job and a sample job through the job queue (an embedded Valkey
with an in-process worker, its data in a temporary folder) and prints their throughput.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.worker.runtime.images import encode_png, list_image_files, read_image_file
from latentserve.worker.runtime.quality import mean_psnr

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_path(relative: str) -> Path:
    """``relative`` in the current folder if it exists there, else in the source checkout."""
    here = Path(relative)
    return here if here.exists() else REPO_ROOT / relative


def grid(rows: Sequence[Sequence[np.ndarray]], *, pad: int = 2, columns: int = 16) -> np.ndarray:
    """Rows of uint8 (C, H, W) images -> one uint8 (C, H', W') image on a white background.

    Rows longer than ``columns`` wrap; a block of rows keeps its rows together, so
    ``[originals, reconstructions]`` stays pairwise aligned.
    """
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        raise InvalidInput("nothing to draw: every row is empty")
    c = max(im.shape[0] for r in rows for im in r)
    h = max(im.shape[1] for r in rows for im in r)
    w = max(im.shape[2] for r in rows for im in r)
    width = min(columns, max(len(r) for r in rows))
    blocks = -(-max(len(r) for r in rows) // width)
    lines = [r[b * width:(b + 1) * width] for b in range(blocks) for r in rows]
    out = np.full((c, len(lines) * (h + pad) + pad, width * (w + pad) + pad), 255, np.uint8)
    for y, line in enumerate(lines):
        for x, im in enumerate(line):
            top, left = pad + y * (h + pad), pad + x * (w + pad)
            out[:, top:top + im.shape[1], left:left + im.shape[2]] = (
                im if im.shape[0] == c else np.repeat(im, c, axis=0))
    return out


def save_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(grid(rows)))
    return path


@dataclass(frozen=True)
class DemoRow:
    model: str
    family: str
    bytes_per_image: float
    psnr_db: float
    compress_per_s: float
    reconstruct_per_s: float


def run_demo(*, models: Path, examples: Path, out: Path, samples: int = 16, seed: int = 0,
             limit: int = 64, job_samples: int = 256, photos: Path | None = None,
             print_fn: Callable[[str], object] = print) -> list[DemoRow]:
    """Serve ``models`` on loopback, exercise every model over gRPC, write grids into ``out``,
    then run a compress job and a sample job (``job_samples`` items; 0 = no jobs)."""
    import tempfile

    from latentserve.service.client.inference import LatentServeClient
    from latentserve.service.jobs.settings import EMBEDDED, JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig

    files = list_image_files(examples)[:limit] if examples.is_dir() else []
    if not files:
        raise InvalidInput(f"no example images in {examples}: pass --examples DIR "
                           "(PNG/JPEG files of the models' size)")
    state = tempfile.TemporaryDirectory(prefix="latentserve-demo-")
    # The demo never touches a Redis the user may have configured: always embedded (the
    # config is built here, not from the environment).
    jobs = (JobSettings(redis_url=EMBEDDED, state_dir=Path(state.name), embedded_worker="yes")
            if job_samples else JobSettings.off())
    config = ServiceConfig(host="127.0.0.1", port=0, metrics_port=None, models=models,
                           grace_s=1.0, jobs=jobs)
    server, port = create_server(config)
    server.start()
    rows: list[DemoRow] = []
    job_rows: list[dict[str, Any]] = []  # run_demo_jobs's rows
    try:
        with LatentServeClient(f"127.0.0.1:{port}", timeout=300) as client:
            infos = [m for m in client.models() if m.newest]
            if not infos:
                raise InvalidInput(f"no models in {models}: pass --models DIR")
            print_fn(f"latentserve demo: {len(infos)} models from {models}, "
                     f"{len(files)} images from {examples}, server on 127.0.0.1:{port}")
            photo_files = (list_image_files(photos)[:limit]
                           if photos is not None and photos.is_dir() else [])
            for info in infos:
                shape = (info.channels, info.height, info.width)
                if info.any_size and not photo_files:
                    continue  # a photo codec, and no photos to show it
                originals: Any = ([read_image_file(f, shape, resize=True) for f in photo_files]
                                  if info.any_size else
                                  np.stack([read_image_file(f, shape, resize=True)
                                            for f in files]))
                client.compress(originals[:1], info.ref)  # warm up the path
                t0 = time.perf_counter()
                codes = client.compress(originals, info.ref)
                t1 = time.perf_counter()
                recon: Any = (client.reconstruct_list(codes) if info.any_size
                              else client.reconstruct(codes))
                t2 = time.perf_counter()
                drawn = (client.sample(info.ref, samples, seed=seed)
                         if "sample" in info.operations else [])
                rows.append(DemoRow(
                    model=info.ref, family=info.family,
                    bytes_per_image=float(np.mean([len(c) for c in codes])),
                    psnr_db=float(np.mean([mean_psnr(a[None], b[None])
                                           for a, b in zip(originals, recon, strict=True)])),
                    compress_per_s=len(codes) / max(t1 - t0, 1e-9),
                    reconstruct_per_s=len(codes) / max(t2 - t1, 1e-9)))
                name = info.ref.replace(":", "-v")
                save_grid(out / f"{name}-reconstructions.png", [list(originals), list(recon)])
                if len(drawn):
                    save_grid(out / f"{name}-samples.png", [list(drawn)])
        sampling = {m.ref for m in infos if "sample" in m.operations and not m.any_size}
        rows_for_jobs = [r for r in rows if r.model in sampling]
        if job_samples and rows_for_jobs:
            from latentserve.service.client.jobs import JobsClient, run_demo_jobs

            # The most compact model, for both jobs: the queue's cost shows on it most.
            best = min(rows_for_jobs, key=lambda r: r.bytes_per_image)
            shape = next((m.channels, m.height, m.width) for m in infos if m.ref == best.model)
            images = np.stack([read_image_file(f, shape, resize=True) for f in files])
            reps = -(-job_samples // len(images))
            with JobsClient(f"127.0.0.1:{port}", timeout=300) as jobs_client:
                job_rows = run_demo_jobs(jobs_client, compress_model=best.model,
                                         images=np.concatenate([images] * reps)[:job_samples],
                                         sample_model=best.model, count=job_samples, seed=seed)
    finally:
        server.stop(1.0).wait()
        state.cleanup()
    print_fn(format_table(rows))
    for job in job_rows:
        print_fn(f"job {job['job']:<8} {job['model']}: {job['items']} items in "
                 f"{float(job['seconds']):.2f} s = {float(job['items_per_s']):.0f} items/s "
                 "through the queue (submit to last result fetched)")
    print_fn(f"grids written to {out}/ (originals above reconstructions; samples)")
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    head = ("MODEL", "FAMILY", "BYTES/IMAGE", "PSNR dB", "COMPRESS img/s", "RECONSTRUCT img/s")
    body = [(r.model, r.family, f"{r.bytes_per_image:.1f}", f"{r.psnr_db:.2f}",
             f"{r.compress_per_s:.0f}", f"{r.reconstruct_per_s:.0f}") for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, *body))
