"""A job whose upload never finished must end, not sit in RECEIVING.

A real ``latentserve serve`` is SIGKILLed in the middle of a SubmitJob upload (the
client holds its stream open at a known point, so no timing is guessed), and a seal is
undone the way a Redis crash loses it. With a short receiving timeout the job ends
FAILED with the reason, WatchJob and FetchResults end, and its chunks are dropped unrun.
Every wait is on an event or a deadline past the timeout, never on machine speed.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fixtures_redis import JOBS_QUEUE, Background, wait_until
from latentserve import errors as E
from latentserve.service.client.jobs import JobsClient, state_name
from latentserve.service.wire import raw_image
from latentserve.v1 import jobs_pb2 as pb
from latentserve.v1 import jobs_pb2_grpc as pb_grpc
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.packing import pack_images
from latentserve.worker.jobqueue.store import JobInfo, JobKind, JobState, JobStore
from serve_process import start_serve

pytestmark = pytest.mark.queue
SHORT = 0.5  # the receiving timeout of the parts that must end the job
REASON = "upload never finished: no SubmitJob message for over 0.5 s"


def serve(tiny_repo: Path, redis_url: str) -> tuple[subprocess.Popen[str], str]:
    """A ``latentserve serve`` process on the test's Redis (default receiving timeout, so
    it never ends the upload itself) and its target."""
    served = start_serve(tiny_repo, "--metrics-port", "0", "--redis", redis_url,
                         "--embedded-worker", "no", "--job-chunk-size", "4", merge_logs=False)
    return served.proc, served.target


def past_the_timeout(info: JobInfo) -> None:
    """Return once ``info``'s upload has been silent for longer than SHORT."""
    left = info.upload_seen + SHORT - time.time()
    if left > 0:
        time.sleep(left + 0.05)


def ends_failed(client: JobsClient, job_id: str) -> tuple[pb.Job, BaseException | None]:
    """Watch and fetch the job until they end on their own (bounded by the joins)."""
    watch = Background(lambda: list(client.watch(job_id)))
    fetch = Background(lambda: list(client.fetch(job_id)))
    for t in (watch, fetch):
        t.join(30)
        assert not t.is_alive(), "a watch or fetch of the abandoned job never ended"
    assert watch.error is None, watch.error
    last = watch.result[-1]
    assert state_name(last.state) == "failed" and last.error.startswith(REASON), last
    return last, fetch.error


def test_sigkill_mid_upload_fails_the_job_and_drops_its_chunks(
        tiny_repo, redis_url, redis_client, start_server, make_worker, mnist_images):
    store = JobStore(redis_client, QueueConfig(**JOBS_QUEUE))
    proc, target = serve(tiny_repo, redis_url)
    release = threading.Event()

    def upload() -> Iterator[pb.SubmitJobRequest]:
        yield pb.SubmitJobRequest(spec=pb.JobSpec(kind=pb.JOB_KIND_COMPRESS, model="tiny-ae"))
        yield pb.SubmitJobRequest(items=pb.JobItems(
            images=[raw_image(im) for im in mnist_images[:12]]))
        release.wait(60)  # the upload is "in progress" until the test lets go
        yield pb.SubmitJobRequest(items=pb.JobItems(images=[raw_image(mnist_images[12])]))

    try:
        with grpc.insecure_channel(target) as channel:
            call = pb_grpc.JobsStub(channel).SubmitJob.future(upload(), timeout=60)
            [job] = wait_until(lambda: [j for j in store.list() if j.chunks_submitted == 3],
                               what="the server to queue the first 3 chunks")
            assert job.state is JobState.RECEIVING
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
            with pytest.raises(grpc.RpcError) as broken:
                call.result(timeout=30)
            assert broken.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()

    # Nothing but another server with a short timeout, and a worker, ever sees it again.
    past_the_timeout(store.get(job.id))
    server = start_server(jobs_redis=redis_url, queue_changes={"receiving_timeout_s": SHORT})
    with JobsClient(server.target, timeout=30, retry_deadline_s=0) as client:
        failed, fetch_error = ends_failed(client, job.id)
    assert isinstance(fetch_error, E.JobStateError) and REASON in str(fetch_error)
    assert (failed.items_done, failed.items_total) == (0, 0)
    stats = make_worker(queue=QueueConfig(**JOBS_QUEUE, receiving_timeout_s=SHORT)).run()
    assert stats.items == 0  # its 3 chunks were dropped, not computed for nothing
    assert store.depth("default") == 0 and not store.r.exists(store.keys.job_inputs(job.id))
    assert not store.r.zcard(store.keys.jobs_receiving)


def test_a_worker_computes_no_chunk_of_an_upload_gone_silent(job_store, redis_client,
                                                             make_worker, mnist_images):
    jobs = [job_store.create(JobKind.COMPRESS, "tiny-ae", chunk_size=4) for _ in range(2)]
    for job in jobs:
        job_store.enqueue(job, [(c, 4, pack_images(mnist_images[4 * c:4 * c + 4]))
                                for c in range(3)])
    past_the_timeout(job_store.get(jobs[1].id))
    short = JobStore(redis_client, dataclasses.replace(job_store.config,
                                                       receiving_timeout_s=SHORT))
    # BEGIN, about to hand out a chunk of the silent upload, fails the job instead.
    reply = redis_client.xreadgroup(short.keys.group, "t", {short.keys.stream("default"): ">"},
                                    count=1)
    [(_, [(entry, fields)])] = reply
    assert short.begin_chunk("default", fields[b"job"].decode(), 0, entry.decode()) == "failed"
    first = short.get(fields[b"job"].decode())
    assert first.state is JobState.FAILED and first.error.startswith(REASON)
    # Whichever comes first, BEGIN or the heartbeat's sweep, ends the other one too.
    assert make_worker(queue=short.config).run().items == 0
    assert [short.get(j.id).state for j in jobs] == [JobState.FAILED] * 2
    assert short.depth("default") == 0


def test_a_lost_seal_ends_the_job_after_the_timeout(jobs_server, start_server, redis_url,
                                                    redis_client, make_worker, mnist_images):
    with JobsClient(jobs_server.target, timeout=30) as client:
        job = client.submit_compress("tiny-ae", mnist_images[:10])
    assert state_name(job.state) == "queued" and job.items_total == 10
    store = JobStore(redis_client, jobs_server.queue)
    # Redis restarted from an AOF that misses the seal's last second: the job hash and
    # the receiving index are as they were before SEAL ran, the chunks still queued.
    info = store.get(job.id)
    store.r.hset(store.keys.job(job.id), mapping={"state": "receiving", "sealed": 0,
                                                  "items_total": 0, "chunks_total": 0})
    store.r.zadd(store.keys.jobs_receiving, {job.id: info.upload_seen})
    assert store.get(job.id).state is JobState.RECEIVING
    past_the_timeout(info)

    # No client asks: the short-timeout server's own sweep ends it.
    server = start_server(jobs_redis=redis_url, queue_changes={"receiving_timeout_s": SHORT})
    wait_until(lambda: store.get(job.id).state is JobState.FAILED, timeout=30,
               what="the server's sweep to fail the job")
    with JobsClient(server.target, timeout=30) as client:
        _, fetch_error = ends_failed(client, job.id)
    assert isinstance(fetch_error, E.JobStateError) and "results from index 0" in str(
        fetch_error)
    assert make_worker(queue=jobs_server.queue).run().items == 0
