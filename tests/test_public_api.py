"""The package's public API and import structure: the names `multifd` exports, the layering
rule of the channel core, and an import graph without cycles (checked on the source with
`ast`, so CI enforces them without running any migration)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import multifd

pytestmark = pytest.mark.timeout(120)

SRC = Path(multifd.__file__).resolve().parent  # src/multifd
CORE = SRC / "multifd"  # the channel core: src/multifd/multifd
# What the core may import from this package: the codecs and itself.
CORE_ALLOWED = ("multifd.wire", "multifd.compress", "multifd.multifd")

PUBLIC = {
    "BytesDevice": "multifd.machine.device",
    "Device": "multifd.machine.device",
    "Machine": "multifd.machine.machine",
    "MigrationCapabilities": "multifd.migration.params",
    "MigrationDestination": "multifd.migration.destination",
    "MigrationParameters": "multifd.migration.params",
    "MigrationSource": "multifd.migration.source",
    "MigrationStatus": "multifd.migration.status",
    "PickleDevice": "multifd.machine.device",
    "Profile": "multifd.migration.profile",
    "QEMU_10": "multifd.migration.profile",
    "QEMU_7_2": "multifd.migration.profile",
    "RamBlock": "multifd.machine.ramblock",
    "get_profile": "multifd.migration.profile",
}


# -- public API --------------------------------------------------------------------------


def test_public_names_import_from_the_package() -> None:
    from multifd import (  # noqa: F401  (the import itself is the test)
        QEMU_7_2,
        QEMU_10,
        BytesDevice,
        Device,
        Machine,
        MigrationCapabilities,
        MigrationDestination,
        MigrationParameters,
        MigrationSource,
        MigrationStatus,
        PickleDevice,
        Profile,
        RamBlock,
        __version__,
        get_profile,
    )

    assert isinstance(__version__, str) and __version__


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_is_the_object_of_its_module(name: str) -> None:
    value = getattr(multifd, name)
    assert value is getattr(importlib.import_module(PUBLIC[name]), name)
    if isinstance(value, type):
        assert value.__module__ == PUBLIC[name]  # defined there, not re-exported


def test_all_lists_exactly_the_public_names() -> None:
    assert sorted(multifd.__all__) == sorted([*PUBLIC, "__version__"])
    assert set(dir(multifd)) >= set(multifd.__all__)
    with pytest.raises(AttributeError):
        _ = multifd.NoSuchName  # type: ignore[attr-defined]


def test_profiles_are_the_named_ones() -> None:
    assert multifd.get_profile("qemu-10") is multifd.QEMU_10
    assert multifd.get_profile("qemu-7.2") is multifd.QEMU_7_2


def test_import_multifd_loads_no_engine() -> None:
    """`import multifd` (run first by every submodule import and by the CLI) stays cheap:
    the public names are loaded on first use."""
    code = ("import sys, multifd; "
            "print(sorted(m for m in sys.modules if m.startswith('multifd') or m == 'numpy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "['multifd']"


# -- import graph ------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imported(module: str, is_package: bool, nodes: Iterator[ast.AST]) -> Iterator[str]:
    """Every module name the import statements among `nodes` load: for `from a import b`
    both `a` and `a.b` (the caller keeps the ones that are modules); string arguments of
    `importlib.import_module` / `__import__` too."""
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"
                if base == "multifd" and alias.name in PUBLIC:  # the lazy re-exports
                    yield PUBLIC[alias.name]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            yield node.args[0].value


def _module_level(tree: ast.Module) -> Iterator[ast.AST]:
    """The nodes run when the module is imported: module-level statements, through
    if/try/with blocks but not into functions, classes' methods or `if TYPE_CHECKING:`."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_core_depends_only_on_wire_compress_and_itself() -> None:
    """The layering rule of `multifd.multifd`: every import in it (in functions and
    `if TYPE_CHECKING:` blocks too) of this package is of wire, compress or the core."""
    bad: set[tuple[str, str]] = set()
    for path in sorted(CORE.rglob("*.py")):
        mod = _module_name(path)
        for name in _imported(mod, path.name == "__init__.py", ast.walk(_parse(path))):
            if (name == "multifd" or name.startswith("multifd.")) and not any(
                    name == a or name.startswith(a + ".") for a in CORE_ALLOWED):
                bad.add((mod, name))
    # `from a import b` yields a and a.b: name only a
    shown = [f"{m}: {n}" for m, n in sorted(bad)
             if (m, n.rpartition(".")[0]) not in bad]
    assert CORE.is_dir() and list(CORE.glob("*.py"))
    assert not shown, "the channel core imports from layers above it:\n" + "\n".join(shown)


def _import_graph(import_time_only: bool = True) -> dict[str, set[str]]:
    """module -> the package modules it imports: at module level only (what importing it
    runs), or anywhere in it. Importing `a.b.c` runs the packages `a` and `a.b` first:
    those count too unless they enclose the importer (then they are being imported
    already)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        own = {mod} if is_package else set()
        own |= {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        deps: set[str] = set()
        tree = _parse(path)
        nodes = _module_level(tree) if import_time_only else ast.walk(tree)
        for name in _imported(mod, is_package, nodes):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target not in own:
                    deps.add(target)
        graph[mod] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle() -> None:
    graph = _import_graph()
    assert "multifd.multifd.sender" in graph["multifd.multifd"]  # the graph sees imports
    assert "multifd.multifd._io" in graph["multifd.transport.sockets"]
    assert _cycles(graph) == []


def test_no_module_circle_even_through_lazy_imports() -> None:
    """Imports inside functions count here too: two modules that import each other, even
    lazily, share code that belongs in a third."""
    graph = _import_graph(import_time_only=False)
    assert "multifd.commands.demo_procs" in graph["multifd.testing.demo_faults"]
    assert _cycles(graph) == []


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Each module on its own, first thing in a new interpreter (an import cycle shows up
    as an ImportError that depends on which module is imported first)."""
    names = [m for m in _modules() if not m.endswith("__main__")]
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m == 'multifd' or m.startswith('multifd.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    subprocess.run([sys.executable, "-c", code, *names], check=True, timeout=100)
