"""A Prometheus ``/metrics`` endpoint for one registry, shared by the service and the
worker (the worker never imports the service, so it lives here)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


class MetricsHTTP:
    """A running metrics endpoint; ``port`` is the bound port."""

    def __init__(self, httpd: Any, thread: Any) -> None:
        self.httpd = httpd
        self.thread = thread
        self.port = int(httpd.server_port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsHTTP:
    """Start ``/metrics`` for ``registry`` on ``host:port`` (0 = a free port) in a
    daemon thread."""
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsHTTP(httpd, thread)
