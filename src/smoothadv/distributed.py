"""torch.distributed plumbing for `smoothadv train` under torchrun: ranks, sharding, seeds, reductions.

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
  (`objectives.RankSlicedNoise`): every example gets the same noise whatever K, so training results
  do not depend on K (up to floating point and per-process batch-norm statistics), and a resumed run
  draws the same noise without saved generator states. Draws that are not one per example (attack
  random starts) use a per-(epoch, rank) generator.
- Objectives receive the training model, which is `DistributedDataParallel`-wrapped under torchrun.
  Anything other than the training loss's forward/backward (for example SmoothAdv's attack) must
  run on `unwrap(model)`, because a DDP forward whose backward does not reach every parameter
  leaves DDP's gradient reducer waiting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import SmoothAdvError

_MASK = (1 << 63) - 1


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from `seed` and integer `keys` (splitmix64 mixing; distinct keys -> unrelated seeds)."""
    state = int(seed) & _MASK
    for key in (*keys, len(keys)):
        state = (state + 0x9E3779B97F4A7C15 + (int(key) & _MASK) * 0xD1B54A32D192ED03) & ((1 << 64) - 1)
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
        state = z ^ (z >> 31)
    return state & _MASK


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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel (or similar `.module`) wrapper; else `model`."""
    return getattr(model, "module", model)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum `values` over all ranks (identity outside a distributed run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


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
