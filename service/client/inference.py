"""A small typed Python client for the Inference service, and the CLI's two backends.

``LatentServeClient(target)`` takes numpy arrays (a 4-D array is a batch
(N, C, H, W); a 3-D array one image (C, H, W); a 2-D array one grey image), PIL
images, image-file bytes or paths, and returns numpy arrays (or PIL images).
Inputs larger than one message go through the stream RPCs, and large draws are
fetched in pieces, without the caller noticing. Server errors are raised as the
matching ``latentserve.errors`` exception, with the server's message.

``LocalBackend`` (a Pipeline in process) and ``RemoteBackend`` (a client) offer the
same few calls, so the CLI has one code path for ``--local`` and ``--target``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

import grpc
import numpy as np

from latentserve import errors as E
from latentserve.service.client.channel import open_channel
from latentserve.service.client.settings import ClientSecurity
from latentserve.service.status import REASONS, error_info, exceptions_for
from latentserve.service.wire import decode_reply_image, raw_batch, raw_image
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from latentserve.worker.runtime.pipeline import Pipeline

MIB = 1 << 20
ImageLike = Any  # np.ndarray | PIL.Image.Image | bytes | str | Path

class ServiceError(E.LatentServeError):
    """A call failed on the server; ``code`` is the gRPC status code."""

    code: grpc.StatusCode


def error_from(exc: grpc.RpcError, target: str) -> E.LatentServeError:
    """The latentserve exception for a failed call: the class of its ErrorInfo reason with
    that reason's metadata; without details (another server, a proxy), the classes its
    status code stands for."""
    code = exc.code()
    info = error_info(exc)
    reason = info.reason if info is not None else None
    bases: tuple[type[E.LatentServeError], ...] = (
        (REASONS[reason],) if reason in REASONS else exceptions_for(code) or (E.LatentServeError,))
    kind = _remote_class(bases)
    err = kind(f"{target}: {code.name}: {exc.details()}",
               **(dict(info.metadata) if info is not None else {}))
    err.code = code
    if reason is not None:
        err.reason = reason
    return err


@functools.cache
def _remote_class(bases: tuple[type[E.LatentServeError], ...]) -> type[ServiceError]:
    """One class per set of bases, so that ``type(a) is type(b)`` for two equal refusals."""
    return type(f"Remote{bases[0].__name__}", (ServiceError, *bases), {})


def to_chw(image: ImageLike) -> np.ndarray | bytes:
    """One image -> uint8 (C, H, W), or the bytes of an image file (sent as they are)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise E.InvalidInput(f"images must hold uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and not isinstance(image, np.ndarray):  # PIL: (H, W, C)
        return arr.transpose(2, 0, 1)
    if arr.ndim == 3:
        return arr
    raise E.InvalidInput(f"an image must be 2-D (H, W) or 3-D (C, H, W), got shape {arr.shape}")


def as_image_list(images: ImageLike | Iterable[ImageLike]) -> list[np.ndarray | bytes]:
    """Anything the client accepts -> a list of (C, H, W) arrays or file bytes."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [to_chw(images)]
    if isinstance(images, (bytes, bytearray, memoryview, str, Path)) or hasattr(images, "getpixel"):
        return [to_chw(images)]
    return [to_chw(im) for im in images]


def _as_batch(images: Any) -> tuple[np.ndarray | None, list[np.ndarray | bytes]]:
    """(images as one uint8 (N, C, H, W) array if they share a shape, else None; the list)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.dtype != np.uint8:
            raise E.InvalidInput(f"images must hold uint8 pixels, got {images.dtype}")
        return images, []
    items = as_image_list(images)
    arrays = [x for x in items if isinstance(x, np.ndarray)]
    if items and len(arrays) == len(items) and len({x.shape for x in arrays}) == 1:
        return np.stack(arrays), items
    return None, items


def to_pil(images: Iterable[np.ndarray]) -> list[PILImage]:
    from PIL import Image

    return [Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)) for im in images]


def _image_message(image: np.ndarray | bytes) -> pb.Image:
    return pb.Image(encoded=image) if isinstance(image, bytes) else raw_image(image)


def _chunks(items: Sequence[Any], sizes: Sequence[int], max_items: int,
            max_bytes: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``max_items`` items and about ``max_bytes`` bytes."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or total + size > max_bytes):
            yield items[start:i]
            start, total = i, 0
        total += size
    if start < len(items):
        yield items[start:]


class LatentServeClient:
    """A connection to a latentserve server (``host:port``)."""

    def __init__(self, target: str, *, timeout: float | None = None,
                 max_message_bytes: int = 64 * MIB, chunk_images: int = 1024,
                 security: ClientSecurity | None = None,
                 channel: grpc.Channel | None = None) -> None:
        """``security``: TLS and bearer token (``ClientSecurity``); None = plaintext."""
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        # Well under both server limits (64 MiB, 4096 images per message by default).
        self.chunk_images = chunk_images
        self.chunk_bytes = max_message_bytes // 4
        self.channel = channel or open_channel(target, security,
                                               max_message_bytes=max_message_bytes)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LatentServeClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as exc:
            raise error_from(exc, self.target) from None

    # -- models ----------------------------------------------------------------------------
    def models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Every model version the server has."""
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def model(self, ref: str, *, timeout: float | None = None) -> pb.ModelInfo:
        """One model's info; ModelNotFound if the server has no such model."""
        # _call returns the stub's reply, a ModelInfo for GetModel.
        return cast(pb.ModelInfo,
                    self._call(self.stub.GetModel, pb.GetModelRequest(model=ref), timeout))

    # -- compress ----------------------------------------------------------------------------
    def compress(self, images: ImageLike | Iterable[ImageLike], model: str, *,
                 resize: bool = False, timeout: float | None = None) -> list[bytes]:
        """Images -> one latent code each, in order (streams when they exceed one message).

        Arrays of one shape travel as one RawBatch per message; anything else (files,
        PIL images of mixed sizes with ``resize``) as one Image each.
        """
        batch, items = _as_batch(images)
        if batch is not None:
            per = max(1, batch[0].nbytes) if len(batch) else 1
            step = max(1, min(self.chunk_images, self.chunk_bytes // per))
            requests = [pb.CompressRequest(model=model, batch=raw_batch(batch[i:i + step]),
                                           resize=resize)
                        for i in range(0, max(len(batch), 1), step)]
        else:
            messages = [_image_message(im) for im in items]
            requests = [pb.CompressRequest(model=model, images=chunk, resize=resize)
                        for chunk in _chunks(messages, [m.ByteSize() for m in messages],
                                             self.chunk_images, self.chunk_bytes)]
        if len(requests) <= 1:
            request = requests[0] if requests else pb.CompressRequest(model=model)
            return list(self._call(self.stub.Compress, request, timeout).codes)
        for r in requests[1:]:
            r.model = ""  # the stream's first message names the model
        return self._stream(self.stub.CompressStream, iter(requests), timeout,
                            lambda r: list(r.codes))

    def _stream(self, method: Any, requests: Iterator[Any], timeout: float | None,
                take: Any) -> list[Any]:
        out: list[Any] = []
        try:
            for reply in method(requests, timeout=timeout if timeout is not None else self.timeout):
                out.extend(take(reply))
        except grpc.RpcError as exc:
            raise error_from(exc, self.target) from None
        return out

    # -- reconstruct --------------------------------------------------------------------------
    def reconstruct_list(self, codes: Iterable[bytes], *, model: str | None = None,
                         timeout: float | None = None) -> list[np.ndarray]:
        """Codes -> one uint8 (C, H, W) image each, in order (codes of several models mix)."""
        codes = [bytes(c) for c in codes]
        chunks = list(_chunks(codes, [len(c) + 4 for c in codes], self.chunk_images,
                              self.chunk_bytes))
        fmt = pb.IMAGE_FORMAT_RAW  # no PNG round trip on either side
        if len(chunks) <= 1:
            reply = self._call(self.stub.Reconstruct, pb.ReconstructRequest(
                codes=codes, format=fmt, model=model or ""), timeout)
            return [decode_reply_image(im) for im in reply.images]
        requests = (pb.ReconstructRequest(codes=chunk, format=fmt, model=model or "")
                    for chunk in chunks)
        return self._stream(self.stub.ReconstructStream, requests, timeout,
                            lambda r: [decode_reply_image(im) for im in r.images])

    def reconstruct(self, codes: Iterable[bytes], *, model: str | None = None,
                    as_pil: bool = False, timeout: float | None = None) -> Any:
        """Codes -> uint8 images (N, C, H, W), or a list of PIL images with ``as_pil``.

        Codes of models with different image shapes need ``reconstruct_list``.
        """
        images = self.reconstruct_list(codes, model=model, timeout=timeout)
        if as_pil:
            return to_pil(images)
        return _stack(images)

    # -- sample ---------------------------------------------------------------------------------
    def sample(self, model: str, n: int, seed: int = 0, temperature: float = 1.0, *,
               start: int = 0, as_pil: bool = False, timeout: float | None = None) -> Any:
        """Draw ``n`` images (N, C, H, W); the same arguments always give the same images."""
        if n < 0:
            raise E.InvalidInput(f"n must be >= 0, got {n}")
        images: list[np.ndarray] = []
        for first in range(start, start + n, self.chunk_images):
            count = min(self.chunk_images, start + n - first)
            reply = self._call(self.stub.Sample, pb.SampleRequest(
                model=model, count=count, seed=seed, temperature=temperature, start=first,
                format=pb.IMAGE_FORMAT_RAW), timeout)
            images.extend(decode_reply_image(im) for im in reply.images)
        if as_pil:
            return to_pil(images)
        if not images:
            info = self.model(model, timeout=timeout)
            return np.zeros((0, info.channels, info.height, info.width), np.uint8)
        return _stack(images)


def _stack(images: list[np.ndarray]) -> np.ndarray:
    if len({im.shape for im in images}) > 1:
        raise E.InvalidInput(
            f"the images have different shapes {sorted({im.shape for im in images})}; "
            "use reconstruct_list for codes of several models")
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)


# -- the CLI's backends -------------------------------------------------------------------

class Backend(Protocol):
    """What the CLI needs, in process or over gRPC."""

    where: str

    def resolve(self, model: str) -> tuple[str, tuple[int, int, int]]:
        """``name[:version]`` -> (``name:version``, image shape (C, H, W))."""
    def compress(self, model: str, images: np.ndarray | list[np.ndarray]) -> list[bytes]: ...
    def reconstruct(self, codes: list[bytes]) -> list[np.ndarray]: ...
    def sample(self, model: str, n: int, *, seed: int, temperature: float,
               start: int = 0) -> np.ndarray: ...
    def close(self) -> None: ...


class LocalBackend:
    """The Pipeline in this process."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.where = f"in process ({pipeline.repository.root})"

    def resolve(self, model: str) -> tuple[str, tuple[int, int, int]]:
        m = self.pipeline.repository.resolve(model).manifest
        return m.ref, m.image_shape

    def compress(self, model: str, images: np.ndarray | list[np.ndarray]) -> list[bytes]:
        return self.pipeline.compress(model, images)

    def reconstruct(self, codes: list[bytes]) -> list[np.ndarray]:
        out = self.pipeline.reconstruct_each(codes)
        for i, r in enumerate(out):
            if isinstance(r, E.CodeError):
                from latentserve.worker.codec.codes import with_index

                raise with_index(r, i, len(out))
            if isinstance(r, E.ResourceLimit):
                raise r
        return out  # type: ignore[return-value]

    def sample(self, model: str, n: int, *, seed: int, temperature: float,
               start: int = 0) -> np.ndarray:
        return self.pipeline.sample(model, n, seed=seed, temperature=temperature, start=start)

    def close(self) -> None:
        pass


class RemoteBackend:
    """A latentserve server, through LatentServeClient."""

    def __init__(self, client: LatentServeClient) -> None:
        self.client = client
        self.where = client.target

    def resolve(self, model: str) -> tuple[str, tuple[int, int, int]]:
        info = self.client.model(model)
        return info.ref, (info.channels, info.height, info.width)

    def compress(self, model: str, images: np.ndarray | list[np.ndarray]) -> list[bytes]:
        return self.client.compress(images, model)

    def reconstruct(self, codes: list[bytes]) -> list[np.ndarray]:
        return self.client.reconstruct_list(codes)

    def sample(self, model: str, n: int, *, seed: int, temperature: float,
               start: int = 0) -> np.ndarray:
        # sample returns PIL images only with as_pil=True: here, one uint8 (N, C, H, W) array.
        return cast(np.ndarray, self.client.sample(model, n, seed, temperature, start=start))

    def close(self) -> None:
        self.client.close()


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``size`` items (the CLI's progress-bar steps)."""
    for start in itertools.count(0, size):
        if start >= len(items):
            return
        yield items[start:start + size]
