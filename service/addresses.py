"""Whether an address names this machine: one rule for the server's bind address (is it
reachable from elsewhere?) and the client's target (may a token go there in clear?)."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (``localhost``, an IPv4/IPv6 literal, brackets allowed) is loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target ``host:port`` (or ``dns:///host:port``...) names this machine."""
    target = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return is_loopback_host(host)
