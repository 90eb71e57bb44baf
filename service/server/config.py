"""``ServiceConfig``: the gRPC service's one typed, frozen configuration object.

Built once at startup from (highest first) command-line flags, ``LATENTSERVE_<FIELD>``
environment variables and the defaults below, validated, then passed down. Every field
is a flag ``--field-name`` of ``latentserve serve`` and an env var
``LATENTSERVE_FIELD_NAME``; ``add_arguments`` and ``from_sources`` derive both from the
dataclass fields, so the three can never drift apart.

Threads, deliberately (the machine has ``os.cpu_count()`` cores):

- gRPC handler threads (``grpc_threads``) mostly wait: they decode request images and
  block on a batch's result. They need to outnumber concurrent calls (and open
  streams), not cores; past that, more threads only contend for the GIL.
- Compute workers (``compute_workers``) run onnxruntime + the entropy coder on merged
  batches. Two by default, so one batch's Python-side coding overlaps the next
  batch's onnxruntime call.
- onnxruntime intra-op threads per session run (``intra_op_threads``) default to
  ``max(1, cores // compute_workers)``, so compute_workers x intra_op_threads = cores:
  the cores are used but never oversubscribed, which costs more than it gains on
  small convolutional models.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latentserve.errors import InvalidInput
from latentserve.service.addresses import is_loopback_host
from latentserve.service.jobs.settings import JobSettings
from latentserve.settings import Settings, check_range, setting
from latentserve.worker.runtime.settings import PROVIDERS, Provider

if TYPE_CHECKING:  # the engine imports onnxruntime: only engine_config() needs it
    from latentserve.worker.runtime.engine import EngineConfig
LogFormat = typing.Literal["text", "json"]
LogLevel = typing.Literal["debug", "info", "warning", "error"]
LOG_FORMATS = typing.get_args(LogFormat)
LOG_LEVELS = typing.get_args(LogLevel)
MIB = 1 << 20


def _cores() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServiceConfig(Settings):
    """Everything ``create_server`` needs. 0 / None mean "derive" where documented."""

    host: str | None = setting(None, help=(
        "address to bind the gRPC and metrics ports on; default: 0.0.0.0 (all interfaces) "
        "when callers must authenticate (--auth-tokens or --tls-client-ca), else 127.0.0.1 "
        "(loopback only)"))
    port: int = setting(50051, help=("gRPC port; 0 picks a free one"))
    metrics_port: int | None = setting(9090, help=(
        "Prometheus /metrics HTTP port on the same host; 0 picks a free one, "
        "'none' disables it"))
    models: Path = setting(Path("models"), aliases=("--repo",), metavar="DIR", help=(
        "model repository folder (<name>/<version>/manifest.json ...)"))
    provider: Provider = setting("cpu", help=(
        f"onnxruntime execution provider, one of {', '.join(PROVIDERS)}"))
    device_id: int = setting(0, help=("GPU index for cuda / tensorrt"))
    grpc_threads: int = setting(64, help=(
        "gRPC handler threads: each call in flight (and each open stream) holds one, so "
        "at least the concurrent calls you expect; fewer threads contend less for the GIL"))
    max_concurrent_rpcs: int = setting(0, help=(
        "calls accepted at once (running or waiting for a handler thread); beyond it gRPC "
        "answers RESOURCE_EXHAUSTED at once, so overload costs no memory; "
        "0 = 8 x grpc_threads"))
    compute_workers: int = setting(0, help=(
        "threads running merged batches through onnxruntime + the coder; "
        "0 = min(2, cores)"))
    intra_op_threads: int = setting(0, help=(
        "onnxruntime threads per session run; 0 = max(1, cores // compute_workers)"))
    coder_processes: int = setting(0, help=(
        "processes that entropy-code batches of >= coder_min_batch images (kinds 1 and "
        "2), so the compute workers' coding uses every core (constriction keeps the "
        "GIL); 0 = code in the compute threads (bench/codec_speed.py --lanes)"))
    coder_min_batch: int = setting(256, help=(
        "smallest batch coded in the coder processes; smaller ones (a one-image call) "
        "are coded in the compute thread, which costs them no process hop"))
    batching: bool = setting(True, help=(
        "merge concurrent requests for one model into one onnxruntime call"))
    max_batch_size: int = setting(256, help=(
        "largest merged batch (images); larger requests are cut into batches this size"))
    max_queue_delay_us: int = setting(1000, help=(
        "longest a queued image waits for a batch to fill (microseconds), as in "
        "Triton's max_queue_delay_microseconds"))
    dispatch_when_idle: bool = setting(True, help=(
        "start a batch at once when no batch of that model is running, instead of "
        "waiting max_queue_delay_us for more requests (batches then grow while "
        "earlier ones compute)"))
    max_queue_images: int = setting(65536, help=(
        "images queued per model before new requests get RESOURCE_EXHAUSTED"))
    max_message_bytes: int = setting(64 * MIB, help=(
        "largest gRPC message accepted or sent (bytes)"))
    max_images_per_request: int = setting(4096, help=(
        "most images (or codes, or samples) in one request or stream message"))
    max_pixels_per_image: int = setting(25_000_000, help=(
        "largest image accepted (and a photo code decoded), in pixels, checked before "
        "decoding (decompression bombs); 25 M takes a 24 MP photo"))
    preload: bool = setting(True, help=(
        "load and verify the newest version of every model at startup"))
    warmup: bool = setting(True, help=(
        "run one batch through each model as it loads, so its first request does not pay "
        "for onnxruntime's first-run setup; a model that cannot run it is refused"))
    repository_poll_s: float = setting(2.0, help=(
        "look at the model repository this often (seconds): a new version is loaded, "
        "warmed up, then served (NAME moves to it), a removed one drains; 0 = explicit "
        "mode, only `latentserve models load|unload|reload` changes what is served"))
    model_drain_s: float = setting(5.0, help=(
        "a removed or unloaded version keeps answering calls naming it exactly for this "
        "long (seconds), so calls in flight finish, before its sessions are freed"))
    log_format: LogFormat = setting("text", help=(
        "log lines as 'text' or as 'json' objects (one per line, with the request id)"))
    log_level: LogLevel = setting("info", help=(
        "least severe log level written; 'debug' adds one line per request"))
    tracing: bool = setting(False, help=(
        "OpenTelemetry tracing (pip install 'latentserve[tracing]'): a span per RPC, "
        "carried into job workers; the exporter is set by the standard OTEL_* variables "
        "(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...)"))
    grace_s: float = setting(10.0, help=(
        "on SIGTERM: seconds to answer in-flight calls before exiting"))
    stream_idle_timeout_s: float = setting(60.0, help=(
        "end a request stream (CompressStream, ReconstructStream, SubmitJob) whose client "
        "sends nothing for this long while the server waits for its next message, with "
        "DEADLINE_EXCEEDED: an idle stream holds a handler thread and a call slot; "
        "0 = never"))
    reflection: bool = setting(True, help=("serve gRPC server reflection"))
    tls_cert: Path | None = setting(None, help=(
        "serve TLS with this PEM certificate (chain); needs --tls-key"), metavar="FILE.pem")
    tls_key: Path | None = setting(None, help=(
        "the PEM private key of --tls-cert"), metavar="FILE.pem")
    tls_client_ca: Path | None = setting(None, help=(
        "mutual TLS: require client certificates signed by this PEM CA; a client's "
        "identity is its certificate's common name"), metavar="FILE.pem")
    auth_tokens: Path | None = setting(None, help=(
        "require a bearer token listed in this file ('NAME sha256:HEX' lines, made by "
        "`latentserve token new`); health checks stay open"), metavar="FILE")
    jobs: JobSettings = setting(default_factory=JobSettings, help="the job API and its queue")

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", Path(self.models))
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("tls_cert and tls_key go together (a certificate and its "
                               "private key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInput("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
        if not self.host:  # derived: listen beyond this machine only when callers authenticate
            object.__setattr__(self, "host", "0.0.0.0" if self.authenticated else "127.0.0.1")
        if self.provider not in PROVIDERS:
            raise InvalidInput(f"provider {self.provider!r} is not one of {PROVIDERS}")
        for name in ("port", "device_id"):
            check_range(name, getattr(self, name), 0, 65535)
        if self.metrics_port is not None:
            check_range("metrics_port", self.metrics_port, 0, 65535)
        for name in ("grpc_threads", "max_batch_size", "max_queue_images",
                     "max_images_per_request", "max_pixels_per_image"):
            check_range(name, getattr(self, name), 1, None)
        for name in ("compute_workers", "intra_op_threads", "max_queue_delay_us",
                     "max_concurrent_rpcs"):
            check_range(name, getattr(self, name), 0, None)
        check_range("coder_processes", self.coder_processes, 0, 64)
        check_range("coder_min_batch", self.coder_min_batch, 1, None)
        check_range("max_message_bytes", self.max_message_bytes, 4096, 2**31 - 1)
        if self.log_format not in LOG_FORMATS:
            raise InvalidInput(f"log_format {self.log_format!r} is not one of {LOG_FORMATS}")
        if self.log_level not in LOG_LEVELS:
            raise InvalidInput(f"log_level {self.log_level!r} is not one of {LOG_LEVELS}")
        for name in ("repository_poll_s", "model_drain_s"):
            if not getattr(self, name) >= 0:
                raise InvalidInput(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if not self.grace_s >= 0:
            raise InvalidInput(f"grace_s must be >= 0 seconds, got {self.grace_s}")
        if not self.stream_idle_timeout_s >= 0:
            raise InvalidInput("stream_idle_timeout_s must be >= 0 seconds (0 = never), "
                               f"got {self.stream_idle_timeout_s}")

    # -- derived ------------------------------------------------------------------
    @property
    def authenticated(self) -> bool:
        """Whether callers must prove who they are (a bearer token or a client cert)."""
        return self.auth_tokens is not None or self.tls_client_ca is not None

    @property
    def loopback_only(self) -> bool:
        """Whether the bind address is reachable from this machine only."""
        return is_loopback_host(self.bind_host)

    @property
    def bind_host(self) -> str:
        assert self.host is not None  # set in __post_init__
        return self.host

    @property
    def compute_threads(self) -> int:
        """Compute threads in effect (``compute_workers`` or its derived default)."""
        return self.compute_workers or min(2, _cores())

    @property
    def rpc_limit(self) -> int:
        """Concurrent calls accepted in effect (``max_concurrent_rpcs`` or its default)."""
        return self.max_concurrent_rpcs or 8 * self.grpc_threads

    @property
    def ort_threads(self) -> int:
        """onnxruntime intra-op threads in effect: workers x threads = cores."""
        return self.intra_op_threads or max(1, _cores() // self.compute_threads)

    @property
    def address(self) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{host}:{self.port}"

    def engine_config(self) -> EngineConfig:
        """The onnxruntime session settings that go with this service configuration."""
        from latentserve.worker.runtime.engine import EngineConfig

        return EngineConfig(provider=self.provider, intra_op_threads=self.ort_threads,
                            device_id=self.device_id, max_batch=self.max_batch_size)
