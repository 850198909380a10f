"""The `multifd` CLI frame: lazy per-command modules, errors, exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types

import pytest

from multifd import __version__, cli

pytestmark = pytest.mark.timeout(60)


def _fake(name: str, run, configure=None) -> types.ModuleType:  # type: ignore[no-untyped-def]
    mod = types.ModuleType(f"multifd.commands.{name}")

    def default_configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ram", default="1G")

    mod.configure = configure or default_configure  # type: ignore[attr-defined]
    mod.run = run  # type: ignore[attr-defined]
    return mod


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"multifd {__version__}"


def test_help_lists_commands_without_importing_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(name: str) -> None:
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(cli.importlib, "import_module", boom)
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "inspect", "incoming", "migrate", "serve"):
        assert name in out


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 1
    assert "error: a command is required" in capsys.readouterr().err


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_runs_command_with_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def run(args: argparse.Namespace) -> int:
        seen["ram"] = args.ram
        seen["command"] = args.command
        return 3

    monkeypatch.setitem(sys.modules, "multifd.commands.demo", _fake("demo", run))
    assert cli.main(["-v", "demo", "--ram", "2G"]) == 3
    assert seen == {"ram": "2G", "command": "demo"}


def test_missing_module(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "multifd.commands.serve", None)  # import -> not found
    assert cli.main(["serve", "x"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: command serve is not available in this build")


def test_module_without_entry_points(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "multifd.commands.serve", types.ModuleType("x"))
    assert cli.main(["serve"]) == 1
    assert "command serve is not available in this build" in capsys.readouterr().err


def test_broken_module_does_not_break_others(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = cli.importlib.import_module

    def fake_import(name: str):  # type: ignore[no-untyped-def]
        if name == "multifd.commands.migrate":
            raise SyntaxError("invalid syntax (migrate.py, line 3)")
        return real_import(name)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    monkeypatch.setitem(sys.modules, "multifd.commands.incoming", _fake("incoming", lambda a: 0))
    assert cli.main(["migrate"]) == 1
    assert "command migrate cannot be loaded: invalid syntax" in capsys.readouterr().err
    assert cli.main(["incoming"]) == 0


def test_command_exception(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(args: argparse.Namespace) -> int:
        raise ConnectionRefusedError("cannot connect to tcp:127.0.0.1:1")

    monkeypatch.setitem(sys.modules, "multifd.commands.migrate", _fake("migrate", run))
    monkeypatch.delenv("MULTIFD_DEBUG", raising=False)
    assert cli.main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: cannot connect to tcp:127.0.0.1:1"
    assert "Traceback" not in err

    monkeypatch.setenv("MULTIFD_DEBUG", "1")
    assert cli.main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: cannot connect" in err


def test_command_usage_error_and_keyboard_interrupt(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "multifd.commands.demo", _fake("demo", run))
    assert cli.main(["demo", "--no-such-flag"]) == 2
    assert cli.main(["demo"]) == 130
    assert "error: interrupted" in capsys.readouterr().err


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from multifd.cli import main; sys.exit(main())",
         "--version"], capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0 and out.stdout.strip() == f"multifd {__version__}"


@pytest.mark.parametrize("command", ["incoming", "migrate"])
@pytest.mark.parametrize("value", ["256", "-1", "1000", "two", "1.5"])
def test_channels_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str,
    value: str,
) -> None:
    """QEMU's multifd-channels is 1..255 (0 here: multifd off): anything else is refused
    by argparse with the range, before the command runs."""
    from multifd.commands import incoming, migrate

    mod = incoming if command == "incoming" else migrate
    monkeypatch.setattr(mod, "run", lambda args: pytest.fail("the command ran"))
    args = (["incoming", "unix:/nowhere", "--save", "x.img"] if command == "incoming"
            else ["migrate", "x.img", "unix:/nowhere"])
    assert cli.main([*args, "--profile", "qemu-10", "--channels", value]) == 2
    err = capsys.readouterr().err
    assert "argument --channels" in err and "from 0 to 255" in err and repr(value) in err


@pytest.mark.parametrize("value", ["0", "1", "8", "9", "255"])
def test_channels_in_range_reach_the_command(monkeypatch: pytest.MonkeyPatch,
                                             value: str) -> None:
    from multifd.commands import incoming

    seen: list[int] = []
    monkeypatch.setattr(incoming, "run", lambda args: seen.append(args.channels) or 0)
    argv = ["incoming", "unix:/nowhere", "--save", "x.img", "--profile", "qemu-7.2",
            "--channels", value]
    assert cli.main(argv) == 0
    assert seen == [int(value)]


def test_channels_arg_minimum() -> None:
    parse = cli.channels_arg()
    assert parse("1") == 1 and parse("255") == 255
    with pytest.raises(argparse.ArgumentTypeError, match="from 1 to 255"):
        parse("0")


def test_incoming_exits_at_once_on_a_first_connection_without_magic(tmp_path) -> None:
    """`multifd incoming` (qemu-7.2, multifd on) given a first connection of random bytes
    exits 1 (its peer-error code) at once with one error line naming the magic, instead of
    waiting the whole accept timeout for the multifd channels."""
    import socket
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from multifd.cli import main; sys.exit(main())",
         "incoming", "tcp:127.0.0.1:0", "--profile", "qemu-7.2", "--channels", "2",
         "--save", str(tmp_path / "x.img")], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("listening on "), line
        host, port = line.split()[-1].split(":")[-2:]
        with socket.create_connection((host, int(port)), timeout=5) as s:
            t0 = time.monotonic()
            s.sendall(bytes.fromhex("8e2f61d0") + bytes(range(60)))
            rc = proc.wait(10)
            took = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 1
    assert took < 10
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: connection 1 (main channel by order, qemu-7.2) does not start with the QEVM "
        "magic: first bytes 0x8e2f61d0"), err
