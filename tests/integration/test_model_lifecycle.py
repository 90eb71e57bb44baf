"""Model lifecycle against a real repository folder changed under a running server: a new
version is served once warmed up, a removed one drains, a broken one is refused without
touching what serves, reloads under load fail no call; per-model settings; ModelControl."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import Server, create_server
from latentserve.service.server.config import ServiceConfig
from latentserve.service.wire import raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.v1 import model_control_pb2 as cpb
from latentserve.v1 import model_control_pb2_grpc as cpb_grpc

TIMEOUT = 60.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``condition`` (bounded) until it is truthy; the watcher's pace, not speed."""
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        got = condition()
        if got:
            return got
        done.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def add_version(repo: Path, name: str, version: int, stage: Path, *,
                damage: str | None = None, from_version: int = 1) -> Path:
    """Copy ``name:from_version`` as ``name:version`` and move it in whole, manifest and
    all, as an operator's deploy script would (``damage``: a file to append a byte to)."""
    src = repo / name / str(from_version)
    tmp = stage / f"{name}-{version}"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = version
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if damage:
        with open(tmp / damage, "ab") as f:
            f.write(b"\0")
    dest = repo / name / str(version)
    os.rename(tmp, dest)
    return dest


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root)
    (tmp_path / "stage").mkdir()
    return root


@pytest.fixture
def serve(repo: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(**changes: Any) -> Server:
        config = ServiceConfig(jobs=JobSettings.off(),
                               **{"host": "127.0.0.1", "port": 0, "metrics_port": None,
                                  "models": repo, "intra_op_threads": 1,
                                  "compute_workers": 1, "grpc_threads": 16,
                                  "repository_poll_s": 0.05, "model_drain_s": 0.2,
                                  **changes})
        srv, _ = create_server(config)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop(0).wait(TIMEOUT)


@pytest.fixture
def image(mnist_images: np.ndarray) -> pb.Image:
    return raw_image(mnist_images[0])


class Client:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.control = cpb_grpc.ModelControlStub(self.channel)

    def compress_model(self, model: str, image: pb.Image) -> str:
        return self.inference.Compress(pb.CompressRequest(model=model, images=[image]),
                                       timeout=TIMEOUT).model

    def status(self, name: str) -> int | None:
        try:
            return self.health.Check(health_pb2.HealthCheckRequest(service=name),
                                     timeout=TIMEOUT).status
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.NOT_FOUND, exc.details()
            return None

    def states(self) -> dict[str, str]:
        return {m.ref: m.state for m in self.control.List(cpb.ModelControlListRequest(),
                                                          timeout=TIMEOUT).models}


@pytest.fixture
def client(serve: Callable[..., Server]) -> Iterator[Client]:
    c = Client(serve().target)
    yield c
    c.channel.close()


def test_a_new_version_is_served_once_warm_and_a_removed_one_drains(
        client: Client, repo: Path, image: pb.Image) -> None:
    assert client.compress_model("tiny-ae", image) == "tiny-ae:1"
    stage = repo.parent / "stage"
    v2 = add_version(repo, "tiny-ae", 2, stage)
    # The name moves only once v2 is READY (loaded and warmed up), never to a cold one.
    wait_for(lambda: client.compress_model("tiny-ae", image) == "tiny-ae:2", "tiny-ae -> v2")
    assert client.states()["tiny-ae:2"] == "ready"
    assert client.status("tiny-ae:2") == SERVING and client.status("tiny-ae") == SERVING

    shutil.rmtree(v2)
    wait_for(lambda: client.compress_model("tiny-ae", image) == "tiny-ae:1", "tiny-ae -> v1")
    wait_for(lambda: "tiny-ae:2" not in client.states(), "v2 forgotten after its drain")
    with pytest.raises(grpc.RpcError) as err:
        client.compress_model("tiny-ae:2", image)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert client.status("tiny-ae:2") is None  # health forgets a version that is gone
    assert client.status("tiny-ae") == SERVING


@pytest.mark.parametrize("breakage", ["manifest", "onnx"])
def test_a_broken_version_is_refused_and_the_previous_one_keeps_serving(
        client: Client, repo: Path, image: pb.Image, breakage: str,
        caplog: pytest.LogCaptureFixture) -> None:
    stage = repo.parent / "stage"
    with caplog.at_level(logging.ERROR, logger="latentserve.service.models.catalog"):
        if breakage == "manifest":
            bad = repo / "tiny-ae" / "2"
            bad.mkdir()
            (bad / "manifest.json").write_text("{not json")
            culprit = str(bad / "manifest.json")
        else:
            bad = add_version(repo, "tiny-ae", 2, stage, damage="decoder.onnx")
            culprit = str(bad / "decoder.onnx")
        wait_for(lambda: client.status("tiny-ae:2") == NOT_SERVING, "tiny-ae:2 NOT_SERVING")
        wait_for(lambda: any(culprit in r.getMessage() for r in caplog.records),
                 f"a log line naming {culprit}")
    assert client.status("tiny-ae") == SERVING
    for _ in range(3):  # and it stays that way: the watcher does not retry unchanged files
        assert client.compress_model("tiny-ae", image) == "tiny-ae:1"
    if breakage == "onnx":
        assert client.states()["tiny-ae:2"] == "failed"
        with pytest.raises(grpc.RpcError) as err:
            client.compress_model("tiny-ae:2", image)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "decoder.onnx" in err.value.details()
    # Fixed in place, the version is taken in on the next look.
    shutil.rmtree(bad)
    add_version(repo, "tiny-ae", 2, stage)
    wait_for(lambda: client.compress_model("tiny-ae", image) == "tiny-ae:2", "fixed v2 served")


def test_reloads_while_requests_are_in_flight_fail_no_call(
        client: Client, repo: Path, mnist_images: np.ndarray) -> None:
    errors: list[BaseException] = []
    done = threading.Event()
    counts = [0] * 4
    request = pb.CompressRequest(model="tiny-ae",
                                 images=[raw_image(im) for im in mnist_images[:3]])

    def load(i: int) -> None:
        try:
            for _ in range(2000):  # bounded; ends once the reloads are over
                if done.is_set() and counts[i] >= 5:
                    return
                assert len(client.inference.Compress(request, timeout=TIMEOUT).codes) == 3
                counts[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: all(counts), "every caller under way")
    settings = repo / "tiny-ae" / "config.json"
    for size in (1, 2, 64, 3, 256):
        settings.write_text(json.dumps({"schema": 1, "max_batch_size": size}))
        reply = client.control.Reload(cpb.ModelControlRequest(model="tiny-ae"), timeout=TIMEOUT)
        assert [(m.ref, m.state) for m in reply.models] == [("tiny-ae:1", "ready")]
    done.set()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors, errors[:3]
    assert all(c >= 5 for c in counts)


def metric(srv: Server, name: str, **labels: str) -> float:
    total = 0.0
    for family in srv.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_per_model_settings_are_honoured_by_the_batcher(
        repo: Path, serve: Callable[..., Server], mnist_images: np.ndarray) -> None:
    (repo / "tiny-vae" / "config.json").write_text(json.dumps(
        {"schema": 1, "max_batch_size": 2, "max_queue_delay_us": 7, "compute_lanes": 1}))
    srv = serve(max_batch_size=64)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        images = [raw_image(im) for im in mnist_images[:5]]
        for model in ("tiny-vae", "tiny-ae"):
            assert len(stub.Compress(pb.CompressRequest(model=model, images=images),
                                     timeout=TIMEOUT).codes) == 5
    vae = srv.servicer.batchers.get(("compress", "tiny-vae:1", None))
    ae = srv.servicer.batchers.get(("compress", "tiny-ae:1", None))
    assert (vae.max_batch_size, round(vae.delay_s * 1e6)) == (2, 7)
    assert vae.lanes is not srv.lanes and vae.lanes.count == 1  # a lane of its own
    assert (ae.max_batch_size, ae.lanes) == (64, srv.lanes)  # no file: server defaults
    # Five images through a batch limit of two: three network runs (2 + 2 + 1).
    name = "latentserve_batch_size_images"
    assert metric(srv, f"{name}_count", model="tiny-vae:1", op="compress") == 3
    assert metric(srv, f"{name}_count", model="tiny-ae:1", op="compress") == 1


def test_bad_settings_refuse_the_load_and_a_bad_change_keeps_the_old_ones(
        repo: Path, serve: Callable[..., Server], image: pb.Image,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = repo / "tiny-vae" / "config.json"
    settings.write_text(json.dumps({"schema": 1, "max_batch_size": 0}))
    srv = serve()
    client = Client(srv.target)
    try:
        assert client.states()["tiny-vae:1"] == "failed"
        with pytest.raises(grpc.RpcError) as err:
            client.compress_model("tiny-vae", image)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert str(settings) in err.value.details() and "max_batch_size" in err.value.details()
        settings.write_text(json.dumps({"schema": 1, "max_batch_size": 4}))
        wait_for(lambda: client.states()["tiny-vae:1"] == "ready", "the fixed settings load")
        assert client.compress_model("tiny-vae", image) == "tiny-vae:1"
        with caplog.at_level(logging.ERROR, logger="latentserve.service.models.catalog"):
            settings.write_text(json.dumps({"schema": 1, "max_batch_size": 4, "lanes": 2}))
            wait_for(lambda: any("unknown key(s) lanes" in r.getMessage()
                                 for r in caplog.records), "the bad change logged")
        assert srv.catalog.settings("tiny-vae").max_batch_size == 4
        assert client.compress_model("tiny-vae", image) == "tiny-vae:1"
    finally:
        client.channel.close()


def test_explicit_mode_load_unload_reload(repo: Path, serve: Callable[..., Server],
                                          image: pb.Image) -> None:
    srv = serve(repository_poll_s=0)
    client = Client(srv.target)
    try:
        add_version(repo, "tiny-ae", 2, repo.parent / "stage")
        # Not watched: v2 waits for an operator.
        assert client.compress_model("tiny-ae", image) == "tiny-ae:1"
        with pytest.raises(grpc.RpcError) as err:
            client.compress_model("tiny-ae:2", image)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert "models load tiny-ae:2" in err.value.details()
        reply = client.control.Load(cpb.ModelControlRequest(model="tiny-ae:2"), timeout=TIMEOUT)
        assert [(m.ref, m.state, m.newest) for m in reply.models] == [("tiny-ae:2", "ready",
                                                                      True)]
        assert client.compress_model("tiny-ae", image) == "tiny-ae:2"
        client.control.Unload(cpb.ModelControlRequest(model="tiny-ae:2"), timeout=TIMEOUT)
        assert client.compress_model("tiny-ae", image) == "tiny-ae:1"  # moves at once
        wait_for(lambda: client.states()["tiny-ae:2"] == "unloaded", "v2 unloaded")
        assert client.status("tiny-ae:2") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            client.control.Load(cpb.ModelControlRequest(model="tiny-ae:9"), timeout=TIMEOUT)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        client.control.Reload(cpb.ModelControlRequest(model="tiny-ae:2"), timeout=TIMEOUT)
        assert client.compress_model("tiny-ae", image) == "tiny-ae:2"
    finally:
        client.channel.close()


def test_the_models_cli_drives_model_control(repo: Path, serve: Callable[..., Server],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from latentserve.cli import main

    srv = serve(repository_poll_s=0)
    assert main(["models", "unload", "tiny-vqvae", "--target", srv.target]) == 0
    assert "tiny-vqvae:1" in capsys.readouterr().out
    assert main(["models", "load", "tiny-vqvae:1", "--target", srv.target]) == 0
    assert "ready" in capsys.readouterr().out
    assert main(["models", "reload", "tiny-vqvae", "--target", srv.target, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models"][0]["ref"] == "tiny-vqvae:1" and out["models"][0]["state"] == "ready"


def test_model_control_is_authorized_like_every_other_rpc(
        repo: Path, serve: Callable[..., Server], tmp_path: Path) -> None:
    from latentserve.cli import main
    from latentserve.service.server.auth import new_token, token_line

    token = new_token()
    (tmp_path / "tokens").write_text(token_line("ops", token) + "\n")
    (tmp_path / "my-token").write_text(token + "\n")
    srv = serve(auth_tokens=tmp_path / "tokens")
    client = Client(srv.target)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.control.Unload(cpb.ModelControlRequest(model="tiny-ae"), timeout=TIMEOUT)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # ... and changed nothing:
        listed = client.control.List(cpb.ModelControlListRequest(), timeout=TIMEOUT,
                                     metadata=[("authorization", f"Bearer {token}")]).models
        assert {m.ref: m.state for m in listed}["tiny-ae:1"] == "ready"
    finally:
        client.channel.close()
    assert main(["models", "unload", "tiny-ae:1", "--target", srv.target,
                 "--token-file", str(tmp_path / "my-token")]) == 0
