"""torchrun worker for tests/e2e/test_distributed.py (not a test module itself).

Run as `torchrun --nproc-per-node 2 tests/_ddp_worker.py OUT first`, then (after it fails, as it
must) `... OUT resume`. The first launch trains on the synthetic dataset with gloo, in one group:

1. `OUT/k2_s0`: sigma = 0, 2 epochs, recording the dataset positions each rank trains on and each
   rank's final model replica, which must be the plain model (`OUT/rank{r}.pt`); then one
   `distributed.sync_replicas` on a batch-norm model after a backward on different data per rank,
   recording gradients and buffers before and after (`OUT/sync{r}.pt`);
2. `OUT/k2_full`: sigma = 0.25, 2 epochs, uninterrupted;
3. `OUT/k2_crash`: the same as 2, but rank 1 dies (os._exit) after one step of epoch 2, so the
   launch fails. The `resume` launch continues `OUT/k2_crash` with resume=True from the epoch-1
   checkpoint (what torchrun's --max-restarts does automatically: TORCHELASTIC_RESTART_COUNT > 0
   turns on resume). The epochs each launch ran are written to `OUT/{phase}-rank{r}.json`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import smoothadv.data as data
import smoothadv.train as train
from smoothadv.distributed import broadcast_model, sync_replicas
from smoothadv.objectives import GaussianAugmentation
from smoothadv.settings import TrainSettings
from smoothadv.train import fit

out = Path(sys.argv[1])
rank, phase = int(os.environ["RANK"]), sys.argv[2]
dist.init_process_group("gloo")
torch.set_num_threads(1)


def config(name: str, epochs: int, resume: bool = False, sigma: float = 0.25) -> TrainSettings:
    return TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=out / name, epochs=epochs, batch_size=64,
                         lr=0.05, lr_step=1, lr_gamma=0.5, eval_subset=32, progress=False, resume=resume, sigma=sigma)


seen: list[list[int]] = []
trained: list[nn.Module] = []
original_shard_order, original_train_epoch = data.shard_order, train.train_epoch


def recording_shard_order(order, batch_size, rank_, world):  # type: ignore[no-untyped-def]
    for chunk in original_shard_order(order, batch_size, rank_, world):
        if world > 1:  # not rank 0's single-process evaluation
            seen.append(chunk.tolist())
        yield chunk


def recording_train_epoch(model, *args, **kwargs):  # type: ignore[no-untyped-def]
    trained.append(model)  # this rank's replica, as the objective receives it
    return original_train_epoch(model, *args, **kwargs)


if phase == "first":
    data.shard_order, train.train_epoch = recording_shard_order, recording_train_epoch
    fit(config("k2_s0", 2, sigma=0.0), GaussianAugmentation(0.0))
    data.shard_order, train.train_epoch = original_shard_order, original_train_epoch
    assert all(type(m) is nn.Sequential for m in trained), [type(m) for m in trained]  # never a DDP wrapper
    torch.save({"seen": seen, "state": trained[-1].state_dict()}, out / f"rank{rank}.pt")
    torch.manual_seed(rank)  # replicas that start different
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    broadcast_model(bn)
    start = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(10 + rank))).square().sum().backward()
    own = {name: p.grad.clone() for name, p in bn.named_parameters()}  # type: ignore[union-attr]
    own_buffers = {k: v.clone() for k, v in bn.named_buffers()}
    sync_replicas(bn)
    torch.save({"start": start, "own": own, "own_buffers": own_buffers, "buffers": dict(bn.named_buffers()),
                "synced": {name: p.grad for name, p in bn.named_parameters()}}, out / f"sync{rank}.pt")
    fit(config("k2_full", 2), GaussianAugmentation(0.25))

epochs_run: list[int] = []


def crashing_train_epoch(model, objective, optimizer, labelled, *args, **kwargs):  # type: ignore[no-untyped-def]
    epochs_run.append(len(epochs_run))

    def batches():  # type: ignore[no-untyped-def]
        for step, batch in enumerate(labelled):
            if phase == "first" and rank == 1 and len(epochs_run) == 2 and step == 1:
                os._exit(1)  # die mid-epoch 2, after one synchronised step
            yield batch

    return original_train_epoch(model, objective, optimizer, batches(), *args, **kwargs)


train.train_epoch = crashing_train_epoch
(out / f"{phase}-rank{rank}.json").write_text(json.dumps({"started": True}))
fit(config("k2_crash", 2, resume=phase == "resume"), GaussianAugmentation(0.25))
(out / f"{phase}-rank{rank}.json").write_text(json.dumps({"epochs_run": len(epochs_run)}))
dist.destroy_process_group()
