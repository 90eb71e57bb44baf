"""The fuzz suite: malformed requests at volume through one real gRPC server.

``--fuzz-requests N`` (or env ``LATENTSERVE_FUZZ_REQUESTS``; default 10,000) is the
total number of requests, shared among the case categories by ``WEIGHTS``. One server
(Inference and Jobs, with the Jobs service on the session's Redis under its own key
prefix, and a job worker in process) takes every case; ``test_after_fuzz.py`` runs
last and checks that it still answers good requests exactly. The terminal summary
prints the count tried and the status histogram, per code and per category. The folder
is a package so that the server (a package-scoped fixture) stops with its last test.

    pytest tests/fuzz                          # CI: 10,000 requests
    pytest tests/fuzz --fuzz-requests 100000   # a longer run
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fixtures_redis import wait_until

from .fuzz_cases import LIMITS, Codes
from .fuzz_client import STATS, WEIGHTS, Fuzzer, Stats
from .fuzz_images import ImageCase, image_corpus
from .fuzz_stream_cases import KnownJob

DEFAULT_REQUESTS = 10_000
ENV_REQUESTS = "LATENTSERVE_FUZZ_REQUESTS"
DEADLINE_S = 5.0  # every fuzz call's deadline: an answer later than this is a hang
HERE = Path(__file__).resolve().parent
GOLDEN_CODES = HERE.parent / "fixtures" / "golden_codes.json"
LAST_MODULE = "test_after_fuzz.py"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-requests", type=int, default=None, metavar="N",
                     help=f"requests the fuzz suite sends (env {ENV_REQUESTS}; "
                          f"default {DEFAULT_REQUESTS})")


def fuzz_requests(config: pytest.Config) -> int:
    value = config.getoption("fuzz_requests", default=None)
    if value is None:
        text = os.environ.get(ENV_REQUESTS, str(DEFAULT_REQUESTS))
        try:
            value = int(text)
        except ValueError:
            raise pytest.UsageError(f"{ENV_REQUESTS}={text!r} must be an integer") from None
    if value < len(WEIGHTS):
        raise pytest.UsageError(f"--fuzz-requests {value}: at least {len(WEIGHTS)}, one per "
                                "case category")
    return value


def pytest_configure(config: pytest.Config) -> None:
    config.stash[STATS] = Stats()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check the server after every fuzz case; give long runs the time they need."""
    ours = [i for i in items if HERE in Path(str(i.path)).parents]
    if not ours:
        return
    timeout = max(300, int(0.03 * fuzz_requests(config)))
    for item in ours:
        item.add_marker(pytest.mark.timeout(timeout))
    last = [i for i in ours if Path(str(i.path)).name == LAST_MODULE]
    rest = [i for i in ours if i not in last]
    if last and rest:
        for item in last:
            items.remove(item)
        at = items.index(rest[-1]) + 1
        items[at:at] = last


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    stats = config.stash.get(STATS, None)
    if stats is None or not stats.tried:
        return
    terminalreporter.section("fuzz requests and their statuses")
    for line in stats.lines():
        terminalreporter.write_line(line)


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fuzz_budget(pytestconfig: pytest.Config) -> Callable[[str], int]:
    """``fuzz_budget(category)``: how many requests that category sends."""
    total = fuzz_requests(pytestconfig)
    return lambda category: max(1, math.ceil(total * WEIGHTS[category]))


@pytest.fixture(scope="package")
def fuzz_server(tiny_repo: Path, redis_server_url: str) -> Iterator[Any]:
    """A server with small limits: Inference, and Jobs under the prefix latentserve-fuzz:.

    Its own key prefix keeps it apart from the other tests' queues on the same Redis;
    its keys are deleted at the end.
    A job worker joins after ``known_jobs`` has made a job to cancel while queued.
    """
    from latentserve.service.jobs.settings import JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.jobqueue.config import QueueConfig

    # TTLs longer than any run (a 100,000-request run takes ~25 min): the known jobs must
    # not expire mid-run. The keys are deleted at the end.
    queue = QueueConfig(prefix="latentserve-fuzz:", chunk_size=LIMITS.chunk_size,
                        max_queued_chunks=LIMITS.queued_chunks,
                        max_job_items=LIMITS.job_items, result_ttl_s=86400, job_ttl_s=86400)
    settings = JobSettings(redis_url=redis_server_url, queue=queue, embedded_worker="no")
    config = ServiceConfig(
        host="127.0.0.1", port=0, metrics_port=None, models=tiny_repo, intra_op_threads=1,
        compute_workers=1, grpc_threads=16, max_images_per_request=LIMITS.images,
        max_message_bytes=LIMITS.message_bytes, max_pixels_per_image=LIMITS.pixels,
        jobs=settings)
    server, _ = create_server(config)
    server.queue = queue  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop(0).wait(30)
    from latentserve.worker.jobqueue.store import connect

    client = connect(redis_server_url)
    try:
        keys = list(client.scan_iter(match=queue.keys.all_pattern(), count=1000))
        for at in range(0, len(keys), 500):
            client.delete(*keys[at:at + 500])
    finally:
        client.close()


@pytest.fixture(scope="package")
def fuzz_worker(fuzz_server: Any, tiny_repo: Path, redis_server_url: str,
                cancelled_job: KnownJob) -> Iterator[Any]:
    """A job worker thread on the fuzz server's queue (claims and retries kept short),
    started once ``cancelled_job`` was cancelled while still queued."""
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.consumer import create_worker

    config = WorkerConfig(redis_url=redis_server_url, queue=fuzz_server.queue,
                          models=str(tiny_repo), intra_op_threads=1, block_ms=100,
                          claim_idle_s=1.0, max_deliveries=2, grace_s=5.0)
    worker = create_worker(config, fuzz_server.pipeline)
    thread = worker.start_thread()
    yield worker
    worker.request_stop()
    thread.join(30)
    assert not thread.is_alive(), "the fuzz job worker did not stop"


@pytest.fixture(scope="package")
def channel(fuzz_server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as ch:
        yield ch


@pytest.fixture(scope="package")
def fuzzer(channel: grpc.Channel, pytestconfig: pytest.Config,
           known_jobs: tuple[KnownJob, ...]) -> Fuzzer:
    """Calls the fuzz server; its worker runs from the start (after ``known_jobs``), so
    that jobs any fuzz case gets accepted run instead of filling the queue."""
    return Fuzzer(channel, pytestconfig.stash[STATS], deadline_s=DEADLINE_S)


@pytest.fixture(scope="package")
def images(mnist_images: np.ndarray) -> np.ndarray:
    return mnist_images[:16]


@pytest.fixture(scope="package")
def corpus(images: np.ndarray) -> tuple[ImageCase, ...]:
    return image_corpus(images)


@pytest.fixture(scope="package")
def codes(tiny_pipeline: Any, images: np.ndarray) -> Codes:
    """(model, code) of real codes of every tiny model (and of the VQ-VAE's one-shot kind)."""
    out = [(m, c) for m in ("tiny-ae", "tiny-vae", "tiny-vqvae")
           for c in tiny_pipeline.compress(m, images[:3])]
    out += [("tiny-vqvae", c) for c in tiny_pipeline.compress("tiny-vqvae", images[3:5],
                                                               kind="vq_static")]
    return tuple(out)


@pytest.fixture(scope="package")
def foreign_codes() -> tuple[bytes, ...]:
    """Codes of models this server never had (the golden repository's)."""
    data = json.loads(GOLDEN_CODES.read_text())
    return tuple(bytes.fromhex(c["code"]) for c in data["codes"])


def _jobs(channel: grpc.Channel) -> Any:
    from latentserve.v1 import jobs_pb2_grpc as jgrpc

    return jgrpc.JobsStub(channel)


def _submit(channel: grpc.Channel, spec: Any, *items: Any) -> Any:
    from latentserve.v1 import jobs_pb2 as jpb

    messages = [jpb.SubmitJobRequest(spec=spec), *(jpb.SubmitJobRequest(items=i) for i in items)]
    return _jobs(channel).SubmitJob(iter(messages), timeout=30)


@pytest.fixture(scope="package")
def cancelled_job(channel: grpc.Channel) -> KnownJob:
    """A sample job cancelled while queued (``fuzz_worker`` starts after it)."""
    from latentserve.v1 import jobs_pb2 as jpb

    spec = jpb.JobSpec(kind=jpb.JOB_KIND_SAMPLE, model="tiny-vae", count=5, chunk_size=2)
    job = _submit(channel, spec)
    cancelled = _jobs(channel).CancelJob(jpb.CancelJobRequest(id=job.id), timeout=30)
    assert cancelled.state == jpb.JOB_STATE_CANCELLED, cancelled
    return KnownJob(job.id, "cancelled", 5, 2)


@pytest.fixture(scope="package")
def known_jobs(channel: grpc.Channel, cancelled_job: KnownJob,
               fuzz_worker: Any) -> tuple[KnownJob, ...]:
    """A cancelled, a succeeded and a failed job, all finished before the fuzzing starts."""
    from latentserve.v1 import jobs_pb2 as jpb

    def finished(job: Any) -> Any:
        *_, last = _jobs(channel).WatchJob(jpb.WatchJobRequest(id=job.id), timeout=60)
        return last

    good = finished(_submit(channel, jpb.JobSpec(kind=jpb.JOB_KIND_SAMPLE, model="tiny-ae",
                                                 count=3, chunk_size=2)))
    assert good.state == jpb.JOB_STATE_SUCCEEDED, good
    # A v1 header (so SubmitJob takes it) on bytes no model made: the worker refuses it,
    # failing the job (FAIL_FAST; per item it would succeed with one item error).
    not_a_code = jpb.JobItems(codes=[b"\xa1\x01" + bytes(12)])
    bad = finished(_submit(channel, jpb.JobSpec(kind=jpb.JOB_KIND_RECONSTRUCT,
                                                on_item_error=jpb.ON_ITEM_ERROR_FAIL_FAST),
                           not_a_code))
    assert bad.state == jpb.JOB_STATE_FAILED, bad
    # The worker may fail the bad job before SubmitJob seals it (then items_total is 0).
    return (cancelled_job, KnownJob(good.id, "succeeded", 3, 2),
            KnownJob(bad.id, "failed", bad.items_total, LIMITS.chunk_size))


@pytest.fixture
def idle_queue(channel: grpc.Channel, fuzz_worker: Any) -> None:
    """Wait until the worker has run every job the fuzz cases got accepted (the queue
    holds only a couple of dozen chunks: a test's own job would be refused)."""
    from latentserve.v1 import jobs_pb2 as jpb

    busy = [jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING]

    def idle() -> bool:
        request = jpb.ListJobsRequest(limit=1, states=busy)
        return not _jobs(channel).ListJobs(request, timeout=30).jobs

    wait_until(idle, timeout=180, interval=0.2, what="the fuzz jobs to finish")
