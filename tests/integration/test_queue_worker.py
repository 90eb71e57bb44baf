"""The job worker against a real Redis: results, batching, errors, cancel, shutdown."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from fixtures_redis import WORKER_DEFAULTS
from gate import GatedPipeline
from latentserve.worker.jobqueue.store import (
    ImageFormat,
    ItemFailure,
    JobKind,
    JobState,
    OnItemError,
)
from latentserve.worker.runtime.images import encode_png

pytestmark = pytest.mark.queue


def all_results(store, job_id):
    return [item for _, item in store.iter_results(job_id)]


def test_compress_job_matches_the_pipeline(job_store, make_worker, tiny_pipeline, mnist_images):
    images = mnist_images[:70]
    job = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=images, chunk_size=16)
    assert (job.state, job.items_total, job.chunks_total) == (JobState.QUEUED, 70, 5)
    stats = make_worker(batch_items=40).run()
    info = job_store.get(job.id)
    assert info.state is JobState.SUCCEEDED and info.items_done == 70 and info.fraction == 1.0
    assert stats.chunks == 5 and stats.items == 70
    assert all_results(job_store, job.id) == tiny_pipeline.compress("tiny-ae", images)


def test_reconstruct_and_sample_jobs(job_store, make_worker, tiny_pipeline, mnist_images):
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:20])
    rec = job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=codes, chunk_size=8)
    smp = job_store.submit(JobKind.SAMPLE, "tiny-ae", count=30, seed=7, chunk_size=8,
                           image_format=ImageFormat.RAW)
    make_worker().run()
    want = tiny_pipeline.reconstruct(codes)
    assert all_results(job_store, rec.id) == [encode_png(im) for im in want]
    got = np.stack(all_results(job_store, smp.id))
    assert np.array_equal(got, tiny_pipeline.sample("tiny-ae", 30, seed=7))


def test_fetch_resumes_from_an_index(job_store, make_worker, mnist_images):
    job = job_store.submit(JobKind.COMPRESS, "tiny-vae", items=mnist_images[:50], chunk_size=16)
    make_worker().run()
    full = list(job_store.iter_results(job.id))
    assert [i for i, _ in full] == list(range(50))
    assert list(job_store.iter_results(job.id, start=37)) == full[37:]
    assert list(job_store.iter_results(job.id, start=50)) == []


class CountingPipeline:
    """The real pipeline, recording each call's item count as its first half returns
    (the worker calls the staged halves, ``chunkwork.JobPipeline``); ``after(n)`` runs
    once the n-th call's first half has returned (to act at a known point of a job, with
    no timing)."""

    def __init__(self, inner, after=None):
        self.inner = inner
        self.calls: list[tuple[str, int]] = []
        self.after = after

    def _done(self, name, n):
        self.calls.append((name, n))
        if self.after is not None:
            self.after(len(self.calls))

    def compress_staged(self, ref, images):
        out = self.inner.compress_staged(ref, images)
        self._done("compress", len(images))
        return out

    def reconstruct_staged(self, codes, ref=None):
        out = self.inner.reconstruct_staged(codes, ref)
        self._done("reconstruct", len(codes))
        return out

    def sample_staged(self, ref, count, *, seed, temperature=1.0, start=0):
        out = self.inner.sample_staged(ref, count, seed=seed, temperature=temperature,
                                       start=start)
        self._done("sample", count)
        return out


def test_small_chunks_are_merged_into_one_call(job_store, make_worker, tiny_pipeline,
                                               mnist_images):
    a = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=mnist_images[:24], chunk_size=4)
    b = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=mnist_images[24:40], chunk_size=4)
    s = job_store.submit(JobKind.SAMPLE, "tiny-vae", count=24, seed=3, chunk_size=4)
    counting = CountingPipeline(tiny_pipeline)
    make_worker(pipeline=counting, read_count=16, batch_items=64).run()
    # 10 compress chunks of two jobs in one call, 6 contiguous sample chunks in another.
    assert sorted(counting.calls) == [("compress", 40), ("sample", 24)]
    assert all_results(job_store, a.id) + all_results(job_store, b.id) == \
        tiny_pipeline.compress("tiny-ae", mnist_images[:40])
    assert all_results(job_store, s.id) == [
        encode_png(im) for im in tiny_pipeline.sample("tiny-vae", 24, seed=3)]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_bad_input_fails_its_job_and_no_other(job_store, make_worker, tiny_pipeline,
                                                mnist_images, overlap):
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:16])
    bad = list(codes)
    bad[6] = bad[6][:-1] + bytes([bad[6][-1] ^ 0xFF])  # one corrupted code, in chunk 1
    broken = job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=bad, chunk_size=4,
                              on_item_error=OnItemError.FAIL_FAST)
    good = job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=codes, chunk_size=4)
    stats = make_worker(read_count=16, batch_items=64, overlap=overlap).run()
    failed = job_store.get(broken.id)
    assert failed.state is JobState.FAILED
    assert "chunk 1 (items 4-7)" in failed.error and "CorruptCode" in failed.error
    assert stats.dead_lettered == 1
    [letter] = job_store.dead_letters()
    assert (letter["job"], letter["chunk"], letter["deliveries"]) == (broken.id, "1", "1")
    assert job_store.get(good.id).state is JobState.SUCCEEDED
    assert all_results(job_store, good.id) == [
        encode_png(im) for im in tiny_pipeline.reconstruct(codes)]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_bad_code_fails_only_its_item_by_default(job_store, make_worker, tiny_pipeline,
                                                   mnist_images, overlap):
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:16])
    bad = list(codes)
    bad[6] = bad[6][:-1] + bytes([bad[6][-1] ^ 0xFF])
    raw = job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=bad, chunk_size=4,
                           image_format=ImageFormat.RAW)
    png = job_store.submit(JobKind.RECONSTRUCT, "", items=bad, chunk_size=4)
    # In the same reads as the per-item jobs: merged calls must keep each policy.
    strict = job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=bad, chunk_size=4,
                              on_item_error=OnItemError.FAIL_FAST)
    stats = make_worker(read_count=16, batch_items=64, overlap=overlap).run()
    assert job_store.get(strict.id).state is JobState.FAILED
    assert stats.dead_lettered == 1  # the FAIL_FAST job's chunk only
    [refusal] = [r for r in tiny_pipeline.reconstruct_each(bad) if not isinstance(r, np.ndarray)]
    want = tiny_pipeline.reconstruct(codes)
    for job in (raw, png):
        info = job_store.get(job.id)
        assert (info.state, info.items_done, info.items_failed) == (JobState.SUCCEEDED, 16, 1)
        results = all_results(job_store, job.id)
        assert results[6] == ItemFailure("CorruptCode", str(refusal))
        good = [r for i, r in enumerate(results) if i != 6]
        expect = [im if job is raw else encode_png(im) for i, im in enumerate(want) if i != 6]
        assert all(np.array_equal(a, b) if job is raw else a == b
                   for a, b in zip(good, expect, strict=True))


@pytest.mark.parametrize("overlap", [False, True])
def test_a_chunk_that_always_fails_is_dead_lettered_after_n_deliveries(
        job_store, make_worker, tiny_repo, mnist_images, tmp_path, overlap):
    import shutil

    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.pipeline import Pipeline

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    with open(repo / "tiny-vqvae" / "1" / "decoder.onnx", "ab") as f:
        f.write(b"\0")  # the worker's copy of this model is damaged: every try fails
    doomed = job_store.submit(JobKind.SAMPLE, "tiny-vqvae", count=4, chunk_size=4)
    fine = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=mnist_images[:32], chunk_size=4)
    worker = make_worker(pipeline=Pipeline(repo, EngineConfig(intra_op_threads=1)),
                         max_deliveries=3, claim_idle_s=0.3, overlap=overlap)
    stats = worker.run()
    assert stats.dead_lettered == 1 and stats.retried == 2  # deliveries 2 and 3
    info = job_store.get(doomed.id)
    assert info.state is JobState.FAILED
    assert "dead-lettered after 4 deliveries" in info.error
    assert "ModelIntegrityError" in info.error and "decoder.onnx" in info.error
    [letter] = job_store.dead_letters()
    assert letter["job"] == doomed.id and letter["deliveries"] == "4"
    assert job_store.get(fine.id).state is JobState.SUCCEEDED
    assert len(all_results(job_store, fine.id)) == 32


@pytest.mark.parametrize("overlap", [False, True])
def test_cancel_stops_a_running_chunk_at_the_next_batch_boundary(job_store, make_worker,
                                                                 tiny_pipeline, overlap):
    job = job_store.submit(JobKind.SAMPLE, "tiny-ae", count=64, chunk_size=64)
    counting = CountingPipeline(tiny_pipeline,
                                after=lambda n: n == 2 and job_store.cancel(job.id))
    stats = make_worker(pipeline=counting, batch_items=8, overlap=overlap).run()
    assert counting.calls == [("sample", 8), ("sample", 8)]  # 6 batches never ran
    assert stats.chunks == 0 and stats.skipped == 1
    info = job_store.get(job.id)
    assert info.state is JobState.CANCELLED and info.items_done == 0
    assert job_store.depth("default") == 0


def test_a_cancel_survives_a_worker_restart(job_store, make_worker, tiny_pipeline, redis_client):
    job = job_store.submit(JobKind.SAMPLE, "tiny-ae", count=32, chunk_size=8)
    # A worker took chunk 0 and died holding it; then the job was cancelled.
    redis_client.xreadgroup(job_store.keys.group, "dead-worker",
                            {job_store.keys.stream("default"): ">"}, count=1)
    job_store.cancel(job.id)
    counting = CountingPipeline(tiny_pipeline)
    make_worker(pipeline=counting, claim_idle_s=0.2).run()
    assert counting.calls == []
    assert redis_client.xpending(job_store.keys.stream("default"),
                                 job_store.keys.group)["pending"] == 0


def test_a_healthy_long_chunk_is_not_stolen(job_store, make_worker, tiny_pipeline, make_gate,
                                           redis_client, wait_until):
    # The chunk lasts as long as the test holds its first batch at the gate: three
    # claim-idle periods, on a fast machine or a slow one, while a second worker looks
    # for idle entries to reclaim every claim_idle_s / 4. A claim-idle of 1 s keeps the
    # busy worker's health key (3 heartbeats of 0.25 s) alive through the scheduling
    # stalls of a loaded machine: at 0.4 s (0.3 s of key) a stalled heartbeat thread
    # made the busy worker look dead and its chunk was taken over.
    claim_idle_s, held_s = 1.0, 3.0
    job = job_store.submit(JobKind.SAMPLE, "tiny-vqvae", count=64, chunk_size=64)
    stream = job_store.keys.stream("default")
    gate = make_gate("long-chunk")
    busy = make_worker(pipeline=GatedPipeline(tiny_pipeline, gate), burst=False,
                       claim_idle_s=claim_idle_s, batch_items=16)
    idle = make_worker(burst=False, claim_idle_s=claim_idle_s)
    threads = [busy.start_thread()]
    try:
        wait_until(gate.waiting, what="the first worker to start the chunk")
        assert redis_client.xpending(stream, job_store.keys.group)["pending"] == 1
        threads.append(idle.start_thread())
        time.sleep(held_s)  # the gate holds the chunk; the idle worker keeps looking
        assert job_store.get(job.id).state is JobState.RUNNING
        gate.open()
        wait_until(lambda: job_store.get(job.id).state.terminal, timeout=60,
                   what="the chunk to finish")
    finally:
        gate.open()
        busy.request_stop()
        idle.request_stop()
        for t in threads:
            t.join(10)
    info = job_store.get(job.id)
    assert info.state is JobState.SUCCEEDED
    assert info.finished - info.started >= held_s
    assert gate.passed() == 4  # 64 items in batches of 16, all by the busy worker
    assert idle.stats.retried == 0 and idle.stats.chunks == 0
    assert busy.stats.chunks == 1 and busy.stats.retried == 0
    assert all_results(job_store, job.id) == [
        encode_png(im) for im in tiny_pipeline.sample("tiny-vqvae", 64, seed=0)]


def test_a_worker_with_coder_processes_stores_merged_chunks_exactly_once(
        job_store, redis_url, tiny_repo, queue_config, tiny_pipeline, mnist_images):
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.consumer import create_worker

    images = mnist_images[:100]
    codes = tiny_pipeline.compress("tiny-vae", images[:90])
    codes[41] = codes[41][:-1]  # one bad code: its slot fails, nothing else does
    comp = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=images, chunk_size=8)
    rec = job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=codes, chunk_size=8,
                           image_format=ImageFormat.RAW)
    # Chunks of 8 merged into calls of up to 128: past the pool's min_batch (64).
    config = WorkerConfig(redis_url=redis_url, models=str(tiny_repo), queue=queue_config,
                          **{**WORKER_DEFAULTS, "read_count": 32, "batch_items": 128,
                             "coder_processes": 2})
    worker = create_worker(config)
    pool = worker.pipeline.coder_pool
    assert pool is not None and pool.processes == 2
    pids = pool.pids()
    stats = worker.run()
    assert stats.chunks == 13 + 12 and stats.items == 190
    for job, n in ((comp, 100), (rec, 90)):
        info = job_store.get(job.id)
        assert info.state is JobState.SUCCEEDED
        assert (info.items_done, info.chunks_done) == (n, -(-n // 8))
    assert all_results(job_store, comp.id) == tiny_pipeline.compress("tiny-ae", images)
    got = all_results(job_store, rec.id)
    want = tiny_pipeline.reconstruct_each(codes)
    assert isinstance(got[41], ItemFailure) and job_store.get(rec.id).items_failed == 1
    assert all(np.array_equal(g, w)
               for i, (g, w) in enumerate(zip(got, want, strict=True)) if i != 41)
    time.sleep(0.1)
    for pid in pids:  # run() closed the pool it was built with
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
