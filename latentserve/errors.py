"""One exception hierarchy for every part of latentserve, free of gRPC.

Only ``latentserve.service.server.errors`` maps these to gRPC status codes. Every message
names the bad value and what is allowed, so a person can act on it; ``reason`` (a value
name of ``ErrorReason`` in proto/latentserve/v1/errors.proto) and ``metadata`` (the values
that reason names, e.g. the model a code needs) let a program act on it too: the server
sends both as a google.rpc.ErrorInfo, and the Python client raises the class of the
reason with the same metadata.
"""

from __future__ import annotations


class LatentServeError(Exception):
    """Base of every error latentserve raises on purpose."""

    reason = "ERROR_REASON_UNSPECIFIED"

    def __init__(self, *args: object, **metadata: object) -> None:
        super().__init__(*args)
        # Strings on the wire (ErrorInfo.metadata is a map<string, string>).
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()
                                         if v is not None}


class InvalidInput(LatentServeError, ValueError):
    """A request's content is malformed: not an image, wrong shape, bad parameter."""

    reason = "INVALID_INPUT"


class ModelNotFound(LatentServeError, LookupError):
    """No model of that name (or version) in the repository."""

    reason = "MODEL_NOT_FOUND"


class ModelIntegrityError(LatentServeError):
    """A model's files do not match the digests in its manifest, or the manifest is invalid."""

    reason = "MODEL_INTEGRITY"


class CodeError(LatentServeError):
    """Base of every refusal to decode a latent code."""

    reason = "CODE_ERROR"


class UnknownFormatVersion(CodeError):
    """The code was written by a format version this build cannot read."""

    reason = "UNKNOWN_FORMAT_VERSION"


class CodeMismatch(CodeError):
    """The code was made by a model that is not the one available (other name or version)."""

    reason = "CODE_MISMATCH"


class CorruptCode(CodeError):
    """Truncated or corrupted bytes: bad magic, checksum mismatch, wrong symbol count."""

    reason = "CORRUPT_CODE"


class NotExactlyDecodable(CodeError):
    """The decoder cannot guarantee bit-exact tables here, so it refuses rather than guess."""

    reason = "NOT_EXACTLY_DECODABLE"


class ResourceLimit(LatentServeError):
    """A configured limit was exceeded (images per request, pixels, queue depth, job size)."""

    reason = "RESOURCE_LIMIT"


class Unauthenticated(LatentServeError):
    """The caller presented no valid credentials (a bearer token or client certificate)."""

    reason = "UNAUTHENTICATED"


class Unavailable(LatentServeError):
    """The component is draining or shutting down; retry elsewhere or later."""

    reason = "UNAVAILABLE"


class ProviderUnavailable(LatentServeError):
    """The requested onnxruntime execution provider cannot be loaded on this machine."""

    reason = "PROVIDER_UNAVAILABLE"


class UnsupportedOperation(LatentServeError):
    """The model cannot do what was asked (e.g. sample from a codec with no generative
    prior); the message and ``supported`` name what it can."""

    reason = "UNSUPPORTED_OPERATION"


class JobNotFound(LatentServeError, LookupError):
    """No job with that id (it may have expired)."""

    reason = "JOB_NOT_FOUND"


class JobStateError(LatentServeError):
    """The job is not in a state that allows the operation (e.g. fetching a failed job)."""

    reason = "JOB_STATE"
