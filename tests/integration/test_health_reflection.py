"""grpc.health.v1 (Check, Watch, List) and server reflection v1 beside v1alpha, as a
client that knows only the standard protocols sees them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2

from fixtures_redis import serve_tiny
from latentserve.service.server.assemble import Server
from latentserve.v1 import grpc_reflection_v1_pb2 as v1_pb2
from latentserve.v1 import grpc_reflection_v1_pb2_grpc as v1_grpc

TIMEOUT = 30.0
H = health_pb2.HealthCheckResponse


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[Server]:
    srv = serve_tiny(tiny_repo, grpc_threads=8, preload=True)
    yield srv
    srv.stop(0).wait(TIMEOUT)


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def test_list_names_the_server_its_services_and_every_model(
        channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with caplog.at_level(logging.ERROR):
        reply = health.List(health_pb2.HealthListRequest(), timeout=TIMEOUT)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    statuses = {name: s.status for name, s in reply.statuses.items()}
    want = {"", "latentserve.v1.Inference"}
    for model in ("tiny-ae", "tiny-vae", "tiny-vqvae"):
        want |= {model, f"{model}:1"}
    assert want <= set(statuses), sorted(statuses)
    assert all(statuses[name] == H.SERVING for name in want)
    # Each name List gives, Check gives the same.
    for name, status in statuses.items():
        assert health.Check(health_pb2.HealthCheckRequest(service=name),
                            timeout=TIMEOUT).status == status


def test_watching_made_up_names_leaves_no_state(server: Server, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    servicer = server.health
    for i in range(200):
        watch = health.Watch(health_pb2.HealthCheckRequest(service=f"no-such-{i}"),
                             timeout=TIMEOUT)
        assert next(watch).status == H.SERVICE_UNKNOWN
        watch.cancel()
    # Cancellation reaches the server asynchronously: wait for it, then nothing is left.
    done = threading.Event()
    for _ in range(500):
        with servicer._lock:
            left = [s for s in servicer._send_response_callbacks if s.startswith("no-such-")]
        if not left:
            break
        done.wait(0.02)
    assert not left, f"{len(left)} watched names still held"
    assert not any(s.startswith("no-such-") for s in servicer._server_status)


def _reflect_v1(channel: grpc.Channel, **request: str) -> v1_pb2.ServerReflectionResponse:
    stub = v1_grpc.ServerReflectionStub(channel)
    [answer] = list(stub.ServerReflectionInfo(iter([v1_pb2.ServerReflectionRequest(**request)]),
                                              timeout=TIMEOUT))
    return answer


def test_reflection_v1_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    listed = _reflect_v1(channel, list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {"latentserve.v1.Inference", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert listed.original_request.list_services == ""
    described = _reflect_v1(channel, file_containing_symbol="latentserve.v1.Inference")
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    inference = next(f for f in files if any(s.name == "Inference" for s in f.service))
    methods = {m.name for s in inference.service for m in s.method}
    assert {"Compress", "Reconstruct", "Sample", "ListModels"} <= methods
    missing = _reflect_v1(channel, file_containing_symbol="no.such.Symbol")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_the_v1_messages_are_the_v1alpha_messages_renamed() -> None:
    # What lets one implementation serve both: the same fields, numbers and types.
    def shape(descriptor) -> dict:  # type: ignore[no-untyped-def]
        return {m.name: sorted((f.name, f.number, f.type, f.is_repeated) for f in m.fields)
                for m in descriptor.message_types_by_name.values()}

    assert shape(v1_pb2.DESCRIPTOR) == shape(alpha_pb2.DESCRIPTOR)
