"""Malformed requests to the Inference service (and raw bytes to every method).

Each test sends its category's share of ``--fuzz-requests`` through one real server and
asserts a definite status for every answer: one the API documents for what is wrong
with the request, with a message; OK answers hold one result per input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentserve.v1 import inference_pb2 as pb

from .fuzz_cases import (
    LIMITS,
    MODEL_CASES,
    MODELS,
    MUTATIONS,
    OK,
    PROTOBUF_NOISE,
    SAMPLE_CASES,
    Case,
    Codes,
    ImageCase,
    combine,
    compress_case,
    compress_parts,
    damaged,
    encoded_images,
    mutate,
    negative_field,
    reconstruct_cases,
    size_status,
)
from .fuzz_client import INFERENCE, JOBS, METHODS, Fuzzer, fuzz_settings
from .fuzz_stream_cases import (
    LIST_JOBS_CASES,
    compress_streams,
    reconstruct_streams,
    submit_cases,
)

Budget = Callable[[str], int]
pytestmark = pytest.mark.slow  # ~10 s each at the default count


def run(fuzzer: Fuzzer, category: str, n: int, method: str,
        cases: st.SearchStrategy[Case], check: Callable[[Case, Any], None] | None = None) -> None:
    """Send ``n`` drawn cases to ``method``; check each answer against the case."""
    @fuzz_settings(n)
    @given(case=cases)
    def one_case(case: Case) -> None:
        outcome = fuzzer.check(fuzzer.call(category, method, case.payload), case.allowed, case)
        if outcome.code is OK and check is not None:
            check(case, outcome)

    one_case()


def replies_per_message(case: Case, outcome: Any) -> None:
    assert len(outcome.replies) == case.messages, (case.label, len(outcome.replies))


# -- raw bytes ----------------------------------------------------------------------------------

NOISE_STREAMS = st.lists(PROTOBUF_NOISE, max_size=3).map(tuple)
NOISE_CALLS = st.one_of(*(
    st.tuples(st.just(m), NOISE_STREAMS if kind[0] == "s" else PROTOBUF_NOISE)
    for m, kind in sorted(METHODS.items())))


def _fuzz_wire(fuzzer: Fuzzer, fuzz_budget: Budget, category: str,
               calls: st.SearchStrategy[tuple[str, Any]]) -> None:
    """Send ``calls`` ((method, raw bytes)) as ``category``; any definite status will do."""
    @fuzz_settings(fuzz_budget(category))
    @given(call=calls)
    def one_call(call: tuple[str, Any]) -> None:
        method, data = call
        fuzzer.check(fuzzer.call(category, method, data), None, call)

    one_call()


def test_random_bytes_to_every_method(fuzzer: Fuzzer, fuzz_budget: Budget) -> None:
    _fuzz_wire(fuzzer, fuzz_budget, "wire-random", NOISE_CALLS)


def _damage_one(messages: tuple[bytes, ...], at: int, changes: Any) -> tuple[bytes, ...]:
    if not messages:
        return messages
    at %= len(messages)
    return messages[:at] + (mutate(messages[at], changes),) + messages[at + 1:]


def test_damaged_messages_to_every_method(fuzzer: Fuzzer, fuzz_budget: Budget,
                                          corpus: tuple[ImageCase, ...], codes: Codes,
                                          foreign_codes: tuple[bytes, ...]) -> None:
    """Valid messages cut short, with flipped bits or spliced bytes, to their own method."""
    def payload(cases: st.SearchStrategy[Case]) -> st.SearchStrategy[Any]:
        return cases.map(lambda c: c.payload)

    unary = {"Compress": payload(compress_parts(corpus).map(compress_case)),
             "Reconstruct": payload(reconstruct_cases(codes, foreign_codes)),
             "Sample": payload(SAMPLE_CASES), "GetModel": payload(MODEL_CASES)}
    streams = {INFERENCE + "CompressStream": compress_streams(corpus),
               INFERENCE + "ReconstructStream": reconstruct_streams(codes, foreign_codes),
               JOBS + "SubmitJob": submit_cases(corpus, codes, foreign_codes)}
    negatives = st.integers(1, 2**63)
    calls = st.one_of(
        *(st.tuples(st.just(INFERENCE + name), damaged(s)) for name, s in sorted(unary.items())),
        *(st.tuples(st.just(m), st.builds(_damage_one, payload(s), st.integers(0, 7), MUTATIONS))
          for m, s in sorted(streams.items())),
        # Negative counts, seeds, starts, formats, limits and states.
        st.tuples(st.just(INFERENCE + "Sample"), st.builds(
            negative_field, unary["Sample"], st.sampled_from([2, 3, 5, 6]), negatives)),
        st.tuples(st.just(JOBS + "ListJobs"), st.builds(
            negative_field, payload(LIST_JOBS_CASES), st.sampled_from([1, 2]), negatives)))
    _fuzz_wire(fuzzer, fuzz_budget, "wire-damaged", calls)


# -- Compress -----------------------------------------------------------------------------------

def compress_replies(case: Case, outcome: Any) -> None:
    reply = pb.CompressResponse.FromString(outcome.replies[0])
    request = pb.CompressRequest.FromString(case.payload)  # type: ignore[arg-type]
    count = request.batch.count if request.HasField("batch") else len(request.images)
    assert len(reply.codes) == count and reply.model.endswith(":1"), (case.label, reply.model)


def test_compress_requests(fuzzer: Fuzzer, fuzz_budget: Budget,
                           corpus: tuple[ImageCase, ...]) -> None:
    """Models, image lists, raw images and batches of every kind, limits crossed."""
    run(fuzzer, "compress", fuzz_budget("compress"), INFERENCE + "Compress",
        compress_parts(corpus).map(compress_case), compress_replies)


def _single(image: Any, resize: bool, model: str) -> Case:
    msg = pb.CompressRequest(model=model, images=[image.msg], resize=resize)
    return Case(msg.SerializeToString(), combine([image.allowed(resize), size_status(msg)]),
                f"{image.label}{' resize' if resize else ''}")


def test_hostile_images_one_at_a_time(fuzzer: Fuzzer, fuzz_budget: Budget,
                                      corpus: tuple[ImageCase, ...]) -> None:
    """One image per request, so each gets exactly its own status (bombs, odd headers...)."""
    cases = st.builds(_single, encoded_images(corpus), st.booleans(), st.sampled_from(MODELS))
    run(fuzzer, "compress-image", fuzz_budget("compress-image"), INFERENCE + "Compress", cases,
        compress_replies)


# -- Reconstruct, Sample, GetModel ----------------------------------------------------------------

def test_reconstruct_requests(fuzzer: Fuzzer, fuzz_budget: Budget, codes: Codes,
                              foreign_codes: tuple[bytes, ...]) -> None:
    """Real codes, flipped bits, truncations, other models' codes, odd formats and models."""
    def images_back(case: Case, outcome: Any) -> None:
        reply = pb.ReconstructResponse.FromString(outcome.replies[0])
        request = pb.ReconstructRequest.FromString(case.payload)  # type: ignore[arg-type]
        assert len(reply.images) == len(reply.models) == len(request.codes), case.label

    run(fuzzer, "reconstruct", fuzz_budget("reconstruct"), INFERENCE + "Reconstruct",
        reconstruct_cases(codes, foreign_codes), images_back)


def test_sample_requests(fuzzer: Fuzzer, fuzz_budget: Budget) -> None:
    """Counts, seeds, starts and temperatures at and past every edge."""
    def count_back(case: Case, outcome: Any) -> None:
        reply = pb.SampleResponse.FromString(outcome.replies[0])
        request = pb.SampleRequest.FromString(case.payload)  # type: ignore[arg-type]
        assert len(reply.images) == request.count, case.label

    run(fuzzer, "sample", fuzz_budget("sample"), INFERENCE + "Sample", SAMPLE_CASES, count_back)


def test_get_model(fuzzer: Fuzzer, fuzz_budget: Budget) -> None:
    run(fuzzer, "get-model", fuzz_budget("get-model"), INFERENCE + "GetModel", MODEL_CASES)


# -- streams ------------------------------------------------------------------------------------

def test_compress_streams(fuzzer: Fuzzer, fuzz_budget: Budget,
                          corpus: tuple[ImageCase, ...]) -> None:
    """Bad first messages, models switched mid-stream, messages of another kind."""
    run(fuzzer, "compress-stream", fuzz_budget("compress-stream"),
        INFERENCE + "CompressStream", compress_streams(corpus), replies_per_message)


def test_reconstruct_streams(fuzzer: Fuzzer, fuzz_budget: Budget,
                             codes: Codes, foreign_codes: tuple[bytes, ...]) -> None:
    run(fuzzer, "reconstruct-stream", fuzz_budget("reconstruct-stream"),
        INFERENCE + "ReconstructStream", reconstruct_streams(codes, foreign_codes),
        replies_per_message)


def test_the_server_has_the_limits_the_cases_assume(fuzz_server: Any) -> None:
    c = fuzz_server.config
    assert (c.max_images_per_request, c.max_message_bytes, c.max_pixels_per_image) == (
        LIMITS.images, LIMITS.message_bytes, LIMITS.pixels)
