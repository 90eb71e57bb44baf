"""Pack a chunk's items into one Redis value, and back.

Three layouts, told apart by the first byte:

- ``b"I"`` + uint32 count + count x uint32 lengths + the items concatenated: a list of
  byte strings (latent codes, PNG files).
- ``b"A"`` + 4 x uint32 (N, C, H, W) + N*C*H*W bytes: a uint8 image batch (raw inputs
  of a compress chunk, raw image results).
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


def pack_failures(inner: bytes, failures: Mapping[int, ItemFailure]) -> bytes:
    """An ``I`` or ``A`` value whose items at ``failures``' indices failed -> one value
    (``inner`` itself when nothing failed)."""
    if not failures:
        return inner
    doc = json.dumps([[i, f.error, f.message] for i, f in sorted(failures.items())])
    head = doc.encode()
    return _FAILED + struct.pack("<I", len(head)) + head + inner


def unpack_failures(data: bytes) -> tuple[list[bytes] | np.ndarray, dict[int, ItemFailure]]:
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


def unpack(data: bytes) -> list[bytes] | np.ndarray:
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
    except (struct.error, ValueError) as exc:
        raise InvalidInput(f"packed chunk value is damaged: {exc}") from None
    raise InvalidInput(f"packed chunk value starts with {tag!r}; expected b'I', b'A' or "
                       "b'F'")
