"""Job work on Prometheus: a worker's /metrics counts chunks and items by
model and op, the queue gauges read a known state right (a worker held at the gate),
the service's /metrics carries the queue gauges and its embedded worker's counts, and
no input can grow the number of series."""

from __future__ import annotations

import json
import signal
import urllib.request
from typing import Any

import pytest

from latentserve.worker.jobqueue.store import JobKind, JobState

pytestmark = pytest.mark.queue

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return parse(reply.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def queue_gauges(samples: Samples, pool: str = "default") -> dict[str, float | None]:
    p = "latentserve_queue_"
    return {"up": value(samples, p + "up"),
            "length": value(samples, p + "stream_length", pool=pool),
            "lag": value(samples, p + "lag", pool=pool),
            "pending": value(samples, p + "pending", pool=pool),
            "consumers": value(samples, p + "consumers", pool=pool),
            "dead": value(samples, p + "dead_letter_length")}


def redis_ms(client: Any) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def health_record(client: Any, store: Any, consumer: str) -> dict[str, Any] | None:
    raw = client.get(store.keys.worker(consumer))
    return json.loads(raw) if raw else None


@pytest.mark.slow
def test_a_workers_metrics_count_job_work_and_the_queue_gauges_read_a_known_state(
        job_store, redis_client, redis_url, make_worker, spawn_worker, start_server,
        make_gate, mnist_images, wait_until):
    # One dead letter first: a chunk of a model nobody has, delivered past the cap.
    lost = job_store.submit(JobKind.SAMPLE, "no-such-model", count=4, chunk_size=4)
    make_worker(max_deliveries=1, claim_idle_s=0.2).run()
    assert job_store.get(lost.id).state is JobState.FAILED
    sample = job_store.submit(JobKind.SAMPLE, "tiny-vqvae", count=48, chunk_size=16, seed=3)
    compress = job_store.submit(JobKind.COMPRESS, "tiny-ae:1", items=mnist_images[:32],
                                chunk_size=16)
    gate = make_gate("m")  # allows no call: the worker holds one chunk, four wait
    worker = spawn_worker("--consumer", "m", "--read-count", "1", "--metrics-port", "0",
                          "--metrics-host", "127.0.0.1", gate="m")
    record = wait_until(lambda: gate.waiting() and (r := health_record(
        redis_client, job_store, "m")) and r["ready"] and r["metrics_port"] and r,
        timeout=60, what="the worker to hold a chunk at the gate")
    port = record["metrics_port"]
    server = start_server(jobs_redis=redis_url, metrics_port=0)

    [entry] = redis_client.xpending_range(job_store.keys.stream("default"),
                                          job_store.keys.group, "-", "+", 10)
    queued_ms = int(entry["message_id"].split(b"-")[0])
    before = redis_ms(redis_client)
    held, service = scrape(port), scrape(server.metrics_port)
    after = redis_ms(redis_client)
    known = {"up": 1, "length": 5, "lag": 4, "pending": 1, "consumers": 1, "dead": 1}
    assert queue_gauges(held) == known
    assert queue_gauges(service) == known  # the service reads the same queue
    for samples in (held, service):
        age_ms = value(samples, "latentserve_queue_oldest_pending_age_seconds",
                       pool="default") * 1000
        assert before - queued_ms - 1 <= age_ms <= after - queued_ms + 1
    w = "latentserve_worker_"
    assert value(held, w + "chunks_in_flight") == 1
    assert value(held, w + "chunks_total", model="tiny-vqvae:1", op="sample") is None
    assert value(held, w + "provider_info", model="tiny-ae:1",
                 provider="CPUExecutionProvider") == 1
    assert value(held, w + "model_load_seconds", model="tiny-vqvae:1") > 0

    gate.open()

    def counted() -> Samples | None:
        s = scrape(port)
        return s if value(s, w + "chunks_in_flight") == 0 and \
            value(s, w + "chunks_total", model="tiny-ae:1", op="compress") == 2 and \
            value(s, w + "chunks_total", model="tiny-vqvae:1", op="sample") == 3 else None

    done = wait_until(counted, timeout=60, interval=0.1, what="every chunk to be counted")
    for job, n in ((sample, 48), (compress, 32)):
        info = job_store.get(job.id)
        assert info.state is JobState.SUCCEEDED and info.items_done == n, info
    assert value(done, w + "items_total", model="tiny-vqvae:1", op="sample") == 48
    assert value(done, w + "items_total", model="tiny-ae:1", op="compress") == 32
    assert value(done, w + "chunk_seconds_count", model="tiny-vqvae:1", op="sample") == 3
    assert value(done, w + "chunk_seconds_count", model="tiny-ae:1", op="compress") == 2
    for name in ("retries_total", "dead_letters_total", "released_total", "skipped_total"):
        assert value(done, w + name) == 0, name
    empty = {"up": 1, "length": 0, "lag": 0, "pending": 0, "consumers": 1, "dead": 1}
    assert queue_gauges(done) == empty
    assert value(done, "latentserve_queue_oldest_pending_age_seconds", pool="default") == 0

    worker.send_signal(signal.SIGTERM)
    out = worker.finish(timeout=30)
    assert worker.returncode == 0, out
    assert f"metrics on 127.0.0.1:{port}" in out


def test_the_services_metrics_count_its_embedded_workers_jobs_apart_from_unary_calls(
        redis_url, tiny_repo, job_store, queue_config, wait_until):
    from latentserve.service.client.inference import LatentServeClient
    from latentserve.service.jobs.settings import JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig

    jobs = JobSettings(redis_url=redis_url, queue=queue_config, embedded_worker="yes")
    config = ServiceConfig(host="127.0.0.1", port=0, metrics_port=0, models=tiny_repo,
                           intra_op_threads=1, compute_workers=1, preload=False, jobs=jobs)
    server, port = create_server(config)
    server.start()
    try:
        with LatentServeClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.sample("tiny-vae", 4, seed=1)
        job = job_store.submit(JobKind.SAMPLE, "tiny-vae", count=40, seed=2)
        wait_until(lambda: job_store.get(job.id).state.terminal, timeout=60,
                   what="the embedded worker to run the job")
        assert job_store.get(job.id).state is JobState.SUCCEEDED
        w = "latentserve_worker_items_total"
        samples = wait_until(lambda: (s := scrape(server.metrics_port)) and value(
            s, w, model="tiny-vae:1", op="sample") == 40 and s, timeout=30,
            what="the job's items on the service's /metrics")
    finally:
        server.stop(0).wait(30)
    # images_total counts the unary call only; the job is counted by the worker's metric.
    assert value(samples, "latentserve_images_total", model="tiny-vae:1", op="sample") == 4
    assert value(samples, "latentserve_queue_up") == 1
    assert value(samples, "latentserve_queue_stream_length", pool="default") == 0


def test_no_input_grows_the_number_of_series(job_store, redis_url, tiny_repo, tiny_pipeline,
                                            queue_config, mnist_images):
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.consumer import create_worker
    from latentserve.worker.metrics import WorkerMetrics

    def flood(n: int) -> Samples:
        """Run n compress jobs, each naming tiny-ae:1 its own way (a version's leading
        zeros are read away), and n jobs of unknown models (their chunks fail), through
        a fresh worker; returns its latentserve_worker_* samples."""
        for k in range(n):
            job_store.submit(JobKind.COMPRESS, "tiny-ae:" + "0" * k + "1",
                             items=mnist_images[k:k + 1])
            job_store.submit(JobKind.SAMPLE, f"nope-{k}", count=1)
        metrics = WorkerMetrics()
        config = WorkerConfig(redis_url=redis_url, models=str(tiny_repo), queue=queue_config,
                              burst=True, claim_idle_s=0.2, block_ms=100, max_deliveries=1,
                              read_count=16, intra_op_threads=1)
        create_worker(config, tiny_pipeline, metrics=metrics).run()
        return {key: v for key, v in parse_registry(metrics.registry).items()
                if key[0].startswith("latentserve_worker_")}

    few, many = flood(2), flood(100)
    assert set(many) == set(few)  # the same series, whatever the input
    models = {dict(labels).get("model") for _, labels in many} - {None}
    assert models == {"tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"}  # the repository's
    assert value(many, "latentserve_worker_items_total", model="tiny-ae:1",
                 op="compress") == 100
    assert value(many, "latentserve_worker_dead_letters_total") == 100


def parse_registry(registry: Any) -> Samples:
    from prometheus_client import generate_latest

    return parse(generate_latest(registry).decode())
