"""Shared test fixtures: where the read-only QEMU captures live (`<repo>/../shared`)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
Q72 = SHARED / "qemu-captures"
Q10 = SHARED / "qemu10-captures"
PATTERN_OFFSET = 0x100000


@dataclass(frozen=True)
class Capture:
    """One recorded migration and the numbers its README states."""

    name: str
    main: Path
    channels: tuple[Path, ...]
    normal_pages: int
    zero_pages: int
    main_zero_records: int
    main_page_records: int
    machine: str
    # per channel id: (normal pages, zero pages, compression)
    channel_pages: dict[int, tuple[int, int, str]]


CAPTURES: tuple[Capture, ...] = (
    Capture("7.2-none", Q72 / "multifd2-none/conn0-src2dst.bin",
            (Q72 / "multifd2-none/conn1-src2dst.bin", Q72 / "multifd2-none/conn2-src2dst.bin"),
            817, 15697, 15697, 0, "pc-i440fx-7.2", {0: (385, 0, "none"), 1: (432, 0, "none")}),
    Capture("7.2-zlib", Q72 / "multifd2-zlib/conn0-src2dst.bin",
            (Q72 / "multifd2-zlib/conn1-src2dst.bin", Q72 / "multifd2-zlib/conn2-src2dst.bin"),
            817, 15697, 15697, 0, "pc-i440fx-7.2", {0: (387, 0, "zlib"), 1: (430, 0, "zlib")}),
    Capture("7.2-zstd", Q72 / "multifd2-zstd/conn0-src2dst.bin",
            (Q72 / "multifd2-zstd/conn1-src2dst.bin", Q72 / "multifd2-zstd/conn2-src2dst.bin"),
            817, 15697, 15697, 0, "pc-i440fx-7.2", {0: (386, 0, "zstd"), 1: (431, 0, "zstd")}),
    Capture("7.2-nomultifd", Q72 / "nomultifd/conn0-src2dst.bin", (),
            817, 15697, 15697, 817, "pc-i440fx-7.2", {}),
    Capture("7.2-file-stream", Q72 / "file-stream/file-stream.bin", (),
            817, 15697, 15697, 817, "pc-i440fx-7.2", {}),
    Capture("10.0-none", Q10 / "multifd2-none/main.bin",
            (Q10 / "multifd2-none/chan-1.bin", Q10 / "multifd2-none/chan-0.bin"),
            818, 15696, 0, 0, "pc-i440fx-10.0",
            {0: (384, 5888, "none"), 1: (434, 9808, "none")}),
    Capture("10.0-zlib", Q10 / "multifd2-zlib/main.bin",
            (Q10 / "multifd2-zlib/chan-0.bin", Q10 / "multifd2-zlib/chan-1.bin"),
            818, 15696, 0, 0, "pc-i440fx-10.0",
            {0: (238, 11602, "zlib"), 1: (580, 4094, "zlib")}),
    Capture("10.0-zstd", Q10 / "multifd2-zstd/main.bin",
            (Q10 / "multifd2-zstd/chan-0.bin", Q10 / "multifd2-zstd/chan-1.bin"),
            818, 15696, 0, 0, "pc-i440fx-10.0",
            {0: (387, 7998, "zstd"), 1: (431, 7698, "zstd")}),
    Capture("10.0-nomultifd", Q10 / "nomultifd/main.bin", (),
            818, 15696, 15696, 818, "pc-i440fx-10.0", {}),
)
CAPTURE_IDS = [c.name for c in CAPTURES]


@pytest.fixture(scope="session")
def shared() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def pattern() -> bytes:
    return (Q72 / "pattern-4MiB.bin").read_bytes()


@pytest.fixture(scope="session")
def mapped_ram_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qemu10-captures/mapped-ram/main.bin.gz unpacked once (73.5 MB, mostly zeros)."""
    out = tmp_path_factory.mktemp("mapped-ram") / "main.bin"
    out.write_bytes(gzip.decompress((Q10 / "mapped-ram/main.bin.gz").read_bytes()))
    return out
