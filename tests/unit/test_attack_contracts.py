"""The attacks against references written here from their papers, and their contract at its edges.

PGD (Salman et al. 2019, SmoothAdv_PGD: normalized-gradient steps of 2 eps / T, clamp to [0, 1], projection
on the eps-ball), its gradient-free variant (the Stein estimate -(1/m) sum_i F_y(x + delta_i) delta_i of
`SoftSmoothed.ascent_direction`) and DDN (Rony et al. 2019 as Salman et al. adapted it: a norm budget that
shrinks by 1 - gamma while adversarial and grows by 1 + gamma otherwise, cosine-annealed steps,
quantization to 256 levels, the smallest adversarial perturbation kept) are recomputed step by step and
compared with the library's result; the contract (eps-ball, box, eps = 0 returns x without a model call,
modes restored, the DDN defaults of `build_attack`) is checked where it can break.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoothadv.attacks import DDN, PGDL2, SteinPGDL2, build_attack, project
from smoothadv.errors import SmoothAdvError
from smoothadv.smoothing import SoftSmoothed

SHAPE = (1, 4, 4)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model.double()


def make_batch(batch: int = 5, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *SHAPE), generator=gen, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, 3, (batch,), generator=gen)
    return x, y


def norms(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def ball(t: Tensor, eps: float) -> Tensor:
    n = norms(t).view(-1, 1, 1, 1)
    return t * torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))


def reference_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step: float) -> Tensor:
    delta = torch.zeros_like(x)
    for _ in range(steps):
        point = (x + delta).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(point), y, reduction="sum"), point)
        delta = delta + step * grad / norms(grad).view(-1, 1, 1, 1)
        delta = ball((x + delta).clamp(0, 1) - x, eps)
    return x + delta


@pytest.mark.parametrize("eps, steps, step_size", [(0.5, 4, None), (1.5, 3, None), (0.3, 5, 0.2)])
def test_pgd_is_salmans_projected_normalized_ascent(eps: float, steps: int, step_size: float | None) -> None:
    model, (x, y) = make_model(), make_batch()
    ours = PGDL2(eps=eps, steps=steps, step_size=step_size)(model, x, y)
    step = step_size if step_size is not None else 2 * eps / steps
    expected = reference_pgd(model, x, y, eps, steps, step)
    assert torch.allclose(ours, expected, atol=1e-10)
    assert float(norms(ours - x).max()) <= eps * (1 + 1e-12)
    assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    # the attack raises the loss it attacks
    with torch.no_grad():
        assert float(F.cross_entropy(model(ours), y)) > float(F.cross_entropy(model(x), y))


def test_pgd_random_start_stays_in_the_ball_and_depends_on_the_generator() -> None:
    model, (x, y) = make_model(), make_batch()
    attack = PGDL2(eps=0.4, steps=1, random_start=True)
    a = attack(model, x, y, torch.Generator().manual_seed(0))
    b = attack(model, x, y, torch.Generator().manual_seed(0))
    c = attack(model, x, y, torch.Generator().manual_seed(1))
    plain = PGDL2(eps=0.4, steps=1)(model, x, y)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, plain)
    assert float(norms(a - x).max()) <= 0.4 * (1 + 1e-12)


def test_projection_clamps_then_scales_into_the_ball() -> None:
    x = torch.tensor([[[[0.9, 0.5]]], [[[0.2, 0.2]]]], dtype=torch.float64)
    delta = torch.tensor([[[[0.5, 0.0]]], [[[0.03, -0.04]]]], dtype=torch.float64)
    out = project(x, delta, 0.05)
    # image 0: clamped to 0.1 (box), then scaled to 0.05; image 1: norm 0.05, kept
    assert torch.allclose(out[0], torch.tensor([[[0.05, 0.0]]], dtype=torch.float64))
    assert torch.allclose(out[1], delta[1])
    assert torch.equal(project(x, torch.zeros_like(x), 0.0), torch.zeros_like(x))


def test_eps_zero_returns_x_without_calling_the_model() -> None:
    x, y = make_batch()

    def model(_: Tensor) -> Tensor:
        raise AssertionError("called")

    for attack in (PGDL2(eps=0.0, steps=3), DDN(eps=0.0, steps=3)):
        assert attack(model, x, y) is x


def test_attacks_restore_every_submodule_mode_and_attack_in_eval_mode() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), nn.Flatten(), nn.Linear(16, 3)).double()
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    x, y = make_batch()
    for attack in (PGDL2(eps=0.3, steps=2), DDN(eps=0.3, steps=2)):
        seen.clear()
        attack(model, x, y)
        assert seen and not any(seen)
        assert [m.training for m in model.modules()] == [True, True, True, False]


def test_stein_pgd_follows_the_stein_direction_of_the_smoothed_classifier() -> None:
    model, (x, y) = make_model(2), make_batch(4)
    noise = torch.randn((4, 6, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3
    smoothed = SoftSmoothed(model, noise)
    eps, steps = 0.6, 3
    ours = SteinPGDL2(eps=eps, steps=steps)(smoothed, x, y)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        with torch.no_grad():
            rows = (x + delta)[:, None] + noise
            probs = F.softmax(model(rows.reshape(-1, *SHAPE)), 1).view(4, 6, -1)
            p_y = probs[torch.arange(4), :, y]  # (B, m)
            direction = -(p_y.view(4, 6, 1, 1, 1) * noise).mean(1)
        delta = ball((x + delta + 2 * eps / steps * direction / norms(direction).view(-1, 1, 1, 1)).clamp(0, 1) - x,
                     eps)
    assert torch.allclose(ours, x + delta, atol=1e-10)
    with pytest.raises(SmoothAdvError):
        SteinPGDL2(eps=0.5, steps=2)(model, x, y)


def reference_ddn(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, gamma: float, init: float,
                  levels: int = 256, quantize: bool = True, box: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """DDN as SmoothAdv adapted it, written out for a box [lo, hi] (None: no box, no cap, no rounding)."""
    b = x.shape[0]

    def q(d: Tensor) -> Tensor:
        if not quantize or box is None:
            return d
        lo, span = box[0], box[1] - box[0]
        return ((x + d - lo) / span * (levels - 1)).round() / (levels - 1) * span + lo - x

    def clamp(d: Tensor) -> Tensor:
        return d if box is None else (x + d).clamp(*box) - x

    delta = torch.zeros_like(x)
    budget = torch.full((b,), init, dtype=x.dtype)
    # the largest perturbation the box allows: every pixel pushed to its farther edge
    cap = norms(torch.maximum(x - box[0], box[1] - x)) if box is not None else torch.full((b,), math.inf)
    best, best_norm = torch.zeros_like(x), torch.full((b,), math.inf, dtype=x.dtype)
    for k in range(1, steps + 1):
        lr = 0.01 + 0.99 * (1 + math.cos(math.pi * k / steps)) / 2
        point = (x + delta).requires_grad_(True)
        logits = model(point)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), point)
        adversarial = logits.argmax(1) != y
        current = norms(delta)
        for i in range(b):
            if adversarial[i] and current[i] < best_norm[i]:
                best_norm[i], best[i] = current[i], delta[i]
        delta = delta + lr * grad / norms(grad).clamp_min(1e-12).view(-1, 1, 1, 1)
        budget = torch.minimum(torch.where(adversarial, budget * (1 - gamma), budget * (1 + gamma)), cap)
        delta = delta * (budget / norms(delta).clamp_min(1e-12)).view(-1, 1, 1, 1)
        delta = clamp(q(delta))
    out = ball(clamp(q(ball(clamp(best), eps))), eps)
    out[torch.isinf(best_norm)] = 0.0
    return x + out


@pytest.mark.parametrize("quantize", [True, False])
def test_ddn_is_the_adapted_decoupled_direction_and_norm_attack(quantize: bool) -> None:
    model, (x, y) = make_model(4), make_batch(8, seed=5)
    y[:5] = model(x[:5]).argmax(1)  # correctly classified: a short attack fails on some of them
    eps, steps, gamma, init = 0.8, 6, 0.1, 0.2
    ours = DDN(eps=eps, steps=steps, gamma=gamma, init_norm=init, quantize=quantize)(model, x, y)
    expected = reference_ddn(model, x, y, eps, steps, gamma, init, quantize=quantize)
    assert torch.allclose(ours, expected, atol=1e-9)
    moved = norms(ours - x)
    assert bool((moved > 0).any()) and bool((moved == 0).any())  # some examples found, some unchanged
    assert float(moved.max()) <= eps * (1 + 1e-12)
    assert bool((model(ours).argmax(1) != y)[moved > 0].all())


@pytest.mark.parametrize("box", [(0.0, 1.0), (-1.0, 1.0), (-3.0, 2.0), None])
def test_ddn_in_any_box_caps_its_norm_at_the_boxs_largest_perturbation(box: tuple[float, float] | None) -> None:
    """In a box [lo, hi] the norm budget never exceeds the largest perturbation the box allows (every pixel at its
    farther edge), steps are rounded to the box's grey levels and clamped to it; without a box there is no cap,
    rounding or clamp. A large initial norm makes the cap bind from the first step."""
    model, (x, y) = make_model(6), make_batch(8, seed=9)
    if box is not None:
        x = box[0] + (box[1] - box[0]) * x  # inside the box, away from its edges
    y[:4] = model(x[:4]).argmax(1)
    eps, steps, gamma, init = 1.5, 8, 0.2, 6.0
    ours = DDN(eps=eps, steps=steps, gamma=gamma, init_norm=init)(model, x, y, domain=box)
    expected = reference_ddn(model, x, y, eps, steps, gamma, init, box=box)
    assert torch.allclose(ours, expected, atol=1e-9)
    moved = norms(ours - x)
    assert bool((moved > 0).any())
    if box is not None:
        assert float(ours.min()) >= box[0] and float(ours.max()) <= box[1]


def test_build_attack_ddn_defaults_follow_salmans_rule() -> None:
    attack = build_attack("ddn", eps=0.5, steps=20)
    assert isinstance(attack, DDN)
    assert attack.gamma == pytest.approx(1 - (3 / 510 / 0.5) ** (1 / 20), rel=1e-12)
    assert attack.init_norm == 0.5
    tiny = build_attack("ddn", eps=0.0005, steps=20)
    assert tiny.init_norm == 1e-3 and tiny.gamma == 0.05
    pgd = build_attack("pgd", eps=0.25, steps=7)
    assert isinstance(pgd, PGDL2) and (pgd.eps, pgd.steps, pgd.step_length) == (0.25, 7, 0.5 / 7)
    assert isinstance(build_attack("pgd", eps=0.25, steps=7, gradient_free=True), SteinPGDL2)


def test_projection_clamps_to_the_unit_box_by_default_even_inside_the_ball() -> None:
    x = torch.tensor([[[[0.9, 0.05]]]], dtype=torch.float64)
    delta = torch.tensor([[[[0.5, -0.5]]]], dtype=torch.float64)
    out = project(x, delta, 10.0)  # the ball is not binding: only the box is
    assert torch.allclose(out, torch.tensor([[[[0.1, -0.05]]]], dtype=torch.float64))
    inside = torch.tensor([[[[0.03, 0.04]]]], dtype=torch.float64)
    assert torch.allclose(project(x, inside, 0.05), inside, atol=1e-15)  # norm eps: kept (up to x + d - x rounding)


def test_check_batch_accepts_a_batch_in_the_unit_box_and_refuses_anything_else() -> None:
    from smoothadv.attacks import check_batch

    x, y = make_batch(3)
    assert check_batch(x, y) == int(y.max())
    assert check_batch(x.flatten(1), y) == int(y.max())  # (B, features) is a batch
    assert check_batch(torch.zeros(2, 1, 2, 2), torch.tensor([0, 4])) == 4
    assert check_batch(torch.ones(2, 1, 2, 2), torch.tensor([1, 0])) == 1
    bad = [(x[0, 0, 0], y[:1]), (x[:0], y[:0]), (x.long(), y), ([0.5], y), (x, y.float()), (x, y.bool()),
           (x, y.to(torch.complex64)), (x, y[:2]), (x, y[0]), (x, [0, 1, 2]), (x + 1.0, y), (x - 1.0, y),
           (x.clone().fill_(float("nan")), y), (x, y - 5)]
    for xb, yb in bad:
        with pytest.raises(SmoothAdvError):
            check_batch(xb, yb)  # type: ignore[arg-type]


def test_check_batch_sees_one_value_out_of_place() -> None:
    """One pixel above the box, one below, one infinite, one negative label among valid ones: each is refused
    (the checks look at both ends of x and at the smallest label, not at a summary that hides one value)."""
    from smoothadv.attacks import check_batch

    x, y = make_batch(3)
    x = x.clamp(0.25, 0.75)
    assert check_batch(x, y, None) == int(y.max())
    for value, domain, match in [(1.5, (0.0, 1.0), "values in"), (-0.5, (0.0, 1.0), "values in"),
                                 (float("inf"), None, "NaN or Inf"), (float("-inf"), None, "NaN or Inf"),
                                 (float("nan"), None, "NaN or Inf")]:
        bad = x.clone()
        bad[1, 0, 0, 0] = value
        with pytest.raises(SmoothAdvError, match=match):
            check_batch(bad, y, domain)
    with pytest.raises(SmoothAdvError, match="labels must be >= 0"):
        check_batch(x, torch.tensor([2, -1, 0]))


def test_labels_the_model_does_not_have_are_refused_before_any_step() -> None:
    """A label >= K (the model's number of outputs) or a model that does not return (B, K) scores is a one-line
    SmoothAdvError at the first call, for every attack, not an IndexError from deep inside the loss."""
    model, (x, _) = make_model(), make_batch(3)
    for attack in (PGDL2(eps=0.3, steps=2), DDN(eps=0.3, steps=2)):
        with pytest.raises(SmoothAdvError, match="labels"):
            attack(model, x, torch.tensor([0, 3, 1]))
        assert attack(model, x, torch.tensor([0, 2, 1])).shape == x.shape  # K - 1 is a label

        def flat(z: Tensor) -> Tensor:
            return model(z).unsqueeze(1)

        with pytest.raises(SmoothAdvError, match="scores"):
            attack(flat, x, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("cls", [PGDL2, SteinPGDL2, DDN])
def test_attack_budgets_are_checked_when_made(cls) -> None:
    for kwargs in ({"eps": -0.1}, {"eps": float("inf")}, {"eps": float("nan")}, {"eps": 0.5, "steps": 0},
                   {"eps": 0.5, "steps": 1.5}):
        with pytest.raises(SmoothAdvError):
            cls(**kwargs)
    assert cls(eps=0.0, steps=1).eps == 0.0


def test_random_start_radius_is_uniform_in_the_ball() -> None:
    """The random start is at a uniform radius in [0, eps] in a random direction (steps of 1e-9 leave it there):
    over 400 examples the mean distance is eps / 2 within 5 standard errors (eps / sqrt(12 * 400))."""
    eps, count = 0.4, 400
    x = torch.full((count, *SHAPE), 0.5, dtype=torch.float64)  # the box never binds: every coordinate moves < 0.5
    y = torch.zeros(count, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    out = PGDL2(eps=eps, steps=1, step_size=1e-9, random_start=True)(model, x, y, torch.Generator().manual_seed(3))
    radius = norms(out - x)
    assert float(radius.max()) <= eps * (1 + 1e-9)
    assert abs(float(radius.mean()) - eps / 2) <= 5 * eps / math.sqrt(12 * count)


def test_ddn_settings_are_checked_and_defaults_are_salmans() -> None:
    assert (DDN(eps=0.5).steps, DDN(eps=0.5).gamma, DDN(eps=0.5).init_norm, DDN(eps=0.5).levels) == (10, 0.05, 1.0, 256)
    assert DDN(eps=0.5).quantize is True and PGDL2(eps=0.5).steps == 10 and PGDL2(eps=0.5).step_size is None
    for kwargs in ({"gamma": 0.0}, {"gamma": 1.0}, {"init_norm": 0.0}, {"init_norm": -1.0}):
        with pytest.raises(SmoothAdvError):
            DDN(eps=0.5, **kwargs)


def test_ddn_quantizes_to_its_levels_across_the_domain_box() -> None:
    """x + delta is rounded to `levels` evenly spaced values from lo to hi: 256 values of [0, 1] by default (the
    SmoothAdv code's k / 255), 5 values of [-1, 1] (-1, -0.5, 0, 0.5, 1); no box, no rounding."""
    x = torch.tensor([[0.1, 0.5, 0.9]], dtype=torch.float64)
    delta = torch.tensor([[0.0123, -0.2345, 0.0444]], dtype=torch.float64)
    grid = DDN(eps=1.0)._quantize(x, delta) + x
    assert torch.allclose(grid, torch.round((x + delta) * 255) / 255, atol=1e-12)
    five = DDN(eps=1.0, levels=5)
    out = five._quantize(x, delta, (-1.0, 1.0)) + x
    assert torch.allclose(out, torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64), atol=1e-12)
    shifted = five._quantize(x - 2.0, delta, (-3.0, 1.0)) + (x - 2.0)  # 5 values of [-3, 1]: step 1
    assert torch.allclose(shifted, torch.tensor([[-2.0, -2.0, -1.0]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(five._quantize(x, delta, None), delta)
    assert torch.equal(DDN(eps=1.0, quantize=False)._quantize(x, delta), delta)


def test_the_attack_factory_defaults_and_salmans_ddn_rule() -> None:
    """build_attack() is PGD at eps 0.5 with 10 steps; DDN's gamma follows Salman et al.'s prediction script,
    1 - (3/510/eps)^(1/T) (the norm may shrink from eps to 3/510 in T steps), and is 0.05 at eps <= 3/510 where
    that rule would give no step at all."""
    default = build_attack()
    assert type(default) is PGDL2 and (default.eps, default.steps) == (0.5, 10)
    ddn = build_attack("ddn", eps=0.5, steps=10)
    assert isinstance(ddn, DDN) and ddn.gamma == 1 - (3 / 510 / 0.5) ** (1 / 10) and ddn.init_norm == 0.5
    assert build_attack("ddn", eps=3 / 510, steps=10).gamma == 0.05
    assert build_attack("ddn", eps=3.5 / 510, steps=10).gamma == 1 - (3 / 510 / (3.5 / 510)) ** (1 / 10)
    assert build_attack("ddn", eps=0.001, steps=10).gamma == 0.05


def test_attack_settings_list_each_key_once_with_its_field_and_owners() -> None:
    """The flags the command line generates: one entry per recipe key with its field (default), its type and the
    attacks that have it; the name defaults to pgd and the gradient-free variant is off."""
    import dataclasses

    from smoothadv.attacks import attack_settings

    found = attack_settings()
    assert found["attack"][0].default == "pgd" and found["gradient_free"][0].default is False
    assert found["gradient_free"][2] == ("pgd",)
    assert found["eps"][2] == ("pgd", "ddn") and found["steps"][2] == ("pgd", "ddn")
    for key in ("eps", "steps", "random_start", "ddn_gamma"):
        assert isinstance(found[key][0], dataclasses.Field), key
    assert found["steps"][0].default == 10 and found["steps"][1] is int
    assert found["random_start"][2] == ("pgd",) and found["random_start"][0].default is False
