#!/usr/bin/env python
"""A real Redis Cluster on loopback: Debian's redis-server in cluster mode (issue 21).

``LocalCluster(root, masters=3, replicas=1).start()`` runs masters * (1 + replicas)
redis-server processes on free loopback ports (each with its cluster bus on port +
10000), joins them with ``redis-cli --cluster create`` and waits until every node says
``cluster_state:ok`` and every replica is in sync. ``url`` is the cluster URL for
latentserve (``redis://[:PASSWORD@]127.0.0.1:PORT/0?cluster=true``); ``kill(port)``
SIGKILLs one node, ``master_of(key)`` names the master serving a key's slot. With
``tls=ClusterTls(ca, cert, key)`` every node speaks TLS only (clients, cluster bus and
replication), requires client certificates, and ``url`` is the matching ``rediss://``.

The tests (``tests/fixtures_cluster.py``), ``scripts/test.sh``'s cluster pass and
``bench/cluster.py`` use it. As a script::

    python tests/redis_cluster.py DIR     # start, print the URL, run until SIGTERM/SIGINT
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

MAX_PORT = 65535 - 10000  # the cluster bus listens on port + 10000


def _free_port(taken: set[int]) -> int:
    """A loopback port free now whose cluster-bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > MAX_PORT or port in taken or port + 10000 in taken:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


@dataclass(frozen=True)
class ClusterTls:
    """PEM files: the CA, and one certificate (server and client use) every node and client
    presents."""

    ca: Path
    cert: Path
    key: Path


class LocalCluster:
    """Masters and replicas of redis-server in cluster mode under ``root``."""

    def __init__(self, root: Path, *, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 2000, password: str = "",
                 binary: str | None = None, tls: ClusterTls | None = None) -> None:
        self.root = Path(root)
        self.tls = tls
        self.password = password  # requirepass and masterauth of every node
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary or shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if not self.binary or not self.cli:
            raise RuntimeError("redis-server and redis-cli are needed (apt-get install "
                               "redis-server)")
        taken: set[int] = set()
        self.ports: list[int] = []
        for _ in range(masters * (1 + replicas)):
            port = _free_port(taken)
            taken.add(port)
            self.ports.append(port)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The URL latentserve connects with (any node: the client discovers the rest)."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.ports[0]}/0?cluster=true"
        files = (f"ssl_ca_certs={quote(str(self.tls.ca))}&ssl_certfile={quote(str(self.tls.cert))}"
                 f"&ssl_keyfile={quote(str(self.tls.key))}")
        return f"rediss://{auth}127.0.0.1:{self.ports[0]}/0?cluster=true&{files}"

    def _tls_server_args(self) -> list[str]:
        if self.tls is None:
            return []
        return ["--tls-cluster", "yes", "--tls-replication", "yes", "--tls-auth-clients", "yes",
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca)]

    def _tls_cli_args(self) -> list[str]:
        if self.tls is None:
            return []
        return ["--tls", "--cacert", str(self.tls.ca), "--cert", str(self.tls.cert),
                "--key", str(self.tls.key)]

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Start every node, create the cluster and wait until it serves every slot."""
        for port in self.ports:
            self.start_node(port)
        for port in self.ports:
            self._wait_ping(port, timeout)
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        subprocess.run([self.cli, *auth, *self._tls_cli_args(), "--cluster", "create", *addresses,
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        self.wait_ok(timeout)
        return self

    def start_node(self, port: int) -> None:
        """(Re)start one node; its nodes.conf brings it back into the cluster."""
        data = self.root / str(port)
        data.mkdir(parents=True, exist_ok=True)
        log = open(data / "redis.log", "ab")  # noqa: SIM115 - the process owns it
        self.procs[port] = subprocess.Popen(
            [self.binary or "redis-server",
             *(["--port", "0", "--tls-port", str(port)] if self.tls else ["--port", str(port)]),
             *self._tls_server_args(), "--bind", "127.0.0.1",
             "--dir", str(data), "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--appendonly", "no", "--save", "", "--protected-mode", "no",
             *(["--requirepass", self.password, "--masterauth", self.password]
               if self.password else [])],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, no last word to its replica."""
        proc = self.procs.pop(port, None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """SIGKILL every node still running (the data is throwaway)."""
        for port in list(self.procs):
            self.kill(port)

    def node(self, port: int) -> redis.Redis:
        tls: dict[str, Any] = {} if self.tls is None else {
            "ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_certfile": str(self.tls.cert),
            "ssl_keyfile": str(self.tls.key)}
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5,
                           password=self.password or None, **tls)

    def _wait_ping(self, port: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self.node(port) as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.05)

    def info(self, port: int, section: str) -> dict[str, Any]:
        with self.node(port) as client:
            return client.info(section)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node reports cluster_state:ok, agrees on masters * 16384 / masters
        slots, and every live replica's link to its master is up."""
        end = time.monotonic() + timeout
        while True:
            try:
                if all(self._node_ok(p) for p in self.procs):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"cluster on ports {self.ports} not ok after {timeout}s")
            time.sleep(0.1)

    def _node_ok(self, port: int) -> bool:
        with self.node(port) as client:
            info = client.execute_command("CLUSTER", "INFO").decode()
            state = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if state.get("cluster_state") != "ok" or state.get("cluster_slots_ok") != "16384":
                return False
            repl = client.info("replication")
            return repl["role"] == "master" or repl.get("master_link_status") == "up"

    def primaries(self) -> list[int]:
        """Ports of the live nodes that are masters now."""
        return [p for p in self.procs if self.info(p, "replication")["role"] == "master"]

    def master_of(self, key: str) -> int:
        """Port of the master that serves ``key``'s slot now."""
        for port in self.primaries():
            with self.node(port) as client:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return int(master[1])
        raise LookupError(f"no master serves {key!r}")

    def wait_master_changed(self, key: str, old: int, timeout: float = 60.0) -> int:
        """After ``old`` died: wait until a replica serves ``key``'s slot; its port."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                port = self.master_of(key)
                if port != old and self._node_ok(port):
                    return port
            except (redis.RedisError, LookupError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"no replica took over {key!r} from port {old} in {timeout}s")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    cluster = LocalCluster(Path(argv[0])).start()
    print(cluster.url, flush=True)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    try:
        while not stop[0]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
