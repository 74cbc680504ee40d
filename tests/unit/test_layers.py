"""The package's layers: `settings` is the ground floor, and no import circle anywhere.

Read from the source with `ast` (nothing is imported), so the test sees function-local imports too:
library modules import the package's own modules at the top; only the command line (`cli`, for its
start-up time) may import them inside functions. Optional third-party dependencies may be imported
lazily anywhere (they are not package modules)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "smoothadv"
LAZY_ALLOWED = {"cli", "__main__"}


def _imports(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(package modules imported at the top, package modules imported inside functions, other top-level roots)."""
    tree = ast.parse(path.read_text())
    top, local, other = set(), set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if _in_type_checking(tree, node):
            continue  # for annotations only: not an import at run time
        nested = node not in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            (local if nested else top).update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and not nested:
            other.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import) and not nested:
            other.update(alias.name.split(".")[0] for alias in node.names)
    return top, local, other


def _in_type_checking(tree: ast.Module, target: ast.AST) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(child is target for child in ast.walk(node)):
                return True
    return False


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        top, local, _ = _imports(path)
        graph[path.stem] = (top | local) - {path.stem}
    return graph


def test_settings_imports_only_the_standard_library_and_errors():
    top, local, other = _imports(PACKAGE / "settings.py")
    assert top | local == {"errors"}
    stdlib = set(sys.stdlib_module_names) | {"__future__", "tomli"}
    assert other <= stdlib, f"settings imports {sorted(other - stdlib)}"


def test_library_modules_import_the_package_at_the_top():
    lazy = {path.stem: sorted(_imports(path)[1]) for path in PACKAGE.glob("*.py")
            if path.stem not in LAZY_ALLOWED and path.stem != "__init__"}
    assert {name: mods for name, mods in lazy.items() if mods} == {}


def test_no_import_circle():
    graph = _graph()
    graph.pop("__init__", None)
    for name in graph:
        graph[name].discard("__init__")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt in graph and state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_the_circle_detector_sees_a_circle(tmp_path, monkeypatch):
    """Negative control: two modules importing each other are reported."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    try:
        test_no_import_circle()
    except AssertionError as exc:
        assert "a -> b -> a" in str(exc)
    else:
        raise AssertionError("the circle a <-> b was not found")
