"""One test per bug the fuzz suite found, on the fuzz server (small limits)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from fixtures_redis import wait_until
from latentserve.errors import InvalidInput
from latentserve.service.server.errors import MAX_MESSAGE_BYTES, bounded
from latentserve.service.wire import raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.v1 import jobs_pb2 as jpb
from latentserve.v1 import jobs_pb2_grpc as jgrpc
from latentserve.worker.jobqueue.keys import check_job_id, check_pool
from latentserve.worker.runtime.images import decode_image

from .fuzz_cases import Codes
from .fuzz_client import INFERENCE, JOBS

C = grpc.StatusCode
TIMEOUT = 10.0
NOT_A_MESSAGE = b"\x0a\x05ab"  # field 1, length 5, then only 2 bytes: truncated


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return err.value


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


def test_undecodable_request_bytes_are_invalid_arguments_naming_the_message_type(
        channel: grpc.Channel, images: np.ndarray) -> None:
    """Was INTERNAL "Exception deserializing request!" (gRPC's own), a traceback logged
    per request; now INVALID_ARGUMENT naming the expected message, for every kind of RPC."""
    cases = [
        (channel.unary_unary(INFERENCE + "Compress"), NOT_A_MESSAGE,
         "latentserve.v1.CompressRequest"),
        (channel.unary_stream(JOBS + "WatchJob"), NOT_A_MESSAGE, "latentserve.v1.WatchJobRequest"),
        (channel.stream_unary(JOBS + "SubmitJob"), iter([NOT_A_MESSAGE]),
         "latentserve.v1.SubmitJobRequest"),
        (channel.unary_unary("/grpc.health.v1.Health/Check"), NOT_A_MESSAGE,
         "grpc.health.v1.HealthCheckRequest"),
    ]
    for call, payload, name in cases:
        err = refused(lambda call=call, payload=payload: call(payload, timeout=TIMEOUT))
        assert err.code() is C.INVALID_ARGUMENT, (name, err.code(), err.details())
        assert f"not a valid {name} message" in err.details()
    # In a stream, the messages before the bad one are answered.
    good = pb.CompressRequest(model="tiny-ae", images=[raw_image(images[0])]).SerializeToString()
    replies = []
    stream = channel.stream_stream(INFERENCE + "CompressStream")(
        iter([good, NOT_A_MESSAGE, good]), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        for reply in stream:
            replies.append(pb.CompressResponse.FromString(reply))
    assert err.value.code() is C.INVALID_ARGUMENT, err.value.details()
    assert [len(r.codes) for r in replies] == [1]


def test_messages_quoting_huge_values_are_cut_to_fit_the_trailers(
        stub: pb_grpc.InferenceStub, channel: grpc.Channel) -> None:
    """A 12,000-character model name was quoted whole: trailers over gRPC's 8 KiB, and the
    client got RESOURCE_EXHAUSTED "received metadata size exceeds soft limit" at random."""
    for name in ("m" * 12_000, "\u4e2d" * 3_000):
        err = refused(lambda name=name: stub.GetModel(pb.GetModelRequest(model=name),
                                                      timeout=TIMEOUT))
        assert err.code() is C.NOT_FOUND, err.details()
        assert "characters cut" in err.details() and "available: tiny-ae" in err.details()
    jobs = jgrpc.JobsStub(channel)
    err = refused(lambda: jobs.GetJob(jpb.GetJobRequest(id="\u00e9" * 6_000), timeout=TIMEOUT))
    assert err.code() is C.INVALID_ARGUMENT and "characters cut" in err.details()


@pytest.mark.parametrize("text", ["short", "x" * 5000, "\u4e2d" * 5000, "%" * 3000,
                                  "a\x00b" * 2000])
def test_bounded_messages_fit_their_encoded_budget(text: str) -> None:
    out = bounded(f"model {text!r} not found")
    size = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in out.encode())
    assert size <= MAX_MESSAGE_BYTES
    assert out.startswith("model '") and out.endswith("' not found")


def test_a_job_id_with_a_trailing_newline_is_not_a_job_id(channel: grpc.Channel) -> None:
    """``re.match`` with ``$`` let "<32 hex digits>\\n" through: NOT_FOUND instead of
    INVALID_ARGUMENT. Same for pool names."""
    jid = "0123456789abcdef" * 2
    with pytest.raises(InvalidInput):
        check_job_id(jid + "\n")
    with pytest.raises(InvalidInput):
        check_pool("default\n")
    assert check_job_id(jid) == jid
    jobs = jgrpc.JobsStub(channel)
    err = refused(lambda: jobs.GetJob(jpb.GetJobRequest(id=jid + "\n"), timeout=TIMEOUT))
    assert err.code() is C.INVALID_ARGUMENT, err.details()


def _save(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 7).save(buf, format=fmt)
    return buf.getvalue()


def test_images_of_formats_the_api_does_not_document_are_refused(
        stub: pb_grpc.InferenceStub) -> None:
    """TIFF (and GIF, TGA, EPS via Ghostscript...) were parsed and accepted; the API
    documents PNG, JPEG, PGM/PPM, BMP and WebP."""
    for fmt in ("TIFF", "GIF", "TGA", "ICO"):
        request = pb.CompressRequest(model="tiny-ae", images=[pb.Image(encoded=_save(fmt))])
        err = refused(lambda request=request: stub.Compress(request, timeout=TIMEOUT))
        assert err.code() is C.INVALID_ARGUMENT, (fmt, err.details())
        assert "PNG/JPEG/PGM/PPM/BMP/WebP" in err.details()
    with pytest.raises(InvalidInput, match="PNG/JPEG"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n", (1, 28, 28))
    for fmt in ("PNG", "JPEG", "PPM", "BMP"):
        assert decode_image(_save(fmt), (1, 28, 28)).shape == (1, 28, 28), fmt


def test_sample_checks_the_image_format_even_for_zero_images(
        stub: pb_grpc.InferenceStub) -> None:
    """count 0 with format 7 answered OK (the format was checked only while encoding)."""
    for count in (0, 2):
        request = pb.SampleRequest(model="tiny-ae", count=count, format=7)
        err = refused(lambda request=request: stub.Sample(request, timeout=TIMEOUT))
        assert err.code() is C.INVALID_ARGUMENT and "format 7" in err.details()


def test_a_job_failing_while_its_inputs_arrive_is_returned_failed(
        channel: grpc.Channel, idle_queue: None, codes: Codes) -> None:
    """A worker failed chunk 0 for good before the upload ended: SubmitJob answered
    FAILED_PRECONDITION "job <id> is failed; it takes no more inputs" (an id the client
    never got) and deleted the job and its error; or OK, had the worker been slower."""
    jobs = jgrpc.JobsStub(channel)

    def failed_ids() -> set[str]:
        listed = jobs.ListJobs(jpb.ListJobsRequest(limit=10, states=[jpb.JOB_STATE_FAILED]),
                               timeout=TIMEOUT)  # newest first: ours is among them
        return {j.id for j in listed.jobs}

    before = failed_ids()
    vae_code = next(c for m, c in codes if m == "tiny-vae")
    # Codes of tiny-vae in a job for tiny-ae: the worker refuses the first chunk for good
    # (FAIL_FAST; per item each code would just be an item error).
    spec = jpb.JobSpec(kind=jpb.JOB_KIND_RECONSTRUCT, model="tiny-ae", chunk_size=1,
                       on_item_error=jpb.ON_ITEM_ERROR_FAIL_FAST)
    items = jpb.SubmitJobRequest(items=jpb.JobItems(codes=[vae_code]))

    def messages() -> Any:
        yield jpb.SubmitJobRequest(spec=spec)
        yield items  # a full chunk: queued at once
        wait_until(lambda: failed_ids() - before, what="the worker to fail chunk 0")
        yield items

    job = jobs.SubmitJob(messages(), timeout=60)
    assert job.state == jpb.JOB_STATE_FAILED, job
    assert "chunk 0" in job.error and "tiny-vae" in job.error, job.error
    assert jobs.GetJob(jpb.GetJobRequest(id=job.id), timeout=TIMEOUT).error == job.error


def test_temperatures_past_the_maximum_are_invalid_arguments(stub: pb_grpc.InferenceStub,
                                                            tiny_pipeline: Any) -> None:
    """tiny-vae at temperature 3.4e38: its latents overflowed float32 (a RuntimeWarning, so
    INTERNAL where warnings are errors, inf/NaN pixels elsewhere)."""
    from latentserve.worker.runtime.pipeline import MAX_TEMPERATURE

    for t in (3.4028235e38, 1e30, MAX_TEMPERATURE * 1.01):
        request = pb.SampleRequest(model="tiny-vae", count=2, temperature=t)
        err = refused(lambda request=request: stub.Sample(request, timeout=TIMEOUT))
        assert err.code() is C.INVALID_ARGUMENT and "at most 1000" in err.details()
        with pytest.raises(InvalidInput, match="temperature must be a positive number"):
            tiny_pipeline.sample("tiny-vae", 1, seed=0, temperature=t)
    reply = stub.Sample(pb.SampleRequest(model="tiny-vae", count=2, temperature=MAX_TEMPERATURE),
                        timeout=TIMEOUT)
    assert len(reply.images) == 2


def test_sealing_a_job_that_already_ended_returns_it(fuzz_server: Any,
                                                    redis_server_url: str) -> None:
    """A sample job at temperature 1.8e16: the worker failed its only chunk for good
    between JobStore.submit's enqueue and seal, and SubmitJob answered FAILED_PRECONDITION
    "job <id> is failed; it cannot be sealed" (an id the client never got)."""
    from latentserve.worker.jobqueue.store import JobKind, JobState, JobStore, connect

    client = connect(redis_server_url)
    try:
        store = JobStore(client, fuzz_server.queue)
        for end in (store.fail, lambda job_id, _: store.cancel(job_id)):
            job = store.create(JobKind.SAMPLE, "tiny-vae")
            end(job.id, "chunk 0 failed for good")
            info = store.seal(job, 3, 0)
            assert info.id == job.id and info.state in (JobState.FAILED, JobState.CANCELLED)
            assert not info.sealed
    finally:
        client.close()
