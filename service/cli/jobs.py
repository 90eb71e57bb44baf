"""``latentserve job submit|get|watch|fetch|cancel|list``: bulk jobs on a server.

    latentserve job submit compress IMAGES... --model NAME [--chunk-size N] [--watch]
    latentserve job submit reconstruct CODES... [--model NAME] [--format png|raw]
    latentserve job submit sample --model NAME -n COUNT [--seed S] [--temperature T]
    latentserve job watch ID          # progress bar until the job ends
    latentserve job fetch ID -o DIR [--start N]   # exit 0, or 3 if some items failed
    latentserve job cancel ID
    latentserve job list [--state running] [--limit N] [--json]

Every command takes ``--target HOST:PORT`` (env LATENTSERVE_TARGET, default
127.0.0.1:50051). ``submit`` prints the job id on stdout (so ``ID=$(latentserve job
submit ...)`` works) and details on stderr. ``get``, ``list``, ``watch`` and ``fetch``
retry through a server restart or Redis outage (UNAVAILABLE) for up to
``--retry-deadline-s`` (default 60; 0 = fail at once), resuming where they stopped.

Bad inputs (``submit --on-item-error``, default ``per-item``): a bad image or code
fails only its own item. ``fetch`` then writes ``NNNNNNN.error.json`` (index, status
code, message) in that item's place and a line per item on stderr, and its exit status
is the rule: 0 when DIR holds every item's result, 3 when it holds every item but some
are ``.error.json`` files (the job succeeded, those items failed), 1 on any other error
(the job failed or was cancelled, the server cannot be reached, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentserve.service.client.retry import DEFAULT_DEADLINE_S
from latentserve.service.client.settings import add_client_arguments, client_settings


def register(sub: Any) -> None:
    """Add ``job`` and its subcommands."""
    job = sub.add_parser("job", help="bulk jobs through the queue (submit, watch, fetch ...)",
                         description="Submit, watch, fetch, cancel and list bulk jobs on a "
                                     "latentserve server.")
    jobs = job.add_subparsers(dest="job_command", metavar="JOB_COMMAND", required=True)

    submit = jobs.add_parser("submit", help="submit a job; prints its id")
    kinds = submit.add_subparsers(dest="kind", metavar="KIND", required=True)
    p = kinds.add_parser("compress", help="images -> latent codes")
    p.add_argument("inputs", nargs="+", metavar="IMAGES",
                   help="image files, folders of them, or IDX files (.gz)")
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]")
    p.add_argument("--resize", action="store_true",
                   help="convert and resize images of another size or mode")
    _item_error_flag(p)
    _submit_flags(p)
    p = kinds.add_parser("reconstruct", help="latent codes -> images")
    p.add_argument("inputs", nargs="+", metavar="CODES",
                   help=".lsc files, .lscb containers, or folders of them")
    p.add_argument("--model", default="", metavar="NAME[:VERSION]",
                   help="refuse codes made by any other model (default: each code's own)")
    p.add_argument("--format", choices=("png", "raw"), default="png")
    _item_error_flag(p)
    _submit_flags(p)
    p = kinds.add_parser("sample", help="draw images from a model's prior")
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]")
    p.add_argument("-n", "--count", type=int, required=True, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--format", choices=("png", "raw"), default="png")
    _submit_flags(p)

    for name, text in (("get", "print a job's state and progress"),
                       ("watch", "show a job's progress until it ends"),
                       ("cancel", "cancel a job")):
        p = jobs.add_parser(name, help=text)
        p.add_argument("id", metavar="ID")
        _target(p)
    p = jobs.add_parser("fetch", help="write a job's results to a folder")
    p.add_argument("id", metavar="ID")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--start", type=int, default=None, metavar="N",
                   help="first result index [default: after the results already in DIR]")
    _target(p)
    p = jobs.add_parser("list", help="list jobs, newest first")
    p.add_argument("--state", action="append", default=[],
                   choices=("receiving", "queued", "running", "succeeded", "failed",
                            "cancelled"), help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="one JSON document")
    _target(p)
    job.set_defaults(func=cmd_job)


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retry-deadline-s", type=float, default=DEFAULT_DEADLINE_S, metavar="S",
                   help="get, list, watch and fetch retry an unavailable server or queue "
                        "for up to S seconds from the first failure, with backoff, then "
                        f"resume; 0 = fail at once [{DEFAULT_DEADLINE_S:g}]")
    add_client_arguments(p)


def _item_error_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-item-error", choices=("per-item", "fail-fast"), default="per-item",
                   help="a bad input fails only its item (per-item: the job still succeeds, "
                        "fetch reports the item) or the whole job (fail-fast) [per-item]")


def _submit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", type=int, default=0, metavar="N",
                   help="items per chunk [server default]")
    p.add_argument("--watch", action="store_true", help="then show progress until the end")
    _target(p)


def cmd_job(args: argparse.Namespace) -> int:
    from latentserve.service.client.jobs import JobsClient

    settings = client_settings(args)
    with JobsClient(settings.server, timeout=settings.timeout or 60.0,
                    retry_deadline_s=args.retry_deadline_s,
                    security=settings.security()) as client:
        handler = {"submit": _submit, "get": _get, "watch": _watch, "fetch": _fetch,
                   "cancel": _cancel, "list": _list}[args.job_command]
        return handler(client, args)


# -- handlers ---------------------------------------------------------------------------------
def _submit(client: Any, args: argparse.Namespace) -> int:
    if args.kind == "compress":
        job = client.submit_compress(args.model, _images(args.inputs), chunk_size=args.chunk_size,
                                     resize=args.resize,
                                     on_item_error=args.on_item_error.replace("-", "_"))
    elif args.kind == "reconstruct":
        job = client.submit_reconstruct(_codes(args.inputs), model=args.model,
                                        chunk_size=args.chunk_size, fmt=args.format,
                                        on_item_error=args.on_item_error.replace("-", "_"))
    else:
        job = client.submit_sample(args.model, args.count, seed=args.seed,
                                   temperature=args.temperature, chunk_size=args.chunk_size,
                                   fmt=args.format)
    print(job.id, flush=True)
    print(f"job {job.id}: {args.kind} {job.items_total} items in {job.chunks_total} chunks "
          f"of {job.chunk_size} (pool {job.pool})", file=sys.stderr)
    return _show_progress(client, job.id) if args.watch else 0


def _get(client: Any, args: argparse.Namespace) -> int:
    print(json.dumps(job_dict(client.get(args.id)), indent=1))
    return 0


def _watch(client: Any, args: argparse.Namespace) -> int:
    return _show_progress(client, args.id)


def _cancel(client: Any, args: argparse.Namespace) -> int:
    job = client.cancel(args.id)
    print(f"job {job.id}: {_state(job.state)} ({job.items_done}/{job.items_total} items done)")
    return 0


def _list(client: Any, args: argparse.Namespace) -> int:
    from latentserve.v1 import jobs_pb2 as pb

    states = [pb.JobState.Value("JOB_STATE_" + s.upper()) for s in args.state]
    jobs = client.list(args.limit, states)
    if args.json:
        print(json.dumps([job_dict(j) for j in jobs], indent=1))
        return 0
    rows = [("ID", "KIND", "MODEL", "STATE", "DONE", "ITEMS/S")] + [
        (j.id, _kind(j.kind), j.model or "-", _state(j.state),
         f"{j.items_done}/{j.items_total}", f"{j.items_per_second:.0f}") for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _fetch(client: Any, args: argparse.Namespace) -> int:
    import numpy as np

    from latentserve.worker.runtime.images import encode_png

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    job = client.get(args.id)
    suffix = ".lsc" if _kind(job.kind) == "compress" else ".png"
    start = args.start if args.start is not None else _present(out, suffix)
    written = failed = 0
    from tqdm import tqdm

    from latentserve.service.client.jobs import ItemFailed

    with tqdm(total=job.items_total or None, initial=start, unit="item",
              desc=f"fetch {job.id[:8]}", file=sys.stderr, disable=None) as bar:
        for index, result in client.fetch(args.id, start):
            if isinstance(result, ItemFailed):
                bar.write(f"item {index}: {result.code}: {result.message}", file=sys.stderr)
                text = json.dumps({"index": index, "code": result.code,
                                   "message": result.message})
                path, data = out / f"{index:07d}{ERROR_SUFFIX}", (text + "\n").encode()
                failed += 1
            else:
                path = out / f"{index:07d}{suffix}"
                data = encode_png(result) if isinstance(result, np.ndarray) else result
                written += 1
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(data)
            tmp.replace(path)  # a file is complete or absent, so a resumed fetch trusts it
            bar.update(1)
    errors = sum(1 for _ in out.glob(f"*{ERROR_SUFFIX}"))
    print(f"job {job.id}: wrote {written} files to {out} (from index {start})"
          + (f"; {errors} items failed, each with a {ERROR_SUFFIX} file there saying why"
             if errors else ""), file=sys.stderr)
    return 3 if errors else 0


# What ``fetch`` writes in place of a failed item's result (status code and message).
ERROR_SUFFIX = ".error.json"


def _present(out: Path, suffix: str) -> int:
    """How many items 0, 1, 2, ... are already in ``out``, as a result or an error
    (where to resume)."""
    n = 0
    while (out / f"{n:07d}{suffix}").is_file() or (out / f"{n:07d}{ERROR_SUFFIX}").is_file():
        n += 1
    return n


def _show_progress(client: Any, job_id: str) -> int:
    from tqdm import tqdm

    last = None
    with tqdm(unit="item", desc=f"job {job_id[:8]}", file=sys.stderr, disable=None) as bar:
        for job in client.watch(job_id):
            last = job
            if job.items_total and bar.total != job.items_total:
                bar.total = job.items_total
            bar.update(job.items_done - bar.n)
            bar.set_postfix_str(f"{_state(job.state)}, {job.chunks_done}/{job.chunks_total} "
                                f"chunks, {job.items_per_second:.0f} items/s")
    assert last is not None
    failed = (f" ({last.items_failed} of {last.items_total} items failed; fetch lists them)"
              if last.items_failed else "")
    print(f"job {job_id}: {_state(last.state)}{': ' + last.error if last.error else ''}"
          f"{failed}", file=sys.stderr)
    return 0 if _state(last.state) == "succeeded" else 1


# -- inputs -----------------------------------------------------------------------------------
def _images(paths: list[str]) -> Iterator[Any]:
    """Image file bytes (folders expanded), or raw arrays from IDX files, lazily."""
    from latentserve.worker.runtime.images import list_image_files, read_idx

    for name in paths:
        path = Path(name)
        if path.is_dir():
            for f in list_image_files(path):
                yield f.read_bytes()
        elif "idx" in path.name or path.suffix == ".gz":
            yield from read_idx(path)
        else:
            yield path.read_bytes()


def _codes(paths: list[str]) -> Iterator[bytes]:
    """Codes of .lsc files and .lscb containers (folders expanded, sorted)."""
    from latentserve.errors import InvalidInput
    from latentserve.worker.codec.container import read_container

    for name in paths:
        path = Path(name)
        files = sorted(p for p in path.iterdir() if p.suffix in (".lsc", ".lscb")) \
            if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise InvalidInput(f"{path} holds no .lsc or .lscb files")
        for f in files:
            if f.suffix == ".lscb":
                yield from read_container(f)
            else:
                yield f.read_bytes()


# -- display ----------------------------------------------------------------------------------
def _state(state: int) -> str:
    from latentserve.service.client.jobs import state_name

    return state_name(state)


def _kind(kind: int) -> str:
    from latentserve.v1 import jobs_pb2 as pb

    return pb.JobKind.Name(kind).removeprefix("JOB_KIND_").lower()


def job_dict(job: Any) -> dict[str, Any]:
    """A Job message as a plain dict (``job get``, ``job list --json``)."""
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(job, preserving_proto_field_name=True,
                      always_print_fields_with_no_presence=True)
    from latentserve.v1 import jobs_pb2 as pb

    d["kind"], d["state"] = _kind(job.kind), _state(job.state)
    d["on_item_error"] = pb.OnItemError.Name(job.on_item_error).removeprefix(
        "ON_ITEM_ERROR_").lower()
    for key in ("items_total", "items_done", "items_failed", "seed"):  # uint64: strings
        d[key] = int(d[key])
    return d
