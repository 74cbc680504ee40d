"""The SmoothAdv objective: reduction to Gaussian augmentation, warm-up, multi-noise, side effects, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from smoothadv.attacks import DDN, PGDL2
from smoothadv.data import get_dataset
from smoothadv.errors import SmoothAdvError
from smoothadv.models import build_model
from smoothadv.objectives import OBJECTIVES, GaussianAugmentation, SmoothAdv
from smoothadv.train import batches, train_epoch
from smoothadv.train import recipe as train_recipe


def _toy(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return build_model("toy_cnn", "synthetic")


def test_eps_zero_single_draw_is_exactly_gaussian_augmentation() -> None:
    model = _toy()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    gauss = GaussianAugmentation(0.5)(model, x, y, g1)
    adv = SmoothAdv(0.5, PGDL2(0.0, 3))(model, x, y, g2)
    assert torch.equal(gauss.loss, adv.loss) and torch.equal(gauss.logits, adv.logits)
    assert torch.equal(g1.get_state(), g2.get_state())  # same randomness consumed, so whole runs coincide
    # also after the warm-up schedule (eps 0 stays 0) and with DDN
    g3 = torch.Generator().manual_seed(7)
    assert torch.equal(SmoothAdv(0.5, DDN(0.0), warmup=3).at_epoch(0)(model, x, y, g3).loss, gauss.loss)


def test_warmup_gives_the_documented_eps_per_epoch() -> None:
    objective = SmoothAdv(0.25, PGDL2(1.0, 2), warmup=4)
    assert [objective.at_epoch(e).attack.eps for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert objective.attack.eps == 1.0  # frozen: at_epoch returns copies, the configured objective is unchanged
    ddn = SmoothAdv(0.25, DDN(0.5, 4, init_norm=1.0), warmup=2)
    assert [(o.attack.eps, o.attack.init_norm) for o in map(ddn.at_epoch, range(3))] == [
        (0.25, 0.25), (0.5, 0.5), (0.5, 0.5)]
    assert SmoothAdv(0.25, PGDL2(0.5)).at_epoch(0).attack.eps == 0.5  # warmup 1: no ramp


def test_multi_noise_trains_on_all_draws_with_the_attack_noise() -> None:
    # eps = 0 makes x_adv = x, so the training rows must be x + the m draws, in the generator's order
    model = _toy()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    objective = SmoothAdv(0.25, PGDL2(0.0), m=3, multi_noise=True)
    assert objective.steps_per_batch == 3 and SmoothAdv(0.25, PGDL2(0.0), m=3).steps_per_batch == 1
    out = objective(model, x, y, torch.Generator().manual_seed(1))
    noise = torch.randn((4, 3, 3, 8, 8), generator=torch.Generator().manual_seed(1)) * 0.25
    expected = model((x.unsqueeze(1) + noise).flatten(0, 1))
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert out.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.allclose(out.loss, F.cross_entropy(expected, out.targets), atol=1e-6)


def test_attack_runs_in_eval_mode_and_restores_train_mode_and_flags() -> None:
    seen = []

    class Spy(PGDL2):
        def __call__(self, model, x, y, generator=None):  # type: ignore[override]
            seen.append(model.base.training)
            return super().__call__(model, x, y, generator)

    model = _toy()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    out = SmoothAdv(0.25, Spy(0.5, 2), m=2)(model, torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    assert seen == [False] and model.training
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    out.loss.backward()  # the training loss has a graph through the parameters (not through the attack)
    assert all(p.grad is not None for p in model.parameters())


def test_adversarial_loss_is_higher_than_gaussian_loss_on_the_same_noise() -> None:
    model = _toy(1)
    train = get_dataset("synthetic", "train")
    x, y = next(batches(train, 64, shuffle=False))
    gauss = GaussianAugmentation(0.25)(model, x, y, torch.Generator().manual_seed(0))
    adv = SmoothAdv(0.25, PGDL2(0.5, 3), m=2)(model, x, y, torch.Generator().manual_seed(0))
    assert float(adv.loss.detach()) > float(gauss.loss.detach())


def test_one_epoch_of_smoothadv_training_lowers_the_loss() -> None:
    # The SmoothAdv loss on the synthetic training set, with the same fixed noise/attack seed, before and
    # after one epoch (lr 0.05): it must drop by at least 20% (seeded, deterministic).
    model = _toy(2)
    data = Subset(get_dataset("synthetic", "train"), range(256))
    objective = SmoothAdv(0.25, PGDL2(0.25, 2), m=2, multi_noise=True)

    def loss() -> float:
        total = 0.0
        for x, y in batches(data, 256, shuffle=False):
            total += float(objective(model, x, y, torch.Generator().manual_seed(3)).loss.detach()) * len(y)
        return total / len(data)

    before = loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stats = train_epoch(model, objective, optimizer,
                        batches(data, 64, shuffle=True, generator=torch.Generator().manual_seed(0)),
                        torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    after = loss()
    assert after < 0.8 * before, (before, after, stats)


def _recipe(**overrides) -> dict:
    values = dict(sigma=0.25, attack="pgd", eps=0.5, steps=2, m=2, multi_noise=False, warmup=1, random_start=False,
                  gradient_free=False, epochs=5, objective="smoothadv",
                  dataset="synthetic", out="unused")
    values.update(overrides)
    return values


def test_factory_and_registry() -> None:
    assert OBJECTIVES["smoothadv"] is SmoothAdv
    _, objective = train_recipe(_recipe(attack="ddn", m=4, multi_noise=True, warmup=5))
    assert objective == SmoothAdv(0.25, DDN(0.5, 2, gamma=0.05, init_norm=1.0), m=4, multi_noise=True, warmup=5)
    assert train_recipe(_recipe())[1].attack == PGDL2(0.5, 2)


@pytest.mark.parametrize("make, message", [
    (lambda: SmoothAdv(0.25, PGDL2(0.5), m=0), "m "),
    (lambda: SmoothAdv(0.25, PGDL2(0.5), warmup=0), "SmoothAdv warmup must be an integer >= 1"),
    (lambda: SmoothAdv(0.25, object()), "SmoothAdv's attack must be a dataclass"),
    (lambda: SmoothAdv(-0.1, PGDL2(0.5)), "sigma"),
    (lambda: train_recipe(_recipe(warmup=6, epochs=5)), "longer than training"),
    (lambda: train_recipe(_recipe(attack="cw")), "attack must be one of pgd, ddn"),
])
def test_bad_settings_are_one_line_errors(make, message) -> None:
    with pytest.raises(SmoothAdvError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_fit_refuses_a_warmup_longer_than_training(tmp_path) -> None:
    from smoothadv.settings import TrainSettings
    from smoothadv.train import fit

    cfg = TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=tmp_path / "run", epochs=2, progress=False)
    with pytest.raises(SmoothAdvError, match="warm-up"):
        fit(cfg, SmoothAdv(0.25, PGDL2(0.5), warmup=3))
    assert not (tmp_path / "run" / "checkpoint.pth.tar").exists()


def test_bf16_training_autocasts_the_attack_and_the_loss_and_still_learns() -> None:
    # Mixed precision (--precision bf16): every forward pass of the epoch, the attack's included, runs in
    # bf16 (seen by a hook on the convolution); the epoch lowers the float32 SmoothAdv loss by >= 20% like
    # the fp32 epoch of the test above, and its weights end close to (but not equal to) the fp32 run's.
    data = Subset(get_dataset("synthetic", "train"), range(256))
    objective = SmoothAdv(0.25, PGDL2(0.25, 2), m=2, multi_noise=True)

    def loss(model) -> float:
        x, y = next(batches(data, 256, shuffle=False))
        return float(objective(model, x, y, torch.Generator().manual_seed(3)).loss.detach())

    weights, dtypes = {}, []
    for precision in (None, torch.bfloat16):
        model = _toy(2)
        before = loss(model)
        hook = model[1].conv.register_forward_hook(lambda m, i, out, p=precision: dtypes.append((p, out.dtype)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_epoch(model, objective, optimizer,
                    batches(data, 64, shuffle=True, generator=torch.Generator().manual_seed(0)),
                    torch.device("cpu"), generator=torch.Generator().manual_seed(1), precision=precision)
        hook.remove()
        assert loss(model) < 0.8 * before, precision
        weights[precision] = model[1].conv.weight.detach().clone()
    seen = {p: {d for q, d in dtypes if q is p} for p in (None, torch.bfloat16)}
    assert seen[torch.bfloat16] == {torch.bfloat16}
    assert seen[None] == {torch.float32}
    difference = (weights[torch.bfloat16] - weights[None]).abs().max()
    assert 0 < difference < 0.1 * weights[None].abs().max()


def test_fp16_training_needs_a_gpu(tmp_path) -> None:
    from smoothadv.settings import TrainSettings
    from smoothadv.train import fit

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=tmp_path / "run", epochs=1, progress=False,
                      precision="fp16", device="cpu")
    with pytest.raises(SmoothAdvError, match="fp16 autocast needs a GPU"):
        fit(cfg, GaussianAugmentation(0.25))
    with pytest.raises(SmoothAdvError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=tmp_path / "r", precision="fp8")


def test_the_loop_contract_is_stated_and_enforced() -> None:
    """A researcher's own loop: objectives with a schedule refuse to run without `at_epoch`, the split into
    optimizer steps is `split`, and the properties document themselves."""
    from smoothadv.objectives import MACER, Consistency, Objective, SmoothMix

    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.randint(0, 3, (4,))
    for scheduled in (SmoothAdv(0.25, PGDL2(0.5, 1), warmup=3), MACER(0.25, m=2, deferred=2),
                      SmoothMix(0.25, m=2, steps=1, warmup=2)):
        with pytest.raises(SmoothAdvError, match=r"call it as objective.at_epoch\(epoch\)\(model, x, y\)"):
            scheduled(net, x, y)
        out = scheduled.at_epoch(0)(net, x, y)
        assert torch.isfinite(out.loss)
        assert "epoch" not in scheduled.at_epoch(0).describe()  # recorded checkpoints stay comparable
    # unscheduled objectives (warm-up 1, no deferred start) need no epoch
    assert torch.isfinite(SmoothAdv(0.25, PGDL2(0.5, 1))(net, x, y).loss)
    # warm-up: the epoch's eps is in the attack the objective of that epoch uses
    assert SmoothAdv(0.25, PGDL2(0.6, 1), warmup=3).at_epoch(0).attack.eps == pytest.approx(0.2)
    assert MACER(0.25, m=2, lbd=5.0, deferred=2).at_epoch(1).lbd == 0.0
    assert MACER(0.25, m=2, lbd=5.0, deferred=2).at_epoch(2).lbd == 5.0
    # the split into optimizer steps
    chunks = Consistency(0.25, m=2).split(x, y)
    assert len(chunks) == 2 and [tuple(c[0].shape) for c in chunks] == [(2, 3, 2, 2)] * 2
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert len(SmoothAdv(0.25, PGDL2(0.5, 1), m=4).split(x, y)) == 1  # one step unless multi-noise
    assert len(SmoothAdv(0.25, PGDL2(0.5, 1), m=4, multi_noise=True).split(x, y)) == 4
    assert "chunks" in (Objective.steps_per_batch.__doc__ or "") and "index" in (Objective.uses_index.__doc__ or "")
