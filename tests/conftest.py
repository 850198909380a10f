"""Shared test fixtures: the real QEMU captures, vendored gzip-compressed in tests/data.

The captures live in the repository (tests/data/qemu-captures, tests/data/qemu10-captures,
each with the README that documents it) so that a plain clone can run every test. Streams
are stored as ``<name>.gz``: read them with `capture_bytes()` (unpacked in memory, cached).
Code that needs a real file (the CLI, `inspect_files`, QEMU's ``-device loader``) uses the
paths under `Q72` / `Q10`: a decompressed copy of tests/data made once per content in the
temp folder (`capture_path()`), so the original layout and file names stay valid.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
# Stored gzip-compressed in the original material too: copied as they are, not unpacked
# (the mapped-ram file is 73.5 MB unpacked; its tests read the .gz).
_KEEP_COMPRESSED = frozenset({"qemu10-captures/mapped-ram/main.bin.gz"})
PATTERN_OFFSET = 0x100000


def _data_files() -> list[Path]:
    return sorted(p for p in DATA.rglob("*") if p.is_file())


def _materialize() -> Path:
    """Unpack tests/data into ``<tmp>/multifd-captures-<uid>-<digest>`` (once per content).

    The folder is built beside its final name and renamed into place, so concurrent test
    processes never see a half-written copy; a later run with the same data reuses it.
    """
    files = _data_files()
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(DATA).as_posix().encode() + b"\0" + f.read_bytes())
    uid = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"multifd-captures-{uid}-{digest.hexdigest()[:16]}"
    if root.is_dir():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for f in files:
            rel = f.relative_to(DATA).as_posix()
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".gz") and rel not in _KEEP_COMPRESSED:
                out.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
            else:
                shutil.copyfile(f, out)
        tmp.rename(root)
    except OSError:
        if not root.is_dir():  # not another process winning the race: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


CAPTURES_ROOT = _materialize()
Q72 = CAPTURES_ROOT / "qemu-captures"
Q10 = CAPTURES_ROOT / "qemu10-captures"


@cache
def capture_bytes(rel: str) -> bytes:
    """A stream's bytes, ``rel`` as in the captures' READMEs ("qemu-captures/x/y.bin"):
    read from tests/data (``y.bin.gz`` unpacked in memory, other files as they are)."""
    gz = DATA / f"{rel}.gz"
    if gz.is_file():
        return gzip.decompress(gz.read_bytes())
    return (DATA / rel).read_bytes()


def capture_path(rel: str) -> Path:
    """A real file holding the stream ``rel`` (the unpacked copy of tests/data)."""
    p = CAPTURES_ROOT / rel
    if not p.is_file():
        raise FileNotFoundError(f"no capture {rel!r} in {DATA}")
    return p


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
def pattern() -> bytes:
    return capture_bytes("qemu-captures/pattern-4MiB.bin")


@pytest.fixture(scope="session")
def mapped_ram_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qemu10-captures/mapped-ram/main.bin.gz unpacked once (73.5 MB, mostly zeros)."""
    out = tmp_path_factory.mktemp("mapped-ram") / "main.bin"
    out.write_bytes(gzip.decompress((DATA / "qemu10-captures/mapped-ram/main.bin.gz")
                                    .read_bytes()))
    return out
