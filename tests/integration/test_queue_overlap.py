"""The pipelined worker (the default: a store thread PNG-encodes, packs and stores while
the next calls compute; each call in two halves, the second in a stage thread) against
a real Redis: chunks merged into one pipeline call are each stored exactly once, with
exactly the bytes of the one-step-at-a-time worker (``overlap=False``); a worker killed
mid-pipeline, or stopped, loses none of them. ``pipeline_calls=False`` (the store thread
alone) is kept where it matters."""

from __future__ import annotations

import signal

import pytest

from fixtures_redis import digest, pending
from latentserve.worker.jobqueue.store import ImageFormat, JobKind, JobState

pytestmark = pytest.mark.queue


class CountingPipeline:
    """The real pipeline, recording each call's kind and item count as it starts
    (``calls``) and each second half as it runs (``seconds``)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[str, int]] = []
        self.seconds: list[tuple[str, int]] = []

    def compress_staged(self, ref, images):
        self.calls.append(("compress", len(images)))
        return self._second("compress", len(images), self.inner.compress_staged(ref, images))

    def reconstruct_staged(self, codes, ref=None):
        self.calls.append(("reconstruct", len(codes)))
        return self._second("reconstruct", len(codes),
                            self.inner.reconstruct_staged(codes, ref))

    def sample_staged(self, ref, count, *, seed, temperature=1.0, start=0):
        self.calls.append(("sample", count))
        return self._second("sample", count, self.inner.sample_staged(
            ref, count, seed=seed, temperature=temperature, start=start))

    def _second(self, kind, n, second):
        def run():
            self.seconds.append((kind, n))
            return second()
        return run


def submit_all(job_store, codes, bad_codes, images):
    """One job of every kind and format, in chunks of 4 (an uneven last one)."""
    return [
        job_store.submit(JobKind.COMPRESS, "tiny-ae", items=images, chunk_size=4),
        job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=codes, chunk_size=4),
        job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=codes, chunk_size=4,
                         image_format=ImageFormat.RAW),
        job_store.submit(JobKind.RECONSTRUCT, "", items=bad_codes, chunk_size=4),
        job_store.submit(JobKind.SAMPLE, "tiny-vae", count=30, seed=5, chunk_size=4),
        job_store.submit(JobKind.SAMPLE, "tiny-ae", count=30, seed=5, chunk_size=4,
                         image_format=ImageFormat.RAW),
    ]


def stored_values(job_store, jobs):
    """Every chunk's stored value, as bytes, per job."""
    out = []
    for job in jobs:
        info = job_store.get(job.id)
        assert info.state is JobState.SUCCEEDED, info.error
        assert info.items_done == info.items_total
        out.append([job_store.chunk_results(job.id, c) for c in range(info.chunks_total)])
    return out


def count_stores(worker):
    """Wrap the worker's STORE: returns the list of (job, chunk, new) it is called with."""
    calls: list[tuple[str, int, bool]] = []
    real = worker.store.store_chunk

    def store_chunk(pool, job_id, chunk, *args, **kwargs):
        new = real(pool, job_id, chunk, *args, **kwargs)
        calls.append((job_id, chunk, new))
        return new

    worker.store.store_chunk = store_chunk
    return calls


def test_merged_chunks_are_stored_once_each_with_the_serial_workers_bytes(
        job_store, make_worker, tiny_pipeline, mnist_images, redis_client):
    images = mnist_images[:38]
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:22])
    bad = list(codes)
    bad[5] = bad[5][:-1] + bytes([bad[5][-1] ^ 0xFF])  # one corrupted code: a per-item error

    serial_jobs = submit_all(job_store, codes, bad, images)
    serial = make_worker(overlap=False, read_count=8, batch_items=32)
    serial_stores = count_stores(serial)
    serial.run()
    want = stored_values(job_store, serial_jobs)

    jobs = submit_all(job_store, codes, bad, images)
    counting = CountingPipeline(tiny_pipeline)
    # The store thread alone (each call whole in the loop's thread); pipelined calls:
    # test_pipelined_calls_store_each_chunk_once_with_the_serial_workers_bytes.
    worker = make_worker(pipeline=counting, read_count=8, batch_items=32, overlap=True,
                         pipeline_calls=False)
    stores = count_stores(worker)
    stats = worker.run()

    # Chunks of 4, calls of up to 32: several chunks (of one job or several) per call.
    assert max(n for _, n in counting.calls) == 32
    assert stored_values(job_store, jobs) == want  # byte-identical, chunk by chunk
    chunks = [(job.id, c) for job in jobs for c in range(job_store.get(job.id).chunks_total)]
    assert sorted((j, c) for j, c, _ in stores) == sorted(chunks)  # each once, none twice
    assert all(new for _, _, new in stores)
    assert stats.chunks == len(chunks) == len(serial_stores)
    assert stats.items == sum(job_store.get(job.id).items_total for job in jobs)
    assert job_store.get(jobs[3].id).items_failed == 1
    assert pending(redis_client, job_store) == []


@pytest.mark.parametrize("pipeline_calls", [False, True])
def test_one_big_call_for_many_chunks_and_a_split_chunk(job_store, make_worker, tiny_pipeline,
                                                        mnist_images, pipeline_calls):
    # 96 items in chunks of 12 merged into calls of 32 (a chunk split over two calls),
    # and one chunk of 40 split over two calls.
    a = job_store.submit(JobKind.SAMPLE, "tiny-ae", count=96, seed=9, chunk_size=12)
    b = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=mnist_images[:40], chunk_size=40)
    counting = CountingPipeline(tiny_pipeline)
    worker = make_worker(pipeline=counting, read_count=9, batch_items=32, overlap=True,
                         pipeline_calls=pipeline_calls)
    stores = count_stores(worker)
    worker.run()
    assert sorted(counting.calls) == [("compress", 8), ("compress", 32)] + [("sample", 32)] * 3
    assert sum(n for k, n in counting.calls if k == "sample") == 96
    assert sum(n for k, n in counting.calls if k == "compress") == 40
    assert len(stores) == 8 + 1 and len({(j, c) for j, c, _ in stores}) == 9
    from latentserve.worker.runtime.images import encode_png

    got = [item for _, item in job_store.iter_results(a.id)]
    assert got == [encode_png(im) for im in tiny_pipeline.sample("tiny-ae", 96, seed=9)]
    got = [item for _, item in job_store.iter_results(b.id)]
    assert got == tiny_pipeline.compress("tiny-ae", mnist_images[:40])


@pytest.mark.slow
def test_sigkill_mid_pipeline_loses_and_duplicates_nothing(
        job_store, redis_client, spawn_worker, tiny_pipeline, mnist_images, make_gate,
        wait_until):
    images = mnist_images[:240]
    job = job_store.submit(JobKind.COMPRESS, "tiny-vqvae", items=images, chunk_size=8)
    gate = make_gate("overlapped")
    gate.allow(1)  # one call of 32 (4 chunks), stored; the next call waits at the gate
    proc = spawn_worker("--consumer", "overlapped", "--overlap", "true", "--read-count", "8",
                        "--batch-items", "32", "--max-deliveries", "10", claim_idle_s=0.5,
                        gate="overlapped")
    held = wait_until(lambda: gate.passed() == 1 and gate.waiting()
                      and job_store.get(job.id).items_done == 32
                      and pending(redis_client, job_store, "overlapped"),
                      timeout=60, what="the worker to be mid-pipeline")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert len(held) == 4  # the waiting call's chunks
    final = spawn_worker("--burst", "--max-deliveries", "10", "--batch-items", "64",
                         claim_idle_s=0.5)
    out = final.finish(timeout=120)
    assert final.returncode == 0, out
    info = job_store.get(job.id)
    assert info.state is JobState.SUCCEEDED, info.error
    assert (info.items_done, info.chunks_done) == (240, 30)  # each chunk counted once
    results = [code for _, code in job_store.iter_results(job.id)]
    assert digest(results) == digest(tiny_pipeline.compress("tiny-vqvae", images))
    assert pending(redis_client, job_store) == []


@pytest.mark.parametrize("pipeline_calls", [False, True])
def test_stop_finishes_started_chunks_and_gives_back_those_read_ahead(
        job_store, make_worker, tiny_pipeline, mnist_images, redis_client, pipeline_calls):
    job = job_store.submit(JobKind.SAMPLE, "tiny-ae", count=64, seed=2, chunk_size=8)
    holder: list = []

    class StopAfterFirst(CountingPipeline):
        def sample_staged(self, ref, count, *, seed, temperature=1.0, start=0):
            out = super().sample_staged(ref, count, seed=seed, temperature=temperature,
                                        start=start)
            if len(self.calls) == 1:
                holder[0].request_stop()  # mid-read: two more chunks wait to be computed
            return out

    counting = StopAfterFirst(tiny_pipeline)
    worker = make_worker(pipeline=counting, read_count=4, batch_items=16, burst=False,
                         overlap=True, pipeline_calls=pipeline_calls)
    holder.append(worker)
    stats = worker.run()
    info = job_store.get(job.id)
    # The first call's two chunks were computed and stored (by the store thread, within
    # the grace); the read's two unstarted ones went back to the queue, none pending.
    assert (stats.chunks, stats.released) == (2, 2)
    assert info.items_done == 16
    assert pending(redis_client, job_store) == []
    make_worker().run()
    from latentserve.worker.runtime.images import encode_png

    got = [item for _, item in job_store.iter_results(job.id)]
    assert got == [encode_png(im) for im in tiny_pipeline.sample("tiny-ae", 64, seed=2)]
    assert job_store.get(job.id).chunks_done == 8


def test_pipelined_calls_store_each_chunk_once_with_the_serial_workers_bytes(
        job_store, make_worker, tiny_pipeline, mnist_images, redis_client):
    # The default worker (overlap, pipeline_calls): each call's second half (the
    # coder of a compress call, the network of a reconstruct call) runs in the stage
    # thread while the next call's first half runs; merged chunks, a chunk split over
    # two calls, a per-item bad code: the serial worker's bytes, each chunk stored once.
    images = mnist_images[:38]
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:22])
    bad = list(codes)
    bad[5] = bad[5][:-1] + bytes([bad[5][-1] ^ 0xFF])
    serial_jobs = submit_all(job_store, codes, bad, images)
    make_worker(overlap=False, read_count=8, batch_items=32).run()
    want = stored_values(job_store, serial_jobs)

    jobs = submit_all(job_store, codes, bad, images)
    halves = CountingPipeline(tiny_pipeline)
    worker = make_worker(pipeline=halves, read_count=8, batch_items=12)
    assert worker.config.overlap and worker.config.pipeline_calls  # the defaults
    stores = count_stores(worker)
    stats = worker.run()
    assert stored_values(job_store, jobs) == want
    chunks = [(job.id, c) for job in jobs for c in range(job_store.get(job.id).chunks_total)]
    assert sorted((j, c) for j, c, _ in stores) == sorted(chunks)
    assert all(new for _, _, new in stores)
    assert stats.chunks == len(chunks)
    # every call ran in two halves, the second once per first, in the order started
    assert halves.seconds == halves.calls and len(halves.calls) > 4
    assert pending(redis_client, job_store) == []


def test_a_failed_second_half_of_a_merged_call_fails_only_its_culprit(
        job_store, make_worker, tiny_pipeline, mnist_images, redis_client):
    # FAIL_FAST reconstruct jobs of one model merge into one call; a bad code makes that
    # call's second half raise in the stage thread; each chunk then runs alone, so only
    # the bad code's chunk fails its job, the other job's chunks are stored once each.
    from latentserve.worker.jobqueue.store import OnItemError

    codes = tiny_pipeline.compress("tiny-ae", mnist_images[:8])
    bad = list(codes)
    bad[1] = bad[1][:-1] + bytes([bad[1][-1] ^ 0xFF])
    good_job = job_store.submit(JobKind.RECONSTRUCT, "tiny-ae", items=codes, chunk_size=4,
                                on_item_error=OnItemError.FAIL_FAST)
    bad_job = job_store.submit(JobKind.RECONSTRUCT, "tiny-ae", items=bad, chunk_size=4,
                               on_item_error=OnItemError.FAIL_FAST)
    worker = make_worker(read_count=8, batch_items=16, overlap=True)
    stores = count_stores(worker)
    worker.run()
    assert job_store.get(good_job.id).state is JobState.SUCCEEDED
    assert job_store.get(bad_job.id).state is JobState.FAILED
    assert "code" in (job_store.get(bad_job.id).error or "")
    assert sorted((j, c) for j, c, _ in stores if j == good_job.id) == [(good_job.id, 0),
                                                                       (good_job.id, 1)]
    from latentserve.worker.runtime.images import encode_png

    got = [item for _, item in job_store.iter_results(good_job.id)]
    assert got == [encode_png(im) for im in tiny_pipeline.reconstruct(codes)]
    assert pending(redis_client, job_store) == []


def test_pipelined_calls_with_a_coder_pool_give_the_inline_bytes(
        job_store, make_worker, tiny_repo, tiny_pipeline, mnist_images):
    # The pipelined worker coding in processes (every batch through the pool): the
    # codes and images of the inline pipeline.
    from latentserve.worker.codec.coderpool import CoderPool
    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.images import encode_png
    from latentserve.worker.runtime.pipeline import Pipeline

    images = mnist_images[:40]
    codes = tiny_pipeline.compress("tiny-vae", images)
    with CoderPool(2, min_batch=1, min_slice=1) as pool:
        pooled = Pipeline(tiny_repo, EngineConfig(intra_op_threads=1), coder_pool=pool)
        a = job_store.submit(JobKind.COMPRESS, "tiny-ae", items=images, chunk_size=8)
        b = job_store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=codes, chunk_size=8)
        make_worker(pipeline=pooled, read_count=4, batch_items=16, overlap=True).run()
    assert [c for _, c in job_store.iter_results(a.id)] == tiny_pipeline.compress("tiny-ae",
                                                                                  images)
    assert [im for _, im in job_store.iter_results(b.id)] == [
        encode_png(im) for im in tiny_pipeline.reconstruct(codes)]
