"""Dead workers' chunks are taken over at once: a SIGKILLed worker's consumer
holds pending entries and has no health key, so a survivor claims them long before
claim_idle_s, logs it, and the job's results are complete and correct."""

from __future__ import annotations

import signal
import time

import pytest

from fixtures_redis import digest, pending
from latentserve.worker.jobqueue.recovery import Recovery
from latentserve.worker.jobqueue.store import JobKind, JobState

pytestmark = pytest.mark.queue


@pytest.mark.slow
def test_a_killed_workers_chunks_are_reclaimed_long_before_claim_idle(
        job_store, redis_client, spawn_worker, tiny_pipeline, mnist_images, make_gate,
        wait_until):
    claim_idle_s = 60.0  # the old path would wait this long (plus claim_idle_s / 4)
    images = mnist_images[:96]
    job = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=images, chunk_size=16)
    gate = make_gate("doomed")  # allows no call: the worker waits at its first, holding 3
    doomed = spawn_worker("--consumer", "doomed", "--read-count", "3", "--heartbeat-s", "1",
                          claim_idle_s=claim_idle_s, gate="doomed")
    wait_until(lambda: gate.waiting() and len(pending(redis_client, job_store, "doomed")) == 3,
               timeout=60, what="the doomed worker to hold three chunks")
    # Its health key was written before its first read, and while it beats it is alive.
    assert redis_client.exists(job_store.keys.worker("doomed"))
    survivor = spawn_worker("--consumer", "survivor", "--log-level", "INFO",
                            claim_idle_s=claim_idle_s)
    wait_until(lambda: job_store.get(job.id).items_done == 48, timeout=60,
               what="the survivor to compute the three chunks nobody held")
    assert Recovery(redis_client, job_store.keys, "test").dead_consumers("default") == []
    assert len(pending(redis_client, job_store, "doomed")) == 3  # alive: not taken

    killed = time.monotonic()
    doomed.send_signal(signal.SIGKILL)
    assert doomed.wait(10) == -signal.SIGKILL
    wait_until(lambda: job_store.get(job.id).state.terminal, timeout=claim_idle_s,
               interval=0.05, what="the job to finish after the kill")
    recovered_s = time.monotonic() - killed
    # Health key TTL (3 s) + one dead-consumer check (2 s) + the work: far below 60 s,
    # with room for a machine several times slower.
    assert recovered_s < 30, f"{recovered_s:.1f}s from SIGKILL to the job's end"

    info = job_store.get(job.id)
    assert info.state is JobState.SUCCEEDED, info.error
    assert (info.items_done, info.chunks_done) == (96, 6)  # each chunk counted once
    results = [code for _, code in job_store.iter_results(job.id)]
    assert digest(results) == digest(tiny_pipeline.compress("tiny-ae", images))
    assert pending(redis_client, job_store) == [] and job_store.dead_letters() == []
    consumers = redis_client.xinfo_consumers(job_store.keys.stream("default"),
                                             job_store.keys.group)
    assert b"doomed" not in {c["name"] for c in consumers}  # forgotten once emptied

    survivor.send_signal(signal.SIGTERM)
    out = survivor.finish(timeout=30)
    assert survivor.returncode == 0, out
    assert ("consumer doomed is dead (no health key) holding 3 entries on pool default; "
            "reclaimed 3 now") in out, out


def test_a_dead_consumers_entries_are_claimed_once_and_the_living_keep_theirs(
        job_store, redis_client):
    job_store.submit(JobKind.SAMPLE, "tiny-ae", count=6, chunk_size=1)
    stream, group = job_store.keys.stream("default"), job_store.keys.group
    # Two consumers read three entries each; only "alive" has a health key.
    redis_client.xreadgroup(group, "dead", {stream: ">"}, count=3)
    redis_client.xreadgroup(group, "alive", {stream: ">"}, count=3)
    redis_client.set(job_store.keys.worker("alive"), "{}", px=60_000)
    first = Recovery(redis_client, job_store.keys, "first")
    second = Recovery(redis_client, job_store.keys, "second")
    assert first.dead_consumers("default") == [("dead", 3)]

    took = first.claim("default", "dead", 2)
    assert [e.delivered for e in took.entries] == [2, 2] and took.left == 1
    rest = second.claim("default", "dead", 10)
    assert len(rest.entries) == 1 and rest.left == 0
    assert second.claim("default", "dead", 10).entries == ()  # nothing is claimed twice
    assert first.claim("default", "alive", 10).left == -1      # a live worker keeps its own
    owners = sorted((p["consumer"], p["times_delivered"]) for p in pending(redis_client,
                                                                           job_store))
    assert owners == [(b"alive", 1)] * 3 + [(b"first", 2)] * 2 + [(b"second", 2)]
    names = {c["name"] for c in redis_client.xinfo_consumers(stream, group)}
    assert b"dead" not in names and b"alive" in names
