"""WatchJob / FetchResults streams whose client went away, and more open
job streams than the server has handler threads, must not lock everyone else out."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fixtures_redis import Background, wait_until
from latentserve.service.client.jobs import JobsClient
from latentserve.v1 import jobs_pb2 as pb
from latentserve.v1 import jobs_pb2_grpc as pb_grpc

pytestmark = pytest.mark.queue
WATCH, FETCH = "latentserve.v1.Jobs/WatchJob", "latentserve.v1.Jobs/FetchResults"


def in_flight(server: Any, rpc: str) -> int:
    value = server.metrics.registry.get_sample_value("latentserve_rpc_in_flight",
                                                     {"rpc": rpc})
    return int(value or 0)


def answers(server: Any, job_id: str) -> None:
    """Health Check and GetJob answer on a fresh channel (a short deadline: a call that
    waits for a free handler thread fails here instead of hanging)."""
    with grpc.insecure_channel(server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        job = pb_grpc.JobsStub(channel).GetJob(pb.GetJobRequest(id=job_id), timeout=10)
        assert job.id == job_id


def test_abandoned_and_surplus_job_streams_leave_the_server_answering(
        start_server, redis_url, make_worker, tiny_pipeline):
    threads = 8
    server = start_server(jobs_redis=redis_url, grpc_threads=threads)
    with JobsClient(server.target, timeout=30) as client:
        job = client.submit_sample("tiny-vae", 40, seed=5)  # queued: no worker runs yet
        watcher = Background(lambda: list(client.watch(job.id)))
        fetcher = Background(lambda: list(client.fetch(job.id)))
        wait_until(lambda: in_flight(server, WATCH) == 1 and in_flight(server, FETCH) == 1,
                   timeout=30, what="the live watcher and fetcher to be served")

        # Three times as many streams as handler threads, from a client that then vanishes.
        flood = grpc.insecure_channel(server.target)
        stub = pb_grpc.JobsStub(flood)
        calls = [stub.WatchJob(pb.WatchJobRequest(id=job.id)) for _ in range(threads * 3 // 2)]
        calls += [stub.FetchResults(pb.FetchResultsRequest(id=job.id))
                  for _ in range(threads * 3 // 2)]
        # Every call is either served (its handler holds a thread) or already refused.
        wait_until(lambda: in_flight(server, WATCH) + in_flight(server, FETCH) - 2
                   + sum(c.done() for c in calls) == len(calls),
                   timeout=30, what="every flood stream to be served or refused")
        refused = [c for c in calls if c.done()]
        assert refused and {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("--max-job-streams" in c.details() for c in refused)
        answers(server, job.id)  # with the flood still open

        held = in_flight(server, WATCH) + in_flight(server, FETCH) - 2
        assert held > 0  # some flood streams really hold handlers, to be abandoned now
        closed = time.monotonic()
        flood.close()
        wait_until(lambda: in_flight(server, WATCH) == 1 and in_flight(server, FETCH) == 1,
                   timeout=10, what="the abandoned streams to free their handlers")
        print(f"{held} abandoned job streams freed in {time.monotonic() - closed:.2f} s")
        answers(server, job.id)

        make_worker(queue=server.queue).run()  # the job moves: the live streams see it all
        states, results = watcher.outcome(), fetcher.outcome()
        assert states[-1].state == pb.JOB_STATE_SUCCEEDED and states[-1].items_done == 40
        assert states[0].state == pb.JOB_STATE_QUEUED
        assert [i for i, _ in results] == list(range(40))
        from latentserve.worker.runtime.images import encode_png

        assert [r for _, r in results] == [encode_png(im) for im in
                                           tiny_pipeline.sample("tiny-vae", 40, seed=5)]
        wait_until(lambda: in_flight(server, WATCH) + in_flight(server, FETCH) == 0,
                   timeout=10, what="the live streams to end")


def test_a_client_that_stops_reading_frees_its_stream(jobs_server, wait_until):
    with JobsClient(jobs_server.target, timeout=30) as client:
        job = client.submit_sample("tiny-vae", 20, seed=1)  # stays queued
        watch = client.watch(job.id)
        assert next(watch).state == pb.JOB_STATE_QUEUED
        wait_until(lambda: in_flight(jobs_server, WATCH) == 1, timeout=30,
                   what="the watch to be served")
        watch.close()  # the caller is done with it; the channel stays open
        wait_until(lambda: in_flight(jobs_server, WATCH) == 0, timeout=10,
                   what="the server to end the stream its client left")
