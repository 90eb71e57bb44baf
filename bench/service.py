#!/usr/bin/env python
"""What the gRPC layer costs, side by side in one run, on one model.

    python bench/service.py [--models models] [--model mnist-vae] [--seconds 4]
                            [--images ../shared/data/mnist/images-idx3-ubyte.gz] [--json out.json]
                            [--base ../old-tree]

The server runs as a real ``latentserve serve`` process on loopback (as deployed);
the in-process baseline is the same Pipeline with the same engine settings:

(a) Compress throughput, batch 256: gRPC vs ``Pipeline.compress`` called in process,
    each with as many calls in flight as the server has compute workers. Goal >= 0.90.
(b) 32 concurrent clients, one image per call, closed loop: dynamic batching on vs
    off (two server processes). Goal: throughput ratio >= 3; p50/p99 latency of both.
    Beside it, the ceiling: in-process images/s at 32 images per call vs 1 per call
    (what batching can save at most, when nothing else costs anything).
(c) One client, one image per call: p50/p99 latency of Compress vs the in-process call,
    and the floor: a GetModel round trip, which does no work.
(d) What a small call costs the server: its process CPU seconds (utime + stime from
    /proc/PID/stat) per one-image Compress call, with 32 clients (batching on and off)
    and with one, beside images/s at 1 and 32 clients.

Each of the 9 phases runs ``--seconds`` in all (at most ``--max-calls`` calls per round),
split into ``--rounds`` interleaved rounds, after a warm-up: the machine is shared,
so a drift in its load hits both sides of every ratio alike. ``--phases b_on,c_grpc``
runs only some of them (rows that need a missing phase are left out).

``--base TREE`` (another checkout of this repository, its stubs generated) also serves
the same models from TREE's code, and every server phase (a_grpc, b_on, b_off, c_grpc,
c_floor) runs against both servers in the same interleaved rounds: a last table gives
each figure old vs new and their ratio (server CPU per call, images/s, latency).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER_PHASES = ("a_grpc", "b_on", "b_off", "c_grpc", "c_floor")
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "images-idx3-ubyte.gz"


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q)) if samples else float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Served(str):
    """A server's target (``host:port``) that also knows the server's process id."""

    pid: int


@contextmanager
def serve(models: Path, *extra: str, tree: Path | None = None) -> Iterator[Served]:
    """A ``latentserve serve`` process on a free loopback port; yields its target
    (with ``.pid``, for its CPU time). ``tree``: run that checkout's code instead
    (first on the path, ahead of this tree's editable install).

    The job API shares the process: its embedded Valkey gets a temporary folder and no
    in-process job worker runs, so only the Inference service does work.
    """
    with (tempfile.TemporaryDirectory(prefix="bench-service-") as state,
          open(Path(state) / "stderr.log", "w+") as log):
        cmd = [sys.executable, "-m", "latentserve.cli", "serve", "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "none", "--models", str(models),
               "--grace-s", "2", "--state-dir", state, "--embedded-worker", "no", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                cwd=tree)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            if not match:
                log.seek(0)
                raise SystemExit(f"the server did not start: {line!r}\n{log.read()[-2000:]}")
            served = Served(f"127.0.0.1:{match[1]}")
            served.pid = proc.pid
            yield served
        finally:
            proc.terminate()
            proc.wait(30)
            proc.stdout.close()  # type: ignore[union-attr]


def timed_loop(fn: Callable[[], Any], seconds: float, max_calls: int) -> list[float]:
    """Call ``fn`` until ``seconds`` or ``max_calls``; returns each call's duration."""
    durations: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop and len(durations) < max_calls:
        t0 = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - t0)
    return durations


def concurrent_loops(make_call: Callable[[int], Callable[[], Any]], clients: int,
                     seconds: float, max_calls: int) -> tuple[int, float, list[float]]:
    """``clients`` closed loops at once; returns (calls, seconds, every call's latency)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        call = make_call(i)
        start.wait()
        while not stop.is_set() and len(latencies[i]) < max_calls:
            t0 = time.perf_counter()
            call()
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop_timer = threading.Timer(seconds, stop.set)
    stop_timer.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    stop_timer.cancel()
    flat = [x for lat in latencies for x in lat]
    return len(flat), elapsed, flat


class Phase:
    """One measured configuration, accumulated over interleaved rounds."""

    def __init__(self, run: Callable[[float], tuple[int, float, list[float]]], per_call: int,
                 server_pid: int | None = None):
        self.run, self.per_call, self.server_pid = run, per_call, server_pid
        self.calls, self.seconds, self.latencies = 0, 0.0, []  # type: ignore[var-annotated]
        self.cpu = 0.0  # the server process's CPU seconds during the measured rounds

    def measure(self, seconds: float) -> None:
        cpu0 = cpu_seconds(self.server_pid) if self.server_pid else 0.0
        calls, elapsed, lat = self.run(seconds)
        if self.server_pid:
            self.cpu += cpu_seconds(self.server_pid) - cpu0
        self.calls += calls
        self.seconds += elapsed
        self.latencies += lat

    @property
    def cpu_ms_per_call(self) -> float:
        return self.cpu / self.calls * 1e3 if self.calls else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.calls * self.per_call / self.seconds

    def ms(self, q: float) -> float:
        return percentile_ms(self.latencies, q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default=None,
                        help="default: the first vae, else the first model")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measured phase")
    parser.add_argument("--rounds", type=int, default=4,
                        help="phases alternate in this many rounds (load drifts cancel out)")
    parser.add_argument("--max-calls", type=int, default=20000, help="per phase (per client in b)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--phases", default="",
                        help="comma-separated phases to run (default all): a_grpc, a_local, "
                        "b_on, b_off, ceil_32, ceil_1, c_grpc, c_local, c_floor")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--base", type=Path, default=None,
                        help="another checkout: its server runs the same server phases "
                        "beside this tree's (old vs new in one run)")
    args = parser.parse_args(argv)
    if args.base is not None and not (args.base / "latentserve" / "v1").is_dir():
        raise SystemExit(f"--base {args.base}: not a checkout with generated stubs "
                         "(latentserve/v1); run `make install-dev` there once")

    from latentserve.service.client.inference import LatentServeClient
    from latentserve.service.models.versions import CachedRepository
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.runtime.images import read_idx
    from latentserve.worker.runtime.pipeline import Pipeline

    served = ServiceConfig.from_env({}, models=args.models)
    # In process: the server's engine settings and cached repository listing, and as
    # many callers as the server has compute workers, so only the serving layer differs.
    engine = served.engine_config()
    pipeline = Pipeline(CachedRepository(args.models), engine)
    entries = pipeline.models()
    if not entries:
        raise SystemExit(f"no models in {args.models}: pass --models DIR")
    model = args.model or next((e.manifest.ref for e in entries if e.manifest.family == "vae"),
                               entries[0].manifest.ref)
    model = pipeline.repository.resolve(model).manifest.ref
    images = read_idx(args.images)[-1024:] if args.images.is_file() else \
        pipeline.sample(model, 1024, seed=0)
    batch = images[:256]
    one = images[:1]
    cores = os.cpu_count()
    inflight = served.compute_threads
    print(f"bench/service.py: model {model}, {cores} cores; {served.compute_threads} "
          "compute threads x "
          f"{served.ort_threads} onnxruntime threads (server and in process alike), max batch "
          f"{served.max_batch_size}, max queue delay {served.max_queue_delay_us} us; "
          f"{args.seconds:g} s per phase")
    results: dict[str, Any] = {"model": model, "cores": cores}

    def loops(calls: list[Callable[[], Any]], per_call: int, pid: int | None = None) -> Phase:
        """len(calls) closed loops, one per callable (each warmed up once now)."""
        for call in calls:
            call()
        return Phase(lambda sec: concurrent_loops(lambda i: calls[i], len(calls), sec,
                                                  args.max_calls), per_call, pid)

    def single(call: Callable[[], Any], pid: int | None = None) -> Phase:
        call()

        def run(sec: float) -> tuple[int, float, list[float]]:
            d = timed_loop(call, sec, args.max_calls)
            return len(d), sum(d), d
        return Phase(run, 1, pid)

    def server_phases(prefix: str, target: Served, off_target: Served, client: Any,
                      on_clients: list[Any], off_clients: list[Any]
                      ) -> dict[str, Callable[[], Phase]]:
        """The phases that measure one tree's servers, named ``prefix + phase``."""
        def per_client(clients: list[Any]) -> list[Callable[[], Any]]:
            return [lambda c=c, i=i: c.compress(images[i:i + 1], model=model)
                    for i, c in enumerate(clients)]

        made: dict[str, Callable[[], Phase]] = {
            "a_grpc": lambda: loops([lambda: client.compress(batch, model=model)] * inflight,
                                    256, target.pid),
            "b_on": lambda: loops(per_client(on_clients), 1, target.pid),
            "b_off": lambda: loops(per_client(off_clients), 1, off_target.pid),
            "c_grpc": lambda: single(lambda: client.compress(one, model=model), target.pid),
            # What any call costs here: a round trip that does no work (GetModel).
            "c_floor": lambda: single(lambda: client.model(model), target.pid),
        }
        return {prefix + k: v for k, v in made.items()}

    with ExitStack() as stack:
        trees = [("", None)] + ([("base_", args.base.resolve())] if args.base else [])
        makers: dict[str, Callable[[], Phase]] = {}
        all_clients: list[Any] = []
        for prefix, tree in trees:
            target = stack.enter_context(serve(args.models, tree=tree))
            off_target = stack.enter_context(serve(args.models, "--batching", "false",
                                                   tree=tree))
            client = LatentServeClient(target, timeout=120)
            on_clients = [LatentServeClient(target, timeout=120) for _ in range(args.clients)]
            off_clients = [LatentServeClient(off_target, timeout=120)
                           for _ in range(args.clients)]
            all_clients += [client, *on_clients, *off_clients]
            makers.update(server_phases(prefix, target, off_target, client, on_clients,
                                        off_clients))
            if prefix:
                continue
            makers.update({
                "a_local": lambda: loops([lambda: pipeline.compress(model, batch)] * inflight,
                                         256),
                # The most batching can save here: in process, 32 images per call vs 1.
                "ceil_32": lambda: loops([lambda: pipeline.compress(model, images[:32])]
                                         * inflight, 32),
                "ceil_1": lambda: loops([lambda: pipeline.compress(model, one)] * inflight, 1),
                "c_local": lambda: single(lambda: pipeline.compress(model, one)),
            })
        base_names = {"base_" + n for n in SERVER_PHASES} if args.base else set()
        known = [n for n in makers if not n.startswith("base_")]
        wanted = [p for p in args.phases.split(",") if p] or known
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise SystemExit(f"unknown phases {unknown}; choose from {', '.join(known)}")
        wanted += [n for n in base_names if n[len("base_"):] in wanted]
        phases = {name: makers[name]() for name in makers if name in wanted}
        # Interleave short rounds, so a change in the machine's load hits both sides.
        order = list(phases)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                phases[name].measure(args.seconds / args.rounds)
        for c in all_clients:
            c.close()
    P = phases
    nan = float("nan")

    def tput(name: str) -> float:
        return P[name].images_per_s if name in P else nan

    def lat_ms(name: str, q: float) -> float:
        return P[name].ms(q) if name in P else nan

    def cpu_ms(name: str) -> float:
        return P[name].cpu_ms_per_call if name in P else nan

    def has(*names: str) -> bool:
        return all(n in P for n in names)

    grpc_tput, local_tput = tput("a_grpc"), tput("a_local")
    on_tput, off_tput = tput("b_on"), tput("b_off")
    ceil_32, ceil_one = tput("ceil_32"), tput("ceil_1")
    one_tput = tput("c_grpc")  # one client, one image per call: calls/s of its loop
    rows = []
    if has("a_grpc", "a_local"):
        rows.append(("(a) Compress batch 256, images/s", f"{grpc_tput:,.0f}",
                     f"{local_tput:,.0f}", f"{grpc_tput / local_tput:.2f}", ">= 0.90"))
    if has("b_on", "b_off"):
        rows.append((f"(b) {args.clients} clients x 1 image, images/s",
                     f"batching on {on_tput:,.0f}", f"off {off_tput:,.0f}",
                     f"{on_tput / off_tput:.2f}", ">= 3"))
    if has("ceil_32", "ceil_1"):
        rows.append(("(b) ceiling: in process, 32 vs 1 per call", f"{ceil_32:,.0f}",
                     f"{ceil_one:,.0f}", f"{ceil_32 / ceil_one:.2f}", ""))
    if has("b_on") or has("b_off"):
        rows.append(("(b) p50 / p99 latency, ms",
                     f"on {lat_ms('b_on', 50):.2f} / {lat_ms('b_on', 99):.2f}",
                     f"off {lat_ms('b_off', 50):.2f} / {lat_ms('b_off', 99):.2f}", "", ""))
    if has("c_grpc") or has("c_local"):
        for q in (50, 99):
            g, loc = lat_ms("c_grpc", q), lat_ms("c_local", q)
            rows.append((f"(c) 1 image, p{q} latency, ms", f"{g:.3f}", f"{loc:.3f}",
                         f"{g / loc:.2f}" if has("c_grpc", "c_local") else "", ""))
    if has("c_floor"):
        rows.append(("(c) floor: GetModel round trip p50, ms", f"{P['c_floor'].ms(50):.3f}",
                     "", "", ""))
    if has("b_on") or has("b_off"):
        rows.append((f"(d) server CPU ms per 1-image call, {args.clients} clients",
                     f"on {cpu_ms('b_on'):.3f}", f"off {cpu_ms('b_off'):.3f}", "", ""))
    if has("c_grpc"):
        rows.append(("(d) server CPU ms per 1-image call, 1 client",
                     f"{cpu_ms('c_grpc'):.3f}", "", "", ""))
    if has("c_grpc", "b_on"):
        rows.append((f"(d) images/s, 1 image per call: 1 vs {args.clients} clients",
                     f"{one_tput:,.0f}", f"{on_tput:,.0f}", f"{on_tput / one_tput:.2f}", ""))
    head = ("", "gRPC / on", "in process / off", "ratio", "goal")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    if args.base:
        compare = [
            ("(a) Compress batch 256, images/s", "a_grpc", lambda p: p.images_per_s),
            (f"(b) {args.clients} clients, batching on, images/s", "b_on",
             lambda p: p.images_per_s),
            (f"(b) {args.clients} clients, batching off, images/s", "b_off",
             lambda p: p.images_per_s),
            (f"(d) server CPU ms per call, {args.clients} clients, on", "b_on",
             lambda p: p.cpu_ms_per_call),
            (f"(d) server CPU ms per call, {args.clients} clients, off", "b_off",
             lambda p: p.cpu_ms_per_call),
            ("(d) server CPU ms per call, 1 client", "c_grpc", lambda p: p.cpu_ms_per_call),
            ("(c) 1 image, p50 latency, ms", "c_grpc", lambda p: p.ms(50)),
            ("(c) GetModel round trip p50, ms", "c_floor", lambda p: p.ms(50)),
        ]
        print(f"\nthis tree vs --base {args.base} (same rounds):")
        crow = [("", "base", "this tree", "this / base")]
        for label, name, get in compare:
            if name in P and "base_" + name in P:
                old, new = get(P["base_" + name]), get(P[name])
                crow.append((label, f"{old:,.3f}", f"{new:,.3f}", f"{new / old:.2f}"))
                results[f"base_{name}"] = {"images_per_s": P["base_" + name].images_per_s,
                                           "cpu_ms_per_call": P["base_" + name].cpu_ms_per_call,
                                           "p50_ms": P["base_" + name].ms(50)}
        cw = [max(len(r[i]) for r in crow) for i in range(4)]
        for r in crow:
            print("  ".join(v.ljust(w) for v, w in zip(r, cw, strict=True)).rstrip())
    results.update(
        a_grpc_images_per_s=grpc_tput, a_local_images_per_s=local_tput,
        a_ratio=grpc_tput / local_tput,
        b_ceiling_ratio=ceil_32 / ceil_one,
        b_on_images_per_s=on_tput, b_off_images_per_s=off_tput, b_ratio=on_tput / off_tput,
        b_on_p50_ms=lat_ms("b_on", 50), b_on_p99_ms=lat_ms("b_on", 99),
        b_off_p50_ms=lat_ms("b_off", 50), b_off_p99_ms=lat_ms("b_off", 99),
        c_grpc_p50_ms=lat_ms("c_grpc", 50), c_grpc_p99_ms=lat_ms("c_grpc", 99),
        c_local_p50_ms=lat_ms("c_local", 50), c_local_p99_ms=lat_ms("c_local", 99),
        c_floor_p50_ms=lat_ms("c_floor", 50), c_images_per_s=one_tput,
        d_on_cpu_ms_per_call=cpu_ms("b_on"), d_off_cpu_ms_per_call=cpu_ms("b_off"),
        d_one_client_cpu_ms_per_call=cpu_ms("c_grpc"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
