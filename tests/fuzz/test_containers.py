"""``.lscb`` batch containers (worker/codec/container.py), read by the CLIs from client files:
any byte string is refused with a CodeError or read as codes that are exactly the bytes
between its index and its checksum; nothing else is raised.

No server here: these requests never cross gRPC. The examples scale with
``--fuzz-requests`` (a twentieth of it) but do not count among its requests.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentserve.errors import CodeError
from latentserve.worker.codec.container import pack_container, unpack_container

from .fuzz_cases import MUTATIONS, mutate
from .fuzz_client import fuzz_settings

CODES = st.lists(st.binary(max_size=300), max_size=20)


@pytest.fixture(scope="module")
def examples(fuzz_budget: Callable[[str], int]) -> int:
    return max(200, fuzz_budget("wire-random") // 2)


def _reseal(data: bytes) -> bytes:
    """``data`` with its trailing CRC recomputed, so the damage reaches the index parser."""
    body = data[:-4] if len(data) >= 4 else data
    return body + zlib.crc32(body).to_bytes(4, "little")


def assert_codes_of(codes: list[bytes], data: bytes) -> None:
    """The codes read are the container's last bytes before its CRC, in order."""
    total = sum(len(c) for c in codes)
    assert b"".join(codes) == data[len(data) - 4 - total:len(data) - 4]


def test_containers_round_trip_and_damaged_ones_are_refused(examples: int) -> None:
    @fuzz_settings(examples)
    @given(codes=CODES, changes=MUTATIONS, reseal=st.booleans())
    def one_container(codes: list[bytes], changes: list[tuple[str, int, int, bytes]],
                      reseal: bool) -> None:
        packed = pack_container(codes)
        assert unpack_container(packed) == codes
        damaged = mutate(packed, changes)
        if reseal:
            damaged = _reseal(damaged)
        try:
            got = unpack_container(damaged)
        except CodeError:
            return
        assert_codes_of(got, damaged)

    one_container()


def test_random_bytes_are_refused_as_code_errors(examples: int) -> None:
    @fuzz_settings(examples)
    @given(data=st.one_of(st.binary(max_size=400),
                          st.binary(max_size=400).map(lambda b: _reseal(b"LSCB\x01" + b))))
    def one_blob(data: bytes) -> None:
        try:
            codes = unpack_container(data)
        except CodeError:
            return
        assert_codes_of(codes, data)

    one_blob()
