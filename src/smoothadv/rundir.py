"""One run lifecycle: the lock, the provenance, checkpoint-then-log, and ONE rule for what a resumed run may change.

Every durable run uses this module: classifier training (`train.fit`; Cohen et al. 2019, Salman et al.
2019), denoiser training through the same loop (`train.train_denoiser`; Salman et al. 2020, "Denoised
Smoothing", arXiv:2003.01908) and evaluation outputs (`run.write_rows`). It is a module of its own rather
than a section of `files.py` because it knows about settings: `files.py` holds crash-safe primitives
(atomic writes, `TsvLog`, `OutputLock`) that know nothing of what a run is; this module applies them to
a run and compares settings by their declarations.

Contract:

1. Lock: a training run holds `<out>/<checkpoint>.lock` (`RunDirectory.lock`), an evaluation `<out>.lock`;
   a second writer is refused (`files.OutputLock`).
2. Start: an existing checkpoint is never overwritten without `force`; with `resume` (or after a
   torchrun restart) the run continues from it (`RunDirectory.checkpoint_to_resume`).
3. The resume rule (`compare`): fields declared `settings.setting(..., rows=False)` may differ (they
   cannot change a result: paths, devices, progress); every other recorded field must agree, except the
   explicitly accepted changes a caller lists: a larger `epochs` for training (`EPOCHS_MAY_GROW`), and
   for evaluations `batch` and a larger `max` (`run.resume_differences`). A record older than a field
   counts as that field's default where the caller gives defaults (training). A nested settings
   dataclass recorded by an older version as its `repr()` is compared with the `repr()` of today's.
4. Provenance: `args.json` (the resolved settings, the objective, the resume `history`) and `env.json`
   (versions, device, git revision) at the start (`files.write_provenance`); a resumed run keeps the
   earlier, different environments in `env.json` (`earlier`), never only its own.
5. Ordering: each epoch writes its checkpoint, then its log row (`EpochLog.commit`), so a log row
   always has its checkpoint, and a resumed run keeps the rows of the epochs its checkpoint holds.
6. History: each resumption appends {"resumed_at_epoch", "changed"} to `args.json`'s `history`.
7. One run per directory: a directory holding another kind of run's checkpoint (`RUN_CHECKPOINTS`) is
   refused even with `force`, and a `log.tsv` of another header is never appended to (nor replaced
   without `force`). No file a run writes is one it reads (`files.refuse_inputs_as_outputs`: its
   `--pretrained`, `--init`, classifiers, extra images), whatever `force` says; a run that fails before
   its first checkpoint removes the files it created.
8. Data by content: a path (`--data-dir`) may change on resume, so the data are compared by their bytes
   (`data_digest`, `data_fingerprint`; recorded as `data_sha256` in a checkpoint or an output's sidecar;
   a record older than it is not compared), and so are the files a resumed run reads again (a denoiser's
   classifiers, a classifier's `--unlabelled` images: their SHA-256). An evaluation's files likewise
   (`run.DIGESTS`: compared on resume, merge and report whenever both records hold the digest; one a
   record lacks is unverified, listed under `unverified`, never refused).
9. A finished run is judged from its `args.json` and `log.tsv` alone (`RunDirectory.unfinished`: the one rule,
   no change accepted), so a caller that only reads its results needs no checkpoint (`smoothadv demo
   --report-only` on a committed run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .errors import SmoothAdvError
from .files import OutputLock, atomic_write_text, locked_run_directory, read_tsv, write_provenance
from .settings import bookkeeping_fields, flag_name, upgraded

__all__ = [
    "Difference", "EpochLog", "Rule", "RunDirectory", "compare", "described", "epochs_may_grow", "field_defaults",
    "objective_record", "plain", "read_settings", "settings_path", "settings_record", "unrecorded_digests",
]

#: the files of a training run besides its checkpoint
RUN_FILES = ("args.json", "env.json", "log.tsv")

#: an accepted change: (recorded value, new value) -> None when the change is accepted, else why it is refused
Rule = Callable[[Any, Any], str | None]


class Difference(NamedTuple):
    """One recorded setting that a resumed run would change."""

    name: str
    before: Any
    after: Any
    note: str = ""  # why an explicitly listed change was refused (e.g. a smaller --max)

    def refused(self, label: str | None = None) -> str:
        """'name: before != after' (with the note), or 'label before -> after' when a flag label is given."""
        if label is not None:
            return f"{label} {self.before!r} -> {self.after!r}"
        return f"{self.name}: {self.before!r} != {self.after!r}" + (f" ({self.note})" if self.note else "")

    def accepted(self) -> str:
        return f"{self.name}: {self.before!r} -> {self.after!r}"


def plain(value: Any) -> Any:
    """A value as JSON stores it: tuples as lists, paths as strings, settings dataclasses as their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {"name": type(value).__name__, **dataclasses.asdict(value)}
    return json.loads(json.dumps(value, default=str))


def _as_recorded(value: Any, before: Any) -> Any:
    """`value` in the form of the recorded `before`, as JSON stores it. A settings dataclass that an older
    version recorded as its repr() text is given as that text when the text names the same class and records
    every field of today's with the same value (fields it has and today's class lacks are not compared), else
    as today's repr()."""
    if not (dataclasses.is_dataclass(value) and not isinstance(value, type) and isinstance(before, str)):
        return plain(value)
    if before.startswith(f"{type(value).__name__}(") and all(
            any(f"{start}{f.name}={getattr(value, f.name)!r}{end}" in before for start in ("(", ", ") for end in ",)")
            for f in dataclasses.fields(value)):
        return before
    return repr(value)


def compare(recorded: Mapping[str, Any], current: Mapping[str, Any], *, free: Collection[str] = (),
            defaults: Mapping[str, Any] | None = None, accepted: Mapping[str, Rule] | None = None,
            keys: Collection[str] | None = None) -> tuple[list[Difference], list[Difference]]:
    """(refused, accepted): the settings a run resuming `recorded` with `current` would change. The ONE rule.

    Compared: `keys` (default: every key of either), minus `free` (the rows=False fields). A key the
    record lacks counts as its value in `defaults` when there is one (a record older than the field).
    A difference in a key of `accepted` is accepted when its rule returns None, else refused with the
    rule's note; any other difference is refused. Values are compared as JSON stores them (`plain`).
    """
    defaults, accepted = defaults or {}, accepted or {}
    names = set(recorded) | set(current) if keys is None else set(keys)
    refused_list: list[Difference] = []
    accepted_list: list[Difference] = []
    for name in sorted(names - set(free)):
        before = plain(recorded[name]) if name in recorded else plain(defaults.get(name))
        after = _as_recorded(current.get(name), before)
        if before == after:
            continue
        rule = accepted.get(name)
        note = rule(before, after) if rule is not None else "not an accepted change"
        if note is None:
            accepted_list.append(Difference(name, before, after))
        else:
            refused_list.append(Difference(name, before, after, "" if rule is None else note))
    return refused_list, accepted_list


def settings_record(settings: Any) -> dict[str, Any]:
    """Every field of a settings dataclass, paths as strings (what `args.json` and checkpoints record)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}


def field_defaults(cls: type) -> dict[str, Any]:
    """name -> default of each field of settings class `cls` that has one."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def described(objective: Any) -> dict[str, Any]:
    """The objective's `describe()` with each nested settings dataclass as plain data (`plain`:
    `dataclasses.asdict`), never its repr()."""
    return {key: plain(getattr(objective, key)) if dataclasses.is_dataclass(getattr(objective, key, None)) else value
            for key, value in objective.describe().items()}


def unrecorded_digests(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, ...]:
    """The digests (`*_sha256`) an objective records now that an older record lacks (written before the digest
    was recorded): unverified, so not compared; a digest both hold is compared like any other setting."""
    return tuple(key for key in current if key.endswith("_sha256") and key not in recorded)


def objective_record(objective: Any, recorded: Any = None) -> dict[str, Any]:
    """The objective's `describe()`; where the recorded description holds a nested setting as text (its repr(),
    as older versions wrote it), the same field of today's objective is given in that form (`_as_recorded`)."""
    described = dict(objective.describe())
    if isinstance(recorded, Mapping):
        for key, value in recorded.items():
            live = getattr(objective, key, None)
            if isinstance(value, str) and dataclasses.is_dataclass(live) and not isinstance(live, type):
                described[key] = _as_recorded(live, value)
    return described


def data_digest(dataset: Any, indices: Iterable[int]) -> str:
    """SHA-256 of the selected examples themselves (index, label, dtype, shape and bytes of each image): what
    identifies the data a run's rows were computed on, whatever path it was read from."""
    import numpy as np
    import torch

    digest = hashlib.sha256()
    for index in indices:
        x, y = dataset[index]
        array = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        label = int(y.item() if isinstance(y, torch.Tensor) else y)
        digest.update(f"{index}\0{label}\0{array.dtype}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset: Any, indices: Sequence[int] | None = None, count: int = 256) -> str:
    """`data_digest` of at most `count` examples evenly spaced over `indices` (default: all of `dataset`; all of
    them when there are no more), with how many there are: what identifies a dataset by content at the cost of
    reading a few hundred examples (an ImageNet split is never read whole for it)."""
    chosen = list(range(len(dataset))) if indices is None else list(indices)
    size = len(chosen)
    if size > count:
        chosen = [chosen[i * size // count] for i in range(count)]
    return f"{size}:{data_digest(dataset, chosen)}"


# ------------------------------------------------------------------ training runs


def epochs_may_grow(done: int) -> Rule:
    """`epochs` may change on resume, but not below the epochs already trained: it only says where the run
    stops (the schedule steps every `lr_step` epochs and warm-ups span fixed epochs, whatever `epochs` is)."""
    return lambda before, after: None if isinstance(after, int) and after >= done else f"already trained {done}"


#: the checkpoint file of each kind of training run (a run directory holds one run: one of these)
RUN_CHECKPOINTS = {"checkpoint.pth.tar": "a classifier", "denoiser.pth.tar": "a denoiser"}


class RunDirectory:
    """A training run's directory: `<out>/<checkpoint>` (+ `.lock`), `log.tsv`, `args.json`, `env.json`.

    One run per directory: a directory holding another kind of run's checkpoint (`RUN_CHECKPOINTS`) is
    refused even with `force` (its args.json and log.tsv would be replaced and describe the wrong run)."""

    def __init__(self, out_dir: str | os.PathLike[str], checkpoint: str) -> None:
        self.path = Path(out_dir)
        self.checkpoint = self.path / checkpoint

    def files(self) -> list[Path]:
        """Every file the run writes: its checkpoint and lock, `args.json`, `env.json`, `log.tsv`."""
        return [self.checkpoint, Path(f"{self.checkpoint}.lock"), *(self.path / name for name in RUN_FILES)]

    def existing(self) -> set[Path]:
        return {path for path in self.files() if path.exists()}

    def forget_new(self, before: Collection[Path]) -> None:
        """After a run that failed before writing its first checkpoint: remove the files it created (not in
        `before`), so that nothing but what was there is left."""
        if self.checkpoint.exists():
            return
        for path in self.path / "args.json", self.path / "env.json", self.path / "log.tsv":
            if path not in before:
                with contextlib.suppress(OSError):
                    path.unlink()

    def remove_if_empty(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def lock(self) -> OutputLock:
        """The directory created and the checkpoint's lock, to hold with `with` for the whole run."""
        return locked_run_directory(self.path, self.checkpoint.name)

    def refuse_another_run(self, columns: Sequence[str], force: bool) -> None:
        """Refuse (one line) a directory holding another kind of run (its checkpoint: even with `force`), or,
        without `force`, a `log.tsv` that is not this kind of run's log (another header)."""
        for name, kind in RUN_CHECKPOINTS.items():
            if name != self.checkpoint.name and (self.path / name).exists():
                raise SmoothAdvError(f"{self.path} holds {kind} run ({name}); its args.json and log.tsv would be "
                                     "replaced: choose another --out (one run per directory)")
        log = self.path / "log.tsv"
        if not force and log.exists():
            try:
                first = log.read_bytes().split(b"\n", 1)[0].decode("utf-8")
            except (OSError, UnicodeDecodeError):
                first = None
            if first != "\t".join(columns):
                raise SmoothAdvError(f"{log} is not the log of this kind of run (header {first!r}); pass --force to "
                                     "replace it, or choose another --out")

    def checkpoint_to_resume(self, *, resume: bool, force: bool, restarted: bool = False) -> Path | None:
        """The checkpoint to continue from (`resume`, or torchrun restarted the worker), or None to start
        afresh; an existing checkpoint is never overwritten without `force` (SmoothAdvError, one line)."""
        resume = resume or (restarted and self.checkpoint.exists())
        if self.checkpoint.exists() and not (resume or force):
            raise SmoothAdvError(f"{self.checkpoint} exists; pass --resume to continue training or --force to start "
                                 "over")
        return self.checkpoint if resume and self.checkpoint.exists() else None

    def check_resumable(self, saved: Mapping[str, Any], settings: Any, objective: Any = None) -> None:
        """Refuse (SmoothAdvError, one line) to resume checkpoint `saved` with `settings` and `objective` if
        that would change the run (`compare` over the settings' fields, their rows=False ones free, a larger
        `epochs` accepted; the objective at the last trained epoch against the recorded one)."""
        recorded, done = saved.get("config"), int(saved.get("epoch", 0))
        if not isinstance(recorded, dict):
            raise SmoothAdvError(f"{self.checkpoint} records no training settings, so resuming it cannot be checked; "
                                 "start over with --force or a new --out")
        cls = type(settings)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        refused, _ = compare(recorded, settings_record(settings), free=bookkeeping_fields(cls),
                             defaults=field_defaults(cls), accepted={"epochs": epochs_may_grow(done)}, keys=fields)
        changed = [d.refused(flag_name(fields[d.name])) for d in refused if d.name != "epochs"]
        then = saved.get("objective")
        if isinstance(then, dict):
            then = upgraded(then)  # fields renamed since the checkpoint was written
        if objective is not None and isinstance(then, dict):
            now = objective_record(objective.at_epoch(max(done - 1, 0)), then)
            if now.get("name") != then.get("name"):
                changed.append(f"--objective {then.get('name')} -> {now.get('name')}")
            else:  # its sigma is --sigma, compared above
                wrong, _ = compare(then, now, free=("sigma", "name", *unrecorded_digests(then, now)))
                changed += [f"objective {d.name} {d.before!r} -> {d.after!r}" for d in wrong]
        if changed:
            free = [flag_name(f) for name, f in fields.items()
                    if name in bookkeeping_fields(cls) and name not in ("out_dir", "resume", "force")]
            may_change = ", ".join(["--epochs (to extend it)", *free[:-1]]) + f" and {free[-1]}" if free else "--epochs"
            raise SmoothAdvError(f"cannot resume {self.checkpoint}: that would change the run ({'; '.join(changed)}); "
                                 f"on resume only {may_change} may change: use the recorded settings, or start over "
                                 "with --force or a new --out")
        if any(d.name == "epochs" for d in refused):
            raise SmoothAdvError(f"cannot resume {self.checkpoint} with --epochs {settings.epochs}: it has already "
                                 f"trained {done} epochs (pass --epochs {done} or more)")

    def unfinished(self, settings: Any, objective: Any) -> str | None:
        """Why this directory does not hold a run of `settings` and `objective` trained to its last epoch ("was
        not trained", "was trained with other settings (...)", "was not trained to the end"), or None when it
        does. Read from `args.json` and `log.tsv` alone, so a run whose checkpoint was not kept (a committed one)
        is judged too. The settings are compared by the one rule (`compare`: rows=False fields free, a field
        newer than the record at its default) with no change accepted, `epochs` included; the objective as
        `args.json` recorded it (`objective_record`: renamed fields under today's names, an older repr())."""
        log = self.path / "log.tsv"
        try:
            recorded = json.loads((self.path / "args.json").read_text(encoding="utf-8"))
            epochs = len(read_tsv(log)[1]) if log.exists() else None
        except (OSError, ValueError, SmoothAdvError):
            recorded = epochs = None
        if not isinstance(recorded, dict) or epochs is None:
            return "was not trained"
        cls = type(settings)
        refused, _ = compare(recorded, settings_record(settings), free=bookkeeping_fields(cls),
                             defaults=field_defaults(cls), keys=[f.name for f in dataclasses.fields(cls)])
        then = upgraded(recorded["objective"]) if isinstance(recorded.get("objective"), dict) else {}
        now = objective_record(objective, then)
        refused += compare(then, now, free=unrecorded_digests(then, now))[0]
        if refused:
            return f"was trained with other settings ({'; '.join(d.refused() for d in refused)})"
        return "was not trained to the end" if epochs < settings.epochs else None

    def history(self, resumed: Mapping[str, Any] | None, record: Mapping[str, Any], at_epoch: int,
                free: Collection[str]) -> list[dict[str, Any]]:
        """args.json's `history`: the earlier entries, plus one for this run if it resumes a checkpoint that
        recorded the settings `resumed`, saying at which epoch and which settings changed (the `free`
        ones and a larger `epochs`; resume and force excluded)."""
        if resumed is None:
            return []
        try:
            earlier = json.loads((self.path / "args.json").read_text()).get("history", [])
        except (OSError, ValueError, AttributeError):
            earlier = []
        names = (set(free) | {"epochs"}) - {"resume", "force"}
        changes = {name: [plain(resumed.get(name)), plain(record.get(name))] for name in sorted(names)
                   if plain(resumed.get(name)) != plain(record.get(name))}
        return [*(earlier if isinstance(earlier, list) else []), {"resumed_at_epoch": at_epoch, "changed": changes}]

    def write_provenance(self, record: Mapping[str, Any]) -> None:
        """`args.json` (this record) and `env.json`; a resumed run (its record has a `history`) keeps the earlier
        environments in `env.json` (`files.write_provenance`)."""
        write_provenance(self.path, dict(record), resumed=bool(record.get("history")))

    def log(self, columns: Sequence[str], epochs_done: int) -> EpochLog:
        return EpochLog(self.path / "log.tsv", columns, epochs_done)


class EpochLog:
    """`log.tsv`: a header and one row per finished epoch, rewritten whole and atomically.

    On resume the rows of the epochs already trained are kept and any later ones dropped. `commit`
    writes the epoch's checkpoint first, then its row: a log row always has its checkpoint."""

    def __init__(self, path: Path, columns: Sequence[str], epochs_done: int) -> None:
        self.path = path
        self.lines = ["\t".join(columns)]
        if epochs_done > 0 and path.exists():
            try:
                kept = path.read_text(encoding="utf-8").splitlines()[: epochs_done + 1]
            except (OSError, UnicodeDecodeError) as exc:
                raise SmoothAdvError(f"cannot read {path}: {exc}") from None
            if kept and kept[0] != self.lines[0]:  # another kind of run's log: never append under its header
                raise SmoothAdvError(f"{path} has header {kept[0]!r}, not this run's {self.lines[0]!r}; it is another "
                                     "run's log: start over with --force or a new --out")
            self.lines = kept or self.lines

    def commit(self, save_checkpoint: Callable[[], None], row: Sequence[str]) -> None:
        save_checkpoint()
        self.lines.append("\t".join(row))
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


# ------------------------------------------------------------------ an evaluation output's sidecar


def settings_path(out: str | os.PathLike[str]) -> Path:
    """The provenance sidecar `<out>.args.json` written next to an evaluation output."""
    out = Path(out)
    return out.parent / f"{out.name}.args.json"


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
