"""CallInterceptor: one wrapped handler per method, built once, doing every per-call job."""

from __future__ import annotations

from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from latentserve.service.server.auth import Authenticator
from latentserve.service.server.calls import CallInterceptor
from latentserve.service.server.metrics import ServiceMetrics
from latentserve.service.server.request_log import REQUEST_ID_KEY

Details = namedtuple("Details", "method invocation_metadata")
METHOD = "/test.Echo/Say"


def _echo_handler() -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


def test_the_wrapper_is_built_once_per_method_and_again_for_a_new_handler() -> None:
    calls = CallInterceptor(ServiceMetrics(), Authenticator(None))
    handler = _echo_handler()
    first = calls.intercept_service(lambda d: handler, Details(METHOD, ()))
    again = calls.intercept_service(lambda d: handler, Details(METHOD, ()))
    assert first is again and first is not handler
    other = _echo_handler()  # the method registered anew: its own wrapper
    assert calls.intercept_service(lambda d: other, Details(METHOD, ())) is not first
    assert calls.intercept_service(lambda d: None, Details("/test.Echo/Missing", ())) is None


@pytest.fixture
def echo_server():
    metrics = ServiceMetrics()
    server = grpc.server(ThreadPoolExecutor(4), interceptors=[
        CallInterceptor(metrics, Authenticator(None))])

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        from latentserve.errors import InvalidInput

        raise InvalidInput("no such word")

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Fail": grpc.unary_unary_rpc_method_handler(fail)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", metrics
    finally:
        server.stop(0)


def test_each_call_is_counted_gets_a_request_id_and_errors_get_their_status(echo_server) -> None:
    target, metrics = echo_server
    with grpc.insecure_channel(target) as channel:
        say = channel.unary_unary("/test.Echo/Say")
        for _ in range(3):
            reply, call = say.with_call(b"hi", metadata=((REQUEST_ID_KEY, "req-7"),))
            assert reply == b"hi"
            assert (REQUEST_ID_KEY, "req-7") in call.trailing_metadata()
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Echo/Fail")(b"x", metadata=((REQUEST_ID_KEY, "req-8"),))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "no such word (request id req-8)"
    count = metrics.registry.get_sample_value
    assert count("latentserve_rpc_requests_total", {"rpc": "test.Echo/Say", "code": "OK"}) == 3
    assert count("latentserve_rpc_requests_total",
                 {"rpc": "test.Echo/Fail", "code": "INVALID_ARGUMENT"}) == 1
    assert count("latentserve_rpc_in_flight", {"rpc": "test.Echo/Say"}) == 0
