"""The crash-safety primitives (`smoothadv.files`) at the level where their guarantees live: what is on disk when
each fsync is called and in which order the calls come, the modes and the umask, what a failure leaves, when a lock
is taken over, and which paths name one file. A power cut cannot be staged in a test; the order of the system calls
that make a write survive one can be checked."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

import smoothadv.files as files
from smoothadv import SmoothAdvError
from smoothadv.files import (
    EMPTY_LOCK_GRACE,
    OutputLock,
    TsvLog,
    atomic_write_bytes,
    check_new_output,
    check_writable_output,
    make_directory,
    same_path,
)


@pytest.fixture
def syscalls(monkeypatch):
    """Every fsync (what the descriptor is and how many bytes it holds at that moment) and every rename, in order."""
    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        calls.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", info.st_size))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return calls


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts descriptors through /proc")
def test_an_atomic_write_syncs_the_whole_file_then_renames_it_then_syncs_its_directory(tmp_path, syscalls) -> None:
    before = open_descriptors()
    atomic_write_bytes(tmp_path / "out.json", b"0123456789")
    assert syscalls == [("fsync", "file", 10), ("replace", "out.json"), ("fsync", "dir", syscalls[2][2])]
    assert (tmp_path / "out.json").read_bytes() == b"0123456789"
    assert open_descriptors() == before  # the directory's descriptor is closed again


def test_a_row_is_on_disk_when_its_write_returns(tmp_path, syscalls) -> None:
    header = len("idx\tvalue\n")
    with TsvLog(tmp_path / "rows.tsv", ["idx", "value"]) as log:
        log.write([0, "a"])
        log.write([1, "b"])
        handle = log._handle
    assert syscalls == [("fsync", "file", header), ("fsync", "file", header + 4), ("fsync", "file", header + 8)]
    assert handle.closed  # leaving the with block closes the file


def test_close_is_idempotent_and_closes_the_file(tmp_path) -> None:
    log = TsvLog(tmp_path / "rows.tsv", ["idx"])
    log.close()
    assert log._handle.closed
    log.close()  # a second close is no error


def test_a_failed_write_leaves_no_temporary_file_and_the_old_content(tmp_path, monkeypatch) -> None:
    old = tmp_path / "table.md"
    old.write_text("old\n")

    def cannot_rename(src, dst) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "replace", cannot_rename)
    with pytest.raises(SmoothAdvError, match=f"cannot write {old}: Invalid cross-device link"):
        atomic_write_bytes(old, b"new\n")
    assert old.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_the_umask_is_read_without_being_changed(tmp_path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new.json", b"{}")
        assert os.umask(0o027) == 0o027  # what the process had before the write
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640  # 0o666 minus the umask, not 0o600


def test_writes_and_directories_create_missing_parents_and_accept_existing_ones(tmp_path) -> None:
    atomic_write_bytes(tmp_path / "a" / "b" / "c.json", b"1")
    atomic_write_bytes(tmp_path / "a" / "b" / "d.json", b"2")  # the directory now exists
    assert (tmp_path / "a" / "b" / "c.json").read_bytes() == b"1"
    assert make_directory(tmp_path / "x" / "y") == tmp_path / "x" / "y" and (tmp_path / "x" / "y").is_dir()
    assert make_directory(tmp_path / "x" / "y") == tmp_path / "x" / "y"


def test_an_existing_output_is_refused_by_default(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    out.write_text("x")
    with pytest.raises(SmoothAdvError, match="already exists; pass --resume"):
        check_writable_output(out)
    assert check_writable_output(out, resume=True) == out
    with pytest.raises(SmoothAdvError, match="already exists; pass --force"):
        check_new_output(out)
    assert check_new_output(out, force=True) == out
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(SmoothAdvError, match="is a directory"):
        check_new_output(folder)


def test_two_names_of_one_file_are_one_path_and_two_missing_files_are_not(tmp_path) -> None:
    first = tmp_path / "model.pth"
    first.write_bytes(b"w")
    link = tmp_path / "sub" / "hard-link.pth"
    link.parent.mkdir()
    os.link(first, link)  # another path, another resolved name, the same file
    assert same_path(first, link) and same_path(link, first)
    assert same_path(tmp_path / "sub" / ".." / "missing.tsv", tmp_path / "missing.tsv")  # one name, no file yet
    assert not same_path(tmp_path / "missing.tsv", tmp_path / "other.tsv")
    assert not same_path(first, tmp_path / "missing.tsv")
    with pytest.raises(SmoothAdvError, match="is also an input"):
        check_new_output(link, force=True, inputs=[first])


def _aged_empty_lock(path: Path, age: float) -> Path:
    lock = Path(f"{path}.lock")
    lock.write_text("")
    then = time.time() - age
    os.utime(lock, (then, then))
    return lock


def test_an_empty_lock_is_respected_for_its_grace_and_taken_over_after_it(tmp_path) -> None:
    assert EMPTY_LOCK_GRACE == 10.0  # the documented grace (a holder writes its id right after creating the file)
    out = tmp_path / "c.tsv"
    lock = _aged_empty_lock(out, EMPTY_LOCK_GRACE - 2)
    with pytest.raises(SmoothAdvError, match="another run is writing"), OutputLock(out):
        pass
    assert lock.exists()
    _aged_empty_lock(out, EMPTY_LOCK_GRACE + 2)
    with OutputLock(out):
        assert lock.read_text() == f"{files.platform.node()}:{os.getpid()}"
    assert not lock.exists()


def test_a_lock_of_a_live_process_or_another_host_or_unknown_content_is_never_taken_over(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    lock = Path(f"{out}.lock")
    for text in (f"{files.platform.node()}:{os.getpid()}", "another-host:1", "not a lock"):
        lock.write_text(text)
        old = time.time() - 3600
        os.utime(lock, (old, old))
        with pytest.raises(SmoothAdvError, match="another run is writing"), OutputLock(out):
            pass
        assert lock.read_text() == text


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_once_and_never_twice(tmp_path, monkeypatch) -> None:
    out = tmp_path / "c.tsv"
    lock = Path(f"{out}.lock")
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{files.platform.node()}:{dead.pid}")
    with OutputLock(out):
        assert lock.read_text().endswith(f":{os.getpid()}")
    # a lock that is stale again at once (a writer racing in) is not taken over a second time
    lock.write_text(f"{files.platform.node()}:{dead.pid}")
    real_open = os.open

    attempts = []

    def exists_twice(path, flags, *args):
        if str(path) == str(lock) and len(attempts) < 2:
            attempts.append(path)
            Path(lock).write_text(f"{files.platform.node()}:{dead.pid}")
            raise FileExistsError(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", exists_twice)
    with pytest.raises(SmoothAdvError, match="could not take the lock"), OutputLock(out):
        pass


def test_asking_whether_a_lock_holder_lives_sends_it_no_signal(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    # a hang-up must kill the holder, as it does a normal process (a run started under nohup passes SIG_IGN on)
    holder = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        Path(f"{out}.lock").write_text(f"{files.platform.node()}:{holder.pid}")
        with pytest.raises(SmoothAdvError, match="another run is writing"), OutputLock(out):
            pass
        with pytest.raises(subprocess.TimeoutExpired):  # still running a second later: probed with signal 0
            holder.wait(timeout=1.0)
    finally:
        holder.kill()
        holder.wait()


def test_an_error_inside_a_lock_propagates_and_a_lock_not_taken_is_not_removed(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    with pytest.raises(KeyError), OutputLock(out):
        raise KeyError("inside")
    assert not Path(f"{out}.lock").exists()
    used = OutputLock(out)
    with used:
        pass
    Path(f"{out}.lock").write_text("another-host:1")  # another run took it since
    used.__exit__(None, None, None)  # a second exit releases nothing it no longer holds
    assert Path(f"{out}.lock").read_text() == "another-host:1"
    Path(f"{out}.lock").unlink()
    other = OutputLock(out)  # made, never entered
    Path(f"{out}.lock").write_text("another-host:1")
    other.__exit__(None, None, None)
    assert Path(f"{out}.lock").read_text() == "another-host:1"


def test_a_results_file_is_never_replaced_or_extended_without_being_told(tmp_path) -> None:
    out = tmp_path / "rows.tsv"
    out.write_text("x")  # one byte that is no prefix of the header: another file, not a run killed mid-header
    with pytest.raises(SmoothAdvError, match="already exists"):
        TsvLog(out, ["idx", "value"])
    with pytest.raises(SmoothAdvError, match="has header 'x'"):
        TsvLog(out, ["idx", "value"], resume=True)
    assert out.read_text() == "x"
    out.write_text("idx\tva")  # killed mid-header: started over
    with TsvLog(out, ["idx", "value"], resume=True) as log:
        assert log.done == set()
    assert out.read_text() == "idx\tvalue\n"


def test_a_duplicate_row_is_refused_with_its_line_number(tmp_path) -> None:
    out = tmp_path / "rows.tsv"
    out.write_text("idx\tvalue\n0\ta\n1\tb\n0\tc\n")
    with pytest.raises(SmoothAdvError, match=r"second row for idx 0 \(line 4\)"):
        TsvLog(out, ["idx", "value"], resume=True)


def test_a_header_that_cannot_be_written_closes_the_file_and_names_it(tmp_path, monkeypatch) -> None:
    opened = []

    class Full:
        closed = False

        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            self.closed = True

    def full_open(self, mode: str):
        opened.append(Full())
        return opened[-1]

    monkeypatch.setattr(TsvLog, "_open", full_open)
    with pytest.raises(SmoothAdvError, match="cannot write .*rows.tsv: No space left on device"):
        TsvLog(tmp_path / "rows.tsv", ["idx"])
    assert opened[0].closed


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="needs git")
def test_the_git_revision_is_the_package_s_commit_marked_dirty_by_tracked_changes_only(tmp_path, monkeypatch,
                                                                                         capfd) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    module = repo / "pkg" / "files.py"
    module.write_text("# the package\n")
    monkeypatch.setattr(files, "__file__", str(module))  # git_revision asks git about the package's directory
    assert files.git_revision() is None  # not a repository
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "pkg" / "untracked.txt").write_text("scratch")
    assert files.git_revision() == head  # an untracked file is not a change of the source
    module.write_text("# edited\n")
    assert files.git_revision() == f"{head}-dirty"
    capfd.readouterr()
    files.git_revision()
    assert capfd.readouterr() == ("", "")  # git's own output is read, never shown (checked on the descriptors)


def test_the_environment_records_this_python_and_the_versions() -> None:
    import platform

    import numpy
    import torch

    env = files.environment()
    assert env["python"] == platform.python_version()
    assert env["numpy"] == numpy.__version__ and env["torch"] == torch.__version__
    assert env["cpu_threads"] == torch.get_num_threads()


def test_provenance_files_are_sorted_indented_json_so_committed_sidecars_diff_line_by_line(tmp_path) -> None:
    import json

    files.write_provenance(tmp_path, {"sigma": 0.25, "out": Path("c.tsv"), "alpha": 0.001, "log": print})
    assert (tmp_path / "args.json").read_text() == '{\n  "alpha": 0.001,\n  "out": "c.tsv",\n  "sigma": 0.25\n}\n'
    env = (tmp_path / "env.json").read_text()
    assert env == json.dumps(json.loads(env), indent=2, sort_keys=True) + "\n" and '\n  "python": ' in env
    files.write_provenance(tmp_path, {"sigma": 0.25}, resumed=True)  # the same environment: nothing earlier
    assert "earlier" not in json.loads((tmp_path / "env.json").read_text())
