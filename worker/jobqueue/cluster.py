"""Redis Cluster as the job queue's Redis: the client and its transient errors.

A URL with ``cluster=true`` in its query (``redis://:PASSWORD@HOST:PORT/0?cluster=true``,
``rediss://...&cluster=true`` for TLS) makes ``store.connect`` build redis-py's
``RedisCluster`` instead of ``Redis``: the node in the URL is only the first contact, the
client learns the others and the slot map from it, and follows MOVED / ASK and failovers
itself. ``nodes=HOST:PORT,HOST:PORT`` names more first contacts, tried when the URL's own
node does not answer, so a process can start while one node is down. Password, ACL user
and TLS parameters mean what they mean for a single Redis and apply to every node. The
key layout (worker/jobqueue/keys.py) keeps every script and transaction in one hash slot,
so nothing else in latentserve knows which kind of client it holds, except where a
command cannot be pipelined on a cluster (``is_cluster``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from latentserve.errors import InvalidInput, Unavailable
from latentserve.worker.jobqueue.redis_url import CLUSTER_PARAM, NODES_PARAM

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# What a command can meet while the cluster fails over or reshards: worth a retry, like a
# dropped connection to a single Redis. (SlotNotCoveredError is not a RedisError.)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError,
    SlotNotCoveredError)


def is_cluster_url(url: str) -> bool:
    """True if ``url`` asks for the cluster client (``?cluster=true``); InvalidInput on a
    value that is not a yes or a no, or a cluster over a Unix socket or a database > 0."""
    params = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    value = params.get(CLUSTER_PARAM)
    if value is None or value.lower() in _FALSE:
        return False
    if value.lower() not in _TRUE:
        raise InvalidInput(f"Redis URL query parameter cluster={value!r} must be true or false")
    parts = urlsplit(url)
    if parts.scheme == "unix":
        raise InvalidInput("a Redis Cluster is reached over TCP (redis:// or rediss://), not "
                           "a Unix socket")
    if parts.path.strip("/") not in ("", "0") or params.get("db", "0") != "0":
        raise InvalidInput("a Redis Cluster has only database 0: end the URL with /0")
    startup_nodes(url)  # refuses a malformed nodes= list now, not at the first connect
    return True


def startup_nodes(url: str) -> list[tuple[str, int]]:
    """The ``nodes=`` first contacts of a cluster URL as (host, port); InvalidInput names
    an entry that is not HOST:PORT."""
    value = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True)).get(NODES_PARAM)
    if value is None:
        return []
    nodes: list[tuple[str, int]] = []
    for entry in value.split(","):
        host, sep, port = entry.strip().rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInput(f"Redis URL nodes= entry {entry!r} is not HOST:PORT "
                               "(several: nodes=HOST:PORT,HOST:PORT)")
        nodes.append((host, int(port)))
    return nodes


def without_cluster_param(url: str) -> str:
    """``url`` less its ``cluster`` and ``nodes`` parameters, which redis-py does not know."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in (CLUSTER_PARAM, NODES_PARAM)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def is_cluster(client: object) -> bool:
    """True for a ``RedisCluster`` client (some commands cannot be pipelined on one)."""
    return isinstance(client, RedisCluster)


class ClusterClient(RedisCluster):
    """``RedisCluster`` whose ``close()`` closes every node's sockets.

    redis-py (8.1) gives each node of a client made by ``from_url`` a ``Redis`` over a
    pool of its own, passed in, which ``Redis.close()`` leaves open: the sockets stay open
    until GC finds them (a ResourceWarning each, and a file descriptor held meanwhile).
    So every node client this one makes, now or after a failover, is kept to be closed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        manager = self.nodes_manager
        self._node_clients = [node.redis_connection for node in
                              [*manager.nodes_cache.values(), *manager.startup_nodes.values()]
                              if node.redis_connection is not None]
        make = manager.create_redis_node

        def tracked(host: str, port: int, **options: Any) -> redis.Redis:
            client = cast(redis.Redis, make(host, port, **options))  # type: ignore[no-untyped-call]
            self._node_clients.append(client)
            return client

        manager.create_redis_node = tracked  # type: ignore[method-assign]

    def close(self) -> None:
        super().close()
        disconnect(self._node_clients)


def disconnect(clients: list[redis.Redis]) -> None:
    """Close the sockets of these node clients' pools (one pool may serve several node
    entries: disconnect() twice is harmless)."""
    for client in clients:
        client.connection_pool.disconnect()


def connect_cluster(url: str, *, check: bool = True, wait_s: float = 30.0) -> RedisCluster:
    """A ``RedisCluster`` client for a ``?cluster=true`` URL (already checked).

    The client reads the slot map when built, so the cluster must answer: refused
    credentials, a failed TLS handshake or a node not in cluster mode raise Unavailable
    at once (the message names the URL, redacted); an unreachable cluster is retried
    for up to ``wait_s`` (``check=False``: raised at once).
    """
    from redis.backoff import ExponentialBackoff
    from redis.cluster import ClusterNode
    from redis.retry import Retry

    from latentserve.worker.jobqueue.redis_url import explain_redis_failure

    plain = without_cluster_param(url)
    # redis-py tries the URL's node first, then these, until one gives the slot map.
    extra = [ClusterNode(host, port)  # type: ignore[no-untyped-call]
             for host, port in startup_nodes(url)]
    deadline = time.monotonic() + (wait_s if check else 0.0)
    while True:
        # redis-py appends the URL's node to this list and gives each node it contacts a
        # client: a node that answered but could not serve (not in cluster mode) keeps an
        # open socket there when the constructor raises, closed below.
        contacts = list(extra)
        try:
            # The retries cover a moved slot or a node that just died: the client
            # refreshes its slot map between them. A failover takes longer (the
            # cluster's node timeout); callers retry through it as through any outage.
            return ClusterClient.from_url(
                plain, startup_nodes=contacts, socket_connect_timeout=5,
                health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3))
        except (RedisClusterException, redis.RedisError) as exc:
            disconnect([n.redis_connection for n in contacts if n.redis_connection is not None])
            cause: BaseException = exc
            while cause.__cause__ is not None:  # "cannot be connected" wraps the reason
                cause = cause.__cause__
            permanent, message = explain_redis_failure(url, cause)
            if permanent or time.monotonic() >= deadline:
                raise Unavailable(f"Redis Cluster: {message}") from None
            log.warning("Redis Cluster: %s; retrying", message)
            time.sleep(1.0)
