"""The tiny boot-sector guest of shared/qemu72-peer.md §2.2, built without a toolchain.

A 512-byte x86 boot sector, hand-assembled here (each instruction's bytes are written out
below with its mnemonic), that SeaBIOS loads at 0x7c00. It disables interrupts, enables A20
through port 0x92, loads a flat GDT, enters 32-bit protected mode and then loops forever:

    pass = 0
    forever:
        pass += 1
        for page in 0 .. wss_pages-1:                      # working set at 16 MiB
            t0 = rdtsc
            *(u32 *)(WSS_BASE + page*4096 + 0) = pass
            *(u32 *)(WSS_BASE + page*4096 + 4) = page
            *(u32 *)(WSS_BASE + page*4096 + 8) = GUEST_MAGIC    # "MFDG"
            while rdtsc - t0 < ticks_per_page: pass           # pacing; 0 = flat out

So a consistent snapshot of the working set has pages [0, k) at pass p and [k, N) at p-1
(or all at p), page i carrying i and the magic; `check_working_set` verifies exactly that.
`image()` puts the sector in front of a zero-filled 1 MiB raw disk for `-drive
file=...,format=raw,if=ide,index=0` (the matching argv is `drive_args`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WSS_BASE = 0x1000000  # 16 MiB
PAGE_SIZE = 4096
GUEST_MAGIC = 0x4744464D  # b"MFDG" little-endian
IMAGE_SIZE = 1 << 20
LOAD_ADDR = 0x7C00
CODE_SEL = 0x08
DATA_SEL = 0x10


class _Asm:
    """Bytes with labels and 8-bit relative / 16/32-bit absolute fixups (two passes)."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, str]] = []  # (position, label, kind)

    def emit(self, *parts: bytes | int) -> None:
        for p in parts:
            self.code += bytes([p]) if isinstance(p, int) else p

    def label(self, name: str) -> None:
        self.labels[name] = self.origin + len(self.code)

    def rel8(self, name: str) -> None:
        self.fixups.append((len(self.code), name, "rel8"))
        self.code.append(0)

    def abs16(self, name: str) -> None:
        self.fixups.append((len(self.code), name, "abs16"))
        self.code += b"\0\0"

    def abs32(self, name: str) -> None:
        self.fixups.append((len(self.code), name, "abs32"))
        self.code += b"\0\0\0\0"

    def align(self, n: int) -> None:
        while (self.origin + len(self.code)) % n:
            self.code.append(0x90)  # nop

    def link(self) -> bytes:
        for pos, name, kind in self.fixups:
            target = self.labels[name]
            if kind == "rel8":
                disp = target - (self.origin + pos + 1)
                if not -128 <= disp <= 127:
                    raise ValueError(f"jump to {name} out of rel8 range")
                self.code[pos] = disp & 0xFF
            elif kind == "abs16":
                self.code[pos:pos + 2] = struct.pack("<H", target)
            else:
                self.code[pos:pos + 4] = struct.pack("<I", target)
        return bytes(self.code)


def boot_sector(wss_pages: int = 256, ticks_per_page: int = 0) -> bytes:
    """The 512-byte boot sector (ends in 55 aa) for a working set of `wss_pages` pages."""
    if not 1 <= wss_pages <= (0xFFFFFFFF - WSS_BASE) // PAGE_SIZE:
        raise ValueError(f"wss_pages out of range: {wss_pages}")
    if not 0 <= ticks_per_page <= 0xFFFFFFFF:
        raise ValueError(f"ticks_per_page out of range: {ticks_per_page}")
    a = _Asm(LOAD_ADDR)
    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    # ---- 16-bit real mode -------------------------------------------------------------
    a.emit(0xFA)                                  # cli
    a.emit(0x31, 0xC0)                            # xor ax, ax
    a.emit(0x8E, 0xD8)                            # mov ds, ax
    a.emit(0x8E, 0xD0)                            # mov ss, ax
    a.emit(0xBC, b"\x00\x7c")                     # mov sp, 0x7c00
    a.emit(0xE4, 0x92)                            # in al, 0x92       (fast A20 gate)
    a.emit(0x0C, 0x02)                            # or al, 2          (A20 on)
    a.emit(0x24, 0xFE)                            # and al, 0xfe      (never reset)
    a.emit(0xE6, 0x92)                            # out 0x92, al
    a.emit(0x0F, 0x01, 0x16)                      # lgdt [gdtr]       (modrm: disp16)
    a.abs16("gdtr")
    a.emit(0x0F, 0x20, 0xC0)                      # mov eax, cr0
    a.emit(0x66, 0x83, 0xC8, 0x01)                # or eax, 1         (PE)
    a.emit(0x0F, 0x22, 0xC0)                      # mov cr0, eax
    a.emit(0x66, 0xEA)                            # jmp dword CODE_SEL:pm32
    a.abs32("pm32")
    a.emit(struct.pack("<H", CODE_SEL))
    # ---- 32-bit protected mode, flat segments -------------------------------------------
    a.label("pm32")
    a.emit(0x66, 0xB8, struct.pack("<H", DATA_SEL))  # mov ax, DATA_SEL
    a.emit(0x8E, 0xD8)                            # mov ds, ax
    a.emit(0x8E, 0xC0)                            # mov es, ax
    a.emit(0x8E, 0xD0)                            # mov ss, ax
    a.emit(0xBC, u32(LOAD_ADDR))                  # mov esp, 0x7c00
    a.emit(0x31, 0xDB)                            # xor ebx, ebx      (ebx = pass)
    a.label("outer")
    a.emit(0x43)                                  # inc ebx
    a.emit(0xBF, u32(WSS_BASE))                   # mov edi, WSS_BASE (edi = page address)
    a.emit(0x31, 0xC9)                            # xor ecx, ecx      (ecx = page index)
    a.label("inner")
    a.emit(0x0F, 0x31)                            # rdtsc             (edx:eax)
    a.emit(0x89, 0xC6)                            # mov esi, eax      (t0, low 32 bits)
    a.emit(0x89, 0x1F)                            # mov [edi], ebx
    a.emit(0x89, 0x4F, 0x04)                      # mov [edi+4], ecx
    a.emit(0xC7, 0x47, 0x08, u32(GUEST_MAGIC))    # mov dword [edi+8], GUEST_MAGIC
    a.emit(0x81, 0xC7, u32(PAGE_SIZE))            # add edi, 4096
    a.emit(0x41)                                  # inc ecx
    a.label("pace")
    a.emit(0x0F, 0x31)                            # rdtsc
    a.emit(0x29, 0xF0)                            # sub eax, esi      (ticks since t0, wraps ok)
    a.emit(0x3D, u32(ticks_per_page))             # cmp eax, ticks_per_page
    a.emit(0x72)                                  # jb pace
    a.rel8("pace")
    a.emit(0x81, 0xF9, u32(wss_pages))            # cmp ecx, wss_pages
    a.emit(0x72)                                  # jb inner
    a.rel8("inner")
    a.emit(0xEB)                                  # jmp outer
    a.rel8("outer")
    # ---- data: GDT (null, 4 GiB code 0x9a, 4 GiB data 0x92; G=1, D=1) and its pointer ---
    a.align(8)
    a.label("gdt")
    a.emit(bytes(8))
    a.emit(bytes([0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xCF, 0x00]))
    a.emit(bytes([0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92, 0xCF, 0x00]))
    a.label("gdtr")
    a.emit(struct.pack("<H", 3 * 8 - 1))          # limit
    a.abs32("gdt")                                # base
    code = a.link()
    if len(code) > 510:
        raise AssertionError("boot sector code too long")
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def image(path: Path | str, wss_pages: int = 256, ticks_per_page: int = 0) -> Path:
    """Write the 1 MiB raw IDE disk image holding the boot sector; return its path."""
    p = Path(path)
    with open(p, "wb") as f:
        f.write(boot_sector(wss_pages, ticks_per_page))
        f.truncate(IMAGE_SIZE)
    return p


def drive_args(path: Path | str) -> list[str]:
    """QEMU argv that boots the image (SeaBIOS takes a few seconds to hand over)."""
    return ["-drive", f"file={path},format=raw,if=ide,index=0"]


@dataclass(frozen=True)
class WorkingSet:
    """What a snapshot of the working set says: started, current pass, consistency."""

    started: bool  # page 0 carries the magic
    max_pass: int
    min_pass: int
    consistent: bool  # the shape described in the module docstring
    problem: str = ""


def check_working_set(data: bytes | memoryview, wss_pages: int) -> WorkingSet:
    """Inspect `wss_pages * 4096` bytes read from WSS_BASE (pmemsave)."""
    if len(data) < wss_pages * PAGE_SIZE:
        raise ValueError("working-set snapshot too short")
    words = np.frombuffer(data, dtype="<u4", count=wss_pages * PAGE_SIZE // 4)
    heads = words.reshape(wss_pages, PAGE_SIZE // 4)[:, :3]
    passes, index, magic = heads[:, 0].astype(np.int64), heads[:, 1], heads[:, 2]
    started = bool(magic[0] == GUEST_MAGIC)
    if not started:
        return WorkingSet(False, 0, 0, False, "page 0 has no magic: guest not started")
    hi, lo = int(passes.max()), int(passes.min())
    written = magic == GUEST_MAGIC
    if hi == 1 and not written.all():  # first pass still running: a written prefix
        k = int(np.argmin(written))
        if written[k:].any():
            return WorkingSet(True, hi, lo, False, "unwritten page before a written one")
        written_idx = np.arange(k)
        ok = bool((index[:k] == written_idx).all() and (passes[:k] == 1).all())
        return WorkingSet(True, 1, 0, ok, "" if ok else "bad page header in first pass")
    if not written.all():
        return WorkingSet(True, hi, lo, False, f"{int((~written).sum())} pages without magic")
    if not (index == np.arange(wss_pages)).all():
        return WorkingSet(True, hi, lo, False, "page index mismatch")
    if hi - lo > 1:
        return WorkingSet(True, hi, lo, False, f"passes span {lo}..{hi}")
    # non-increasing: a prefix at hi, the rest at lo
    ok = bool((np.diff(passes) <= 0).all())
    return WorkingSet(True, hi, lo, ok, "" if ok else "pass counters not a prefix")
