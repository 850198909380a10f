"""The demo machine and its deterministic workload (``multifd demo``, QMP ``serve``).

Machine: RAM block ``pc.ram`` (``ram_size``) plus a 256 KiB ``pc.bios``, a ``CpuDevice``
(``cpu``: seed, step counter, workload parameters and an accumulator register; a small
main-stream section) and optionally a ``BigStateDevice`` (``bigstate``: large state, a hot
part of which changes every step; it travels over multifd or the main stream).

Workload step ``k`` depends only on ``(seed, k)`` and the memory it reads, never on timing:
it picks ``pages_per_step`` pages with a counter-based hash, replaces each byte ``x`` by
``3x + d(k)`` (mod 256; the order of steps matters), sometimes zeroes a page, touches the
BIOS block every 16 steps and a 4 KiB slice of the device's hot part, folds the pages it
wrote into the cpu accumulator and advances the step counter. So a run paused, migrated and
finished elsewhere ends with the same checksum as :func:`expected_checksum`.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .device import Device, DeviceStateError, StateBufferQueue
from .machine import Machine
from .ramblock import RamBlock

__all__ = [
    "BIOS_BLOCK",
    "RAM_BLOCK",
    "BigStateDevice",
    "CpuDevice",
    "DemoWorkload",
    "build_demo_machine",
    "expected_checksum",
]

GiB = 1 << 30
MiB = 1 << 20
RAM_BLOCK = "pc.ram"
BIOS_BLOCK = "pc.bios"
BIOS_SIZE = 256 << 10
_REGION = 1 << 20  # initial-content pattern granularity
_MASK = (1 << 64) - 1


# -- deterministic hashing (splitmix64, vectorised) ------------------------------------------

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix_int(*values: int) -> int:
    """Scalar splitmix64 chained over ``values`` (same function as :func:`_mix`)."""
    acc = 0
    for v in values:
        x = ((acc ^ v) + 0x9E3779B97F4A7C15) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        acc = x ^ (x >> 31)
    return acc


def _fill(arr: np.ndarray, seed: int, salt: int) -> None:
    """Deterministic initial content of a freshly zeroed ``arr``: 1 MiB regions, half random,
    a quarter zero (left untouched), a quarter low-entropy (compressible). Generated from one
    random 1 MiB pool XORed per region, so 1 GiB takes a fraction of a second."""
    n = arr.shape[0]
    pool_words = np.random.Generator(np.random.PCG64([seed, salt])).bit_generator.random_raw(
        _REGION // 8
    ).astype(np.uint64)
    pool = pool_words.view(np.uint8)
    nregions = -(-n // _REGION)
    keys = _mix(np.arange(nregions, dtype=np.uint64) + np.uint64(_mix_int(seed, salt)))
    low = np.uint64(0x0707070707070707)
    for r in range(nregions):
        start = r * _REGION
        end = min(n, start + _REGION)
        key = keys[r]
        kind = int(key % np.uint64(8))
        if kind >= 6:
            continue  # zero region: fresh memory already is
        if (end - start) % 8 == 0:
            dst = arr[start:end].view(np.uint64)
            np.bitwise_xor(pool_words[: dst.shape[0]], key, out=dst)
            if kind >= 4:
                dst &= low
        else:
            arr[start:end] = pool[: end - start] ^ np.uint8(int(key) & 0xFF)
            if kind >= 4:
                arr[start:end] &= 7


# -- devices ------------------------------------------------------------------------------

class CpuDevice(Device):
    """The workload's "vCPU": step counter, parameters and an accumulator register."""

    _FMT = struct.Struct(">4sQQQIQ")
    _MAGIC = b"CPU0"

    def __init__(
        self, *, seed: int = 1, total_steps: int = 0, pages_per_step: int = 64
    ) -> None:
        self.idstr = "cpu"
        self.instance_id = 0
        self.version_id = 1
        self.seed = seed
        self.step = 0
        self.total_steps = total_steps
        self.pages_per_step = pages_per_step
        self.acc = 0

    def save_state(self) -> bytes:
        return self._FMT.pack(
            self._MAGIC, self.seed & _MASK, self.step, self.total_steps,
            self.pages_per_step, self.acc,
        )

    def load_state(self, data: bytes, version_id: int) -> None:
        if version_id != 1:
            raise DeviceStateError(f"cpu: unsupported state version {version_id}")
        if len(data) != self._FMT.size:
            raise DeviceStateError(f"cpu: state is {len(data)} bytes, expected {self._FMT.size}")
        magic, seed, step, total, pps, acc = self._FMT.unpack(data)
        if magic != self._MAGIC:
            raise DeviceStateError(f"cpu: bad state magic {magic!r}")
        if pps < 1:
            raise DeviceStateError(f"cpu: bad parameters pages_per_step={pps}")
        self.seed, self.step, self.total_steps, self.pages_per_step, self.acc = (
            seed, step, total, pps, acc,
        )


class BigStateDevice(Device):
    """A device with large state (think GPU buffers) cut into chunks with dirty tracking.

    Bulk state moves as records ``offset:u64 length:u32 data`` (big-endian), one chunk per
    multifd buffer or several per main-stream PART section; the CONFIG_STATE buffer (and the
    setup/main-stream section) carries ``magic size:u64 chunk_size:u32``.
    """

    _REC = struct.Struct(">QI")
    _CFG = struct.Struct(">8sQI")
    _MAGIC = b"BIGSTATE"

    def __init__(
        self,
        size: int,
        *,
        idstr: str = "bigstate",
        seed: int = 1,
        chunk_size: int = 1 << 20,
        hot_fraction: float = 1 / 8,
        via_multifd: bool = True,
        populate: bool = True,
        iterate_bytes: int = 8 << 20,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        if size <= 0 or chunk_size <= 0:
            raise ValueError("device state size and chunk size must be positive")
        self.idstr = idstr
        self.instance_id = 0
        self.version_id = 1
        self.size = size
        self.chunk_size = chunk_size
        self.num_chunks = -(-size // chunk_size)
        self.via_multifd = via_multifd
        self.iterate_bytes = iterate_bytes
        self.data = np.zeros(size, dtype=np.uint8)
        if populate:
            _fill(self.data, seed, 0xB16)
        self.hot_len = max(min(size, 4096), int(size * hot_fraction) // 4096 * 4096)
        self._lock = threading.Lock()
        self._dirty = np.ones(self.num_chunks, dtype=bool)
        self.queue = StateBufferQueue(idstr, max_pending_bytes=max_pending_bytes)
        self._got_buffers = False

    # -- workload side --------------------------------------------------------------------

    def mutate(self, seed: int, k: int) -> None:
        """Step ``k``'s change: a 4 KiB slice of the hot part, x -> 3x + d(k)."""
        span = min(4096, self.hot_len)
        slots = max(1, self.hot_len // span)
        off = (_mix_int(seed, k, 0xD5) % slots) * span
        part = self.data[off : off + span]
        part *= np.uint8(3)
        part += np.uint8((k * 13 + 5) & 0xFF)
        first, last = off // self.chunk_size, (off + span - 1) // self.chunk_size
        with self._lock:
            self._dirty[first : last + 1] = True

    # -- source side ----------------------------------------------------------------------

    def _take_dirty(self, limit: int | None) -> np.ndarray:
        with self._lock:
            idx = np.flatnonzero(self._dirty)
            if limit is not None:
                idx = idx[:limit]
            self._dirty[idx] = False
        return idx

    def _encode(self, chunk: int) -> bytearray:
        off = chunk * self.chunk_size
        length = min(self.chunk_size, self.size - off)
        buf = bytearray(self._REC.size + length)
        self._REC.pack_into(buf, 0, off, length)
        memoryview(buf)[self._REC.size :] = self.data[off : off + length].data
        return buf

    def _config(self) -> bytes:
        return self._CFG.pack(self._MAGIC, self.size, self.chunk_size)

    def is_live(self) -> bool:
        return True

    def uses_multifd_state(self) -> bool:
        return self.via_multifd

    def pending(self) -> int:
        with self._lock:
            count = int(np.count_nonzero(self._dirty))
            last_dirty = bool(self._dirty[-1])
        total = count * self.chunk_size
        if last_dirty:
            total -= self.num_chunks * self.chunk_size - self.size
        return total

    def save_setup(self) -> bytes:
        with self._lock:
            self._dirty[:] = True
        return self._config()

    def save_iterate(self, final: bool) -> tuple[bytes, bool]:
        per_call = max(1, self.iterate_bytes // self.chunk_size)
        parts = [self._encode(int(c)) for c in self._take_dirty(per_call)]
        return b"".join(parts), self.pending() == 0

    def _parts(self, chunk: int) -> tuple[bytes, memoryview]:
        """A chunk as (record header, view of the state): sent by gather, never copied.
        A chunk changed while it is on the wire is dirty again and goes once more."""
        off = chunk * self.chunk_size
        length = min(self.chunk_size, self.size - off)
        return self._REC.pack(off, length), memoryview(self.data[off : off + length])

    def save_state_buffers(self, final: bool) -> Iterator[Any]:
        """One buffer per dirty chunk; ``final`` ends with the config."""
        for chunk in self._take_dirty(None):
            yield self._parts(int(chunk))
        if final:
            # Anything re-dirtied meanwhile (cannot happen while paused, but stay exact).
            for chunk in self._take_dirty(None):
                yield self._parts(int(chunk))
            yield self._config()

    def save_state(self) -> bytes:
        return self._config()

    # -- destination side -----------------------------------------------------------------

    def _check_config(self, data: bytes) -> None:
        if len(data) != self._CFG.size:
            raise DeviceStateError(
                f"{self.idstr}: config is {len(data)} bytes, expected {self._CFG.size}"
            )
        magic, size, chunk = self._CFG.unpack(data)
        if magic != self._MAGIC or size != self.size or chunk != self.chunk_size:
            raise DeviceStateError(
                f"{self.idstr}: config mismatch (magic={magic!r} size={size} chunk={chunk}; "
                f"expected size={self.size} chunk={self.chunk_size})"
            )

    def _apply_records(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        rec = self._REC.size
        while pos < len(view):
            if len(view) - pos < rec:
                raise DeviceStateError(f"{self.idstr}: truncated record header at {pos}")
            off, length = self._REC.unpack_from(view, pos)
            pos += rec
            if length > len(view) - pos:
                raise DeviceStateError(
                    f"{self.idstr}: record length={length} exceeds data left {len(view) - pos}"
                )
            if off > self.size or length > self.size - off:
                raise DeviceStateError(
                    f"{self.idstr}: record offset={off} length={length} outside size {self.size}"
                )
            self.data[off : off + length] = np.frombuffer(view[pos : pos + length], np.uint8)
            pos += length

    def load_state(self, data: bytes, version_id: int) -> None:
        if version_id != 1:
            raise DeviceStateError(f"{self.idstr}: unsupported state version {version_id}")
        self._check_config(data)

    def load_setup(self, data: bytes) -> None:
        self._check_config(data)

    def load_iterate(self, data: bytes) -> None:
        self._apply_records(data)

    def load_state_buffer(self, idx: int, data: bytes, config: bool) -> None:
        self._got_buffers = True
        self.queue.put(idx, data, config)

    def _apply_buffer(self, data: bytes, config: bool) -> None:
        if config:
            self._check_config(data)
        else:
            self._apply_records(data)

    def abort_load(self) -> None:
        self.queue.abort()

    def load_progress(self) -> str | None:
        return self.queue.missing()

    def load_state_job(self, abort: threading.Event) -> None:
        for _idx, data, config in self.queue.drain(abort):
            self._apply_buffer(data, config)

    def finish_load(self) -> None:
        if not self.queue.complete:  # no load job ran (or it stopped): apply what is there
            for _idx, data, config in self.queue.drain(block=False):
                self._apply_buffer(data, config)
        if self._got_buffers:  # state came over multifd: it must be complete
            self.queue.check_complete()

    def checksum(self) -> str:
        return hashlib.sha256(self.data.data).hexdigest()


# -- machine and workload ------------------------------------------------------------------

def build_demo_machine(
    ram_size: int = GiB,
    *,
    seed: int = 1,
    device_state_size: int = 0,
    total_steps: int = 0,
    pages_per_step: int = 64,
    populate: bool = True,
    device_state_via_multifd: bool = True,
    backing: str = "anon",
    tracking: str | None = None,
) -> Machine:
    """The demo machine. ``populate=False`` builds an empty destination (zeroed memory);
    ``backing="memfd"`` for a cpr-transfer handover. The RAM block's write tracking
    (``tracking``) defaults to "auto" on a source (the kernel's answer merged with the
    workload's marks), "manual" on a destination (the migration writes it)."""
    tracking = tracking or ("auto" if populate else "manual")
    ram = RamBlock(RAM_BLOCK, ram_size, backing=backing, tracking=tracking)
    bios = RamBlock(BIOS_BLOCK, BIOS_SIZE, backing=backing)
    if populate:
        _fill(ram.array, seed, 0)
        _fill(bios.array, seed, 1)
    cpu = CpuDevice(seed=seed, total_steps=total_steps, pages_per_step=pages_per_step)
    machine = Machine([ram, bios], [cpu])
    if device_state_size:
        machine.add_device(
            BigStateDevice(
                device_state_size,
                seed=seed,
                populate=populate,
                via_multifd=device_state_via_multifd,
            )
        )
    return machine


class DemoWorkload:
    """Runs the deterministic computation on a demo machine (see module docstring).

    Parameters given here are stored in the cpu device; parameters not given are read from
    it (on a destination they arrived with the migration).
    """

    def __init__(
        self,
        machine: Machine,
        *,
        dirty_rate_mib_s: float = 0.0,
        total_steps: int | None = None,
        pages_per_step: int | None = None,
    ) -> None:
        self.machine = machine
        cpu = machine.device("cpu")
        if not isinstance(cpu, CpuDevice):
            raise TypeError("the demo workload needs the demo machine's CpuDevice")
        self.cpu = cpu
        if total_steps is not None:
            cpu.total_steps = total_steps
        if pages_per_step is not None:
            if pages_per_step < 1:
                raise ValueError("pages_per_step must be >= 1")
            cpu.pages_per_step = pages_per_step
        self.dirty_rate_mib_s = dirty_rate_mib_s
        # What this workload really dirtied (pages marked), with a coarse history (instant,
        # pages, step) so a report can take the count over the migration's own intervals.
        self.pages_dirtied = 0
        self._history: list[tuple[float, int, int]] = [(time.monotonic(), 0, cpu.step)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- the computation ------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.cpu.step >= self.cpu.total_steps

    def step(self) -> None:
        """Run step ``cpu.step`` and advance the counter (call only at a safe point)."""
        self._count(_run_step(self.machine, self.cpu))

    # -- threads ------------------------------------------------------------------------

    def _loop(self) -> None:
        machine, cpu = self.machine, self.cpu
        with machine.workload():
            next_t = time.monotonic()
            while cpu.step < cpu.total_steps:
                idle = 0.0
                rate = self.dirty_rate_mib_s
                if rate > 0:
                    now = time.monotonic()
                    if next_t < now - 0.05:  # fell behind (a pause): do not burst
                        next_t = now
                    idle = max(0.0, next_t - now)
                    next_t += cpu.pages_per_step * 4096 / (rate * MiB)
                if not machine.safe_point(self._stop, idle=idle):
                    break
                if cpu.step >= cpu.total_steps:
                    break
                self._count(_run_step(machine, cpu))

    def _count(self, pages: int) -> None:
        self.pages_dirtied += pages
        now = time.monotonic()
        if now - self._history[-1][0] >= 0.02:
            self._history.append((now, self.pages_dirtied, self.cpu.step))

    def pages_dirtied_between(self, t0: float, t1: float) -> float:
        """Pages this workload marked dirty between two `time.monotonic` instants
        (interpolated between the history's 20 ms points)."""
        ts, ns, _ = self._history_arrays()
        return float(np.interp(t1, ts, ns) - np.interp(t0, ts, ns))

    def distinct_pages_dirtied(self, instants: Sequence[float]) -> int:
        """Pages this workload wrote, each counted once per interval between consecutive
        `instants` (`time.monotonic`): what dirty bitmaps read at those instants hold, a
        page written twice in an interval being one dirty page. `pages_dirtied` counts
        every write: flat out over 1 GiB a 4 s first pass writes each page twice on
        average, and more than half of those writes find their page dirty already.
        Recomputed from the steps (deterministic, `_step_keys`) run in each interval."""
        ts, _, ks = self._history_arrays()
        steps = np.rint(np.interp(np.asarray(instants, dtype=float), ts, ks)).astype(np.int64)
        cpu = self.cpu
        ram, bios = self.machine.block(RAM_BLOCK), self.machine.block(BIOS_BLOCK)
        total = 0
        for k0, k1 in zip(steps[:-1].tolist(), steps[1:].tolist(), strict=True):
            if k1 > k0:
                keys = _step_keys(cpu.seed, k0, k1, cpu.pages_per_step)
                total += np.unique(keys % np.uint64(ram.num_pages)).size
                bios_steps = np.arange(-(-k0 // 16) * 16, k1, 16)  # steps k % 16 == 0
                total += np.unique((bios_steps // 16) % bios.num_pages).size
        return total

    def _history_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The history up to now as arrays: instants, pages dirtied, steps done."""
        hist = np.array([*self._history, (time.monotonic(), self.pages_dirtied, self.cpu.step)],
                        dtype=float)
        return hist[:, 0], hist[:, 1], hist[:, 2]

    def _thread_main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._error = exc

    def run_in_thread(self) -> threading.Thread:
        """Start the workload on its own thread (workload, not device work)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("workload already running")
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._thread_main, name="demo-workload", daemon=True
        )
        self._thread.start()
        return self._thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the workload thread to stop at its next safe point and join it."""
        self._stop.set()
        self.machine.kick()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the workload thread; re-raise an error it hit."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("workload thread still running")
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("demo workload failed") from err

    def run_to_completion(self) -> None:
        """Run from the cpu's current step to ``total_steps`` (in the calling thread, or by
        joining the workload thread if it is running). The machine must be running."""
        if self.running:
            self.join()
            return
        self._stop.clear()
        self._loop()


def _step_keys(seed: int, k0: int, k1: int, pages_per_step: int) -> np.ndarray:
    """The page-picking hashes of steps ``k0 .. k1 - 1``, ``pages_per_step`` per step in
    order: step k's are ``_mix(seed * C + k * pages_per_step + i)``, one contiguous run."""
    base = (seed * 0xD1B54A32D192ED03 + k0 * pages_per_step) & _MASK
    return _mix(np.arange((k1 - k0) * pages_per_step, dtype=np.uint64) + np.uint64(base))


def _run_step(machine: Machine, cpu: CpuDevice) -> int:
    """One step; returns the RAM pages it marked dirty."""
    k = cpu.step
    seed = cpu.seed
    ram = machine.block(RAM_BLOCK)
    pages = ram.pages
    keys = _step_keys(seed, k, k + 1, cpu.pages_per_step)
    idx = np.unique((keys % np.uint64(ram.num_pages)).astype(np.int64))
    rows = pages[idx]
    rows *= np.uint8(3)
    rows += np.uint8((k * 7 + 1) & 0xFF)
    if int(keys[0]) % 8 == 0:
        rows[0] = 0  # zero pages keep appearing
    pages[idx] = rows
    ram.mark_dirty_pages(idx)
    acc = (cpu.acc * 31 + int(rows[:, :8].sum(dtype=np.uint64))) & _MASK
    if k % 16 == 0:
        bios = machine.block(BIOS_BLOCK)
        p = (k // 16) % bios.num_pages
        bios.pages[p] += np.uint8(1)
        bios.mark_dirty_pages(np.array([p]))
    try:
        big = machine.device("bigstate")
    except KeyError:
        big = None
    if isinstance(big, BigStateDevice):
        big.mutate(seed, k)
    cpu.acc = acc
    cpu.step = k + 1
    return int(idx.size) + (k % 16 == 0)


def expected_checksum(
    ram_size: int,
    seed: int,
    total_steps: int,
    *,
    pages_per_step: int = 64,
    device_state_size: int = 0,
) -> str:
    """Checksum of the demo computation run straight through, without migration."""
    machine = build_demo_machine(
        ram_size,
        seed=seed,
        device_state_size=device_state_size,
        total_steps=total_steps,
        pages_per_step=pages_per_step,
    )
    try:
        cpu = machine.device("cpu")
        assert isinstance(cpu, CpuDevice)
        while cpu.step < total_steps:
            _run_step(machine, cpu)
        return machine.checksum()
    finally:
        machine.close()
