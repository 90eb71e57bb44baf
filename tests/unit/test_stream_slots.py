"""StreamSlots: the bound on waiting job streams, and its settings."""

from __future__ import annotations

import argparse

import pytest

from latentserve.errors import InvalidInput, ResourceLimit
from latentserve.service.client.retry import RetryPolicy
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.jobs.stream_slots import StreamSlots, default_stream_limit


def test_default_limit_keeps_a_reserve_of_handler_threads():
    assert [default_stream_limit(n) for n in (1, 2, 3, 8, 16, 64)] == [1, 1, 1, 6, 12, 48]


def test_slots_refuse_past_the_total_and_per_caller_and_free_on_exit():
    slots = StreamSlots(3, per_caller=2)
    with slots.hold("alice", "WatchJob"), slots.hold("alice", "FetchResults"):
        with (pytest.raises(ResourceLimit, match=r"identity 'alice' hold 2 job streams.*"
                                                 r"--max-job-streams-per-caller 2"),
              slots.hold("alice", "WatchJob")):
            pass
        with slots.hold("bob", "WatchJob"):
            with (pytest.raises(ResourceLimit, match=r"WatchJob: 3 job streams .* are open, "
                                                     r"the server's limit \(--max-job-streams 3"),
                  slots.hold("carol", "WatchJob")):
                pass
            assert slots.open == 3
    assert slots.open == 0
    with pytest.raises(RuntimeError), slots.hold("", "WatchJob"):  # an error frees it too
        raise RuntimeError("boom")
    assert slots.open == 0
    with pytest.raises(InvalidInput, match="at least 1"):
        StreamSlots(0)


def test_stream_limits_from_flags_and_env():
    parser = argparse.ArgumentParser()
    JobSettings.add_arguments(parser)
    args = parser.parse_args(["--max-job-streams", "5"])
    assert JobSettings.from_sources(args, {}).stream_slots(64).total == 5
    env = {"LATENTSERVE_MAX_JOB_STREAMS_PER_CALLER": "2"}
    slots = JobSettings.from_env(env).stream_slots(8)
    assert (slots.total, slots.per_caller) == (6, 2)
    with pytest.raises(InvalidInput, match="LATENTSERVE_MAX_JOB_STREAMS='many'"):
        JobSettings.from_env({"LATENTSERVE_MAX_JOB_STREAMS": "many"})
    with pytest.raises(InvalidInput, match="max_job_streams must be >= 0"):
        JobSettings(max_job_streams=-1)


def test_retry_policy_checks_its_numbers():
    with pytest.raises(InvalidInput, match="must be >= 0"):
        RetryPolicy(deadline_s=-1)
    with pytest.raises(InvalidInput, match="positive and increasing"):
        RetryPolicy(initial_backoff_s=3, max_backoff_s=2)
