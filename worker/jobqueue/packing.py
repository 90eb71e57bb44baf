"""Pack a chunk's items into one Redis value, and back.

Four layouts, told apart by the first byte:

- ``b"I"`` + uint32 count + count x uint32 lengths + the items concatenated: a list of
  byte strings (latent codes, PNG files).
- ``b"A"`` + 4 x uint32 (N, C, H, W) + N*C*H*W bytes: a uint8 image batch (raw inputs
  of a compress chunk, raw image results).
- ``b"R"`` + uint32 count + count x 3 uint32 (C, H, W) + the images' pixels concatenated:
  uint8 images of different sizes (an any-size model's compress inputs or raw results).
- ``b"F"`` + uint32 length + that many bytes of UTF-8 JSON ``[[index, error class,
  message], ...]`` + an ``I`` or ``A`` value: a chunk some of whose items failed (an
  input refused on arrival, a code a worker could not decode; OnItemError PER_ITEM).
  ``index`` is the item's position in the chunk; its slot in the inner value holds a
  placeholder (empty bytes, or zero pixels) that no reader hands out as a result.

All integers little-endian. One value per chunk keeps a job to a handful of keys.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.worker.jobqueue.records import ItemFailure

_ITEMS = b"I"
_ARRAY = b"A"
_FAILED = b"F"
_SHAPED = b"R"


def pack_items(items: Sequence[bytes]) -> bytes:
    """A list of byte strings -> one value."""
    lengths = np.fromiter((len(b) for b in items), dtype="<u4", count=len(items))
    return b"".join([_ITEMS, struct.pack("<I", len(items)), lengths.tobytes(), *items])


def pack_images(images: np.ndarray) -> bytes:
    """uint8 (N, C, H, W) -> one value."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InvalidInput(f"pack_images takes uint8 (N, C, H, W), got {images.dtype} "
                           f"{images.shape}")
    return _ARRAY + struct.pack("<4I", *images.shape) + np.ascontiguousarray(images).tobytes()


def pack_shaped(images: Sequence[np.ndarray]) -> bytes:
    """uint8 (C, H, W) arrays of any sizes -> one value (one shape: ``pack_images``)."""
    for im in images:
        if im.dtype != np.uint8 or im.ndim != 3:
            raise InvalidInput(f"pack_shaped takes uint8 (C, H, W) arrays, got {im.dtype} "
                               f"{im.shape}")
    shapes = np.array([im.shape for im in images], "<u4").reshape(-1, 3)
    return b"".join([_SHAPED, struct.pack("<I", len(images)), shapes.tobytes(),
                     *(np.ascontiguousarray(im).tobytes() for im in images)])


def pack_any_images(images: Sequence[np.ndarray]) -> bytes:
    """Images (C, H, W): one array (``A``) when they share a shape, else ``R``."""
    if len({im.shape for im in images}) <= 1 and len(images):
        return pack_images(np.stack(images))
    return pack_shaped(images)


def pack_failures(inner: bytes, failures: Mapping[int, ItemFailure]) -> bytes:
    """An ``I`` or ``A`` value whose items at ``failures``' indices failed -> one value
    (``inner`` itself when nothing failed)."""
    if not failures:
        return inner
    doc = json.dumps([[i, f.error, f.message] for i, f in sorted(failures.items())])
    head = doc.encode()
    return _FAILED + struct.pack("<I", len(head)) + head + inner


def unpack_failures(data: bytes) -> tuple[list[bytes] | list[np.ndarray] | np.ndarray,
                                          dict[int, ItemFailure]]:
    """One value -> (items, {index in the chunk: ItemFailure}); failed slots hold
    placeholders. Refuses damaged values."""
    if data[:1] != _FAILED:
        return unpack(data), {}
    try:
        (size,) = struct.unpack_from("<I", data, 1)
        doc = json.loads(data[5:5 + size].decode())
        failures = {int(i): ItemFailure(str(error), str(message))
                    for i, error, message in doc}
    except (struct.error, ValueError, TypeError) as exc:
        raise InvalidInput(f"packed chunk value is damaged: its item failures do not "
                           f"parse ({exc})") from None
    return unpack(data[5 + size:]), failures


def unpack(data: bytes) -> list[bytes] | list[np.ndarray] | np.ndarray:
    """One value -> list of byte strings, or uint8 (N, C, H, W); refuses damaged values.

    Of a value with item failures only the items come back, failed slots holding their
    placeholders: readers of results use ``unpack_failures``.
    """
    if data[:1] == _FAILED:
        return unpack_failures(data)[0]
    tag = data[:1]
    try:
        if tag == _ITEMS:
            (n,) = struct.unpack_from("<I", data, 1)
            lengths = np.frombuffer(data, dtype="<u4", count=n, offset=5).astype(np.int64)
            ends = 5 + 4 * n + np.cumsum(lengths)
            if n and ends[-1] != len(data):
                raise ValueError(f"lengths sum to {ends[-1]}, value holds {len(data)} bytes")
            starts = np.concatenate([[5 + 4 * n], ends[:-1]]) if n else ends
            return [data[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
        if tag == _ARRAY:
            shape = struct.unpack_from("<4I", data, 1)
            arr = np.frombuffer(data, dtype=np.uint8, offset=17)
            return arr.reshape(shape)
        if tag == _SHAPED:
            (n,) = struct.unpack_from("<I", data, 1)
            shapes = np.frombuffer(data, dtype="<u4", count=3 * n, offset=5).reshape(n, 3)
            sizes = shapes.astype(np.int64).prod(axis=1)
            at = 5 + 12 * n
            if at + int(sizes.sum()) != len(data):
                raise ValueError(f"shapes need {at + int(sizes.sum())} bytes, value holds "
                                 f"{len(data)}")
            out = []
            for dims, size in zip(shapes.tolist(), sizes.tolist(), strict=True):
                out.append(np.frombuffer(data, np.uint8, count=size, offset=at).reshape(dims))
                at += size
            return out
    except (struct.error, ValueError) as exc:
        raise InvalidInput(f"packed chunk value is damaged: {exc}") from None
    raise InvalidInput(f"packed chunk value starts with {tag!r}; expected b'I', b'A', "
                       "b'R' or b'F'")
