"""Request ids and the per-request log line.

Every call gets a request id: the client's ``x-request-id`` metadata when it sends a
usable one (1-128 characters of letters, digits and ``. _ : / + = -``), else a new
random one. The id is echoed in the trailing metadata (``x-request-id``), carried by
every log line written while the call's handler runs (``RequestIdFilter``; a field of
the JSON lines), and, when the client sent it, quoted at the end of an error's
message, "(request id ...)", so a reported error leads straight to its log lines.

``begin_call`` / ``end_call`` (called by ``calls.CallInterceptor``) write one line per
call at debug level: method, status code, milliseconds, request id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
from typing import Any

import grpc

log = logging.getLogger("latentserve.requests")

REQUEST_ID_KEY = "x-request-id"
_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

# (request id, whether the client chose it) of the call this thread is handling.
_current: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar(
    "latentserve_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the call being handled in this thread, if any."""
    got = _current.get()
    return got[0] if got else None


def with_request_id(message: str) -> str:
    """``message`` plus "(request id ...)" when the client chose the call's id: a
    generated id is in the trailers and the log only, so messages stay as they were
    for clients that send none."""
    got = _current.get()
    if got is None or not got[1]:
        return message
    return f"{message} (request id {got[0]})"


def request_id_from(metadata: Any) -> tuple[str, bool]:
    """(the id to use, whether the client sent it) from invocation metadata."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if _ID_RE.match(text):
                return text, True
            break  # unusable (too long, odd characters): never echo it anywhere
    return secrets.token_hex(8), False


def _code_name(context: grpc.ServicerContext) -> str:
    try:
        # grpcio's server context has code(); types-grpcio leaves it out of ServicerContext.
        code = context.code()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a context without code(): report what is known
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


def _begin(context: grpc.ServicerContext, rid: tuple[str, bool]
           ) -> tuple[float, contextvars.Token[tuple[str, bool] | None]]:
    context.set_trailing_metadata(((REQUEST_ID_KEY, rid[0]),))
    return time.perf_counter(), _current.set(rid)


def begin_call(context: grpc.ServicerContext, metadata: Any
               ) -> tuple[float, contextvars.Token[tuple[str, bool] | None]]:
    """A call starts: its request id (from ``metadata``) goes to the trailers and the log
    context; returns (start time, the token ``end_call`` takes)."""
    return _begin(context, request_id_from(metadata))


def end_call(method: str, context: grpc.ServicerContext, start: float, failed: bool,
             token: contextvars.Token[tuple[str, bool] | None]) -> None:
    """A call ends: its debug log line, and its request id leaves the log context."""
    try:
        _end(method, context, start, failed)
    finally:
        _current.reset(token)


def _end(method: str, context: grpc.ServicerContext, start: float, failed: bool) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    code = _code_name(context)
    if failed and code == "OK":
        code = "CANCELLED"  # the generator was closed: the client went away
    ms = (time.perf_counter() - start) * 1e3
    log.debug("%s %s %.1f ms", method, code, ms,
              extra={"rpc": method, "code": code, "ms": round(ms, 3)})


# -- log output ------------------------------------------------------------------------------

class RequestIdFilter(logging.Filter):
    """Puts the current call's id on every record as ``request_id`` ("" outside calls)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or ""
        return True


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_suffix"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "") or current_request_id() or "",
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_format: str = "text", level: str = "info") -> None:
    """The process's log output for ``serve``: text or JSON lines on stderr, with ids."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(
        TEXT_FORMAT.replace("%(message)s", "%(message)s%(request_suffix)s")))
    handler.addFilter(_text_suffix)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _text_suffix(record: logging.LogRecord) -> bool:
    rid = getattr(record, "request_id", "")
    record.request_suffix = f" [request {rid}]" if rid else ""
    return True
