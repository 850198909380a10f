"""Fuzzing `multifd inspect`: in-process (`inspect_streams`, the command's `run()`) and once
as a subprocess. Hostile input ends in InspectError (a WireError tied to the file), which
the command prints as one line ``error: <what>, at byte N of FILE`` with exit status 2.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given

from multifd.commands import inspect as inspect_cmd
from multifd.qemu.inspect import InspectError, inspect_streams
from tests.conftest import capture_bytes
from tests.fuzz._harness import (
    SCALE,
    Seed,
    _channel_marks,
    fuzz_settings,
    main_seeds,
    mutated,
    run_target,
)

MiB = 1 << 20
# inspect rebuilds the guest RAM the stream describes: 64 MiB of pc.ram (+ ROMs) here.
INSPECT_LIMIT = 160 * MiB


@cache
def _sets() -> tuple[tuple[str, bytes, tuple[bytes, ...]], ...]:
    out = []
    for comp in ("none", "zlib", "zstd"):
        d = f"qemu10-captures/multifd2-{comp}"
        out.append((f"10.0-{comp}", capture_bytes(f"{d}/main.bin"),
                    (capture_bytes(f"{d}/chan-0.bin"), capture_bytes(f"{d}/chan-1.bin"))))
    thin = next(s for s in main_seeds() if s.name == "7.2-nomultifd")
    out.append(("7.2-nomultifd", thin.data, ()))
    return tuple(out)


@cache
def _seeds() -> tuple[Seed, ...]:
    """Each file of each set as a mutation seed; the name says which set and which file."""
    seeds = []
    for name, main, chans in _sets():
        seeds.append(Seed(f"{name}/main", main, next(s for s in main_seeds()
                                                     if s.name == "10.0-multifd").marks
                          if name.startswith("10.0") else ()))
        for i, c in enumerate(chans):
            seeds.append(Seed(f"{name}/{i}", c, tuple(_channel_marks(c))))
    return tuple(seeds)


def _streams(case: tuple[str, bytes]) -> tuple[tuple[str, bytes], list[tuple[str, bytes]]]:
    seed, data = case
    set_name, which = seed.split("/")
    _, main, chans = next(s for s in _sets() if s[0] == set_name)
    files = {"main": main, **{str(i): c for i, c in enumerate(chans)}}
    files[which] = data
    return ("main.bin", files["main"]), [(f"chan-{i}.bin", files[str(i)])
                                         for i in range(len(chans))]


@fuzz_settings(150)
@given(mutated(_seeds()))
def test_inspect_streams(case: tuple[str, bytes]) -> None:
    main, chans = _streams(case)
    err = run_target("inspect", lambda: inspect_streams(main, chans), (InspectError,),
                     INSPECT_LIMIT)
    if err is not None:
        line = str(err)
        assert "\n" not in line and ", at byte " in line


@fuzz_settings(40)
@given(mutated(_seeds()))
def test_inspect_command_run(tmp_path_factory: object, case: tuple[str, bytes]) -> None:
    """The command itself: exit 0 or 2, and on 2 exactly one ``error:`` line."""
    main, chans = _streams(case)
    d = Path(tmp_path_factory.mktemp("inspect"))  # type: ignore[attr-defined]
    paths = []
    for name, data in (main, *chans):
        (d / name).write_bytes(data)
        paths.append(str(d / name))
    args = argparse.Namespace(main=paths[0], channels=paths[1:], json=True, dump_ram=[])
    out, err = io.StringIO(), io.StringIO()
    rc: list[int] = []

    def run() -> None:
        with redirect_stdout(out), redirect_stderr(err):
            rc.append(inspect_cmd.run(args))

    run_target("inspect run()", run, (), INSPECT_LIMIT + 32 * MiB)
    assert rc[0] in (0, 2), err.getvalue()
    if rc[0] == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and ", at byte " in lines[0]
        assert "Traceback" not in err.getvalue()


def test_inspect_subprocess_one_line_error(tmp_path: Path) -> None:
    """The installed CLI on a stream with a lying length: exit 2, one line, no traceback."""
    main = bytearray(capture_bytes("qemu10-captures/multifd2-zstd/main.bin"))
    at = main.find(b"\x03ram") + 12  # the first RAM record of the START section
    main[at + 8 : at + 16] = (1 << 63).to_bytes(8, "big")  # MEM_SIZE total: absurd
    (tmp_path / "m.bin").write_bytes(main)
    res = subprocess.run([sys.executable, "-m", "multifd.cli", "inspect",
                          str(tmp_path / "m.bin")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "m.bin" in lines[0] and "Traceback" not in res.stderr


def test_fuzz_settings_are_deterministic_for_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI replays the same examples every run (derandomized, no example database), and
    MULTIFD_FUZZ_RANDOM=1 turns randomness back on for longer local campaigns."""
    monkeypatch.delenv("MULTIFD_FUZZ_RANDOM", raising=False)
    s = fuzz_settings(3)
    assert s.derandomize is True and s.database is None and s.deadline is None
    assert s.max_examples == max(1, int(3 * SCALE))
    monkeypatch.setenv("MULTIFD_FUZZ_RANDOM", "1")
    assert fuzz_settings(3).derandomize is False
