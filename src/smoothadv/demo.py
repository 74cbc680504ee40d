"""`smoothadv demo`: Gaussian augmentation (Cohen et al. 2019) against SmoothAdv (Salman et al. 2019) on real
data, in one command: a recipe over `train.fit` and `run.run_evaluation`.

Trains two base classifiers alike but for their objective, certifies the same test images with both (CERTIFY),
attacks the first of them with the SmoothAdv attack, then PREDICT on the adversarial inputs (empirical accuracy,
an upper bound on robust accuracy), and writes into `out`:

    gaussian/, smoothadv/                 the training runs (checkpoint.pth.tar, log.tsv, args.json)
    certify_{gaussian,smoothadv}.tsv      Cohen's columns (+ .args.json, .env.json)
    attack_{gaussian,smoothadv}.tsv       one row per (example, eps)
    report.md, table.md, accuracy.png     what was run, the tables (`demo_table`), the picture, timings

No cache of its own: a model is resumed by `fit(resume=True)` when the run's own rule lets its checkpoint resume
(`RunDirectory.check_resumable`: a finished run trains nothing), else trained afresh; the evaluations are
`run_evaluation(restart_on_change=True)` (finished rows kept; other settings or another model: start over).
`fresh` redoes everything; `report_only` rebuilds the report from a finished run's files, checked against these
settings (`RunDirectory.unfinished`; the evaluations' sidecars by `rundir.compare`). A file in `out` the demo did
not write (a report.md of another kind, a table.md or accuracy.png without the demo's report.md, a TSV without
its settings sidecar, a checkpoint recording no settings) is never replaced without `force` or `fresh`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import report
from .accel import resolve_device
from .data import check_data_dir, dataset_info, get_dataset
from .errors import SmoothAdvError
from .files import make_directory, read_tsv
from .models import read_checkpoint
from .objectives import Objective
from .run import run_evaluation, unfinished
from .rundir import RunDirectory, described, settings_path
from .settings import DEMO_DATASETS, AttackRunSettings, CertifySettings, DemoConfig, RunSettings, TrainSettings
from .train import CHECKPOINT, fit, recipe

__all__ = ["DEMO_DATASETS", "DEMO_FLAGS", "DemoConfig", "DemoResult", "QUICK", "REPORT_TITLE", "demo_table", "run_demo"]

QUICK = {"epochs": 1, "train_subset": 6000, "certify": 100, "n": 500, "attack_count": 20, "attack_steps": 10,
         "attack_m": 8, "attack_n": 500}
"""Overrides of `--quick` (about 2 minutes on a 2-core CPU on Fashion-MNIST)."""

#: the settings `smoothadv demo` has flags for (the others keep their defaults on the command line)
DEMO_FLAGS = ("out", "dataset", "sigma", "epochs", "train_subset", "eps", "steps", "m", "certify", "n",
              "attack_count", "fresh", "force", "report_only", "device", "seed", "data_dir", "progress")
REPORT_TITLE = report.DEMO_REPORT_TITLE
demo_table = report.demo_table


@dataclass
class DemoResult:
    out: Path
    report: Path
    table: str
    timings: dict[str, tuple[str, float]]  # step -> (ran / reused / resumed, seconds when it ran)


Training = dict[str, tuple[TrainSettings, Objective]]  # name -> (settings, objective)
Evaluations = dict[str, tuple[RunSettings, CertifySettings | AttackRunSettings]]  # step -> (run, settings)


def _plan(cfg: DemoConfig, out: Path, device: torch.device) -> tuple[Training, Evaluations]:
    """What a demo run trains and evaluates, and where: the same for a run and for a rebuilt report."""
    common = {"dataset": cfg.dataset, "arch": dataset_info(cfg.dataset).default_arch, "sigma": cfg.sigma,
              "epochs": cfg.epochs, "batch": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "device": str(device),
              "lr_step": max(1, math.ceil(cfg.epochs * 2 / 3)), "data_dir": cfg.data_dir,
              "train_subset": cfg.train_subset, "progress": cfg.progress}
    training = {  # the same factory as `smoothadv train --objective ...`
        "gaussian": recipe({**common, "out": out / "gaussian", "objective": "gaussian"}),
        "smoothadv": recipe({**common, "out": out / "smoothadv", "objective": "smoothadv", "m": cfg.m,
                             "warmup": cfg.warmup, "attack": "pgd", "steps": cfg.steps,
                             "eps": 2 * cfg.sigma if cfg.eps is None else cfg.eps}),
    }
    # a rebuilt report takes the images from the TSVs (no dataset needed); a run selects them from the test set
    test_size = cfg.certify if cfg.report_only else len(get_dataset(cfg.dataset, "test", cfg.data_dir))  # type: ignore[arg-type]
    shared: dict[str, Any] = {"sigma": cfg.sigma, "alpha": cfg.alpha, "batch": cfg.batch, "seed": cfg.seed,
                              "skip": max(1, test_size // cfg.certify)}
    evaluations: Evaluations = {}
    for name in training:
        run = RunSettings(checkpoint=str(out / name / CHECKPOINT), out=out / f"certify_{name}.tsv", device=str(device),
                          data_dir=cfg.data_dir, progress=cfg.progress, force=cfg.fresh)
        evaluations[f"certify {name}"] = (run, CertifySettings(n0=cfg.n0, n=cfg.n, max=cfg.certify, **shared))
        if cfg.attack_count:
            evaluations[f"attack {name}"] = (
                dataclasses.replace(run, out=out / f"attack_{name}.tsv"),
                AttackRunSettings(eps=cfg.eps_values, attack={"steps": cfg.attack_steps}, m=cfg.attack_m,
                                  n=cfg.attack_n, max=cfg.attack_count, **shared))
    return training, evaluations


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run (or resume) the demo of the module docstring; with `cfg.report_only`, only rebuild its report
    from the files a finished run left in `cfg.out`. Progress lines, the table and the timings go to `log`."""
    check_data_dir(cfg.data_dir)
    out, device = Path(cfg.out), resolve_device(cfg.device)
    training, evaluations = _plan(cfg, out, device)
    _refuse_foreign_files(cfg, out, training, evaluations)
    make_directory(out)
    status = {f"train {name}": "reused" for name in training} | {step: "reused" for step in evaluations}
    if cfg.report_only:
        log(f"demo: rebuilding the report of {out} from its files (nothing is trained or certified)")
        _check_finished(cfg, training, evaluations)
    else:
        log(f"demo: {cfg.dataset}, sigma {cfg.sigma}, {cfg.epochs} epoch(s), device {device}; run folder {out}")
        for name, (settings, objective) in training.items():
            status[f"train {name}"] = _train(cfg, name, settings, objective, log)
        for step, (run, evaluation) in evaluations.items():
            done = run_evaluation(run, evaluation, restart_on_change=not cfg.fresh,
                                  log=lambda text: log(f"[{step}] {text}"))  # noqa: B023 (called within this iteration)
            status[step] = "reused" if done.resumed == done.rows else "resumed" if done.resumed else "ran"
    files = {f"train {name}": Path(s.out_dir) / "log.tsv" for name, (s, _) in training.items()}
    files.update({step: Path(run.out) for step, (run, _) in evaluations.items()})
    timings = {step: (state, report.recorded_seconds(files[step])) for step, state in status.items()}
    return _write_report(cfg, out, device, training, evaluations, timings, log)


def _refuse_foreign_files(cfg: DemoConfig, out: Path, training: Training, evaluations: Evaluations) -> None:
    """SmoothAdvError (one line) for a file in `out` the demo would replace but did not write."""
    if cfg.force or cfg.fresh:
        return
    mine = out / "report.md"
    if mine.exists():
        foreign = [] if mine.read_text(errors="replace").startswith(REPORT_TITLE) else [mine]
    else:  # the demo writes report.md first: a table or plot without it is not the demo's
        foreign = [path for path in (out / "table.md", out / "accuracy.png") if path.exists()]
    if not cfg.report_only:
        foreign += [path for run, _ in evaluations.values()
                    if (path := Path(run.out)).exists() and not settings_path(path).exists()]
        foreign += [path for settings, _ in training.values() if (path := Path(settings.out_dir) / CHECKPOINT).exists()
                    and not isinstance(read_checkpoint(path).get("config"), dict)]
    if foreign:
        raise SmoothAdvError(f"{foreign[0]} was not written by the demo; pass --force (or --fresh) to replace it, or "
                             "choose another --out")


def _train(cfg: DemoConfig, name: str, settings: TrainSettings, objective: Objective,
           log: Callable[[str], None]) -> str:
    """`fit` one model, resumed when the run's own rule lets its checkpoint resume with these settings
    (`RunDirectory.check_resumable`), else from the start. Returns ran / resumed / reused."""
    directory, done = RunDirectory(settings.out_dir, CHECKPOINT), 0
    if directory.checkpoint.exists() and not cfg.fresh:
        try:
            saved = read_checkpoint(directory.checkpoint)
            directory.check_resumable(saved, settings, objective)
            done = int(saved.get("epoch", 0))
        except SmoothAdvError:
            log(f"[train {name}] {directory.checkpoint} cannot be resumed with these settings: training again")
    log(f"[train {name}] {json.dumps(described(objective))}" if done < settings.epochs else
        f"[train {name}] reusing {directory.checkpoint}")
    fit(dataclasses.replace(settings, resume=done > 0, force=done == 0), objective)
    return "reused" if done >= settings.epochs else "resumed" if done else "ran"


def _check_finished(cfg: DemoConfig, training: Training, evaluations: Evaluations) -> None:
    """Refuse (one line) to rebuild the report of a run that did not finish every step with these settings:
    the models by their args.json and log.tsv (`RunDirectory.unfinished`), the evaluations by their TSVs,
    sidecars and the model's digest (`run.unfinished`; a TSV without a sidecar, as in the committed run, by its
    rows: both certify TSVs must hold the same images)."""
    problems = [f"{name} {why}" for name, (settings, objective) in training.items()
                if (why := RunDirectory(settings.out_dir, CHECKPOINT).unfinished(settings, objective))]
    problems += [f"{Path(run.out).name} {why}" for run, evaluation in evaluations.values()  # skip: the test
                 if (why := unfinished(run, evaluation, free=("skip",)))]  # set's size is not read for a report
    images = [sorted(row[0] for row in read_tsv(run.out)[1]) for step, (run, _) in evaluations.items()
              if step.startswith("certify") and Path(run.out).exists()]
    if len(images) == 2 and images[0] != images[1]:
        problems.append("the two certify TSVs hold different images")
    attacked = [f"attack_{name}.tsv" for name in training if (Path(cfg.out) / f"attack_{name}.tsv").exists()]
    if not cfg.attack_count and attacked:  # a report without the attacks the run made would say that none was run
        problems.append(f"the run attacked ({attacked[0]}) and --attack-count 0 would drop those rows: give the "
                        "run's --attack-count")
    if problems:
        raise SmoothAdvError(f"cannot rebuild the report of {cfg.out}: {'; '.join(problems)}; run the demo "
                             "without --report-only (with the flags of the run) to finish it")


def _write_report(cfg: DemoConfig, out: Path, device: torch.device, training: Training, evaluations: Evaluations,
                  timings: dict[str, tuple[str, float]], log: Callable[[str], None]) -> DemoResult:
    """The demo's report (`report.write_demo_report`: report.md, table.md, accuracy.png), then its summary on `log`."""
    files = {step: Path(run.out) for step, (run, _) in evaluations.items()}
    table, plot = report.write_demo_report(
        cfg, out, device=str(device), arch=next(iter(training.values()))[0].arch,
        objectives={name: described(objective) for name, (_, objective) in training.items()},
        certify_files={step.split()[1]: path for step, path in files.items() if step.startswith("certify")},
        attack_files={step.split()[1]: path for step, path in files.items() if step.startswith("attack")},
        timings=timings, log=log)
    total = report.duration(sum(sec for _, sec in timings.values()))
    log(f"\n{table.rstrip()}\n\nstep                  status   time (when it ran)")
    for name, (status, seconds) in timings.items():
        log(f"  {name:<20} {status:<8} {report.duration(seconds)}")
    log(f"demo finished (all steps together took {total} when they ran)")
    log(f"report: {out / 'report.md'}" + (f"   plot: {plot}" if plot else ""))
    return DemoResult(out, out / "report.md", table, timings)
