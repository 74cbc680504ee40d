"""The README and the guides in docs/ stay true to the code and to the committed results.

- The documentation site builds with `mkdocs build --strict`: a broken link, a page missing from the navigation or
  an API reference to a module that does not exist fails.
- Every generated block (`<!-- generated: COMMAND -->` ... `<!-- end generated -->`) equals what its command prints
  today from the committed files (`experiments/docs_blocks.py`; run it without `--check` to rewrite the blocks).
- Every ```python block of the README and of each guide runs, in order, one namespace per page, in a temporary
  directory (sample sizes shrunk by text substitution). A guide's blocks start from what the README's first block
  defines: `model` and `meta` (a fashion_cnn with random weights saved at runs/fmnist/checkpoint.pth.tar),
  `smooth` and one image `x`; `results/` is reachable from the temporary directory.
- Every `smoothadv ...` command line of every ```bash block of the README, EXPERIMENTS.md and the guides parses
  with the current CLI (with `...` elisions filled in with the command's required arguments and `[optional]`
  brackets and `a|b` alternatives resolved), and every script those blocks run exists.
- Every `--flag` the shell scripts of experiments/ give a smoothadv command is an option of that command.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import load_script

from smoothadv.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, ROOT / "EXPERIMENTS.md", *GUIDES]

#: documentation text -> what runs in the test: the same calls with fewer samples or epochs
SHRINK = {
    "100_000": "200",
    "n=1000, alpha": "n=200, alpha",
    "n=10_000, alpha": "n=200, alpha",
    "sigma=0.25, epochs=4))": "sigma=0.25, epochs=1, train_subset=256, eval_subset=64))",
    "lr=1e-4, epochs=2)": "lr=1e-4, epochs=1, train_subset=256, eval_subset=64)",
    "SequentialConfig(sigma=0.25, radii=(0.25, 0.5))":
        "SequentialConfig(sigma=0.25, radii=(0.25, 0.5), base=doubling_looks(64, 256))",
}

#: required arguments standing in for an elided `...` right after a command name
ELIDED = {
    "train": ["--out", "runs/x"],
    "attack": ["ckpt.pth.tar", "--sigma", "0.25", "--eps", "0.5", "--out", "attack.tsv"],
    "certify": ["ckpt.pth.tar", "--sigma", "0.25", "--out", "out.tsv"],
    "predict": ["ckpt.pth.tar", "--sigma", "0.25", "--out", "out.tsv"],
}

#: shell variables of the cluster examples and the loops of EXPERIMENTS.md; any other `$name` becomes `x`
VARIABLES = {"$SLURM_ARRAY_TASK_ID": "0", "$HEAD": "localhost", "$sigma": "0.25"}


def code_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number, dedented text) of every fenced block of `language` in a Markdown file (indented ones too)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        fence = line.strip()
        if start is None and fence == f"```{language}":
            start = number
        elif start is not None and fence == "```":
            blocks.append((start, textwrap.dedent("\n".join(lines[start:number - 1]))))
            start = None
    return blocks


def command_lines(block: str) -> list[str]:
    """The block's lines with backslash continuations joined and comments removed."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def smoothadv_argv(line: str) -> list[str] | None:
    """The arguments given to smoothadv on a command line (None if it does not run smoothadv)."""
    if "$(" in line:
        return None  # a command built by a shell substitution: not a literal command line
    for name, value in VARIABLES.items():
        line = line.replace(name, value)
    line = re.sub(r"\$\{?\w+\}?", "x", line)
    tokens = shlex.split(line.replace("[", " ").replace("]", " "))
    for i, token in enumerate(tokens):
        if token == "smoothadv" or token.endswith("/smoothadv"):
            argv = tokens[i + 1:]
            if i > 0 and tokens[i - 1] == "-m" and argv[:1] == ["--"]:
                argv = argv[1:]  # torchrun ... -m smoothadv -- COMMAND
            break
    else:
        return None
    if not argv:
        return argv
    command, rest = argv[0], argv[1:]
    if rest[:1] == ["..."]:
        rest = ELIDED.get(command, []) + rest[1:]
    rest = [token.split("|")[0] for token in rest if token != "..."]
    return [command, *rest]


def test_bash_blocks_parse_with_the_current_cli() -> None:
    parser = build_parser()
    commands = 0
    for path in DOCUMENTS:
        for start, block in code_blocks(path, "bash"):
            where = f"{path.relative_to(ROOT)}:{start}"
            for line in command_lines(block):
                scripts = [t for t in shlex.split(line.replace("$", "")) if re.match(r"^(\./)?[\w./-]+\.(py|sh)$", t)]
                for script in scripts:
                    assert (ROOT / script).exists(), f"{where}: {script} does not exist"
                argv = smoothadv_argv(line)
                if argv is None:
                    continue
                commands += 1
                try:
                    parser.parse_args(argv)
                except SystemExit as exc:
                    pytest.fail(f"{where}: `smoothadv {' '.join(argv)}` does not parse ({exc})")
    assert commands >= 30  # the command lines of the examples were found


def _run_blocks(path: Path, namespace: dict[str, object]) -> None:
    for start, block in code_blocks(path, "python"):
        for text, replacement in SHRINK.items():
            block = block.replace(text, replacement)
        torch.manual_seed(start)
        exec(compile(block, f"{path.relative_to(ROOT)}:{start}", "exec"), namespace)  # noqa: S102 - the docs' code


@pytest.fixture
def workdir(tmp_path):
    """A temporary working directory with the checkpoint the README's first block loads, and results/ in reach."""
    from smoothadv.models import build_model, normalization_spec, save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "runs" / "fmnist" / "checkpoint.pth.tar"
    save_checkpoint(checkpoint, build_model("fashion_cnn", "fashion_mnist"), arch="fashion_cnn",
                    dataset="fashion_mnist", normalization=normalization_spec("fashion_mnist"), sigma=0.25)
    (tmp_path / "results").symlink_to(ROOT / "results", target_is_directory=True)
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(before)


def test_readme_python_blocks_run(workdir) -> None:
    namespace: dict[str, object] = {}
    assert len(code_blocks(README, "python")) >= 3
    _run_blocks(README, namespace)
    assert namespace["x_adv"].shape == (1, 1, 28, 28)  # type: ignore[attr-defined]


@pytest.mark.parametrize("guide", [path for path in GUIDES if code_blocks(path, "python")], ids=lambda p: p.name)
def test_guide_python_blocks_run(workdir, guide) -> None:
    from smoothadv import Smooth, load_checkpoint

    model, meta = load_checkpoint("runs/fmnist/checkpoint.pth.tar")
    namespace: dict[str, object] = {"model": model, "meta": meta, "x": torch.rand(1, 28, 28),
                                    "smooth": Smooth(model, num_classes=meta["num_classes"], sigma=0.25)}
    _run_blocks(guide, namespace)


def _docs_blocks():
    return load_script(ROOT / "experiments" / "docs_blocks.py")


def test_generated_blocks_equal_their_commands_output() -> None:
    docs_blocks = _docs_blocks()
    found = [block for path in docs_blocks.documents() for block in docs_blocks.blocks(path)]
    assert len(found) >= 10  # the README's headline table and the guides' tables are generated
    stale = docs_blocks.regenerate(write=False)
    assert not stale, "generated blocks differ from their commands (run `python experiments/docs_blocks.py`): " + \
        "; ".join(f"{block.path.relative_to(ROOT)}:{block.line}" for block in stale)


def test_documentation_site_builds_strictly(tmp_path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_every_guide_is_in_the_site_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [path.name for path in GUIDES if f" {path.name}" not in nav]
    assert not missing, f"guides missing from mkdocs.yml's nav: {missing}"


def test_no_unfollowable_citations() -> None:
    """Readers cannot open an issue tracker or notes that are not in the repository: cite papers and files."""
    pattern = re.compile(r"\b[Ii]ssue \d+|reference §|reference notes|training-methods\.md|peers\.md")
    paths = [*DOCUMENTS, ROOT / "CONTRIBUTING.md", *(ROOT / "configs").rglob("*.toml"),
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "experiments").rglob("*.*"),
             *(ROOT / "results").rglob("*.md"), *(ROOT / "src" / "smoothadv").glob("*.py"),
             *(path for path in (ROOT / "tests").rglob("*.py") if path.name != "test_docs.py")]
    hits = [f"{path.relative_to(ROOT)}:{number}" for path in paths if path.is_file() and path.suffix != ".png"
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, f"unfollowable citations: {hits}"


def test_readme_stays_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) < 400, "move the detail into a guide in docs/"


def test_relative_links_outside_the_site_point_to_existing_files() -> None:
    """The README, EXPERIMENTS.md and CONTRIBUTING.md are read on GitHub, outside the site that mkdocs checks."""
    broken = []
    for path in (README, ROOT / "EXPERIMENTS.md", ROOT / "CONTRIBUTING.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if not re.match(r"^[a-z]+://", target) and not (path.parent / target).exists():
                broken.append(f"{path.name}: {target}")
    assert not broken, f"broken links: {broken}"


def _commands(parser) -> dict[str, object]:
    """The parser's subcommands (name -> parser), none if it has none."""
    return next((a.choices for a in parser._actions if isinstance(a.choices, dict)), {})


def _subcommand_options() -> dict[str, set[str]]:
    """Each command line prefix of the CLI ("certify", "train", "train smoothadv", ...): the options it takes."""
    options = {}
    for name, sub in _commands(build_parser()).items():
        options[name] = set(sub._option_string_actions)
        for inner, objective in _commands(sub).items():  # train OBJECTIVE: the objective's flags as well
            options[f"{name} {inner}"] = options[name] | set(objective._option_string_actions)
    return options


SMOOTHADV_CALL = re.compile(  # smoothadv, .venv/bin/smoothadv, "$SMOOTHADV", -m smoothadv; then COMMAND [OBJECTIVE]
    r"""(?:^|[\s"'])(?:\$\{?SMOOTHADV[^\s"']*"?|[\w./]*smoothadv|-m smoothadv)"""
    r"""\s+([a-z][a-z-]*)(?:\s+([a-z][a-z_]*))?""")


def test_experiment_scripts_pass_only_flags_the_cli_knows() -> None:
    """The shell scripts of experiments/ regenerate committed results: every --flag they give a smoothadv command
    on its own line (continuations joined) is an option of that command, so a renamed flag fails here and not
    hours into a run. Flags held in shell arrays are not seen."""
    options = _subcommand_options()
    seen = 0
    for script in sorted((ROOT / "experiments").rglob("*.sh")):
        for line in command_lines(script.read_text(encoding="utf-8")):
            match = SMOOTHADV_CALL.search(line)
            if match is None or match.group(1) not in options:
                continue
            command = match.group(1)
            if f"{command} {match.group(2)}" in options:
                command = f"{command} {match.group(2)}"
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line[match.end(1):]):
                seen += 1
                assert flag in options[command], \
                    f"{script.relative_to(ROOT)}: `smoothadv {command}` has no option {flag}"
    assert seen >= 150  # the scripts' command lines were found (177 flags on 2026-12-07)
