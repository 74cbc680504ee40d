"""Regenerate the generated blocks of the README and the docs from the committed result files.

A generated block is Markdown between two HTML comments that name the command producing it:

    <!-- generated: smoothadv report gaussian=results/fmnist-lenet/certify/gaussian_s0.25.tsv --ci -->
    ... the command's output, written by this script ...
    <!-- end generated -->

The command runs from the repository root and reads committed files only (certify TSVs, recipes, benchmark
outputs): no training, no certification. Two forms are accepted, both run in this process (one import of torch):

    smoothadv ARGS...         the command line of `smoothadv` (`smoothadv.cli.main`), its standard output
    python SCRIPT.py ARGS...  a script of this repository run as `__main__`, its standard output

Usage (from the repository root):

    python experiments/docs_blocks.py            # rewrite every block whose output changed
    python experiments/docs_blocks.py --check    # list the blocks that differ, exit 1 if any (tests/e2e/test_docs.py)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?P<open><!-- generated: (?P<command>.+?) -->\n)(?P<body>.*?)(?P<close><!-- end generated -->)",
                   re.DOTALL)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    command: str
    body: str


def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files that may hold generated blocks: README.md, EXPERIMENTS.md and docs/**/*.md."""
    found = [root / "README.md", root / "EXPERIMENTS.md", *sorted((root / "docs").rglob("*.md"))]
    return [path for path in found if path.is_file()]


def blocks(path: Path) -> Iterator[Block]:
    text = path.read_text(encoding="utf-8")
    for match in BLOCK.finditer(text):
        yield Block(path, text.count("\n", 0, match.start()) + 1, match["command"], match["body"])


@contextlib.contextmanager
def _at_root(argv: list[str]) -> Iterator[io.StringIO]:
    buffer, before, saved_argv = io.StringIO(), os.getcwd(), sys.argv
    os.chdir(ROOT)
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        os.chdir(before)
        sys.argv = saved_argv


def run(command: str) -> str:
    """The standard output of one block's command, run from the repository root."""
    argv = shlex.split(command)
    if argv[:1] == ["smoothadv"]:
        from smoothadv.cli import main

        with _at_root(argv) as buffer:
            status = main(argv[1:])
        if status:
            raise RuntimeError(f"`{command}` exited with status {status}")
    elif argv[:1] == ["python"] and len(argv) > 1 and argv[1].endswith(".py"):
        with _at_root(argv[1:]) as buffer:
            try:
                runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    raise RuntimeError(f"`{command}` exited with status {exc.code}") from None
    else:
        raise ValueError(f"a generated block runs `smoothadv ...` or `python SCRIPT.py ...`, not `{command}`")
    return buffer.getvalue()


def render(output: str) -> str:
    """A block's body: the output between blank lines, so that the markers never touch a table."""
    return "\n" + output.strip("\n") + "\n\n"


def regenerate(paths: list[Path] | None = None, write: bool = True) -> list[Block]:
    """Rerun every block's command; return the blocks whose text differs (and rewrite them when `write`)."""
    outputs: dict[str, str] = {}
    stale: list[Block] = []
    for path in paths if paths is not None else documents():
        found = list(blocks(path))
        for block in found:
            if block.command not in outputs:
                outputs[block.command] = render(run(block.command))
            if outputs[block.command] != block.body:
                stale.append(block)
        if write and any(block.path == path for block in stale):
            text = path.read_text(encoding="utf-8")
            text = BLOCK.sub(lambda m: m["open"] + outputs[m["command"]] + m["close"], text)
            path.write_text(text, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the blocks that differ (exit status 1)")
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README, EXPERIMENTS, docs/)")
    args = parser.parse_args(argv)
    paths = [path.resolve() for path in args.files] or None
    stale = regenerate(paths, write=not args.check)
    for block in stale:
        state = "differs" if args.check else "rewritten"
        print(f"{block.path.relative_to(ROOT)}:{block.line}: {state}: {block.command}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
