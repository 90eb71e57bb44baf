"""Request ids (``x-request-id``: the client's or a new one, echoed in the trailers and
quoted in errors) and the per-request debug line, written as JSON and parsed back."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from latentserve.service.server.request_log import JsonFormatter, RequestIdFilter
from latentserve.service.wire import raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from serve_process import start_serve

TIMEOUT = 60.0


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the ``latentserve`` loggers write, as ``--log-format json`` writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("latentserve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def request_lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [r for r in lines(out) if r["logger"] == "latentserve.requests"]


def trailer(call: Any) -> str:
    return dict(call.trailing_metadata())["x-request-id"]


def test_the_clients_request_id_is_echoed_logged_and_quoted_in_errors(
        start_server: Callable[..., Any], json_log: io.StringIO,
        mnist_images: np.ndarray) -> None:
    srv = start_server()
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        request = pb.CompressRequest(model="tiny-ae", images=[raw_image(mnist_images[0])])
        _, call = stub.Compress.with_call(request, metadata=[("x-request-id", "req-42")],
                                          timeout=TIMEOUT)
        assert trailer(call) == "req-42"
        with pytest.raises(grpc.RpcError) as err:
            stub.Compress(pb.CompressRequest(model="no-such-model"), timeout=TIMEOUT,
                          metadata=[("x-request-id", "req-43")])
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert err.value.details().endswith("(request id req-43)")
        assert trailer(err.value) == "req-43"
    done = {r["request_id"]: r for r in request_lines(json_log)}
    assert done["req-42"]["rpc"] == "/latentserve.v1.Inference/Compress"
    assert done["req-42"]["code"] == "OK" and done["req-42"]["level"] == "debug"
    assert done["req-42"]["ms"] >= 0
    assert done["req-43"]["code"] == "NOT_FOUND"


def test_a_missing_or_unusable_id_is_replaced_and_messages_stay_as_they_were(
        start_server: Callable[..., Any], json_log: io.StringIO) -> None:
    srv = start_server()
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        ids = []
        for metadata in ([], [("x-request-id", "x" * 500)], [("x-request-id", "a b\"c")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.Compress(pb.CompressRequest(model="no-such-model"), timeout=TIMEOUT,
                              metadata=metadata)
            assert "request id" not in err.value.details()
            ids.append(trailer(err.value))
        _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=TIMEOUT)
        ids.append(trailer(call))
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids) and len(set(ids)) == 4
    assert {r["request_id"] for r in request_lines(json_log)} == set(ids)


def test_serve_writes_json_log_lines(tiny_repo: Path, tmp_path: Path) -> None:
    served = start_serve(tiny_repo, "--metrics-port", "none", "--redis", "none",
                         "--log-format", "json", "--preload", "false",
                         "--state-dir", str(tmp_path / "state"))
    proc = served.proc
    try:
        head = served.head[:-1]  # log lines, then "latentserve: serving on ..."
        logged = [json.loads(line) for line in head]
        assert any("serving latentserve.v1" in r["message"] for r in logged), head
        assert all({"time", "level", "logger", "message", "request_id"} <= set(r)
                   for r in logged)
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)  # reads and closes the pipe
