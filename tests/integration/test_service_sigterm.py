"""SIGTERM to a real ``latentserve serve`` process with calls in flight: all answered, exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from latentserve.service.wire import raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc

TIMEOUT = 60.0
IN_FLIGHT = 6


def in_flight(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "latentserve_rpc_in_flight"
               and s.labels.get("rpc") == "latentserve.v1.Inference/Compress")


def test_sigterm_answers_every_call_in_flight_then_exits_zero(
        tiny_repo: Path, mnist_images: np.ndarray, tmp_path: Path) -> None:
    # Batches wait up to 1 s to fill, so the calls are still queued when SIGTERM lands.
    cmd = [sys.executable, "-m", "latentserve.cli", "serve", "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--models", str(tiny_repo),
           "--max-queue-delay-us", "1000000", "--dispatch-when-idle", "false",
           "--intra-op-threads", "1", "--grace-s", "30",
           # The job API's embedded Valkey keeps its data under the test's folder.
           "--state-dir", str(tmp_path / "state"), "--embedded-worker", "no"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"serving on 127\.0\.0\.1:(\d+), metrics on port (\d+)", line)
        assert match, (f"unexpected first line {line!r}; stderr: "
                       f"{proc.stderr.read() if proc.poll() is not None else ''}")
        port, metrics_port = int(match[1]), int(match[2])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            images = mnist_images[:IN_FLIGHT]
            futures = [stub.Compress.future(pb.CompressRequest(model="tiny-vae",
                                                               images=[raw_image(im)]),
                                            timeout=TIMEOUT) for im in images]
            tick = threading.Event()
            deadline = time.monotonic() + TIMEOUT
            while in_flight(metrics_port) < IN_FLIGHT:  # the server's own count, not a sleep
                assert time.monotonic() < deadline, "the calls never reached the server"
                tick.wait(0.01)
            proc.send_signal(signal.SIGTERM)
            replies = [f.result() for f in futures]
            assert [len(r.codes) for r in replies] == [1] * IN_FLIGHT
            assert all(r.model == "tiny-vae:1" for r in replies)
        assert proc.wait(TIMEOUT) == 0
        out = proc.stdout.read()
        assert "SIGTERM: answering calls in flight" in out and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
