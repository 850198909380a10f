"""A recorded VM image: a QEMU single-stream migration file that QEMU itself can load.

What we keep from a migration (`multifd incoming`): the configuration section's raw bytes,
the RAM blocks (named as QEMU names them, filled from every round in order), the ram
section's id/instance/version, whether a SWITCHOVER_START command stood between the ram
PART and END sections (QEMU 10 machine types), and the opaque device tail: every byte
after the ram END section, device sections through QEMU_VM_EOF and the VMDESCRIPTION.

On disk the image is the stream `migrate "exec:cat > f"` would write (qemu-reference.md
§1, §2), so `qemu -incoming "exec:cat IMAGE"` loads it and `multifd inspect` reads it::

    QEVM v3 | configuration (raw) |
    01 sid "ram" inst ver | MEM_SIZE + block list | EOS | 7E sid
    02 sid | per block: ZERO records (zero pages), PAGE records (others) | EOS | 7E sid
    [08 000b 0000 SWITCHOVER_START]
    03 sid | EOS | 7E sid | device tail (verbatim)

`StreamRecorder` turns main-stream bytes into a `VmImage` (used by `read_image` on a file
and by the incoming engine on a socket, which adds the multifd barrier through hooks).
Page records are built per block with numpy (`wire.ram_batch`), never a loop per page.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multifd.machine.ramblock import RamBlock, received_maps
from multifd.migration.ram import apply_page_record
from multifd.wire.constants import RAM_SECTION_IDSTR, Command, SectionType
from multifd.wire.errors import BadName, BadRecordType, Mismatch, Truncated, WireError
from multifd.wire.ram import (
    RamBlockInfo,
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamSettings,
    encode_ram_record,
)
from multifd.wire.ram_batch import encode_page_run, encode_zero_run
from multifd.wire.stream import (
    CommandRecord,
    Configuration,
    DeviceTail,
    FileHeader,
    MainStreamDecoder,
    SectionFooter,
    SectionHeader,
    encode_record,
)
from multifd.wire.vmdesc import find_vmdesc

__all__ = [
    "ImageError",
    "StreamRecorder",
    "VmImage",
    "image_chunks",
    "page_records",
    "read_image",
    "write_image",
    "zero_mask",
]

PAGE_SIZE = 4096
RUN_PAGES = 2048  # pages per encoded PAGE run: bounds the temporary to 8 MiB
READ_CHUNK = 1 << 20
SWITCHOVER_START = encode_record(CommandRecord(Command.SWITCHOVER_START, b""))


class ImageError(Exception):
    """The stream or image is not something we can record or replay (one-line message)."""


@dataclass
class VmImage:
    """A recorded VM: configuration bytes, RAM blocks, opaque device tail."""

    configuration: bytes  # the raw configuration section, 0x07 included
    machine: str
    uuid: bytes | None  # the configuration's uuid subsection, when present
    ram_section_id: int
    ram_instance_id: int
    ram_version_id: int
    blocks: dict[str, RamBlock]  # MEM_SIZE order
    block_lengths: dict[str, int]  # used_length exactly as QEMU listed it
    switchover_start: bool
    tail: bytes
    normal_pages: int = 0  # pages applied from the source, counted per record/packet
    zero_pages: int = 0
    vmdesc_devices: int = 0

    @property
    def ram_total(self) -> int:
        return sum(self.block_lengths.values())

    def block_infos(self) -> tuple[RamBlockInfo, ...]:
        return tuple(RamBlockInfo(n, used) for n, used in self.block_lengths.items())

    def close(self) -> None:
        for b in self.blocks.values():
            b.close()

    def __enter__(self) -> VmImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _RamState:
    started: bool = False
    ended: bool = False  # END section's footer seen
    in_end: bool = False
    section: SectionHeader | None = None


@dataclass
class StreamRecorder:
    """Incremental main-stream consumer that builds a `VmImage`.

    `on_blocks(blocks)` runs once the MEM_SIZE block list is parsed (RAM blocks exist,
    still zero); `on_marker(record)` runs at every RAM EOS and MULTIFD_FLUSH, in stream
    order (the incoming engine runs the multifd barrier there). `feed()` data, then
    `finish()` at EOF.
    """

    allow_multifd_flush: bool = True
    allow_switchover_start: bool = True
    on_blocks: Callable[[dict[str, RamBlock]], None] | None = None
    # Before any block is allocated: a mapped-ram reader checks the regions here (and
    # mapped-ram block entries are accepted only with it; qemu/mapped_ram.py).
    on_mem_size: Callable[[RamMemSize], None] | None = None
    on_marker: Callable[[object], None] | None = None
    page_size: int = PAGE_SIZE
    bytes_in: int = 0
    main_normal: int = 0
    main_zero: int = 0
    _dec: MainStreamDecoder = field(init=False)
    _prefix: bytearray = field(default_factory=bytearray, init=False)
    _config: Configuration | None = field(default=None, init=False)
    _config_raw: bytes = field(default=b"", init=False)
    _ram: _RamState = field(default_factory=_RamState, init=False)
    _ram_start: SectionHeader | None = field(default=None, init=False)
    _blocks: dict[str, RamBlock] = field(default_factory=dict, init=False)
    # Pages written so far, per block (the blocks start zero): ZERO records for the others
    # need no write and no look. Shared with the multifd Receiver (on_blocks).
    received: dict[str, np.ndarray] = field(default_factory=dict, init=False)
    _lengths: dict[str, int] = field(default_factory=dict, init=False)
    _switchover: bool = field(default=False, init=False)
    _tail: bytearray = field(default_factory=bytearray, init=False)

    def __post_init__(self) -> None:
        self._dec = MainStreamDecoder(
            ram=RamSettings(page_size=self.page_size,
                            allow_multifd_flush=self.allow_multifd_flush,
                            batch_zero_runs=True),
            opaque_tail=True,
            allow_switchover_start=self.allow_switchover_start,
        )

    # -- feeding ----------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Decode and apply everything complete in `data` (plus what was buffered)."""
        self.bytes_in += len(data)
        if self._config is None:
            self._prefix += data
        self._dec.receive_data(data)
        self._drain()

    def finish(self) -> VmImage:
        """The stream ended (EOF): check it is complete and return the image."""
        self._dec.receive_eof()
        self._drain()
        if not self._ram.ended:
            raise Truncated("stream ended before the ram section's END", offset=self._dec.offset)
        tail = bytes(self._tail)
        found = find_vmdesc(tail)
        if found is None:
            raise Truncated("device state does not end with QEMU_VM_EOF and the "
                            "VMDESCRIPTION (source aborted?)", offset=self._dec.offset)
        assert self._config is not None and self._ram_start is not None
        devices = found[1].get("devices", [])
        return VmImage(
            configuration=self._config_raw,
            machine=self._config.machine,
            uuid=self._config.uuid,
            ram_section_id=self._ram_start.section_id,
            ram_instance_id=self._ram_start.instance_id,
            ram_version_id=self._ram_start.version_id,
            blocks=self._blocks,
            block_lengths=self._lengths,
            switchover_start=self._switchover,
            tail=tail,
            vmdesc_devices=len(devices) if isinstance(devices, list) else 0,
        )

    @property
    def configuration(self) -> Configuration | None:
        return self._config

    @property
    def blocks(self) -> dict[str, RamBlock]:
        return self._blocks

    @property
    def decoder(self) -> MainStreamDecoder:
        """For a reader of a seekable file (mapped-ram: `seek_past_region`)."""
        return self._dec

    def close(self) -> None:
        """Free the RAM blocks (after a failure; a finished image owns them)."""
        for b in self._blocks.values():
            b.close()

    # -- records ----------------------------------------------------------------------
    def _drain(self) -> None:
        for rec in self._dec:
            self._apply(rec)

    def _apply(self, rec: object) -> None:
        pages = apply_page_record(self._blocks, self.received, rec)
        if pages is not None:
            self.main_normal += pages[0]
            self.main_zero += pages[1]
        elif isinstance(rec, RamEos | RamMultifdFlush):
            if self.on_marker is not None:
                self.on_marker(rec)
        elif isinstance(rec, DeviceTail):
            if not self._ram.ended:
                raise BadRecordType("a device section before the ram section ended (only "
                                    "RAM may be live)", offset=self._dec.tail_offset)
            self._tail += rec.data
        elif isinstance(rec, SectionHeader):
            self._section(rec)
        elif isinstance(rec, SectionFooter):
            if self._ram.in_end:
                self._ram.ended = True
                self._ram.in_end = False
        elif isinstance(rec, RamMemSize):
            self._mem_size(rec)
        elif isinstance(rec, Configuration):
            self._config = rec
            self._config_raw = bytes(self._prefix[8 : self._dec.offset])
            self._prefix = bytearray()
        elif isinstance(rec, CommandRecord):
            if rec.cmd != Command.SWITCHOVER_START:
                raise BadRecordType("unsupported command on the main stream (only "
                                    "precopy without a return path is supported)",
                                    field="cmd", value=rec.cmd)
            if not self._ram.started or self._ram.ended or self._ram.in_end:
                raise BadRecordType("SWITCHOVER_START outside the ram PART..END span",
                                    field="cmd", value=rec.cmd)
            self._switchover = True
        elif isinstance(rec, FileHeader):
            pass
        else:
            raise BadRecordType(f"unsupported record {type(rec).__name__} in the ram section")

    def _section(self, hdr: SectionHeader) -> None:
        if hdr.type == SectionType.START:
            if hdr.idstr != RAM_SECTION_IDSTR:  # pragma: no cover - the decoder goes opaque
                raise BadName("unexpected live section", field="idstr", value=hdr.idstr)
            if self._ram.started:
                raise Mismatch("a second ram START section")
            self._ram.started = True
            self._ram_start = hdr
        elif hdr.type == SectionType.END:
            self._ram.in_end = True
        elif hdr.type == SectionType.FULL:  # pragma: no cover - the decoder goes opaque
            raise BadName("unexpected FULL section", field="idstr", value=hdr.idstr)

    def _mem_size(self, rec: RamMemSize) -> None:
        if self._blocks:
            raise Mismatch("a second MEM_SIZE block list")
        if self.on_mem_size is not None:
            self.on_mem_size(rec)
        for info in rec.blocks:
            if info.page_size is not None or info.addr is not None or (
                    info.mapped_ram and self.on_mem_size is None):
                raise BadRecordType("RAM block list with postcopy/x-ignore-shared/mapped-ram "
                                    "extras is not supported", field="block", value=info.name)
            if info.used_length % self.page_size:
                raise Mismatch("RAM block length is not a whole number of pages",
                               field="used_length", value=info.used_length)
            self._lengths[info.name] = info.used_length
            self._blocks[info.name] = RamBlock(info.name, info.used_length,
                                               page_size=self.page_size)
        self.received = received_maps(self._blocks)
        if self.on_blocks is not None:
            self.on_blocks(self._blocks)


# ------------------------------------------------------------------------------ reading


def read_image(path: str | os.PathLike[str]) -> VmImage:
    """Load an image (any single-stream QEMU migration file of a paused RAM-only-live VM).

    Raises ImageError with a one-line message naming the file on malformed/truncated input.
    (`qemu.mapped_ram.read_any_image` also takes mapped-ram files.)
    """
    rec = StreamRecorder()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                rec.feed(chunk)
        img = rec.finish()
    except WireError as e:
        rec.close()
        at = f", at byte {e.offset}" if e.offset is not None else ""
        raise ImageError(f"{path}: {e.describe()}{at}") from None
    except BaseException:
        rec.close()
        raise
    img.normal_pages, img.zero_pages = rec.main_normal, rec.main_zero
    return img


# ------------------------------------------------------------------------------ writing


def zero_mask(block: RamBlock) -> np.ndarray:
    """Bool per page of `block`: True for all-zero pages (one chunked numpy scan)."""
    return block.zero_pages(np.arange(block.num_pages, dtype=np.int64))


def section_start(image: VmImage) -> bytes:
    """ram SECTION_START header and the MEM_SIZE block list (EOS and footer follow)."""
    hdr = SectionHeader(SectionType.START, image.ram_section_id, RAM_SECTION_IDSTR,
                        image.ram_instance_id, image.ram_version_id)
    return encode_record(hdr) + encode_ram_record(RamMemSize(image.ram_total,
                                                             image.block_infos()))


def section_open(image: VmImage, kind: SectionType) -> bytes:
    return encode_record(SectionHeader(kind, image.ram_section_id))


def section_close(image: VmImage) -> bytes:
    """EOS and the footer of the open ram section."""
    return encode_ram_record(RamEos()) + encode_record(SectionFooter(image.ram_section_id))


def page_records(block: RamBlock, used_length: int, *, zero: np.ndarray | None = None,
                 normal: bool = True, continues: bool = False) -> Iterator[bytes]:
    """ZERO records for the block's zero pages, then (with `normal`) PAGE records for the
    others, in runs. The first record names the block unless `continues`."""
    if zero is None:
        zero = zero_mask(block)
    npages = used_length // block.page_size
    zero = zero[:npages]
    ps = np.uint64(block.page_size)
    zidx = np.flatnonzero(zero)
    cont = continues
    if zidx.size:
        yield encode_zero_run(block.name, zidx.astype(np.uint64) * ps, first_continues=cont)
        cont = True
    if not normal:
        return
    nidx = np.flatnonzero(~zero)
    pages = block.pages
    for pos in range(0, nidx.size, RUN_PAGES):
        part = nidx[pos : pos + RUN_PAGES]
        yield encode_page_run(block.name, part.astype(np.uint64) * ps, pages[part],
                              first_continues=cont)
        cont = True


def image_chunks(image: VmImage) -> Iterator[bytes]:
    """The image as one QEMU migration stream, in chunks (file or single socket)."""
    yield encode_record(FileHeader()) + image.configuration
    yield section_start(image) + section_close(image)
    yield section_open(image, SectionType.PART)
    for name, block in image.blocks.items():
        yield from page_records(block, image.block_lengths[name])
    yield section_close(image)
    if image.switchover_start:
        yield SWITCHOVER_START
    yield section_open(image, SectionType.END) + section_close(image)
    yield image.tail


def write_image(image: VmImage, path: str | os.PathLike[str]) -> int:
    """Write `image` to `path` (atomically: a temp file renamed); returns its size."""
    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in image_chunks(image):
                f.write(chunk)
                size += len(chunk)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size
