"""TLS, mutual TLS, bearer tokens and job ownership on real loopback servers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from certs import CertificateAuthority
from latentserve import errors as E
from latentserve.service.client.inference import LatentServeClient
from latentserve.service.client.jobs import JobsClient
from latentserve.service.client.settings import ClientSecurity
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import Server, create_server
from latentserve.service.server.auth import AuthInterceptor, TokenTable, new_token, token_line
from latentserve.service.server.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder)
    rogue = CertificateAuthority(folder / "rogue", "rogue CA")
    return {"ca": ca.pem, "server": ca.issue("server", "localhost", server=True),
            "alice": ca.issue("alice", "alice", server=False),
            "mallory": rogue.issue("mallory", "mallory", server=False)}


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, Any]:
    alice, bob = new_token(), new_token()
    path = tmp_path / "tokens.txt"
    path.write_text(f"# test tokens\n{token_line('alice', alice)}\n{token_line('bob', bob)}\n")
    return {"path": path, "alice": alice, "bob": bob}


@pytest.fixture
def start(start_server: Callable[..., Server]) -> Callable[..., Server]:
    """``start(jobs_redis=None, **config)``: see fixtures_redis.start_server."""
    return start_server


def _tls_target(server: Server) -> str:
    return f"localhost:{server.port}"


def _round_trip(client: LatentServeClient, images: np.ndarray) -> None:
    codes = client.compress(images[:4], "tiny-ae")
    assert len(codes) == 4
    assert client.reconstruct(codes).shape == (4, 1, 28, 28)


# -- TLS ---------------------------------------------------------------------------------
def test_tls_serves_trusting_clients_and_refuses_plaintext(start, pki, mnist_images):
    server = start(tls_cert=pki["server"].cert, tls_key=pki["server"].key)
    with LatentServeClient(_tls_target(server), timeout=20,
                           security=ClientSecurity(tls_ca=pki["ca"])) as client:
        _round_trip(client, mnist_images)
    with (LatentServeClient(f"127.0.0.1:{server.port}", timeout=5) as plain,
          pytest.raises(E.Unavailable)):
        plain.models()
    # A client that does not trust the server's CA (system roots) refuses the handshake.
    with (LatentServeClient(_tls_target(server), timeout=5,
                            security=ClientSecurity(tls_server_name="localhost")) as untrusting,
          pytest.raises(E.Unavailable)):
        untrusting.models()


def test_mutual_tls_needs_a_certificate_from_the_client_ca(start, pki, mnist_images):
    server = start(tls_cert=pki["server"].cert, tls_key=pki["server"].key,
                   tls_client_ca=pki["ca"])
    assert server.config.authenticated and server.config.bind_host == "127.0.0.1"
    alice = ClientSecurity(tls_ca=pki["ca"], tls_cert=pki["alice"].cert,
                           tls_key=pki["alice"].key)
    with LatentServeClient(_tls_target(server), timeout=20, security=alice) as client:
        _round_trip(client, mnist_images)
    for security in (ClientSecurity(tls_ca=pki["ca"]),  # no client certificate
                     ClientSecurity(tls_ca=pki["ca"], tls_cert=pki["mallory"].cert,
                                    tls_key=pki["mallory"].key)):  # signed by another CA
        with (LatentServeClient(_tls_target(server), timeout=5, security=security) as client,
              pytest.raises(E.Unavailable)):
            client.models()


def test_bad_tls_files_are_clear_startup_errors(tmp_path, pki):
    with pytest.raises(E.InvalidInput, match="tls_cert and tls_key go together"):
        ServiceConfig(jobs=JobSettings.off(), tls_cert=pki["server"].cert)
    with pytest.raises(E.InvalidInput, match="needs tls_cert"):
        ServiceConfig(jobs=JobSettings.off(), tls_client_ca=pki["ca"])
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")
    with pytest.raises(E.InvalidInput, match="cert.pem is not a PEM file holding a certificate"):
        create_server(ServiceConfig(jobs=JobSettings.off(),
                                    host="127.0.0.1", port=0, metrics_port=None,
                                    tls_cert=not_pem, tls_key=pki["server"].key, preload=False))
    with pytest.raises(E.InvalidInput, match="cannot read the TLS private key"):
        create_server(ServiceConfig(jobs=JobSettings.off(), host="127.0.0.1", port=0,
                                    metrics_port=None,
                                    tls_cert=pki["server"].cert, tls_key=tmp_path / "missing",
                                    preload=False))


# -- tokens ------------------------------------------------------------------------------
def test_tokens_refuse_missing_and_wrong_and_accept_listed(start, tokens, mnist_images, caplog):
    caplog.set_level(logging.DEBUG)
    server = start(auth_tokens=tokens["path"])
    target = server.target
    with (LatentServeClient(target, timeout=10) as anonymous,
          pytest.raises(E.Unauthenticated, match="no bearer token")):
        anonymous.models()
    wrong = new_token()
    with (LatentServeClient(target, timeout=10, security=ClientSecurity(token=wrong)) as client,
          pytest.raises(E.Unauthenticated, match="not valid")):
        client.compress(mnist_images[:2], "tiny-ae")
    with LatentServeClient(target, timeout=20,
                           security=ClientSecurity(token=tokens["alice"])) as client:
        _round_trip(client, mnist_images)
        assert len(client.sample("tiny-vae", 3, seed=1)) == 3  # a streaming RPC too

    # Health stays open for orchestrators; reflection does not.
    channel = grpc.insecure_channel(target)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    channel.close()

    # Refusals are counted by status; no token ever reaches a log line or a metric.
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'code="UNAUTHENTICATED"' in metrics
    for secret in (tokens["alice"], wrong, tokens["bob"]):
        assert secret not in metrics
        assert secret not in caplog.text


def test_a_revoked_token_is_refused_without_a_restart(start, tokens, monkeypatch):
    monkeypatch.setattr(TokenTable, "RECHECK_S", 0.0)
    server = start(auth_tokens=tokens["path"])
    bob = ClientSecurity(token=tokens["bob"])
    with LatentServeClient(server.target, timeout=10, security=bob) as client:
        assert client.models()
        tokens["path"].write_text(token_line("alice", tokens["alice"]) + "\n")
        with pytest.raises(E.Unauthenticated):
            client.models()
    # A broken file keeps the last good table (alice still works) rather than lock all out.
    tokens["path"].write_text("alice not-a-hash\n")
    with LatentServeClient(server.target, timeout=10,
                           security=ClientSecurity(token=tokens["alice"])) as client:
        assert client.models()


def test_tokens_file_errors_never_echo_a_line(tmp_path):
    raw = new_token()
    path = tmp_path / "tokens.txt"
    path.write_text(f"alice {raw}\n")  # a raw token pasted by mistake
    with pytest.raises(E.InvalidInput, match="line 1: expected 'NAME sha256") as info:
        TokenTable(path)
    assert raw not in str(info.value)
    path.write_text(f"{token_line('a', raw)}\n{token_line('b', raw)}\n")
    with pytest.raises(E.InvalidInput, match="line 2: the same token is listed twice"):
        TokenTable(path)
    with pytest.raises(E.InvalidInput, match="cannot read the tokens file"):
        TokenTable(tmp_path / "missing.txt")


def test_interceptor_counts_refusals_only_for_protected_methods(tokens):
    interceptor = AuthInterceptor(TokenTable(tokens["path"]))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str, metadata: tuple = ()) -> None:
            self.method, self.invocation_metadata = method, metadata

    assert interceptor.intercept_service(lambda d: handler, Details(
        "/grpc.health.v1.Health/Check")) is handler
    interceptor.intercept_service(lambda d: handler, Details("/latentserve.v1.Inference/Compress"))
    interceptor.intercept_service(lambda d: handler, Details(
        "/latentserve.v1.Inference/Compress", (("authorization", f"Bearer {tokens['bob']}"),)))
    assert interceptor.refused == 1


# -- defaults ----------------------------------------------------------------------------
def test_without_auth_the_server_listens_on_loopback_only_and_says_so(tmp_path, tokens, pki,
                                                                     tiny_repo, caplog):
    assert ServiceConfig(jobs=JobSettings.off()).bind_host == "127.0.0.1"
    assert ServiceConfig(jobs=JobSettings.off(),
                         auth_tokens=tokens["path"]).bind_host == "0.0.0.0"
    assert ServiceConfig(jobs=JobSettings.off(),
                         host="0.0.0.0").bind_host == "0.0.0.0"  # told otherwise
    caplog.set_level(logging.INFO)
    server, _ = create_server(ServiceConfig(jobs=JobSettings.off(), port=0, metrics_port=None,
                                            models=tiny_repo, preload=False))
    with server:
        assert server.target.startswith("127.0.0.1:")
    assert "plaintext, auth off, loopback only" in caplog.text
    caplog.clear()
    server, _ = create_server(ServiceConfig(jobs=JobSettings.off(), host="0.0.0.0", port=0,
                                            metrics_port=None, models=tiny_repo, preload=False))
    with server:
        pass
    assert "anyone who can reach this port can use it" in caplog.text


# -- job ownership -------------------------------------------------------------------------
@pytest.mark.queue
def test_jobs_belong_to_the_identity_that_submitted_them(start, tokens, redis_url, make_worker):
    server = start(jobs_redis=redis_url, auth_tokens=tokens["path"])

    def jobs(who: str) -> JobsClient:
        return JobsClient(server.target, timeout=20, security=ClientSecurity(token=tokens[who]))

    with jobs("alice") as alice, jobs("bob") as bob:
        job = alice.submit_sample("tiny-vae", 20, seed=3)
        assert job.owner == "alice" and len(job.id) == 32
        assert [j.id for j in alice.list()] [:1] == [job.id]
        assert job.id not in [j.id for j in bob.list()]
        unknown = "0" * 32
        for call in (bob.get, bob.cancel, lambda i: list(bob.watch(i)),
                     lambda i: list(bob.fetch(i))):
            with pytest.raises(E.JobNotFound) as theirs:
                call(job.id)
            with pytest.raises(E.JobNotFound) as nobodys:
                call(unknown)
            # Someone else's job reads exactly like an unknown one.
            assert str(theirs.value).replace(job.id, "ID") == \
                str(nobodys.value).replace(unknown, "ID")
        make_worker(queue=server.queue).run()
        assert len(list(alice.fetch(job.id))) == 20
        assert alice.get(job.id).owner == "alice"


@pytest.mark.queue
def test_mtls_identity_owns_jobs(start, pki, redis_url):
    server = start(jobs_redis=redis_url, tls_cert=pki["server"].cert,
                   tls_key=pki["server"].key, tls_client_ca=pki["ca"])
    alice = ClientSecurity(tls_ca=pki["ca"], tls_cert=pki["alice"].cert,
                           tls_key=pki["alice"].key)
    with JobsClient(_tls_target(server), timeout=20, security=alice) as client:
        job = client.submit_sample("tiny-ae", 4)
        assert job.owner == "alice"
        assert client.get(job.id).id == job.id


# -- CLI ---------------------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentserve.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_with_tls_and_a_token_file(start, pki, tmp_path, tiny_repo):
    tokens_file = tmp_path / "tokens.txt"
    made = _cli("token", "new", "carol", "--tokens", str(tokens_file))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("lst_") and token not in tokens_file.read_text()
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"
    again = _cli("token", "new", "carol", "--tokens", str(tokens_file))
    assert again.returncode == 1 and "already has a token named 'carol'" in again.stderr

    server = start(auth_tokens=tokens_file, tls_cert=pki["server"].cert,
                   tls_key=pki["server"].key)
    (tmp_path / "token").write_text(token + "\n")
    out = tmp_path / "samples"
    ok = _cli("sample", "--target", _tls_target(server), "--model", "tiny-vae", "-n", "3",
              "-o", str(out), "--tls-ca", str(pki["ca"]), "--token-file", str(tmp_path / "token"))
    assert ok.returncode == 0, ok.stderr
    assert len(list(out.glob("*.png"))) == 3
    listed = _cli("models", "--target", _tls_target(server), "--json",
                  env={"LATENTSERVE_TLS_CA": str(pki["ca"]), "LATENTSERVE_TOKEN": token})
    assert listed.returncode == 0 and "tiny-vqvae" in listed.stdout, listed.stderr
    refused = _cli("models", "--target", _tls_target(server), "--tls-ca", str(pki["ca"]))
    assert refused.returncode == 1
    assert "UNAUTHENTICATED: no bearer token" in refused.stderr


# -- overload ----------------------------------------------------------------------------
def test_calls_beyond_the_rpc_limit_are_refused_at_once_and_the_server_recovers(start):
    from latentserve.v1 import inference_pb2 as pb
    from latentserve.v1 import inference_pb2_grpc as pb_grpc

    # No idle limit within the test: the held streams keep their slots until released.
    server = start(grpc_threads=2, max_concurrent_rpcs=2, stream_idle_timeout_s=600)
    release = threading.Event()
    done: list[threading.Event] = []

    def held() -> Iterator[pb.CompressRequest]:
        finished = threading.Event()
        done.append(finished)
        yield pb.CompressRequest(model="tiny-ae")
        release.wait(300)  # a slow client: its stream stays open, holding a slot
        finished.set()

    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.InferenceStub(channel)
    streams = []
    try:
        # One at a time, each proven live by its first answer: started together, a probe
        # could take a slot first and get the second stream itself refused.
        for _ in range(2):
            streams.append(stub.CompressStream(held(), timeout=300))
            assert list(next(streams[-1]).codes) == []
        # Refused, not queued: a queued call could only be served once a held stream
        # ends, which happens after release (or 300 s); within its 60 s deadline it would
        # end DEADLINE_EXCEEDED instead of RESOURCE_EXHAUSTED. No wall-clock bound.
        with LatentServeClient(server.target, timeout=60) as client:
            with pytest.raises(E.ResourceLimit, match="Concurrent RPC limit exceeded"):
                client.models()
            assert len(done) == 2 and not any(d.is_set() for d in done)  # both still held
            release.set()
            for s in streams:
                list(s)
            assert client.models()  # slots freed: served again
    finally:
        release.set()
        channel.close()


def test_idle_streams_are_ended_and_their_slots_freed(start):
    from latentserve.v1 import inference_pb2 as pb
    from latentserve.v1 import inference_pb2_grpc as pb_grpc

    server = start(grpc_threads=2, max_concurrent_rpcs=2, stream_idle_timeout_s=2)
    release = threading.Event()

    done: list[threading.Event] = []

    def forgotten() -> Iterator[pb.CompressRequest]:
        finished = threading.Event()
        done.append(finished)
        yield pb.CompressRequest(model="tiny-ae")
        release.wait(300)  # never closed: without the idle limit it would hold its slot
        finished.set()

    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.InferenceStub(channel)
    try:
        # The client's own deadline (300 s) is far off: the stream can only end earlier
        # by the server's idle limit, which its message names.
        streams = [stub.CompressStream(forgotten(), timeout=300) for _ in range(2)]
        for s in streams:
            assert list(next(s).codes) == []  # answered, then the client falls silent
            with pytest.raises(grpc.RpcError) as info:
                next(s)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no message on this stream for 2 s" in info.value.details()
        # ended by the server while both clients were still silent, not by their leaving
        assert len(done) == 2 and not any(d.is_set() for d in done)
        with LatentServeClient(server.target, timeout=10) as client:
            assert client.models()  # both slots are free again

        def slow_but_steady() -> Iterator[pb.CompressRequest]:
            for i in range(3):
                yield pb.CompressRequest(model="tiny-ae" if i == 0 else "")
                time.sleep(0.2)  # well inside the limit, even on a loaded box

        assert len(list(stub.CompressStream(slow_but_steady(), timeout=30))) == 3
    finally:
        release.set()
        channel.close()


@pytest.mark.queue
def test_an_idle_job_upload_is_ended_and_leaves_no_job(start, redis_url):
    from latentserve.v1 import jobs_pb2, jobs_pb2_grpc

    server = start(jobs_redis=redis_url, stream_idle_timeout_s=1)
    release = threading.Event()

    def stalled_upload() -> Iterator[jobs_pb2.SubmitJobRequest]:
        yield jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(
            kind=jobs_pb2.JOB_KIND_COMPRESS, model="tiny-ae"))
        release.wait(60)

    channel = grpc.insecure_channel(server.target)
    try:
        jobs = jobs_pb2_grpc.JobsStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            jobs.SubmitJob(stalled_upload(), timeout=60)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no message on this stream" in info.value.details()
        assert list(jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs) == []
    finally:
        release.set()
        channel.close()


def test_unauthenticated_garbage_gets_unauthenticated(start, tokens):
    server = start(auth_tokens=tokens["path"])
    channel = grpc.insecure_channel(server.target)
    compress = channel.unary_unary("/latentserve.v1.Inference/Compress")  # raw bytes
    with pytest.raises(grpc.RpcError) as info:
        compress(b"\xff\xff\xff not a protobuf", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        compress(b"\xff\xff\xff not a protobuf", timeout=5,
                 metadata=(("authorization", f"Bearer {tokens['alice']}"),))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
