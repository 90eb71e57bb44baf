"""Build the whole gRPC server: Inference, ModelControl, Jobs, health, reflection, metrics.

``create_server(config) -> (server, port)`` binds and loads the models but does not
start serving; ``server.start()`` does, ``server.stop(grace)`` stops accepting calls,
answers those in flight (up to ``grace`` seconds), then stops the batchers, the
metrics endpoint and any extension. Health answers for "" (the whole server), each
service, and each model ("NAME" and "NAME:VERSION").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentserve.errors import Unavailable
from latentserve.metrics_http import MetricsHTTP
from latentserve.service.jobs.servicer import add_jobs
from latentserve.service.models.catalog import ModelCatalog, RepositoryWatcher
from latentserve.service.models.control import add_model_control
from latentserve.service.models.versions import CachedRepository
from latentserve.service.server.auth import Authenticator, TokenTable
from latentserve.service.server.batching import ComputeLanes
from latentserve.service.server.calls import CallInterceptor
from latentserve.service.server.config import ServiceConfig
from latentserve.service.server.health import SERVING, HealthServicer
from latentserve.service.server.metrics import ServiceMetrics
from latentserve.service.server.reflection import enable_reflection
from latentserve.service.server.servicer import SERVICE_NAME, InferenceServicer
from latentserve.service.server.tracing import server_interceptor
from latentserve.service.tls import server_credentials
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.worker.codec.coderpool import CoderPool
from latentserve.worker.runtime.engine import process_memory
from latentserve.worker.runtime.pipeline import Pipeline
from latentserve.worker.runtime.repository import ModelEntry

log = logging.getLogger(__name__)


@dataclass
class ExtensionContext:
    """What a service added to the server being built (the job API, or an extension) gets
    to register itself and the stop hooks of what it starts."""

    server: grpc.Server
    config: ServiceConfig
    pipeline: Pipeline
    metrics: ServiceMetrics
    health: HealthServicer
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after the gRPC server has stopped (e.g. stop an embedded worker)."""
        self.stop_hooks.append(hook)


# An extension registers its servicer(s) on ctx.server and returns their full service
# names (e.g. ["latentserve.v1.Jobs"]) for health and reflection.
ServiceExtension = Callable[[ExtensionContext], Sequence[str]]


class Server:
    """A built server. Use ``start``/``stop`` (or ``with``); ``port`` is the bound gRPC port."""

    def __init__(self, *, grpc_server: grpc.Server, port: int, config: ServiceConfig,
                 servicer: InferenceServicer, lanes: ComputeLanes, metrics: ServiceMetrics,
                 metrics_http: MetricsHTTP | None, health_servicer: HealthServicer,
                 stop_hooks: list[Callable[[], None]],
                 watcher: RepositoryWatcher | None = None) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.config = config
        self.servicer = servicer
        self.pipeline = servicer.pipeline
        self.lanes = lanes
        self.metrics = metrics
        self.metrics_http = metrics_http
        self.health = health_servicer
        self._stop_hooks = stop_hooks
        self.watcher = watcher
        self.catalog = servicer.catalog
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.port if self.metrics_http else None

    @property
    def target(self) -> str:
        """``host:port`` a client on this machine can dial."""
        host = self.config.bind_host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
        return f"{host}:{self.port}"

    def start(self) -> None:
        self.grpc_server.start()
        if self.watcher is not None:
            self.watcher.start()
        log.info("serving latentserve.v1 on %s (metrics port %s); %s", self.target,
                 self.metrics_port, security_summary(self.config))
        if not self.config.authenticated and not self.config.loopback_only:
            log.warning("no authentication (no --auth-tokens, no --tls-client-ca) and "
                        "listening on %s: anyone who can reach this port can use it",
                        self.config.bind_host)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop accepting calls, answer those in flight within ``grace`` s, then clean up.

        Returns an event set once everything has stopped. Safe to call more than once.
        """
        with self._lock:
            if self._stopping:
                return self._stopped
            self._stopping = True
        self.health.enter_graceful_shutdown()
        grpc_done = self.grpc_server.stop(self.config.grace_s if grace is None else grace)

        def finish() -> None:
            grpc_done.wait()
            try:
                run_stop_hooks(self._stop_hooks)
            finally:
                self._stopped.set()

        threading.Thread(target=finish, name="latentserve-stop", daemon=True).start()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until ``stop`` has finished; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(0).wait()


def security_summary(config: ServiceConfig) -> str:
    """One line on TLS, authentication and reach, for the start-up log and ``serve``."""
    tls = ("mutual TLS" if config.tls_client_ca else "TLS") if config.tls_cert else "plaintext"
    auth = ("bearer tokens" if config.auth_tokens else
            "client certificates" if config.tls_client_ca else "auth off")
    reach = ("loopback only: pass --host 0.0.0.0 to listen on all interfaces"
             if config.loopback_only else f"listening on {config.bind_host}")
    return f"{tls}, {auth}, {reach}"


def grpc_options(config: ServiceConfig) -> list[tuple[str, int]]:
    """Message limits. gRPC itself refuses messages over twice the configured limit; between
    the limit and that, the servicer refuses with a message naming the stream RPC to use."""
    return [("grpc.max_receive_message_length", min(2 * config.max_message_bytes, 2**31 - 1)),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0)]


def create_server(config: ServiceConfig, *, pipeline: Pipeline | None = None,
                  extra_services: Sequence[ServiceExtension] = ()) -> tuple[Server, int]:
    """Build the whole server for ``config`` (bind its port, load the models, add the job
    API when ``config.jobs`` names a queue); returns it and its gRPC port.

    Nothing is served until ``start()``. If any step fails, everything started so far
    (threads, the embedded Valkey, the metrics endpoint) is stopped before the error
    propagates.
    """
    # First, before any thread starts (grpc's own start when the port is bound): glibc's
    # malloc arena limit binds only arenas made later, and a server whose early threads
    # got arenas of their own grew 12% over bench/memory.py's calls instead of 2.5%.
    process_memory()
    metrics = ServiceMetrics()
    own_pipeline = pipeline is None
    pipeline = pipeline or Pipeline(CachedRepository(config.models), config.engine_config(),
                                    max_pixels=config.max_pixels_per_image)
    health_servicer = HealthServicer()
    # Read credentials before anything starts, so a bad file is a clear start-up error.
    tokens = TokenTable(config.auth_tokens) if config.auth_tokens else None
    credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                   if config.tls_cert and config.tls_key else None)

    def loaded(entry: ModelEntry, provider: str) -> None:
        metrics.model_loaded(entry.manifest.ref, provider)

    # Tracing outermost, so its span covers everything. Then one interceptor for the
    # per-call jobs, in this order: metrics (they count refused calls too), the request id
    # (a refused call has one too), auth (it answers before anything looks at the request,
    # so a caller without a token learns nothing but UNAUTHENTICATED), error statuses, the
    # stream idle limit. One wrapper per method instead of five per call (bench/service.py).
    interceptors: list[grpc.ServerInterceptor] = [
        *([server_interceptor()] if config.tracing else []),
        CallInterceptor(metrics, Authenticator(tokens),
                        stream_idle_s=config.stream_idle_timeout_s or None)]
    grpc_server = grpc.server(
        ThreadPoolExecutor(max_workers=config.grpc_threads, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=grpc_options(config), maximum_concurrent_rpcs=config.rpc_limit)
    # The port first: "port in use" is the likeliest failure, and nothing has started yet.
    try:
        port = (grpc_server.add_secure_port(config.address, credentials) if credentials
                else grpc_server.add_insecure_port(config.address))
    except RuntimeError as exc:
        port, reason = 0, str(exc)
    else:
        reason = "is the port in use?"
    if not port:
        raise Unavailable(f"cannot listen on {config.address}: {reason}")

    # From here on each part that starts registers how to stop it (last started, first
    # stopped), and a failure stops them all.
    ctx = ExtensionContext(server=grpc_server, config=config, pipeline=pipeline,
                           metrics=metrics, health=health_servicer)
    try:
        if own_pipeline and config.coder_processes:
            # Before any model's codec is built (they take the pool when built); the
            # processes stop after everything that codes has stopped.
            pool = CoderPool(config.coder_processes, min_batch=config.coder_min_batch)
            ctx.on_stop(pool.close)
            pipeline.coder_pool = pool
        # The catalog keeps each version's health ("NAME:VERSION", and "NAME" for the
        # version NAME resolves to) as versions load, fail, drain and go.
        catalog = ModelCatalog(pipeline, on_loaded=loaded, health=health_servicer,
                               eager=config.preload, warmup=config.warmup,
                               drain_s=config.model_drain_s,
                               watch=config.repository_poll_s > 0)
        lanes = ComputeLanes(config.compute_threads)
        ctx.on_stop(lanes.shutdown)
        servicer = InferenceServicer(catalog, config, lanes=lanes, metrics=metrics)
        ctx.on_stop(servicer.close)
        pb_grpc.add_InferenceServicer_to_server(servicer, grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        # Models: the newest version of each name is loaded and warmed up now
        # (config.preload) so first calls are fast; the others load on first use.
        catalog.sync()
        # Drains end on the watcher's beat, so it runs in explicit mode too (without
        # looking at the repository).
        watcher = RepositoryWatcher(catalog, config.repository_poll_s or 1.0)
        ctx.on_stop(watcher.stop)
        names = [SERVICE_NAME, add_model_control(catalog, grpc_server)]
        names.extend(add_jobs(ctx, config.jobs))
        for extension in extra_services:
            names.extend(extension(ctx))
        for name in ("", *names):
            health_servicer.set(name, SERVING)
        if config.reflection:
            enable_reflection(
                [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                grpc_server)
        metrics_http = None
        if config.metrics_port is not None:
            try:
                metrics_http = metrics.serve_http(config.bind_host, config.metrics_port)
            except OSError as exc:
                raise Unavailable(f"cannot serve metrics on {config.bind_host}:"
                                  f"{config.metrics_port}: {exc}") from None
            ctx.on_stop(metrics_http.stop)
    except BaseException:
        grpc_server.stop(0)
        run_stop_hooks(ctx.stop_hooks)
        raise
    server = Server(grpc_server=grpc_server, port=port, config=config.replace(port=port),
                    servicer=servicer, lanes=lanes, metrics=metrics,
                    metrics_http=metrics_http, health_servicer=health_servicer,
                    stop_hooks=ctx.stop_hooks, watcher=watcher)
    return server, port


def run_stop_hooks(hooks: list[Callable[[], None]]) -> None:
    """Run ``hooks`` last registered first; one that fails does not stop the others."""
    while hooks:
        hook = hooks.pop()
        try:
            hook()
        except Exception:  # noqa: BLE001 - one hook must not stop the others
            log.exception("a stop hook failed")
