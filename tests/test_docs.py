"""docs/architecture.md names only what exists: every `multifd....` module or class it
mentions imports, every handler in its table is the right kind of handler, every package
path exists. Cheap, and it keeps the page from drifting away from the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from multifd.migration.handlers import LoadHandler, SaveHandler

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
DOTTED = sorted(set(re.findall(r"`(multifd(?:\.[A-Za-z_]\w*)+)`", DOC)))


def _resolve(name: str) -> object:
    """The module `name`, or the attribute its last parts name in the longest module."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_the_page_names_things() -> None:
    assert len(DOTTED) > 20


@pytest.mark.parametrize("name", DOTTED)
def test_every_dotted_name_exists(name: str) -> None:
    _resolve(name)


def test_handler_table_pairs_save_and_load_handlers() -> None:
    rows = [line for line in DOC.splitlines()
            if line.startswith("|") and "Handler`" in line]
    assert len(rows) == 4
    for row in rows:
        save, load = re.findall(r"`(multifd\.[\w.]+)`", row)
        assert issubclass(_resolve(save), SaveHandler), save  # type: ignore[arg-type]
        assert issubclass(_resolve(load), LoadHandler), load  # type: ignore[arg-type]


def test_paths_exist() -> None:
    for path in set(re.findall(r"`((?:multifd|tests|fuzz|docs)/[\w./]*)`", DOC)):
        base = ROOT / "src" if path.startswith("multifd/") else ROOT
        assert (base / path).exists(), path
