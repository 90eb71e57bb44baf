"""The ``.lscb`` batch container: many latent codes in one file (docs/code-format.md).

Layout: magic ``LSCB``, container version (1 byte), N (uint32 little-endian), N code
lengths as unsigned LEB128 varints, the N codes concatenated, then CRC32 of everything
before it (uint32 little-endian). The codes inside keep their own headers, so a code
taken out of a container is a valid ``.lsc`` on its own.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

from latentserve.errors import CorruptCode, InvalidInput, UnknownFormatVersion

MAGIC = b"LSCB"
VERSION = 1
PREFIX = len(MAGIC) + 1 + 4  # magic, version, N
TRAILER = 4  # CRC32
MAX_CODES = 2**32 - 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def pack_container(codes: Iterable[bytes]) -> bytes:
    """Codes -> one ``.lscb`` byte string."""
    codes = [bytes(c) for c in codes]
    if len(codes) > MAX_CODES:
        raise InvalidInput(f"a container holds at most {MAX_CODES} codes, got {len(codes)}")
    body = bytearray(MAGIC)
    body.append(VERSION)
    body += len(codes).to_bytes(4, "little")
    for c in codes:
        body += _varint(len(c))
    for c in codes:
        body += c
    return bytes(body) + zlib.crc32(body).to_bytes(4, "little")


def unpack_container(data: bytes) -> list[bytes]:
    """One ``.lscb`` byte string -> its codes; CorruptCode / UnknownFormatVersion if unreadable."""
    data = bytes(data)
    if len(data) < PREFIX + TRAILER:
        raise CorruptCode(f"a batch container is at least {PREFIX + TRAILER} bytes; got "
                          f"{len(data)}: truncated")
    if data[:4] != MAGIC:
        raise CorruptCode(f"not a latentserve batch container: starts with {data[:4]!r}, "
                          f"expected {MAGIC!r}")
    if data[4] != VERSION:
        raise UnknownFormatVersion(f"batch container version {data[4]}; this build reads "
                                   f"version {VERSION} only")
    body, crc = data[:-TRAILER], int.from_bytes(data[-TRAILER:], "little")
    if zlib.crc32(body) != crc:
        raise CorruptCode("batch container checksum mismatch: the file was changed or truncated")
    count = int.from_bytes(body[5:9], "little")
    # Every length takes at least one byte: a count beyond the body cannot be real.
    if count > len(body) - PREFIX:
        raise CorruptCode(f"batch container claims {count} codes in {len(body)} bytes")
    pos, lengths = PREFIX, []
    for _ in range(count):
        n, shift = 0, 0
        while True:
            if pos >= len(body) or shift > 35:
                raise CorruptCode("batch container index is truncated or malformed")
            byte = body[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        lengths.append(n)
    if pos + sum(lengths) != len(body):
        raise CorruptCode(f"batch container index covers {sum(lengths)} bytes of codes, "
                          f"the file holds {len(body) - pos}")
    codes = []
    for n in lengths:
        codes.append(body[pos:pos + n])
        pos += n
    return codes


def write_container(path: str | Path, codes: Iterable[bytes]) -> None:
    """Write codes to ``path`` as ``.lscb`` (via a temporary file, then an atomic rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pack_container(codes))
    tmp.replace(path)


def read_container(path: str | Path) -> list[bytes]:
    """The codes of an ``.lscb`` file."""
    return unpack_container(Path(path).read_bytes())
