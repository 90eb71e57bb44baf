"""The Jobs service on a real loopback gRPC server with a real Redis and workers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fixtures_redis import JOBS_QUEUE, wait_until
from latentserve import errors as E
from latentserve.service.client.jobs import JobsClient, state_name
from latentserve.service.server.assemble import Server
from latentserve.v1 import jobs_pb2 as pb
from latentserve.v1 import jobs_pb2_grpc as pb_grpc
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.store import JobStore
from latentserve.worker.runtime.images import encode_png

pytestmark = pytest.mark.queue
QUEUE = QueueConfig(**JOBS_QUEUE)


@pytest.fixture
def server(jobs_server: Server) -> Server:
    return jobs_server


@pytest.fixture
def client(server: Server) -> Iterator[JobsClient]:
    with JobsClient(server.target, timeout=30, batch=10) as c:
        yield c


def run_worker(make_worker, **config):
    return make_worker(queue=QUEUE, **config).run()


def test_compress_job_end_to_end(client, make_worker, tiny_pipeline, mnist_images):
    images = mnist_images[:45]
    job = client.submit_compress("tiny-ae", images)
    assert (state_name(job.state), job.items_total, job.chunks_total, job.chunk_size) == \
        ("queued", 45, 3, 16)
    assert client.get(job.id).state == pb.JOB_STATE_QUEUED
    run_worker(make_worker)
    done = client.get(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.items_done == 45
    assert done.items_per_second > 0 and done.finished_time >= done.started_time > 0
    codes = [c for _, c in client.fetch(job.id)]
    assert codes == tiny_pipeline.compress("tiny-ae", images)
    assert [i for i, _ in client.fetch(job.id, start=20)] == list(range(20, 45))
    assert [j.id for j in client.list()] == [job.id]


def test_png_inputs_reconstruct_and_raw_samples(client, make_worker, tiny_pipeline,
                                                mnist_images):
    pngs = [encode_png(im) for im in mnist_images[:20]]
    a = client.submit_compress("tiny-vae", pngs, chunk_size=8)
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:20])
    b = client.submit_reconstruct(codes, model="tiny-vae")
    c = client.submit_sample("tiny-vqvae", 10, seed=4, temperature=0.9, fmt="raw")
    run_worker(make_worker)
    assert [x for _, x in client.fetch(a.id)] == codes
    want = tiny_pipeline.reconstruct(codes)
    assert [x for _, x in client.fetch(b.id)] == [encode_png(im) for im in want]
    got = np.stack([x for _, x in client.fetch(c.id)])
    assert np.array_equal(got, tiny_pipeline.sample("tiny-vqvae", 10, seed=4,
                                                    temperature=0.9))


def test_watch_never_goes_back_and_reads_100_only_when_all_is_stored(
        client, make_worker, redis_client, mnist_images):
    store = JobStore(redis_client, QUEUE)
    job = client.submit_compress("tiny-vqvae", mnist_images[:160], chunk_size=10)
    events: list[tuple[int, int, int]] = []

    def watch() -> None:
        for ev in client.watch(job.id):
            # What is stored right now is at least what the event reports.
            stored = sum(len(x) for _, x in store.iter_chunks(job.id)) \
                if ev.state == pb.JOB_STATE_SUCCEEDED else \
                sum(int(store.chunk_results(job.id, c) is not None) * 10 for c in range(16))
            events.append((ev.items_done, stored, ev.state))

    watcher = threading.Thread(target=watch)
    watcher.start()
    run_worker(make_worker, read_count=1)
    watcher.join(30)
    assert not watcher.is_alive()
    done = [e[0] for e in events]
    assert done == sorted(done) and len(events) >= 3, events
    assert all(reported <= stored for reported, stored, _ in events), events
    assert events[-1] == (160, 160, pb.JOB_STATE_SUCCEEDED)
    assert all(state != pb.JOB_STATE_SUCCEEDED for d, _, state in events[:-1])


def test_fetch_streams_results_while_the_job_runs(client, make_worker, mnist_images):
    job = client.submit_compress("tiny-ae", mnist_images[:64])
    got: list[int] = []
    fetcher = threading.Thread(target=lambda: got.extend(i for i, _ in client.fetch(job.id)))
    fetcher.start()  # before any worker runs: it waits for each chunk
    run_worker(make_worker, read_count=1)
    fetcher.join(30)
    assert got == list(range(64))


def test_cancel_and_errors(client, make_worker, tiny_pipeline, mnist_images):
    job = client.submit_sample("tiny-ae", 100)
    cancelled = client.cancel(job.id)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.error
    with pytest.raises(E.JobStateError, match="already cancelled"):
        client.cancel(job.id)
    with pytest.raises(E.JobStateError, match="were not produced"):
        list(client.fetch(job.id))
    stats = run_worker(make_worker)
    assert stats.items == 0
    with pytest.raises(E.JobNotFound, match="no job"):
        client.get("f" * 32)
    with pytest.raises(E.InvalidInput, match="not a job id"):
        client.get("42")
    with pytest.raises(E.ModelNotFound, match="no model named"):
        client.submit_sample("no-such-model", 3)
    with pytest.raises(E.InvalidInput, match="temperature must be a positive number"):
        client.submit_sample("tiny-ae", 3, temperature=-1)
    # Bad inputs refuse the whole job under FAIL_FAST only (per item: test_jobs_item_errors).
    with pytest.raises(E.InvalidInput, match=r"image 3 is raw 1x20x20"):
        client.submit_compress("tiny-ae", list(mnist_images[:3]) + [
            np.zeros((1, 20, 20), np.uint8)], on_item_error="fail_fast")
    good = tiny_pipeline.compress("tiny-ae", mnist_images[:1])[0]
    with pytest.raises(E.CorruptCode, match="code 1: .*truncated"):
        client.submit_reconstruct([good, good[:3]], on_item_error="fail_fast")
    assert [state_name(j.state) for j in client.list()] == ["cancelled"]  # refused: no trace


def test_limits_name_the_depth_and_the_size(client, server, mnist_images):
    with pytest.raises(E.ResourceLimit, match="over the limit of 2000"):
        client.submit_sample("tiny-ae", 2001)
    with pytest.raises(E.ResourceLimit, match="more than 2000 items"):
        client.submit_compress("tiny-ae", iter([mnist_images[0]] * 2001),  # no size hint
                               chunk_size=100)
    client.submit_sample("tiny-ae", 16 * 30)  # 30 chunks queued of 40
    with pytest.raises(E.ResourceLimit, match="holds 30 chunks; adding 11 would pass the "
                                              "limit of 40"):
        client.submit_sample("tiny-ae", 16 * 11)
    client.submit_compress("tiny-ae", mnist_images[:16 * 10])  # exactly to the limit
    with pytest.raises(E.ResourceLimit, match="holds 40 chunks, its limit is 40"):
        client.submit_compress("tiny-ae", mnist_images[:1])
    assert [j.items_total for j in client.list()] == [160, 480]


def test_a_broken_submission_leaves_nothing(server, redis_client, mnist_images):
    from latentserve.service.wire import raw_image

    def requests(expected: int, crash: bool):
        yield pb.SubmitJobRequest(spec=pb.JobSpec(kind=pb.JOB_KIND_COMPRESS, model="tiny-ae",
                                                  chunk_size=4, expected_items=expected))
        yield pb.SubmitJobRequest(items=pb.JobItems(images=[raw_image(i)
                                                            for i in mnist_images[:9]]))
        if crash:
            raise RuntimeError("client crashed mid-upload")

    store = JobStore(redis_client, QUEUE)
    # A client that announced 20 items and crashed after 9 (grpc may show the server a
    # cancelled stream as a finished one: the count refuses it then), and one that ended
    # its stream after 9 of 20 announced.
    for crash in (True, False):
        with grpc.insecure_channel(server.target) as channel, \
                pytest.raises(grpc.RpcError) as caught:
            pb_grpc.JobsStub(channel).SubmitJob(requests(20, crash), timeout=30)
        if not crash:
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "announced 20 items" in caught.value.details()
            assert "9 arrived" in caught.value.details()
        wait_until(lambda: not store.list() and store.depth("default") == 0, timeout=30,
                   what="the half-submitted job to be removed")


def test_serve_with_the_embedded_valkey_and_its_worker(tiny_repo, tmp_path, monkeypatch,
                                                       tiny_pipeline):
    """No Redis URL: the server starts valkey with AOF under the state folder and runs a
    worker in process; a restart of the server finds the job again."""
    from latentserve.service.jobs.settings import JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("LATENTSERVE_REDIS_URL", raising=False)
    settings = JobSettings(state_dir=tmp_path / "state", queue=QueueConfig(chunk_size=8))
    config = ServiceConfig(host="127.0.0.1", port=0, metrics_port=None, models=tiny_repo,
                           intra_op_threads=1, compute_workers=1, preload=False, grace_s=5,
                           jobs=settings)

    srv, _ = create_server(config)
    srv.start()
    with JobsClient(srv.target, timeout=30) as c:
        job = c.submit_sample("tiny-vae", 20, seed=2)
        assert c.wait(job.id).state == pb.JOB_STATE_SUCCEEDED
        got = [p for _, p in c.fetch(job.id)]
    assert got == [encode_png(im) for im in tiny_pipeline.sample("tiny-vae", 20, seed=2)]
    # The embedded Valkey wants a password; its URL is in a file only we can read.
    url_file = tmp_path / "state" / "valkey" / "url"
    url = url_file.read_text().strip()
    assert url_file.stat().st_mode & 0o777 == 0o600
    import redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url.replace(url.split("@")[0] + "@", "redis://")).ping()
    assert redis.Redis.from_url(url).ping()
    assert srv.stop(1).wait(30)
    assert (tmp_path / "state" / "valkey" / "appendonlydir").is_dir()

    srv, _ = create_server(config)
    srv.start()
    try:
        with JobsClient(srv.target, timeout=30) as c:
            again = c.get(job.id)
            assert (again.state, again.items_done) == (pb.JOB_STATE_SUCCEEDED, 20)
    finally:
        assert srv.stop(1).wait(30)


def test_demo_jobs_helper(client, make_worker, mnist_images):
    from latentserve.service.client.jobs import run_demo_jobs

    worker = make_worker(queue=QUEUE, burst=False)
    thread = worker.start_thread()
    try:
        rows = run_demo_jobs(client, compress_model="tiny-ae", images=mnist_images[:40],
                             sample_model="tiny-vae", count=30)
    finally:
        worker.request_stop()
        thread.join(10)
    assert [(r["job"], r["items"]) for r in rows] == [("compress", 40), ("sample", 30)]
    assert all(r["items_per_s"] > 0 for r in rows)


def test_redis_none_serves_no_job_api(tiny_repo):
    from latentserve.service.jobs.settings import JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig

    config = ServiceConfig(host="127.0.0.1", port=0, metrics_port=None, models=tiny_repo,
                           preload=False, jobs=JobSettings(redis_url="none"))
    srv, _ = create_server(config)
    srv.start()
    try:
        with (grpc.insecure_channel(srv.target) as channel,
              pytest.raises(grpc.RpcError) as info):
            pb_grpc.JobsStub(channel).GetJob(pb.GetJobRequest(id="0" * 32), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop(0).wait(30)
