"""A recorded VM image as a mapped-ram file: read (QEMU's or ours) and write (QEMU loads it).

QEMU source: migration/ram.c (`mapped_ram_setup_ramblock`, `ram_save_file_bmap`,
`parse_ramblock_mapped_ram`); layout in wire/mapped_ram.py. The file is what QEMU 10.0's
`migrate file:PATH` writes with the `mapped-ram` capability::

    QEVM v3 | configuration (+ capabilities subsection: mapped-ram) |
    01 sid "ram" inst ver | MEM_SIZE | per block: entry, header, [bitmap, pad, pages] |
    EOS | 7E sid | 02 sid EOS 7E sid | [08 000b 0000] | 03 sid EOS 7E sid | device tail

A `VmImage` holds its configuration without the mapped-ram capability (an image is the
same VM whatever its file format); writing a mapped-ram file adds it, reading one takes it
out. Pages go through `migration.mapped_ram` (N channels, pwritev/preadv straight from or
into the blocks; zero pages are holes, missing from the bitmap).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from multifd.migration.mainstream import MainStreamWriter
from multifd.migration.mapped_ram import (
    CAPABILITY,
    MappedRamError,
    MappedRamInput,
    MappedRamOutput,
    save_blocks,
    seek_past_region,
)
from multifd.qemu.image import (
    PAGE_SIZE,
    SWITCHOVER_START,
    ImageError,
    StreamRecorder,
    VmImage,
    read_image,
    section_close,
    section_open,
)
from multifd.wire.buffer import NEED_DATA
from multifd.wire.constants import RAM_SECTION_IDSTR, SectionType
from multifd.wire.errors import Mismatch, WireError
from multifd.wire.ram import RamMemSize
from multifd.wire.stream import (
    Configuration,
    FileHeader,
    MainStreamDecoder,
    SectionHeader,
    encode_configuration,
    encode_record,
)

__all__ = [
    "DEFAULT_CHANNELS",
    "configuration_with",
    "is_mapped_ram_file",
    "read_any_image",
    "read_mapped_ram_image",
    "write_mapped_ram_image",
]

DEFAULT_CHANNELS = 4
_PROBE = 64 * 1024  # the header and configuration are far shorter


def _decode_configuration(raw: bytes) -> Configuration:
    dec = MainStreamDecoder(opaque_tail=True)
    dec.receive_data(encode_record(FileHeader()) + raw)
    dec.receive_eof()  # the section may end only where the data does
    try:
        while (rec := dec.next_record()) is not NEED_DATA:
            if isinstance(rec, Configuration):
                return rec
    except WireError as e:
        raise ImageError(f"the image's configuration section does not decode: {e}") from None
    raise ImageError("the image has no configuration section")


def configuration_with(raw: bytes, mapped_ram: bool) -> bytes:
    """The configuration section `raw` with the mapped-ram capability listed or not (QEMU
    validates it: both ends must agree). Other subsections are kept."""
    cfg = _decode_configuration(raw)
    caps = [c for c in (cfg.capabilities or ()) if c != CAPABILITY]
    if mapped_ram:
        caps.append(CAPABILITY)
    return encode_configuration(replace(cfg, capabilities=tuple(caps) or None))


def is_mapped_ram_file(path: str | os.PathLike[str]) -> bool:
    """True when the file's configuration lists the mapped-ram capability."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PROBE)
    except OSError:
        return False
    dec = MainStreamDecoder(opaque_tail=True)
    dec.receive_data(head)
    try:
        while (rec := dec.next_record()) is not NEED_DATA:
            if isinstance(rec, Configuration):
                return CAPABILITY in (rec.capabilities or ())
            if isinstance(rec, SectionHeader):
                return False
    except WireError:
        return False
    return False


def read_any_image(path: str | os.PathLike[str], channels: int = DEFAULT_CHANNELS) -> VmImage:
    """An image from a stream file (`read_image`) or a mapped-ram file (QEMU's or ours)."""
    if is_mapped_ram_file(path):
        return read_mapped_ram_image(path, channels)
    return read_image(path)


def read_mapped_ram_image(path: str | os.PathLike[str],
                          channels: int = DEFAULT_CHANNELS) -> VmImage:
    """Load a mapped-ram file as a VmImage: main stream decoded with seeks past every
    block region, each block's present pages read on `channels` parallel fds."""
    try:
        src = MappedRamInput(str(path), channels)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror or e}") from None
    infos: list[RamMemSize] = []

    def on_mem_size(rec: RamMemSize) -> None:
        cfg = recorder.configuration
        if cfg is None or CAPABILITY not in (cfg.capabilities or ()):
            raise Mismatch("mapped-ram block list in a stream without the capability")
        src.check_blocks(rec, PAGE_SIZE)  # before any block is allocated
        infos.append(rec)

    def on_blocks(blocks: dict) -> None:  # type: ignore[type-arg]
        present, absent = src.load_blocks(blocks, infos[0].blocks, recorder.received)
        counts[:] = [present, absent]

    counts = [0, 0]
    recorder = StreamRecorder(on_mem_size=on_mem_size, on_blocks=on_blocks)
    try:
        pos = 0
        while chunk := os.pread(src.fd, 1 << 20, pos):
            pos += len(chunk)
            recorder.feed(chunk)
            pos = seek_past_region(recorder.decoder, pos, src.size)
        img = recorder.finish()
    except WireError as e:
        recorder.close()
        at = f", at byte {e.offset}" if e.offset is not None else ""
        raise ImageError(f"{path}: {e.describe()}{at}") from None
    except MappedRamError as e:
        recorder.close()
        raise ImageError(f"{path}: {e}") from None
    except BaseException:
        recorder.close()
        raise
    finally:
        src.close()
    img.configuration = configuration_with(img.configuration, False)
    img.normal_pages, img.zero_pages = counts
    return img


def write_mapped_ram_image(image: VmImage, path: str | os.PathLike[str],
                           channels: int = DEFAULT_CHANNELS, *,
                           direct_io: bool = False) -> int:
    """Write `image` as a mapped-ram file (atomically: a temp file renamed), the pages on
    `channels` parallel fds; returns the file's apparent size."""
    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    try:
        out = MappedRamOutput(str(tmp), channels, direct_io=direct_io)
        try:
            main = MainStreamWriter(out.send)
            main.write(encode_record(FileHeader())
                       + configuration_with(image.configuration, True))
            main.write(encode_record(SectionHeader(
                SectionType.START, image.ram_section_id, RAM_SECTION_IDSTR,
                image.ram_instance_id, image.ram_version_id)))
            blocks = [image.blocks[n] for n in image.block_lengths]
            regions = out.write_block_list(
                main, [(n, u) for n, u in image.block_lengths.items()], PAGE_SIZE)
            save_blocks(out, blocks, regions)
            main.write(section_close(image))
            main.write(section_open(image, SectionType.PART) + section_close(image))
            if image.switchover_start:
                main.write(SWITCHOVER_START)
            main.write(section_open(image, SectionType.END) + section_close(image))
            main.write(image.tail)
            main.flush()
            size = out.tell()
        finally:
            out.close()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size
