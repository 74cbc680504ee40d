"""torch.distributed plumbing for `smoothadv train` under torchrun: ranks, sharding, seeds, replica sync.

Conventions (used by `train.fit`):

- A run is distributed when torchrun's environment is present (`WORLD_SIZE` > 1, with `RANK`,
  `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). `setup` joins the process group: NCCL when the
  device is a GPU (one GPU per process, `cuda:LOCAL_RANK`), gloo on CPU.
- Batch size: `--batch B` is the *global* batch. Each of K processes takes B / K examples of every
  global batch (B must be divisible by K), so the optimisation (learning rate, schedule) is the same
  whatever K. Each epoch's shuffled order is identical on all ranks (one shuffle generator, same
  seed); rank r takes positions r, r + K, r + 2K, ... of each global batch, so ranks see disjoint
  examples. As in `torch.utils.data.DistributedSampler`, an epoch whose length N is not a multiple
  of K is padded with the first (-N mod K) examples of its order (at most K - 1 repeats per epoch).
- Noise: at the start of every epoch each rank seeds a generator with `derive_seed(s, epoch, 0)`
  (the same on all ranks) and draws the noise of the whole global batch, keeping its own rows
  (`RankSlicedNoise`): every example gets the same noise whatever K, so training results do not
  depend on K (up to floating point and per-process batch-norm batch statistics), and a resumed run
  draws the same noise without saved generator states. Draws that are not one per example (attack
  random starts) use a per-(epoch, rank) generator.
- Replicas, without a model wrapper: every rank holds a plain `nn.Module` replica, and objectives,
  attacks and evaluation all use it as is. Replicas are made equal once (`broadcast_model`, rank 0's
  parameters and buffers, as DistributedDataParallel's constructor does) and kept equal by one call
  between every backward and optimizer step (`sync_replicas`): each gradient becomes the mean over
  ranks (one flattened all-reduce, scaled by 1/K before summing, as DDP does) and each buffer takes
  rank 0's value (one flattened broadcast, DDP's `broadcast_buffers`). So every rank takes the same
  optimizer step. Why not DDP: its wrapper must run the loss's forward, so every objective would
  have to know about it (SmoothAdv's attack had to run on the unwrapped module, or DDP's reducer
  waits for gradients that never come). Without it, objectives never see distributed code. The
  cost is that communication no longer overlaps the backward pass (one all-reduce after it).
  The updates are DDP's: measured with K = 2 on CPU (gloo), Gaussian and SmoothAdv training give
  bit-identical weights to the DDP version. One difference: a model with batch norm whose objective
  runs eval-mode passes (SmoothAdv's attack) now sees rank 0's running statistics on every rank,
  where under DDP ranks other than 0 saw their own until the next forward; the weights then differ
  from the DDP version's by about 3e-4 after one epoch (toy batch-norm CNN, synthetic data), less
  than K = 2 differs from K = 1 either way (8e-3, per-process batch statistics).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import SmoothAdvError

__all__ = [
    "Dist", "RankSlicedNoise", "all_reduce_sum", "broadcast_model", "env_world", "local_device", "replicated",
    "restarted", "setup", "shard_order", "sync_replicas", "teardown",
]


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise SmoothAdvError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise SmoothAdvError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def restarted() -> bool:
    """True when torchrun restarted this worker group after a failure (TORCHELASTIC_RESTART_COUNT > 0)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # whether `setup` created the process group (and `teardown` destroys it)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def local_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    """Under torchrun, a bare 'cuda' device means this process's GPU, cuda:LOCAL_RANK."""
    if world > 1 and device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise SmoothAdvError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        return torch.device("cuda", local_rank)
    return device


def setup(device: torch.device) -> Dist:
    """Join torchrun's process group (NCCL for GPUs, gloo for CPU) if WORLD_SIZE > 1; else a 1-process Dist."""
    import torch.distributed as dist

    rank, world, local = env_world()
    if world == 1:
        return Dist(device=device)
    device = local_device(device, local, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise SmoothAdvError(f"cannot join the torchrun process group ({backend}): "
                                 f"{str(exc).splitlines()[0]}") from None
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise SmoothAdvError("the process group does not match RANK/WORLD_SIZE")
    return Dist(rank, world, local, device, owns)


def teardown(ctx: Dist) -> None:
    """Wait for every rank, then leave the process group if `setup` created it."""
    import torch.distributed as dist

    if ctx.active and dist.is_initialized():
        dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()


def replicated() -> bool:
    """True inside an initialized torch.distributed process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum `values` over all ranks (identity outside a distributed run)."""
    import torch.distributed as dist

    if not replicated():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _by_dtype(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())


def _broadcast_from_rank0(tensors: Iterable[Tensor]) -> None:
    """Overwrite `tensors` in place with rank 0's values: one flattened broadcast per dtype."""
    import torch.distributed as dist

    for group in _by_dtype(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        for tensor, part in zip(group, flat.split([t.numel() for t in group])):
            tensor.detach().copy_(part.view_as(tensor))


def broadcast_model(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (no-op outside a distributed run).

    Called once before training, as DistributedDataParallel's constructor does: afterwards the
    replicas are bit-identical whatever each rank built or loaded.
    """
    if replicated():
        _broadcast_from_rank0([*model.parameters(), *model.buffers()])


def sync_replicas(model: nn.Module) -> None:
    """Between backward and the optimizer step: make this step identical on every rank (no-op outside
    a distributed run).

    Each parameter gradient becomes the mean over the K ranks: one flattened all-reduce per dtype,
    each rank's gradients multiplied by 1/K before summing, as DistributedDataParallel does, so the
    result is DDP's up to the order of the sum over ranks (the same for K = 2). Each buffer
    (batch-norm running statistics) takes rank 0's value, as DDP's `broadcast_buffers` does. Parameters
    whose `.grad` is None are left alone; every rank must have gradients for the same parameters,
    which holds because all ranks run the same code.
    """
    import torch.distributed as dist

    if not replicated():
        return
    world = dist.get_world_size()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for group in _by_dtype(grads):
        flat = torch.cat([g.reshape(-1) for g in group]).mul_(1.0 / world)
        dist.all_reduce(flat)
        for grad, part in zip(group, flat.split([g.numel() for g in group])):
            grad.copy_(part.view_as(grad))
    _broadcast_from_rank0(model.buffers())


def shard_order(order: Tensor, batch_size: int, rank: int, world: int) -> Iterator[Tensor]:
    """This rank's part of each global batch of `order` (a permutation of dataset positions).

    The order is padded with its own first elements to a multiple of `world` (at most world - 1
    repeats, as DistributedSampler does), cut into global batches of `batch_size`, and rank r takes
    positions r, r + world, ... of each, so every rank gets batch_size / world examples per step
    (fewer in the last step, but the same number on every rank) and ranks are disjoint unless padded.
    """
    if world == 1:
        yield from order.split(batch_size)
        return
    if batch_size % world != 0:
        raise SmoothAdvError(f"the batch size ({batch_size}) is the global batch and must be divisible by the "
                             f"number of processes ({world})")
    if len(order) == 0:
        return
    pad = (-len(order)) % world
    if pad:
        order = torch.cat([order, order.repeat(pad // len(order) + 1)[:pad]])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size][rank::world]


class RankSlicedNoise:
    """Training noise for one rank's share of a global batch, independent of the number of ranks.

    Every rank holds `shared`, seeded identically, and draws the noise of the *whole* global batch,
    keeping rows rank, rank + world, ... : exactly the batch rows this rank trains on (see
    `shard_order`). So K processes draw the same noise per example as one process, and training
    gives the same result whatever K, up to floating point (and batch-norm batch statistics, which
    are per process). `local` is a per-rank generator for draws that do not follow batch rows (an
    attack's random start or zero-gradient fallback). It satisfies `noise.RowNoise`.
    """

    def __init__(self, shared: torch.Generator, rank: int = 0, world: int = 1,
                 local: torch.Generator | None = None) -> None:
        self.shared, self.rank, self.world = shared, rank, world
        self.local = local if local is not None else shared

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """N(0, 1) draws of `shape`: rows rank, rank + world, ... of a (shape[0] * world, ...) draw."""
        full = torch.randn((shape[0] * self.world, *shape[1:]), device=device, dtype=dtype, generator=self.shared)
        return full[self.rank::self.world]
