"""Device-state buffer header (VFIO's 12-byte index/flags header inside device packets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multifd.wire.devstate import DeviceStateBufferHeader
from multifd.wire.errors import BadCount, BadRecordType, Truncated, UnsupportedVersion


def test_layout_and_round_trip() -> None:
    hdr = DeviceStateBufferHeader(idx=5, flags=1)
    raw = hdr.encode()
    assert raw == bytes.fromhex("00000000 00000005 00000001")
    assert DeviceStateBufferHeader.SIZE == 12
    assert DeviceStateBufferHeader.decode(raw) == hdr
    assert hdr.is_config_state and not DeviceStateBufferHeader(0).is_config_state
    assert DeviceStateBufferHeader.decode(b"pad" + raw + b"data", offset=3) == hdr


@given(st.integers(0, 0xFFFFFFFE), st.sampled_from([0, 1]))
def test_round_trip_property(idx: int, flags: int) -> None:
    hdr = DeviceStateBufferHeader(idx, flags)
    assert DeviceStateBufferHeader.decode(hdr.encode() + b"x" * 3) == hdr


@pytest.mark.parametrize(
    ("raw", "exc"),
    [
        (struct.pack(">III", 1, 0, 0), UnsupportedVersion),
        (struct.pack(">III", 0, 0, 2), BadRecordType),
        (struct.pack(">III", 0, 0, 0x80000001), BadRecordType),
        (struct.pack(">III", 0, 0xFFFFFFFF, 0), BadCount),
        (bytes(11), Truncated),
    ],
)
def test_validation(raw: bytes, exc: type) -> None:
    with pytest.raises(exc):
        DeviceStateBufferHeader.decode(raw)


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        DeviceStateBufferHeader(0xFFFFFFFF).encode()
    with pytest.raises(ValueError):
        DeviceStateBufferHeader(0, flags=2).encode()
