"""The package's layers: `settings` is the ground floor, and no import circle anywhere; and the test suite's: the
unit tests never drive the command line.

Read from the source with `ast` (nothing is imported), so the test sees function-local imports too:
library modules import the package's own modules at the top; only the command line (`cli`, for its
start-up time) may import them inside functions. Optional third-party dependencies may be imported
lazily anywhere (they are not package modules).

tests/unit holds one file per module and runs in seconds; whatever runs the command line (`smoothadv.cli` or
`smoothadv.__main__`, the `run_command` helper of tests/conftest.py, the `smoothadv` command in a subprocess)
belongs in tests/e2e."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "smoothadv"
UNIT_TESTS = Path(__file__).resolve().parent
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


# ------------------------------------------------------------------ the unit tests never drive the command line

# spelled so that these lines do not name the modules themselves
COMMAND_MODULES = tuple(f"smoothadv.{name}" for name in ("cli", "__main__"))
RUNNABLE = ("smoothadv", COMMAND_MODULES[1])  # what `python -m` runs
PROCESS_CALLS = {"run", "call", "check_call", "check_output", "Popen", "getoutput", "getstatusoutput", "system",
                 "popen", "spawnl", "spawnlp", "spawnv", "spawnvp", "execl", "execlp", "execv", "execvp",
                 "create_subprocess_exec", "create_subprocess_shell", "run_module", "which"}


def _names_the_command(text: str) -> bool:
    """A command line (or its first word) that runs `smoothadv`: `smoothadv ...`, `python -m smoothadv ...`."""
    words = text.split()
    return bool(words) and (words[0] == "smoothadv" or any(a == "-m" and b in RUNNABLE
                                                           for a, b in zip(words, words[1:])))


def _command_line_uses(path: Path) -> list[str]:
    """Each place where a test file runs the command line, as `file:line: what`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Import):
            if any(alias.name.startswith(COMMAND_MODULES) for alias in node.names):
                what = "imports the command line"
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(COMMAND_MODULES) or (
                    node.module == "smoothadv" and {alias.name for alias in node.names} & {"cli", "__main__"}):
                what = "imports the command line"
            elif any(alias.name == "run_command" for alias in node.names):
                what = "imports run_command"
        elif isinstance(node, ast.Name) and node.id == "run_command":
            what = "uses run_command"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "smoothadv" \
                and node.attr in ("cli", "__main__"):
            what = "uses smoothadv.cli"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(COMMAND_MODULES):
            what = f"names {node.value!r}"  # import_module, monkeypatch.setattr, mock.patch
        elif isinstance(node, (ast.List, ast.Tuple)):
            words = [elt.value if isinstance(elt, ast.Constant) and isinstance(elt.value, str) else "\0"
                     for elt in node.elts]
            if any(a == "-m" and b in RUNNABLE for a, b in zip(words, words[1:])):
                what = "runs python -m smoothadv"
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in PROCESS_CALLS and any(isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                                             and _names_the_command(arg.value)
                                             for argument in [*node.args, *(k.value for k in node.keywords)]
                                             for arg in ast.walk(argument)):
                what = f"runs the smoothadv command ({name})"
        if what:
            found.append(f"{path.name}:{node.lineno}: {what}")
    return found


def test_unit_tests_never_drive_the_command_line():
    """The command line's tests live in tests/e2e (move a new one there, next to the tests of its subject)."""
    found = [use for path in sorted(UNIT_TESTS.glob("*.py")) for use in _command_line_uses(path)]
    assert found == [], "tests/unit drives the command line (move these tests to tests/e2e):\n" + "\n".join(found)


def test_the_command_line_detector_sees_every_way_in(tmp_path):
    """Negative control: each way of running the command line is reported; the look-alikes the unit tests have (an
    objective named smoothadv, mypy in a subprocess, every module imported by name) are not."""
    (tmp_path / "test_bad.py").write_text(
        "import subprocess, sys, importlib, runpy, shutil, os\n"
        "import smoothadv\n"
        "import smoothadv.cli\n"                                            # 3
        "from smoothadv.cli import main\n"                                  # 4
        "from smoothadv import cli\n"                                       # 5
        "from smoothadv.__main__ import main as entry\n"                    # 6
        "from conftest import run_command\n"                                # 7
        "def test_x(capsys, monkeypatch):\n"
        "    run_command(['certify'], capsys)\n"                            # 9
        "    smoothadv.cli.main(['--help'])\n"                              # 10
        "    importlib.import_module('smoothadv.cli')\n"                    # 11
        "    subprocess.run([sys.executable, '-m', 'smoothadv', '--help'])\n"  # 12
        "    subprocess.run(['smoothadv', 'certify'])\n"                    # 13
        "    os.system('python -m smoothadv report a.tsv')\n"               # 14
        "    runpy.run_module('smoothadv', run_name='__main__')\n"          # 15
        "    shutil.which('smoothadv')\n")                                  # 16
    lines = {int(use.split(":")[1]) for use in _command_line_uses(tmp_path / "test_bad.py")}
    assert lines == set(range(3, 17)) - {8}, sorted(lines)
    (tmp_path / "test_fine.py").write_text(
        "import importlib, subprocess, sys\n"
        "from smoothadv.objectives import build_objective\n"
        "def test_y(tmp_path):\n"
        "    build_objective('smoothadv', 0.25, {'m': 2}, None)\n"
        "    assert {'gaussian', 'smoothadv'} and ['smoothadv', 'macer']\n"
        "    subprocess.run([sys.executable, '-m', 'mypy', 'src/smoothadv'])\n"
        "    for stem in ('cli', 'stats'):\n"
        "        importlib.import_module(f'smoothadv.{stem}')\n")
    assert _command_line_uses(tmp_path / "test_fine.py") == []
