"""Refusals carry machine-readable details: a google.rpc.ErrorInfo (reason, metadata) and,
where they apply, BadRequest / ResourceInfo; the Python client raises the reason's class."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from latentserve import errors as E
from latentserve.service.client.inference import LatentServeClient
from latentserve.service.server.assemble import Server
from latentserve.service.status import DOMAIN, INTERNAL_REASON, REASONS
from latentserve.service.wire import raw_image
from latentserve.v1 import errors_pb2
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc

TIMEOUT = 60.0


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server(max_images_per_request=4)


@pytest.fixture
def stub(server: Server) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[object]]:
    """The ErrorInfo and every other detail of a refusal."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == err.code().value[0] and status.message == err.details()
    infos, others = [], []
    for any_detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                     error_details_pb2.ResourceInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                msg = kind()
                any_detail.Unpack(msg)
                (infos if kind is error_details_pb2.ErrorInfo else others).append(msg)
    assert len(infos) == 1
    assert infos[0].domain == DOMAIN
    return infos[0], others


def test_the_reason_enum_in_the_proto_is_the_python_table() -> None:
    in_proto = {v.name for v in errors_pb2.ErrorReason.DESCRIPTOR.values}
    assert in_proto == {*REASONS, INTERNAL_REASON, "ERROR_REASON_UNSPECIFIED"}
    for reason, kind in REASONS.items():
        assert kind.reason == reason


def test_code_of_another_model_names_the_model_it_needs(stub: pb_grpc.InferenceStub,
                                                        mnist_images: np.ndarray) -> None:
    code = stub.Compress(pb.CompressRequest(model="tiny-ae", images=[raw_image(mnist_images[0])]),
                         timeout=TIMEOUT).codes[0]
    with pytest.raises(grpc.RpcError) as err:
        stub.Reconstruct(pb.ReconstructRequest(codes=[code], model="tiny-vae"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = details(err.value)
    assert info.reason == "CODE_MISMATCH"
    assert info.metadata["model"] == "tiny-ae:1" and info.metadata["index"] == "0"


def test_unknown_model_has_resource_info(stub: pb_grpc.InferenceStub,
                                         mnist_images: np.ndarray) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Compress(pb.CompressRequest(model="no-such", images=[raw_image(mnist_images[0])]),
                      timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    info, others = details(err.value)
    assert (info.reason, info.metadata["model"]) == ("MODEL_NOT_FOUND", "no-such")
    [resource] = others
    assert isinstance(resource, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("model", "no-such")


def test_limits_name_their_setting(stub: pb_grpc.InferenceStub, mnist_images: np.ndarray) -> None:
    images = [raw_image(im) for im in mnist_images[:5]]
    with pytest.raises(grpc.RpcError) as err:
        stub.Compress(pb.CompressRequest(model="tiny-ae", images=images), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, _ = details(err.value)
    assert (info.reason, info.metadata["limit"]) == ("RESOURCE_LIMIT", "max_images_per_request")


def test_bad_input_has_a_reason(stub: pb_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Sample(pb.SampleRequest(model="tiny-vae", count=1, temperature=-1), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[0].reason == "INVALID_INPUT"


def test_the_client_raises_the_class_of_the_reason(server: Server,
                                                   mnist_images: np.ndarray) -> None:
    with LatentServeClient(server.target, timeout=TIMEOUT) as client:
        code = client.compress(mnist_images[:1], "tiny-ae")[0]
        with pytest.raises(E.CodeMismatch) as mismatch:
            client.reconstruct([code], model="tiny-vae")
        assert mismatch.value.reason == "CODE_MISMATCH"
        assert mismatch.value.metadata["model"] == "tiny-ae:1"
        # NOT_FOUND stands for two classes; the reason says which one it is.
        with pytest.raises(E.ModelNotFound) as missing:
            client.compress(mnist_images[:1], "no-such")
        assert not isinstance(missing.value, E.JobNotFound)
        assert missing.value.metadata == {"model": "no-such"}
