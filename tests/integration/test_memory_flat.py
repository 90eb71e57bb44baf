"""Memory stays flat: bench/memory.py's measurement at CI size.

A real ``latentserve serve`` process (with its job API and a worker inside) takes 2,000
mixed calls on ``tiny_repo`` (compress, reconstruct, sample, their streams, bad requests,
calls cancelled mid-flight or past a short deadline, small jobs), and a real
``latentserve worker`` process stores 200 chunks of compress, reconstruct and sample
jobs; each one's RSS at the end must be within 10% of its RSS after the first 10%.
Requests and chunks are large enough (up to 64 images) that keeping each one alive
would pass the limit, so a per-request or per-chunk leak fails these tests.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 0.10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_server_rss_stays_flat_over_2000_mixed_calls(bench: ModuleType, tiny_repo: Path,
                                                     mnist_images: np.ndarray) -> None:
    serve = bench.load_bench("service").serve
    with serve(tiny_repo, "--embedded-worker", "yes") as target:
        m = bench.measure_server(target, bench.child_pid("latentserve.cli serve"),
                                 requests=2000, clients=4, warmup=0.1, images=mnist_images,
                                 max_images=64, max_codes=8, max_samples=8, max_seconds=120)
    report = m.report(LIMIT)
    print(report)
    assert not m.unexpected and not m.cut_short, report
    # Every kind of call ran, and the cancels and deadlines did cut calls short.
    kinds = {k.split()[0] for k in m.outcomes}
    assert kinds == set(bench.load.WEIGHTS), report
    assert m.outcomes.get("cancel CANCELLED", 0) > 0, report
    assert m.outcomes.get("deadline DEADLINE_EXCEEDED", 0) > 0, report
    assert abs(m.ratio - 1) < LIMIT, report
    # A thread per call that never ends (a stream's reader, say) would show here first.
    assert m.end_threads <= m.warmup_threads + 8, report


@pytest.mark.queue
def test_worker_rss_stays_flat_over_200_chunks(bench: ModuleType, tiny_repo: Path,
                                               mnist_images: np.ndarray, redis_url: str) -> None:
    m = bench.measure_worker(redis_url, tiny_repo, chunks=200, chunk_size=128, warmup=0.1,
                             images=mnist_images, max_seconds=120)
    report = m.report(LIMIT)
    print(report)
    assert not m.unexpected and not m.cut_short and m.total_done >= 200, report
    assert {k.split()[0] for k in m.outcomes} >= {"compress", "reconstruct", "sample"}, report
    assert abs(m.ratio - 1) < LIMIT, report
