"""The durable evaluation run: select examples, shard, resume, lock, append flushed rows, record provenance.

`run_evaluation(run, settings)` is what `smoothadv certify`, `predict`, `attack` and
`smooth-prediction` (and torchrun ranks, and the demo) call. It

1. selects the dataset indices (`select_indices`: every `skip`-th, at most `max`);
2. keeps this process's shard (`--shard i/k`, or rank r of k under torchrun: round-robin,
   `shard_indices`), writing `OUT.shard-i-of-k`;
3. refuses an existing output unless resuming or forcing, and, even with `--force`, an output (or a
   sidecar of it) that is the checkpoint or the denoiser it reads; with `resume`, checks the recorded
   settings (`OUT.args.json`) against these field by field (`setting_differences`: every field
   declared `rows=True` in `settings` must agree, and the data by content: `data_sha256`, the digest of
   the selected examples (of `DIGESTED` of them, evenly spaced, in a larger selection), whatever `--data-dir`
   they are read from) and skips the rows already written. The files are compared by content too
   (`DIGESTS`: the checkpoint's and the denoiser's SHA-256, recorded after loading and refused if the file
   changed while it was read), here and by `merge` and `report`: another file, even at the same path, is
   refused in one line naming the digest; a digest a sidecar lacks (written before it was recorded) is
   unverified, not refused (said on stderr, listed under `unverified`); what the sidecar recorded of the
   rows written (`resumed_changes`, `merged_from`, `unverified`, earlier environments) is kept;
4. holds a lock file (`OUT.lock`) so a second writer is refused;
5. appends each row flushed and fsynced as it is computed (`files.TsvLog`), so a killed run
   loses at most the row in progress;
6. under torchrun, the last rank to finish merges the shards (`merge_shards`).

Rows do not depend on sharding, order or resumption: each example's noise comes from its own
generator keyed by (seed, index) (`seeds.example_seed`). So shards merged, a resumed run, and
one uninterrupted run give the same rows (only the `time` column differs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .accel import fold_batchnorm, prepare_base, resolve_device
from .attacks import attack_recipe, attack_settings, build_attack
from .betting import BettingConfig
from .data import check_data_dir, get_dataset, input_shape
from .distributed import env_world, local_device
from .errors import SmoothAdvError
from .evaluate import (
    ATTACK_COLUMNS,
    CERTIFY_COLUMNS,
    PREDICT_COLUMNS,
    SMOOTH_PREDICTION_COLUMNS,
    attack_dataset,
    certify_dataset,
    predict_dataset,
    row_fields,
    smooth_prediction_dataset,
)
from .files import (
    OutputLock,
    TsvLog,
    atomic_write_text,
    check_writable_output,
    file_sha256,
    read_tsv,
    refuse_inputs_as_outputs,
    write_provenance,
)
from .models import attach_denoiser, load_checkpoint
from .models import check_dataset as check_denoiser_dataset
from .progress import progress as reporter
from .rundir import Difference, Rule, compare, data_fingerprint, read_settings, settings_path
from .sequential import (
    LEGACY_SEQUENTIAL_COLUMNS,
    SEQUENTIAL_COLUMNS,
    SequentialConfig,
    certify_sequential_dataset,
    sequential_columns,
)
from .settings import (
    AttackRunSettings,
    BettingSettings,
    CertifySettings,
    EvaluationSettings,
    PredictSettings,
    RunSettings,
    SmoothPredictionSettings,
    bookkeeping_fields,
    row_settings,
)
from .smoothing import Smooth

__all__ = [
    "ATTACK_RUN_DEFAULTS", "BATCH_SETTINGS", "DIGESTS", "EVALUATION_COMMANDS", "IGNORED_SETTINGS", "Job", "RunOutcome",
    "expected_jobs", "find_shards", "job_key", "load_smoothed", "merge_shards", "normalize_record", "record",
    "resume_differences", "row_key", "rows_maker", "run_attack_recipe", "run_evaluation", "run_jobs", "select_indices",
    "sequential_test", "setting_differences", "shard_indices", "shard_path", "shards_complete", "test_name",
    "unfinished", "unverified", "write_rows",
]

#: recorded settings that cannot change a row's content; shards (and resumed runs) must agree on all others
IGNORED_SETTINGS = bookkeeping_fields(RunSettings) | {"handler", "config", "merged_from", "resumed_changes",
                                                       "unverified"}

#: recorded settings of an evaluation that rows do not depend on (verified: the noise pieces of each example, and
#: so its counts, are the same at any batch size), so a resumed run or a shard may differ in them
BATCH_SETTINGS = frozenset({"batch"})
EVALUATION_COMMANDS = ("certify", "predict", "attack")

_SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)$")

Job = Any  # a dataset index, or (eps, index) for an attack at several radii


# ------------------------------------------------------------------ which examples


def select_indices(size: int, skip: int = 1, max_count: int | None = None, start: int = 0) -> list[int]:
    """Dataset indices start, start + skip, ... (at most `max_count` of them)."""
    if skip < 1:
        raise SmoothAdvError(f"skip must be >= 1, got {skip}")
    if max_count is not None and max_count < 1:
        raise SmoothAdvError(f"max must be >= 1, got {max_count}")
    if size == 0:
        raise SmoothAdvError("the dataset is empty")
    selected = range(start, size, skip)  # sliced before it is listed: a huge size with --max costs nothing
    return list(selected[:max_count] if max_count is not None else selected)


def shard_indices(jobs: Sequence[Job], shard: int, num_shards: int) -> list[Job]:
    """The part of `jobs` that shard `shard` of `num_shards` runs (round-robin, so shards balance)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise SmoothAdvError(f"shard must be i/k with 0 <= i < k, got {shard}/{num_shards}")
    return list(jobs[shard::num_shards])


def job_key(job: Job) -> str:
    """The identity of a job in its output: 'idx', or 'idx@eps' for an attack job (eps, idx)."""
    return f"{job[1]}@{float(job[0]):g}" if isinstance(job, tuple) else str(job)


def row_key(header: Sequence[str], fields: Sequence[str]) -> str:
    """The job key of a written row (its idx, with its eps when the file has an eps column)."""
    idx = fields[header.index("idx")] if "idx" in header else fields[0]
    if "eps" in header:
        try:
            return f"{idx}@{float(fields[header.index('eps')]):g}"
        except ValueError:
            return f"{idx}@{fields[header.index('eps')]}"
    return idx


def run_jobs(settings: EvaluationSettings, size: int) -> list[Job]:
    """Every job of a run over a dataset of `size` examples, in output order (all shards together)."""
    indices = select_indices(size, settings.skip, settings.max)
    if isinstance(settings, AttackRunSettings):
        return [(eps, i) for eps in settings.eps for i in indices]
    return list(indices)


#: examples of a run's selection whose bytes identify its data (`rundir.data_fingerprint`): every one of a selection
#: this small (Cohen et al.'s 500 ImageNet images), evenly spaced ones of a larger one (never a whole split read)
DIGESTED = 1024


def run_indices(settings: EvaluationSettings, size: int) -> list[int]:
    """The dataset indices a run selects (all shards together; each once, whatever the radii)."""
    return select_indices(size, settings.skip, settings.max)


#: the attack settings of an attack run when its recipe does not give them (`attacks.attack_recipe`): 20 steps
#: (Salman et al.'s evaluation, Section 4); DDN's gamma and initial norm by `attacks.build_attack`'s rule
ATTACK_RUN_DEFAULTS: dict[str, Any] = {"steps": 20}


def run_attack_recipe(settings: AttackRunSettings) -> dict[str, Any]:
    """The complete attack recipe of an attack run (`attacks.attack_recipe` with `ATTACK_RUN_DEFAULTS`): what
    it records and builds the attack of each radius from."""
    return attack_recipe(settings.attack, ATTACK_RUN_DEFAULTS)


def check_radii(settings: EvaluationSettings) -> None:
    """Refuse (one line) an attack run's attack recipe that `attacks.attack_recipe` refuses (its types, limits and
    the settings of another attack: what can make `build_attack` fail at a valid radius), and radii that an
    output cannot tell apart: rows are keyed by eps written with 6 significant digits (`job_key`), so two radii
    equal at that precision would share their keys (the file could be neither resumed nor merged)."""
    if not isinstance(settings, AttackRunSettings):
        return
    run_attack_recipe(settings)
    seen: dict[str, float] = {}
    for eps in settings.eps:
        key = f"{float(eps):g}"
        if key in seen:
            raise SmoothAdvError(f"--eps {seen[key]!r} and {float(eps)!r} are the same radius {key} at the precision "
                                 "the output stores (6 significant digits); give each radius once")
        seen[key] = float(eps)


def check_test(settings: EvaluationSettings) -> None:
    """Build a sequential certify's test before any work, so that settings it cannot be built with (an alpha so
    small that the share a look spends, e.g. alpha / 8, underflows to 0) are one line naming --alpha."""
    if not (isinstance(settings, CertifySettings) and settings.mode == "sequential"):
        return
    try:
        config = sequential_test(settings)
        config.schedule  # noqa: B018 (a cached property: computing it is the check)
    except ValueError as exc:
        raise SmoothAdvError(f"--alpha {settings.alpha!r} is too small for the {test_name_of(settings)} test: the "
                             f"share of alpha one of its looks spends is not a positive number ({exc})") from None


def test_name_of(settings: CertifySettings) -> str:
    return "betting" if isinstance(settings.test, BettingSettings) else "alpha-spending"


def _data_extension(out: Path, dataset: Any, settings: EvaluationSettings) -> dict[str, Rule]:
    """For a resumed output whose selection grows (a larger --max): the data digest of its recorded selection
    recomputed on this dataset; when it matches, the rows written are of these data and the new digest (of the
    longer selection) is accepted (`resume_differences`)."""
    previous = read_settings(out) if out.exists() else None
    if previous is None or not isinstance(previous.get("data_sha256"), str) or previous.get("max") == settings.max:
        return {}
    then = previous.get("max")
    if then is not None and (isinstance(then, bool) or not isinstance(then, int) or then < 1):
        return {}
    if data_fingerprint(dataset, select_indices(len(dataset), settings.skip, then), DIGESTED) != \
            previous["data_sha256"]:
        return {}
    return {"data_sha256": lambda before, after: None}


def _outputs(final: Path, shard: tuple[int, int] | None, world: int) -> list[tuple[str, Path]]:
    """Every file an evaluation writes: the output (and its shard file), each with its sidecars and lock."""
    written = [final] + ([shard_path(final, *shard)] if shard is not None else [])
    if world > 1:
        written += [shard_path(final, i, world) for i in range(world)]
    named: list[tuple[str, Path]] = []
    for path in written:
        named += [("--out" if path == final else "the shard file", path),
                  ("the settings sidecar", settings_path(path)), ("the environment sidecar", _env_path(path)),
                  ("the lock file", Path(f"{path}.lock"))]
    return named


def _env_path(out: Path) -> Path:
    return out.parent / f"{out.name}.env.json"


def _run_inputs(run: RunSettings) -> list[tuple[str, str | None]]:
    """The files an evaluation reads besides the dataset: the checkpoint and the denoiser."""
    return [("the checkpoint", run.checkpoint), ("--denoiser", run.denoiser)]


# ------------------------------------------------------------------ files next to an output


def shard_path(out: str | os.PathLike[str], shard: int, num_shards: int) -> Path:
    """The file shard `shard` of `num_shards` writes for the final output `out`: OUT.shard-i-of-k."""
    return Path(f"{out}.shard-{shard}-of-{num_shards}")


def setting_differences(a: dict[str, Any], b: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """'key: a != b' for every recorded setting (not in IGNORED_SETTINGS or `ignore`) on which `a` and `b` disagree
    (`rundir.compare`, with no change accepted). The digests (`DIGESTS`) are compared whenever both records hold
    them, and a difference in one names the file that differs (`_refusal`); a digest one record lacks is
    unverified (`unverified`), not a difference. What `merge` and `report` (one NAME, several files) check. Both
    records are read as this version writes them (`normalize_record`)."""
    a, b = normalize_record(a), normalize_record(b)
    refused, _ = compare(a, b, free=IGNORED_SETTINGS | ignore | _unrecorded(a, b), accepted=_DIGEST_NOTES)
    return [_refusal(difference) for difference in refused]


def _evaluation(settings: dict[str, Any]) -> bool:
    return settings.get("command") in EVALUATION_COMMANDS


def resume_differences(previous: dict[str, Any], current: dict[str, Any],
                       extra: dict[str, Rule] | None = None) -> tuple[list[str], list[str]]:
    """(refused, accepted): the recorded settings of an output and those of the run resuming it, compared by the
    one rule of resumption (`rundir.compare`).

    `refused` lists the differences that would change rows ('key: old != new'); `accepted` the changes
    that cannot ('key: old -> new'): of an evaluation (certify, predict, attack), its `batch`, and a
    larger `max` (or none), which extends the selection past the rows already written, in the order an
    uninterrupted run writes them (also per shard: shard i of k takes every k-th job of the longer list).
    Every other setting but the rows=False ones (`IGNORED_SETTINGS`) must agree; a smaller `max` is refused,
    and so is a larger one for an attack at several radii (its rows are ordered radius first). The files
    and data are compared by content (`DIGESTS`: the checkpoint's, the denoiser's and the selected examples'
    SHA-256; a digest one record lacks is unverified, not compared): a larger selection's digest is accepted
    only through `extra` (`_data_extension`, which checked the recorded selection's digest on these data).
    """
    previous, current = normalize_record(previous), normalize_record(current)
    accepted = {"batch": lambda before, after: None, "max": _max_may_grow(current)} \
        if _evaluation(previous) and _evaluation(current) else {}
    accepted = {**_DIGEST_NOTES, **accepted, **(extra or {})}
    refused, changed = compare(previous, current, free=IGNORED_SETTINGS | _unrecorded(previous, current),
                               accepted=accepted)
    return [_refusal(difference) for difference in refused], [  # the data's digest follows --max: not a change
        difference.accepted() for difference in changed if difference.name != "data_sha256"]


#: the digests an evaluation records (`OUT.args.json`), each with what it identifies: resume, merge and report
#: compare them whenever both records hold one (a file changed at the same path is another file). A record
#: that lacks one (written before it was recorded, or by another tool) is unverified, never refused: the
#: rows go on, `unverified` lists the digest in the output's sidecar, and a resume says so on stderr
DIGESTS: dict[str, str] = {
    "checkpoint_sha256": "another checkpoint, or the file at that path changed since the rows were computed",
    "denoiser_sha256": "another --denoiser, or none, or its files changed since the rows were computed",
    "denoiser_weights_sha256": "the diffusion model's weights files differ",
    "denoiser_schedule_sha256": "the diffusion model's scheduler config differs",
    "data_sha256": "the selected examples differ: another dataset or --data-dir than the one the rows were "
                   "computed on",
}

#: settings a record may lack (written by a version before them): compared only when both records hold them
UNRECORDED_BEFORE = frozenset(DIGESTS)


def _digest_note(name: str) -> Rule:
    return lambda before, after: DIGESTS[name]


_DIGEST_NOTES: dict[str, Rule] = {name: _digest_note(name) for name in DIGESTS}


def _lacks(record: dict[str, Any], name: str, other: dict[str, Any]) -> bool:
    """Whether `record` holds no digest `name` where it could have held one. A denoiser's digests can be missing
    only when both runs used a denoiser: a run without one records none, and that is a difference (f is not
    f o D), never an unverified digest."""
    if record.get(name) is not None:
        return False
    return not name.startswith("denoiser_") or (record.get("denoiser") is not None
                                                and other.get("denoiser") is not None)


def _unrecorded(a: dict[str, Any], b: dict[str, Any]) -> frozenset[str]:
    return frozenset(name for name in UNRECORDED_BEFORE if _lacks(a, name, b) or _lacks(b, name, a))


def unverified(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The digests (`DIGESTS`) one of two records holds and the other lacks (written before it was recorded):
    they cannot be compared, so the rows of the record lacking one are unverified against that file."""
    return sorted(name for name in _unrecorded(a, b) if (a.get(name) is None) != (b.get(name) is None))


def _listed(value: Any) -> list[Any]:
    """A recorded list (`resumed_changes`, `merged_from`, `unverified`), or [] for anything else (a hand-edited
    sidecar)."""
    return list(value) if isinstance(value, list) else []


def _short(value: Any) -> str:
    """A digest shortened for a one-line message (its first 12 hex digits; a selection's count kept)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_short(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str):
        count, _, digest = value.rpartition(":")
        return (f"{count}:" if count else "") + (f"{digest[:12]}..." if len(digest) > 12 else digest)
    return "none" if value is None else repr(value)


def _refusal(difference: Difference) -> str:
    """'name: before != after (note)', a digest shortened and named by what it identifies."""
    if difference.name in DIGESTS:
        return f"{difference.name}: {_short(difference.before)} != {_short(difference.after)} ({difference.note})"
    return difference.refused()


def _only_digests(differences: Sequence[str]) -> bool:
    return bool(differences) and all(d.split(":", 1)[0] in DIGESTS for d in differences)


def _max_may_grow(current: dict[str, Any]) -> Rule:
    """A larger `max` (or None: all examples) extends the selection, unless the rows are ordered radius first."""
    def rule(old: Any, new: Any) -> str | None:
        extends = old is not None and (new is None or (isinstance(new, int) and isinstance(old, int) and new > old))
        if extends and isinstance(current.get("eps"), list):  # new rows would interleave with the written ones
            return "an attack at several --eps cannot be extended"
        return None if extends else "only a larger --max, which extends the selection, can resume"

    return rule


def record(run: RunSettings, settings: EvaluationSettings, **facts: Any) -> dict[str, Any]:
    """The provenance of a run as written to `OUT.args.json`: every field of both settings, resolved
    (sequential mode records its fitted looks, the alpha spent at each and the class source; betting
    its first draw, last size, alpha's final share and mixture), plus
    `facts` such as the checkpoint's SHA-256 and the dataset size."""
    values: dict[str, Any] = {**asdict(run), **asdict(settings), "command": settings.command}
    values.pop("sequential", None)  # recorded flat, as every version wrote it
    if isinstance(settings, CertifySettings) and settings.mode == "sequential":
        config = sequential_test(settings)
        values.update(class_from=settings.class_from, policy=config.policy, radii=list(config.schedule.radii),
                      n=None, forecast_alpha="strict" if config.forecast_alpha is None else config.forecast_alpha,
                      selection=config.selection, tolerance=config.tolerance, test=test_name(config))
        if isinstance(config, BettingConfig):  # the first draw and the last size, alpha's final share, the mixture
            values.update(looks=[config.first, config.schedule.last], levels=None, final_share=config.final_share,
                          bets=[list(bet) for bet in config.bets])
        else:
            values.update(looks=list(config.schedule.looks), levels=list(config.schedule.levels))
    elif isinstance(settings, CertifySettings):  # fixed n: the sequential fields as earlier versions recorded them
        values.update(class_from=None, policy=None, radii=None, tolerance=None, test=None, looks=None,
                      forecast_alpha=None, selection=None)
    if isinstance(settings, AttackRunSettings):
        values["eps"] = settings.eps[0] if len(settings.eps) == 1 else list(settings.eps)
        values["attack"] = run_attack_recipe(settings)
    values["shard"] = list(run.shard) if run.shard else None
    return {**values, **facts}


def unfinished(run: RunSettings, settings: EvaluationSettings, *, free: Collection[str] = ()) -> str | None:
    """Why `run.out` is not an evaluation finished with `settings` ("did not finish": no file, or fewer rows than its
    recorded selection; "was made with other settings (...)"), or None when it is: the evaluation's counterpart of
    `RunDirectory.unfinished`. The recorded settings are compared by the one rule (`rundir.compare`, on the fields
    that change rows but `batch` and `free`, records of earlier versions read as this one writes them), and so is
    the checkpoint's digest when the checkpoint is there. A file without a settings sidecar (not written by
    smoothadv, or by a version before sidecars) cannot be compared: only its existence is judged."""
    out = Path(run.out)
    if not out.exists():
        return "did not finish"
    recorded = read_settings(out)
    if recorded is None:
        return None
    facts = {"checkpoint_sha256": file_sha256(run.checkpoint)} if Path(run.checkpoint).is_file() else {}
    keys = (set(row_settings(settings)) - {"batch", *free}) | set(facts)
    refused, _ = compare(normalize_record(recorded), record(run, settings, **facts), keys=keys)
    if refused:
        return f"was made with other settings ({'; '.join(d.refused() for d in refused)})"
    return "did not finish" if len(read_tsv(out)[1]) < len(expected_jobs(recorded)) else None


# ------------------------------------------------------------------ the run


class RunOutcome(NamedTuple):
    path: Path       # the file written (a shard file when sharded)
    rows: int        # jobs of this process (written now or before)
    resumed: int     # of which were already there
    merged: Path | None  # the merged output, when this process merged the shards (torchrun)


def write_rows(out: Path, recorded: dict[str, Any], columns: Sequence[str], jobs: Sequence[Job],
               make_rows: Callable[[list[Job]], Iterable[NamedTuple]], *, resume: bool, force: bool,
               progress: bool = True, label: str = "", restart_on_change: bool = False,
               show: bool = True, accepted: dict[str, Rule] | None = None) -> RunOutcome:
    """Append one row per job to the TSV `out` (resumable, locked, each row flushed and fsynced).

    A run that fails before its first row leaves no new file behind (output and sidecars it created).

    With `resume`, rows already in `out` are kept and their jobs skipped, after checking that `out`
    was started with the same `recorded` settings (else SmoothAdvError; or, with
    `restart_on_change`, the file is started over). A file with rows but no `OUT.args.json` is
    not resumed (its rows cannot be checked), nor one holding a job twice or a row that is not one
    of `jobs`: SmoothAdvError, the file untouched. So the finished file holds each job's row exactly
    once, in job order (rows resumed out of order are put back in order): the file an uninterrupted
    run writes. `recorded` is written to `OUT.args.json` together with `OUT.env.json` (versions,
    device, git revision). Progress (`show`): a bar on a terminal with `progress`, else a plain line
    every 30 s (`progress.progress`).
    """
    with OutputLock(out):
        if resume and out.exists():
            previous = read_settings(out)
            differences, changes = ([], []) if previous is None else resume_differences(previous, recorded,
                                                                                         accepted)
            if previous is None and _has_rows(out):
                read_tsv(out, what="refusing to resume it")  # a file that is not a TSV at all is refused as such
                differences = [f"{settings_path(out).name} (its recorded settings) is missing"]
            if differences and restart_on_change:
                resume, force = False, True
            elif previous is None and differences:
                raise SmoothAdvError(f"cannot resume {out}: {settings_path(out)}, its recorded settings, is missing, "
                                     "so its rows cannot be checked against these settings; restore that file, or "
                                     "start over with --force or a new --out")
            elif _only_digests(differences):
                raise SmoothAdvError(f"cannot resume {out}: its rows were computed with other files "
                                     f"({'; '.join(differences)}); resume with the files they were computed with "
                                     "(the same bytes: a copy at another path is fine), or start over with --force "
                                     "or a new --out")
            elif differences:
                raise SmoothAdvError(f"cannot resume {out}: it was started with other settings "
                                     f"({'; '.join(differences)}); use the same flags or a new --out")
            elif previous is not None:
                recorded = _resumed_record(out, previous, recorded, changes, show)
        created = [path for path in (out, settings_path(out), out.parent / f"{out.name}.env.json") if not path.exists()]
        try:
            with TsvLog(out, columns, resume=resume, force=force, key=lambda fields: row_key(columns, fields)) as log:
                stray = log.done - {job_key(job) for job in jobs}
                if stray:
                    raise SmoothAdvError(f"cannot resume {out}: it has {len(stray)} row(s) that are not part of this "
                                         f"run (e.g. idx {sorted(stray)[0]}); remove them, or start over with --force")
                outcome = _append(out, log, recorded, jobs, make_rows, progress, label, show)
        except BaseException:
            if created:
                _forget(out, created)
            raise
        _put_in_job_order(out, columns, jobs)
        return outcome


def _resumed_record(out: Path, previous: dict[str, Any], recorded: dict[str, Any], changes: Sequence[str],
                    show: bool = True) -> dict[str, Any]:
    """The record of a run resuming `out`: `recorded`, with what `previous` (its sidecar) recorded of the rows
    already written kept: `merged_from` (the shards they were merged from), `resumed_changes` (each accepted
    change, in order, then this run's `changes`) and `unverified` (the digests the rows were never checked
    against, then those `previous` lacks: said on stderr when `show`)."""
    kept = {key: previous[key] for key in ("merged_from",) if key in previous}
    history = [*_listed(previous.get("resumed_changes")), *changes]
    new = [name for name in unverified(previous, recorded) if name not in _listed(previous.get("unverified"))]
    unchecked = sorted({*(n for n in _listed(previous.get("unverified")) if isinstance(n, str)), *new})
    if new and show:
        print(f"smoothadv: note: {settings_path(out)} records no {', '.join(new)} (written before it was recorded): "
              f"the rows already in {out} are unverified against it (listed under 'unverified')", file=sys.stderr)
    return {**recorded, **kept, **({"resumed_changes": history} if history else {}),
            **({"unverified": unchecked} if unchecked else {})}


def _forget(out: Path, created: Sequence[Path]) -> None:
    """After a failed run: remove the files it `created` (the output, its sidecars) if `out` holds no row (nothing
    to resume); an output that existed before the run stays."""
    with contextlib.suppress(OSError):
        if out.exists() and out.read_bytes().count(b"\n") > 1:
            return
    for path in created:
        with contextlib.suppress(OSError):
            path.unlink()


def _has_rows(out: Path) -> bool:
    """Whether `out` holds at least one complete line after its header (read as bytes: any file)."""
    try:
        return out.read_bytes().count(b"\n") >= 2
    except OSError:
        return False


def _put_in_job_order(out: Path, columns: Sequence[str], jobs: Sequence[Job]) -> None:
    """Rewrite `out` (atomically) with its rows in job order, if a resumed run appended them out of order."""
    header, rows = read_tsv(out)
    position = {job_key(job): i for i, job in enumerate(jobs)}
    order = [position[row_key(columns, row)] for row in rows]
    if order != sorted(order):
        rows = [row for _, row in sorted(zip(order, rows), key=lambda item: item[0])]
        atomic_write_text(out, "\n".join([header, *("\t".join(row) for row in rows)]) + "\n")


def _append(out: Path, log: TsvLog, recorded: dict[str, Any], jobs: Sequence[Job],
            make_rows: Callable[[list[Job]], Iterable[NamedTuple]], progress: bool, label: str,
            show: bool = True) -> RunOutcome:
    todo = [job for job in jobs if job_key(job) not in log.done]
    write_provenance(out.parent, recorded, prefix=f"{out.name}.", resumed=bool(log.done))
    with reporter(len(jobs), initial=len(jobs) - len(todo), label=label, bars=progress, show=show) as bar:
        for row in make_rows(todo):
            log.write(row_fields(row))
            bar.update(1)
    return RunOutcome(out, len(jobs), len(jobs) - len(todo), None)


def load_smoothed(run: RunSettings, settings: EvaluationSettings
                  ) -> tuple[Smooth, Any, dict[str, Any], torch.device]:  # Any: a sized map-style Dataset
    """(Smooth, dataset, checkpoint metadata, device) for a run: the checkpoint on this process's device
    (torchrun: cuda -> cuda:LOCAL_RANK), prepared for speed as asked, and the dataset split.

    With `run.denoiser` the base classifier is f o D (`models.attach_denoiser`: a denoiser trained
    for another sigma, or one that does not fit f's images, is refused; a directory is a diffusion model,
    Carlini et al. 2023, run for `denoiser_steps` network evaluations) and the metadata holds the
    denoiser's under "denoiser", with the facts the run records under "denoiser"["facts"]."""
    _, world, local_rank = env_world()
    device = local_device(resolve_device(run.device), local_rank, world)
    steps = run.denoiser_steps
    if run.denoiser is None and steps != 1:
        raise SmoothAdvError(f"--denoiser-steps {steps} needs --denoiser (a diffusion model directory)")
    model: Any
    model, meta = load_checkpoint(run.checkpoint, device, normalization=settings.normalization)
    if run.denoiser is not None:  # denoised smoothing: certify f o D (Salman et al. 2020)
        model, meta["denoiser"] = attach_denoiser(model, run.denoiser, sigma=settings.sigma,
                                                  shape=input_shape(meta["dataset"]), device=device, steps=steps)
    fold = settings.fold_bn
    if fold and meta.get("denoiser", {}).get("kind") == "diffusion":  # torch.fx cannot trace the UNet: fold f only
        model[1], fold = fold_batchnorm(model[1]), False  # f o D is Sequential(D, f)
    model = prepare_base(model, device, settings.precision, run.channels_last, run.compile, fold)
    dataset = get_dataset(meta["dataset"], "train" if settings.split == "train" else "test", run.data_dir)
    return Smooth(model, meta["num_classes"], settings.sigma), dataset, meta, device


def sequential_test(settings: CertifySettings) -> SequentialConfig | BettingConfig:
    """The sequential test that certify `settings` (mode "sequential") describe: a `sequential.SequentialConfig`
    (alpha spending, `settings.SpendingSettings`, the default) or a `betting.BettingConfig` (`BettingSettings`),
    at the settings' sigma and alpha."""
    test = settings.test
    fields = {f.name: getattr(test, f.name) for f in dataclasses.fields(test)}
    if isinstance(test, BettingSettings):
        return BettingConfig(settings.sigma, settings.alpha, **fields)
    return SequentialConfig(settings.sigma, settings.alpha, **fields)


def test_name(config: SequentialConfig | BettingConfig) -> str:
    """The `--test` name of a sequential test: "betting" or "spending"."""
    return "betting" if isinstance(config, BettingConfig) else "spending"


#: the attack settings an attack run recorded flat, next to its own, before the attack was its own settings
FLAT_ATTACK_KEYS = ("attack", "steps", "random_start", "gradient_free")


def normalize_record(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded run's settings as this version writes them, for comparison: sequential certify records
    written before the test was recorded by name hold `test` None for alpha spending, and those written
    before adaptive selection chose the class from all n0 samples ("fixed"); attack records written before the
    attack was its own settings hold its name, steps, random start and gradient-free flag flat (the settings
    another attack lacks, such as a random start recorded for DDN, were not used), now one nested recipe."""
    if recorded.get("command") == "attack" and isinstance(recorded.get("attack"), str):
        flat = {key: recorded[key] for key in FLAT_ATTACK_KEYS if key in recorded}
        owners = attack_settings()
        name = str(flat["attack"]).lower()
        used = {key: value for key, value in flat.items() if key == "attack" or name in owners[key][2]}
        try:
            nested = attack_recipe(used, ATTACK_RUN_DEFAULTS)
        except SmoothAdvError:
            return recorded  # not a recipe this version can read: compared as written (a difference)
        rest = {key: value for key, value in recorded.items() if key not in FLAT_ATTACK_KEYS}
        return {**rest, "attack": nested}
    if recorded.get("command") != "certify" or recorded.get("mode") != "sequential":
        return recorded
    defaults = {"test": "spending", "selection": "fixed", "tolerance": 0.0}
    return {**recorded, **{k: v for k, v in defaults.items() if recorded.get(k) is None}}


def rows_maker(settings: EvaluationSettings, smooth: Smooth, dataset: Dataset,
               device: torch.device) -> tuple[tuple[str, ...], Callable[[list[Job]], Iterable[NamedTuple]]]:
    """The TSV columns of a run and the function computing the rows of a list of jobs."""
    s = settings
    if isinstance(s, CertifySettings) and s.mode == "sequential":
        config = sequential_test(s)
        return SEQUENTIAL_COLUMNS, lambda todo: certify_sequential_dataset(
            smooth, dataset, todo, config=config, class_from=s.class_from, n0=s.n0,
            batch_size=s.batch, seed=s.seed, device=device)
    if isinstance(s, CertifySettings):
        return CERTIFY_COLUMNS, lambda todo: certify_dataset(smooth, dataset, todo, n0=s.n0, n=s.n, alpha=s.alpha,
                                                             batch_size=s.batch, seed=s.seed, device=device)
    if isinstance(s, SmoothPredictionSettings):
        return SMOOTH_PREDICTION_COLUMNS, lambda todo: smooth_prediction_dataset(
            smooth, dataset, todo, n=s.n, batch_size=s.batch, seed=s.seed, device=device)
    if isinstance(s, PredictSettings):
        return PREDICT_COLUMNS, lambda todo: predict_dataset(smooth, dataset, todo, n=s.n, alpha=s.alpha,
                                                             batch_size=s.batch, seed=s.seed, device=device)
    if isinstance(s, AttackRunSettings):
        recipe = run_attack_recipe(s)

        def attack_rows(todo: list[Job]) -> Iterable[NamedTuple]:
            for eps in dict.fromkeys(e for e, _ in todo):  # one attack per radius, jobs in their order
                attack = build_attack(eps=eps, **recipe)
                yield from attack_dataset(smooth, attack, dataset,
                                          [i for e, i in todo if e == eps], m=s.m, n=s.n, alpha=s.alpha,
                                          batch_size=s.batch, seed=s.seed, device=device, base_attack=s.base_attack)

        return ATTACK_COLUMNS, attack_rows
    raise SmoothAdvError(f"no evaluation is defined for {type(s).__name__}")


def run_evaluation(run: RunSettings, settings: EvaluationSettings, *, restart_on_change: bool = False,
                   log: Callable[[str], None] | None = print) -> RunOutcome:
    """Certify, predict or attack (by the type of `settings`) every selected example, durably.

    See the module docstring for what is guaranteed. Under torchrun (WORLD_SIZE > 1) rank r of k
    writes `OUT.shard-r-of-k` and the last rank to finish merges them into `OUT`. Returns what was
    written; `log` (default print) receives one line saying where.
    """
    check_data_dir(run.data_dir)
    rank, world, _ = env_world()
    if world > 1 and run.shard is not None:
        raise SmoothAdvError("--shard is for separate jobs; under torchrun the ranks already split the examples")
    shard = (rank, world) if world > 1 else run.shard
    final = Path(run.out)
    check_radii(settings)
    check_test(settings)
    refuse_inputs_as_outputs(_outputs(final, shard, world), _run_inputs(run))
    if world > 1:  # the merged output must be writable before any work starts
        check_writable_output(final, resume=run.resume, force=run.force)
    out = check_writable_output(shard_path(final, *shard) if shard else final, resume=run.resume or restart_on_change,
                                force=run.force)
    read_before = {"the checkpoint": _file_digest(run.checkpoint), "--denoiser": _file_digest(run.denoiser)}
    smooth, dataset, meta, device = load_smoothed(run, settings)
    jobs = run_jobs(settings, len(dataset))
    denoiser = meta.get("denoiser")
    if denoiser is not None:
        check_denoiser_dataset(denoiser, meta["dataset"], f"denoiser {run.denoiser}")
    facts = {} if denoiser is None else denoiser["facts"]  # digests, sigma, arch (attach_denoiser)
    checkpoint_sha256 = file_sha256(run.checkpoint)
    _refuse_changed_while_read("the checkpoint", run.checkpoint, read_before["the checkpoint"], checkpoint_sha256)
    if read_before["--denoiser"] is not None:  # a denoiser checkpoint (a diffusion model is a directory)
        _refuse_changed_while_read("--denoiser", run.denoiser, read_before["--denoiser"], facts.get("denoiser_sha256"))
    data = data_fingerprint(dataset, run_indices(settings, len(dataset)), DIGESTED)
    recorded = record(run, settings, checkpoint_sha256=checkpoint_sha256, dataset_size=len(dataset),
                      shard=list(shard) if shard else None, data_sha256=data, **facts)
    resume = run.resume or restart_on_change
    accepted = _data_extension(out, dataset, settings) if resume else {}
    if shard is not None:
        jobs = shard_indices(jobs, *shard)
    columns, make_rows = rows_maker(settings, smooth, dataset, device)
    if columns == SEQUENTIAL_COLUMNS and resume and out.exists():  # a file started before `samples` was named
        with contextlib.suppress(OSError, UnicodeDecodeError):
            columns = sequential_columns(out.read_text(encoding="utf-8").split("\n", 1)[0])
    outcome = write_rows(out, recorded, columns, jobs, make_rows, resume=resume,
                         force=run.force, progress=run.progress, label=settings.command,
                         restart_on_change=restart_on_change, show=rank == 0, accepted=accepted)
    say = log or (lambda _: None)
    if world > 1:  # the last rank to finish sees every shard complete and merges (merging twice is harmless)
        if shards_complete(final, world, recorded):
            rows = merge_shards(final, [shard_path(final, i, world) for i in range(world)], force=True)
            say(f"wrote {final} ({rows} rows, merged from {world} shards)")
            return outcome._replace(merged=final)
    elif shard is not None:
        say(f"wrote {out} ({len(jobs)} rows, shard {shard[0]}/{shard[1]}); when all shards are done: "
            f"smoothadv merge {final}")
    else:
        say(f"wrote {out} ({len(jobs)} rows)")
    return outcome


def _file_digest(path: str | os.PathLike[str] | None) -> str | None:
    """The SHA-256 of the file `path`, or None for no path, a directory or a missing file (the loader says
    what is wrong with it)."""
    return file_sha256(path) if path is not None and Path(path).is_file() else None


def _refuse_changed_while_read(flag: str, path: str | Path | None, before: str | None, after: object) -> None:
    """Refuse (one line) a file whose SHA-256 after it was loaded (`after`, what the run records) is not the one
    before (`before`): it was replaced while being read (a training run writing its checkpoint), so the
    recorded digest might not be of the weights the rows come from."""
    if before is not None and after != before:
        raise SmoothAdvError(f"{flag} {path} changed while it was being read (SHA-256 {_short(before)} before "
                             f"loading, {_short(after)} after: is a run writing it?), so the digest the output "
                             "records might not be of the weights used; evaluate a file that no run is writing (a "
                             "copy of it)")


# ------------------------------------------------------------------ shards


def find_shards(out: str | os.PathLike[str]) -> list[Path]:
    """The shard files OUT.shard-i-of-k that exist next to `out`."""
    pattern = glob.escape(str(out)) + ".shard-*-of-*"
    return sorted(Path(p) for p in glob.glob(pattern) if _SHARD_RE.search(p))


def job_count(settings: dict[str, Any]) -> int:
    """How many jobs a run with these recorded settings covers, counted without listing them (a sidecar may say
    any dataset_size)."""
    try:
        size, skip, most = int(settings["dataset_size"]), int(settings.get("skip") or 1), settings.get("max")
        count = len(range(0, size, skip)) if skip >= 1 else 0
        if most is not None:
            count = min(count, int(most))
    except (KeyError, TypeError, ValueError, OverflowError):
        raise SmoothAdvError("the settings file lacks dataset_size/skip/max; was it written by smoothadv?") from None
    eps = settings.get("eps")
    return count * (len(eps) if isinstance(eps, list) else 1)


#: merge lists the jobs of a run only when they are at most this many more than the rows its shards hold
LISTED_BEYOND_ROWS = 1_000_000


def _refuse_incomplete(parsed: Sequence[_Shard], tables: Sequence[list[list[str]]], total: int) -> None:
    """Refuse (one line) shards holding far fewer rows than the `total` jobs their settings describe, before any
    job is listed (a sidecar may claim any dataset_size: the list would not fit in memory); a shard a few rows
    short is left to the check that names a missing row."""
    if total <= sum(len(rows) for rows in tables) + LISTED_BEYOND_ROWS:
        return
    for i, (shard, rows) in enumerate(zip(parsed, tables)):
        share = len(range(i, total, len(parsed)))
        if len(rows) < share:
            raise SmoothAdvError(f"{shard.path} is incomplete: {share - len(rows)} of {share} rows missing; finish it "
                                 "with --resume")


def expected_jobs(settings: dict[str, Any]) -> list[Job]:
    """The jobs a run with these recorded settings covers (all shards together)."""
    try:
        indices = select_indices(int(settings["dataset_size"]), int(settings.get("skip") or 1), settings.get("max"))
    except (KeyError, TypeError, ValueError):
        raise SmoothAdvError("the settings file lacks dataset_size/skip/max; was it written by smoothadv?") from None
    eps = settings.get("eps")
    if eps is not None:  # an attack run: one job per (radius, index)
        return [(float(e), i) for e in (eps if isinstance(eps, list) else [eps]) for i in indices]
    return list(indices)


@dataclass
class _Shard:
    path: Path
    settings: dict[str, Any]


def _parse_shards(out: Path, paths: Sequence[Path]) -> list[_Shard]:
    parsed: dict[int, _Shard] = {}
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
            raise SmoothAdvError(f"shard {i}-of-{k} is given twice ({parsed[i].path} and {path})")
        settings = read_settings(path)
        if settings is None:
            raise SmoothAdvError(f"{settings_path(path)} is missing; cannot check that {path} matches the others")
        parsed[i] = _Shard(path, settings)
    assert total is not None
    missing = sorted(set(range(total)) - set(parsed))
    if missing:
        raise SmoothAdvError(f"missing shard(s) {', '.join(f'{i}-of-{total}' for i in missing)} of {out}")
    return [parsed[i] for i in range(total)]


def merge_shards(out: str | os.PathLike[str], shards: Sequence[str | os.PathLike[str]] | None = None, *,
                 force: bool = False) -> int:
    """Merge shard TSVs into `out` (rows in job order; written atomically); returns the row count.

    `shards` defaults to every OUT.shard-i-of-k next to `out`. All k shards of one k must be given,
    each with its settings sidecar; they must agree on every setting but `IGNORED_SETTINGS`, and
    together hold each selected job exactly once. Any violation raises SmoothAdvError (one line)
    and writes nothing. The merged sidecar is shard 0's with `merged_from` (the shards), every shard's
    `resumed_changes` prefixed "shard i: ", the digests some shard lacks moved to `unverified`, and the
    batch sizes when they differ.
    """
    out = Path(out)
    paths = [Path(p) for p in shards] if shards else find_shards(out)
    if not paths:
        raise SmoothAdvError(f"no shard files {out}.shard-*-of-* found")
    refuse_inputs_as_outputs([("the merged output", out), ("its settings sidecar", settings_path(out))],
                             [(what, path) for shard in paths
                              for what, path in (("the shard", shard), ("the shard's settings", settings_path(shard)))])
    if out.exists() and not force:
        raise SmoothAdvError(f"{out} already exists; pass --force to overwrite it")
    parsed = _parse_shards(out, paths)
    reference = parsed[0]
    for shard in parsed[1:]:  # the batch size cannot change a row: a shard resumed at another batch merges
        differences = setting_differences(reference.settings, shard.settings,
                                          BATCH_SETTINGS if _evaluation(reference.settings) else frozenset())
        if differences:
            raise SmoothAdvError(f"{shard.path} and {reference.path} were run with different settings "
                                 f"({'; '.join(differences)}); rerun the odd shard"
                                 + (" with the files the others were computed with" if _only_digests(differences)
                                    else ""))
    tables = [read_tsv(shard.path) for shard in parsed]
    _refuse_incomplete(parsed, [rows for _, rows in tables], job_count(reference.settings))
    everything = expected_jobs(reference.settings)  # no longer than the rows read: listing it costs their memory
    order = {job_key(job): position for position, job in enumerate(everything)}
    header = _expected_header(reference.settings, [head for head, _ in tables])
    merged: list[tuple[int, list[str]]] = []
    for i, (shard, (head, rows)) in enumerate(zip(parsed, tables)):
        if head != header:  # blame the odd shard, not whichever came first
            raise SmoothAdvError(f"{shard.path} has header {head!r}, expected {header!r} (a "
                                 f"{reference.settings.get('command')} output); rerun that shard")
        columns = head.split("\t")
        seen: dict[str, None] = {}  # the keys in the file's order
        for row in rows:
            try:
                int(row[columns.index("idx") if "idx" in columns else 0])
            except ValueError:
                raise SmoothAdvError(f"{shard.path} has a non-integer index {row[0]!r}") from None
            key = row_key(columns, row)
            if key in seen:
                raise SmoothAdvError(f"{shard.path} has index {key} twice")
            seen[key] = None
            merged.append((order.get(key, -1), row))
        wanted = {job_key(job) for job in shard_indices(everything, i, len(parsed))}
        stray = next((key for key in seen if key not in wanted), None)
        if stray is not None:
            raise SmoothAdvError(f"{shard.path} has rows this shard should not have (e.g. idx {stray}, its first)")
        missing = wanted - seen.keys()
        if missing:
            raise SmoothAdvError(f"{shard.path} is incomplete: {len(missing)} of {len(wanted)} rows missing "
                                 f"(e.g. idx {min(missing, key=order.__getitem__)}); finish it with --resume")
    merged.sort(key=lambda item: item[0])
    atomic_write_text(out, "\n".join([header, *("\t".join(row) for _, row in merged)]) + "\n")
    settings_out = {**reference.settings, "shard": None, "merged_from": [str(s.path) for s in parsed]}
    settings_out.pop("resumed_changes", None)  # shard 0's alone: replaced by every shard's, each named
    history = [f"shard {i}: {change}" for i, shard in enumerate(parsed)
               for change in _listed(shard.settings.get("resumed_changes")) if isinstance(change, str)]
    if history:
        settings_out["resumed_changes"] = history
    lacking = {name for shard in parsed[1:] for name in unverified(reference.settings, shard.settings)}
    for name in lacking:  # held by some shards only: the merged rows are not all verified against it
        settings_out.pop(name, None)
    unchecked = sorted({*lacking, *(name for shard in parsed for name in _listed(shard.settings.get("unverified"))
                                    if isinstance(name, str))})
    if unchecked:
        settings_out["unverified"] = unchecked
    batches = list(dict.fromkeys(shard.settings.get("batch") for shard in parsed))
    if len(batches) > 1:  # shards run at different batch sizes (the rows do not depend on it)
        settings_out["batch"] = batches
    atomic_write_text(settings_path(out), json.dumps(settings_out, indent=2, sort_keys=True, default=str) + "\n")
    return len(merged)


def _expected_header(settings: dict[str, Any], headers: Sequence[str]) -> str:
    """The TSV header a run with these recorded settings writes; for settings of no known command, the header
    most shards have (so a lone odd shard is the one blamed)."""
    command = settings.get("command")
    columns = {"predict": PREDICT_COLUMNS, "attack": ATTACK_COLUMNS}.get(str(command)) if command != "certify" else (
        SEQUENTIAL_COLUMNS if settings.get("mode") == "sequential" else CERTIFY_COLUMNS)
    if columns == SEQUENTIAL_COLUMNS and headers and all(h == "\t".join(LEGACY_SEQUENTIAL_COLUMNS) for h in headers):
        columns = LEGACY_SEQUENTIAL_COLUMNS  # shards all started before `samples` was named: merged as they are
    if columns is not None:
        return "\t".join(columns)
    return max(dict.fromkeys(headers), key=list(headers).count)


def _line_count(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0


def shards_complete(out: str | os.PathLike[str], num_shards: int, settings: dict[str, Any]) -> bool:
    """Whether all `num_shards` shards of `out` hold all their rows (checked without raising)."""
    if job_count(settings) > sum(_line_count(shard_path(out, i, num_shards)) for i in range(num_shards)):
        return False
    everything = expected_jobs(settings)
    for i in range(num_shards):
        path = shard_path(out, i, num_shards)
        if not path.exists():
            return False
        try:
            head, rows = read_tsv(path)
        except SmoothAdvError:
            return False
        columns = head.split("\t")
        if not {job_key(j) for j in shard_indices(everything, i, num_shards)} <= {row_key(columns, r) for r in rows}:
            return False
    return True
