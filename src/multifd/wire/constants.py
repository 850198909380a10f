"""QEMU migration constants, in one place (qemu-reference.md appendix A).

Sources: migration/savevm.h, migration/savevm.c, migration/ram.c, migration/multifd.h,
hw/vfio/migration-multifd.c. Values are the same in QEMU 7.2 and 10.x unless noted.
"""

from __future__ import annotations

import enum

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2


class SectionType(enum.IntEnum):
    """Record type bytes of the main stream (savevm.h)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Command(enum.IntEnum):
    """QEMU_VM_COMMAND ids (savevm.c). SWITCHOVER_START exists only from QEMU 10.0."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


# Fixed payload lengths of commands (-1: variable; POSTCOPY_ADVISE is 16 or 0).
COMMAND_LENGTHS: dict[int, int] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: -1,
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: -1,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: -1,
    Command.SWITCHOVER_START: 0,
}


class RamFlag(enum.IntFlag):
    """RAM_SAVE_FLAG_* (ram.c): the low bits of every RAM record word."""

    FULL = 0x001
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


RAM_FLAG_MASK = 0x3FF  # flags must stay below the 1 KiB minimum target page
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4
XBZRLE_ENCODING_FLAG = 0x01

TARGET_PAGE_SIZE = 4096  # x86-64
TARGET_PAGE_BITS = 12

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_PACKET_SIZE = 512 * 1024
MULTIFD_INIT_PACKET_SIZE = 64
MULTIFD_PACKET_HEADER_SIZE = 320  # before the offset array
MULTIFD_DEVICE_STATE_HEADER_SIZE = 276
MULTIFD_COMMON_HEADER_SIZE = 12  # magic, version, flags
MULTIFD_IDSTR_SIZE = 256
# The receiver's compressed-payload buffer is 2 x MULTIFD_PACKET_SIZE (multifd-zlib.c).
MULTIFD_MAX_COMPRESSED_PAYLOAD = 2 * MULTIFD_PACKET_SIZE


def page_count(page_size: int = TARGET_PAGE_SIZE) -> int:
    """Offsets per multifd RAM packet: MULTIFD_PACKET_SIZE / target page size."""
    return MULTIFD_PACKET_SIZE // page_size


def ram_packet_len(page_size: int = TARGET_PAGE_SIZE) -> int:
    """Header plus the whole offset array, always sent in full (1344 on x86)."""
    return MULTIFD_PACKET_HEADER_SIZE + 8 * page_count(page_size)


class MultifdFlag(enum.IntFlag):
    """MULTIFD_FLAG_* (multifd.h). The compression field is 0x0E in 7.2, 0x3E in 10.x."""

    SYNC = 0x01
    NOCOMP = 0x00
    ZLIB = 0x02
    ZSTD = 0x04
    QPL = 0x08
    UADK = 0x10
    QATZIP = 0x20
    DEVICE_STATE = 0x40


MULTIFD_COMPRESSION_MASK_V7_2 = 0x0E
MULTIFD_COMPRESSION_MASK_HEAD = 0x3E


class PacketLayout(enum.Enum):
    """Which RAM packet header layout a peer speaks.

    V7_2: bytes 32..35 are unused (zero pages travel on the main stream).
    HEAD: bytes 32..35 are zero_pages; zero offsets follow the normal ones; device-state
    packets (flag 0x40) exist.
    """

    V7_2 = "7.2"
    HEAD = "head"


# Device-state buffer header (hw/vfio/migration-multifd.c): version, idx, flags.
DEVICE_STATE_BUFFER_HEADER_SIZE = 12
DEVICE_STATE_BUFFER_VERSION = 0
DEVICE_STATE_FLAG_CONFIG_STATE = 0x1

# mapped-ram (ram.c)
MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HEADER_SIZE = 28
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000
