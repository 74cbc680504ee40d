"""One training loop for every objective and every trained network (classifiers, and denoisers).

`fit(cfg, objective)` trains a base classifier `Sequential(normalization, network)` with Cohen et
al.'s recipe (SGD, momentum 0.9, weight decay 1e-4, a step learning-rate schedule; `cfg.optimizer`
"adam" for Adam) on `objective`'s loss (Gaussian augmentation, Cohen et al. 2019; SmoothAdv, Salman
et al. 2019; ...). Denoised smoothing's denoisers (Salman et al. 2020, arXiv:2003.01908) are trained
by the same loop (`train_denoiser`: `run_loop` with `DenoiserTrainee`): what differs is a `Trainee` (the
network built, how it is evaluated each epoch, what its checkpoint records), never the loop.

The run directory's life is `rundir.RunDirectory`'s: a lock, `args.json`/`env.json`, then per epoch
the checkpoint (atomically, with optimizer, scheduler, epoch and RNG states, so `resume=True`
continues exactly) before its `log.tsv` row; a resumed run may change only the settings declared
rows=False and a larger `epochs` (`rundir.compare`, the one rule). One sigma: an objective whose
`sigma` is not `cfg.sigma` is refused before anything is written (`check_sigma`). Optional:
fine-tuning from a pretrained checkpoint (head replaced when the class count differs) and
self-training on an extra pseudo-labelled .npz set mixed in batch by batch with a loss weight
(Salman et al. 2019, Section 4.2 and Appendix; Carmon et al. 2019).

Under torchrun (`torchrun --nproc-per-node K -m smoothadv train ...`) the same loop runs data
parallel: `cfg.batch_size` is the global batch (B / K per process), each rank takes a disjoint share
of every global batch, noise streams are seeded per (epoch, rank), rank 0 alone evaluates, logs and
writes checkpoints, and a restarted worker group resumes from the last checkpoint. There is no
DistributedDataParallel wrapper: every rank trains a plain replica, objectives and attacks receive it
as is, and the loop keeps the replicas identical in two places only, a broadcast of rank 0's model
before the first epoch and an average of the gradients after every backward
(`distributed.broadcast_model`, `distributed.sync_replicas`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .accel import autocast_dtype, check_precision, resolve_device
from .attacks import attack_settings, build_attack
from .data import (
    NpzDataset,
    batches,
    check_data_dir,
    dataset_info,
    dataset_names,
    get_dataset,
    input_shape,
    num_batches,
    num_classes,
    subset,
)
from .denoise import DENOISER_LOSSES, DENOISERS, DenoiserObjective, build_denoiser, evaluate_denoiser
from .distributed import (
    Dist,
    RankSlicedNoise,
    all_reduce_sum,
    broadcast_model,
    env_world,
    restarted,
    setup,
    sync_replicas,
    teardown,
)
from .errors import SmoothAdvError
from .files import file_sha256, refuse_inputs_as_outputs
from .models import (
    DENOISER,
    build_model,
    check_arch_fits,
    check_dataset,
    check_fits,
    is_denoiser,
    load_checkpoint,
    load_denoiser,
    normalization_spec,
    read_checkpoint,
    replace_head,
    save_checkpoint,
)
from .noise import NoiseSource
from .objectives import OBJECTIVES, LossOutput, Objective, build_objective, has_attack, hyperparameters
from .progress import progress as progress_reporter
from .rundir import RunDirectory, data_fingerprint, settings_record
from .seeds import derive_seed
from .settings import RENAMED, DenoiserTrainSettings, TrainSettings, bookkeeping_fields, flag_keys, make
from .smoothing import eval_mode

__all__ = [
    "CHECKPOINT", "Classifier", "DDN_TRAINING_DEFAULTS", "DENOISER_CHECKPOINT", "DENOISER_LOG_COLUMNS", "Data",
    "DenoiserTrainee", "LOG_COLUMNS", "LoopSettings", "RENAMED_KEYS", "RESUMABLE_CHANGES", "TRAINING_ATTACK_DEFAULTS",
    "Trainee", "check_settings", "check_sigma", "evaluate_noisy", "fit", "make_optimizer", "recipe", "run_loop",
    "train_denoiser", "train_epoch",
]

CHECKPOINT = "checkpoint.pth.tar"
LOG_COLUMNS = ("epoch", "time", "lr", "train_loss", "train_acc", "test_loss", "test_acc_noisy")
DENOISER_CHECKPOINT = "denoiser.pth.tar"
DENOISER_LOG_COLUMNS = ("epoch", "time", "lr", "train_loss", "test_mse", "test_psnr", "test_acc_denoised",
                        "test_acc_noisy")

RESUMABLE_CHANGES = bookkeeping_fields(TrainSettings) | {"epochs"}
"""The settings a resumed run may change (`rundir.RunDirectory.check_resumable`): those that cannot change a
result (declared rows=False: `out_dir`, `device`, `workers`, `data_dir`, `progress`, `resume`, `force`) and
`epochs`, which only says where the run stops (not below the epochs already trained). Every other setting,
and the objective, must be the one the checkpoint recorded; each resumption is recorded in args.json's
`history`."""



class LoopSettings(Protocol):
    """The settings the loop reads (`TrainSettings`, `settings.DenoiserTrainSettings`); a settings class
    without `workers`, `precision` or `unlabelled` runs with 0 workers, fp32 and no extra data."""

    @property
    def out_dir(self) -> Path: ...
    @property
    def dataset(self) -> str: ...
    @property
    def sigma(self) -> float: ...
    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def lr_step(self) -> int: ...
    @property
    def lr_gamma(self) -> float: ...
    @property
    def optimizer(self) -> str: ...
    @property
    def momentum(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def data_dir(self) -> str | None: ...
    @property
    def train_subset(self) -> int | None: ...
    @property
    def eval_subset(self) -> int | None: ...
    @property
    def resume(self) -> bool: ...
    @property
    def force(self) -> bool: ...
    @property
    def progress(self) -> bool: ...


def evaluate_noisy(model: nn.Module, dataset: Dataset, sigma: float, device: torch.device, batch_size: int = 512,
                   generator: torch.Generator | None = None) -> dict[str, float]:
    """Loss and accuracy of the base classifier on x + N(0, sigma^2) (clean when sigma = 0), eval mode."""
    total, correct, loss_sum = 0, 0, 0.0
    with eval_mode(model), torch.inference_mode():
        for x, y in batches(dataset, batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            noisy = x + sigma * torch.randn(x.shape, device=device, generator=generator) if sigma > 0 else x
            logits = model(noisy)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}


class _Tally:
    """This rank's running training loss and accuracy, summed over the examples trained on so far."""

    def __init__(self) -> None:
        self.seen, self.correct, self.scored, self.loss_sum = 0, 0, 0, 0.0

    def add(self, out: LossOutput, count: int) -> None:
        """Count one step on `count` examples; `out.targets` may hold each label several times (multi-noise),
        so correct predictions are rescaled to `count` examples (integer division). An output with no
        targets (a loss that is not a classification, e.g. a denoiser's MSE) counts towards the loss only."""
        with torch.no_grad():
            self.loss_sum += float(out.loss) * count
            self.seen += count
            if len(out.targets):
                self.correct += int((out.logits.argmax(1) == out.targets).sum()) * count // len(out.targets)
                self.scored += count

    def postfix(self) -> dict[str, str]:
        """This rank's means so far, formatted for the progress bar."""
        loss = {"loss": f"{self.loss_sum / max(self.seen, 1):.3f}"}
        return {**loss, "acc": f"{self.correct / self.scored:.3f}"} if self.scored else loss

    def over_all_ranks(self, device: torch.device) -> dict[str, float]:
        """Mean loss and accuracy per example over every rank's examples (this rank's alone outside torchrun);
        the accuracy is NaN when no step scored a prediction."""
        loss_sum, correct, seen, scored = all_reduce_sum([self.loss_sum, self.correct, self.seen, self.scored],
                                                         device)
        return {"loss": loss_sum / max(seen, 1), "acc": correct / scored if scored else math.nan}


@dataclass(frozen=True)
class _Stepper:
    """Takes optimizer steps of one objective on one model: the inside of `train_epoch`."""

    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    device: torch.device
    generator: NoiseSource
    precision: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def batch(self, x: Tensor, y: Tensor, weight: float, tally: _Tally, index: Tensor | None = None) -> None:
        """Split (x, y[, index]) into `objective.steps_per_batch` chunks and take one step on each, in order."""
        chunks = self.objective.steps_per_batch
        indices = index.chunk(chunks) if index is not None else [None] * len(x.chunk(chunks))
        for xc, yc, ic in zip(x.chunk(chunks), y.chunk(chunks), indices):
            tally.add(self.step(xc, yc, weight, ic), len(yc))

    def step(self, x: Tensor, y: Tensor, weight: float, index: Tensor | None = None) -> LossOutput:
        """One optimizer step on `weight` x the objective's loss on (x, y); returns the objective's output.

        Under torchrun the ranks meet here once: `sync_replicas` averages the gradients (and copies
        rank 0's buffers) between backward and step, so every replica takes the same step.
        """
        dtype = self.precision or torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision is not None):
            if self.objective.uses_index:
                out = self.objective(self.model, x, y, self.generator, index=index)  # type: ignore[call-arg]
            else:
                out = self.objective(self.model, x, y, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss = out.loss * weight
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        sync_replicas(self.model)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return out


def train_epoch(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                labelled: Iterator[tuple[Tensor, ...]], device: torch.device, *,
                extra: Iterator[tuple[Tensor, Tensor]] | None = None, extra_weight: float = 1.0,
                generator: NoiseSource = None, progress: Any = None, precision: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One epoch: for each loader batch (and, with `extra`, one extra batch after it, its loss scaled
    by `extra_weight`), split into `objective.steps_per_batch` chunks with one optimizer step each.
    `labelled` may yield (x, y, indices) (`batches(..., with_index=True)`); the indices reach
    objectives with `uses_index` (CAT-RS).

    `model` is the plain network, passed to the objective as is. Under torchrun each step's
    gradients are averaged over the ranks (`distributed.sync_replicas`), so the replicas stay
    identical; outside it nothing is synchronised. With `precision` (torch.bfloat16 or
    torch.float16) the objective, attack included, runs under autocast (noise is still drawn and
    added in float32); with `scaler` the loss is scaled for fp16. Returns the mean training loss and
    accuracy per example over all ranks. Outside torchrun the epoch stops early, at the first batch
    whose loss is NaN or infinite (the returned loss is then non-finite: training diverged); under
    torchrun every batch runs, so that the ranks keep meeting in the same all-reduces.
    """
    model.train()
    stepper = _Stepper(model, objective, optimizer, device, generator, precision, scaler)
    tally = _Tally()
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    for x, y, *index in labelled:
        stepper.batch(x.to(device, non_blocking=True), y.to(device, non_blocking=True), 1.0, tally,
                      index[0] if index else None)
        if alone and not math.isfinite(tally.loss_sum):
            break
        extra_batch = next(extra, None) if extra is not None else None
        if extra_batch is not None:
            stepper.batch(extra_batch[0].to(device), extra_batch[1].to(device), extra_weight, tally)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(tally.postfix())
    return tally.over_all_ranks(device)


def make_optimizer(cfg: LoopSettings, parameters: Any) -> torch.optim.Optimizer:
    """The loop's optimizer, `cfg.optimizer`: "sgd" (with `momentum`; Cohen et al.'s recipe, the default) or
    "adam" (the denoisers of Salman et al. 2020); both with `weight_decay`."""
    name = cfg.optimizer
    if name == "adam":
        return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name != "sgd":
        raise SmoothAdvError(f"--optimizer must be sgd or adam, got {name!r}")
    return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def check_sigma(cfg: LoopSettings, objective: Objective) -> None:
    """One sigma: refuse (SmoothAdvError, one line) an objective that adds noise of another level than the
    settings' `sigma`, which the checkpoint records and certification trusts."""
    own = getattr(objective, "sigma", None)
    if own is not None and not math.isclose(float(own), float(cfg.sigma), rel_tol=1e-9, abs_tol=1e-12):
        raise SmoothAdvError(f"the objective trains at sigma {own:g} but the settings say --sigma {cfg.sigma:g}; the "
                             "checkpoint would record the wrong noise level: build both with the same sigma")


# ------------------------------------------------------------------ what is trained


@dataclass(frozen=True)
class Data:
    """A run's datasets: training (subset applied), evaluation (subset applied), optional pseudo-labelled set."""

    train: Dataset
    test: Dataset
    extra: NpzDataset | None = None


class Trainee(ABC):
    """What the loop trains, and how it is judged: `Classifier` (a base classifier) or `DenoiserTrainee`
    (a denoiser). A trainee builds the network (seeded, or from a pretrained file on a fresh start), names
    the checkpoint file and the fields it records, evaluates the network on the test set after each epoch
    and turns that into the epoch's `log.tsv` row."""

    checkpoint: str = CHECKPOINT
    log_columns: tuple[str, ...] = LOG_COLUMNS
    finite_metrics: tuple[str, ...] = ("loss",)  # test metrics that are NaN or infinite only after divergence

    def check(self) -> None:
        """Checks before anything is written (the settings against each other and the registries)."""
        return None

    def inputs(self) -> list[tuple[str, str | None]]:
        """The files the run reads ((flag, path or None)): never one of the files it writes."""
        return []

    def fingerprint(self) -> str:
        """What identifies the training data by content (`rundir.data_fingerprint` of the training set as
        selected, without augmentation), recorded in the checkpoint and compared on resume."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = data_fingerprint(self.plain_training_set())
        return self._fingerprint

    def plain_training_set(self) -> Dataset:
        """The training set as selected, without random augmentation (what `fingerprint` reads)."""
        return self.data().train

    @abstractmethod
    def data(self) -> Data:
        """The training and evaluation sets (subsets applied)."""

    @abstractmethod
    def build(self, device: torch.device, fresh: bool) -> nn.Module:
        """The network, seeded (and, on a `fresh` start, initialized from a pretrained file if asked)."""

    @abstractmethod
    def check_checkpoint(self, saved: Mapping[str, Any], path: Path) -> None:
        """Refuse to resume a checkpoint of another kind of network (SmoothAdvError, one line)."""

    @abstractmethod
    def checkpoint_fields(self, epochs_done: int) -> dict[str, Any]:
        """What the checkpoint records besides the weights and the training state (`models.save_checkpoint`)."""

    def provenance(self) -> dict[str, Any]:
        """Entries of `args.json` besides the settings, the objective and the history."""
        return {}

    @abstractmethod
    def evaluate(self, model: nn.Module, test: Dataset, device: torch.device) -> dict[str, float]:
        """The test metrics after an epoch (eval mode)."""

    @abstractmethod
    def log_row(self, epoch: int, elapsed: float, lr: float, stats: dict[str, float],
                test: dict[str, float]) -> list[str]:
        """The epoch's `log.tsv` row (`log_columns`)."""

    @abstractmethod
    def summary(self, stats: dict[str, float], test: dict[str, float]) -> str:
        """The epoch's line on the terminal."""


class Classifier(Trainee):
    """A base classifier `Sequential(normalization, cfg.arch)`, evaluated on noisy test images."""

    def __init__(self, cfg: TrainSettings) -> None:
        self.cfg = cfg
        self.classes = num_classes(cfg.dataset)
        self.normalization = normalization_spec(cfg.dataset, cfg.normalization)
        self._unlabelled_digest: str | None = None

    def check(self) -> None:
        check_settings(self.cfg)
        check_precision(self.cfg.precision)

    def inputs(self) -> list[tuple[str, str | None]]:
        return [("--pretrained", self.cfg.pretrained), ("--unlabelled", self.cfg.unlabelled)]

    def data(self) -> Data:
        cfg = self.cfg
        train_set = subset(get_dataset(cfg.dataset, "train", cfg.data_dir, augment=True), cfg.train_subset)
        test_set = subset(get_dataset(cfg.dataset, "test", cfg.data_dir), cfg.eval_subset)
        if len(train_set) == 0:  # type: ignore[arg-type]
            raise SmoothAdvError(f"the {cfg.dataset} training set is empty")
        extra = NpzDataset(cfg.unlabelled, input_shape(cfg.dataset), self.classes) if cfg.unlabelled else None
        return Data(train_set, test_set, extra)

    def plain_training_set(self) -> Dataset:
        return subset(get_dataset(self.cfg.dataset, "train", self.cfg.data_dir), self.cfg.train_subset)

    def build(self, device: torch.device, fresh: bool) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg.arch, self.cfg.dataset, self.normalization).to(device)
        if self.cfg.pretrained and fresh:
            _load_pretrained(model, self.cfg, self.classes)
        return model

    def check_checkpoint(self, saved: Mapping[str, Any], path: Path) -> None:
        """Refuse another architecture or dataset, and extra (--unlabelled) images other than those the
        checkpoint was trained on (compared by content: a file replaced at the same path would change the run)."""
        if saved.get("arch") != self.cfg.arch or saved.get("dataset") != self.cfg.dataset:
            raise SmoothAdvError(f"{path} was trained with {saved.get('arch')}/{saved.get('dataset')}, "
                                 f"not {self.cfg.arch}/{self.cfg.dataset}; refusing to resume")
        then = saved.get("unlabelled_sha256")
        if isinstance(then, str) and self.cfg.unlabelled and then != self._unlabelled_sha256():
            raise SmoothAdvError(f"cannot resume {path}: --unlabelled {self.cfg.unlabelled} is not the file it was "
                                 "trained on (its SHA-256 differs); resume with that file, or start over with --force "
                                 "or a new --out")

    def _unlabelled_sha256(self) -> str | None:
        if self.cfg.unlabelled and self._unlabelled_digest is None:
            self._unlabelled_digest = file_sha256(self.cfg.unlabelled)
        return self._unlabelled_digest

    def checkpoint_fields(self, epochs_done: int) -> dict[str, Any]:
        extra = {"unlabelled_sha256": self._unlabelled_sha256()} if self.cfg.unlabelled else {}
        return {"arch": self.cfg.arch, "dataset": self.cfg.dataset, "normalization": self.normalization,
                "sigma": self.cfg.sigma, "num_classes": self.classes, **extra}

    def evaluate(self, model: nn.Module, test: Dataset, device: torch.device) -> dict[str, float]:
        return evaluate_noisy(model, test, self.cfg.sigma, device,
                              generator=torch.Generator(device=device).manual_seed(self.cfg.seed + 7))

    def log_row(self, epoch: int, elapsed: float, lr: float, stats: dict[str, float],
                test: dict[str, float]) -> list[str]:
        return [str(epoch), f"{elapsed:.1f}", f"{lr:.6g}", f"{stats['loss']:.4f}", f"{stats['acc']:.4f}",
                f"{test['loss']:.4f}", f"{test['acc']:.4f}"]

    def summary(self, stats: dict[str, float], test: dict[str, float]) -> str:
        return f"loss {stats['loss']:.4f}  train acc {stats['acc']:.3f}  noisy test acc {test['acc']:.3f}"


def _load_pretrained(model: nn.Sequential, cfg: TrainSettings, classes: int) -> None:
    pre, meta = load_checkpoint(cfg.pretrained, normalization=cfg.pretrained_normalization)  # type: ignore[arg-type]
    base_arch = "cifar_resnet110" if meta["arch"] == "imagenet32_resnet110" else meta["arch"]
    if base_arch != cfg.arch:
        raise SmoothAdvError(f"pretrained checkpoint has architecture {meta['arch']!r}, but training uses {cfg.arch!r}")
    if meta["num_classes"] != classes:
        replace_head(pre, meta["arch"], classes)
    try:
        model[1].load_state_dict(pre[1].state_dict())
    except RuntimeError as exc:
        raise SmoothAdvError(f"pretrained weights do not fit {cfg.arch!r}: {str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------ a denoiser (denoised smoothing)


def _record(source: str | nn.Module) -> dict[str, Any]:
    """What provenance says about a classifier or denoiser: a file's path and SHA-256, or a module's type."""
    return {"module": type(source).__name__} if isinstance(source, nn.Module) else \
        {"path": str(source), "sha256": file_sha256(source)}


class DenoiserTrainee(Trainee):
    """A DnCNN (`denoise.DnCNN`, Salman et al. 2020) as the loop's trainee: built seeded (or from `init` on a fresh
    start), checked against every classifier, evaluated by `denoise.evaluate_denoiser` (the log's MSE, PSNR and
    accuracies), saved in the format of `models.save_denoiser` with its classifiers' digests and its objective
    history (`init`'s stages, then this one)."""

    checkpoint = DENOISER_CHECKPOINT
    log_columns = DENOISER_LOG_COLUMNS
    finite_metrics = ("mse",)

    def __init__(self, cfg: DenoiserTrainSettings, sources: Sequence[str | nn.Module], evaluator: nn.Module | None,
                 classifiers: Sequence[nn.Module], objective: DenoiserObjective) -> None:
        self.cfg, self.evaluator, self.classifiers = cfg, evaluator, list(classifiers)
        self.shape = input_shape(cfg.dataset)
        self.sources = [_record(s) for s in sources]
        self.stage = {"objective": objective.describe(), "epochs": cfg.epochs, "classifiers": self.sources,
                      "init": _record(cfg.init) if cfg.init else None}
        self.start, self.history = None, []
        if cfg.init is not None:
            self.start, init_meta = load_denoiser(cfg.init)
            check_dataset(init_meta, cfg.dataset, f"--init {cfg.init}")
            self.history = list(init_meta.get("history") or [])
        self._data: Data | None = None

    def inputs(self) -> list[tuple[str, str | None]]:
        return [("--init", self.cfg.init), *(("--classifier", path) for path in self.cfg.classifier or ()),
                ("--eval-classifier", self.cfg.eval_classifier)]

    def data(self) -> Data:
        if self._data is None:
            cfg = self.cfg
            self._data = Data(subset(get_dataset(cfg.dataset, "train", cfg.data_dir), cfg.train_subset),
                              subset(get_dataset(cfg.dataset, "test", cfg.data_dir), cfg.eval_subset))
        return self._data

    def build(self, device: torch.device, fresh: bool) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        denoiser = build_denoiser(cfg.arch, self.shape[0], cfg.depth, cfg.width).to(device)
        if self.start is not None:
            start = self.start
            if (start.channels, start.depth, start.width) != (denoiser.channels, denoiser.depth, denoiser.width):
                raise SmoothAdvError(f"--init {cfg.init} is a DnCNN of depth {start.depth} and width {start.width} "
                                     f"with {start.channels} channels; this run builds {denoiser.depth} x "
                                     f"{denoiser.width} with {denoiser.channels} (set --arch/--depth/--width to match)")
            if fresh:
                denoiser.load_state_dict(start.state_dict())
        for model in (*self.classifiers, *([self.evaluator] if self.evaluator is not None else [])):
            check_fits(denoiser, model, self.shape, denoiser.channels, f"a {cfg.arch} denoiser for {cfg.dataset}")
        return denoiser

    def check_checkpoint(self, saved: Mapping[str, Any], path: Path) -> None:
        """Refuse to resume anything but a denoiser of this dataset trained through these very classifiers
        (compared by content: a classifier file replaced at the same path would change the run)."""
        if not is_denoiser(saved):
            raise SmoothAdvError(f"{path} is not a denoiser checkpoint; refusing to resume")
        check_dataset(saved, self.cfg.dataset, str(path))
        then = saved.get("classifiers")
        if not isinstance(then, list):
            return  # an earlier version's checkpoint: its classifiers' paths are compared as settings
        now = self.sources
        digests = [c.get("sha256", c.get("module")) if isinstance(c, dict) else c for c in then]
        if digests != [c.get("sha256", c.get("module")) for c in now]:
            names = ", ".join(str(c.get("path", c.get("module"))) for c in now) or "none"
            raise SmoothAdvError(f"cannot resume {path}: it was trained through other classifiers than {names} (their "
                                 "SHA-256 differ from those its checkpoint records); resume with the same files, or "
                                 "start over with --force or a new --out")

    def checkpoint_fields(self, epochs_done: int) -> dict[str, Any]:
        return {"arch": self.cfg.arch, "dataset": self.cfg.dataset, "normalization": {"kind": "none"},
                "sigma": self.cfg.sigma, "kind": DENOISER, "channels": self.shape[0],
                "depth": self.cfg.depth or DENOISERS[self.cfg.arch].depth,
                "width": self.cfg.width or DENOISERS[self.cfg.arch].width, "classifiers": self.stage["classifiers"],
                "history": [*self.history, {**self.stage, "epochs_done": epochs_done}]}

    def provenance(self) -> dict[str, Any]:
        return {"stage": self.stage,
                "eval_classifier": _record(self.cfg.eval_classifier) if self.cfg.eval_classifier else None}

    def evaluate(self, model: nn.Module, test: Dataset, device: torch.device) -> dict[str, float]:
        return evaluate_denoiser(model, batches(test, 512, shuffle=False), self.cfg.sigma, classifier=self.evaluator,
                                 device=device, generator=torch.Generator(device=device).manual_seed(self.cfg.seed + 7))

    def log_row(self, epoch: int, elapsed: float, lr: float, stats: dict[str, float],
                test: dict[str, float]) -> list[str]:
        return [str(epoch), f"{elapsed:.1f}", f"{lr:.6g}", f"{stats['loss']:.6f}", f"{test['mse']:.6f}",
                f"{test['psnr']:.3f}", f"{test.get('acc_denoised', math.nan):.4f}",
                f"{test.get('acc_noisy', math.nan):.4f}"]

    def summary(self, stats: dict[str, float], test: dict[str, float]) -> str:
        accuracy = (f"  acc f(D(x+d)) {test['acc_denoised']:.3f}  f(x+d) {test['acc_noisy']:.3f}"
                    if "acc_denoised" in test else "")
        return f"loss {stats['loss']:.5f}  test PSNR {test['psnr']:.2f} dB{accuracy}"


def train_denoiser(cfg: DenoiserTrainSettings, classifiers: Sequence[nn.Module] | None = None,
                   eval_classifier: nn.Module | None = None) -> Path:
    """Train a denoiser with the one loop; returns its checkpoint path (`cfg.out_dir / denoiser.pth.tar`).

    Classifiers come from `cfg.classifier` (checkpoint files, with their normalization layers) or, through
    the API, from `classifiers`: any `nn.Module`s mapping [0, 1] images (B, C, H, W) to logits,
    normalization included. They are never updated (`denoise.frozen`). The run directory's life (lock, provenance,
    checkpoint then log row each epoch, resume by the one rule, divergence stop) is the loop's."""
    if classifiers is not None and cfg.classifier:
        raise SmoothAdvError("give the classifiers as files (settings.classifier) or as modules, not both")
    device = resolve_device(cfg.device)
    if classifiers is None:
        loaded = [_load_denoiser_classifier(path, cfg, device) for path in cfg.classifier or ()]
        sources: list[str | nn.Module] = list(cfg.classifier or ())
    else:
        loaded, sources = [m.to(device) for m in classifiers], list(classifiers)
    if eval_classifier is not None:
        evaluator: nn.Module | None = eval_classifier.to(device)
    elif cfg.eval_classifier:
        evaluator = _load_denoiser_classifier(cfg.eval_classifier, cfg, device)
    else:
        evaluator = loaded[0] if loaded else None
    objective = DENOISER_LOSSES[cfg.objective](cfg.sigma, tuple(loaded))
    trainee = DenoiserTrainee(cfg, sources, evaluator, loaded, objective)
    steps = math.ceil(len(trainee.data().train) / cfg.batch_size)  # type: ignore[arg-type]
    return run_loop(cfg, dataclasses.replace(objective, steps_per_epoch=steps), trainee)


def _load_denoiser_classifier(path: str, cfg: DenoiserTrainSettings, device: torch.device) -> nn.Module:
    model, meta = load_checkpoint(path, device, normalization=cfg.normalization)
    if meta["dataset"] != cfg.dataset:
        raise SmoothAdvError(f"classifier {path} was trained on {meta['dataset']}, the denoiser on {cfg.dataset}")
    return model


# ------------------------------------------------------------------ the run


def fit(cfg: TrainSettings, objective: Objective) -> Path:
    """Train a base classifier with `objective`; returns the checkpoint path. See the module docstring.

    A second run writing the same `out_dir` at the same time is refused (lock file
    `checkpoint.pth.tar.lock`, held by rank 0; a lock left by a dead process is taken over). An
    objective of another sigma than `cfg.sigma` is refused before anything is written.
    """
    if objective.uses_index and cfg.unlabelled:
        raise SmoothAdvError(f"{objective.describe()['name']} looks up per-example data of the training set; it "
                             "cannot train on extra (--unlabelled) images")
    return run_loop(cfg, objective, Classifier(cfg))


def run_loop(cfg: LoopSettings, objective: Objective, trainee: Trainee) -> Path:
    """Train `trainee`'s network with `objective` under `cfg`, in the run directory `cfg.out_dir`; returns
    the checkpoint path. Every check that needs no data (settings, sigma, warm-up, data directory) runs
    before the directory is touched."""
    trainee.check()
    check_numbers(cfg)
    check_sigma(cfg, objective)
    warmup = getattr(objective, "warmup", 1)
    if warmup > cfg.epochs:
        raise SmoothAdvError(f"warm-up ({warmup} epochs) is longer than training ({cfg.epochs} epochs)")
    check_data_dir(cfg.data_dir)
    directory = RunDirectory(cfg.out_dir, trainee.checkpoint)
    refuse_inputs_as_outputs([(f"--out's {path.name}", path) for path in directory.files()], trainee.inputs())
    if env_world()[0] != 0:
        return _run(cfg, objective, trainee, directory)
    created = not directory.path.exists()
    try:
        with directory.lock():
            before = directory.existing()
            try:
                return _run(cfg, objective, trainee, directory)
            except BaseException:
                directory.forget_new(before)  # a run that wrote no checkpoint leaves none of its files behind
                raise
    finally:
        if created:
            directory.remove_if_empty()


def check_numbers(cfg: LoopSettings) -> None:
    """Refuse (one line) a learning rate, weight decay, momentum or decay factor that float32 weights cannot hold
    (the optimizer would fail with a traceback), and a learning rate that its decay factor grows past float32
    before the last epoch. (A sigma too large to train with is caught as divergence in the first epoch.)"""
    limit = float(torch.finfo(torch.float32).max)
    for flag, value in (("--lr", cfg.lr), ("--weight-decay", cfg.weight_decay), ("--momentum", cfg.momentum),
                        ("--lr-gamma", cfg.lr_gamma)):
        if not math.isfinite(float(value)) or abs(float(value)) > limit:
            raise SmoothAdvError(f"{flag} {value:g} is beyond what float32 weights can hold (at most {limit:.3g})")
    steps = (cfg.epochs - 1) // cfg.lr_step
    if cfg.lr_gamma > 1 and math.log(cfg.lr) + steps * math.log(cfg.lr_gamma) > math.log(limit):
        raise SmoothAdvError(f"--lr {cfg.lr:g} grows by --lr-gamma {cfg.lr_gamma:g} every {cfg.lr_step} epochs past "
                             f"what float32 weights can hold before epoch {cfg.epochs}")


@dataclass
class _TrainingState:
    """Everything a checkpoint carries over: model, optimizer, schedule, fp16 loss scaler, generators,
    and `epoch`, the number of epochs already trained (the next epoch to train, counted from 0)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    precision: torch.dtype | None
    noise_gen: torch.Generator
    shuffle_gen: torch.Generator
    epoch: int = 0
    resumed_config: dict[str, Any] | None = None  # the settings the resumed checkpoint recorded (None: fresh)


def _run(cfg: LoopSettings, objective: Objective, trainee: Trainee, directory: RunDirectory) -> Path:
    """The training run: setup, then one pass of the loop per epoch.

    Setup: the checkpoint to resume (if any), the data, the process group, the model/optimizer/resume
    state, the provenance; then per epoch: the epoch's objective, its seeded random streams, one
    `train_epoch`, the schedule step, the divergence check, and on rank 0 evaluation, checkpoint and
    log row (in that order)."""
    device = resolve_device(cfg.device)
    directory.refuse_another_run(trainee.log_columns, force=cfg.force or cfg.resume or restarted())
    resume_from = directory.checkpoint_to_resume(resume=cfg.resume, force=cfg.force, restarted=restarted())
    data = trainee.data()
    ctx = _join_process_group(cfg, device)
    state = _initial_state(cfg, ctx.device, trainee, resume_from, objective, directory)
    broadcast_model(state.model)  # torchrun: every replica starts as rank 0's
    config = settings_record(cfg)
    log = directory.log(trainee.log_columns, state.epoch)  # read (and checked) before anything is written
    if ctx.main and state.epoch < cfg.epochs:  # a finished run resumed has nothing to train, and writes nothing
        history = directory.history(state.resumed_config, config, state.epoch, bookkeeping_fields(type(cfg)))
        directory.write_provenance({**config, "objective": objective.describe(), **trainee.provenance(),
                                    "world_size": ctx.world, "history": history})

    for epoch in range(state.epoch, cfg.epochs):
        epoch_objective = objective.at_epoch(epoch)
        started, lr = time.time(), state.optimizer.param_groups[0]["lr"]
        noise = _seed_epoch(cfg.seed, epoch, ctx, state.noise_gen)
        labelled, extra = _epoch_batches(cfg, data, ctx, state.shuffle_gen, with_index=objective.uses_index)
        with progress_reporter(num_batches(data.train, cfg.batch_size), label=f"epoch {epoch + 1}/{cfg.epochs}",
                               unit="batches", bars=cfg.progress, show=ctx.main, leave=False) as bar:
            stats = train_epoch(state.model, epoch_objective, state.optimizer, labelled, ctx.device, extra=extra,
                                extra_weight=getattr(cfg, "unlabelled_weight", 1.0), generator=noise, progress=bar,
                                precision=state.precision, scaler=state.scaler)
        state.scheduler.step()
        _refuse_divergence(state.model, stats, epoch, directory.checkpoint)  # every rank: same loss and weights
        if not ctx.main:  # rank 0 alone evaluates, logs and saves; the others go on to the next all-reduce
            continue
        test = trainee.evaluate(state.model, data.test, ctx.device)
        broken = [name for name in trainee.finite_metrics if not math.isfinite(test[name])]
        _refuse_divergence(state.model, stats, epoch, directory.checkpoint,
                           "".join(f", test {name} {test[name]:.4g}" for name in broken))
        elapsed = time.time() - started
        log.commit(functools.partial(_save, directory.checkpoint, trainee, state, epochs_done=epoch + 1,
                                     config=config, objective=epoch_objective),
                   trainee.log_row(epoch + 1, elapsed, lr, stats, test))  # the checkpoint, then its log row
        _announce(f"epoch {epoch + 1}/{cfg.epochs}  {trainee.summary(stats, test)}  ({elapsed:.0f}s)")
    teardown(ctx)
    return directory.checkpoint


# ------------------------------------------------------------------ setup


def _join_process_group(cfg: LoopSettings, device: torch.device) -> Dist:
    """Under torchrun: join the process group and use this process's GPU; else a one-process `Dist`."""
    ctx = setup(device)
    if cfg.batch_size % ctx.world:
        raise SmoothAdvError(f"--batch {cfg.batch_size} is the global batch; it must be divisible by the "
                             f"{ctx.world} processes")
    return ctx


def _initial_state(cfg: LoopSettings, device: torch.device, trainee: Trainee, resume_from: Path | None,
                   objective: Objective, directory: RunDirectory) -> _TrainingState:
    """The model (`trainee.build`), the optimizer (`make_optimizer`), the step schedule and the generators;
    then `resume_from`'s state, if given (after checking that `cfg` and `objective` may resume it:
    `rundir.RunDirectory.check_resumable`)."""
    model = trainee.build(device, fresh=resume_from is None)
    optimizer = make_optimizer(cfg, model.parameters())
    precision = autocast_dtype(getattr(cfg, "precision", "fp32"), device)
    state = _TrainingState(
        model, optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma),
        scaler=torch.amp.GradScaler(device.type) if precision is torch.float16 else None,
        precision=precision,
        noise_gen=torch.Generator(device=device).manual_seed(cfg.seed),
        shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1),
    )
    if resume_from is not None:  # multi-node: the run directory must be on a shared filesystem
        _restore(state, resume_from, cfg, device, objective, trainee, directory)
    return state


def _restore(state: _TrainingState, path: Path, cfg: LoopSettings, device: torch.device, objective: Objective,
             trainee: Trainee, directory: RunDirectory) -> None:
    """Load a checkpoint written by `_save` into `state`, refusing one of another network or dataset
    (`trainee.check_checkpoint`), or one trained with other settings (the one rule).

    The noise and global torch generators are not restored: they are reseeded every epoch. A checkpoint
    without a shuffle state (a denoiser of an earlier version) keeps the seeded one."""
    saved = read_checkpoint(path, device)
    trainee.check_checkpoint(saved, path)
    directory.check_resumable(saved, cfg, objective)
    then = saved.get("data_sha256")  # absent from checkpoints written before it: not compared
    if isinstance(then, str) and then != trainee.fingerprint():
        raise SmoothAdvError(f"cannot resume {path}: its training data differ from these (another dataset or "
                             "--data-dir: the examples' SHA-256 differs); resume with the data it was trained on, or "
                             "start over with --force or a new --out")
    state.resumed_config = dict(saved["config"])
    state.model.load_state_dict(saved["state_dict"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    if isinstance(saved.get("rng"), dict) and "shuffle" in saved["rng"]:
        state.shuffle_gen.set_state(saved["rng"]["shuffle"].cpu())
    state.epoch = int(saved["epoch"])


# ------------------------------------------------------------------ one epoch


def _seed_epoch(seed: int, epoch: int, ctx: Dist, noise_gen: torch.Generator) -> RankSlicedNoise:
    """Seed the epoch's random streams from (seed, epoch) alone, so a resumed run draws them again.

    The batch noise generator is seeded the same on every rank and sliced by `RankSlicedNoise`
    (each example's noise does not depend on the number of ranks); the attack's own draws and the
    global torch RNG are seeded per (epoch, rank).
    """
    noise_gen.manual_seed(derive_seed(seed, epoch, 0))
    local = torch.Generator(device=ctx.device).manual_seed(derive_seed(seed, epoch, ctx.rank, 2))
    torch.manual_seed(derive_seed(seed, epoch, ctx.rank, 1))
    return RankSlicedNoise(noise_gen, ctx.rank, ctx.world, local)


def _epoch_batches(cfg: LoopSettings, data: Data, ctx: Dist, shuffle_gen: torch.Generator, *,
                   with_index: bool = False
                   ) -> tuple[Iterator[tuple[Tensor, ...]], Iterator[tuple[Tensor, Tensor]] | None]:
    """This rank's labelled batches (with their dataset indices if `with_index`) and extra (pseudo-labelled)
    batches of the epoch, both shuffled lazily by `shuffle_gen` (labelled first: its order is drawn at the
    first batch)."""
    labelled = batches(data.train, cfg.batch_size, shuffle=True, generator=shuffle_gen,
                       workers=getattr(cfg, "workers", 0), rank=ctx.rank, world=ctx.world, with_index=with_index)
    extra = (batches(data.extra, cfg.batch_size, shuffle=True, generator=shuffle_gen, rank=ctx.rank,
                     world=ctx.world) if data.extra is not None else None)
    return labelled, extra  # type: ignore[return-value]


# ------------------------------------------------------------------ rank 0's end of an epoch


def _save(path: Path, trainee: Trainee, state: _TrainingState, *, epochs_done: int, config: dict[str, Any],
          objective: Objective) -> None:
    """Write the checkpoint (models.save_checkpoint's format) with everything `_restore` reads."""
    fields = trainee.checkpoint_fields(epochs_done)
    save_checkpoint(path, state.model, **fields, data_sha256=trainee.fingerprint(), epoch=epochs_done,
                    optimizer=state.optimizer.state_dict(),
                    scheduler=state.scheduler.state_dict(),
                    scaler=state.scaler.state_dict() if state.scaler else None,
                    rng={"noise": state.noise_gen.get_state(), "shuffle": state.shuffle_gen.get_state(),
                         "torch": torch.get_rng_state()},
                    config=config, objective=objective.describe())


def _refuse_divergence(model: nn.Module, stats: dict[str, float], epoch: int, ckpt_path: Path,
                       evaluation: str = "") -> None:
    """Stop the run (SmoothAdvError, one line) if the epoch's loss or any weight is NaN or infinite, or
    (rank 0, after evaluating) `evaluation` names a non-finite test metric.

    Called before the epoch's checkpoint is written, so the last good checkpoint is never replaced
    by non-finite weights. Its inputs are the same on every rank (an all-reduced loss, replicas kept
    identical), so under torchrun every rank stops together (the evaluation is rank 0's alone)."""
    weights_ok = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    if math.isfinite(stats["loss"]) and weights_ok and not evaluation:
        return
    kept = (f"{ckpt_path} still holds epoch {epoch}, the last good one" if epoch > 0 else
            "no checkpoint was written by this run")
    raise SmoothAdvError(f"training diverged in epoch {epoch + 1} (loss {stats['loss']:.4g}"
                         f"{'' if weights_ok else ', non-finite weights'}{evaluation}): {kept}; lower --lr (or "
                         "--sigma) and start over with --force or a new --out")


def _announce(line: str) -> None:
    """One line per epoch, with or without progress bars (logs see every epoch)."""
    from tqdm.auto import tqdm

    tqdm.write(line)


# ---- recipe (lead)


TRAINING_ATTACK_DEFAULTS = {"eps": 0.5, "steps": 2}
"""The attack settings training uses when a recipe or the command line does not give them (T = 2, as the
cheapest configuration of Salman et al.'s sweeps); DDN adds `DDN_TRAINING_DEFAULTS`."""

DDN_TRAINING_DEFAULTS = {"ddn_gamma": 0.05, "ddn_init_norm": 1.0}
"""DDN's training defaults, those of Salman et al.'s train_pgd.py (`--gamma-DDN 0.05`, `--init-norm-DDN 1.0`; the
warm-up replaces the initial norm by each epoch's eps)."""

RENAMED_KEYS = {(name, old): new for name, cls in OBJECTIVES.items()
                for old, new in RENAMED.get(cls.__name__, {}).items()}
"""Recipe keys that were renamed (`settings.RENAMED`): (objective, old key) -> new key (refused, naming the new one)."""


def check_settings(cfg: TrainSettings) -> None:
    """Every check of `cfg` that needs more than one field or a registry: `TrainSettings.validate`, and that the
    architecture takes the dataset's images (`models.check_arch_fits`). SmoothAdvError, one line."""
    cfg.validate()
    check_arch_fits(cfg.arch, cfg.dataset)


def recipe(values: Mapping[str, Any], *, source: str = "") -> tuple[TrainSettings, Objective]:
    """The training settings and objective that flat `values` describe (a TOML recipe's keys, or flags).

    Keys are the command line's flags without dashes: training settings (`batch`, `lr_step`, ...),
    `objective` (default "gaussian"), that objective's own hyperparameters (`objectives.hyperparameters`)
    and, for an objective with an attack (SmoothAdv), the attack's settings (`attacks.attack_settings`:
    `attack`, `eps`, `steps`, ...; training defaults `TRAINING_ATTACK_DEFAULTS`). A key that is neither is
    refused, and so is a hyperparameter of another objective: every key means one thing. Values are
    checked against their declared types; a missing `out`, or a warm-up longer than training, is refused.
    The architecture defaults to the dataset's usual one. Errors are one line, prefixed with `source`.
    """
    prefix = f"{source}: " if source else ""
    name = values.get("objective", "gaussian")
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise SmoothAdvError(f"{prefix}objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    train_keys, own = flag_keys(TrainSettings), hyperparameters(name)
    attack_keys = attack_settings() if has_attack(name) else {}
    train: dict[str, Any] = {}
    options: dict[str, Any] = {}
    attack: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        if key == "objective":
            continue
        if (name, key) in RENAMED_KEYS:
            raise SmoothAdvError(f"{prefix}{key} of the {name} objective is now called {RENAMED_KEYS[name, key]}")
        if key in train_keys:
            train[train_keys[key]] = value
        elif key in own:
            options[key] = value
        elif key in attack_keys:
            attack[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise SmoothAdvError(f"{prefix}{', '.join(sorted(unknown))}: not a setting of training or of the {name} "
                             "objective")
    if "out_dir" not in train:
        raise SmoothAdvError(f"{prefix}the run directory (--out) is required")
    try:
        if train.get("arch") is None:
            dataset = train.get("dataset", TrainSettings.__dataclass_fields__["dataset"].default)
            if dataset not in dataset_names():
                raise SmoothAdvError(f"dataset must be one of {', '.join(dataset_names())}, got {dataset!r}")
            train["arch"] = dataset_info(dataset).default_arch
        settings = make(TrainSettings, train)
        built_attack = None
        if has_attack(name):
            given = {**TRAINING_ATTACK_DEFAULTS, **attack}
            if given.get("attack", "pgd") == "ddn":
                given = {**DDN_TRAINING_DEFAULTS, **given}
            built_attack = build_attack(**given)
        objective = build_objective(name, settings.sigma, options, built_attack)
    except SmoothAdvError as exc:
        raise SmoothAdvError(f"{prefix}{exc}") from None
    warmup = getattr(objective, "warmup", 1)
    if warmup > settings.epochs:
        raise SmoothAdvError(f"{prefix}warm-up ({warmup} epochs) is longer than training ({settings.epochs} epochs)")
    return settings, objective
