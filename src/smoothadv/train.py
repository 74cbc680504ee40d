"""One training loop for every objective (Gaussian augmentation, SmoothAdv, ...).

`fit(cfg, objective)` trains `Sequential(normalization, network)` with SGD (momentum 0.9, weight
decay 1e-4) and a step learning-rate schedule, Cohen et al.'s recipe, and writes into
`cfg.out_dir`: `checkpoint.pth.tar` (atomically, every epoch, with optimizer, scheduler, epoch
and RNG states so `resume=True` continues exactly), `log.tsv` (one row per epoch), `args.json`
and `env.json`. Optional: fine-tuning from a pretrained checkpoint (head replaced when the class
count differs) and self-training on an extra pseudo-labelled .npz set mixed in batch by batch
with a loss weight (Salman et al. 2019, Section 4.2 and Appendix; Carmon et al. 2019).

Under torchrun (`torchrun --nproc-per-node K -m smoothadv train ...`) the same loop runs data
parallel: `cfg.batch_size` is the global batch (B / K per process), each rank takes a disjoint share
of every global batch, noise streams are seeded per (epoch, rank), rank 0 alone evaluates, logs and
writes checkpoints, and a restarted worker group resumes from the last checkpoint. There is no
DistributedDataParallel wrapper: every rank trains a plain replica of the model, objectives and
attacks receive it as is, and the loop keeps the replicas identical in two places only, a
broadcast of rank 0's model before the first epoch and an average of the gradients after every
backward (`distributed.broadcast_model`, `distributed.sync_replicas`). See `distributed.py` for
the exact conventions and why.

`_fit` reads top to bottom: setup (output checks, data, process group, model/optimizer/resume
state), then per epoch: the epoch's objective, its seeded random streams, one `train_epoch`, the
schedule step, and on rank 0 evaluation, log row and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .accel import autocast_dtype, resolve_device
from .data import NpzDataset, TensorImageDataset, check_data_dir, get_dataset, input_shape, num_classes
from .distributed import (
    Dist,
    RankSlicedNoise,
    all_reduce_sum,
    broadcast_model,
    restarted,
    setup,
    shard_order,
    sync_replicas,
    teardown,
)
from .errors import SmoothAdvError
from .files import atomic_write_text, write_provenance
from .models import (
    build_model,
    load_checkpoint,
    normalization_spec,
    read_checkpoint,
    replace_head,
    save_checkpoint,
)
from .objectives import LossOutput, NoiseSource, Objective
from .seeds import derive_seed
from .settings import TrainSettings, bookkeeping_fields, flag_name, row_settings
from .smoothing import eval_mode

CHECKPOINT = "checkpoint.pth.tar"
LOG_COLUMNS = ("epoch", "time", "lr", "train_loss", "train_acc", "test_loss", "test_acc_noisy")

RESUMABLE_CHANGES = bookkeeping_fields(TrainSettings) | {"epochs"}
"""The settings a resumed run may change: those that cannot change a result (declared rows=False:
`out_dir`, `device`, `workers`, `data_dir`, `progress`, `resume`, `force`) and `epochs`, which only
says where the run stops: nothing before the last epoch depends on it (the learning-rate schedule
steps every `lr_step` epochs and the eps warm-up spans `warmup` epochs, whatever `epochs` is), so a
run resumed with a larger `epochs` trains exactly what one run of that many epochs would. It may not
fall below the epochs already trained. Every other setting, and the objective, must be the one the
checkpoint recorded; each resumption is recorded in args.json's `history`."""


TrainConfig = TrainSettings
"""The training settings (`settings.TrainSettings`; this name is kept for existing code)."""


def _tensor_source(dataset: Dataset) -> tuple[TensorImageDataset, Tensor] | None:
    if isinstance(dataset, TensorImageDataset):
        return dataset, torch.arange(len(dataset))
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImageDataset):
        return dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(dataset, NpzDataset):
        return dataset.inner, torch.arange(len(dataset))
    return None


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            workers: int = 0, rank: int = 0, world: int = 1, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
    """Yield (images, labels) batches; in-memory datasets are sliced directly (no per-item Python).

    With `world` > 1 (torchrun), `batch_size` is the global batch and this yields rank `rank`'s
    disjoint share of each global batch of the same shuffled order (`distributed.shard_order`).
    With `with_index`, (images, labels, indices) with each example's position in the dataset (in
    the underlying dataset for a `Subset`), for objectives that look up per-example data (CAT-RS).
    """
    source = _tensor_source(dataset)
    if source is not None:
        inner, index = source
        if shuffle:
            index = index[torch.randperm(len(index), generator=generator)]
        for chunk in shard_order(index, batch_size, rank, world):
            images = inner.images[chunk]
            images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            yield (images, inner.labels[chunk], chunk) if with_index else (images, inner.labels[chunk])
        return
    order = torch.randperm(len(dataset), generator=generator) if shuffle else torch.arange(len(dataset))  # type: ignore[arg-type]
    plan = [chunk.tolist() for chunk in shard_order(order, batch_size, rank, world)]
    positions = dataset.indices if isinstance(dataset, Subset) else None
    for chunk, (images, labels) in zip(plan, DataLoader(dataset, batch_sampler=plan, num_workers=workers)):
        if not with_index:
            yield images, labels
            continue
        yield images, labels, torch.as_tensor([positions[i] for i in chunk] if positions is not None else chunk)


def num_batches(dataset: Dataset, batch_size: int) -> int:
    return math.ceil(len(dataset) / batch_size)


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
        self.seen, self.correct, self.loss_sum = 0, 0, 0.0

    def add(self, out: LossOutput, count: int) -> None:
        """Count one SGD step on `count` examples; `out.targets` may hold each label several times
        (multi-noise), so correct predictions are rescaled to `count` examples (integer division)."""
        with torch.no_grad():
            self.loss_sum += float(out.loss) * count
            self.correct += int((out.logits.argmax(1) == out.targets).sum()) * count // len(out.targets)
            self.seen += count

    def postfix(self) -> dict[str, str]:
        """This rank's means so far, formatted for the progress bar."""
        return {"loss": f"{self.loss_sum / max(self.seen, 1):.3f}", "acc": f"{self.correct / max(self.seen, 1):.3f}"}

    def over_all_ranks(self, device: torch.device) -> dict[str, float]:
        """Mean loss and accuracy per example over every rank's examples (this rank's alone outside torchrun)."""
        loss_sum, correct, seen = all_reduce_sum([self.loss_sum, self.correct, self.seen], device)
        return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1)}


@dataclass(frozen=True)
class _Stepper:
    """Takes SGD steps of one objective on one model: the inside of `train_epoch`."""

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
    by `extra_weight`), split into `objective.steps_per_batch` chunks with one SGD step each.
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


def _subset(dataset: Dataset, count: int | None) -> Dataset:
    if count is None or count >= len(dataset):
        return dataset
    if count < 1:
        raise SmoothAdvError(f"subset size must be >= 1, got {count}")
    return Subset(dataset, list(range(count)))


def _load_pretrained(model: nn.Sequential, cfg: TrainConfig, classes: int) -> None:
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


def fit(cfg: TrainConfig, objective: Objective) -> Path:
    """Train a base classifier with `objective`; returns the checkpoint path. See the module docstring.

    A second run writing the same `out_dir` at the same time is refused (lock file
    `checkpoint.pth.tar.lock`, held by rank 0; a lock left by a dead process is taken over).
    """
    from .distributed import env_world
    from .files import locked_run_directory

    cfg.validate()
    check_data_dir(cfg.data_dir)
    warmup = getattr(objective, "warmup", 1)
    if warmup > cfg.epochs:
        raise SmoothAdvError(f"warm-up ({warmup} epochs) is longer than training ({cfg.epochs} epochs)")
    if objective.uses_index and cfg.unlabelled:
        raise SmoothAdvError(f"{objective.describe()['name']} looks up per-example data of the training set; it "
                             "cannot train on extra (--unlabelled) images")
    if env_world()[0] != 0:
        return _fit(cfg, objective)
    with locked_run_directory(cfg.out_dir, CHECKPOINT):
        return _fit(cfg, objective)


def _fit(cfg: TrainConfig, objective: Objective) -> Path:
    """The training run: setup, then one pass of the loop per epoch. See the module docstring."""
    device = resolve_device(cfg.device)
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT
    resume_from = _checkpoint_to_resume(cfg, ckpt_path)
    data = _load_data(cfg)
    ctx = _join_process_group(cfg, device)
    state = _initial_state(cfg, ctx.device, data.classes, resume_from, objective)
    broadcast_model(state.model)  # torchrun: every replica starts as rank 0's
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    if ctx.main:
        write_provenance(cfg.out_dir, {**config, "objective": objective.describe(), "world_size": ctx.world,
                                       "history": _history(Path(cfg.out_dir), state, config)})
    log = _EpochLog(Path(cfg.out_dir) / "log.tsv", state.epoch)

    for epoch in range(state.epoch, cfg.epochs):
        epoch_objective = objective.at_epoch(epoch)
        started, lr = time.time(), state.optimizer.param_groups[0]["lr"]
        noise = _seed_epoch(cfg.seed, epoch, ctx, state.noise_gen)
        labelled, extra = _epoch_batches(cfg, data, ctx, state.shuffle_gen, with_index=objective.uses_index)
        with _progress_bar(cfg, epoch, num_batches(data.train, cfg.batch_size), ctx.main) as bar:
            stats = train_epoch(state.model, epoch_objective, state.optimizer, labelled, ctx.device, extra=extra,
                                extra_weight=cfg.unlabelled_weight, generator=noise, progress=bar,
                                precision=state.precision, scaler=state.scaler)
        state.scheduler.step()
        _refuse_divergence(state.model, stats, epoch, ckpt_path)  # on every rank: same loss and weights
        if not ctx.main:  # rank 0 alone evaluates, logs and saves; the others go on to the next all-reduce
            continue
        test = evaluate_noisy(state.model, data.test, cfg.sigma, ctx.device,
                              generator=torch.Generator(device=ctx.device).manual_seed(cfg.seed + 7))
        elapsed = time.time() - started
        log.append(epoch + 1, elapsed, lr, stats, test)
        _save(ckpt_path, cfg, state, data.classes, epochs_done=epoch + 1, config=config, objective=epoch_objective)
        log.write()  # after the checkpoint: a log row always has its checkpoint
        _announce(epoch, cfg.epochs, stats, test, elapsed)  # with or without bars: logs see every epoch
    teardown(ctx)
    return ckpt_path


# ------------------------------------------------------------------ setup


def _checkpoint_to_resume(cfg: TrainConfig, ckpt_path: Path) -> Path | None:
    """The checkpoint to continue from (`cfg.resume`, or torchrun restarted us after a failure), or
    None to start afresh; an existing checkpoint is never overwritten without `cfg.force`."""
    resume = cfg.resume or (restarted() and ckpt_path.exists())
    if ckpt_path.exists() and not (resume or cfg.force):
        raise SmoothAdvError(f"{ckpt_path} exists; pass --resume to continue training or --force to start over")
    return ckpt_path if resume and ckpt_path.exists() else None


@dataclass(frozen=True)
class _Data:
    """A run's datasets: training (subset applied), noisy evaluation, optional pseudo-labelled extra set."""

    train: Dataset
    test: Dataset
    extra: NpzDataset | None
    classes: int


def _load_data(cfg: TrainConfig) -> _Data:
    classes = num_classes(cfg.dataset)
    train_set = _subset(get_dataset(cfg.dataset, "train", cfg.data_dir, augment=True), cfg.train_subset)
    test_set = _subset(get_dataset(cfg.dataset, "test", cfg.data_dir), cfg.eval_subset)
    if len(train_set) == 0:
        raise SmoothAdvError(f"the {cfg.dataset} training set is empty")
    extra_set = NpzDataset(cfg.unlabelled, input_shape(cfg.dataset), classes) if cfg.unlabelled else None
    return _Data(train_set, test_set, extra_set, classes)


def _join_process_group(cfg: TrainConfig, device: torch.device) -> Dist:
    """Under torchrun: join the process group and use this process's GPU; else a one-process `Dist`."""
    ctx = setup(device)
    if cfg.batch_size % ctx.world:
        raise SmoothAdvError(f"--batch {cfg.batch_size} is the global batch; it must be divisible by the "
                             f"{ctx.world} processes")
    return ctx


@dataclass
class _TrainingState:
    """Everything a checkpoint carries over: model, optimizer, schedule, fp16 loss scaler, generators,
    and `epoch`, the number of epochs already trained (the next epoch to train, counted from 0)."""

    model: nn.Sequential
    normalization: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    precision: torch.dtype | None
    noise_gen: torch.Generator
    shuffle_gen: torch.Generator
    epoch: int = 0
    resumed_config: dict[str, Any] | None = None  # the settings `resume_from` recorded (None: a fresh start)


def _initial_state(cfg: TrainConfig, device: torch.device, classes: int, resume_from: Path | None,
                   objective: Objective) -> _TrainingState:
    """The model (seeded with `cfg.seed`, or fine-tuned from `cfg.pretrained`), SGD with momentum and
    weight decay, the step schedule and the generators; then `resume_from`'s state, if given (after
    checking that `cfg` and `objective` differ from its recorded ones only in `RESUMABLE_CHANGES`)."""
    torch.manual_seed(cfg.seed)
    norm = normalization_spec(cfg.dataset, cfg.normalization)
    model = build_model(cfg.arch, cfg.dataset, norm).to(device)
    if cfg.pretrained and resume_from is None:
        _load_pretrained(model, cfg, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    precision = autocast_dtype(cfg.precision, device)
    state = _TrainingState(
        model, norm, optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma),
        scaler=torch.amp.GradScaler(device.type) if precision is torch.float16 else None,
        precision=precision,
        noise_gen=torch.Generator(device=device).manual_seed(cfg.seed),
        shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1),
    )
    if resume_from is not None:  # multi-node: the run directory must be on a shared filesystem
        _restore(state, resume_from, cfg, device, objective)
    return state


def _restore(state: _TrainingState, path: Path, cfg: TrainConfig, device: torch.device, objective: Objective) -> None:
    """Load a checkpoint written by `_save` into `state`, refusing one of another architecture or dataset,
    or one trained with other settings (`_check_resumable`).

    The noise and global torch generators are not restored: they are reseeded every epoch."""
    saved = read_checkpoint(path, device)
    if saved.get("arch") != cfg.arch or saved.get("dataset") != cfg.dataset:
        raise SmoothAdvError(f"{path} was trained with {saved.get('arch')}/{saved.get('dataset')}, "
                             f"not {cfg.arch}/{cfg.dataset}; refusing to resume")
    _check_resumable(saved, path, cfg, objective)
    state.resumed_config = dict(saved["config"])
    state.model.load_state_dict(saved["state_dict"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.shuffle_gen.set_state(saved["rng"]["shuffle"].cpu())
    state.epoch = int(saved["epoch"])


def _plain(value: Any) -> Any:
    """A setting or objective description as JSON stores it (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def _check_resumable(saved: dict[str, Any], path: Path, cfg: TrainConfig, objective: Objective) -> None:
    """Refuse (SmoothAdvError, one line) to resume `saved` with settings that would change the run.

    Compared field by field: every setting that can change a result (`settings.row_settings`) but
    `epochs`, against the checkpoint's recorded `config` (a setting it does not record, being older
    than that setting, counts as that setting's default), and the objective's `describe()` at the
    last trained epoch against the checkpoint's `objective`. `epochs` may not be below the epochs
    already trained. See `RESUMABLE_CHANGES`.
    """
    recorded, done = saved.get("config"), int(saved.get("epoch", 0))
    if not isinstance(recorded, dict):
        raise SmoothAdvError(f"{path} records no training settings, so resuming it cannot be checked; start over "
                             "with --force or a new --out")
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    changed = []
    for name, value in row_settings(cfg).items():
        if name in RESUMABLE_CHANGES:
            continue
        before = recorded.get(name, fields[name].default)
        if _plain(before) != _plain(value):
            changed.append(f"{flag_name(fields[name])} {before!r} -> {value!r}")
    now = _plain(objective.at_epoch(max(done - 1, 0)).describe())
    then = _plain(saved.get("objective"))
    if isinstance(then, dict) and now.get("name") != then.get("name"):
        changed.append(f"--objective {then.get('name')} -> {now.get('name')}")
    elif isinstance(then, dict):  # its sigma is --sigma, compared above
        changed += [f"objective {key} {then.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(now) | set(then))
                    if key != "sigma" and now.get(key) != then.get(key)]
    if changed:
        raise SmoothAdvError(f"cannot resume {path}: that would change the run ({'; '.join(changed)}); on resume "
                             "only --epochs (to extend it), --device, --workers, --data-dir and --progress may "
                             "change: use the recorded settings, or start over with --force or a new --out")
    if cfg.epochs < done:
        raise SmoothAdvError(f"cannot resume {path} with --epochs {cfg.epochs}: it has already trained {done} epochs "
                             f"(pass --epochs {done} or more)")


def _history(out_dir: Path, state: _TrainingState, config: dict[str, Any]) -> list[dict[str, Any]]:
    """args.json's `history`: the earlier entries, plus one for this run if it resumes a checkpoint,
    saying at which epoch and which `RESUMABLE_CHANGES` settings changed (e.g. a larger `epochs`)."""
    if state.resumed_config is None:
        return []
    try:
        earlier = json.loads((out_dir / "args.json").read_text()).get("history", [])
    except (OSError, ValueError, AttributeError):
        earlier = []
    changes = {name: [_plain(state.resumed_config.get(name)), _plain(config.get(name))]
               for name in sorted(RESUMABLE_CHANGES - {"resume", "force"})
               if _plain(state.resumed_config.get(name)) != _plain(config.get(name))}
    return [*(earlier if isinstance(earlier, list) else []), {"resumed_at_epoch": state.epoch, "changed": changes}]


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


def _epoch_batches(cfg: TrainConfig, data: _Data, ctx: Dist, shuffle_gen: torch.Generator, *, with_index: bool = False
                   ) -> tuple[Iterator[tuple[Tensor, ...]], Iterator[tuple[Tensor, Tensor]] | None]:
    """This rank's labelled batches (with their dataset indices if `with_index`) and extra (pseudo-labelled)
    batches of the epoch, both shuffled lazily by `shuffle_gen` (labelled first: its order is drawn at the
    first batch)."""
    labelled = batches(data.train, cfg.batch_size, shuffle=True, generator=shuffle_gen, workers=cfg.workers,
                       rank=ctx.rank, world=ctx.world, with_index=with_index)
    extra = (batches(data.extra, cfg.batch_size, shuffle=True, generator=shuffle_gen, rank=ctx.rank, world=ctx.world)
             if data.extra is not None else None)
    return labelled, extra


def _progress_bar(cfg: TrainConfig, epoch: int, steps: int, main: bool) -> Any:
    """The epoch's progress (rank 0): a bar on a terminal, else a plain line every 30 s (`progress.progress`)."""
    from .progress import progress

    return progress(steps, label=f"epoch {epoch + 1}/{cfg.epochs}", unit="batches", bars=cfg.progress, show=main,
                    leave=False)


# ------------------------------------------------------------------ rank 0's end of an epoch


class _EpochLog:
    """`log.tsv`: a header and one row per finished epoch (LOG_COLUMNS), rewritten whole and atomically.

    On resume the rows of the epochs already trained are kept and any later ones dropped."""

    def __init__(self, path: Path, epochs_done: int) -> None:
        self.path = path
        self.lines = ["\t".join(LOG_COLUMNS)]
        if epochs_done > 0 and path.exists():
            self.lines = path.read_text().splitlines()[: epochs_done + 1]

    def append(self, epoch: int, elapsed: float, lr: float, stats: dict[str, float], test: dict[str, float]) -> None:
        self.lines.append("\t".join(str(v) for v in (epoch, f"{elapsed:.1f}", f"{lr:.6g}", f"{stats['loss']:.4f}",
                                                      f"{stats['acc']:.4f}", f"{test['loss']:.4f}",
                                                      f"{test['acc']:.4f}")))

    def write(self) -> None:
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


def _save(path: Path, cfg: TrainConfig, state: _TrainingState, classes: int, *, epochs_done: int,
          config: dict[str, Any], objective: Objective) -> None:
    """Write the checkpoint (models.save_checkpoint's format) with everything `_restore` reads."""
    save_checkpoint(path, state.model, arch=cfg.arch, dataset=cfg.dataset, normalization=state.normalization,
                    sigma=cfg.sigma, num_classes=classes, epoch=epochs_done, optimizer=state.optimizer.state_dict(),
                    scheduler=state.scheduler.state_dict(),
                    scaler=state.scaler.state_dict() if state.scaler else None,
                    rng={"noise": state.noise_gen.get_state(), "shuffle": state.shuffle_gen.get_state(),
                         "torch": torch.get_rng_state()},
                    config=config, objective=objective.describe())


def _refuse_divergence(model: nn.Module, stats: dict[str, float], epoch: int, ckpt_path: Path) -> None:
    """Stop the run (SmoothAdvError, one line) if the epoch's loss or any weight is NaN or infinite.

    Called before the epoch's checkpoint is written, so the last good checkpoint is never replaced
    by non-finite weights. Its inputs are the same on every rank (an all-reduced loss, replicas kept
    identical), so under torchrun every rank stops together."""
    weights_ok = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    if math.isfinite(stats["loss"]) and weights_ok:
        return
    kept = (f"{ckpt_path} still holds epoch {epoch}, the last good one" if epoch > 0 else
            "no checkpoint was written by this run")
    raise SmoothAdvError(f"training diverged in epoch {epoch + 1} (loss {stats['loss']:.4g}"
                         f"{'' if weights_ok else ', non-finite weights'}): {kept}; lower --lr (or --sigma) and "
                         "start over with --force or a new --out")


def _announce(epoch: int, epochs: int, stats: dict[str, float], test: dict[str, float], elapsed: float) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"epoch {epoch + 1}/{epochs}  loss {stats['loss']:.4f}  train acc {stats['acc']:.3f}  "
               f"noisy test acc {test['acc']:.3f}  ({elapsed:.0f}s)")
