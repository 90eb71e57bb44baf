"""JobStore against a real Redis: idempotent results, progress, limits, cancel, TTLs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from latentserve.errors import InvalidInput, JobNotFound, JobStateError, ResourceLimit
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.packing import pack_failures, unpack_failures
from latentserve.worker.jobqueue.store import (
    ItemFailure,
    JobKind,
    JobState,
    JobStore,
    pack_images,
    pack_items,
    unpack,
)

pytestmark = pytest.mark.queue


def read_one(client: redis.Redis, store: JobStore, pool: str = "default"):
    """XREADGROUP one entry as a worker would: (entry id, fields)."""
    reply = client.xreadgroup(store.keys.group, "t", {store.keys.stream(pool): ">"}, count=1)
    (_, [(eid, fields)]) = reply[0]
    return eid.decode(), {k.decode(): v.decode() for k, v in fields.items()}


def test_a_duplicate_store_changes_nothing(job_store, redis_client):
    job = job_store.submit(JobKind.SAMPLE, "m", count=20, chunk_size=16)
    eid, fields = read_one(redis_client, job_store)
    assert (fields["job"], fields["chunk"], fields["n"]) == (job.id, "0", "16")
    task = job_store.begin_chunk("default", job.id, 0, eid)
    assert task.kind is JobKind.SAMPLE and task.chunk_size == 16
    assert job_store.get(job.id).state is JobState.RUNNING
    first = pack_items([b"a"] * 16)
    assert job_store.store_chunk("default", job.id, 0, 16, first, eid) is True
    # A second delivery of the same chunk (another worker, a retry) stores nothing.
    assert job_store.store_chunk("default", job.id, 0, 16, pack_items([b"b"] * 16), eid) is False
    info = job_store.get(job.id)
    assert (info.items_done, info.chunks_done, info.state) == (16, 1, JobState.RUNNING)
    assert job_store.chunk_results(job.id, 0) == first
    assert job_store.depth("default") == 1  # the acked entry was deleted


def test_item_failures_are_stored_once_and_read_in_their_slots(job_store, redis_client):
    job = job_store.submit(JobKind.RECONSTRUCT, "m", items=[b"a", b"b", b"c"], chunk_size=3)
    eid, _ = read_one(redis_client, job_store)
    job_store.begin_chunk("default", job.id, 0, eid)
    why = ItemFailure("CorruptCode", "checksum mismatch")
    value = pack_failures(pack_items([b"1", b"", b"3"]), {1: why})
    assert job_store.store_chunk("default", job.id, 0, 3, value, eid, failed=1) is True
    assert job_store.store_chunk("default", job.id, 0, 3, value, eid, failed=1) is False
    info = job_store.get(job.id)
    assert (info.state, info.items_done, info.items_failed) == (JobState.SUCCEEDED, 3, 1)
    assert [r for _, r in job_store.iter_results(job.id)] == [b"1", why, b"3"]
    [part] = job_store.iter_chunk_results(job.id, start=1)
    assert (part.start, part.items, part.failures) == (1, [b"", b"3"], {1: why})


def test_a_hash_from_before_the_rename_still_seals(job_store, redis_client):
    job = job_store.create(JobKind.RECONSTRUCT, "m", chunk_size=2)
    job_store.enqueue(job, [(0, 2, pack_items([b"x", b"y"]))])
    key = job_store.keys.job(job.id)  # as an older release wrote it
    redis_client.hset(key, "chunks_queued", redis_client.hget(key, "chunks_submitted"))
    redis_client.hdel(key, "chunks_submitted")
    assert job_store.get(job.id).chunks_submitted == 1
    job_store.enqueue(job, [(1, 1, pack_items([b"z"]))])
    assert job_store.seal(job, 3, 2).chunks_total == 2
    other = job_store.create(JobKind.RECONSTRUCT, "m", chunk_size=2)
    job_store.enqueue(other, [(0, 2, pack_items([b"x", b"y"])), (1, 1, pack_items([b"z"]))])
    with pytest.raises(InvalidInput, match="sealed with 3 chunks but 2 were submitted"):
        job_store.seal(other, 3, 3)


def test_the_job_succeeds_only_when_the_last_chunk_is_stored(job_store, redis_client):
    job = job_store.create(JobKind.RECONSTRUCT, "m", chunk_size=2)
    job_store.enqueue(job, [(0, 2, pack_items([b"x", b"y"]))])
    eid, _ = read_one(redis_client, job_store)
    job_store.begin_chunk("default", job.id, 0, eid)
    job_store.store_chunk("default", job.id, 0, 2, pack_items([b"1", b"2"]), eid)
    # Every queued chunk is done, but more inputs may come: not finished yet.
    assert job_store.get(job.id).state is JobState.RECEIVING
    job_store.enqueue(job, [(1, 1, pack_items([b"z"]))])
    sealed = job_store.seal(job, 3, 2)
    assert sealed.state is JobState.RUNNING and sealed.fraction == pytest.approx(2 / 3)
    eid, _ = read_one(redis_client, job_store)
    job_store.store_chunk("default", job.id, 1, 1, pack_items([b"3"]), eid)
    done = job_store.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.fraction == 1.0 and done.finished > 0
    assert [r for _, r in job_store.iter_results(job.id)] == [b"1", b"2", b"3"]
    # Inputs of stored chunks are dropped at once; the task list went with the job.
    assert redis_client.hlen(job_store.keys.job_inputs(job.id)) == 0
    assert not redis_client.exists(job_store.keys.job_tasks(job.id))


def test_back_pressure_names_the_depth(redis_client):
    store = JobStore(redis_client, QueueConfig(chunk_size=10, max_queued_chunks=5,
                                               max_job_items=100))
    store.submit(JobKind.SAMPLE, "m", count=30)
    with pytest.raises(ResourceLimit, match=r"holds 3 chunks; adding 3 would pass the limit of 5"):
        store.submit(JobKind.SAMPLE, "m", count=30)
    assert [j.items_total for j in store.list()] == [30]  # the refused job left nothing
    with pytest.raises(ResourceLimit, match="101 items is over the limit of 100"):
        store.submit(JobKind.SAMPLE, "m", count=101)
    with pytest.raises(InvalidInput, match="at least one item"):
        store.submit(JobKind.SAMPLE, "m", count=0)


def test_cancel_of_a_queued_job_empties_its_queue(job_store, redis_client):
    job = job_store.submit(JobKind.COMPRESS, "m", chunk_size=4,
                           items=np.zeros((10, 1, 4, 4), np.uint8))
    other = job_store.submit(JobKind.SAMPLE, "m", count=4, chunk_size=4)
    assert job_store.depth("default") == 4
    info = job_store.cancel(job.id)
    assert info.state is JobState.CANCELLED and info.finished > 0
    assert job_store.depth("default") == 1  # only the other job's chunk is left
    assert not redis_client.exists(job_store.keys.job_inputs(job.id))
    with pytest.raises(JobStateError, match="already cancelled"):
        job_store.cancel(job.id)
    with pytest.raises(JobStateError, match="cancelled"):
        list(job_store.iter_results(job.id))
    eid, fields = read_one(redis_client, job_store)
    assert fields["job"] == other.id


def test_a_failure_reason_is_kept_short_whatever_was_raised(job_store):
    job = job_store.submit(JobKind.SAMPLE, "m", count=4, chunk_size=4)
    info = job_store.fail(job.id, "worker said: " + "x" * 100_000)
    assert info.state is JobState.FAILED
    assert info.error.startswith("worker said: x") and len(info.error) == 2000


def test_a_chunk_of_a_cancelled_job_is_skipped(job_store, redis_client):
    job = job_store.submit(JobKind.SAMPLE, "m", count=8, chunk_size=4)
    eid, _ = read_one(redis_client, job_store)   # a worker holds chunk 0 ...
    job_store.cancel(job.id)                     # ... when the job is cancelled
    assert job_store.begin_chunk("default", job.id, 0, eid) == "cancelled"
    assert job_store.store_chunk("default", job.id, 0, 4, pack_items([b""] * 4), eid) is False
    assert job_store.get(job.id).items_done == 0
    pending = redis_client.xpending(job_store.keys.stream("default"), job_store.keys.group)
    assert pending["pending"] == 0


def test_unknown_and_malformed_job_ids(job_store):
    with pytest.raises(JobNotFound, match="no job 0{32}"):
        job_store.get("0" * 32)
    with pytest.raises(InvalidInput, match="'nope' is not a job id"):
        job_store.get("nope")


def test_release_keeps_the_delivery_count_and_extend_keeps_only_own_claims(
        job_store, redis_client):
    job = job_store.submit(JobKind.SAMPLE, "m", count=4, chunk_size=4)
    eid, _ = read_one(redis_client, job_store)
    assert job_store.extend("default", "t", [eid]) == {eid: "kept"}
    assert job_store.extend("default", "someone-else", [eid]) == {eid: "stolen"}
    assert job_store.release("default", "someone-else", eid, job.id, 0, 4, 1) is False
    assert job_store.release("default", "t", eid, job.id, 0, 4, 2) is True
    new_id, fields = read_one(redis_client, job_store)
    assert new_id != eid and fields["prior"] == "2" and job_store.depth("default") == 1


def test_list_and_watch(job_store, redis_client):
    a = job_store.submit(JobKind.SAMPLE, "m", count=4, chunk_size=4)
    b = job_store.submit(JobKind.SAMPLE, "m", count=4, chunk_size=4)
    assert [j.id for j in job_store.list()] == [b.id, a.id]
    job_store.cancel(a.id)
    assert [j.id for j in job_store.list(states=[JobState.CANCELLED])] == [a.id]
    assert [s.state for s in job_store.watch(a.id)] == [JobState.CANCELLED]


@pytest.mark.slow
def test_expired_jobs_leave_redis_at_its_baseline(redis_client, make_worker):
    """A scaled-down 10,000-job run: 300 jobs, a 1 s result TTL, then back to baseline."""
    config = QueueConfig(chunk_size=4, result_ttl_s=1.0, max_queued_chunks=1000)
    store = JobStore(redis_client, config)
    node = server_of(redis_client, store.keys.jobs)
    store.submit(JobKind.SAMPLE, "tiny-ae", count=2)   # warm-up: stream, group, scripts
    make_worker(queue=config).run()
    wait_for_expiry(node, store)
    base_keys = node.dbsize()
    base = sorted(node.keys())
    base_mem = node.info("memory")["used_memory"]
    jobs = [store.submit(JobKind.SAMPLE, "tiny-ae", count=3, seed=i) for i in range(300)]
    assert node.dbsize() > base_keys + 300
    stats = make_worker(queue=config, read_count=16).run()
    assert stats.chunks == 300
    assert all(store.get(j.id).state is JobState.SUCCEEDED for j in jobs[-5:])
    wait_for_expiry(node, store)
    assert sorted(node.keys()) == base
    grown = node.info("memory")["used_memory"] - base_mem
    assert grown < 64 * 1024, f"used_memory grew by {grown} bytes after every job expired"


def server_of(client: redis.Redis, key: str) -> redis.Redis:
    """The server holding ``key``: ``client``'s, or on a Redis Cluster the master serving
    its slot, where every key of its shard lives (KEYS, DBSIZE, INFO are per server)."""
    from latentserve.worker.jobqueue.cluster import is_cluster

    return client.get_node_from_key(key).redis_connection if is_cluster(client) else client


def wait_for_expiry(client: redis.Redis, store: JobStore, timeout: float = 20.0) -> None:
    """Wait until Redis has deleted every job key (expired keys still count in DBSIZE and
    memory until its expiry cycle reclaims them), then sweep the job indexes."""
    end = time.monotonic() + timeout
    while client.keys(store.keys.job("*")) or client.dbsize() != len(client.keys()):
        assert time.monotonic() < end, "job keys outlived their TTL"
        time.sleep(0.05)
    store.sweep()
    assert not client.exists(store.keys.jobs, store.keys.jobs_expiry)


def test_worker_config_from_flags_over_env():
    from latentserve.worker.config import WorkerConfig

    env = {"REDIS_URL": "redis://queue:6379/0", "LATENTSERVE_CHUNK_SIZE": "64",
           "LATENTSERVE_POOLS": "gpu,default", "LATENTSERVE_POOL_ROUTES": "mnist-vqvae=gpu",
           "LATENTSERVE_CLAIM_IDLE_S": "8", "LATENTSERVE_BURST": "yes",
           "LATENTSERVE_MODELS": "/models"}
    cfg = WorkerConfig.from_env(env, chunk_size=32)
    assert (cfg.redis_url, cfg.queue.chunk_size, cfg.pools, cfg.models) == \
        ("redis://queue:6379/0", 32, ("gpu", "default"), "/models")
    assert cfg.claim_idle_s == 8 and cfg.heartbeat_s == 2 and cfg.burst and cfg.grace_s == 30
    assert cfg.queue.pool_for("mnist-vqvae:2") == "gpu" and cfg.queue.pool_for("x") == "default"
    assert cfg.keys.stream("gpu") == "latentserve:{0}:stream:gpu"  # {0}: one hash slot
    with pytest.raises(InvalidInput,
                       match="LATENTSERVE_CHUNK_SIZE='many': chunk_size must be an integer"):
        WorkerConfig.from_env({**env, "LATENTSERVE_CHUNK_SIZE": "many"})
    with pytest.raises(InvalidInput, match="needs a Redis URL"):
        WorkerConfig.from_env({})
    with pytest.raises(InvalidInput, match=r"heartbeat_s \(9.0\) must be shorter"):
        WorkerConfig.from_env(env, heartbeat_s=9.0)
    with pytest.raises(InvalidInput, match="pool name 'a b'"):
        WorkerConfig.from_env(env, pools=("a b",))
    with pytest.raises(InvalidInput, match="must start with redis://"):
        WorkerConfig(redis_url="http://x")


def test_packing_round_trips_and_refuses_damage():
    items = [b"", b"abc", bytes(range(256))]
    assert unpack(pack_items(items)) == items
    images = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    assert np.array_equal(unpack(pack_images(images)), images)
    with pytest.raises(InvalidInput, match="damaged"):
        unpack(pack_items(items)[:-1])
    with pytest.raises(InvalidInput, match="starts with b'Z'"):
        unpack(b"Z123")
    failed = {1: ItemFailure("CorruptCode", "bad bytes \u2014 truncated")}
    packed = pack_failures(pack_images(images), failed)
    got, failures = unpack_failures(packed)
    assert np.array_equal(got, images) and failures == failed
    assert np.array_equal(unpack(packed), images)  # the items alone, placeholders and all
    assert pack_failures(pack_items(items), {}) == pack_items(items)
    with pytest.raises(InvalidInput, match="item failures do not parse"):
        unpack_failures(packed[:9] + b"{" + packed[10:])
