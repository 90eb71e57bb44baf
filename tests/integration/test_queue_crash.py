"""Crash safety with real processes and real signals: SIGKILLed workers, SIGTERM
shutdown, a Redis server killed and restarted from its AOF, reproducible sampling."""

from __future__ import annotations

import signal

import pytest
import redis

from fixtures_redis import digest, pending
from latentserve.cli import main
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.consumer import worker_health
from latentserve.worker.jobqueue.store import JobKind, JobState, JobStore

pytestmark = pytest.mark.queue


# The pipelined worker (the default) and the one-step-at-a-time one (--overlap false).
OVERLAP = pytest.mark.parametrize("overlap", ["true", "false"])


@pytest.mark.slow
@OVERLAP
def test_sigkill_mid_chunk_repeatedly_loses_and_duplicates_nothing(
        job_store, redis_client, spawn_worker, tiny_pipeline, mnist_images, make_gate,
        wait_until, overlap):
    images = mnist_images[:400]
    job = job_store.submit(JobKind.COMPRESS, "tiny-vqvae", items=images, chunk_size=25)
    killed_holding = []
    for round_ in range(3):
        name = f"doomed-{round_}"
        before = job_store.get(job.id).items_done
        gate = make_gate(name)
        gate.allow(1)  # one chunk (one call: --read-count 1), then it waits holding the next
        proc = spawn_worker("--consumer", name, "--max-deliveries", "10", "--read-count", "1",
                            "--overlap", overlap, claim_idle_s=0.5, gate=name)
        # wait_until polls the lambda now, in this round: the defaults bind this round's gate.
        # Pipelined, the first chunk's coding and store run in other threads while the
        # next call waits at the gate: wait for its store too.
        held = wait_until(lambda gate=gate, name=name, before=before:
                          gate.passed() == 1 and gate.waiting()
                          and job_store.get(job.id).items_done == before + 25
                          and pending(redis_client, job_store, name),
                          timeout=60, what=f"worker {name} to be mid-chunk")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        killed_holding.append(held[0]["message_id"])
    assert job_store.get(job.id).state is JobState.RUNNING
    final = spawn_worker("--burst", "--max-deliveries", "10", claim_idle_s=0.5)
    out = final.finish(timeout=120)
    assert final.returncode == 0, out
    info = job_store.get(job.id)
    assert info.state is JobState.SUCCEEDED, info.error
    assert (info.items_done, info.chunks_done) == (400, 16)  # each chunk counted once
    results = [code for _, code in job_store.iter_results(job.id)]
    assert len(results) == 400
    assert digest(results) == digest(tiny_pipeline.compress("tiny-vqvae", images))
    assert len(set(killed_holding)) == 3 and pending(redis_client, job_store) == []


def mid_chunk(client: redis.Redis, consumer: str) -> bool:
    """The worker's health record shows a chunk it holds partly computed."""
    return any(0 < h["done"] < h["n"] for w in worker_health(client)
               if w["consumer"] == consumer for h in w["holding"])


def took_sigterm(client: redis.Redis, wait_until) -> None:
    """Wait until the worker's health record says it is stopping (the signal landed)."""
    wait_until(lambda: any(w["stopping"] for w in worker_health(client)),
               timeout=30, what="the worker to take the SIGTERM")


@pytest.mark.slow
@OVERLAP
def test_sigterm_finishes_the_current_chunk_within_the_grace(job_store, redis_client, redis_url,
                                                             spawn_worker, make_gate,
                                                             wait_until, overlap):
    # No worker yet: unhealthy.
    assert main(["worker", "--check-health", "--redis", redis_url]) == 1
    job = job_store.submit(JobKind.SAMPLE, "tiny-vqvae", count=240, chunk_size=120)
    gate = make_gate("w")
    gate.allow(1)  # one batch of 10, then it waits inside the first chunk
    proc = spawn_worker("--consumer", "w", "--batch-items", "10", "--grace-s", "60",
                        "--heartbeat-s", "0.05", "--overlap", overlap, gate="w")
    wait_until(lambda: gate.waiting() and mid_chunk(redis_client, "w"),
               timeout=60, what="the worker to be mid-chunk")
    assert main(["worker", "--check-health", "--redis", redis_url]) == 0
    proc.send_signal(signal.SIGTERM)
    took_sigterm(redis_client, wait_until)
    gate.open()
    out = proc.finish(timeout=60)
    assert proc.returncode == 0, out
    assert "1 chunks, 120 items, 1 released" in out  # the unstarted chunk went back
    assert main(["worker", "--check-health", "--redis", redis_url]) == 1
    info = job_store.get(job.id)
    assert info.items_done == 120 and info.state is JobState.RUNNING
    assert job_store.depth("default") == 1 and pending(redis_client, job_store) == []
    assert not worker_health(redis_client)  # its health key left with it


@OVERLAP
def test_sigterm_past_the_grace_releases_the_chunk_at_a_batch_boundary(
        job_store, redis_client, spawn_worker, make_gate, wait_until, overlap):
    job = job_store.submit(JobKind.SAMPLE, "tiny-vqvae", count=200, chunk_size=200)
    gate = make_gate("w")
    gate.allow(1)
    proc = spawn_worker("--consumer", "w", "--batch-items", "10", "--grace-s", "0.01",
                        "--heartbeat-s", "0.05", "--overlap", overlap, gate="w")
    wait_until(lambda: gate.waiting() and mid_chunk(redis_client, "w"),
               timeout=60, what="the worker to be mid-chunk")
    proc.send_signal(signal.SIGTERM)
    took_sigterm(redis_client, wait_until)  # then the checkpoint after this batch is
    gate.open()                             # past the 0.01 s grace
    out = proc.finish(timeout=60)
    assert proc.returncode == 0, out
    assert "0 chunks, 0 items, 1 released" in out
    assert gate.passed() == 2  # the batch it had done, the one it was in; no third
    [(_, fields)] = redis_client.xrange(job_store.keys.stream("default"))
    assert fields[b"job"] == job.id.encode() and fields[b"prior"] == b"1"
    assert pending(redis_client, job_store) == []


@pytest.mark.slow
def test_jobs_survive_redis_killed_and_restarted_from_its_aof(
        private_redis, connected, spawn_worker, tiny_pipeline, mnist_images, make_gate,
        wait_until):
    store = JobStore(connected(private_redis.url), QueueConfig(chunk_size=20))
    images = mnist_images[:320]
    first = store.submit(JobKind.COMPRESS, "tiny-vqvae", items=images)
    gate = make_gate("aof")
    gate.allow(3)  # three chunks of 20 (one a call), then the worker waits mid-job
    worker = spawn_worker("--max-deliveries", "10", "--read-count", "1",
                          redis=private_redis.url, gate="aof")
    wait_until(lambda: gate.passed() == 3 and store.get(first.id).items_done == 60,
               timeout=60, what="the job to make progress")
    second = store.submit(JobKind.SAMPLE, "tiny-vae", count=50, seed=11)  # accepted ...
    private_redis.kill()                                                   # ... then lost?
    with pytest.raises(redis.ConnectionError):
        store.get(first.id)
    private_redis.start()
    assert store.get(second.id).items_total == 50
    gate.open()
    done = wait_until(lambda: all(store.get(j.id).state.terminal for j in (first, second)),
                      timeout=120, what="both jobs to finish after the restart")
    assert done
    for job in (first, second):
        info = store.get(job.id)
        assert info.state is JobState.SUCCEEDED, info.error
    codes = [c for _, c in store.iter_results(first.id)]
    assert digest(codes) == digest(tiny_pipeline.compress("tiny-vqvae", images))
    from latentserve.worker.runtime.images import encode_png

    samples = [p for _, p in store.iter_results(second.id)]
    assert samples == [encode_png(im) for im in tiny_pipeline.sample("tiny-vae", 50, seed=11)]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


@pytest.mark.slow
def test_sampling_is_identical_across_chunk_sizes_and_worker_counts(
        redis_client, make_worker, spawn_worker, queue_config, make_gate, wait_until):
    """The same job with 1 and 3 workers and chunk sizes 7 and 16: the same bytes."""
    store = JobStore(redis_client, queue_config)
    seen = {}
    for chunk_size in (7, 16):
        job = store.submit(JobKind.SAMPLE, "tiny-vqvae", count=60, seed=5, temperature=0.8,
                           chunk_size=chunk_size)
        make_worker(read_count=1).run()
        seen[(1, chunk_size)] = [p for _, p in store.iter_results(job.id)]
    gates = [make_gate(f"w{i}") for i in range(3)]
    procs = [spawn_worker("--read-count", "1", "--consumer", f"w{i}", gate=f"w{i}")
             for i in range(3)]
    for gate in gates:
        gate.allow(1)
    for chunk_size in (7, 16):
        job = store.submit(JobKind.SAMPLE, "tiny-vqvae", count=60, seed=5, temperature=0.8,
                           chunk_size=chunk_size)
        if chunk_size == 7:
            # Each worker computes one chunk, then waits holding the next: all three
            # share the job whichever is fastest.
            wait_until(lambda: all(g.passed() == 1 for g in gates), timeout=60,
                       what="each of the three workers to compute a chunk")
            for gate in gates:
                gate.open()
        results = [p for _, p in store.iter_results(job.id)]  # waits for every chunk
        seen[(3, chunk_size)] = results
    chunks_per_worker = []
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        out = proc.finish(timeout=30)
        assert proc.returncode == 0, out
        chunks_per_worker.append(int(out.rsplit(": ", 1)[1].split()[0]))
    assert sum(chunks_per_worker) == 9 + 4 and min(chunks_per_worker) >= 1, chunks_per_worker
    reference = seen[(1, 7)]
    assert len(reference) == 60 and len(set(reference)) == 60
    for key, results in seen.items():
        assert results == reference, f"{key} differs"
