"""One loopback rule for the server's bind address and the client's target."""

from __future__ import annotations

import pytest

from latentserve.service.addresses import is_loopback_host, is_loopback_target
from latentserve.service.server.config import ServiceConfig


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
    ("example.com", False), ("127.0.0.1.example.com", False), ("", False)])
def test_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("target, loopback", [
    ("127.0.0.1:50051", True), ("[::1]:50051", True), ("localhost:50051", True),
    ("dns:///localhost:50051", True), ("ipv4:127.0.0.1:50051", True),
    ("ipv6:[::1]:50051", True), ("10.1.2.3:50051", False), ("server:50051", False),
    ("dns:///server:50051", False)])
def test_targets(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback


def test_the_server_and_the_client_agree() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "0.0.0.0", "192.168.1.2"):
        address = ServiceConfig(host=host).address
        assert ServiceConfig(host=host).loopback_only is is_loopback_target(address)
