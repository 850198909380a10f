"""The demo machine and workload: determinism across pauses, copies and live transfers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from multifd.machine import DeviceStateError, Machine, copy_state
from multifd.machine.demo import (
    BIOS_BLOCK,
    RAM_BLOCK,
    BigStateDevice,
    CpuDevice,
    DemoWorkload,
    build_demo_machine,
    expected_checksum,
)
from multifd.machine.device import join_buffer

RAM = 4 << 20
STEPS = 400
BIG = 3 << 20


def test_build_is_deterministic_and_mixed() -> None:
    with build_demo_machine(RAM, seed=5) as a, build_demo_machine(RAM, seed=5) as b:
        assert a.checksum() == b.checksum()
        assert list(a.blocks) == [RAM_BLOCK, BIOS_BLOCK]
        ram = a.block(RAM_BLOCK)
        zero = ram.zero_pages(np.arange(ram.num_pages))
        assert 0 < zero.mean() < 1  # part zero, part data
    with build_demo_machine(RAM, seed=6) as c, build_demo_machine(RAM, seed=5) as d:
        assert c.checksum() != d.checksum()
    with build_demo_machine(RAM, populate=False, device_state_size=BIG) as e:
        assert not e.block(RAM_BLOCK).array.any()
        big = e.device("bigstate")
        assert isinstance(big, BigStateDevice) and not big.data.any()


def test_build_is_fast() -> None:
    t0 = time.perf_counter()
    m = build_demo_machine(256 << 20)
    took = time.perf_counter() - t0
    try:
        assert m.block(RAM_BLOCK).used_length == 256 << 20
        # ~0.15 s on an idle core (1 GiB ~0.6 s); 30x slack for a loaded, shared CI box
        assert took < 5, took
    finally:
        m.close()


def _run_straight(seed: int = 1, big: int = 0) -> str:
    with build_demo_machine(RAM, seed=seed, device_state_size=big) as m:
        w = DemoWorkload(m, total_steps=STEPS, pages_per_step=32)
        m.start()
        w.run_to_completion()
        assert w.done and m.device("cpu").step == STEPS  # type: ignore[attr-defined]
        return m.checksum()


def test_straight_run_matches_expected_checksum() -> None:
    expected = expected_checksum(RAM, 1, STEPS, pages_per_step=32, device_state_size=BIG)
    assert _run_straight(big=BIG) == expected
    assert expected != expected_checksum(RAM, 1, STEPS - 1, pages_per_step=32,
                                         device_state_size=BIG)


def test_workload_dirties_and_zeroes_pages() -> None:
    with build_demo_machine(RAM) as m:
        ram = m.block(RAM_BLOCK)
        ram.sync_dirty_bitmap()
        before = ram.pages.copy()
        w = DemoWorkload(m, total_steps=200, pages_per_step=16)
        m.start()
        w.run_to_completion()
        dirty = ram.sync_dirty_bitmap()
        changed = np.flatnonzero((ram.pages != before).any(axis=1))
        assert set(changed) <= set(np.flatnonzero(dirty))  # every change was marked
        assert len(changed) > 100
        became_zero = ram.zero_pages(changed) & ~(before[changed] == 0).all(axis=1)
        assert became_zero.any()
        assert m.block(BIOS_BLOCK).sync_dirty_bitmap().any()


def test_pause_in_the_middle_gives_the_same_result() -> None:
    expected = expected_checksum(RAM, 1, STEPS, pages_per_step=32, device_state_size=BIG)
    with build_demo_machine(RAM, device_state_size=BIG) as m:
        w = DemoWorkload(m, total_steps=STEPS, pages_per_step=32, dirty_rate_mib_s=40)
        cpu = m.device("cpu")
        assert isinstance(cpu, CpuDevice)
        m.start()
        w.run_in_thread()
        while cpu.step < STEPS // 4:
            time.sleep(0.005)
        m.pause(timeout=5)
        frozen = cpu.step
        assert 0 < frozen < STEPS
        time.sleep(0.05)
        assert cpu.step == frozen
        m.resume()
        w.join(timeout=60)
        assert cpu.step == STEPS
        assert m.checksum() == expected


def test_pacing_follows_dirty_rate() -> None:
    with build_demo_machine(RAM) as m:
        # 16 pages = 64 KiB per step; 2 MiB/s -> 32 steps per second
        w = DemoWorkload(m, total_steps=10_000, pages_per_step=16, dirty_rate_mib_s=2)
        m.start()
        w.run_in_thread()
        time.sleep(0.5)
        w.stop(timeout=5)
        steps = m.device("cpu").step  # type: ignore[attr-defined]
        assert 8 <= steps <= 24, steps


def test_stop_while_paused() -> None:
    with build_demo_machine(RAM) as m:
        w = DemoWorkload(m, total_steps=10_000)
        m.start()
        w.run_in_thread()
        time.sleep(0.02)
        m.pause(timeout=5)
        w.stop(timeout=5)
        assert not w.running


@pytest.mark.parametrize("via_multifd", [True, False])
def test_copy_mid_run_to_another_machine(via_multifd: bool) -> None:
    expected = expected_checksum(RAM, 3, STEPS, pages_per_step=32, device_state_size=BIG)
    src = build_demo_machine(
        RAM, seed=3, device_state_size=BIG, device_state_via_multifd=via_multifd
    )
    dst = build_demo_machine(
        RAM, populate=False, device_state_size=BIG, device_state_via_multifd=via_multifd
    )
    try:
        w = DemoWorkload(src, total_steps=STEPS, pages_per_step=32)
        src.start()
        w.run_in_thread()
        cpu = src.device("cpu")
        while cpu.step < STEPS // 3:  # type: ignore[attr-defined]
            time.sleep(0.002)
        src.pause(timeout=5)
        w.stop(timeout=5)
        copy_state(src, dst)
        assert dst.checksum() == src.checksum()
        dst.start()
        dw = DemoWorkload(dst)  # parameters arrive with the cpu state
        assert dw.cpu.total_steps == STEPS and dw.cpu.seed == 3
        dw.run_to_completion()
        assert dst.checksum() == expected
    finally:
        src.close()
        dst.close()


def test_live_transfer_with_dirty_tracking_matches_expected() -> None:
    """A miniature pre-copy: the workload runs while RAM pages and device buffers are
    copied from dirty snapshots; after a pause and a final pass the copy is exact and
    finishing the workload there gives the straight-through checksum."""
    expected = expected_checksum(RAM, 2, STEPS, pages_per_step=32, device_state_size=BIG)
    src = build_demo_machine(RAM, seed=2, device_state_size=BIG)
    dst = build_demo_machine(RAM, populate=False, device_state_size=BIG)
    try:
        w = DemoWorkload(src, total_steps=STEPS, pages_per_step=32, dirty_rate_mib_s=20)
        sbig, dbig = src.device("bigstate"), dst.device("bigstate")
        assert isinstance(sbig, BigStateDevice) and isinstance(dbig, BigStateDevice)
        for block in src.blocks.values():
            block.start_dirty_log()
        dbig.load_setup(sbig.save_setup())
        assert sbig.pending() == BIG
        idx = 0
        # buffers go to the destination out of order; a load worker applies them in order
        loader = threading.Thread(target=dbig.load_state_job, args=(threading.Event(),))
        loader.start()
        held: list[tuple[int, bytes]] = []

        def copy_round() -> None:
            nonlocal idx
            for name, block in src.blocks.items():
                pages = np.flatnonzero(block.sync_dirty_bitmap())
                dst.block(name).pages[pages] = block.pages[pages]

        src.start()
        w.run_in_thread()
        cpu = src.device("cpu")
        for _ in range(5):
            copy_round()
            for buf in sbig.save_state_buffers(False):
                held.append((idx, join_buffer(buf)))
                idx += 1
            for i, data in reversed(held):  # reversed: out of order
                dbig.load_state_buffer(i, data, False)
            held.clear()
            time.sleep(0.02)
        assert 0 < cpu.step < STEPS  # type: ignore[attr-defined]
        src.pause(timeout=5)
        w.stop(timeout=5)
        copy_round()
        final = [join_buffer(b) for b in sbig.save_state_buffers(True)]
        for j, data in enumerate(final):
            dbig.load_state_buffer(idx + j, data, j == len(final) - 1)
        loader.join(10)
        assert not loader.is_alive()
        for dev in src.devices:
            dst.device(dev.idstr).load_state(dev.save_state(), dev.version_id)
        dbig.finish_load()
        assert dst.checksum() == src.checksum()
        dst.start()
        DemoWorkload(dst).run_to_completion()
        assert dst.checksum() == expected
    finally:
        src.close()
        dst.close()


def test_bigstate_rejects_bad_input() -> None:
    dev = BigStateDevice(BIG, populate=False)
    other = BigStateDevice(2 * BIG, populate=False)
    with pytest.raises(DeviceStateError, match="config mismatch"):
        dev.load_setup(other.save_setup())
    with pytest.raises(DeviceStateError, match="outside size"):
        dev.load_iterate(b"".join([(BIG).to_bytes(8, "big"), (1).to_bytes(4, "big"), b"x"]))
    with pytest.raises(DeviceStateError, match="exceeds data left"):
        dev.load_iterate((0).to_bytes(8, "big") + (100).to_bytes(4, "big") + b"x")
    with pytest.raises(DeviceStateError, match="truncated"):
        dev.load_iterate(b"\x00" * 5)
    dev.load_state_buffer(1, b"", False)
    with pytest.raises(DeviceStateError, match="CONFIG_STATE buffer never arrived"):
        dev.finish_load()
    with pytest.raises(DeviceStateError, match="CONFIG_STATE buffer never arrived"):
        Machine(devices=[dev], incoming=True).finish_incoming()
    cpu = CpuDevice()
    with pytest.raises(DeviceStateError):
        cpu.load_state(b"short", 1)
    with pytest.raises(DeviceStateError):
        cpu.load_state(CpuDevice().save_state(), 2)


def test_main_stream_iterate_moves_everything_in_pieces() -> None:
    src = BigStateDevice(BIG, seed=9, chunk_size=256 << 10, iterate_bytes=1 << 20)
    dst = BigStateDevice(BIG, populate=False, chunk_size=256 << 10)
    dst.load_setup(src.save_setup())
    sections = 0
    done = False
    while not done:
        data, done = src.save_iterate(True)
        dst.load_iterate(data)
        sections += 1
    assert sections == 3 and src.pending() == 0
    dst.load_state(src.save_state(), 1)
    dst.finish_load()  # nothing came over multifd: nothing to check
    assert dst.checksum() == src.checksum()


def test_workload_needs_the_demo_cpu() -> None:
    with pytest.raises(KeyError):
        DemoWorkload(Machine())
