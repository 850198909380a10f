"""Helpers shared by the benchmark scripts: the random blob, the memory warm-up, CPU seconds,
median/min/max figures and the generated sections of bench/README.md."""

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
    """Median user+sys CPU seconds of the source and the destination over `runs` (see
    cpu_spread); None when a side has none."""
    both = cpu_spread(runs)
    return None if both is None else {side: fig["median"] for side, fig in both.items()}


def spread(values: list[float], nd: int = 3) -> dict[str, float] | None:
    """{"median", "min", "max"} of `values` (None when there are none): every benchmark
    figure is reported with its spread over the interleaved runs."""
    if not values:
        return None
    return {"median": round(statistics.median(values), nd), "min": round(min(values), nd),
            "max": round(max(values), nd)}


def cpu_spread(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """spread() of the source's and the destination's user+sys CPU seconds over `runs`
    (each with `src_cpu_s` / `dst_cpu_s` as cpu_since gives them); None when a side has none."""
    out = {}
    for side in ("src", "dst"):
        vals = [c["user"] + c["sys"] for r in runs if (c := r.get(f"{side}_cpu_s"))]
        if not vals:
            return None
        out[side] = spread(vals)
    return out


def update_section(path: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in `path` (the
    section a benchmark's --markdown regenerates); append the section when it is missing."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old.split(begin, 1)[1]:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)
