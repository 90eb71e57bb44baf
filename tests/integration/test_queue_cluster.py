"""The job queue on a real Redis Cluster (issue 21): 3 masters + 3 replicas of
redis-server on loopback, the task streams sharded over three slots.

Every command goes through redis-py's ``RedisCluster``, which refuses a multi-key command
or script whose keys span slots, so each test that runs a workload here also proves the
key layout keeps every script in one slot. The last test SIGKILLs the master that holds a
job's shard mid-job: its replica takes over and the job still ends with every result (or
says which chunk to resubmit), never SUCCEEDED with one missing.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from redis.crc import key_slot

from certs import CertificateAuthority
from fixtures_redis import WORKER_DEFAULTS, wait_until
from latentserve.errors import InvalidInput, JobStateError, Unavailable
from latentserve.worker.config import WorkerConfig
from latentserve.worker.jobqueue.cluster import TRANSIENT_ERRORS, is_cluster_url, startup_nodes
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.consumer import create_worker, worker_health
from latentserve.worker.jobqueue.keys import Keys
from latentserve.worker.jobqueue.stats import queue_stats
from latentserve.worker.jobqueue.store import JobKind, JobState, JobStore, OnItemError, connect
from latentserve.worker.runtime.images import encode_png

pytestmark = pytest.mark.cluster

SHARDED = QueueConfig(chunk_size=16, max_queued_chunks=200, max_job_items=5000,
                      result_ttl_s=600, job_ttl_s=3600, stream_shards=3)


def slots(*keys: str) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def run_workers(url: str, tiny_repo: Any, pipeline: Any, n: int = 2, **config: Any) -> list[Any]:
    """``n`` in-process burst workers on ``url`` at once, until the queue is empty."""
    workers = [create_worker(WorkerConfig(redis_url=url, models=str(tiny_repo), queue=SHARDED,
                                          **{**WORKER_DEFAULTS, **config}), pipeline)
               for _ in range(n)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a worker did not finish"
    return [w.stats for w in workers]


def test_a_job_its_stream_and_its_indexes_share_one_slot() -> None:
    for shards in (1, 3, 8):
        keys = Keys(shards=shards)
        seen = set()
        for i in range(64):
            job_id = f"{i * 0x9E3779B1 % (1 << 32):08x}" + "0" * 24
            k = keys.for_job(job_id)
            seen.add(k.shard)
            assert len(slots(k.job(job_id), k.job_inputs(job_id), k.job_results(job_id),
                             k.job_tasks(job_id), k.job_progress(job_id), k.stream("default"),
                             k.stream("gpu"), k.jobs, k.jobs_expiry, k.jobs_receiving,
                             k.dead_letter, k.worker("w1"))) == 1
        assert seen == set(range(shards))
        # Shard k's slot is in the k-th of `shards` equal ranges: distinct masters on an
        # evenly split cluster.
        for k in keys.all_shards():
            [slot] = slots(k.stream("default"))
            assert k.shard == slot * shards // 16384


def test_shards_sit_on_distinct_masters(redis_cluster) -> None:
    keys = Keys(shards=3)
    masters = {redis_cluster.master_of(k.stream("default")) for k in keys.all_shards()}
    assert len(masters) == 3 and masters == set(redis_cluster.primaries())


def test_the_cluster_url(redis_cluster, private_redis) -> None:
    assert is_cluster_url("redis://h:1/0?cluster=true") and is_cluster_url("rediss://h/?cluster=1")
    assert not is_cluster_url("redis://h:1/0") and not is_cluster_url("redis://h/0?cluster=no")
    for url, why in [("redis://h/0?cluster=maybe", "must be true or false"),
                     ("redis://h/2?cluster=true", "only database 0"),
                     ("unix:///tmp/r.sock?cluster=true", "not a Unix socket")]:
        with pytest.raises(InvalidInput, match=why):
            WorkerConfig(redis_url=url)
    for url, why in [("redis://h/0?cluster=true&nodes=h2", "not HOST:PORT"),
                     ("redis://h/0?cluster=true&nodes=h2:1,:5", "not HOST:PORT"),
                     ("redis://h/0?cluster=true&nodes=h2:70000", "not HOST:PORT"),
                     ("redis://h/0?nodes=h2:1", "add cluster=true")]:
        with pytest.raises(InvalidInput, match=why):
            WorkerConfig(redis_url=url)
    assert startup_nodes("redis://h/0?cluster=true&nodes=a:1,[::1]:2") == [("a", 1), ("::1", 2)]
    with pytest.raises(Unavailable, match="refused the credentials"):
        connect(redis_cluster.url.replace(redis_cluster.password, "wrong"))
    with pytest.raises(Unavailable, match="[Cc]luster mode is not enabled"):
        connect(private_redis.url + "?cluster=true")


def open_sockets() -> int:
    """This process's open sockets (Linux: /proc)."""
    fds = Path("/proc/self/fd")
    return sum(os.readlink(fds / fd).startswith("socket:") for fd in os.listdir(fds)
               if (fds / fd).exists())


def collect_garbage() -> None:
    """Close what earlier tests left unreachable now, not while a test counts sockets (their
    ResourceWarnings are pytest's to report, not this test's failure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_closing_a_cluster_client_closes_every_nodes_sockets(redis_cluster) -> None:
    """redis-py's RedisCluster.close() left the node pools of a from_url client open (their
    sockets waited for GC: a ResourceWarning at a random later moment)."""
    collect_garbage()
    before = open_sockets()
    client = connect(redis_cluster.url)
    client.ping(target_nodes=client.ALL_NODES)  # a connection to every node
    assert open_sockets() >= before + len(client.get_nodes())
    client.close()
    assert open_sockets() <= before


def test_a_refused_cluster_connection_leaves_no_socket_open(private_redis) -> None:
    """A node that answers but is not in cluster mode: the failed client's pools close."""
    collect_garbage()
    before = open_sockets()
    with pytest.raises(Unavailable, match="[Cc]luster mode is not enabled"):
        connect(private_redis.url + "?cluster=true")
    assert open_sockets() <= before


def test_nodes_are_first_contacts_when_the_urls_node_is_down(redis_cluster) -> None:
    """A process can start while the URL's own node is down, from a node in nodes=."""
    with socket.socket() as s:  # a loopback port where no node listens
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    auth = f":{redis_cluster.password}@" if redis_cluster.password else ""
    url = f"redis://{auth}127.0.0.1:{dead}/0?cluster=true"
    with pytest.raises(Unavailable):
        connect(url, check=False)
    live = ",".join(f"127.0.0.1:{p}" for p in redis_cluster.ports[:2])
    client = connect(f"{url}&nodes={live}")
    try:
        assert client.ping() and len(client.get_primaries()) == redis_cluster.masters
    finally:
        client.close()


def test_a_tls_cluster_runs_jobs_and_refuses_a_client_without_a_certificate(
        tls_cluster, connected, tiny_repo, tiny_pipeline, mnist_images) -> None:
    """rediss:// with cluster=true: every node the client discovers is reached over TLS
    with the URL's CA and client certificate (redis-py carries them to each node)."""
    cluster, ca = tls_cluster
    url = cluster.url
    store = JobStore(connected(url), SHARDED)
    images = mnist_images[:40]
    jobs = [store.submit(JobKind.COMPRESS, "tiny-ae", items=images)]
    while len({store.keys.shard_of(j.id) for j in jobs}) < 3:  # every node holds a job
        assert len(jobs) < 100
        jobs.append(store.submit(JobKind.COMPRESS, "tiny-ae", items=images[:5]))
    run_workers(url, tiny_repo, tiny_pipeline, n=1)
    want = tiny_pipeline.compress("tiny-ae", images)
    for job in jobs:
        assert store.get(job.id).state is JobState.SUCCEEDED
        assert [r for _, r in store.iter_results(job.id)] == want[:job.items_total]
    no_cert = url.split("&ssl_certfile=")[0]
    with pytest.raises(Unavailable, match="(?i)certificate|TLS|SSL"):
        connect(no_cert, check=False)
    other = CertificateAuthority(ca.folder / "other", "other-ca")
    with pytest.raises(Unavailable, match="(?i)certificate|TLS|SSL"):
        connect(url.replace(quote(str(ca.pem)), quote(str(other.pem))), check=False)


def test_jobs_spread_over_the_shards_and_match_the_pipeline(
        cluster_url, connected, tiny_repo, tiny_pipeline, mnist_images) -> None:
    store = JobStore(connected(cluster_url), SHARDED)
    images = mnist_images[:50]
    codes = tiny_pipeline.compress("tiny-vae", images[:20])
    jobs = {"compress": store.submit(JobKind.COMPRESS, "tiny-ae", items=images),
            "reconstruct": store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=codes,
                                        chunk_size=8),
            "sample7": store.submit(JobKind.SAMPLE, "tiny-vqvae", count=30, seed=3,
                                    chunk_size=7),
            "sample16": store.submit(JobKind.SAMPLE, "tiny-vqvae", count=30, seed=3)}
    extra = []  # small jobs until every shard holds one (ids are random)
    while len({store.keys.shard_of(j.id) for j in [*jobs.values(), *extra]}) < 3:
        assert len(extra) < 100
        extra.append(store.submit(JobKind.SAMPLE, "tiny-ae", count=2, seed=len(extra)))
    assert store.depth("default") == sum(j.chunks_total for j in [*jobs.values(), *extra])
    stats = run_workers(cluster_url, tiny_repo, tiny_pipeline, n=2)
    assert sum(s.chunks for s in stats) == sum(j.chunks_total for j in [*jobs.values(), *extra])
    for job in [*jobs.values(), *extra]:
        info = store.get(job.id)
        assert info.state is JobState.SUCCEEDED, info.error
        k = store.keys.for_job(job.id)
        assert 0 < store.r.pttl(k.job(job.id)) <= 600_000  # the result TTL
    results = {name: [r for _, r in store.iter_results(j.id)] for name, j in jobs.items()}
    assert results["compress"] == tiny_pipeline.compress("tiny-ae", images)
    assert results["reconstruct"] == [encode_png(im) for im in tiny_pipeline.reconstruct(codes)]
    assert results["sample7"] == results["sample16"] == \
        [encode_png(im) for im in tiny_pipeline.sample("tiny-vqvae", 30, seed=3)]
    # Exactly once: a late duplicate of a stored chunk changes nothing.
    job = jobs["compress"]
    again = store.store_chunk("default", job.id, 0, 16, b"other", "0-1")
    assert again is False and store.get(job.id).items_done == 50
    assert store.chunk_results(job.id, 0) != b"other"
    listed = [j.id for j in store.list(limit=1000)]
    assert set(listed) == {j.id for j in [*jobs.values(), *extra]}
    assert [store.get(i).created for i in listed] == \
        sorted((store.get(i).created for i in listed), reverse=True)
    [pool] = queue_stats(store.r, store.keys, ["default"]).pools
    assert (pool.length, pool.pending, pool.lag) == (0, 0, 0) and store.depth("default") == 0


def test_reclaim_dead_letter_and_cancel_on_the_cluster(cluster_url, connected, tiny_repo,
                                                       tiny_pipeline, mnist_images) -> None:
    store = JobStore(connected(cluster_url), SHARDED)
    store.ensure_group("default")
    # A consumer takes a chunk and dies (no health key): a worker reclaims it at once.
    taken = store.submit(JobKind.SAMPLE, "tiny-ae", count=10, seed=1)
    stream = store.keys.for_job(taken.id).stream("default")
    store.r.xreadgroup(store.keys.group, "doomed", {stream: ">"}, count=1)
    assert store.r.xpending(stream, store.keys.group)["pending"] == 1
    # A chunk that fails for good: dead-lettered, its job failed, other jobs unharmed.
    bad = store.submit(JobKind.RECONSTRUCT, "tiny-vae", items=[b"not a code"],
                       on_item_error=OnItemError.FAIL_FAST)
    # A cancelled job: its queued chunks leave its shard's stream at once.
    cancelled = store.submit(JobKind.COMPRESS, "tiny-ae", items=mnist_images[:40])
    before = store.r.xlen(store.keys.for_job(cancelled.id).stream("default"))
    store.cancel(cancelled.id)
    assert store.r.xlen(store.keys.for_job(cancelled.id).stream("default")) == before - 3
    with pytest.raises(JobStateError, match="cancelled"):
        list(store.iter_results(cancelled.id))
    stats = run_workers(cluster_url, tiny_repo, tiny_pipeline, n=1)
    assert stats[0].retried == 1 and stats[0].dead_lettered == 1
    assert store.get(taken.id).state is JobState.SUCCEEDED
    assert [r for _, r in store.iter_results(taken.id)] == \
        [encode_png(im) for im in tiny_pipeline.sample("tiny-ae", 10, seed=1)]
    info = store.get(bad.id)
    assert info.state is JobState.FAILED and "dead-lettered" in info.error
    [dead] = store.dead_letters()
    assert (dead["job"], dead["chunk"], dead["pool"]) == (bad.id, "0", "default")
    assert queue_stats(store.r, store.keys, ["default"]).dead_letter_length == 1
    assert store.get(cancelled.id).state is JobState.CANCELLED


def retrying(fn: Any) -> Any:
    """``fn()``, again while the cluster is failing over (its errors are transient)."""
    def call() -> Any:
        try:
            return fn() or True
        except TRANSIENT_ERRORS:
            return None
    return wait_until(call, timeout=60, interval=0.2, what="the cluster to answer")


@pytest.mark.slow
def test_a_master_killed_mid_job_its_replica_takes_over(
        private_cluster, connected, spawn_worker, make_gate, tiny_pipeline) -> None:
    queue = QueueConfig(chunk_size=10, stream_shards=3)
    store = JobStore(connected(private_cluster.url), queue)
    job = store.submit(JobKind.SAMPLE, "tiny-vae", count=80, seed=4)
    gate = make_gate("failover")  # on the session's own Redis, not the cluster
    gate.allow(3)  # three chunks (one a call), then both workers wait mid-job
    workers = [spawn_worker("--stream-shards", "3", "--read-count", "1", "--batch-items", "10",
                            "--max-deliveries", "10", redis=private_cluster.url,
                            gate="failover") for _ in range(2)]
    # Both workers connected first: the URL names one node (no nodes=), which may be the
    # master this test kills, and a client cannot start from a dead first contact alone.
    health = WorkerConfig(redis_url=private_cluster.url, queue=queue)
    wait_until(lambda: sum(bool(w.get("ready")) for w in worker_health(store.r, health)) == 2,
               timeout=90, what="both workers connected and ready")
    wait_until(lambda: gate.passed() == 3 and gate.waiting()
               and store.get(job.id).chunks_done == 3, timeout=90,
               what="three chunks stored and a worker waiting mid-job")
    master = private_cluster.master_of(store.keys.for_job(job.id).stream("default"))
    private_cluster.kill(master)
    private_cluster.wait_master_changed(store.keys.for_job(job.id).stream("default"), master)
    gate.open()
    wait_until(lambda: retrying(lambda: store.get(job.id)).state.terminal, timeout=120,
               interval=0.2, what="the job to end after the failover")
    info = retrying(lambda: store.get(job.id))
    stored = [retrying(lambda c=c: store.chunk_results(job.id, c) or b"") for c in range(8)]
    if info.state is JobState.SUCCEEDED:
        assert all(stored), "SUCCEEDED with a missing result"
        want = [encode_png(im) for im in tiny_pipeline.sample("tiny-vae", 80, seed=4)]
        assert [r for _, r in store.iter_results(job.id)] == want
    else:  # the other allowed end: failed, naming what to resubmit
        assert info.state is JobState.FAILED and ("chunk" in info.error or
                                                  "resubmit" in info.error), info.error
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
        out = proc.finish(timeout=60)
        assert proc.returncode == 0, out
