"""The Redis URL: the one setting that says where the queue is and how to reach it.

Everything about reaching Redis travels in its URL, so that the service and every worker
read one setting (``REDIS_URL``) and go through one ``store.connect``:
``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` for TLS, ``unix://PATH``,
plus the query parameters below, which redis-py passes on to its connection. Checked
before any connection (``check_redis_url``), hidden for logs (``redact_url``), and a
failed first contact explained (``explain_redis_failure``).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from latentserve.errors import InvalidInput

# The cluster parameters' names live here, with the other URL parameters; cluster.py reads them.
CLUSTER_PARAM = "cluster"
NODES_PARAM = "nodes"  # more first contacts: HOST:PORT,HOST:PORT ([v6addr]:PORT)
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_PARAMS = frozenset({
    "db", "username", "password", "client_name", "protocol", "socket_timeout",
    "socket_connect_timeout", "socket_keepalive", "health_check_interval", "max_connections",
    CLUSTER_PARAM, NODES_PARAM})  # a Redis Cluster and its first contacts (jobqueue/cluster.py)
REDIS_TLS_PARAMS = frozenset({
    "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password",
    "ssl_cert_reqs", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers"})
_TLS_FILES = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
_SECRET_PARAM = re.compile(r"(?<=[?&])((?:ssl_)?password)=[^&#]*", re.IGNORECASE)
_USER = re.compile(r"[A-Za-z0-9._~%!$'()*+,;=-]*")


def redact_url(url: str) -> str:
    """``url`` fit for logs: its password and ``password`` / ``ssl_password`` values as ***.

    The user name stays when a password follows it (it says which ACL user was tried);
    a lone ``redis://WORD@host`` is hidden whole, since people write it meaning a
    password. The last ``@`` ends the credentials even when the password has an
    unescaped ``/`` or ``?`` that would fool a URL parser: this errs on hiding too much.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = rest.rfind("@")
    if cut >= 0:
        user, colon, _ = rest[:cut].partition(":")
        shown = f"{user}:***" if colon and _USER.fullmatch(user) else "***"
        rest = f"{shown}@{rest[cut + 1:]}"
    return f"{scheme}://{_SECRET_PARAM.sub(lambda m: m.group(1) + '=***', rest)}"


def check_redis_url(url: str) -> dict[str, str]:
    """Validate a Redis URL before any connection; returns its query parameters.

    Refuses (InvalidInput, the URL redacted) an unknown scheme, a query parameter that
    is not in REDIS_PARAMS (or REDIS_TLS_PARAMS with rediss://), a bad ``ssl_cert_reqs``
    and a TLS file that does not exist.
    """
    shown = redact_url(url)
    if not url.startswith(REDIS_SCHEMES):
        raise InvalidInput(f"Redis URL {shown!r} must start with redis://, rediss:// or "
                           "unix://")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what raises on a bad one
    except ValueError as exc:
        raise InvalidInput(f"Redis URL {shown!r} is malformed ({exc}); percent-encode "
                           "@ : / ? # % in the password (e.g. %40 for @)") from None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    tls = parts.scheme == "rediss"
    for name, value in params.items():
        if name in REDIS_TLS_PARAMS and not tls:
            raise InvalidInput(f"Redis URL {shown!r}: {name} needs a rediss:// (TLS) URL")
        if name not in REDIS_PARAMS | REDIS_TLS_PARAMS:
            raise InvalidInput(f"Redis URL {shown!r}: unknown query parameter {name!r}; "
                               f"allowed: {', '.join(sorted(REDIS_PARAMS))}, and with "
                               f"rediss:// {', '.join(sorted(REDIS_TLS_PARAMS))}")
        if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
            raise InvalidInput(f"Redis URL {shown!r}: ssl_cert_reqs={value!r} must be none, "
                               "optional or required")
        if name in _TLS_FILES and not Path(value).exists():  # parse_qsl unquoted it
            raise InvalidInput(f"Redis URL {shown!r}: {name} {value!r} does not exist")
    from latentserve.worker.jobqueue.cluster import is_cluster_url

    try:
        cluster = is_cluster_url(url)
    except InvalidInput as exc:
        raise InvalidInput(f"Redis URL {shown!r}: {exc}") from None
    if NODES_PARAM in params and not cluster:
        raise InvalidInput(f"Redis URL {shown!r}: {NODES_PARAM}= names a Redis Cluster's first "
                           f"contacts; add {CLUSTER_PARAM}=true")
    return params


def explain_redis_failure(url: str, exc: BaseException) -> tuple[bool, str]:
    """Why the first command on ``url`` failed: (permanent, message naming the URL redacted).

    Permanent: the server refused the credentials (NOAUTH, WRONGPASS, no password set,
    NOPERM) or the TLS handshake failed (certificate verify failed, client certificate
    required, unreadable files): retrying cannot help, so start-up stops. Otherwise
    (refused, timed out, reset) the server may just be starting, and callers retry.
    """
    import ssl

    where = f"Redis at {redact_url(url)}"
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:  # what redis-py wrapped: SSLError, OSError
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = str(exc)
    low = " | ".join(str(x) for x in chain).lower()
    tls_errors = [x for x in chain if isinstance(x, ssl.SSLError)]
    reason = str(tls_errors[-1]) if tls_errors else text
    parts = urlsplit(url)
    user = unquote(parts.username or "")
    has_password = parts.password is not None or "password=" in parts.query
    tls = parts.scheme == "rediss"
    if "noauth" in low or "authentication required" in low or \
            "must be called with the client already authenticated" in low:
        return True, (f"{where} requires a password (NOAUTH) and the URL gives none: use "
                      "redis://:PASSWORD@HOST:PORT/DB, or redis://USER:PASSWORD@... for an "
                      "ACL user (rediss:// for TLS)")
    if "without any password configured" in low or "no password is set" in low:
        return True, (f"{where} has no password set, but the URL gives one: drop it from "
                      "the URL, or set requirepass (or an ACL user) on the server")
    if "wrongpass" in low or "invalid username-password" in low or "invalid password" in low:
        # The lone word is not echoed: it may well be the password, misplaced.
        hint = ("the URL gives a user name and no password (redis://WORD@HOST names a "
                "user); a password alone is written redis://:PASSWORD@HOST"
                if user and not has_password else
                f"check the password{f' of ACL user {user!r}' if user else ''} (percent-"
                "encode @ : / ? # % in it) and that the user is enabled")
        return True, f"{where} refused the credentials (WRONGPASS: {text}): {hint}"
    if "noperm" in low:
        return True, (f"{where}: ACL user {user or 'default'!r} may not run a command it "
                      f"needs ({text}); see docs/redis.md for the ACL rules")
    if "certificate verify failed" in low or "certificate_verify_failed" in low:
        if "mismatch" in low:
            return True, (f"{where}: TLS certificate verify failed ({reason}): the server's "
                          f"certificate does not name host {parts.hostname!r}: connect by a "
                          "name it lists, or add ssl_check_hostname=false to the URL")
        return True, (f"{where}: TLS certificate verify failed ({reason}): give the CA "
                      "that signed the server's certificate as ?ssl_ca_certs=/path/ca.pem "
                      "(ssl_cert_reqs=none skips the check: testing only)")
    if tls and ("certificate required" in low or "certificate_required" in low
                or "bad certificate" in low or "unknown ca" in low or "handshake failure"
                in low or "eof occurred in violation of protocol" in low):
        return True, (f"{where} ended the TLS handshake ({reason}): the server may require "
                      "a client certificate (mutual TLS): add ssl_certfile=/path/client.pem"
                      "&ssl_keyfile=/path/client.key, signed by a CA the server trusts")
    if tls_errors or "[ssl" in low or "[x509" in low:
        return True, (f"{where}: TLS failed ({reason}); if that port is not TLS use redis://, "
                      "else check the ssl_* files in the URL")
    if "invalid ssl" in low or not isinstance(exc, (OSError, _redis_transient())):
        return True, f"{where}: {text}"
    if not tls and ("reset by peer" in low or "closed by server" in low):
        return False, (f"{where} closed the connection ({text}); if that port speaks TLS, "
                       "use rediss://")
    if tls and "timeout" in low:
        return False, f"{where} timed out ({text}); if that port is not TLS, use redis://"
    return False, f"{where} is not reachable ({text})"


def _redis_transient() -> tuple[type[Exception], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


