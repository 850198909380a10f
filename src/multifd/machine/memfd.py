"""Memory backing for RAM blocks: anonymous, or a memfd whose pages another process can map.

A cpr-transfer handover (migration/cpr.py) passes a memfd-backed block's fd to the new
process instead of copying its pages (QEMU's memory-backend-memfd / aux-ram-share=on).
The new process already declared its blocks (the application holds numpy views of them),
so `adopt` maps the received memfd over the block's existing address range (MAP_FIXED):
every view the application holds now sees the handed-over pages, no pointer changes.
`detach` does the reverse on the old process after a handover: its range becomes a
private copy-on-write mapping of the memfd, so a stray write there can never reach the
pages the new process runs on.

Facts relied on (mmap(2), memfd_create(2)): a MAP_FIXED mapping atomically replaces
whatever was mapped in its range; a mapping keeps its file alive after the fd is closed;
shmem (memfd) does not use transparent huge pages unless
/sys/kernel/mm/transparent_hugepage/shmem_enabled says so.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from typing import Any

__all__ = ["BACKINGS", "adopt", "allocate", "block_address", "detach", "fd_of", "is_memfd",
           "memfd_size"]

BACKINGS = ("anon", "memfd")
_MAP_FIXED = 0x10  # <linux/mman.h>; Python's mmap module does not export it
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]


def allocate(name: str, length: int, backing: str) -> tuple[mmap.mmap, int | None]:
    """A new zeroed mapping of `length` bytes and its memfd (None for "anon")."""
    if backing == "anon":
        return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), None
    if backing != "memfd":
        raise ValueError(f"RAM block backing must be one of {', '.join(BACKINGS)}, "
                         f"got {backing!r}")
    fd = os.memfd_create(f"multifd:{name}"[:249], os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED), fd
    except BaseException:
        os.close(fd)
        raise


def block_address(block: Any) -> int:
    """Start address of a block's mapping (its numpy view's data pointer)."""
    return int(block.array.ctypes.data)


def is_memfd(fd: int) -> bool:
    """True for shared memory that can back a block (a memfd, or a tmpfs / hugetlbfs
    file: the files that answer F_GET_SEALS), not a disk file or socket a peer passed."""
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return True


def memfd_size(fd: int) -> int:
    """Size of the file behind `fd` (the pages a received memfd can back)."""
    return os.fstat(fd).st_size


def _map_fixed(addr: int, length: int, fd: int, flags: int) -> None:
    got = _libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE, flags | _MAP_FIXED,
                     fd, 0)
    if got in (None, _MAP_FAILED) or got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap(MAP_FIXED) of a memfd over a RAM block failed: "
                           f"{os.strerror(err)}")


def adopt(block: Any, fd: int) -> None:
    """Back `block` with the memfd `fd` (taking ownership of it): its range now maps the
    same pages as every other mapping of that memfd; its previous contents are gone."""
    size = memfd_size(fd)
    if size < block.used_length:
        raise ValueError(f"memfd for RAM block {block.name!r} has {size} bytes, the block "
                         f"needs {block.used_length}")
    _map_fixed(block_address(block), block.used_length, fd, mmap.MAP_SHARED)
    old, block._fd = block._fd, fd
    if old is not None and old != fd:
        os.close(old)
    block.remapped()  # kernel write tracking registered the old mapping


def detach(block: Any) -> None:
    """After a handover: make `block`'s range a private copy-on-write view of its memfd,
    so this process's writes stay here, and drop the fd (the pages are the new owner's:
    this block can never hand them over again)."""
    fd, block._fd = block._fd, None
    if fd is not None:
        _map_fixed(block_address(block), block.used_length, fd, mmap.MAP_PRIVATE)
        os.close(fd)
        block.remapped()


def fd_of(block: Any) -> int | None:
    """The memfd backing `block` (None when anonymous or detached); the block owns it."""
    return block._fd  # type: ignore[no-any-return]
