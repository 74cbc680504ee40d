"""`smoothadv demo`: the papers' comparison end to end, on real data, in one command.

Trains two base classifiers at the same noise level sigma, with the same architecture, data,
epochs and seed: one with Gaussian data augmentation (Cohen et al. 2019) and one with SmoothAdv
(adversarial training of the smoothed classifier, Salman et al. 2019); certifies the same test
images with both (CERTIFY, same n0 / n / alpha); attacks a subset of them with the SmoothAdv
attack and runs PREDICT on the adversarial inputs (empirical accuracy, an upper bound on robust
accuracy where the certified accuracy is a lower bound); and writes a run folder:

    <out>/gaussian/checkpoint.pth.tar, <out>/smoothadv/checkpoint.pth.tar   (+ log.tsv, args.json)
    <out>/certify_{gaussian,smoothadv}.tsv    Cohen's columns
    <out>/attack_{gaussian,smoothadv}.tsv     one row per (example, eps)
    <out>/accuracy.png                        certified (solid) and empirical (dashed) accuracy vs radius
    <out>/table.md, <out>/report.md           the tables; what was run, the tables, the picture, timings
    <out>/steps.json                          which steps finished, under which settings

Re-running reuses every finished step whose settings (and inputs) are unchanged, continues
interrupted ones (training resumes from its checkpoint, TSVs from their last row) and redoes
steps whose settings changed; `fresh=True` redoes everything; `report_only=True` only rebuilds the
tables, the plot and the report from the TSVs of a finished run.

The table gives each certified accuracy with its 95% Clopper-Pearson interval over the test images,
and compares the two models image by image (`report.compare`: an exact McNemar test at each radius,
Holm-adjusted over the radii, and the ACR difference with its 95% interval), saying which
differences those tests support: one run on a few hundred images cannot order two models whose
accuracies differ by a few points.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SmoothAdvError
from .files import atomic_write_text
from .settings import (
    AT_LEAST_ONE,
    COUNT,
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_FLOAT32,
    PROBABILITY,
    PROGRESS_HELP,
    SEED,
    check_fields,
    setting,
)

QUICK = {"epochs": 1, "train_subset": 6000, "certify": 100, "n": 500, "attack_count": 20, "attack_steps": 10,
         "attack_m": 8, "attack_n": 500}
"""Overrides of `--quick` (about 2 minutes on a 2-core CPU on Fashion-MNIST)."""


#: the datasets the demo can train on (each has a training split and a small default architecture)
DEMO_DATASETS = ("fashion_mnist", "synthetic", "cifar10")
#: the settings `smoothadv demo` has flags for (the others keep their defaults on the command line)
DEMO_FLAGS = ("out", "dataset", "sigma", "epochs", "train_subset", "eps", "steps", "m", "certify", "n",
              "attack_count", "fresh", "report_only", "device", "seed", "data_dir", "progress")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of a demo run (typed settings, checked when made; `smoothadv demo`'s flags are generated from
    the fields in DEMO_FLAGS). Units: sigma and eps in [0, 1] pixels (L2)."""

    out: Path = setting(Path("runs/demo"), "run folder (re-running reuses finished steps)", rows=False)
    dataset: str = setting("fashion_mnist", "a dataset with a training split on this machine",
                           choices=DEMO_DATASETS)
    sigma: float = setting(0.25, "noise level of both models and of certification", limit=POSITIVE)
    epochs: int = setting(4, "training epochs (both models)", limit=AT_LEAST_ONE)
    train_subset: int | None = setting(None, "train on the first N images only; all when not given",
                                       limit=AT_LEAST_ONE)
    batch_size: int = setting(128, "training batch size", limit=AT_LEAST_ONE)
    lr: float = setting(0.1, "SGD learning rate", limit=POSITIVE_FLOAT32)
    eps: float | None = setting(None, "SmoothAdv training eps (default: 2 sigma)", limit=NONNEGATIVE)
    steps: int = setting(2, "SmoothAdv training attack steps T", limit=AT_LEAST_ONE)
    m: int = setting(1, "SmoothAdv training noise draws m", limit=AT_LEAST_ONE)
    warmup: int = setting(1, "epochs over which the SmoothAdv training eps ramps up", limit=AT_LEAST_ONE)
    certify: int = setting(300, "test images to certify, evenly spaced over the test set",
                           limit=AT_LEAST_ONE)
    n0: int = setting(100, "CERTIFY selection samples", limit=AT_LEAST_ONE)
    n: int = setting(2000, "CERTIFY samples", limit=AT_LEAST_ONE)
    alpha: float = setting(0.001, "failure probability of CERTIFY and PREDICT", limit=PROBABILITY)
    batch: int = setting(1000, "noisy samples per forward pass", limit=AT_LEAST_ONE, rows=False)
    attack_count: int = setting(50, "test images to attack, the first of the certified ones"
                                "; 0: no attack", limit=COUNT)
    attack_eps: tuple[float, ...] = setting((), "attack radii (default: 0, sigma, 2 sigma; eps = 0 is plain "
                                            "PREDICT)", limit=NONNEGATIVE)
    attack_steps: int = setting(20, "attack steps T", limit=AT_LEAST_ONE)
    attack_m: int = setting(16, "attack noise draws m", limit=AT_LEAST_ONE)
    attack_n: int = setting(1000, "PREDICT samples on each adversarial input",
                            limit=AT_LEAST_ONE)
    device: str = setting("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)", rows=False)
    seed: int = setting(0, "seed for noise and data order", limit=SEED)
    data_dir: str | None = setting(None, "data root (default: $SMOOTHADV_DATA or ./data)", rows=False)
    fresh: bool = setting(False, "redo every step instead of reusing finished ones", rows=False)
    report_only: bool = setting(False, "rebuild table.md, accuracy.png and report.md from the TSVs of a finished "
                                "run in --out (give the run's flags; nothing is trained or certified)", rows=False)
    progress: bool = setting(True, PROGRESS_HELP, rows=False)

    def __post_init__(self) -> None:
        check_fields(self)

    def validate(self) -> None:
        """Checks that look outside the settings (the data directory exists)."""
        from .data import check_data_dir

        check_data_dir(self.data_dir)

    @property
    def train_eps(self) -> float:
        return 2 * self.sigma if self.eps is None else self.eps

    @property
    def eps_values(self) -> tuple[float, ...]:
        return self.attack_eps or (0.0, self.sigma, 2 * self.sigma)


@dataclass
class DemoResult:
    out: Path
    report: Path
    table: str
    timings: dict[str, tuple[str, float]]  # step -> (ran / reused / resumed, seconds)


class _Steps:
    """steps.json: for each step, the hash of its settings and whether it finished."""

    def __init__(self, out: Path, fresh: bool) -> None:
        self.path = out / "steps.json"
        self.state: dict[str, dict[str, Any]] = {}
        if self.path.exists() and not fresh:
            try:
                self.state = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.state = {}

    def status(self, name: str, key: str, outputs: list[Path]) -> str:
        entry = self.state.get(name)
        if entry is None or entry.get("key") != key:
            return "new"
        if entry.get("done") and all(p.exists() for p in outputs):
            return "done"
        return "partial"

    def seconds(self, name: str) -> float:
        return float(self.state.get(name, {}).get("seconds", 0.0))

    def mark(self, name: str, key: str, done: bool, **info: Any) -> None:
        self.state[name] = {"key": key, "done": done, **info}
        atomic_write_text(self.path, json.dumps(self.state, indent=2, sort_keys=True) + "\n")


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run (or resume) the demo described in the module docstring; returns where the report went.

    With `cfg.report_only`, nothing is trained, certified or attacked: the table, the plot and the report
    are rebuilt from the TSVs a finished run left in `cfg.out` (checked against these settings). Progress
    lines, the table and the timings go to `log`.
    """
    from . import report
    from .accel import resolve_device
    from .data import dataset_info
    from .files import make_directory
    from .stats import max_certifiable_radius, radius_grid

    cfg.validate()
    out = make_directory(cfg.out)
    device = resolve_device(cfg.device)
    steps = _Steps(out, cfg.fresh and not cfg.report_only)
    arch = dataset_info(cfg.dataset).default_arch
    started_all = time.time()
    plan = _plan(cfg, out, arch, device)
    if cfg.report_only:
        log(f"demo: rebuilding the report of {out} from its TSVs (nothing is trained or certified)")
        timings = _recorded_steps(cfg, steps, plan)
    else:
        log(f"demo: {cfg.dataset} ({arch}), sigma {cfg.sigma}, {cfg.epochs} epoch(s), device {device}; "
                f"run folder {out}")
        timings = _run_steps(cfg, steps, plan, log)

    certify = {name: report.load_results(path) for name, path in plan.certify_files.items()}
    attack = {name: report.load_results(path) for name, path in plan.attack_files.items()}
    indices = [int(i) for i in next(iter(certify.values())).idx]
    attack_indices = indices[: cfg.attack_count] if attack else []
    top = max_certifiable_radius(cfg.n, cfg.alpha, cfg.sigma)
    radii = radius_grid(top, cfg.sigma / 2)
    table = demo_table(certify, attack, radii)
    atomic_write_text(out / "table.md", table)
    plot = _plot(report, certify, attack, out / "accuracy.png", top, cfg, log)
    total = time.time() - started_all
    report_path = out / "report.md"
    atomic_write_text(report_path, _report_text(cfg, arch, device, plan.objectives, indices, attack_indices, radii,
                                                top, table, plot, timings, total, plan.certify_files,
                                                plan.attack_files))
    log("")
    log(table.rstrip())
    log("")
    log("step                  status   time (when it ran)")
    for step, (status, seconds) in timings.items():
        log(f"  {step:<20} {status:<8} {_duration(seconds)}")
    compute = sum(seconds for _, seconds in timings.values())
    log(f"demo finished in {_duration(total)} (all steps together took {_duration(compute)} when they ran)")
    log(f"report: {report_path}" + (f"   plot: {plot}" if plot else ""))
    return DemoResult(out, report_path, table, timings)


def demo_table(certify: dict[str, Any], attack: dict[str, Any], radii: list[float]) -> str:
    """The demo's table, as `smoothadv report --ci --paired` prints it: certified accuracy at each radius with
    its 95% Clopper-Pearson interval over the test images, ACR and abstentions, the attack rows, then the two
    models compared image by image (exact McNemar test per radius, Holm-adjusted; the ACR difference with its
    95% interval) and a sentence saying which differences those tests support."""
    from . import report

    table = report.format_table(report.summarize(certify, radii, attack=attack, ci=True), "markdown")
    first, second = list(certify)[:2]
    comparison = report.compare(certify[first], certify[second], radii, (first, second))
    return f"{table}\n{report.format_comparison(comparison)}\n{report.describe_comparison(comparison)}"


@dataclass
class _Plan:
    """What a demo run trains and evaluates, and where: the same for a run and for a rebuilt report."""

    objectives: dict[str, Any]
    training: dict[str, Any]                  # name -> TrainSettings
    certify_files: dict[str, Path]
    attack_files: dict[str, Path]
    evaluations: dict[str, tuple[Any, Any]]   # step -> (RunSettings, evaluation settings)


def _plan(cfg: DemoConfig, out: Path, arch: str, device: Any) -> _Plan:
    from .data import get_dataset
    from .objectives import build_objective
    from .settings import AttackRunSettings, AttackSettings, CertifySettings, RunSettings, TrainSettings

    objectives = {  # the same factory as `smoothadv train --objective ...`
        "gaussian": build_objective("gaussian", cfg.sigma),
        "smoothadv": build_objective("smoothadv", cfg.sigma, {"m": cfg.m, "warmup": cfg.warmup},
                                     AttackSettings(attack="pgd", eps=cfg.train_eps, steps=cfg.steps)),
    }
    training = {name: TrainSettings(dataset=cfg.dataset, arch=arch, out_dir=out / name, sigma=cfg.sigma,
                                    epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    lr_step=max(1, math.ceil(cfg.epochs * 2 / 3)), seed=cfg.seed, device=str(device),
                                    data_dir=cfg.data_dir, train_subset=cfg.train_subset, progress=cfg.progress)
                for name in objectives}
    # a rebuilt report takes the images from the TSVs (no dataset needed); a run selects them from the test set
    test_size = cfg.certify if cfg.report_only else len(get_dataset(cfg.dataset, "test", cfg.data_dir))
    common = dict(sigma=cfg.sigma, alpha=cfg.alpha, batch=cfg.batch, seed=cfg.seed,
                  skip=max(1, test_size // cfg.certify))
    certify_files = {name: out / f"certify_{name}.tsv" for name in objectives}
    attack_files = {name: out / f"attack_{name}.tsv" for name in objectives} if cfg.attack_count else {}
    evaluations: dict[str, tuple[Any, Any]] = {}
    for name in objectives:
        run = RunSettings(checkpoint=str(out / name / "checkpoint.pth.tar"), out=certify_files[name],
                          device=str(device), data_dir=cfg.data_dir, progress=cfg.progress)
        evaluations[f"certify_{name}"] = (run, CertifySettings(n0=cfg.n0, n=cfg.n, max=cfg.certify, **common))
        if attack_files:
            evaluations[f"attack_{name}"] = (
                dataclasses.replace(run, out=attack_files[name]),
                AttackRunSettings(eps=cfg.eps_values, steps=cfg.attack_steps, m=cfg.attack_m, n=cfg.attack_n,
                                  max=cfg.attack_count, **common))
    return _Plan(objectives, training, certify_files, attack_files, evaluations)


def _run_steps(cfg: DemoConfig, steps: _Steps, plan: _Plan, log: Callable[[str], None]
               ) -> dict[str, tuple[str, float]]:
    """Train both models, then certify and attack with each (the evaluations are durable runs: they resume,
    and start over when their settings, or model, changed)."""
    timings: dict[str, tuple[str, float]] = {}
    for name, objective in plan.objectives.items():
        timings[f"train {name}"] = _train_step(steps, name, plan.training[name], objective, log)
    for step, (run, settings) in plan.evaluations.items():
        timings[step.replace("_", " ", 1)] = _evaluation_step(steps, step, run, settings, log)
    return timings


def _recorded_steps(cfg: DemoConfig, steps: _Steps, plan: _Plan) -> dict[str, tuple[str, float]]:
    """The timings steps.json recorded, after checking that the run in the folder finished every step with
    these settings: the training settings by the models' args.json, the evaluations by the settings
    recorded next to their TSVs (OUT.args.json; a run folder without them, such as the committed one, is
    checked by its rows only: both certify TSVs must hold the same images)."""
    from .run import read_settings, record, setting_differences
    from .settings import row_settings

    timings: dict[str, tuple[str, float]] = {}
    problems = []
    for name, objective in plan.objectives.items():
        step = f"train_{name}"
        settings = plan.training[name]
        recorded = _read_json(Path(settings.out_dir) / "args.json")
        if not steps.state.get(step, {}).get("done") or recorded is None:
            problems.append(f"{name} was not trained")
        else:  # the settings its args.json records (a newer version's new settings are not in an older file)
            expected = _flat({**row_settings(settings), "objective": objective.describe()})
            recorded = _flat(recorded)
            compared = set(expected) & set(recorded)
            differences = setting_differences({k: recorded[k] for k in compared}, {k: expected[k] for k in compared})
            if differences:
                problems.append(f"{name} was trained with other settings ({'; '.join(differences)})")
        timings[f"train {name}"] = ("reused", steps.seconds(step))
    for step, (run, settings) in plan.evaluations.items():
        if not steps.state.get(step, {}).get("done") or not Path(run.out).exists():
            problems.append(f"{step} did not finish")
            continue
        recorded = read_settings(run.out)
        if recorded is not None:
            expected = record(run, settings)
            compared = set(row_settings(settings)) - {"batch", "skip"}  # skip: the test set's size is not read
            differences = setting_differences({k: recorded.get(k) for k in compared},
                                              {k: expected.get(k) for k in compared})
            if differences:
                problems.append(f"{Path(run.out).name} was made with other settings ({'; '.join(differences)})")
        timings[step.replace("_", " ", 1)] = ("reused", steps.seconds(step))
    if problems:
        raise SmoothAdvError(f"cannot rebuild the report of {cfg.out}: {'; '.join(problems)}; run the demo "
                             "without --report-only (with the flags of the run) to finish it")
    return timings


def _train_step(steps: _Steps, name: str, settings: Any, objective: Any, log: Callable[[str], None]
                ) -> tuple[str, float]:
    """Train one model, or reuse it when an earlier run trained it with the same settings and the
    checkpoint is still the file that run wrote (its SHA-256 is compared)."""
    from .files import file_sha256
    from .settings import row_settings
    from .train import fit

    step = f"train_{name}"
    key = _key({**row_settings(settings), "objective": objective.describe()})
    checkpoint = Path(settings.out_dir) / "checkpoint.pth.tar"
    status = steps.status(step, key, [checkpoint])
    if status == "done" and steps.state[step].get("checkpoint") != file_sha256(checkpoint):
        log(f"[train {name}] {checkpoint} was replaced since it was trained: training again")
        status = "new"
    if status == "done":
        log(f"[train {name}] reusing {checkpoint}")
        return _label(status), steps.seconds(step)
    log(f"[train {name}] {objective.describe()}")
    previous = steps.seconds(step) if status == "partial" else 0.0
    steps.mark(step, key, False, seconds=previous)
    started = time.time()
    fit(dataclasses.replace(settings, resume=status == "partial", force=status != "partial"), objective)
    steps.mark(step, key, True, seconds=previous + time.time() - started, checkpoint=file_sha256(checkpoint))
    return _label(status), steps.seconds(step)


def _evaluation_step(steps: _Steps, step: str, run: Any, settings: Any, log: Callable[[str], None]
                     ) -> tuple[str, float]:
    """One durable evaluation run (`run.run_evaluation`), resumed or started over as its settings say."""
    from .run import run_evaluation

    previous = steps.seconds(step)
    steps.mark(step, "", False, seconds=previous)
    started = time.time()
    outcome = run_evaluation(run, settings, restart_on_change=True, log=lambda text: log(f"[{step}] {text}"))
    status = "done" if outcome.resumed == outcome.rows else "partial" if outcome.resumed else "new"
    seconds = previous + time.time() - started if status == "partial" else \
        previous if status == "done" else time.time() - started
    steps.mark(step, "", True, seconds=seconds)
    return _label(status), seconds


_CALL = re.compile(r"^(\w+)\((.*)\)$")


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Settings with nested ones spelled out: {"objective": {"m": 1, "attack": "PGDL2(eps=0.5, steps=2)"}} ->
    {"objective.m": 1, "objective.attack": "PGDL2", "objective.attack.eps": "0.5", ...}, so that a file of an
    older version, which records fewer of them, is compared on those it records."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = prefix + key
        call = _CALL.match(value) if isinstance(value, str) else None
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        elif call:
            flat[name] = call.group(1)
            flat.update({f"{name}.{k.strip()}": v.strip() for k, _, v in
                         (part.partition("=") for part in call.group(2).split(","))})
        else:
            flat[name] = value
    return flat


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _label(status: str) -> str:
    return {"done": "reused", "partial": "resumed", "new": "ran"}[status]


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _plot(report: Any, certify: dict, attack: dict, path: Path, top: float, cfg: DemoConfig,
          log: Callable[[str], None]) -> Path | None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: no plot (pip install 'smoothadv[plot]')")
        return None
    return report.plot_accuracy(certify, path, attack=attack, max_radius=max(top, *cfg.eps_values) * 1.05,
                                title=f"{cfg.dataset}, sigma = {cfg.sigma}", ci=True)


def _report_text(cfg: DemoConfig, arch: str, device: Any, objectives: dict, indices: list[int],
                 attack_indices: list[int], radii: list[float], top: float, table: str, plot: Path | None,
                 timings: dict[str, tuple[str, float]], total: float, certify_files: dict[str, Path],
                 attack_files: dict[str, Path]) -> str:
    out = Path(cfg.out)
    objective_lines = "\n".join(f"- **{name}**: `{json.dumps(obj.describe())}`" for name, obj in objectives.items())
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    command = " ".join(["smoothadv report", *[f"{n}={p}" for n, p in certify_files.items()],
                        *[f"--attack {n}={p}" for n, p in attack_files.items()],
                        "--radii", *[f"{r:g}" for r in radii], "--ci", "--paired", "--plot",
                        str(out / "accuracy.png")])
    timing_lines = "\n".join(f"| {s} | {status} | {_duration(sec)} |" for s, (status, sec) in timings.items())
    written = ("`smoothadv demo --report-only` from the TSVs of the run in this folder" if cfg.report_only
               else "`smoothadv demo`")
    picture = f"![certified and empirical accuracy]({plot.name})\n\n" if plot else ""
    attack_text = (f"SmoothAdv PGD attack on the smoothed classifier (T = {cfg.attack_steps} steps, m = {cfg.attack_m} "
                   f"noise draws) at eps in {', '.join(f'{e:g}' for e in cfg.eps_values)} on the first "
                   f"{len(attack_indices)} of those images, then PREDICT (n = {cfg.attack_n}, alpha = {cfg.alpha}) on "
                   "each adversarial input: *empirical* accuracy, an upper bound on the true robust accuracy. "
                   "At eps = 0 this is plain PREDICT, whose abstentions (it uses fewer samples than CERTIFY) also "
                   "count as wrong: compare the dashed curves with their own eps = 0 point."
                   if attack_indices else "No empirical attack was run.")
    return f"""# smoothadv demo: Gaussian augmentation vs SmoothAdv on {cfg.dataset}

Written {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} by {written}. Device: {device}.

## What was run

Two base classifiers `{arch}` trained for {cfg.epochs} epoch(s) at sigma = {cfg.sigma} with the same data
({cfg.train_subset or "all"} training images), batch {cfg.batch_size}, SGD lr {cfg.lr} and seed {cfg.seed}:

{objective_lines}

Certification (Cohen et al.'s CERTIFY): {len(indices)} test images (indices 0, {step}, {2 * step}, ...), n0 = {cfg.n0},
n = {cfg.n}, alpha = {cfg.alpha}. With n = {cfg.n} no radius above {top:.3f} can be certified
(sigma * Phi^-1(alpha^(1/n))), so the table stops there. Abstentions count as wrong.

{attack_text}

## Results

Certified accuracy (%) at each L2 radius r (a lower bound that holds for each example with
probability >= 1 - alpha) with its 95% Clopper-Pearson interval over the {len(indices)} test images (the
uncertainty of evaluating on a sample of the test distribution; alpha covers the Monte Carlo
certification), ACR = average certified radius; `(attack)` rows: empirical accuracy (%) under the attack
at eps = r, on {len(attack_indices)} images. The second table compares the two models on the same images: the
images only one of them certifies at r decide (exact McNemar test, p-values Holm-adjusted over the radii);
the ACR difference has a 95% Student t interval over the images' paired differences.

{table}
{picture}Regenerate the table and the plot from the TSVs:

```
{command}
```

## Timings

| step | status | time (when it ran) |
|---|---|---:|
{timing_lines}

All steps together: {_duration(sum(sec for _, sec in timings.values()))}; this invocation of `smoothadv demo`:
{_duration(total)} (steps marked "reused" were done by an earlier run with the same settings).
"""
