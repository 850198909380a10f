"""PickleDevice: a plain Python object migrates at switchover; the destination refuses to
unpickle unless the migration uses TLS or the device says allow_pickle=True."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from multifd import Machine, MigrationDestination, MigrationSource, PickleDevice
from multifd.machine.device import DeviceStateError
from multifd.machine.machine import copy_state
from multifd.machine.ramblock import RamBlock
from multifd.migration.params import MigrationParameters
from tests.security.certs import make_creds

STATE = {"users": {"ada": [1, 2, 3]}, "version": (2, "b"), "blob": b"\x00" * 100}


class Box:
    def __init__(self, value: Any = None) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def set(self, value: Any) -> None:
        self.value = value


def _machines(allow: bool) -> tuple[Machine, Box, Machine, Box]:
    sbox, dbox = Box(STATE), Box()
    src = Machine([RamBlock("pc.ram", 1 << 16)], [PickleDevice("app", sbox.get, sbox.set)])
    dst = Machine([RamBlock("pc.ram", 1 << 16)],
                  [PickleDevice("app", dbox.get, dbox.set, allow_pickle=allow)])
    return src, sbox, dst, dbox


def _migrate(src: Machine, dst: Machine, params: dict[str, object] | None = None) -> None:
    sp, dp = MigrationParameters(), MigrationParameters()
    if params:
        sp.set(params)
        dp.set(params)
    dest = MigrationDestination(dst, params=dp)
    uri = dest.listen("tcp:127.0.0.1:0")
    source = MigrationSource(src, params=sp)
    src.start()
    source.start(uri)
    assert str(source.wait(30)) == "completed", source.error
    assert str(dest.wait(30)) == "completed", dest.error


def test_refused_without_tls_or_opt_in_before_anything_is_accepted() -> None:
    src, _, dst, dbox = _machines(allow=False)
    with src, dst, pytest.raises(DeviceStateError, match=r"without TLS.*allow_pickle=True"):
        MigrationDestination(dst).listen("tcp:127.0.0.1:0")
    assert dbox.value is None


def test_load_refused_when_the_destination_never_checked() -> None:
    _, _, dst, dbox = _machines(allow=False)
    with dst:
        with pytest.raises(DeviceStateError, match="without TLS"):
            dst.device("app").load_state(pickle.dumps(STATE), 1)
        assert dbox.value is None


def test_migrates_with_explicit_opt_in() -> None:
    src, sbox, dst, dbox = _machines(allow=True)
    with src, dst:
        _migrate(src, dst)
        assert dbox.value == STATE and dbox.value is not sbox.value


def test_migrates_under_tls(tmp_path: Path) -> None:
    make_creds(tmp_path)
    src, _, dst, dbox = _machines(allow=False)
    with src, dst:
        _migrate(src, dst, {"tls-creds": str(tmp_path)})
        assert dbox.value == STATE


def test_bad_state_and_newer_version_are_clear_errors() -> None:
    _, _, dst, dbox = _machines(allow=True)
    with dst:
        dev = dst.device("app")
        with pytest.raises(DeviceStateError, match="does not unpickle"):
            dev.load_state(b"\x80\x05garbage", 1)
        with pytest.raises(DeviceStateError, match="newer than supported"):
            dev.load_state(pickle.dumps(1), 2)
        assert dbox.value is None


def test_copy_state_in_process_needs_no_opt_in() -> None:
    src, _, dst, dbox = _machines(allow=False)
    with src, dst:
        copy_state(src, dst)
        assert dbox.value == STATE
