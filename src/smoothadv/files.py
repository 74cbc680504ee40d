"""Files that must survive crashes: atomic writes, append-only TSV results, run provenance, locks.

- `atomic_write_bytes` / `atomic_torch_save`: write to a temporary file in the same directory,
  fsync, then rename over the target, so a reader sees the old file or the new one, never half.
- `TsvLog`: a result TSV with a fixed header, one flushed and fsynced row per finished example;
  `--resume` reads the rows already there (dropping a torn last line) and skips their indices.
- `OutputLock`: refuses a second process writing the same output file.
- `write_provenance`: `args.json` and `env.json` (versions, device, git hash) next to outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from . import __version__  # set before the package imports its modules
from .errors import SmoothAdvError

__all__ = [
    "EMPTY_LOCK_GRACE", "OutputLock", "TsvLog", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text",
    "check_new_output", "check_writable_output", "environment", "file_sha256", "git_revision", "locked_run_directory",
    "make_directory", "read_tsv", "write_provenance",
]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's file mode creation mask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` atomically (temporary file, fsync, rename).

    The file gets the permissions an ordinary write would give it: an existing file's mode is kept,
    a new file gets 0o666 minus the umask (a temporary file alone would be 0o600). Any failure (a
    directory in the way, a full disk, ...) is a SmoothAdvError naming `path`; the temporary file is
    removed and an existing `path` is left as it was.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise SmoothAdvError(f"cannot write {target}: it is a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise SmoothAdvError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SmoothAdvError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save to `path` atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def make_directory(path: str | os.PathLike[str]) -> Path:
    """Create the directory `path` and its parents (nothing if it exists); a one-line SmoothAdvError naming it
    when that fails."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmoothAdvError(f"cannot create output directory {directory}: {exc.strerror or exc}") from None
    return directory


def locked_run_directory(path: str | os.PathLike[str], checkpoint: str) -> OutputLock:
    """The output directory of a training run: created (`make_directory`), and the lock of its checkpoint file
    `checkpoint` returned, to be held with `with` for the whole run (a second run on it is refused)."""
    return OutputLock(make_directory(path) / checkpoint)


def check_writable_output(path: str | os.PathLike[str], *, resume: bool = False, force: bool = False) -> Path:
    """Validate an output file path before any work starts.

    Raises SmoothAdvError if the file exists and neither `resume` nor `force` is set, or if its
    directory cannot be created or written.
    """
    out = Path(path)
    if out.exists() and out.is_dir():
        raise SmoothAdvError(f"output {out} is a directory, expected a file path")
    if out.exists() and not (resume or force):
        raise SmoothAdvError(f"output {out} already exists; pass --resume to continue it or --force to overwrite it")
    directory = make_directory(out.parent if str(out.parent) else Path("."))
    if not os.access(directory, os.W_OK):
        raise SmoothAdvError(f"output directory {directory} is not writable")
    return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one existing file (the same inode); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (the same inode, or the same resolved path when one does not exist)."""
    first, second = Path(a), Path(b)
    return _same_file(first, second) or first.resolve() == second.resolve()


def refuse_inputs_as_outputs(outputs: Iterable[tuple[str, str | os.PathLike[str]]],
                             inputs: Iterable[tuple[str, str | os.PathLike[str] | None]]) -> None:
    """SmoothAdvError (one line) if a file a command writes (`outputs`: (what, path), e.g. ("--out", OUT) or
    ("the settings sidecar", OUT.args.json)) is a file it reads (`inputs`: (flag, path or None)). Refused
    whatever `--force` says: writing it would destroy that input before (or while) it is read."""
    given = [(flag, Path(path)) for flag, path in inputs if path is not None]
    for what, target in outputs:
        for flag, source in given:
            if same_path(target, source):
                raise SmoothAdvError(f"{what} {target} is also {flag} {source}, an input of this command; writing it "
                                     "would destroy that input: choose another output (--force never overwrites an "
                                     "input)")


def check_new_output(path: str | os.PathLike[str], *, force: bool = False,
                     inputs: Iterable[str | os.PathLike[str]] = (), flag: str = "output") -> Path:
    """Validate, before any work, a file that a command writes whole (a report, a plot, a converted checkpoint).

    Guarantees, else SmoothAdvError (one line, naming `flag`): `path` is none of `inputs` (the
    files the command reads; refused even with `force`, since writing would destroy the input),
    it does not exist unless `force`, it is not a directory, and its directory can be written.
    """
    out = Path(path)
    for source in inputs:
        if _same_file(out, Path(source)) or out.resolve() == Path(source).resolve():
            raise SmoothAdvError(f"{flag} {out} is also an input of this command; writing it would destroy that "
                                 "input: choose another file")
    if out.exists() and not out.is_dir() and not force:
        raise SmoothAdvError(f"{flag} {out} already exists; pass --force to overwrite it")
    return check_writable_output(out, force=True)


#: seconds after which an empty lock file is taken to be left by a process that died before writing its id
EMPTY_LOCK_GRACE = 10.0


class OutputLock:
    """An exclusive lock file `<path>.lock` for the lifetime of a run; a second run is refused.

    A lock left by a process that no longer exists (on this host) is taken over. So is an empty
    lock file older than `EMPTY_LOCK_GRACE` seconds: a lock holder writes `host:pid` right after
    creating the file, so an empty one that old was left by a process killed in between (a younger
    one may be a holder about to write, and is respected). Any other content, or a process on
    another host, is never taken over.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(f"{path}.lock")
        self._held = False

    def _stale(self) -> bool:
        try:
            text = self.path.read_text()
            if not text.strip():
                return time.time() - self.path.stat().st_mtime > EMPTY_LOCK_GRACE
            host, pid = text.strip().split(":")
            if host != platform.node():
                return False
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError):
            return False
        return False

    def __enter__(self) -> OutputLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    continue
                raise SmoothAdvError(
                    f"another run is writing {str(self.path)[:-5]} (lock {self.path}); wait for it or remove the lock "
                    "file if that run is gone"
                ) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{platform.node()}:{os.getpid()}")
            self._held = True
            return self
        raise SmoothAdvError(f"could not take the lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        if self._held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._held = False


def read_tsv(path: str | os.PathLike[str], what: str = "") -> tuple[str, list[list[str]]]:
    """Header and complete rows of a result TSV; a torn last line (from a killed run) is ignored.

    Every row must have as many fields as the header (else SmoothAdvError, with `what` appended).
    The one reader of our own result files (`report` also reads Cohen's and Salman's logs).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SmoothAdvError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SmoothAdvError(f"{path} is not a text (UTF-8) TSV file") from None
    lines = text.split("\n")[:-1]  # the part after the last newline is empty or torn
    if not lines:
        raise SmoothAdvError(f"{path} is empty (no header)")
    width = len(lines[0].split("\t"))
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        if len(row) != width:
            raise SmoothAdvError(f"{path} has a malformed row {chr(9).join(row)!r}" + (f"; {what}" if what else ""))
    return lines[0], rows


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


class TsvLog:
    """An append-only TSV results file with a fixed header; one durable row per finished example.

    Open with `resume=True` to continue a file: its header must match, rows already written are
    kept, and a torn last line (a crash mid-write) is cut off. `done` holds the keys of the rows
    present: `key(fields)`, by default the first column (the example index). A file holding one key
    twice is refused (SmoothAdvError), never resumed: each key has exactly one row.
    """

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str], *, resume: bool = False,
                 force: bool = False, key: Callable[[list[str]], str] | None = None) -> None:
        self.path = check_writable_output(path, resume=resume, force=force)
        self.columns = list(columns)
        self.key = key or (lambda fields: fields[0])
        self.done: set[str] = set()
        header = "\t".join(self.columns)
        if resume and self.path.exists() and self.path.stat().st_size > 0 \
                and not header.startswith(self._text()):  # else: killed mid-header
            self._recover(header)
            self._handle = self._open("a")
        else:
            self._handle = self._open("w")
            try:
                self._handle.write(header + "\n")
                self._sync()
            except OSError as exc:
                self._handle.close()
                raise SmoothAdvError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _open(self, mode: str) -> IO[str]:
        try:
            return open(self.path, mode, encoding="utf-8")
        except OSError as exc:
            raise SmoothAdvError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _text(self) -> str:
        """The whole file as text; a file that is not UTF-8 text (binary, another format) is refused."""
        try:
            return self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SmoothAdvError(f"{self.path} is not a text (UTF-8) TSV file, so it is not resumed (choose another "
                                 "--out)") from None
        except OSError as exc:
            raise SmoothAdvError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _recover(self, header: str) -> None:
        first = self._text().split("\n", 1)[0]
        if first != header:
            raise SmoothAdvError(
                f"{self.path} has header {first!r}, expected {header!r}; it was written by a different "
                "command or version, so it is not resumed (choose another --out)"
            )
        _, rows = read_tsv(self.path, what="refusing to resume it")
        for line, row in enumerate(rows, start=2):
            key = self.key(row)
            if key in self.done:  # an uninterrupted run writes each key once: counting it twice would skew results
                raise SmoothAdvError(f"{self.path} has a second row for idx {key} (line {line}); refusing to resume "
                                     "it: remove the duplicate row, or start over with --force")
            self.done.add(key)
        size = len("\n".join([header, *("\t".join(row) for row in rows)]).encode("utf-8")) + 1
        if self.path.stat().st_size != size:  # a torn last row (a crash mid-write): cut it off, it will be redone
            with open(self.path, "r+", encoding="utf-8") as handle:
                handle.truncate(size)

    def _sync(self) -> None:
        self._handle.flush()
        with contextlib.suppress(OSError):
            os.fsync(self._handle.fileno())

    def write(self, values: Iterable[Any]) -> None:
        fields = [str(v) for v in values]
        if len(fields) != len(self.columns):
            raise ValueError(f"row has {len(fields)} fields, header has {len(self.columns)}")
        try:
            self._handle.write("\t".join(fields) + "\n")
            self._sync()
        except OSError as exc:  # e.g. a full disk: name the file (earlier rows are kept; --resume redoes this)
            raise SmoothAdvError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.done.add(self.key(fields))

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> TsvLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def git_revision() -> str | None:
    """The git commit of the source tree this package runs from (with '-dirty'), if any."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Versions, device and git revision: what a result depends on besides its arguments."""
    import numpy
    import scipy
    import torch

    env: dict[str, Any] = {
        "smoothadv": __version__, "git": git_revision(), "python": sys.version.split()[0],
        "torch": torch.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
        "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(Exception):
        import torchvision

        env["torchvision"] = torchvision.__version__
    return env


def write_provenance(directory: str | os.PathLike[str], args: dict[str, Any], prefix: str = "", *,
                     resumed: bool = False) -> None:
    """Write `<prefix>args.json` (resolved arguments) and `<prefix>env.json` into `directory`.

    A `resumed` run keeps the environments its run was computed in: `env.json` is this one, with the earlier
    ones (each different from the next) under `earlier`, oldest first, so that rows computed under another
    torch (or git revision, device, ...) are never attributed to this one alone."""
    out = Path(directory)
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items() if not callable(v)}
    env_path = out / f"{prefix}env.json"
    env = json.loads(json.dumps(environment(), default=str))
    earlier = _earlier_environments(env_path, env) if resumed else []
    atomic_write_text(out / f"{prefix}args.json", json.dumps(clean, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(env_path, json.dumps({**env, **({"earlier": earlier} if earlier else {})}, indent=2,
                                           sort_keys=True) + "\n")


def _earlier_environments(path: Path, env: dict[str, Any]) -> list[Any]:
    """The environments an existing `env.json` records (its `earlier` ones, then its own unless it is `env`); []
    for a missing or unreadable file (nothing to keep)."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(recorded, dict):
        return []
    earlier = recorded.pop("earlier", [])
    earlier = list(earlier) if isinstance(earlier, list) else []
    return earlier if recorded == env else [*earlier, recorded]
