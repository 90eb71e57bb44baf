"""Watch and fetch ride out a Redis restart and a server restart.

Real processes: a private Redis killed and restarted under the server, a server stopped
and started again on the same port, a ``latentserve worker`` process held at a gate and
a ``latentserve job watch`` process; the clients must end with the whole, right result.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
from typing import Any

import pytest

from fixtures_redis import ROOT, Background, wait_until
from latentserve import errors as E
from latentserve.service.client.jobs import JobsClient
from latentserve.v1 import jobs_pb2 as pb
from latentserve.worker.runtime.images import encode_png

pytestmark = pytest.mark.queue
WATCH, FETCH = "latentserve.v1.Jobs/WatchJob", "latentserve.v1.Jobs/FetchResults"


def metric(server: Any, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(f"latentserve_{name}", labels) or 0.0


def check_states(states: list[pb.Job], items: int) -> None:
    """A watch that resumed: no state twice in a row, never backwards, ending done."""
    keys = [(s.state, s.items_done, s.chunks_done, s.items_total) for s in states]
    assert all(a != b for a, b in itertools.pairwise(keys)), keys
    assert [s.items_done for s in states] == sorted(s.items_done for s in states), keys
    assert states[-1].state == pb.JOB_STATE_SUCCEEDED and states[-1].items_done == items


def test_watch_and_fetch_resume_through_a_redis_restart(
        private_redis, start_server, spawn_worker, make_gate, tiny_pipeline, caplog):
    server = start_server(jobs_redis=private_redis.url)
    gate = make_gate("redis-restart")
    with JobsClient(server.target, timeout=30, retry_deadline_s=120) as client:
        job = client.submit_sample("tiny-vae", 48, seed=7)  # 3 chunks of 16
        results: list[tuple[int, Any]] = []
        watcher = Background(lambda: list(client.watch(job.id)))
        fetcher = Background(lambda: results.extend(client.fetch(job.id)))
        gate.allow(1)
        worker = spawn_worker("--read-count", "1", "--max-deliveries", "10",
                              redis=private_redis.url, gate="redis-restart")
        # Chunk 0 stored and fetched; the worker holds chunk 1 at the gate.
        wait_until(lambda: len(results) == 16 and gate.waiting(), timeout=120,
                   what="the first chunk to reach the fetcher")

        private_redis.kill()
        wait_until(lambda: metric(server, "rpc_requests_total", rpc=WATCH, code="UNAVAILABLE")
                   and metric(server, "rpc_requests_total", rpc=FETCH, code="UNAVAILABLE"),
                   timeout=60, what="both streams to fail with UNAVAILABLE")
        private_redis.start()
        gate.open()

        check_states(watcher.outcome(), 48)
        fetcher.outcome()
        assert [i for i, _ in results] == list(range(48))
        want = [encode_png(im) for im in tiny_pipeline.sample("tiny-vae", 48, seed=7)]
        assert [r for _, r in results] == want
    assert "watch of job" in caplog.text and "fetch of job" in caplog.text
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log_path.read_text()


def test_watch_cli_and_fetch_resume_through_a_server_restart(
        start_server, redis_url, make_worker, tiny_pipeline, tmp_path):
    first = start_server(jobs_redis=redis_url)
    with JobsClient(first.target, timeout=30, retry_deadline_s=120) as client:
        job = client.submit_sample("tiny-vae", 40, seed=9)
        results: list[tuple[int, Any]] = []
        fetcher = Background(lambda: results.extend(client.fetch(job.id)))
        log = tmp_path / "watch.log"
        with open(log, "w") as out:
            cli = subprocess.Popen(
                [sys.executable, "-m", "latentserve.cli", "job", "watch", job.id,
                 "--target", first.target, "--retry-deadline-s", "120"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: metric(first, "rpc_in_flight", rpc=WATCH) == 1
                       and metric(first, "rpc_in_flight", rpc=FETCH) == 1, timeout=60,
                       what="the CLI's watch and the client's fetch to be open")
            assert first.stop(0).wait(30)
            second = start_server(jobs_redis=redis_url, port=first.port)
            make_worker(queue=second.queue).run()
            assert cli.wait(120) == 0, log.read_text()
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(10)
        fetcher.outcome()
    text = log.read_text()
    assert f"job {job.id}: succeeded" in text and "UNAVAILABLE" in text, text
    assert [i for i, _ in results] == list(range(40))
    want = [encode_png(im) for im in tiny_pipeline.sample("tiny-vae", 40, seed=9)]
    assert [r for _, r in results] == want


def test_answers_are_not_retried_and_an_outage_ends_at_the_deadline(start_server, redis_url):
    server = start_server(jobs_redis=redis_url)
    with JobsClient(server.target, timeout=30, retry_deadline_s=120) as client:
        with pytest.raises(E.JobNotFound):  # NOT_FOUND is an answer: raised at once
            list(client.watch("0" * 32))
        target = server.target
    assert server.stop(0).wait(30)
    with (JobsClient(target, timeout=5, retry_deadline_s=0.5) as client,
          pytest.raises(E.Unavailable, match=r"gave up on the fetch of job 0+ after \d+ "
                                             r"attempts over 0.5 s \(retry deadline 0.5 s")):
        list(client.fetch("0" * 32))
