"""One exception hierarchy for the runtime and export sides, free of gRPC.

Only ``latentserve.service.errors`` maps these to gRPC status codes. Every message
names the bad value and what is allowed, so a person can act on it.
"""

from __future__ import annotations


class LatentServeError(Exception):
    """Base of every error latentserve raises on purpose."""


class InvalidInput(LatentServeError, ValueError):
    """A request's content is malformed: not an image, wrong shape, bad parameter."""


class ModelNotFound(LatentServeError, LookupError):
    """No model of that name (or version) in the repository."""


class ModelIntegrityError(LatentServeError):
    """A model's files do not match the digests in its manifest, or the manifest is invalid."""


class CodeError(LatentServeError):
    """Base of every refusal to decode a latent code."""


class UnknownFormatVersion(CodeError):
    """The code was written by a format version this build cannot read."""


class CodeMismatch(CodeError):
    """The code was made by a model that is not the one available (other name or version)."""


class CorruptCode(CodeError):
    """Truncated or corrupted bytes: bad magic, checksum mismatch, wrong symbol count."""


class NotExactlyDecodable(CodeError):
    """The decoder cannot guarantee bit-exact tables here, so it refuses rather than guess."""


class ResourceLimit(LatentServeError):
    """A configured limit was exceeded (images per request, pixels, queue depth, job size)."""


class Unauthenticated(LatentServeError):
    """The caller presented no valid credentials (a bearer token or client certificate)."""


class Unavailable(LatentServeError):
    """The component is draining or shutting down; retry elsewhere or later."""


class ProviderUnavailable(LatentServeError):
    """The requested onnxruntime execution provider cannot be loaded on this machine."""


class JobNotFound(LatentServeError, LookupError):
    """No job with that id (it may have expired)."""


class JobStateError(LatentServeError):
    """The job is not in a state that allows the operation (e.g. fetching a failed job)."""
