"""Redis Cluster fixtures (issue 21): real redis-server nodes in cluster mode on loopback.

- ``redis_cluster``: one 3-master, 3-replica cluster with a password for the session
  (``tests/redis_cluster.py``); skips without redis-server.
- ``cluster_url``: its URL (``?cluster=true``), every master flushed for this test.
- ``private_cluster``: a cluster of the test's own, to SIGKILL a master under it
  (a short node timeout, so its replica takes over within seconds).
- ``tls_cluster``: 3 masters speaking TLS only (clients, bus), client certificates
  required, a password; with its certificate authority (``tests/certs.py``).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs import CertificateAuthority
from redis_cluster import ClusterTls, LocalCluster


def _need_redis_server() -> None:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    _need_redis_server()
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), password=secrets.token_hex(8))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    from latentserve.worker.jobqueue.store import connect

    client = connect(redis_cluster.url)
    client.flushdb()  # RedisCluster sends it to every master
    client.close()
    return redis_cluster.url


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    _need_redis_server()
    cluster = LocalCluster(tmp_path / "cluster", node_timeout_ms=1000)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[LocalCluster, CertificateAuthority]]:
    _need_redis_server()
    root = tmp_path_factory.mktemp("tls-cluster")
    ca = CertificateAuthority(root / "certs", "cluster-ca")
    node = ca.issue("node", "localhost", server=True, client_too=True)
    cluster = LocalCluster(root, masters=3, replicas=0, password=secrets.token_hex(8),
                           tls=ClusterTls(ca.pem, node.cert, node.key))
    cluster.start()
    yield cluster, ca
    cluster.stop()
