"""``JobSettings``: where the server's job queue is and how the server runs it.

Part of ``ServiceConfig`` (its ``jobs`` field), so ``create_server(config)`` serves the
job API whenever a queue is configured, and every setting is a ``serve`` flag and a
``LATENTSERVE_*`` variable (``latentserve.settings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latentserve.errors import InvalidInput
from latentserve.service.jobs.stream_slots import StreamSlots, default_stream_limit
from latentserve.settings import Settings, check_range, setting
from latentserve.worker.config import REDIS_URL_HELP
from latentserve.worker.jobqueue.config import QueueConfig

EMBEDDED = "embedded"  # redis_url: start a Valkey in this process
OFF = "none"           # redis_url: no job API


@dataclass(frozen=True)
class JobSettings(Settings):
    """The job API of one server: its Redis, its queue settings and stream limits."""

    redis_url: str = setting(EMBEDDED, flag="--redis", fallback_env=("REDIS_URL",),
                             metavar="URL", help=(
        f"job queue: {REDIS_URL_HELP}; '{EMBEDDED}' starts a Valkey in this process with "
        f"its data under --state-dir; '{OFF}' serves no job API"))
    state_dir: Path = setting(Path(".state"), metavar="DIR", help=(
        "the embedded Valkey's data (AOF) folder"))
    queue: QueueConfig = setting(default_factory=QueueConfig, help="the queue's settings")
    embedded_worker: Literal["auto", "yes", "no"] = setting("auto", help=(
        "run a job worker in the server process; auto: only with the embedded Valkey"))
    max_job_streams: int = setting(0, help=(
        "WatchJob + FetchResults streams open at once; each holds a handler thread while "
        "it waits, so beyond N they get RESOURCE_EXHAUSTED and the other threads keep "
        "serving; 0 = --grpc-threads less a reserve of a quarter of them, at least 2"))
    max_job_streams_per_caller: int = setting(0, help=(
        "of those, streams one identity (token or certificate name; all anonymous callers "
        "count as one) may hold; 0 = no tighter limit"))

    def __post_init__(self) -> None:
        if not self.redis_url:
            object.__setattr__(self, "redis_url", EMBEDDED)
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.embedded_worker not in ("auto", "yes", "no"):
            raise InvalidInput(f"embedded worker {self.embedded_worker!r} must be auto, yes "
                               "or no")
        for name in ("max_job_streams", "max_job_streams_per_caller"):
            check_range(name, getattr(self, name), 0)

    @classmethod
    def off(cls) -> JobSettings:
        """No job API (a server for inference only)."""
        return cls(redis_url=OFF)

    @property
    def enabled(self) -> bool:
        return self.redis_url.lower() != OFF

    @property
    def embedded(self) -> bool:
        """Whether the server starts its own Valkey."""
        return self.redis_url.lower() == EMBEDDED

    def stream_slots(self, grpc_threads: int) -> StreamSlots:
        """The admission of waiting job streams for a server of ``grpc_threads``."""
        return StreamSlots(self.max_job_streams or default_stream_limit(grpc_threads),
                           self.max_job_streams_per_caller)
