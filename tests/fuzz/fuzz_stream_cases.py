"""Case generators for request streams (CompressStream, ReconstructStream, SubmitJob) and
for job ids (GetJob, WatchJob, CancelJob, FetchResults, ListJobs).

A stream's allowed statuses are its messages' (``fuzz_cases.combine``), plus the rules
of the stream itself: the first message names the model (compress) or carries the
JobSpec (jobs), later ones may not name another model or carry another spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import grpc
from hypothesis import strategies as st

from latentserve.errors import CodeError
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import jobs_pb2 as jpb
from latentserve.worker.codec.codes import parse_header

from .fuzz_cases import (
    BOOL,
    DATA_LOSS,
    EDGE_U32,
    EDGE_U64,
    EXHAUSTED,
    FORMATS,
    INT32,
    INVALID,
    LIMITS,
    MISMATCH,
    NOT_FOUND,
    OK,
    PROTOBUF_NOISE,
    REFS,
    TEMPERATURES,
    Allowed,
    Case,
    CodeCase,
    Codes,
    ImageCase,
    Ref,
    code_cases,
    combine,
    compress_parts,
    good_images,
    image_msgs,
    job_temperature_status,
    long_text,
    one,
    reconstruct_cases,
    usually,
)

JOB_ID = re.compile(r"[0-9a-f]{32}")
STREAM_LENGTHS = st.integers(0, 4)
COMPRESS_STREAM_PARTS = st.sampled_from(["compress"] * 4 + ["reconstruct", "noise"])
SOME_CODES = st.lists(st.binary(max_size=40), max_size=3)


@st.composite
def _compress_streams(draw: st.DrawFn, corpus: tuple[ImageCase, ...]) -> Case:
    n = draw(STREAM_LENGTHS)
    payload: list[bytes] = []
    parts: list[Allowed] = []
    labels: list[str] = []
    first = None
    for _ in range(n):
        kind = draw(COMPRESS_STREAM_PARTS)
        if kind == "reconstruct":  # a ReconstructRequest parses as some CompressRequest
            payload.append(pb.ReconstructRequest(codes=draw(SOME_CODES),
                                                 format=1).SerializeToString())
            parts.append(None)
            labels.append("a ReconstructRequest")
            continue
        if kind == "noise":
            payload.append(draw(PROTOBUF_NOISE))
            parts.append(None)
            labels.append("noise")
            continue
        p = draw(compress_parts(corpus))
        payload.append(p.msg.SerializeToString())
        labels.append(f"model={p.ref.text[:30]!r} {p.label}")
        if first is None:
            first = p.ref
            model = one(INVALID) if p.ref.empty else one(p.ref.status)
        elif p.ref.empty:
            model = one(OK)
        elif p.ref.status is not OK:
            model = one(p.ref.status)
        else:  # the stream's model, or another one (refused)
            model = one(OK) if p.ref.name == first.name or first.status is not OK else one(
                INVALID)
        parts += [model, p.body]
    return Case(tuple(payload), combine(parts), "CompressStream " + " | ".join(labels),
                messages=n)


@cache
def compress_streams(corpus: tuple[ImageCase, ...]) -> st.SearchStrategy[Case]:
    """CompressStream: good and bad first messages, models changed mid-stream, other kinds."""
    return _compress_streams(corpus)


@cache
def reconstruct_streams(codes: Codes, foreign: tuple[bytes, ...]) -> st.SearchStrategy[Case]:
    message = st.one_of(reconstruct_cases(codes, foreign), reconstruct_cases(codes, foreign),
                        PROTOBUF_NOISE.map(lambda b: Case(b, None, "noise")))
    return st.lists(message, max_size=4).map(lambda cases: Case(
        tuple(c.payload for c in cases), combine(c.allowed for c in cases),  # type: ignore[misc]
        "ReconstructStream " + " | ".join(c.label for c in cases), messages=len(cases)))


# -- SubmitJob ----------------------------------------------------------------------------------

def header_status(code: bytes) -> frozenset[grpc.StatusCode]:
    """SubmitJob checks a code's header only; the worker decodes the rest."""
    try:
        parse_header(code)
    except CodeError:
        return one(DATA_LOSS)
    return one(OK)


def grpc_size_status(msg: Any) -> frozenset[grpc.StatusCode]:
    """The job API checks no message size of its own: gRPC refuses over 2x the limit."""
    return one(EXHAUSTED) if msg.ByteSize() > 2 * LIMITS.message_bytes else one(OK)


# Which part of a job submission a case breaks: none in one case of seven (the
# job is accepted and a worker runs it), one field, the inputs, the messages, or several.
BROKEN = st.sampled_from([None] * 2 + ["kind", "model", "format", "chunk_size", "count", "seed",
                                       "temperature", "expected", "policy", "items",
                                       "messages", "several"])
GOOD_REFS = st.sampled_from(["tiny-ae", "tiny-vae", "tiny-vqvae:1"]).map(lambda t: Ref(
    t, OK, t.partition(":")[0]))
FIELDS = {  # name: (good values, any values)
    "kind": (st.sampled_from([1, 2, 3]), st.one_of(st.just(0), INT32)),
    "model": (GOOD_REFS, REFS),
    "format": (st.sampled_from([0, 1, 2]), FORMATS),
    "chunk_size": (st.integers(0, 16), EDGE_U32),
    "count": (st.integers(1, 16), EDGE_U64),
    "seed": (st.integers(0, 100), EDGE_U64),
    "temperature": (st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0])), TEMPERATURES),
    "expected": (st.just(0), st.one_of(st.integers(0, LIMITS.job_items + 2), EDGE_U64)),
    # OnItemError: unset and PER_ITEM make a bad input an item error, FAIL_FAST a refusal.
    "policy": (st.sampled_from([0, 1, 2]), st.one_of(st.sampled_from([0, 1, 2, 3]), INT32)),
}
PER_ITEM_POLICIES = (0, 1)
# What SubmitJob refuses a bad input with under FAIL_FAST; under PER_ITEM they are the
# item's status (FetchResults), and the submission passes.
ITEM_STATUSES = frozenset({OK, INVALID, EXHAUSTED, DATA_LOSS})


def item_status(allowed: Allowed, per_item: bool) -> Allowed:
    """A bad input's effect on SubmitJob: its own refusal, or none under PER_ITEM."""
    return one(OK) if per_item and allowed is not None and allowed <= ITEM_STATUSES else allowed


@st.composite
def _job_specs(draw: st.DrawFn) -> tuple[jpb.JobSpec, list[Allowed], str | None, str]:
    broken = draw(BROKEN)
    v = {name: draw(edge if broken in (name, "several") else good)
         for name, (good, edge) in FIELDS.items()}
    kind, ref, temperature = v["kind"], v["model"], v["temperature"]
    spec = jpb.JobSpec(kind=kind, model=ref.text, format=v["format"],
                       chunk_size=v["chunk_size"], count=v["count"], seed=v["seed"],
                       resize=draw(BOOL), expected_items=v["expected"],
                       on_item_error=v["policy"])
    if temperature is not None:
        spec.temperature = temperature
    parts: list[Allowed] = [grpc_size_status(spec)]
    if kind not in (1, 2, 3):
        parts.append(one(INVALID))
    if spec.format not in (0, 1, 2):
        parts.append(one(INVALID))
    if spec.on_item_error not in (0, 1, 2):
        parts.append(one(INVALID))
    if ref.empty:
        parts.append(one(OK) if kind == 2 else one(INVALID))
    else:
        parts.append(one(ref.status))
    if spec.chunk_size > LIMITS.job_items:
        parts.append(one(INVALID))
    if kind == 3:
        parts.append(job_temperature_status(temperature))
        if spec.seed >= 2**63:
            parts.append(one(INVALID))
        if spec.count == 0:
            parts.append(one(INVALID))
        if spec.count > LIMITS.job_items:
            parts.append(one(EXHAUSTED))
    elif spec.expected_items > LIMITS.job_items:
        parts.append(one(EXHAUSTED))
    label = (f"spec kind={kind} model={ref.text[:30]!r} format={spec.format} "
             f"chunk={spec.chunk_size} count={spec.count} seed={spec.seed} "
             f"temperature={temperature} expected={spec.expected_items} "
             f"on_item_error={spec.on_item_error}")
    return spec, parts, broken, label


JOB_SPECS = _job_specs()  # a JobSpec, the statuses of its fields, what it breaks, a label
ITEM_COUNTS = st.integers(1, LIMITS.images)
ANY_ITEM_COUNTS = st.integers(0, LIMITS.images + 1)


@st.composite
def _job_items(draw: st.DrawFn, kind: int, resize: bool, broken: bool,
               corpus: tuple[ImageCase, ...], codes: Codes,
               foreign: tuple[bytes, ...], per_item: bool = False,
               ) -> tuple[jpb.SubmitJobRequest, list[Allowed], int, str]:
    """One JobItems message: the inputs ``kind`` takes, or (``broken``) anything;
    ``per_item``: the job's bad inputs are item errors (OnItemError PER_ITEM)."""
    counts = ANY_ITEM_COUNTS if broken else ITEM_COUNTS
    images: list[Any] = []
    items: list[CodeCase] = []
    if kind == 1 or (broken and draw(BOOL)):
        n = draw(counts)
        images = draw(st.lists(image_msgs(corpus) if broken else good_images(corpus),
                               min_size=n, max_size=n))
    if kind == 2 or (broken and draw(BOOL)):
        n = draw(counts)
        items = draw(st.lists(code_cases(codes, foreign) if broken else real_codes(codes),
                              min_size=n, max_size=n))
    msg = jpb.SubmitJobRequest(items=jpb.JobItems(images=[i.msg for i in images],
                                                  codes=[c.code for c in items]))
    parts: list[Allowed] = [grpc_size_status(msg)]
    got, wrong = (images, items) if kind == 1 else (items, images)
    if wrong:
        parts.append(one(INVALID))
    if len(got) > LIMITS.images:
        parts.append(one(EXHAUSTED))
    if kind == 1:
        parts += [item_status(i.allowed(resize), per_item) for i in images]
    elif kind == 2:
        parts += [item_status(header_status(c.code), per_item) for c in items]
    label = f"items ({len(images)} images, {len(items)} codes)"
    return msg, parts, len(got), label


FIRST_PARTS = st.sampled_from(["spec"] * 12 + ["items", "empty", "noise", "none"])
MORE_MESSAGES = st.integers(0, 4)
LATER_PARTS = st.sampled_from(["items"] * 3 + ["spec", "noise"])


@st.composite
def _submit_cases(draw: st.DrawFn, corpus: tuple[ImageCase, ...], codes: Codes,
                  foreign: tuple[bytes, ...]) -> Case:
    first = draw(FIRST_PARTS)
    payload: list[bytes] = []
    if first != "spec":
        if first == "noise":
            return Case((draw(PROTOBUF_NOISE),), None, "SubmitJob noise")
        label = "no messages"
        if first == "items":
            msg, _, _, label = draw(_job_items(1, False, True, corpus, codes, foreign))
            payload.append(msg.SerializeToString())
        elif first == "empty":
            payload.append(jpb.SubmitJobRequest().SerializeToString())
            label = "an empty message"
        sizes = [grpc_size_status(jpb.SubmitJobRequest.FromString(m)) for m in payload]
        return Case(tuple(payload), combine([one(INVALID), *sizes]), f"SubmitJob {label} first")
    spec, parts, broken, label = draw(JOB_SPECS)
    kind = spec.kind
    spec_passes = OK in (combine(parts) or {OK})
    payload.append(jpb.SubmitJobRequest(spec=spec).SerializeToString())
    labels = [label]
    total = 0
    odd_messages = broken in ("messages", "several")
    more = draw(MORE_MESSAGES) if odd_messages else 0 if kind == 3 else draw(st.integers(1, 2))
    for _ in range(more):
        what = draw(LATER_PARTS) if odd_messages else "items"
        if what == "spec":
            payload.append(jpb.SubmitJobRequest(spec=spec).SerializeToString())
            parts.append(one(INVALID))
            labels.append("a second spec")
        elif what == "noise":
            payload.append(draw(PROTOBUF_NOISE))
            parts.append(None)
            labels.append("noise")
        else:
            msg, item_parts, n, label = draw(_job_items(
                kind, spec.resize, broken in ("items", "several"), corpus, codes, foreign,
                spec.on_item_error in PER_ITEM_POLICIES))
            payload.append(msg.SerializeToString())
            parts += item_parts
            total += n
            labels.append(label)
    if kind == 3 and len(payload) > 1:
        parts.append(one(INVALID))  # a sample job takes the spec only
    if kind in (1, 2):
        if total == 0:
            parts.append(one(INVALID))
        if total > LIMITS.job_items:
            parts.append(one(EXHAUSTED))
        if spec.expected_items and total != spec.expected_items:
            parts.append(one(INVALID))  # the announced count did not arrive
    allowed = combine(parts)
    # An acceptable job meets a full queue; a compress or reconstruct job meets it right
    # after its spec, before its inputs are read.
    if allowed is not None and (OK in allowed or (kind in (1, 2) and spec_passes)):
        allowed |= {EXHAUSTED}
    return Case(tuple(payload), allowed, "SubmitJob " + " | ".join(labels))


@cache
def real_codes(codes: Codes) -> st.SearchStrategy[CodeCase]:
    return st.sampled_from(codes).map(lambda mc: CodeCase(mc[1], one(OK), "", "real code"))


@cache
def submit_cases(corpus: tuple[ImageCase, ...], codes: Codes,
                 foreign: tuple[bytes, ...]) -> st.SearchStrategy[Case]:
    """SubmitJob streams: good and bad specs, inputs of the wrong kind, over the limits."""
    return _submit_cases(corpus, codes, foreign)


# -- job ids ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownJob:
    """A finished job made for the fuzz run."""

    id: str
    state: str  # "succeeded", "failed" or "cancelled"
    items: int  # items_total: 0 if it ended before it was sealed
    chunk_size: int

    def fetch_status(self, start: int) -> grpc.StatusCode:
        """FetchResults from ``start``: results of a succeeded job; of the others, none."""
        if self.state != "succeeded" and not self.items:
            return MISMATCH  # ended while its inputs arrived: no result will ever come
        if start > self.items:
            return INVALID
        chunks = -(-self.items // self.chunk_size)
        return OK if self.state == "succeeded" or start // self.chunk_size >= chunks else MISMATCH


@dataclass(frozen=True)
class JobId:
    text: str
    status: grpc.StatusCode  # what GetJob answers
    job: KnownJob | None = None


def id_status(text: str) -> JobId:
    return JobId(text, NOT_FOUND if JOB_ID.fullmatch(text) else INVALID)


def job_ids(known: tuple[KnownJob, ...]) -> st.SearchStrategy[JobId]:
    hexes = st.binary(min_size=16, max_size=16).map(bytes.hex)
    real = st.sampled_from(known)

    def altered(job: KnownJob, at: int, how: str) -> JobId:
        text = job.id
        at %= len(text)
        if how == "digit":
            new = "0" if text[at] != "0" else "1"
            return id_status(text[:at] + new + text[at:][1:])
        if how == "upper":
            return id_status(text.upper() if text.upper() != text else text + "A")
        if how == "newline":  # "$" in a regex would let this one through
            return JobId(text + "\n", INVALID)
        return id_status(text + "0" if how == "longer" else text[:-1])

    return st.one_of(
        real.map(lambda j: JobId(j.id, OK, j)),
        st.builds(altered, real, st.integers(0, 31),
                  st.sampled_from(["digit", "upper", "newline", "longer", "shorter"])),
        hexes.map(id_status),
        st.text(max_size=40).map(id_status),
        st.sampled_from(["", " ", "0" * 32, "g" * 32, "../" * 10, "*", "%s", "\x00" * 32,
                         "latentserve:jobs"]).map(id_status),
        long_text(100, 40_000).map(lambda t: JobId(t, INVALID)),
    )


def job_id_case(method: str, jid: JobId, start: int) -> Case:
    """One GetJob / WatchJob / CancelJob / FetchResults request and what it may get."""
    if method == "FetchResults":
        msg = jpb.FetchResultsRequest(id=jid.text, start=start)
    else:
        msg = {"GetJob": jpb.GetJobRequest, "WatchJob": jpb.WatchJobRequest,
               "CancelJob": jpb.CancelJobRequest}[method](id=jid.text)
    status = one(jid.status)
    if jid.job is not None:
        if method == "CancelJob":
            status = one(MISMATCH)  # every known job has ended
        elif method == "FetchResults":
            status = one(jid.job.fetch_status(start))
    allowed = combine([status, grpc_size_status(msg)])
    return Case(msg.SerializeToString(), allowed,
                f"{method} id={jid.text[:40]!r} ({len(jid.text)} chars) start={start}")


def job_id_cases(known: tuple[KnownJob, ...]) -> st.SearchStrategy[tuple[str, Case]]:
    methods = st.sampled_from(["GetJob", "WatchJob", "CancelJob", "FetchResults"])
    starts = st.one_of(st.integers(0, max(j.items for j in known) + 1), EDGE_U64)
    return st.builds(lambda m, j, s: (m, job_id_case(m, j, s)), methods, job_ids(known),
                     starts)


def _list_jobs(limit: int, states: list[int]) -> Case:
    msg = jpb.ListJobsRequest(limit=limit, states=states)
    bad = limit > 1000 or any(s not in range(1, 7) for s in states)
    # ListJobs does not check its reply's size: past max_message_bytes (a few dozen jobs
    # here) gRPC refuses to send it, RESOURCE_EXHAUSTED "Sent message larger than max".
    return Case(msg.SerializeToString(), one(INVALID) if bad else one(OK, EXHAUSTED),
                f"ListJobs limit={limit} states={states}")


LIST_JOBS_CASES = st.builds(_list_jobs, usually(st.integers(0, 1001), EDGE_U32),
                            st.lists(usually(st.integers(1, 6), INT32), max_size=4))
