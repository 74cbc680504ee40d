"""The repository's weights and large files: every file listed in results/MODELS.toml is the file it names (SHA-256),
and no tracked file over 1 MB is missing from it, so a checkpoint or a big log cannot be committed by accident."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "results" / "MODELS.toml"
LIMIT = 1_000_000  # bytes: anything larger must be listed


def entries() -> list[dict]:
    manifest = tomllib.loads(MANIFEST.read_text(encoding="utf-8"))
    assert set(manifest) <= {"model", "data"}, f"unknown tables in {MANIFEST.name}: {set(manifest) - {'model', 'data'}}"
    return [dict(entry, kind=kind) for kind in ("model", "data") for entry in manifest.get(kind, [])]


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listing.decode().split("\0") if name]


def test_every_entry_names_an_existing_file_with_its_sha256() -> None:
    seen = set()
    for entry in entries():
        required = {"name", "path", "sha256", "command"} | ({"reproduces", "recipe"} if entry["kind"] == "model"
                                                             else {"holds"})
        assert required <= set(entry), f"{entry.get('name')}: missing {sorted(required - set(entry))}"
        assert entry["name"] not in seen, f"{entry['name']} is listed twice"
        seen.add(entry["name"])
        path = ROOT / entry["path"]
        assert path.is_file(), f"{entry['name']}: {entry['path']} does not exist"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == entry["sha256"], f"{entry['name']}: {entry['path']} has SHA-256 {digest}, the manifest says " \
                                          f"{entry['sha256']} (retrained? update results/MODELS.toml)"
        if entry["kind"] == "model":
            assert (ROOT / entry["recipe"]).is_file(), f"{entry['name']}: recipe {entry['recipe']} does not exist"


def test_no_tracked_file_over_1_mb_is_missing_from_the_manifest() -> None:
    listed = {entry["path"] for entry in entries()}
    unlisted = [name for name in tracked_files()
                if (ROOT / name).is_file() and (ROOT / name).stat().st_size > LIMIT and name not in listed]
    assert not unlisted, ("tracked files over 1 MB that results/MODELS.toml does not list (commit only released "
                          f"models, and list them): {unlisted}")


def test_every_tracked_checkpoint_outside_the_test_fixtures_is_a_listed_model() -> None:
    models = {entry["path"] for entry in entries() if entry["kind"] == "model"}
    checkpoints = [name for name in tracked_files()
                   if name.endswith((".pth.tar", ".pth", ".pt", ".ckpt")) and not name.startswith("tests/")]
    assert not set(checkpoints) - models, f"checkpoints not listed as models: {sorted(set(checkpoints) - models)}"
