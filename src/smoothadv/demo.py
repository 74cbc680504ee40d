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
    <out>/table.md, <out>/report.md           the table; what was run, the table, the picture, timings
    <out>/steps.json                          which steps finished, under which settings

Re-running reuses every finished step whose settings (and inputs) are unchanged, continues
interrupted ones (training resumes from its checkpoint, TSVs from their last row) and redoes
steps whose settings changed; `fresh=True` redoes everything.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SmoothAdvError
from .files import atomic_write_text

QUICK = {"epochs": 1, "train_subset": 6000, "certify": 100, "n": 500, "attack_count": 20, "attack_steps": 10,
         "attack_m": 8, "attack_n": 500}
"""Overrides of `--quick` (about 2 minutes on a 2-core CPU on Fashion-MNIST)."""


@dataclass
class DemoConfig:
    """Settings of a demo run. Units: sigma and eps in [0, 1] pixels (L2)."""

    out: Path = Path("runs/demo")
    dataset: str = "fashion_mnist"
    sigma: float = 0.25               # noise level of both models and of certification
    epochs: int = 4                   # training epochs (both models)
    train_subset: int | None = None   # train on the first N images only
    batch_size: int = 128
    lr: float = 0.1
    eps: float | None = None          # SmoothAdv training attack: PGD radius (default 2 sigma) ...
    steps: int = 2                    # ... steps T ...
    m: int = 1                        # ... and noise draws m_train
    warmup: int = 1                   # epochs over which the training eps ramps up
    certify: int = 300                # test images certified (evenly spaced over the test set)
    n0: int = 100
    n: int = 2000
    alpha: float = 0.001
    batch: int = 1000                 # noisy samples per forward pass
    attack_count: int = 50            # test images attacked (the first of the certified ones)
    attack_eps: tuple[float, ...] = ()  # default: (0, sigma, 2 sigma); eps = 0 is plain PREDICT
    attack_steps: int = 20
    attack_m: int = 16
    attack_n: int = 1000              # PREDICT samples on each adversarial input
    device: str = "auto"
    seed: int = 0
    data_dir: str | None = None
    fresh: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=print, repr=False, compare=False)

    def validate(self) -> None:
        checks = [(self.sigma > 0, "sigma must be > 0"), (self.epochs >= 1, "epochs must be >= 1"),
                  (self.certify >= 1, "certify count must be >= 1"),
                  (self.n >= 1 and self.n0 >= 1, "n, n0 must be >= 1"),
                  (0 < self.alpha < 1, "alpha must be in (0, 1)"),
                  (self.attack_count >= 0, "attack count must be >= 0"), (self.train_eps >= 0, "eps must be >= 0"),
                  (all(e >= 0 for e in self.attack_eps), "attack eps must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise SmoothAdvError(message)

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


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run (or resume) the demo described in the module docstring; returns where the report went."""
    from . import report
    from .attacks import PGDL2
    from .data import dataset_info, get_dataset, num_classes
    from .evaluate import select_indices
    from .models import load_checkpoint
    from .objectives import GaussianAugmentation, SmoothAdv
    from .smoothing import Smooth
    from .stats import max_certifiable_radius
    from .train import TrainConfig, fit, resolve_device

    cfg.validate()
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmoothAdvError(f"cannot create the run folder {out}: {exc.strerror or exc}") from None
    device = resolve_device(cfg.device)
    steps = _Steps(out, cfg.fresh)
    timings: dict[str, tuple[str, float]] = {}
    arch = dataset_info(cfg.dataset).default_arch
    test_set = get_dataset(cfg.dataset, "test", cfg.data_dir)
    started_all = time.time()
    cfg.log(f"demo: {cfg.dataset} ({arch}), sigma {cfg.sigma}, {cfg.epochs} epoch(s), device {device}; "
            f"run folder {out}")

    objectives = {
        "gaussian": GaussianAugmentation(cfg.sigma),
        "smoothadv": SmoothAdv(cfg.sigma, PGDL2(cfg.train_eps, cfg.steps), m=cfg.m, warmup=cfg.warmup),
    }
    model_keys: dict[str, str] = {}
    for name, objective in objectives.items():
        train_cfg = TrainConfig(dataset=cfg.dataset, arch=arch, out_dir=out / name, sigma=cfg.sigma,
                                epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                lr_step=max(1, math.ceil(cfg.epochs * 2 / 3)), seed=cfg.seed, device=str(device),
                                data_dir=cfg.data_dir, train_subset=cfg.train_subset, progress=cfg.progress)
        settings = {k: v for k, v in dataclasses.asdict(train_cfg).items()
                    if k not in ("out_dir", "device", "progress", "resume", "force", "data_dir")}
        key = _key({**settings, "objective": objective.describe()})
        checkpoint = out / name / "checkpoint.pth.tar"
        status = steps.status(f"train_{name}", key, [checkpoint])
        started = time.time()
        if status == "done":
            cfg.log(f"[train {name}] reusing {checkpoint}")
        else:
            cfg.log(f"[train {name}] {objective.describe()}")
            previous = steps.seconds(f"train_{name}") if status == "partial" else 0.0
            steps.mark(f"train_{name}", key, False, seconds=previous)
            fit(dataclasses.replace(train_cfg, resume=status == "partial", force=status != "partial"), objective)
            steps.mark(f"train_{name}", key, True, seconds=previous + time.time() - started,
                       checkpoint=_file_hash(checkpoint))
        model_keys[name] = steps.state[f"train_{name}"]["checkpoint"]
        timings[f"train {name}"] = (_label(status), steps.seconds(f"train_{name}"))

    indices = select_indices(len(test_set), max(1, len(test_set) // cfg.certify), cfg.certify)
    attack_indices = indices[: cfg.attack_count]
    classes = num_classes(cfg.dataset)
    certify_files: dict[str, Path] = {}
    attack_files: dict[str, Path] = {}
    for name in objectives:
        model, _ = load_checkpoint(out / name / "checkpoint.pth.tar", device)
        smooth = Smooth(model, classes, cfg.sigma)
        certify_files[name] = out / f"certify_{name}.tsv"
        settings = {"model": model_keys[name], "indices": indices, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
                    "seed": cfg.seed}
        timings[f"certify {name}"] = _rows_step(
            cfg, steps, f"certify_{name}", settings, certify_files[name], indices,
            lambda todo, smooth=smooth: _certify_rows(smooth, test_set, todo, cfg, device))
        if attack_indices:
            attack_files[name] = out / f"attack_{name}.tsv"
            settings = {"model": model_keys[name], "indices": attack_indices, "eps": cfg.eps_values,
                        "steps": cfg.attack_steps, "m": cfg.attack_m, "n": cfg.attack_n, "alpha": cfg.alpha,
                        "seed": cfg.seed}
            jobs = [(e, i) for e in cfg.eps_values for i in attack_indices]
            timings[f"attack {name}"] = _rows_step(
                cfg, steps, f"attack_{name}", settings, attack_files[name], jobs,
                lambda todo, smooth=smooth: _attack_rows(smooth, test_set, todo, cfg, device), attack=True)

    certify = {name: report.load_results(path) for name, path in certify_files.items()}
    attack = {name: report.load_results(path) for name, path in attack_files.items()}
    top = max_certifiable_radius(cfg.n, cfg.alpha, cfg.sigma)
    radii = [round(k * cfg.sigma / 2, 6) for k in range(int(top / (cfg.sigma / 2)) + 1)]
    table = report.format_table(report.summarize(certify, radii, attack=attack), "markdown")
    atomic_write_text(out / "table.md", table)
    plot = _plot(report, certify, attack, out / "accuracy.png", top, cfg)
    total = time.time() - started_all
    report_path = out / "report.md"
    atomic_write_text(report_path, _report_text(cfg, arch, device, objectives, indices, attack_indices, radii, top,
                                                table, plot, timings, total, certify_files, attack_files))
    cfg.log("")
    cfg.log(table.rstrip())
    cfg.log("")
    cfg.log("step                  status   time (when it ran)")
    for step, (status, seconds) in timings.items():
        cfg.log(f"  {step:<20} {status:<8} {_duration(seconds)}")
    compute = sum(seconds for _, seconds in timings.values())
    cfg.log(f"demo finished in {_duration(total)} (all steps together took {_duration(compute)} when they ran)")
    cfg.log(f"report: {report_path}" + (f"   plot: {plot}" if plot else ""))
    return DemoResult(out, report_path, table, timings)


def _label(status: str) -> str:
    return {"done": "reused", "partial": "resumed", "new": "ran"}[status]


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _rows_step(cfg: DemoConfig, steps: _Steps, name: str, settings: dict[str, Any], path: Path, jobs: list[Any],
               make_rows: Callable[[list[Any]], Iterator[Any]], attack: bool = False) -> tuple[str, float]:
    """Write one TSV row per job (skipping rows already there when the settings match)."""
    from tqdm.auto import tqdm

    from .evaluate import row_fields
    from .files import OutputLock, TsvLog

    key = _key(settings)
    status = steps.status(name, key, [path])
    started = time.time()
    if status == "done":
        cfg.log(f"[{name.replace('_', ' ')}] reusing {path}")
        return _label(status), steps.seconds(name)
    previous = steps.seconds(name) if status == "partial" else 0.0
    steps.mark(name, key, False, seconds=previous)
    rows_of = _attack_columns() if attack else _certify_columns()
    with OutputLock(path), TsvLog(path, rows_of, resume=status == "partial", force=status != "partial") as log:
        done = log.done if not attack else _done_pairs(path)
        todo = [job for job in jobs if _job_id(job) not in done]
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=name.replace("_", " "),
                  disable=not cfg.progress, dynamic_ncols=True) as bar:
            for row in make_rows(todo):
                log.write(row_fields(row))
                bar.update(1)
    steps.mark(name, key, True, seconds=previous + time.time() - started)
    return _label(status), steps.seconds(name)


def _job_id(job: Any) -> str:
    return f"{job[1]}@{job[0]:g}" if isinstance(job, tuple) else str(job)


def _done_pairs(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        return set()
    header = lines[0].split("\t")
    i_idx, i_eps = header.index("idx"), header.index("eps")
    rows = (line.split("\t") for line in lines[1:])
    return {f"{f[i_idx]}@{float(f[i_eps]):g}" for f in rows if len(f) == len(header)}


def _certify_columns() -> tuple[str, ...]:
    from .evaluate import CERTIFY_COLUMNS

    return CERTIFY_COLUMNS


def _attack_columns() -> tuple[str, ...]:
    from .evaluate import ATTACK_COLUMNS

    return ATTACK_COLUMNS


def _certify_rows(smooth: Any, dataset: Any, todo: list[int], cfg: DemoConfig, device: Any) -> Iterator[Any]:
    from .evaluate import certify_dataset

    return certify_dataset(smooth, dataset, todo, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, batch_size=cfg.batch,
                           seed=cfg.seed, device=device)


def _attack_rows(smooth: Any, dataset: Any, todo: list[tuple[float, int]], cfg: DemoConfig,
                 device: Any) -> Iterator[Any]:
    from .attacks import PGDL2
    from .evaluate import attack_dataset

    for eps in dict.fromkeys(e for e, _ in todo):
        yield from attack_dataset(smooth, PGDL2(eps, cfg.attack_steps), dataset, [i for e, i in todo if e == eps],
                                  m=cfg.attack_m, n=cfg.attack_n, alpha=cfg.alpha, batch_size=cfg.batch,
                                  seed=cfg.seed, device=device)


def _plot(report: Any, certify: dict, attack: dict, path: Path, top: float, cfg: DemoConfig) -> Path | None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        cfg.log("matplotlib is not installed: no plot (pip install 'smoothadv[plot]')")
        return None
    return report.plot_accuracy(certify, path, attack=attack, max_radius=max(top, *cfg.eps_values) * 1.05,
                                title=f"{cfg.dataset}, sigma = {cfg.sigma}")


def _report_text(cfg: DemoConfig, arch: str, device: Any, objectives: dict, indices: list[int],
                 attack_indices: list[int], radii: list[float], top: float, table: str, plot: Path | None,
                 timings: dict[str, tuple[str, float]], total: float, certify_files: dict[str, Path],
                 attack_files: dict[str, Path]) -> str:
    out = Path(cfg.out)
    objective_lines = "\n".join(f"- **{name}**: `{json.dumps(obj.describe())}`" for name, obj in objectives.items())
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    command = " ".join(["smoothadv report", *[f"{n}={p}" for n, p in certify_files.items()],
                        *[f"--attack {n}={p}" for n, p in attack_files.items()],
                        "--radii", *[f"{r:g}" for r in radii], "--plot", str(out / "accuracy.png")])
    timing_lines = "\n".join(f"| {s} | {status} | {_duration(sec)} |" for s, (status, sec) in timings.items())
    picture = f"![certified and empirical accuracy]({plot.name})\n\n" if plot else ""
    attack_text = (f"SmoothAdv PGD attack on the smoothed classifier (T = {cfg.attack_steps} steps, m = {cfg.attack_m} "
                   f"noise draws) at eps in {', '.join(f'{e:g}' for e in cfg.eps_values)} on the first "
                   f"{len(attack_indices)} of those images, then PREDICT (n = {cfg.attack_n}, alpha = {cfg.alpha}) on "
                   "each adversarial input: *empirical* accuracy, an upper bound on the true robust accuracy. "
                   "At eps = 0 this is plain PREDICT, whose abstentions (it uses fewer samples than CERTIFY) also "
                   "count as wrong: compare the dashed curves with their own eps = 0 point."
                   if attack_indices else "No empirical attack was run.")
    return f"""# smoothadv demo: Gaussian augmentation vs SmoothAdv on {cfg.dataset}

Written {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} by `smoothadv demo`. Device: {device}.

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
probability >= 1 - alpha), ACR = average certified radius; `(attack)` rows: empirical accuracy (%)
under the attack at eps = r.

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
