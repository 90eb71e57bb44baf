"""Malformed requests to the Jobs service: bad submissions, bad and foreign job ids.

The server's job queue runs on the session's Redis (its own key prefix) with a worker
in process, so jobs that a fuzz case gets accepted really run; ``known_jobs`` are
finished jobs (succeeded, failed, cancelled) whose ids the id cases reuse and alter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given

from latentserve.v1 import jobs_pb2 as jpb

from .fuzz_cases import OK, Case, Codes, ImageCase
from .fuzz_client import JOBS, Fuzzer, fuzz_settings
from .fuzz_stream_cases import LIST_JOBS_CASES, KnownJob, job_id_cases, submit_cases

Budget = Callable[[str], int]
pytestmark = [pytest.mark.slow, pytest.mark.queue]  # ~10 s each at the default count


def test_submit_job_streams(fuzzer: Fuzzer, fuzz_budget: Budget, fuzz_worker: Any,
                            corpus: tuple[ImageCase, ...], codes: Codes,
                            foreign_codes: tuple[bytes, ...]) -> None:
    """Specs with every field at and past its edge, inputs of the wrong kind, no spec."""
    @fuzz_settings(fuzz_budget("job-submit"))
    @given(case=submit_cases(corpus, codes, foreign_codes))
    def one_case(case: Case) -> None:
        outcome = fuzzer.check(fuzzer.call("job-submit", JOBS + "SubmitJob", case.payload),
                               case.allowed, case)
        if outcome.code is OK:
            job = jpb.Job.FromString(outcome.replies[0])
            # A job whose chunk failed while its inputs arrived comes back FAILED, unsealed.
            assert len(job.id) == 32 and (job.items_total >= 1 or job.state in (
                jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED)), (case.label, job)

    one_case()


def test_job_ids(fuzzer: Fuzzer, fuzz_budget: Budget,
                 known_jobs: tuple[KnownJob, ...]) -> None:
    """GetJob, WatchJob, CancelJob and FetchResults with ids malformed, unknown, altered,
    over-long, and with the finished jobs' real ids (any start)."""
    @fuzz_settings(fuzz_budget("job-ids"))
    @given(call=job_id_cases(known_jobs))
    def one_call(call: tuple[str, Case]) -> None:
        method, case = call
        outcome = fuzzer.check(fuzzer.call("job-ids", JOBS + method, case.payload),
                               case.allowed, case)
        if outcome.code is OK and method == "WatchJob":
            states = [jpb.Job.FromString(r).state for r in outcome.replies]
            assert len(states) == 1 and states[0] in (
                jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED), states

    one_call()


def test_list_jobs(fuzzer: Fuzzer, fuzz_budget: Budget) -> None:
    @fuzz_settings(fuzz_budget("list-jobs"))
    @given(case=LIST_JOBS_CASES)
    def one_case(case: Case) -> None:
        fuzzer.check(fuzzer.call("list-jobs", JOBS + "ListJobs", case.payload), case.allowed,
                     case)

    one_case()
