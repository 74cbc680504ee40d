"""One training loop for every objective (Gaussian augmentation, SmoothAdv, ...).

`fit(cfg, objective)` trains `Sequential(normalization, network)` with SGD (momentum 0.9, weight
decay 1e-4) and a step learning-rate schedule, Cohen et al.'s recipe, and writes into
`cfg.out_dir`: `checkpoint.pth.tar` (atomically, every epoch, with optimizer, scheduler, epoch
and RNG states so `resume=True` continues exactly), `log.tsv` (one row per epoch), `args.json`
and `env.json`. Optional: fine-tuning from a pretrained checkpoint (head replaced when the class
count differs) and self-training on an extra pseudo-labelled .npz set mixed in batch by batch
with a loss weight (Salman et al. 2019, Section 4.2 and Appendix; Carmon et al. 2019).

Under torchrun (`torchrun --nproc-per-node K -m smoothadv train ...`) the same loop runs data
parallel: DistributedDataParallel, `cfg.batch_size` is the global batch (B / K per process), each
rank takes a disjoint share of every global batch, noise streams are seeded per (epoch, rank), rank
0 alone evaluates, logs and writes checkpoints, and a restarted worker group resumes from the last
checkpoint. See `distributed.py` for the exact conventions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .accel import autocast_dtype
from .data import NpzDataset, TensorImageDataset, get_dataset, input_shape, num_classes
from .distributed import all_reduce_sum, derive_seed, restarted, setup, shard_order, teardown
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
from .objectives import NoiseSource, Objective, RankSlicedNoise
from .settings import TrainSettings
from .smoothing import eval_mode

CHECKPOINT = "checkpoint.pth.tar"
LOG_COLUMNS = ("epoch", "time", "lr", "train_loss", "train_acc", "test_loss", "test_acc_noisy")


TrainConfig = TrainSettings
"""The training settings (`settings.TrainSettings`; this name is kept for existing code)."""


def resolve_device(name: str | None) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device (checked)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SmoothAdvError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmoothAdvError("device cuda requested but CUDA is not available")
    return device


def _tensor_source(dataset: Dataset) -> tuple[TensorImageDataset, Tensor] | None:
    if isinstance(dataset, TensorImageDataset):
        return dataset, torch.arange(len(dataset))
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImageDataset):
        return dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(dataset, NpzDataset):
        return dataset.inner, torch.arange(len(dataset))
    return None


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            workers: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (images, labels) batches; in-memory datasets are sliced directly (no per-item Python).

    With `world` > 1 (torchrun), `batch_size` is the global batch and this yields rank `rank`'s
    disjoint share of each global batch of the same shuffled order (`distributed.shard_order`).
    """
    source = _tensor_source(dataset)
    if source is not None:
        inner, index = source
        if shuffle:
            index = index[torch.randperm(len(index), generator=generator)]
        for chunk in shard_order(index, batch_size, rank, world):
            images = inner.images[chunk]
            images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            yield images, inner.labels[chunk]
        return
    order = torch.randperm(len(dataset), generator=generator) if shuffle else torch.arange(len(dataset))  # type: ignore[arg-type]
    plan = [chunk.tolist() for chunk in shard_order(order, batch_size, rank, world)]
    yield from DataLoader(dataset, batch_sampler=plan, num_workers=workers)


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


def train_epoch(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                labelled: Iterator[tuple[Tensor, Tensor]], device: torch.device, *,
                extra: Iterator[tuple[Tensor, Tensor]] | None = None, extra_weight: float = 1.0,
                generator: NoiseSource = None, progress: Any = None, precision: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One epoch: for each loader batch (and, with `extra`, one extra batch after it, its loss scaled
    by `extra_weight`), split into `objective.steps_per_batch` chunks with one SGD step each.

    With `precision` (torch.bfloat16 or torch.float16) the objective, attack included, runs under
    autocast (noise is still drawn and added in float32); with `scaler` the loss is scaled for fp16.
    """
    model.train()
    seen, correct, loss_sum = 0, 0, 0.0

    def step(x: Tensor, y: Tensor, weight: float) -> None:
        nonlocal seen, correct, loss_sum
        for xc, yc in zip(x.chunk(objective.steps_per_batch), y.chunk(objective.steps_per_batch)):
            with torch.autocast(device.type, dtype=precision or torch.bfloat16, enabled=precision is not None):
                out = objective(model, xc, yc, generator)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out.loss * weight).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                (out.loss * weight).backward()
                optimizer.step()
            with torch.no_grad():
                loss_sum += float(out.loss) * len(yc)
                correct += int((out.logits.argmax(1) == out.targets).sum()) * len(yc) // len(out.targets)
                seen += len(yc)

    for x, y in labelled:
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True), 1.0)
        if extra is not None:
            batch = next(extra, None)
            if batch is not None:
                step(batch[0].to(device), batch[1].to(device), extra_weight)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}")
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)  # all ranks' examples (torchrun)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1)}


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
    from .files import OutputLock

    cfg.validate()
    warmup = getattr(objective, "warmup", 1)
    if warmup > cfg.epochs:
        raise SmoothAdvError(f"warm-up ({warmup} epochs) is longer than training ({cfg.epochs} epochs)")
    if env_world()[0] != 0:
        return _fit(cfg, objective)
    out_dir = Path(cfg.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmoothAdvError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from None
    with OutputLock(out_dir / CHECKPOINT):
        return _fit(cfg, objective)


def _fit(cfg: TrainConfig, objective: Objective) -> Path:
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    resume = cfg.resume or (restarted() and ckpt_path.exists())  # torchrun restarted us after a failure
    if ckpt_path.exists() and not (resume or cfg.force):
        raise SmoothAdvError(f"{ckpt_path} exists; pass --resume to continue training or --force to start over")

    classes = num_classes(cfg.dataset)
    train_set = _subset(get_dataset(cfg.dataset, "train", cfg.data_dir, augment=True), cfg.train_subset)
    test_set = _subset(get_dataset(cfg.dataset, "test", cfg.data_dir), cfg.eval_subset)
    if len(train_set) == 0:
        raise SmoothAdvError(f"the {cfg.dataset} training set is empty")
    extra_set = NpzDataset(cfg.unlabelled, input_shape(cfg.dataset), classes) if cfg.unlabelled else None
    ctx = setup(device)  # under torchrun: join the process group, use this process's GPU
    device, main = ctx.device, ctx.main
    if cfg.batch_size % ctx.world:
        raise SmoothAdvError(f"--batch {cfg.batch_size} is the global batch; it must be divisible by the "
                             f"{ctx.world} processes")

    torch.manual_seed(cfg.seed)
    norm = normalization_spec(cfg.dataset, cfg.normalization)
    model = build_model(cfg.arch, cfg.dataset, norm).to(device)
    if cfg.pretrained and not (resume and ckpt_path.exists()):
        _load_pretrained(model, cfg, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    precision = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision is torch.float16 else None
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    start_epoch = 0
    if resume and ckpt_path.exists():  # multi-node: the run directory must be on a shared filesystem
        state = read_checkpoint(ckpt_path, device)
        if state.get("arch") != cfg.arch or state.get("dataset") != cfg.dataset:
            raise SmoothAdvError(f"{ckpt_path} was trained with {state.get('arch')}/{state.get('dataset')}, "
                                 f"not {cfg.arch}/{cfg.dataset}; refusing to resume")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        shuffle_gen.set_state(state["rng"]["shuffle"].cpu())  # noise and torch RNGs are reseeded every epoch
        start_epoch = int(state["epoch"])
    train_model: nn.Module = model
    if ctx.active:  # DDP for the loss's forward/backward; attacks and evaluation use the plain `model`
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    if main:
        write_provenance(out_dir, {**config, "objective": objective.describe(), "world_size": ctx.world})
    log_path = out_dir / "log.tsv"
    log_lines = ["\t".join(LOG_COLUMNS)]
    if start_epoch > 0 and log_path.exists():
        log_lines = log_path.read_text().splitlines()[: start_epoch + 1]

    for epoch in range(start_epoch, cfg.epochs):
        epoch_objective = objective.at_epoch(epoch)
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        steps = num_batches(train_set, cfg.batch_size)
        # per-epoch streams from one seed, identical after a resume: the batch noise is shared by all ranks and
        # sliced by RankSlicedNoise (so it does not depend on K); other randomness is per (epoch, rank)
        noise_gen.manual_seed(derive_seed(cfg.seed, epoch, 0))
        noise = RankSlicedNoise(noise_gen, ctx.rank, ctx.world,
                                torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, epoch, ctx.rank, 2)))
        torch.manual_seed(derive_seed(cfg.seed, epoch, ctx.rank, 1))
        with tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and main),
                  leave=False, dynamic_ncols=True) as bar:
            extra_iter = (batches(extra_set, cfg.batch_size, shuffle=True, generator=shuffle_gen,
                                  rank=ctx.rank, world=ctx.world)
                          if extra_set is not None else None)
            stats = train_epoch(train_model, epoch_objective, optimizer,
                                batches(train_set, cfg.batch_size, shuffle=True, generator=shuffle_gen,
                                        workers=cfg.workers, rank=ctx.rank, world=ctx.world),
                                device, extra=extra_iter, extra_weight=cfg.unlabelled_weight,
                                generator=noise, progress=bar, precision=precision, scaler=scaler)
        scheduler.step()
        if not main:  # rank 0 evaluates, logs and saves; the others go on (they wait at the next all-reduce)
            continue
        test = evaluate_noisy(model, test_set, cfg.sigma, device,
                              generator=torch.Generator(device=device).manual_seed(cfg.seed + 7))
        elapsed = time.time() - started
        log_lines.append("\t".join(str(v) for v in (epoch + 1, f"{elapsed:.1f}", f"{lr:.6g}", f"{stats['loss']:.4f}",
                                                     f"{stats['acc']:.4f}", f"{test['loss']:.4f}",
                                                     f"{test['acc']:.4f}")))
        save_checkpoint(ckpt_path, model, arch=cfg.arch, dataset=cfg.dataset, normalization=norm, sigma=cfg.sigma,
                        num_classes=classes, epoch=epoch + 1, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                        rng={"noise": noise_gen.get_state(), "shuffle": shuffle_gen.get_state(),
                             "torch": torch.get_rng_state()},
                        config=config, objective=epoch_objective.describe())
        atomic_write_text(log_path, "\n".join(log_lines) + "\n")
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  train acc {stats['acc']:.3f}  "
                       f"noisy test acc {test['acc']:.3f}  ({elapsed:.0f}s)")
    teardown(ctx)
    return ckpt_path
