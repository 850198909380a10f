"""Helpers shared by the benchmark scripts: the random blob, the memory warm-up, CPU seconds."""

from __future__ import annotations

import hashlib
import mmap
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20


def make_blob(path: Path, size: int) -> str:
    """`size` random bytes from os.urandom into `path`; returns their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(64 * MiB, left))
            h.update(b)
            f.write(b)
            left -= len(b)
    return h.hexdigest()


def warm_memory(size: int) -> None:
    """Touch `size` bytes of fresh anonymous memory, then free it.

    On a VM whose host reclaims the guest's free pages (balloon / free page reporting), the
    first touch of a page the host took back costs ~1.5 s/GiB, the next one ~0.2 s/GiB.
    Which of the two a run's destination gets is luck, and it dominates a 1 GiB migration.
    The host takes freed pages back within seconds. Warming right before every run (ours
    and QEMU's alike) hands each the same, host-backed memory, so the runs compare the
    migrations instead of the host's page reclaim. `--warm-mib 0` measures cold.
    """
    if size <= 0:
        return
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)  # 2 MiB faults: a 2 GiB warm-up takes ~0.3 s, not ~2 s
    pages = np.frombuffer(m, dtype=np.uint8)
    pages[:: mmap.PAGESIZE] = 1
    del pages
    m.close()


def proc_cpu(pid: int) -> dict[str, float]:
    """User and system CPU seconds process `pid` has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"user": int(fields[11]) / tick, "sys": int(fields[12]) / tick}


def cpu_since(pid: int, before: dict[str, float]) -> dict[str, float]:
    """CPU seconds `pid` used since `before` (a proc_cpu result)."""
    now = proc_cpu(pid)
    return {k: round(now[k] - before[k], 3) for k in ("user", "sys")}


def cpu_medians(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Median user+sys CPU seconds of the source and the destination over `runs` (each
    with `src_cpu_s` / `dst_cpu_s` as cpu_since gives them); None when a side has none."""
    out = {}
    for side in ("src", "dst"):
        vals = [c["user"] + c["sys"] for r in runs if (c := r.get(f"{side}_cpu_s"))]
        if not vals:
            return None
        out[side] = round(statistics.median(vals), 3)
    return out
