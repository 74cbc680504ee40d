"""The README's code runs as written: every ```python block is executed (sample sizes shrunk by text
substitution), and every `smoothadv ...` command line of every ```bash block parses with the current CLI.

The Python blocks run in order in one namespace (the later ones use the `model`, `smooth` and `x` of the
first), in a temporary directory holding the checkpoint the first block loads (a fashion_cnn with random
weights). Bash blocks are not run (they train for minutes to days): each `smoothadv COMMAND ...` line, and
each `torchrun ... -m smoothadv -- COMMAND ...` line, must be accepted by `cli.build_parser().parse_args`,
with `...` elisions filled in with the command's required arguments and `[optional]` synopsis brackets
and `a|b` alternatives resolved; scripts the blocks run must exist.
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

from smoothadv.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: README text -> what runs in the test: the same calls with fewer samples
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

#: shell variables of the README's job-array and cluster examples
VARIABLES = {"$SLURM_ARRAY_TASK_ID": "0", "$HEAD": "localhost"}


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, dedented text) of every fenced block of `language` in the README (indented ones too)."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
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
    for name, value in VARIABLES.items():
        line = line.replace(name, value)
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


def test_readme_bash_blocks_parse_with_the_current_cli() -> None:
    parser = build_parser()
    commands = 0
    for start, block in code_blocks("bash"):
        for line in command_lines(block):
            scripts = [t for t in shlex.split(line.replace("$", "")) if re.match(r"^(\./)?[\w./-]+\.(py|sh)$", t)]
            for script in scripts:
                assert (ROOT / script).exists(), f"README line {start}: {script} does not exist"
            argv = smoothadv_argv(line)
            if argv is None:
                continue
            commands += 1
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"README block at line {start}: `smoothadv {' '.join(argv)}` does not parse ({exc})")
    assert commands >= 15  # the command lines of the README's examples were found


def test_readme_python_blocks_run(tmp_path) -> None:
    from smoothadv.models import build_model, normalization_spec, save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "runs" / "fmnist" / "checkpoint.pth.tar"
    save_checkpoint(checkpoint, build_model("fashion_cnn", "fashion_mnist"), arch="fashion_cnn",
                    dataset="fashion_mnist", normalization=normalization_spec("fashion_mnist"), sigma=0.25)
    blocks = code_blocks("python")
    assert len(blocks) >= 3
    namespace: dict[str, object] = {}
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        for start, block in blocks:
            for text, replacement in SHRINK.items():
                block = block.replace(text, replacement)
            torch.manual_seed(start)
            exec(compile(block, f"README.md:{start}", "exec"), namespace)  # noqa: S102 - the README's own code
    finally:
        os.chdir(before)
    assert namespace["x_adv"].shape == (1, 1, 28, 28)  # type: ignore[attr-defined]
