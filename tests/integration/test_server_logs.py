"""Handled cases log one line, never a traceback: a refused call is the client's
business, and an operator reading the log should see only what needs a look."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import grpc
import pytest

from latentserve.v1 import jobs_pb2 as jpb
from latentserve.v1 import jobs_pb2_grpc as jgrpc
from serve_process import start_serve

TIMEOUT = 30.0


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.exc_info or "Traceback" in r.getMessage()]


@pytest.mark.queue
def test_fetching_a_cancelled_job_is_one_status_and_no_traceback(
        jobs_server, caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(jobs_server.target) as channel:
        stub = jgrpc.JobsStub(channel)
        spec = jpb.JobSpec(kind=jpb.JOB_KIND_SAMPLE, model="tiny-ae", count=8)
        job = stub.SubmitJob(iter([jpb.SubmitJobRequest(spec=spec)]), timeout=TIMEOUT)
        stub.CancelJob(jpb.CancelJobRequest(id=job.id), timeout=TIMEOUT)
        with caplog.at_level(logging.DEBUG):
            for call in (lambda: list(stub.FetchResults(jpb.FetchResultsRequest(id=job.id),
                                                        timeout=TIMEOUT)),
                         lambda: list(stub.WatchJob(jpb.WatchJobRequest(id=job.id),
                                                    timeout=TIMEOUT))):
                try:
                    call()
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION, exc.details()
                    assert "cancelled" in exc.details()
    assert not tracebacks(caplog.records), tracebacks(caplog.records)


def test_a_server_stopped_by_sigterm_logs_no_traceback(tiny_repo: Path, tmp_path: Path) -> None:
    served = start_serve(tiny_repo, "--metrics-port", "0", "--redis", "none",
                         "--state-dir", str(tmp_path / "state"))
    proc = served.proc
    try:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out = "".join(served.head) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "I/O operation on closed file" not in out, out


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_an_error_raised_after_the_client_left_logs_no_traceback(
        streaming: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A handled error (here JobStateError) raised once the client has cancelled: gRPC
    logged "Exception calling application" with a traceback when it was re-raised."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from latentserve.errors import JobStateError
    from latentserve.service.server.errors import ErrorInterceptor

    started, left, raised = threading.Event(), threading.Event(), threading.Event()

    def behave(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        context.add_callback(left.set)
        started.set()
        left.wait(TIMEOUT)
        try:
            raise JobStateError("job 0123 is cancelled: cancelled by request")
        finally:
            raised.set()

    def stream(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        yield b"first"
        yield behave(request, context)

    handler = (grpc.unary_stream_rpc_method_handler(stream) if streaming
               else grpc.unary_unary_rpc_method_handler(behave))
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Svc", {"Call": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with caplog.at_level(logging.DEBUG), \
                grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            if streaming:
                call = channel.unary_stream("/test.Svc/Call")(b"", timeout=TIMEOUT)
                assert next(call) == b"first"
            else:
                call = channel.unary_unary("/test.Svc/Call").future(b"", timeout=TIMEOUT)
            assert started.wait(TIMEOUT)
            call.cancel()
            assert left.wait(TIMEOUT) and raised.wait(TIMEOUT)
            server.stop(grace=5).wait(TIMEOUT)  # the handler has finished and logged
    finally:
        server.stop(0)
    assert not tracebacks(caplog.records), tracebacks(caplog.records)
