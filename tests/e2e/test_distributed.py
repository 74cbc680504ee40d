"""Distributed training: sharding of each epoch's order, per-rank seeds, replica sync, and a real two-process
gloo run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from smoothadv.data import make_synthetic
from smoothadv.distributed import shard_order
from smoothadv.errors import SmoothAdvError
from smoothadv.models import read_checkpoint
from smoothadv.objectives import GaussianAugmentation
from smoothadv.seeds import derive_seed
from smoothadv.settings import TrainSettings
from smoothadv.train import batches, fit

pytestmark = pytest.mark.slow  # two torchrun workers: tens of seconds

ROOT = Path(__file__).resolve().parents[2]


def test_shard_order_splits_each_global_batch_disjointly() -> None:
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    parts = [list(shard_order(order, 4, r, 2)) for r in range(2)]
    assert [len(c) for c in parts[0]] == [2, 2, 1] == [len(c) for c in parts[1]]
    for step in range(3):  # rank r takes positions r, r + 2 of global batch `step`
        glob = order[4 * step:4 * step + 4]
        assert parts[0][step].tolist() == glob[0::2].tolist()
        assert parts[1][step].tolist() == glob[1::2].tolist()
    assert sorted(torch.cat(parts[0] + parts[1]).tolist()) == list(range(10))


def test_shard_order_pads_like_distributed_sampler() -> None:
    order = torch.arange(7)
    parts = [torch.cat(list(shard_order(order, 6, r, 3))).tolist() for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]  # 7 -> 9 by repeating the first 2 of the order
    with pytest.raises(SmoothAdvError, match="divisible"):
        list(shard_order(order, 5, 0, 2))


class _Items(Dataset):
    """A non-tensor dataset (DataLoader path): item i is (tensor [i], i)."""

    def __len__(self) -> int:
        return 13

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return torch.tensor([float(i)]), i


@pytest.mark.parametrize("dataset", [_Items(), make_synthetic("train", size=13)])
def test_batches_shard_both_paths(dataset) -> None:
    per_rank = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(5)  # same shuffle seed on every rank
        per_rank.append([y.tolist() for _, y in batches(dataset, 4, shuffle=True, generator=gen, rank=rank, world=2)])
    assert [len(b) for b in per_rank[0]] == [2, 2, 2, 1] == [len(b) for b in per_rank[1]]
    if isinstance(dataset, _Items):  # labels are the indices: 13 -> 14 with one repeat, otherwise disjoint
        flat = sum(per_rank[0], []) + sum(per_rank[1], [])
        assert len(flat) == 14 and set(flat) == set(range(13))
        full = [y.tolist() for _, y in batches(dataset, 4, shuffle=True, generator=torch.Generator().manual_seed(5))]
        for step in range(3):  # each global batch of the single-process order is split between the ranks
            assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(full[step])


def test_derive_seed_is_deterministic_and_separates_keys() -> None:
    seeds = {derive_seed(0, e, r) for e in range(50) for r in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, 1, 2) == derive_seed(3, 1, 2) != derive_seed(3, 2, 1)
    assert derive_seed(0, 1) != derive_seed(0, 1, 0)


def _torchrun_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two torchrun launches of tests/_ddp_worker.py with two gloo CPU processes (see that file)."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun = Path(sys.executable).with_name("torchrun")
    for phase, expected in (("first", 1), ("resume", 0)):  # the first launch fails: rank 1 dies on purpose
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.2",
                               str(ROOT / "tests" / "_ddp_worker.py"), str(out), phase],
                              env=_torchrun_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == expected, proc.stderr[-3000:]
    return out


def _config(out: Path, sigma_name: str, sigma: float) -> TrainSettings:
    return TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=out / sigma_name, epochs=2, batch_size=64,
                         lr=0.05, lr_step=1, lr_gamma=0.5, eval_subset=32, progress=False, sigma=sigma)


def test_two_ranks_see_disjoint_data_and_keep_identical_models(ddp_run) -> None:
    rank0, rank1 = (torch.load(ddp_run / f"rank{r}.pt") for r in range(2))
    assert len(rank0["seen"]) == len(rank1["seen"]) == 16  # 512 / 64 = 8 global steps x 2 epochs
    for epoch in range(2):
        steps0, steps1 = rank0["seen"][8 * epoch:8 * epoch + 8], rank1["seen"][8 * epoch:8 * epoch + 8]
        assert all(len(a) == len(b) == 32 and not set(a) & set(b) for a, b in zip(steps0, steps1))
        assert sorted(sum(steps0, []) + sum(steps1, [])) == list(range(512))  # the epoch covers the set once
    assert rank0["seen"][:8] != rank0["seen"][8:]  # reshuffled each epoch
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    saved = read_checkpoint(ddp_run / "k2_s0" / "checkpoint.pth.tar")["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in rank0["state"].items())  # rank 0 saved the shared model


def _assert_one_process_matches(ddp_run: Path, tmp_path: Path, k1: str, k2: str, sigma: float) -> None:
    """Train with one process as the torchrun worker trained `k2` with two, and compare the weights."""
    fit(_config(tmp_path, k1, sigma), GaussianAugmentation(sigma))
    one = read_checkpoint(tmp_path / k1 / "checkpoint.pth.tar")["state_dict"]
    two = read_checkpoint(ddp_run / k2 / "checkpoint.pth.tar")["state_dict"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


def test_two_ranks_match_one_process(ddp_run, tmp_path) -> None:
    """sigma = 0 and no batch norm: K = 2 (global batch 64 = 2 x 32) is K = 1 up to float rounding."""
    _assert_one_process_matches(ddp_run, tmp_path, "k1_s0", "k2_s0", 0.0)
    log1 = (tmp_path / "k1_s0" / "log.tsv").read_text().splitlines()[1:]
    log2 = (ddp_run / "k2_s0" / "log.tsv").read_text().splitlines()[1:]
    for a, b in zip(log1, log2, strict=True):  # train loss/acc are all-reduced over both ranks
        fa, fb = a.split("\t"), b.split("\t")
        assert fa[2:5] == fb[2:5] or max(abs(float(x) - float(y)) for x, y in zip(fa[2:5], fb[2:5])) <= 2e-4


def test_rank_death_resumes_from_last_checkpoint(ddp_run) -> None:
    """Rank 1 dies mid-epoch 2; the relaunch redoes only epoch 2 and ends bit-identical to an uninterrupted run."""
    assert json.loads((ddp_run / "first-rank1.json").read_text()) == {"started": True}  # it did die
    assert json.loads((ddp_run / "resume-rank0.json").read_text()) == {"epochs_run": 1}
    assert json.loads((ddp_run / "resume-rank1.json").read_text()) == {"epochs_run": 1}
    crash = read_checkpoint(ddp_run / "k2_crash" / "checkpoint.pth.tar")
    full = read_checkpoint(ddp_run / "k2_full" / "checkpoint.pth.tar")
    assert crash["epoch"] == full["epoch"] == 2
    for key, value in full["state_dict"].items():
        assert torch.equal(crash["state_dict"][key], value), key
    assert (ddp_run / "k2_crash" / "log.tsv").read_text().count("\n") == 3


def test_two_ranks_match_one_process_with_noise(ddp_run, tmp_path) -> None:
    """sigma = 0.25: each example gets the same training noise whatever K (RankSlicedNoise), so K = 2 is K = 1."""
    _assert_one_process_matches(ddp_run, tmp_path, "k1_full", "k2_full", 0.25)


def test_rank_sliced_noise_is_the_single_process_noise() -> None:
    from smoothadv.distributed import RankSlicedNoise
    from smoothadv.noise import gaussian_noise

    x = torch.zeros(6, 1, 2, 2)
    whole = gaussian_noise(x, 0.5, RankSlicedNoise(torch.Generator().manual_seed(4)))
    parts = [gaussian_noise(x[r::3], 0.5, RankSlicedNoise(torch.Generator().manual_seed(4), r, 3)) for r in range(3)]
    for r in range(3):
        torch.testing.assert_close(parts[r], whole[r::3], rtol=0, atol=0)
    assert float(whole.std()) == pytest.approx(0.5, rel=0.5)  # it is noise at the right scale


def test_sync_replicas_averages_gradients_and_copies_rank0_buffers(ddp_run) -> None:
    """broadcast_model makes different replicas equal; sync_replicas gives each rank the mean gradient
    and rank 0's batch-norm statistics, so both ranks take the same optimizer step (see the worker)."""
    ranks = [torch.load(ddp_run / f"sync{r}.pt") for r in range(2)]
    for key, value in ranks[0]["start"].items():
        assert torch.equal(value, ranks[1]["start"][key]), key
    for name, own0 in ranks[0]["own"].items():
        own1 = ranks[1]["own"][name]
        assert not torch.equal(own0, own1)  # the ranks' data differ
        for r in range(2):
            assert torch.equal(ranks[r]["synced"][name], own0 * 0.5 + own1 * 0.5), name
    assert not torch.equal(ranks[0]["own_buffers"]["1.running_mean"], ranks[1]["own_buffers"]["1.running_mean"])
    for r in range(2):
        for key, value in ranks[0]["own_buffers"].items():
            assert torch.equal(ranks[r]["buffers"][key], value), key


def test_sync_replicas_is_a_no_op_outside_a_process_group() -> None:
    from smoothadv.distributed import broadcast_model, sync_replicas

    model = torch.nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    before = (model.weight.detach().clone(), model.weight.grad.clone())  # type: ignore[union-attr]
    broadcast_model(model)
    sync_replicas(model)
    assert torch.equal(model.weight, before[0]) and torch.equal(model.weight.grad, before[1])  # type: ignore[arg-type]
