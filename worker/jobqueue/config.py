"""``QueueConfig``: what both sides of the job queue agree on.

Key prefix, chunking, limits, TTLs and which pool serves which model. The service embeds
it (``JobSettings.queue``) and so does every worker (``WorkerConfig.queue``); its fields
are flags and ``LATENTSERVE_*`` variables of both (``latentserve.settings``).
"""

from __future__ import annotations

from dataclasses import dataclass

from latentserve.errors import InvalidInput
from latentserve.settings import Settings, check_range, setting
from latentserve.worker.jobqueue.keys import DEFAULT_POOL, DEFAULT_PREFIX, Keys, check_pool


def parse_routes(text: str) -> tuple[tuple[str, str], ...]:
    """``"model=pool,model2=pool2"`` -> ((model, pool), ...); the model is a name, no version."""
    routes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, sep, pool = part.partition("=")
        if not sep or not model.strip():
            raise InvalidInput(f"pool route {part!r} must look like MODEL=POOL")
        routes.append((model.strip(), check_pool(pool.strip())))
    return tuple(routes)


@dataclass(frozen=True)
class QueueConfig(Settings):
    """Queue settings shared by the job service and the workers."""

    prefix: str = setting(DEFAULT_PREFIX, help="Redis key prefix of every queue key")
    chunk_size: int = setting(256, help="items per chunk task, unless a job asks for another",
                              aliases=("--job-chunk-size",))
    max_queued_chunks: int = setting(10_000, help=(
        "queued chunks per pool stream before SubmitJob is refused"))
    max_job_items: int = setting(1_000_000, help="most items (images, codes, samples) in one job")
    max_chunk_bytes: int = setting(64 << 20, help="largest packed inputs of one chunk (bytes)")
    job_ttl_s: float = setting(7 * 86400, help="keys of an unfinished job expire after this (s)")
    result_ttl_s: float = setting(86400, help=(
        "how long a finished job and its results are kept (seconds)"))
    # A client or server that died mid-upload, or a Redis that lost the seal, leaves a job
    # receiving forever otherwise.
    receiving_timeout_s: float = setting(300.0, help=(
        "fail a job whose SubmitJob upload sends nothing for this long before its end, "
        "dropping its chunks (seconds)"))
    dead_letter_maxlen: int = setting(10_000, help="entries kept in a pool's dead-letter stream")
    pool_routes: tuple[tuple[str, str], ...] = setting((), parse=parse_routes, help=(
        "which pool's stream carries each model's jobs, as MODEL=POOL,MODEL2=POOL2; other "
        "models go to the default pool"), metavar="MODEL=POOL,...")
    # A Redis Cluster spreads the queue over that many masters (jobqueue/keys.py). Every
    # process of a deployment must agree on it, like the prefix; changing it needs a
    # drained queue.
    stream_shards: int = setting(1, help=(
        "hash slots (streams) each pool's queue and the job keys are split over; the same "
        "on every process of a deployment"))

    def __post_init__(self) -> None:
        Keys(self.prefix, self.stream_shards)  # validates the prefix and the shard count
        for name in ("chunk_size", "max_queued_chunks", "max_job_items", "max_chunk_bytes",
                     "dead_letter_maxlen"):
            check_range(name, getattr(self, name), 1)
        for name in ("job_ttl_s", "result_ttl_s", "receiving_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for _, pool in self.pool_routes:
            check_pool(pool)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix, self.stream_shards)

    def pool_for(self, model_ref: str) -> str:
        """The pool whose stream carries jobs for ``model_ref`` (``name[:version]``)."""
        name = model_ref.partition(":")[0]
        for model, pool in self.pool_routes:
            if model == name:
                return pool
        return DEFAULT_POOL
