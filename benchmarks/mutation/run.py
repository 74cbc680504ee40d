"""Mutation benchmark of smoothadv's core modules: one command, run before a release (not in CI).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation/run.py [MODULE ...] [--max-minutes M]

For each module of `config.toml` (all of them by default), in a temporary copy of the committed `src/`
(`git archive HEAD`; `--revision ""` takes the working tree) outside the repository:

1. a baseline run of the module's test files, traced, records which tests execute which lines of the
   module (tests that fail on the unmutated code are left out);
2. every mutant (one realistic one-line programmer error, see `OPERATORS` below) is written into the copy
   and the tests that execute the mutated statement are run in a forked interpreter (torch, numpy, scipy
   and pytest imported once, smoothadv imported fresh from the copy), stopping at the first failure.
   A mutant is *killed* (a test failed; the first failing test is recorded), *timeout* (counted as killed:
   the mutant hangs), or *survived* (every covering test passed, or no test covers the statement);
3. the per-mutant outcome goes to `benchmarks/mutation/out/<module>.json` (committed) and the summary
   with the judgements of `annotations.toml` (equivalent mutants, known survivors, one-line reason each) to
   `benchmarks/mutation/out/<module>.md`; `results.md` is the committed copy of those summaries.

The mutation operators are those of mutmut and cosmic-ray restricted to errors a programmer makes in one
line: an arithmetic or comparison operator replaced by its neighbour (`<` by `<=`, `+` by `-`, `*` by `/`),
`and`/`or` swapped, a `not` or a unary minus dropped, a number changed (n -> n + 1), True/False swapped,
`min`/`max`, `argmax`/`argmin`, `sum`/`mean` swapped, a `.detach()` dropped, and a bare call statement
(an in-place update such as `x.zero_()`) deleted. Docstrings, the text of error messages (anything inside
`raise`), type annotations and decorators are not mutated. Mutant keys are `function: before -> after`
(plus `#k` when repeated), so annotations survive line shifts.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef, unused-ignore]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE / "out"

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
NAMES = {"min": "max", "max": "min", "argmax": "argmin", "argmin": "argmax", "amax": "amin", "amin": "amax",
         "clamp_min": "clamp_max", "clamp_max": "clamp_min", "sum": "mean", "mean": "sum", "minimum": "maximum",
         "maximum": "minimum"}
OPERATORS = "binop, compare, boolop, unary, number, bool, name-swap, detach, call-statement (+ add-detach: `extra`)"
ADD_DETACH = {"softmax", "log_softmax", "exp", "mean", "sum", "float", "view", "gather", "kl_div", "cross_entropy",
              "nll_loss", "log", "logsumexp", "topk", "sort"}
"""`add-detach` (a module's `extra` operator): `y = <call>` becomes `y = (<call>).detach()` when the call is one of
these tensor operations or the model itself: a gradient cut where the method lets it flow."""


# ------------------------------------------------------------------ mutants


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _excluded(node: ast.AST, parents: dict[ast.AST, ast.AST], skip: set[str]) -> bool:
    """Inside a docstring, a raise, an f-string, an annotation, a decorator, or a skipped function."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, (ast.Raise, ast.JoinedStr)):
            return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if child in parent.decorator_list or child is getattr(parent, "returns", None):
                return True
            if parent.name in skip:
                return True
        if isinstance(parent, ast.arg) and child is parent.annotation:
            return True
        if isinstance(parent, ast.AnnAssign) and child is parent.annotation:
            return True
        if isinstance(parent, ast.Expr) and isinstance(child, ast.Constant) and isinstance(child.value, str):
            return True
        child, parent = parent, parents.get(parent)
    return False


def _qualname(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str:
    names = []
    parent = parents.get(node)
    while parent is not None:
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(parent.name)
        parent = parents.get(parent)
    return ".".join(reversed(names)) or "<module>"


def _class_range(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[int] | None:
    """Line range of the outermost class around `node` (its body runs at import: tests using the class see it)."""
    found = None
    parent = parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.ClassDef):
            found = [parent.lineno, parent.end_lineno or parent.lineno]
        parent = parents.get(parent)
    return found


def _statement(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.AST:
    while not isinstance(node, ast.stmt) and node in parents:
        node = parents[node]
    return node


def _mutations(node: ast.AST, parents: dict[ast.AST, ast.AST], extra: frozenset[str] = frozenset()
               ) -> list[tuple[str, object]]:
    """(operator, argument) pairs applicable to `node`."""
    found: list[tuple[str, object]] = []
    if "add-detach" in extra and isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
        func = node.value.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in ADD_DETACH or name == "model":
            found.append(("add-detach", None))
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOPS:
        found.append(("binop", BINOPS[type(node.op)]))
    elif isinstance(node, ast.Compare):
        found.extend(("compare", i) for i, op in enumerate(node.ops) if type(op) in CMPOPS)
    elif isinstance(node, ast.BoolOp):
        found.append(("boolop", None))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        found.append(("unary", None))
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            found.append(("bool", None))
        elif isinstance(node.value, (int, float)) and not isinstance(parents.get(node), ast.UnaryOp):
            found.append(("number", None))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        pass
    elif isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in NAMES:
            found.append(("name-swap", None))
        if name == "detach" and isinstance(func, ast.Attribute) and not node.args:
            found.append(("detach", None))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        found.append(("call-statement", None))
    return found


def _apply(node: ast.AST, operator: str, argument: object) -> ast.AST | None:
    """Mutate `node` in place, or return the node that replaces it."""
    if operator == "binop":
        node.op = argument()  # type: ignore[attr-defined, operator]
    elif operator == "compare":
        ops = node.ops  # type: ignore[attr-defined]
        ops[argument] = CMPOPS[type(ops[argument])]()
    elif operator == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()  # type: ignore[attr-defined]
    elif operator == "unary":
        return node.operand  # type: ignore[attr-defined]
    elif operator == "bool":
        node.value = not node.value  # type: ignore[attr-defined]
    elif operator == "number":
        node.value = node.value + 1  # type: ignore[attr-defined]
    elif operator == "name-swap":
        func = node.func  # type: ignore[attr-defined]
        if isinstance(func, ast.Attribute):
            func.attr = NAMES[func.attr]
        else:
            func.id = NAMES[func.id]
    elif operator == "detach":
        return node.func.value  # type: ignore[attr-defined]
    elif operator == "call-statement":
        return ast.Pass()
    elif operator == "add-detach":
        value = node.value  # type: ignore[attr-defined]
        node.value = ast.Call(ast.Attribute(value, "detach", ast.Load()), [], [])  # type: ignore[attr-defined]
    return None


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return self.replacement
        return self.generic_visit(node)


def mutants(source: str, skip: set[str], extra: frozenset[str] = frozenset()) -> list[dict]:
    """Every mutant of `source`: key, line, statement line range, class scope, and where it is (`position`, the
    node's index in `ast.walk` order, with `operator` and `argument`) for `mutated_source`."""
    tree = ast.parse(source)
    parents = _parents(tree)
    index = {id(node): i for i, node in enumerate(ast.walk(tree))}
    points: list[tuple[Any, str, Any]] = []
    for node in ast.walk(tree):
        if not hasattr(node, "lineno") or _excluded(node, parents, skip):
            continue
        for operator, argument in _mutations(node, parents, extra):
            points.append((node, operator, argument))
    points.sort(key=lambda p: (p[0].lineno, p[0].col_offset, p[1]))
    result: list[dict] = []
    seen: dict[str, int] = {}
    for node, operator, argument in points:
        target = copy.deepcopy(node)
        before = _text(target)
        replacement = _apply(target, operator, argument)
        after = _text(replacement if replacement is not None else target)
        statement = _statement(node, parents)
        base = f"{_qualname(node, parents)}: {_short(before)} -> {_short(after)}"
        seen[base] = seen.get(base, 0) + 1
        key = base if seen[base] == 1 else f"{base} #{seen[base]}"
        first = getattr(statement, "lineno", node.lineno)
        result.append({"key": key, "line": node.lineno, "operator": operator,
                       "lines": [first, getattr(statement, "end_lineno", first)],
                       "scope": _class_range(node, parents), "position": index[id(node)], "argument": argument})
    return result


def _text(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text.splitlines()[0] if isinstance(node, ast.stmt) and text else text


def mutated_source(source: str, mutant: dict) -> str:
    """`source` with `mutant` applied (parsed afresh: `ast.walk` visits the nodes in the same order)."""
    tree: ast.AST = ast.parse(source)
    target = list(ast.walk(tree))[mutant["position"]]
    replacement = _apply(target, mutant["operator"], mutant["argument"])
    if replacement is not None:
        tree = _Replace(target, replacement).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree))


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------ running tests in a forked interpreter


def _preload() -> None:
    """Import the heavy dependencies once, in the parent, before any fork (smoothadv itself is not imported)."""
    sys.dont_write_bytecode = True
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import scipy.special  # noqa: F401
    import scipy.stats  # noqa: F401
    import torch

    torch.set_num_threads(1)
    try:
        import hypothesis

        hypothesis.settings.register_profile("mutation", database=None)
        hypothesis.settings.load_profile("mutation")
    except ImportError:
        pass
    # the third-party modules smoothadv and the tests import (torchvision, matplotlib, ...) are loaded once here:
    # import the package, then forget every module of this repository, so each child imports smoothadv afresh
    import importlib
    import pkgutil

    with contextlib.suppress(Exception):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    with contextlib.suppress(Exception):
        import smoothadv

        for info in pkgutil.iter_modules(smoothadv.__path__, "smoothadv."):
            if info.name.endswith("__main__"):
                continue
            with contextlib.suppress(Exception):
                importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if name == "smoothadv" or name.startswith("smoothadv.") or \
                any(path.startswith(str(ROOT / folder) + os.sep) for folder in ("src", "tests")):
            del sys.modules[name]


class _Recorder:
    """pytest plugin: per test outcome and duration, the first failing test, and (when tracing) the lines of
    `target` each test executes (lines executed outside any test, at import, go under "")."""

    def __init__(self, target: str | None) -> None:
        self.target = target
        self.current = ""
        self.lines: dict[str, set[int]] = {"": set()}
        self.outcomes: dict[str, str] = {}
        self.durations: dict[str, float] = {}
        self.first_failure: str | None = None

    def tracer(self, frame, event, arg):  # noqa: ANN001, ANN201
        if frame.f_code.co_filename != self.target:
            return None
        lines = self.lines.setdefault(self.current, set())

        def local(frame, event, arg):  # noqa: ANN001, ANN202
            if event == "line":
                lines.add(frame.f_lineno)
            return local

        lines.add(frame.f_lineno)
        return local

    def pytest_runtest_logstart(self, nodeid, location):  # noqa: ANN001, ANN201
        self.current = nodeid

    def pytest_runtest_logreport(self, report):  # noqa: ANN001, ANN201
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration
        if report.failed or (report.when == "call" and not report.passed and not report.skipped):
            self.outcomes[report.nodeid] = "failed"
            if self.first_failure is None:
                self.first_failure = report.nodeid
        elif report.when == "call" and report.nodeid not in self.outcomes:
            self.outcomes[report.nodeid] = "skipped" if report.skipped else "passed"

    def pytest_runtest_logfinish(self, nodeid, location):  # noqa: ANN001, ANN201
        self.current = ""


def _mutant_run(src: Path, args: list[str], result: Path, log: Path, timeout: float) -> tuple[str, dict]:
    """`_forked` on a mutant (no tracing): its outcome and what the recorder wrote ({} if nothing), the file removed."""
    outcome = _forked(src, args, result, log, None, timeout)
    data = json.loads(result.read_text()) if result.exists() else {}
    result.unlink(missing_ok=True)
    return outcome, data


def _forked(src: Path, args: list[str], result: Path, log: Path, target: str | None, timeout: float) -> str:
    """Run pytest with `args` in a forked child importing smoothadv from `src`; 'ok', 'failed' or 'timeout'."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.setpgid(0, 0)
            sys.path.insert(0, str(src))
            os.environ["PYTHONPATH"] = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            import threading

            import pytest

            recorder = _Recorder(target)
            if target:
                threading.settrace(recorder.tracer)
                sys.settrace(recorder.tracer)
            code = pytest.main(args, plugins=[recorder])
            sys.settrace(None)
            result.write_text(json.dumps({"code": int(code), "first_failure": recorder.first_failure,
                                          "outcomes": recorder.outcomes, "durations": recorder.durations,
                                          "lines": {k: sorted(v) for k, v in recorder.lines.items()}}))
        finally:
            sys.stdout.flush()
            os._exit(int(code) if isinstance(code, int) else 3)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "ok" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def _pytest_args(tests: list[str], stop_first: bool) -> list[str]:
    args = ["-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", "-W", "ignore"]
    return args + (["-x"] if stop_first else []) + tests


# ------------------------------------------------------------------ one module


def run_module(name: str, spec: dict, work: Path, max_minutes: float | None, partial: Path | None = None,
               revision: str | None = "HEAD", added: tuple[str, ...] = (), retry: dict | None = None) -> dict:
    file = ROOT / spec["file"]
    src = work / "src"
    if revision:  # the committed tree (package, tests, configs): edits in progress are not measured, and
        # tests moved or edited in the working tree while the benchmark runs do not disturb it
        tree = work / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir()
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{revision}^{{commit}}"],
                                check=True, capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        src = tree / "src"
        os.chdir(tree)
    else:
        commit = "working tree"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        os.chdir(ROOT)
    tests = [t for t in spec["tests"] if Path(t).exists()]
    copy_file = src / file.relative_to(ROOT / "src")
    source = copy_file.read_text()
    result_file, log = work / "result.json", work / "log.txt"

    started = time.monotonic()
    status = _forked(src, _pytest_args(tests, False), result_file, log, str(copy_file), 3600)
    if not result_file.exists():
        raise SystemExit(f"baseline of {name} did not run ({status}); see {log}:\n{log.read_text()[-3000:]}")
    baseline = json.loads(result_file.read_text())
    result_file.unlink()
    baseline_time = time.monotonic() - started
    passing = [t for t, outcome in baseline["outcomes"].items() if outcome == "passed"]
    limit = spec.get("max_test_seconds")
    slow = sorted(t for t in passing if limit is not None and baseline["durations"].get(t, 0.0) > limit
                  and t.split("::")[0] not in added)  # the added files are guarantee tests, sized to be run
    passing = [t for t in passing if t not in slow]  # end-to-end runs: too slow to repeat for every mutant
    if not passing:
        raise SystemExit(f"baseline of {name}: no test passed; the end of its output:\n{log.read_text()[-3000:]}")
    failing = sorted(t for t, outcome in baseline["outcomes"].items() if outcome == "failed")
    import_lines = set(baseline["lines"].get("", []))
    # run order: the older test files first, then the files this benchmark added (so the first failure says
    # whether the older suite alone kills the mutant); fastest first within each group (quicker kills)
    durations = baseline["durations"]
    order = sorted(passing, key=lambda t: (t.split("::")[0] in added, durations.get(t, 0.0)))
    covering: dict[int, list[str]] = {}
    for test in passing:
        for line in baseline["lines"].get(test, []):
            covering.setdefault(line, []).append(test)
    print(f"[{name}] baseline: {len(passing)} passing tests, {len(failing)} failing (left out), "
          f"{baseline_time:.0f} s", flush=True)

    records = []
    all_mutants = mutants(source, set(spec.get("skip", [])), frozenset(spec.get("extra", [])))
    previous: dict[str, dict] = {}
    if retry is not None:  # rerun only the survivors of a previous run; keep its other verdicts
        previous = {r["key"]: r for r in retry["records"]}
    for number, mutant in enumerate(all_mutants, 1):
        if mutant["key"] in previous and previous[mutant["key"]]["status"] != "survived":  # a timeout is a kill
            records.append(previous[mutant["key"]])
            continue
        if max_minutes is not None and time.monotonic() - started > 60 * max_minutes:
            print(f"[{name}] time budget reached after {number - 1} mutants", flush=True)
            # a retry keeps the verdicts of the previous run for the mutants it did not get to
            records += [previous[m["key"]] for m in all_mutants[number - 1:] if m["key"] in previous]
            break
        first, last = mutant["lines"]
        selected: list[str] = []
        for line in range(first, last + 1):
            selected.extend(covering.get(line, []))
        if any(line in import_lines for line in range(first, last + 1)):
            # executed at import (a default, a constant, an object a test module builds when collected): the tests
            # that execute it again, plus those that use its class, else any test
            scope = mutant["scope"]
            if scope:
                for line in range(scope[0], scope[1] + 1):
                    selected.extend(covering.get(line, []))
            selected = selected or list(passing)
        selected = sorted(set(selected), key=order.index)
        record = {k: mutant[k] for k in ("key", "line", "operator")}
        if not selected:
            record.update(status="survived", detail="no test executes this statement")
        else:
            copy_file.write_text(mutated_source(source, mutant))
            # generous: a busy machine slows the tests several-fold, and a slow run is not a kill
            budget = 60 + 10 * sum(baseline["durations"].get(t, 1.0) for t in selected)
            t0 = time.monotonic()
            outcome, data = _mutant_run(src, _pytest_args(selected, True), result_file, log, budget)
            if outcome == "failed" and not data.get("first_failure") and "no match in any of" in log.read_text(
                    errors="replace"):  # a test id built from a mutated constant: not a kill; run their files
                files = sorted({t.split("::")[0] for t in selected}, key=lambda f: min(
                    order.index(t) for t in selected if t.startswith(f"{f}::")))
                outcome, data = _mutant_run(src, _pytest_args(files, True), result_file, log, budget)
            if outcome == "timeout":
                record.update(status="timeout", detail=f"over {budget:.0f} s")
            elif outcome == "failed":
                record.update(status="killed", detail=data.get("first_failure") or _last_line(log))
            else:
                record.update(status="survived", detail=f"{len(selected)} covering tests pass")
            record["seconds"] = round(time.monotonic() - t0, 1)
            record["tests"] = len(selected)
        records.append(record)
        print(f"[{name}] {number}/{len(all_mutants)} {record['status']:8} {record.get('seconds', 0):5.1f}s "
              f"{mutant['key']}", flush=True)
        if partial is not None:  # keep what is done, should the run be stopped (a retry: with the verdicts of
            # the previous run for the mutants it has not reached yet)
            kept = [previous[m["key"]] for m in all_mutants[number:] if m["key"] in previous]
            partial.write_text(json.dumps({"module": name, "file": spec["file"], "revision": commit,
                                           "tests": tests, "stopped": True,
                                           "baseline_failing": failing, "slow": slow, "mutants": len(all_mutants),
                                           "records": records + kept,
                                           "seconds": round(time.monotonic() - started, 1)}, indent=1))
    copy_file.write_text(source)
    return {"module": name, "file": spec["file"], "revision": commit, "tests": tests, "baseline_failing": failing,
            "slow": slow,
            "baseline_seconds": round(baseline_time, 1), "mutants": len(all_mutants), "records": records,
            "seconds": round(time.monotonic() - started, 1)}


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


# ------------------------------------------------------------------ summary


def _measured_on(revision: str | None) -> str:
    """', on commit <12 hex digits>' (or ', on the working tree'); nothing for a record older than the field."""
    if not revision:
        return ""
    return ", on the working tree" if revision == "working tree" else f", on commit {revision[:12]}"


def summarize(run: dict, annotations: dict, added: list[str]) -> str:
    """The module's section of results.md. "Before" counts the kills of the test files not in `added` (they run
    first and stop at the first failure, so a mutant first failed by an added file survived the others)."""
    notes = annotations.get(run["module"], {})
    counts = {"killed": 0, "survived": 0, "equivalent": 0, "killed_before": 0}
    survivors, equivalents = [], []
    for record in run["records"]:
        note = notes.get(record["key"])
        if record["status"] in ("killed", "timeout"):
            counts["killed"] += 1
            counts["timeout"] = counts.get("timeout", 0) + (record["status"] == "timeout")
            by = str(record.get("detail", "")).split("::")[0]
            counts["killed_before"] += by not in added
        elif note and note.get("status") == "equivalent":
            counts["equivalent"] += 1
            equivalents.append(f"- `{record['key']}` (line {record['line']}): {note['reason']}")
        else:
            counts["survived"] += 1
            reason = note["reason"] if note else record["detail"]
            survivors.append(f"- `{record['key']}` (line {record['line']}): {reason}")
    scored = counts["killed"] + counts["survived"]
    score = 100.0 * counts["killed"] / scored if scored else 100.0
    before = 100.0 * counts["killed_before"] / scored if scored else 100.0
    stopped = " (stopped before its end: the later mutants were not run)" if run.get("stopped") else ""
    lines = [f"## {run['module']} ({run.get('file', '')}){stopped}", "",
             f"{len(run['records'])} of {run.get('mutants', '?')} mutants run in {run.get('seconds', 0):.0f} s: "
             f"{counts['killed']} killed ({counts.get('timeout', 0)} by a timeout), {counts['survived']} survived, "
             f"{counts['equivalent']} equivalent{_measured_on(run.get('revision'))}. "
             f"Score (killed / non-equivalent): **{score:.1f}%**; by the tests that existed before this benchmark "
             f"({counts['killed_before']} killed): {before:.1f}%.", "",
             "Tests: " + ", ".join(f"`{t}`" for t in run.get("tests", [])) + ".", ""]
    if run.get("slow"):
        lines += ["Not run per mutant (over the module's max_test_seconds at baseline): "
                  + ", ".join(f"`{t}`" for t in run["slow"]), ""]
    if run.get("baseline_failing"):
        lines += ["Failing before mutation (left out): " + ", ".join(f"`{t}`" for t in run["baseline_failing"]), ""]
    if survivors:
        lines += ["Survived:", "", *survivors, ""]
    if equivalents:
        lines += ["Equivalent:", "", *equivalents, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules of config.toml (default: all)")
    parser.add_argument("--config", default=str(HERE / "config.toml"))
    parser.add_argument("--annotations", default=str(HERE / "annotations.toml"))
    parser.add_argument("--max-minutes", type=float, default=None, help="per-module time budget")
    parser.add_argument("--revision", default="HEAD", help="git revision of src/ to mutate (default HEAD: the "
                        "committed package); an empty string mutates the working tree as it is")
    parser.add_argument("--retry", action="store_true", help="rerun only the mutants that survived "
                        "the last run (out/<module>.json), e.g. after adding tests")
    parser.add_argument("--results", action="store_true", help="also write results.md (the committed summary)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--summarize", action="store_true", help="rebuild the summaries from out/*.json and exit")
    args = parser.parse_args(argv)
    settings = tomllib.loads(Path(args.config).read_text())
    config, added = settings["modules"], list(settings.get("added", []))
    annotations_path = Path(args.annotations)
    annotations = tomllib.loads(annotations_path.read_text()) if annotations_path.exists() else {}
    names = args.modules or list(config)
    unknown = [n for n in names if n not in config]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; config.toml has {', '.join(config)}")
    OUT.mkdir(exist_ok=True)
    if args.list:
        for name in names:
            for mutant in mutants((ROOT / config[name]["file"]).read_text(), set(config[name].get("skip", [])),
                                  frozenset(config[name].get("extra", []))):
                print(f"{name}:{mutant['line']}: {mutant['key']}")
        return 0
    if not args.summarize:
        os.chdir(ROOT)
        _preload()
        with tempfile.TemporaryDirectory(prefix="smoothadv-mutation-") as tmp:
            for name in names:
                last, partial = OUT / f"{name}.json", OUT / f"{name}.partial.json"
                if partial.exists() and (not last.exists() or partial.stat().st_mtime > last.stat().st_mtime):
                    last = partial  # a stopped run: --retry continues it (its verdicts kept, the rest run)
                retry = json.loads(last.read_text()) if args.retry and last.exists() else None
                run = run_module(name, config[name], Path(tmp), args.max_minutes, OUT / f"{name}.partial.json",
                                 args.revision or None, tuple(added), retry)
                (OUT / f"{name}.partial.json").unlink(missing_ok=True)
                if retry is not None:
                    run["seconds"] = round(run["seconds"] + retry.get("seconds", 0.0), 1)
                (OUT / f"{name}.json").write_text(json.dumps(run, indent=1))
        os.chdir(ROOT)  # the module ran inside the (now removed) temporary copy
    sections, previous = [], _committed_results()
    for name in config:
        path, partial = OUT / f"{name}.json", OUT / f"{name}.partial.json"
        if partial.exists() and (not path.exists() or partial.stat().st_mtime > path.stat().st_mtime):
            path = partial  # a run stopped before its end: what it did
        if path.exists():
            section = summarize(json.loads(path.read_text()), annotations, added)
            (OUT / f"{name}.md").write_text(section + "\n")
            if name in names or args.summarize:
                print(section)
            sections.append(section)
        elif name in previous:  # no record of its own here: the committed results.md keeps its last result
            sections.append(previous[name][1])
    (OUT / "summary.md").write_text("\n".join(sections) + "\n")
    if args.results:
        (HERE / "results.md").write_text(results_page(config, annotations, added, sections))
    return 0


def _committed_results() -> dict[str, tuple[str, str]]:
    """Per module, its table row and section in the committed results.md: what a module with no record under
    out/ (a checkout where it was not rerun) keeps when results.md is rewritten."""
    path = HERE / "results.md"
    if not path.exists():
        return {}
    text = path.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| module")}
    found = {}
    for part in text.split("\n## ")[1:]:
        name = part.split(" ", 1)[0]
        if name in rows:
            found[name] = (rows[name], "## " + part.rstrip("\n") + "\n")
    return found


def _commit_cell(revision: str | None) -> str:
    """The table's commit cell: the first 12 hex digits, "working tree", or "not recorded" (an older record)."""
    if not revision:
        return "not recorded"
    return revision if revision == "working tree" else f"`{revision[:12]}`"


def results_page(config: dict, annotations: dict, added: list[str], sections: list[str]) -> str:
    """results.md: how it was made, one table row per module, then each module's section."""
    rows, previous = [], _committed_results()
    for name in config:
        path, partial = OUT / f"{name}.json", OUT / f"{name}.partial.json"
        if partial.exists() and (not path.exists() or partial.stat().st_mtime > path.stat().st_mtime):
            path = partial
        if not path.exists():
            row = previous[name][0] if name in previous else f"| {name} | not run | | | | | |"
            rows.append(row if row.count("|") == 9 else f"{row} not recorded |")  # rows made before the column
            continue
        run = json.loads(path.read_text())
        notes = annotations.get(name, {})
        killed = before = survived = equivalent = 0
        for record in run["records"]:
            if record["status"] in ("killed", "timeout"):
                killed += 1
                before += str(record.get("detail", "")).split("::")[0] not in added
            elif notes.get(record["key"], {}).get("status") == "equivalent":
                equivalent += 1
            else:
                survived += 1
        scored = killed + survived
        score_before = 100.0 * before / scored if scored else 100.0
        score = 100.0 * killed / scored if scored else 100.0
        rows.append(f"| {name} | {len(run['records'])} / {run.get('mutants', '?')} | {killed} | {survived} | "
                    f"{equivalent} | {score_before:.1f}% | **{score:.1f}%** | {_commit_cell(run.get('revision'))} |")
    head = [
        "# Mutation benchmark: results", "",
        "Made by `nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation/run.py [MODULE ...]` (see",
        "README.md), on the committed package (the commit column), on two CPU cores shared with other work. Score =",
        "killed / (killed + survived); equivalent mutants (no input tells them apart, reason given) are left out.",
        "*Before*:",
        "the kills of the test files that existed before this benchmark (they run first, so a mutant first failed by",
        "an added file had survived them all).", "",
        "| module | mutants run | killed | survived | equivalent | score before | score | commit |",
        "|---|---:|---:|---:|---:|---:|---:|---|", *rows, ""]
    return "\n".join(head) + "\n" + "\n".join(sections) + "\n"


if __name__ == "__main__":
    sys.exit(main())
