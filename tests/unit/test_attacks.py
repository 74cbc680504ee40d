"""PGD, gradient-free PGD and DDN (L2) against closed forms on linear classifiers, the contract, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearBinary
from torch import nn

from smoothadv.attacks import ATTACKS, DDN, PGDL2, GradientFreeModel, SteinPGDL2, get_attack, l2_norm
from smoothadv.errors import SmoothAdvError
from smoothadv.smoothing import SoftSmoothed


def _linear(dim: int = 16, seed: int = 0) -> LinearBinary:
    g = torch.Generator().manual_seed(seed)
    model = LinearBinary(torch.randn(1, 4, 4, generator=g), 0.0)  # unit w
    model.b = -float((0.5 * model.w).sum())  # the hyperplane passes through the grey image
    return model


def _center_batch(model: LinearBinary, margins: list[float]) -> torch.Tensor:
    """Images 0.5 + margin w, so that <w, x> + b = margin (inside [0, 1] for |margin| <= 0.5)."""
    return torch.stack([torch.full((1, 4, 4), 0.5) + m * model.w.detach() for m in margins])


def test_pgd_reaches_closed_form_optimum_on_smoothed_linear_classifier() -> None:
    # G_1(x) = E[sigmoid(<w, x + delta>)] is increasing in <w, x>, so the optimal L2 attack on the
    # label 1 moves every example by exactly eps against w: x* = x - eps w (box inactive here).
    model = _linear()
    x = _center_batch(model, [0.3, 0.05, -0.2])
    y = torch.ones(3, dtype=torch.long)
    noise = torch.randn(3, 8, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.25
    eps = 0.2
    x_adv = PGDL2(eps, steps=5)(SoftSmoothed(model, noise), x, y)
    expected = x - eps * model.w.detach()
    assert torch.allclose(x_adv, expected, atol=1e-5)
    # and it is optimal: the margin drops by exactly eps, the most an eps-ball allows for a unit w
    assert torch.allclose(model.margin(x_adv), model.margin(x) - eps, atol=1e-5)


def test_pgd_on_plain_linear_model_and_single_step_is_fgm() -> None:
    model = _linear(seed=3)
    x = _center_batch(model, [0.1, 0.4])
    y = torch.tensor([1, 1])
    x_adv = PGDL2(0.15, steps=1)(model, x, y)  # T = 1: one normalized step of 2 eps, clipped back to eps
    assert torch.allclose(x_adv, x - 0.15 * model.w.detach(), atol=1e-5)
    y0 = torch.tensor([0, 0])  # attacking label 0 moves towards +w
    assert torch.allclose(PGDL2(0.15, steps=3)(model, x, y0), x + 0.15 * model.w.detach(), atol=1e-5)


def test_ddn_finds_the_minimal_adversarial_and_returns_x_when_there_is_none() -> None:
    # Linear f: the smallest adversarial perturbation of an example with margin r > 0 is -r w (norm r).
    model = _linear(seed=2)
    x = _center_batch(model, [0.1, 0.2, 0.45])
    y = torch.ones(3, dtype=torch.long)
    eps = 0.3
    x_adv = DDN(eps, steps=40, init_norm=eps, quantize=False)(model, x, y)
    norms = l2_norm(x_adv - x)
    assert bool((model.margin(x_adv)[:2] < 0).all())      # margins < eps: broken ...
    assert torch.allclose(norms[:2], torch.tensor([0.1, 0.2]), atol=0.03)  # ... at about the minimal norm
    # margin 0.45 > eps: the adversarial DDN found outside the ball is scaled back to norm eps (as the original)
    assert torch.allclose(x_adv[2], x[2] - eps * model.w.detach()[0], atol=1e-5)
    # an example that cannot be made adversarial at all is returned unchanged
    robust = LinearBinary(model.w.detach().clone(), 100.0)
    assert torch.equal(DDN(eps, steps=5)(robust, x, y), x)


@pytest.mark.parametrize("attack", [PGDL2(0.7, 4), PGDL2(0.7, 3, random_start=True), PGDL2(2.0, 2),
                                    SteinPGDL2(0.7, 3), DDN(0.7, 6), DDN(0.3, 5, quantize=False)],
                         ids=repr)
def test_outputs_respect_box_and_ball(attack) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.rand(16, 3, 4, 4)
    x[:4] = x[:4].round()  # pixels on the box faces, where the clamp binds
    y = torch.randint(0, 4, (16,))
    noise = torch.randn(16, 3, 3, 4, 4) * 0.5
    x_adv = attack(SoftSmoothed(net, noise), x, y, torch.Generator().manual_seed(0))
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(l2_norm(x_adv - x).max()) <= attack.eps + 1e-6
    if isinstance(attack, PGDL2):  # a real attack: the loss goes up on average
        with torch.no_grad():
            before = F.cross_entropy(SoftSmoothed(net, noise)(x), y)
            assert float(F.cross_entropy(SoftSmoothed(net, noise)(x_adv), y)) > float(before)


class _ModeRecorder(nn.Module):
    """Records whether it was in train mode at each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return x


@pytest.mark.parametrize("attack", [PGDL2(0.5, 2, random_start=True), DDN(0.5, 3),
                                    SteinPGDL2(0.5, 2)], ids=repr)
def test_attacks_run_in_eval_mode_and_leave_the_model_as_it_was(attack) -> None:
    recorder = _ModeRecorder()
    net = nn.Sequential(recorder, nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(16, 4))
    net.train()
    net[2].weight.requires_grad_(False)
    net[4].eval()  # a submodule in its own mode keeps it
    flags = [p.requires_grad for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    stats = [t.clone() for t in net[3].buffers()]
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 4, (8,))
    target = SoftSmoothed(net, torch.randn(8, 2, 3, 4, 4) * 0.25) if isinstance(attack, SteinPGDL2) else net
    attack(target, x, y)
    assert recorder.seen and not any(recorder.seen)  # every forward pass of the attack in eval mode
    assert [m.training for m in net.modules()] == modes  # then every submodule's mode restored
    assert all(torch.equal(a, b) for a, b in zip(stats, net[3].buffers()))  # BatchNorm statistics untouched
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    net.eval()
    attack(target, x, y)
    assert not any(m.training for m in net.modules())
    recorder.seen.clear()
    PGDL2(0.5, 1)(lambda z: net.train()(z), x, y)  # a plain function is called as it is: train mode if it says so
    assert recorder.seen == [True]


@pytest.mark.parametrize("attack", [PGDL2, DDN, SteinPGDL2])
def test_the_torchattacks_habit_is_refused_with_what_to_write(attack) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    for make in (lambda: attack(net, eps=0.5), lambda: attack(net), lambda: attack(eps=net), lambda: attack(0.5, net),
                 lambda: attack(0.5, steps=net)):
        with pytest.raises(SmoothAdvError, match=rf"takes the model when it is called.*{attack.__name__}\(eps=0.5, "
                                                 r"steps=10\)\(model, x, y\)"):
            make()


def test_an_unbatched_image_is_refused() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    with pytest.raises(SmoothAdvError, match=r"pass x\[None\] and y\[None\]"):
        PGDL2(0.5, 2)(net, torch.rand(3, 4, 4), torch.tensor(1))


class _Spy:
    """A `Model` and a `GradientFreeModel` at once that records every use."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t)
        return t.flatten(1)[:, :4]

    def ascent_direction(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(t)
        return t


@pytest.mark.parametrize("cls", [PGDL2, SteinPGDL2, DDN])
def test_eps_zero_returns_x_without_using_randomness(cls) -> None:
    spy = _Spy()
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 4, (4,))
    generator = torch.Generator().manual_seed(5)
    state, global_state = generator.get_state(), torch.get_rng_state()
    extra = {"random_start": True} if cls is not DDN else {}
    out = cls(0.0, 3, **extra)(spy, x, y, generator)
    assert out is x and not spy.calls
    assert torch.equal(generator.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)


def test_more_noise_draws_do_not_weaken_the_attack_on_average() -> None:
    # A nonlinear base classifier at sigma = 0.5, where a single noise draw gives a poor gradient of G.
    # The true objective -log G_y(x_adv) is estimated with 2000 fresh draws shared by all attacks.
    # Averaged over 32 inputs and 3 attack seeds, m = 16 must be at least as strong as m = 1 (seeded,
    # deterministic; the tolerance 0.01 nats absorbs the Monte Carlo error of the final estimate).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 4))
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(32, 3, 4, 4)
    y = net(x).argmax(1)
    sigma, eps = 0.5, 0.5
    eval_noise = torch.randn(32, 2000, 3, 4, 4, generator=torch.Generator().manual_seed(99)) * sigma

    def objective(x_adv: torch.Tensor) -> float:
        return float(F.cross_entropy(SoftSmoothed(net, eval_noise)(x_adv), y))

    results = {}
    for m in (1, 16):
        values = []
        for seed in range(3):
            noise = torch.randn(32, m, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * sigma
            values.append(objective(PGDL2(eps, 4)(SoftSmoothed(net, noise), x, y)))
        results[m] = sum(values) / len(values)
    assert results[16] >= results[1] - 0.01
    assert results[16] > objective(x)  # and the attack works at all


def test_stein_ascent_direction_points_against_the_weight_vector_of_a_linear_classifier() -> None:
    # grad G_1 = E[delta F_1(x + delta)] / sigma^2 is parallel to w for a linear f; with 20000 draws the
    # estimate's cosine with -w exceeds 0.9 (seeded).
    model = _linear(seed=4)
    x = _center_batch(model, [0.0])
    noise = torch.randn(1, 20000, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    g = SoftSmoothed(model, noise).ascent_direction(x, torch.tensor([1]))
    cosine = F.cosine_similarity(g.flatten(1), -model.w.detach().flatten(1))
    assert float(cosine) > 0.9
    with pytest.raises(SmoothAdvError, match="gradient-free"):
        SteinPGDL2(0.5, 2)(model, x, torch.tensor([1]))


def test_ascent_direction_is_the_stein_estimate_over_the_fixed_draws() -> None:
    # -(1/m) sum_i softmax(f(x + delta_i))_y delta_i, written out draw by draw (Salman et al. 2019, Appendix)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 2])
    noise = torch.randn(2, 5, 3, 4, 4) * 0.5
    got = SoftSmoothed(net, noise).ascent_direction(x, y)
    with torch.no_grad():
        want = torch.stack([-sum(torch.softmax(net((x[b] + noise[b, i]).unsqueeze(0)), 1)[0, y[b]] * noise[b, i]
                                 for i in range(5)) / 5 for b in range(2)])
    assert torch.allclose(got, want, atol=1e-6) and got.grad_fn is None
    assert isinstance(SoftSmoothed(net, noise), GradientFreeModel) and not isinstance(net, GradientFreeModel)


def test_stein_attack_sees_the_model_only_through_ascent_direction() -> None:
    # any GradientFreeModel will do, even one that is not callable: a constant direction -w makes one step FGM
    model = _linear(seed=3)
    w = model.w.detach()
    x = _center_batch(model, [0.1, 0.4])

    class Oracle:
        def ascent_direction(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -w.expand_as(x_adv)

    x_adv = SteinPGDL2(0.15, steps=1)(Oracle(), x, torch.tensor([1, 1]))  # type: ignore[arg-type]
    assert torch.allclose(x_adv, x - 0.15 * w, atol=1e-5)


def test_stein_attack_never_backpropagates(monkeypatch) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4)).train()
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 4, (8,))
    noise = torch.randn(8, 4, 3, 4, 4) * 0.25

    def no_backprop(*args, **kwargs):
        raise AssertionError("the gradient-free attack called torch.autograd.grad")

    monkeypatch.setattr(torch.autograd, "grad", no_backprop)
    x_adv = SteinPGDL2(0.5, 3, random_start=True)(SoftSmoothed(net, noise), x, y, torch.Generator().manual_seed(0))
    assert float(l2_norm(x_adv - x).max()) <= 0.5 + 1e-6 and not torch.equal(x_adv, x)
    assert net.training and all(p.grad is None and p.requires_grad for p in net.parameters())


def test_attacks_know_nothing_about_smoothing() -> None:
    # the module docstring's promise: no import of smoothadv.smoothing, no attribute of the model read
    import ast
    from pathlib import Path

    import smoothadv.attacks as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert imported and not any("smoothing" in name for name in imported)
    assert "getattr" not in Path(module.__file__).read_text()
    # and the step length is not called alpha (the certificate's alpha is a probability)
    assert not any(hasattr(a, "alpha") for a in (PGDL2(0.5), SteinPGDL2(0.5), DDN(0.5)))


@pytest.mark.parametrize("make, message", [
    (lambda: PGDL2(-0.1), "eps"), (lambda: PGDL2(0.5, steps=0), "steps"), (lambda: DDN(-1.0), "eps"),
    (lambda: DDN(0.5, steps=0), "steps"), (lambda: DDN(0.5, gamma=1.5), "gamma"),
    (lambda: PGDL2(float("nan")), "eps"), (lambda: get_attack("fgsm"), "attack must be one of pgd, ddn"),
    (lambda: SteinPGDL2(0.5, step_size=0.0), "step size"), (lambda: SteinPGDL2(0.5, steps=0), "steps"),
])
def test_bad_hyperparameters_are_one_line_errors(make, message) -> None:
    with pytest.raises(SmoothAdvError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_registry_and_frozen() -> None:
    assert ATTACKS == {"pgd": PGDL2, "ddn": DDN} and get_attack("PGD") is PGDL2
    assert PGDL2(0.5, 4).step_length == pytest.approx(0.25)
    assert SteinPGDL2(0.5, 4).step_length == pytest.approx(0.25) and PGDL2(0.5, step_size=0.1).step_length == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        PGDL2(0.5).eps = 1.0  # type: ignore[misc]
