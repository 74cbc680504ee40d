"""Sharded evaluation: shard files, the settings they must agree on, and merging them into one TSV.

A certify/predict run over a list of test indices can be split into k shards (torchrun ranks or
`--shard i/k` jobs). Shard i writes `OUT.shard-i-of-k` (rows in its own order) and, next to it,
`OUT.shard-i-of-k.args.json` with the run's settings. Because every example's noise comes from its
own generator keyed by (seed, index) (`evaluate.example_seed`), a row does not depend on the shard
that computed it, so merging the shards (rows sorted by index) gives the same rows as one
single-process run with the same settings; only the `time` column differs.

`merge_shards` refuses shards that disagree on any recorded setting except those in
`IGNORED_SETTINGS` (paths, resume/force, progress, device, speed-only flags): the command, the
checkpoint's SHA-256, sigma, n, n0, alpha, seed, batch, precision, the index selection (dataset
size, skip, max, split), attack settings, ...; and shards that miss, duplicate or add rows. Each
refusal is a one-line `SmoothAdvError`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import SmoothAdvError
from .files import atomic_write_text

#: recorded settings that cannot change a row's content; shards (and resumed runs) must agree on all others
IGNORED_SETTINGS = frozenset({"out", "resume", "force", "progress", "device", "data_dir", "shard", "handler",
                              "checkpoint", "config", "merged_from", "channels_last", "compile"})

_SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def shard_path(out: str | os.PathLike[str], shard: int, num_shards: int) -> Path:
    """The file shard `shard` of `num_shards` writes for the final output `out`: OUT.shard-i-of-k."""
    return Path(f"{out}.shard-{shard}-of-{num_shards}")


def settings_path(out: str | os.PathLike[str]) -> Path:
    """The provenance sidecar `<out>.args.json` written next to an evaluation output."""
    out = Path(out)
    return out.parent / f"{out.name}.args.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (identifies the checkpoint a result was computed with)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise SmoothAdvError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def read_settings(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings recorded next to `out`, or None if there is no sidecar."""
    path = settings_path(out)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SmoothAdvError(f"cannot read the settings file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SmoothAdvError(f"the settings file {path} is not a JSON object")
    return data


def setting_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """'key: a != b' for every setting (not in IGNORED_SETTINGS) on which `a` and `b` disagree."""
    a, b = (json.loads(json.dumps(d, default=str)) for d in (a, b))  # as stored: tuples -> lists, paths -> str
    keys = sorted((set(a) | set(b)) - IGNORED_SETTINGS)
    return [f"{key}: {a.get(key)!r} != {b.get(key)!r}" for key in keys if a.get(key) != b.get(key)]


def check_resumable(out: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Raise SmoothAdvError if `out` was started with settings that would change its rows."""
    previous = read_settings(out)
    if previous is None:
        return
    differences = setting_differences(previous, settings)
    if differences:
        raise SmoothAdvError(f"cannot resume {out}: it was started with other settings ({'; '.join(differences)}); "
                             "use the same flags or a new --out")


def read_rows(path: str | os.PathLike[str]) -> tuple[str, list[list[str]]]:
    """Header and complete rows of a result TSV (a torn last line, from a killed run, is ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SmoothAdvError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")[:-1]  # the part after the last newline is empty or torn
    if not lines:
        raise SmoothAdvError(f"{path} is empty (no header)")
    width = len(lines[0].split("\t"))
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        if len(row) != width:
            raise SmoothAdvError(f"{path} has a malformed row {chr(9).join(row)!r}")
    return lines[0], rows


def find_shards(out: str | os.PathLike[str]) -> list[Path]:
    """The shard files OUT.shard-i-of-k that exist next to `out`."""
    pattern = glob.escape(str(out)) + ".shard-*-of-*"
    return sorted(Path(p) for p in glob.glob(pattern) if _SHARD_RE.search(p))


def expected_indices(settings: dict[str, Any]) -> list[int]:
    """The dataset indices a run with these settings covers (all shards together)."""
    from .evaluate import select_indices

    try:
        return select_indices(int(settings["dataset_size"]), int(settings.get("skip") or 1), settings.get("max"))
    except (KeyError, TypeError, ValueError):
        raise SmoothAdvError("the settings file lacks dataset_size/skip/max; was it written by smoothadv?") from None


def merge_shards(out: str | os.PathLike[str], shards: Sequence[str | os.PathLike[str]] | None = None, *,
                 force: bool = False) -> int:
    """Merge shard TSVs into `out` (rows sorted by index; written atomically); returns the row count.

    `shards` defaults to every OUT.shard-i-of-k next to `out`. All k shards of one k must be given,
    each with its settings sidecar; they must agree on every setting but `IGNORED_SETTINGS`, and
    together hold each selected index exactly once. Any violation raises SmoothAdvError (one line)
    and writes nothing.
    """
    from .evaluate import shard_indices

    out = Path(out)
    paths = [Path(p) for p in shards] if shards else find_shards(out)
    if not paths:
        raise SmoothAdvError(f"no shard files {out}.shard-*-of-* found")
    if out.exists() and not force:
        raise SmoothAdvError(f"{out} already exists; pass --force to overwrite it")
    parsed: dict[int, tuple[Path, dict[str, Any]]] = {}
    total: int | None = None
    for path in paths:
        match = _SHARD_RE.search(str(path))
        if match is None:
            raise SmoothAdvError(f"{path} is not named like a shard (OUT.shard-i-of-k)")
        i, k = int(match.group(1)), int(match.group(2))
        if total is not None and k != total:
            raise SmoothAdvError(f"shards of different splits: {path} is of {k}, another of {total}")
        total = k
        if i in parsed:
            raise SmoothAdvError(f"shard {i}-of-{k} is given twice ({parsed[i][0]} and {path})")
        settings = read_settings(path)
        if settings is None:
            raise SmoothAdvError(f"{settings_path(path)} is missing; cannot check that {path} matches the others")
        parsed[i] = (path, settings)
    assert total is not None
    missing = sorted(set(range(total)) - set(parsed))
    if missing:
        raise SmoothAdvError(f"missing shard(s) {', '.join(f'{i}-of-{total}' for i in missing)} of {out}")
    reference_path, reference = parsed[0]
    for i in range(1, total):
        path, settings = parsed[i]
        differences = setting_differences(reference, settings)
        if differences:
            raise SmoothAdvError(f"{path} and {reference_path} were run with different settings "
                                 f"({'; '.join(differences)}); rerun the odd shard")
    everything = expected_indices(reference)
    header: str | None = None
    merged: list[tuple[int, list[str]]] = []
    for i in range(total):
        path = parsed[i][0]
        head, rows = read_rows(path)
        if header is not None and head != header:
            raise SmoothAdvError(f"{path} has header {head!r}, other shards {header!r}")
        header = head
        seen: set[int] = set()
        for row in rows:
            try:
                idx = int(row[0])
            except ValueError:
                raise SmoothAdvError(f"{path} has a non-integer index {row[0]!r}") from None
            if idx in seen:
                raise SmoothAdvError(f"{path} has index {idx} twice")
            seen.add(idx)
            merged.append((idx, row))
        wanted = set(shard_indices(everything, i, total))
        if seen - wanted:
            raise SmoothAdvError(f"{path} has rows this shard should not have (e.g. idx {min(seen - wanted)})")
        if wanted - seen:
            raise SmoothAdvError(f"{path} is incomplete: {len(wanted - seen)} of {len(wanted)} rows missing "
                                 f"(e.g. idx {min(wanted - seen)}); finish it with --resume")
    merged.sort(key=lambda item: item[0])
    assert header is not None
    atomic_write_text(out, "\n".join([header, *("\t".join(row) for _, row in merged)]) + "\n")
    settings_out = {**reference, "shard": None, "merged_from": [str(parsed[i][0]) for i in range(total)]}
    atomic_write_text(settings_path(out), json.dumps(settings_out, indent=2, sort_keys=True, default=str) + "\n")
    return len(merged)


def shards_complete(out: str | os.PathLike[str], num_shards: int, settings: dict[str, Any]) -> bool:
    """Whether all `num_shards` shards of `out` hold all their rows (checked without raising)."""
    from .evaluate import shard_indices

    everything = expected_indices(settings)
    for i in range(num_shards):
        path = shard_path(out, i, num_shards)
        if not path.exists():
            return False
        try:
            _, rows = read_rows(path)
        except SmoothAdvError:
            return False
        if not {str(j) for j in shard_indices(everything, i, num_shards)} <= {row[0] for row in rows}:
            return False
    return True
