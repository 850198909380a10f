"""The atheris side of fuzzing, without atheris: fuzz/atheris_wire.py's drivers replay
every checked-in regression input (fuzz/seeds/<target>/) in the normal suite, and its
seed corpus builds from tests/data alone (a plain clone has all it needs)."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from multifd.qemu.inspect import InspectError, inspect_streams
from multifd.wire.errors import UnknownName, WireError
from multifd.wire.vmdesc import split_device_tail

ROOT = Path(__file__).resolve().parents[2]
SEED_FILES = sorted(p for p in (ROOT / "fuzz" / "seeds").glob("*/*") if p.is_file())


@cache
def atheris_wire() -> ModuleType:
    """fuzz/atheris_wire.py as a module (fuzz/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("atheris_wire", ROOT / "fuzz/atheris_wire.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("atheris_wire", mod)
    spec.loader.exec_module(mod)
    return mod


def test_every_target_has_seeds_from_tests_data(tmp_path: Path) -> None:
    aw = atheris_wire()
    seeds = aw.target_seeds()
    assert set(seeds) == set(aw.TARGETS)
    for target, items in seeds.items():
        captures = [name for name, _ in items if not name.startswith("seed-")]
        assert captures, f"no capture seeds for {target}"
        assert all(data for _, data in items), target
    aw.seed_corpus(tmp_path)
    for target in aw.TARGETS:
        assert len(list((tmp_path / target).iterdir())) == len(seeds[target])
    # the RAM seeds start with the MEM_SIZE record word (flag 0x04 in its last byte)
    assert all(data[7] & 0x0FFF == 0x04 for _, data in seeds["ram"])


@pytest.mark.parametrize("path", SEED_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression_seed_is_rejected_cleanly(path: Path) -> None:
    """Each seed runs through its target's fuzz driver: only WireError may come out."""
    target = path.parent.name
    assert target in atheris_wire().TARGETS
    atheris_wire().run_one(target, path.read_bytes())


def test_regression_seeds_fail_for_the_reason_they_were_added() -> None:
    """The inspect seeds are not merely survived: each is an error naming what it lacks."""
    seeds = ROOT / "fuzz" / "seeds" / "inspect"
    with pytest.raises(InspectError) as ei:
        inspect_streams(("m", (seeds / "undeclared-ram-block").read_bytes()))
    assert isinstance(ei.value.error, UnknownName) and ei.value.error.value == "pc.ram"
    with pytest.raises(InspectError) as ei:
        inspect_streams(("m", (seeds / "vmdesc-instance-id-not-int").read_bytes()))
    assert "device 0 (timer)" in str(ei.value) and "instance_id" in str(ei.value)


def test_split_device_tail_rejects_a_non_integer_instance_id() -> None:
    tail = (ROOT / "fuzz" / "seeds" / "inspect" / "vmdesc-instance-id-not-int").read_bytes()
    tail = tail[tail.index(b"\x04\x00\x00\x00\x02\x05timer") :]
    with pytest.raises(WireError):
        split_device_tail(tail, {"devices": [{"name": "timer", "instance_id": {}}]})


def test_read_image_names_an_undeclared_ram_block(tmp_path: Path) -> None:
    """The 226-byte fuzz finding through the image reader (`multifd incoming --save`,
    `migrate IMAGE`): a clear ImageError naming the block, not a KeyError."""
    from multifd.qemu.image import ImageError, read_image

    seed = ROOT / "fuzz" / "seeds" / "inspect" / "undeclared-ram-block"
    with pytest.raises(ImageError, match=r"names an unknown RAM block \(block=pc.ram\)"):
        read_image(seed)
