"""worker/codec/container.py: the .lscb batch container."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentserve.errors import CorruptCode, UnknownFormatVersion
from latentserve.worker.codec.container import (
    pack_container,
    read_container,
    unpack_container,
    write_container,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=40))
def test_round_trip(codes: list[bytes]) -> None:
    assert unpack_container(pack_container(codes)) == codes


def test_layout() -> None:
    data = pack_container([b"\xa1abc", b"x" * 200])
    assert data[:4] == b"LSCB" and data[4] == 1
    assert int.from_bytes(data[5:9], "little") == 2
    assert data[9:12] == bytes([4, 200 & 0x7F | 0x80, 1])  # LEB128 varints 4, 200
    assert data[12:16] == b"\xa1abc"
    assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])


def test_file_round_trip(tmp_path: Path) -> None:
    codes = [bytes([i % 256]) * (i % 300) for i in range(1000)]
    write_container(tmp_path / "b.lscb", codes)
    assert read_container(tmp_path / "b.lscb") == codes
    assert [p.name for p in tmp_path.iterdir()] == ["b.lscb"]


def test_refusals() -> None:
    good = pack_container([b"abc", b"defg"])
    with pytest.raises(CorruptCode, match="truncated"):
        unpack_container(good[:8])
    with pytest.raises(CorruptCode, match="not a latentserve batch container"):
        unpack_container(b"PK\x03\x04" + good[4:])
    with pytest.raises(UnknownFormatVersion, match="version 2"):
        unpack_container(good[:4] + b"\x02" + good[5:])
    with pytest.raises(CorruptCode, match="checksum"):
        unpack_container(good[:-5] + bytes([good[-5] ^ 1]) + good[-4:])
    # A valid checksum over an index that does not add up.
    body = b"LSCB\x01" + (5).to_bytes(4, "little") + b"\x03\x03"
    with pytest.raises(CorruptCode, match="claims 5 codes"):
        unpack_container(body + zlib.crc32(body).to_bytes(4, "little"))
    body = b"LSCB\x01" + (1).to_bytes(4, "little") + b"\x09abc"
    with pytest.raises(CorruptCode, match="index covers 9 bytes"):
        unpack_container(body + zlib.crc32(body).to_bytes(4, "little"))
    body = b"LSCB\x01" + (1).to_bytes(4, "little") + b"\xff\xff"
    with pytest.raises(CorruptCode, match="index is truncated"):
        unpack_container(body + zlib.crc32(body).to_bytes(4, "little"))


def test_random_corruption_is_refused() -> None:
    rng = np.random.default_rng(0)
    good = pack_container([rng.bytes(int(n)) for n in rng.integers(7, 60, 30)])
    for _ in range(300):
        bad = bytearray(good)
        i = int(rng.integers(len(bad)))
        bad[i] ^= 1 << int(rng.integers(8))
        with pytest.raises((CorruptCode, UnknownFormatVersion)):
            unpack_container(bytes(bad))
