"""docs/guide.md runs as written: every fenced block is `python` or `sh`, and each one is
run, in order, in one scratch directory that holds what the guide says it expects
(`./tls`: TLS credentials in QEMU's layout; `examples/`: the repository's examples), with
this interpreter's `bin/` first on PATH (`python`, `multifd`, `qmp-shell`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.security.certs import make_creds

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "guide.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", GUIDE, re.S | re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("guide")
    make_creds(d / "tls")
    (d / "examples").symlink_to(ROOT / "examples")
    return d


def test_every_block_is_runnable_code() -> None:
    assert len(BLOCKS) >= 10
    assert {lang for lang, _ in BLOCKS} <= {"python", "sh"}, "untested block kind"


def test_links_point_at_files_and_sections() -> None:
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
               for h in re.findall(r"^#+ (.*)$", GUIDE, re.M)}
    for target in re.findall(r"\]\(#([\w-]+)\)", GUIDE):
        assert target in anchors, target
    for path in set(re.findall(r"`((?:examples|bench|docs|tests|fuzz)/[\w./]*)`", GUIDE)):
        assert (ROOT / path).exists(), path
    for path in set(re.findall(r"`(multifd/[\w/]+\.py)`", GUIDE)):
        assert (ROOT / "src" / path).exists(), path


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs(index: int, workdir: Path) -> None:
    lang, code = BLOCKS[index]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    # a failing sh block must not leave its background jobs (QEMU, multifd serve) behind
    reap = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-ec", reap + code]
    out = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                         timeout=240, check=False)
    assert out.returncode == 0, (f"block {index} ({lang}) failed:\n{code}\n--- stdout\n"
                                 f"{out.stdout[-2000:]}\n--- stderr\n{out.stderr[-3000:]}")
