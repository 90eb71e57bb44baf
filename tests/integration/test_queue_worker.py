"""The job worker against a real Redis: results, batching, errors, cancel, shutdown."""

from __future__ import annotations

import numpy as np
import pytest

from latentserve.worker.jobstore import ImageFormat, JobKind, JobState, unpack
from latentserve.worker.images import encode_png

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
