"""``latentserve serve | compress | reconstruct | sample | demo``.

``compress``, ``reconstruct`` and ``sample`` run the Pipeline in this process
(``--local``) or call a server (``--target HOST:PORT``) through one small interface
(``client.Backend``), so both paths share every other line. Nothing heavy is imported
at module level.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentserve.errors import InvalidInput
from latentserve.service.client.settings import add_client_arguments
from latentserve.worker.runtime.settings import RuntimeSettings

CODE_SUFFIX = ".lsc"
BATCH_SUFFIX = ".lscb"


def register(sub: Any) -> None:
    """Add the serving subcommands to the top-level parser."""
    from latentserve.service.server.config import ServiceConfig

    p = sub.add_parser("serve", help="run the gRPC service",
                       description="Serve Compress / Reconstruct / Sample over gRPC, with "
                                   "health, reflection and Prometheus metrics. SIGTERM "
                                   "answers calls in flight, then exits.")
    ServiceConfig.add_arguments(p)  # the job API's and the queue's settings too
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compress", help="images -> latent codes (OUTDIR/<stem>.lsc)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="OUTDIR")
    p.add_argument("--resize", action="store_true",
                   help="convert and resize images of another size or mode")
    _add_backend(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("reconstruct", help="latent codes -> images (OUTDIR/<stem>.png)")
    p.add_argument("codes", nargs="+", metavar="CODE",
                   help=".lsc files, .lscb containers, or folders of them")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="OUTDIR")
    p.add_argument("--compare", type=Path, metavar="FILE.png",
                   help="also write a grid: originals above reconstructions")
    p.add_argument("--originals", type=Path, metavar="DIR",
                   help="where --compare finds <stem>.png originals (default: beside each code)")
    _add_backend(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("sample", help="draw images from a model's prior")
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]")
    p.add_argument("-n", type=int, default=16, metavar="N", help="how many (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0 (default 1.0)")
    p.add_argument("-o", "--out", type=Path, metavar="DIR",
                   help="write sample-<seed>-<index>.png files here")
    p.add_argument("--grid", type=Path, metavar="FILE.png", help="write one grid of all samples")
    _add_backend(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="serve the shipped models in process and try each one",
                       description="Start the service on loopback, compress the example "
                                   "digits over gRPC with every model, reconstruct and "
                                   "sample, print a table and write PNG grids; then run a "
                                   "compress job and a sample job through the job queue.")
    RuntimeSettings.add_arguments(p, only=("models",))  # default: the shipped models
    p.add_argument("--examples", type=Path, default=None, metavar="DIR",
                   help="example images [default examples/digits]")
    p.add_argument("-o", "--out", type=Path, default=Path("demo-out"), metavar="DIR",
                   help="where the grids go [default demo-out]")
    p.add_argument("--limit", type=int, default=64, help="at most this many examples")
    p.add_argument("--job-items", type=int, default=256, metavar="N",
                   help="items in the demo's compress job and sample job through the "
                        "queue; 0 skips the jobs [default 256]")
    p.set_defaults(func=cmd_demo)


def _add_backend(p: argparse.ArgumentParser) -> None:
    from latentserve.service.client.settings import ClientSettings

    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true",
                       help="run the models in this process even if LATENTSERVE_TARGET is set "
                            "(the default without a target)")
    ClientSettings.add_arguments(where, only=("target",))
    RuntimeSettings.add_arguments(p)
    p.add_argument("--batch", type=int, default=256, metavar="N",
                   help="images per call (default 256)")
    add_client_arguments(p, target=False)


def backend(args: argparse.Namespace) -> Any:
    """The Backend the flags ask for: a server when a target is given (--target or
    LATENTSERVE_TARGET) and not --local, else the models in this process."""
    from latentserve.service.client.inference import LatentServeClient, LocalBackend, RemoteBackend
    from latentserve.service.client.settings import client_settings

    client = client_settings(args)
    if client.target and not args.local:
        return RemoteBackend(LatentServeClient(client.target, timeout=client.timeout,
                                               security=client.security()))
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.runtime.pipeline import Pipeline

    local = RuntimeSettings.from_sources(args)
    engine = ServiceConfig.from_env(models=local.models, provider=local.provider).engine_config()
    return LocalBackend(Pipeline(local.models, engine))


def _progress(total: int, what: str) -> Any:
    from tqdm import tqdm

    # A bar only for many files, and only on a terminal (disable=None).
    return tqdm(total=total, unit=what, disable=None if total >= 16 else True,
                file=sys.stderr, leave=False)


def _expand(paths: Sequence[str], suffixes: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
            if not found:
                raise InvalidInput(f"{p} holds no {'/'.join(suffixes)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InvalidInput(f"{p} does not exist")
    return files


def _unique_stems(files: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise InvalidInput(f"{seen[f.stem]} and {f} would both be written as {f.stem}.*; "
                               "rename one or run them separately")
        seen[f.stem] = f


# -- serve --------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    from latentserve.service.server.assemble import create_server, security_summary
    from latentserve.service.server.config import ServiceConfig
    from latentserve.service.server.request_log import configure_logging

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServiceConfig.from_sources(args)
    configure_logging(config.log_format, config.log_level)
    if config.tracing:
        from latentserve.service.server.tracing import configure_exporter

        configure_exporter()
    server, port = create_server(config)

    def on_signal(signum: int, frame: object) -> None:
        print(f"latentserve: {signal.Signals(signum).name}: answering calls in flight "
              f"(up to {config.grace_s:g} s), then exiting", flush=True)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    metrics = f", metrics on port {server.metrics_port}" if server.metrics_port else ""
    print(f"latentserve: serving on {config.bind_host}:{port}{metrics}; models from "
          f"{config.models}\nlatentserve: {security_summary(config)}", flush=True)
    while not server.wait_for_termination(timeout=3600):
        pass
    print("latentserve: stopped", flush=True)
    return 0


# -- compress / reconstruct / sample ------------------------------------------------------

def cmd_compress(args: argparse.Namespace) -> int:
    import numpy as np

    from latentserve.service.client.inference import batched
    from latentserve.worker.runtime.images import IMAGE_SUFFIXES, read_image_file

    files = _expand(args.images, IMAGE_SUFFIXES)
    _unique_stems(files)
    be = backend(args)
    try:
        ref, shape = be.resolve(args.model)
        args.out.mkdir(parents=True, exist_ok=True)
        sizes: list[int] = []
        with _progress(len(files), "img") as bar:
            for chunk in batched(files, max(1, args.batch)):
                read = [read_image_file(f, shape, resize=args.resize) for f in chunk]
                # Fixed-size models: one array; any-size models: images of their own sizes.
                images = read if shape[1] == 0 else np.stack(read)
                for f, code in zip(chunk, be.compress(ref, images), strict=True):
                    (args.out / f"{f.stem}{CODE_SUFFIX}").write_bytes(code)
                    sizes.append(len(code))
                bar.update(len(chunk))
    finally:
        be.close()
    print(f"compressed {len(sizes)} images with {ref} ({be.where}) into {args.out}/: "
          f"{sum(sizes) / len(sizes):.1f} bytes/image on average")
    return 0


def _read_codes(files: Sequence[Path]) -> tuple[list[str], list[bytes]]:
    """(output stem, code) for every code of every file; .lscb holds many."""
    from latentserve.worker.codec.container import read_container

    stems, codes = [], []
    for f in files:
        if f.suffix.lower() == BATCH_SUFFIX:
            inner = read_container(f)
            stems += [f"{f.stem}-{i:05d}" for i in range(len(inner))]
            codes += inner
        else:
            stems.append(f.stem)
            codes.append(f.read_bytes())
    return stems, codes


def _original(stem: str, code_file: Path, folder: Path | None) -> Path:
    from latentserve.worker.runtime.images import IMAGE_SUFFIXES

    for where in ([folder] if folder else [code_file.parent, Path.cwd()]):
        for suffix in IMAGE_SUFFIXES:
            if (where / f"{stem}{suffix}").is_file():
                return where / f"{stem}{suffix}"
    looked = folder or f"{code_file.parent} or the current folder"
    raise InvalidInput(f"--compare: no original image {stem}.png (or .jpg ...) in {looked}; "
                       "point --originals at the folder that has them")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from latentserve.service.cli.demo import save_grid
    from latentserve.service.client.inference import batched
    from latentserve.worker.runtime.images import encode_png, read_image_file

    files = _expand(args.codes, (CODE_SUFFIX, BATCH_SUFFIX))
    stems, codes = _read_codes(files)
    _unique_stems([Path(s) for s in stems])
    be = backend(args)
    images = []
    try:
        with _progress(len(codes), "code") as bar:
            for start, chunk in zip(range(0, len(codes), max(1, args.batch)),
                                    batched(codes, max(1, args.batch)), strict=True):
                try:
                    images += be.reconstruct(list(chunk))
                except InvalidInput:
                    raise
                except Exception as exc:
                    raise type(exc)(f"{exc} (files from {stems[start]})") from None
                bar.update(len(chunk))
    finally:
        be.close()
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, image in zip(stems, images, strict=True):
        (args.out / f"{stem}.png").write_bytes(encode_png(image))
    print(f"reconstructed {len(images)} images ({be.where}) into {args.out}/")
    if args.compare:
        by_stem = {f.stem: f for f in files}
        originals = [read_image_file(_original(s, by_stem.get(s, files[0]), args.originals),
                                     im.shape, resize=True)
                     for s, im in zip(stems, images, strict=True)]
        save_grid(args.compare, [originals, images])
        print(f"wrote {args.compare} (originals above reconstructions)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from latentserve.service.cli.demo import save_grid
    from latentserve.worker.runtime.images import encode_png

    if args.n < 1:
        raise InvalidInput(f"-n must be >= 1, got {args.n}")
    if not args.out and not args.grid:
        raise InvalidInput("say where the samples go: -o DIR and/or --grid FILE.png")
    be = backend(args)
    try:
        ref, _ = be.resolve(args.model)
        step = max(1, args.batch)
        parts = []
        with _progress(args.n, "img") as bar:
            for start in range(0, args.n, step):
                count = min(step, args.n - start)
                parts.append(be.sample(ref, count, seed=args.seed,
                                       temperature=args.temperature, start=start))
                bar.update(count)
    finally:
        be.close()
    import numpy as np

    images = np.concatenate(parts)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            (args.out / f"sample-{args.seed}-{i:05d}.png").write_bytes(encode_png(image))
        print(f"wrote {len(images)} samples of {ref} ({be.where}) into {args.out}/")
    if args.grid:
        save_grid(args.grid, [list(images)])
        print(f"wrote {args.grid} ({len(images)} samples of {ref})")
    return 0


# -- demo --------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from latentserve.service.cli.demo import default_path, run_demo

    # The shipped models unless a repository is named (flag or LATENTSERVE_MODELS).
    models = RuntimeSettings.from_sources(args, defaults={"models": default_path("models")}).models
    examples = args.examples or default_path("examples/digits")
    run_demo(models=models, examples=examples, out=args.out, limit=args.limit,
             photos=default_path("examples/photos"),
             job_samples=args.job_items)
    return 0
