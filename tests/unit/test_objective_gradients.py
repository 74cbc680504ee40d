"""Every training objective's loss AND parameter gradient against an independent reference written here.

The references follow the papers and the authors' released training code (the definitions quoted in each
objective's docstring): Cohen et al. 2019 (Gaussian augmentation), Salman et al. 2019 (SmoothAdv, with its
SmoothAdv_PGD written out here), Li et al. 2019 as in Jeong & Shin's `train_stab.py` (stability training),
Jeong & Shin 2020 (consistency regularization, its average prediction *not* detached), Zhai et al. 2020
(MACER, with its deferred start), Jeong et al. 2021 (SmoothMix, its attack, warm-up ramp and mixup target
written out here) and Jeong, Kim & Shin 2023 (CAT-RS, its KL_PGD attack on the noise written out here).

The random draws are shared: the objectives draw from a `RecordingNoise` (a `noise.RowNoise`), which keeps
every standard-normal draw, and the reference uses the recorded draws in their documented roles (noise
first, then the uniform draws Phi(z)). Nothing of `smoothadv.objectives` or `smoothadv.attacks` is used by a
reference. Each comparison: loss (relative 1e-5) and the flattened parameter gradient (cosine >= 1 - 1e-6
and max abs difference <= 1e-4 of the gradient's largest entry), at a warm-up epoch and after it, on batches
where each term of the loss is active (checked: masks neither all on nor all off, attacks moving the input).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoothadv.attacks import PGDL2
from smoothadv.objectives import (
    CATRS,
    MACER,
    Consistency,
    GaussianAugmentation,
    SmoothAdv,
    SmoothMix,
    StabilityTraining,
)

CLASSES = 4
SHAPE = (1, 4, 4)


class RecordingNoise:
    """A `RowNoise` that draws N(0, 1) from a seeded generator and records every draw, in order."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.local = torch.Generator().manual_seed(seed + 1)
        self.draws: list[Tensor] = []

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        draw = torch.randn(shape, generator=self.generator, dtype=dtype).to(device)
        self.draws.append(draw.clone())
        return draw


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, CLASSES))
    with torch.no_grad():  # larger weights: confident, varied predictions, so every mask has both values
        for p in model.parameters():
            p.mul_(3.0)
    return model


def make_batch(batch: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *SHAPE), generator=gen)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    return x, y


def gradient(model: nn.Module, loss: Tensor) -> Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, model.parameters())]).double()


def assert_same(model: nn.Module, loss: Tensor, reference: Tensor) -> None:
    """Loss to relative 1e-5; parameter gradients: cosine >= 1 - 1e-6, max abs difference <= 1e-4 max |g|."""
    assert bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(reference.detach()))
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5, abs=1e-7)
    ours, theirs = gradient(model, loss), gradient(model, reference)
    scale = float(theirs.abs().max())
    assert scale > 0
    cosine = float(F.cosine_similarity(ours, theirs, dim=0))
    assert cosine >= 1 - 1e-6, f"gradient cosine {cosine}"
    assert float((ours - theirs).abs().max()) <= 1e-4 * scale, f"max abs gradient diff {(ours - theirs).abs().max()}"


def softmax_mean(model: nn.Module, x: Tensor, noise: Tensor) -> Tensor:
    """(1/m) sum_j softmax(f(x_i + delta_ij)) for noise (B, m, ...): (B, K)."""
    b, m = noise.shape[:2]
    rows = (x[:, None] + noise).reshape(b * m, *x.shape[1:])
    return F.softmax(model(rows), dim=1).view(b, m, -1).mean(1)


def per_example_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def kl_rows(target: Tensor, log_q: Tensor) -> Tensor:
    """KL(target || q) per row, with 0 log 0 = 0."""
    return (torch.special.xlogy(target, target) - target * log_q).sum(1)


# ------------------------------------------------------------------ Gaussian augmentation and stability training


def test_gaussian_augmentation_gradient() -> None:
    model, (x, y) = make_model(), make_batch()
    noise = RecordingNoise(3)
    out = GaussianAugmentation(0.5)(model, x, y, noise)
    (z,) = noise.draws
    reference = F.cross_entropy(model(x + 0.5 * z), y)
    assert_same(model, out.loss, reference)
    assert torch.equal(out.targets, y)


def test_stability_training_gradient_keeps_the_clean_target_attached() -> None:
    """L = CE(f(x), y) + lbd mean_i [-sum_k q(x_i)_k log q(x_i + delta_i)_k], q(x) not detached (`train_stab.py`)."""
    model, (x, y) = make_model(), make_batch()
    noise = RecordingNoise(4)
    out = StabilityTraining(0.25, lbd=3.0)(model, x, y, noise)
    (z,) = noise.draws
    clean, noisy = model(x), model(x + 0.25 * z)
    soft_ce = -(F.softmax(clean, 1) * F.log_softmax(noisy, 1)).sum(1)
    reference = F.cross_entropy(clean, y) + 3.0 * soft_ce.mean()
    assert_same(model, out.loss, reference)
    assert torch.allclose(out.logits, noisy)


# ------------------------------------------------------------------ consistency regularization


def consistency_reference(logits: Tensor, lbd: float, eta: float) -> Tensor:
    """Jeong & Shin 2020: (1/b) sum_i [lbd (1/m) sum_j KL(p_i || q_ij) + eta H(p_i)], p_i = mean_j q_ij attached."""
    q = F.softmax(logits, dim=2)
    p = q.mean(1)
    kl = torch.stack([kl_rows(p, torch.log(q[:, j])) for j in range(q.shape[1])], 1).mean(1)
    entropy = -(p * torch.log(p.clamp(min=1e-20))).sum(1)
    return (lbd * kl + eta * entropy).mean()


@pytest.mark.parametrize("lbd, eta", [(10.0, 0.5), (0.0, 2.0), (3.0, 0.0)])
def test_consistency_gradient_with_each_term_alone_and_together(lbd: float, eta: float) -> None:
    """Each term is checked alone too: the entropy term of an average prediction detached by mistake has no
    gradient and would fail the (lbd = 0) case."""
    model, (x, y) = make_model(), make_batch()
    noise = RecordingNoise(5)
    m, sigma = 3, 0.5
    out = Consistency(sigma, m=m, lbd=lbd, eta=eta)(model, x, y, noise)
    (z,) = noise.draws
    assert z.shape == (x.shape[0], m, *SHAPE)
    logits = model((x[:, None] + sigma * z).reshape(-1, *SHAPE)).view(x.shape[0], m, -1)
    targets = y.repeat_interleave(m)
    reference = F.cross_entropy(logits.flatten(0, 1), targets) + consistency_reference(logits, lbd, eta)
    assert_same(model, out.loss, reference)
    assert torch.equal(out.targets, targets)


# ------------------------------------------------------------------ SmoothAdv (Salman et al. 2019)


def smoothadv_pgd(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, eps: float, steps: int) -> Tensor:
    """SmoothAdv_PGD of Salman et al.'s code: T steps of length 2 eps / T along the normalized gradient of
    -log((1/m) sum_j softmax(f(x' + delta_j)))_y, each followed by a clamp to [0, 1] and a projection onto
    the eps-ball; no random start; the noise fixed for all steps."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        point = (x + delta).detach().requires_grad_(True)
        loss = F.nll_loss(torch.log(softmax_mean(model, point, noise)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
        delta = delta + 2 * eps / steps * grad / per_example_norm(grad)
        delta = (x + delta).clamp(0, 1) - x
        norms = per_example_norm(delta)
        delta = delta * torch.where(norms > eps, eps / norms, torch.ones_like(norms))
    return (x + delta).detach()


@pytest.mark.parametrize("epoch, expected_eps", [(0, 0.25), (2, 0.75), (7, 1.0)])
@pytest.mark.parametrize("multi_noise, consistency", [(False, False), (True, False), (True, True)])
def test_smoothadv_gradient_at_a_warmup_epoch_and_after(epoch: int, expected_eps: float, multi_noise: bool,
                                                        consistency: bool) -> None:
    """Warm-up 4 epochs, eps 1: eps_e = min(eps, (e + 1) eps / 4); the loss is the cross-entropy of f on x_adv + the
    same noise (all m copies with multi-noise, else the first), plus the consistency regularizer on the m copies."""
    model, (x, y) = make_model(), make_batch(4)
    sigma, m, steps = 0.25, 2, 3
    objective = SmoothAdv(sigma, PGDL2(eps=1.0, steps=steps), m=m, multi_noise=multi_noise, warmup=4,
                          consistency=consistency, lbd=2.0, eta=0.7).at_epoch(epoch)
    assert objective.attack.eps == pytest.approx(expected_eps)
    noise = RecordingNoise(6)
    out = objective(model, x, y, noise)
    (z,) = noise.draws
    delta = sigma * z
    x_adv = smoothadv_pgd(model, x, y, delta, expected_eps, steps)
    moved = per_example_norm(x_adv - x).flatten()
    assert float(moved.min()) > 0.5 * expected_eps  # the attack is active
    assert float(moved.max()) <= expected_eps * (1 + 1e-5)
    if multi_noise:
        logits = model((x_adv[:, None] + delta).reshape(-1, *SHAPE))
        reference = F.cross_entropy(logits, y.repeat_interleave(m))
        if consistency:
            reference = reference + consistency_reference(logits.view(x.shape[0], m, -1), 2.0, 0.7)
    else:
        reference = F.cross_entropy(model(x_adv + delta[:, 0]), y)
    assert_same(model, out.loss, reference)


def test_smoothadv_with_eps_zero_trains_on_the_noise_only() -> None:
    model, (x, y) = make_model(), make_batch(4)
    noise = RecordingNoise(7)
    out = SmoothAdv(0.5, PGDL2(eps=0.0, steps=2), m=3, multi_noise=True)(model, x, y, noise)
    (z,) = noise.draws
    reference = F.cross_entropy(model((x[:, None] + 0.5 * z).reshape(-1, *SHAPE)), y.repeat_interleave(3))
    assert_same(model, out.loss, reference)


# ------------------------------------------------------------------ MACER (Zhai et al. 2020)


def macer_reference(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, sigma: float, lbd: float, beta: float,
                    gamma: float) -> tuple[Tensor, Tensor]:
    """(C + lbd R) / B with C = sum_i -log(p_i[y_i] + 1e-10), R = (sigma / 2) sum over kept images of
    (gamma - xi_i), xi = Phi^-1(p1) - Phi^-1(p2) of the beta-sharpened average softmax; kept: its argmax is y,
    xi finite and |xi| <= gamma. Returns the loss and the kept mask."""
    b, m = delta.shape[:2]
    logits = model((x[:, None] + delta).reshape(b * m, *x.shape[1:])).view(b, m, -1)
    p = F.softmax(logits, 2).mean(1)
    classification = -torch.log(p.gather(1, y[:, None]).squeeze(1) + 1e-10).sum()
    sharp = F.softmax(beta * logits, 2).mean(1)
    top2, top_index = sharp.topk(2, dim=1)
    normal = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))
    xi = normal.icdf(top2[:, 0]) - normal.icdf(top2[:, 1])
    kept = (top_index[:, 0] == y) & torch.isfinite(xi) & (xi.abs() <= gamma)
    robustness = sigma / 2 * (gamma - xi[kept]).sum()
    return (classification + lbd * robustness) / b, kept


@pytest.mark.parametrize("epoch", [0, 1, 2, 5])
def test_macer_gradient_deferred_and_after(epoch: int) -> None:
    """deferred = 2: epochs 0 and 1 train on the classification term only (lbd = 0), epochs 2 on on the full loss;
    the batch has kept and dropped images (wrong argmax, |xi| > gamma)."""
    model, (x, y) = make_model(2), make_batch(12, seed=9)
    y[:6] = model(x[:6]).argmax(1)  # half the labels agree with the model: kept images exist
    sigma, m, lbd, beta, gamma = 0.25, 5, 3.0, 2.0, 0.6
    objective = MACER(sigma, m=m, lbd=lbd, beta=beta, gamma=gamma, deferred=2).at_epoch(epoch)
    noise = RecordingNoise(10)
    out = objective(model, x, y, noise)
    (z,) = noise.draws
    active = epoch >= 2
    reference, kept = macer_reference(model, x, y, sigma * z, sigma, lbd if active else 0.0, beta, gamma)
    assert 0 < int(kept.sum()) < len(kept)
    assert_same(model, out.loss, reference)
    if active:  # the robustness term changes the gradient: compare with the classification term alone
        alone, _ = macer_reference(model, x, y, sigma * z, sigma, 0.0, beta, gamma)
        assert float(F.cosine_similarity(gradient(model, alone), gradient(model, reference), dim=0)) < 0.999


def test_macer_without_deferral_uses_the_robustness_term_from_the_first_epoch() -> None:
    model, (x, y) = make_model(2), make_batch(12, seed=9)
    y[:6] = model(x[:6]).argmax(1)
    noise = RecordingNoise(11)
    out = MACER(0.5, m=4, lbd=2.0, beta=3.0, gamma=0.8)(model, x, y, noise)
    (z,) = noise.draws
    reference, kept = macer_reference(model, x, y, 0.5 * z, 0.5, 2.0, 3.0, 0.8)
    assert 0 < int(kept.sum()) < len(kept)
    assert_same(model, out.loss, reference)


# ------------------------------------------------------------------ SmoothMix (Jeong et al. 2021)


def smoothmix_pgd(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, step_size: float, steps: int,
                  mix_step: int) -> tuple[Tensor, Tensor]:
    """SmoothMix_PGD: from x, T steps x' <- clamp(x' + step_size g / (||g|| + 1e-8), 0, 1) with g the gradient of
    sum_i -log p_i(x')[y_i] (p: average softmax over the fixed draws); returns (the iterate before step
    mix_step, or x when mix_step >= T; the last iterate)."""
    adv, start = x.clone(), x.clone()
    for step in range(steps):
        if step == mix_step:
            start = adv.clone()
        point = adv.detach().requires_grad_(True)
        loss = F.nll_loss(torch.log(softmax_mean(model, point, delta)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
        adv = (adv + step_size * grad / (per_example_norm(grad) + 1e-8)).clamp(0, 1).detach()
    return start, adv


def smoothmix_reference(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, lam: Tensor, step_size: float,
                        steps: int, mix_step: int, eta: float, ramp: float) -> tuple[Tensor, Tensor]:
    b, m = delta.shape[:2]
    x_start, x_adv = smoothmix_pgd(model, x, y, delta, step_size, steps, mix_step)
    # x_init: the start iterate projected (clamp, then L2 ball) onto radius ramp * step_size * mix_step around x
    radius = ramp * step_size * mix_step
    moved = x_start.clamp(0, 1) - x
    norms = per_example_norm(moved)
    scale = torch.where(norms > radius, radius / norms.clamp_min(1e-12), torch.ones_like(norms))
    x_init = (x + moved * scale).detach()
    logits = model((x_init[:, None] + delta).reshape(b * m, *x.shape[1:]))
    p = F.softmax(logits, 1).view(b, m, -1).mean(1)
    w = lam.view(-1, 1, 1, 1)
    x_mix = (1 - w) * x_init + w * x_adv
    target = (1 - lam[:, None]) * p + lam[:, None] / p.shape[1]
    log_q = F.log_softmax(model((x_mix[:, None] + delta).reshape(b * m, *x.shape[1:])), 1).view(b, m, -1)
    correct = (p.argmax(1) == y).float()
    kl = torch.stack([kl_rows(target, log_q[:, j]) for j in range(m)], 1)  # (b, m)
    mix_term = (correct[:, None] * kl).sum() / (b * m)
    loss = F.cross_entropy(logits, y.repeat_interleave(m)) + eta * ramp * mix_term
    return loss, correct


@pytest.mark.parametrize("mix_step", [0, 1])
@pytest.mark.parametrize("epoch, ramp", [(0, 0.25), (1, 0.5), (6, 1.0)])
def test_smoothmix_gradient_with_the_ramp_and_both_mix_steps(mix_step: int, epoch: int, ramp: float) -> None:
    """Warm-up 4: w_e = min(1, (e + 1) / 4) scales the mixup term and x_init's radius (mix_step 1); the target
    (1 - lambda) p + lambda u keeps p attached; lambda = Phi(z) / 2 from the draw made after the noise."""
    model, (x, y) = make_model(3), make_batch(8, seed=12)
    y[:4] = model(x[:4]).argmax(1)  # some images are classified correctly under noise: the mask has both values
    sigma, m, steps, step_size, eta = 0.25, 2, 3, 0.4, 5.0
    objective = SmoothMix(sigma, m=m, steps=steps, step_size=step_size, eta=eta, mix_step=mix_step,
                          warmup=4).at_epoch(epoch)
    assert objective.ramp == pytest.approx(ramp)
    noise = RecordingNoise(13)
    out = objective(model, x, y, noise)
    z, u = noise.draws
    assert z.shape == (8, m, *SHAPE) and u.shape == (8,)
    lam = torch.special.ndtr(u) / 2
    reference, correct = smoothmix_reference(model, x, y, sigma * z, lam, step_size, steps, mix_step, eta, ramp)
    assert 0 < int(correct.sum()) < len(correct)
    assert_same(model, out.loss, reference)
    assert torch.equal(out.targets, y.repeat_interleave(m))


# ------------------------------------------------------------------ CAT-RS (Jeong, Kim & Shin 2023)


def kl_pgd(model: nn.Module, x: Tensor, delta0: Tensor, pi: Tensor, eps: float, steps: int) -> Tensor:
    """CAT-RS's KL_PGD on the noise: ascent on sum_ij KL(pi_i || q(x_i + delta_ij)) / m, steps 2 eps / T along
    g / (||g|| + 1e-8) per copy, delta - delta0 projected on the eps-ball per copy, then each copy re-standardized
    to delta0's mean and (uncentred) root mean square."""
    b, m = delta0.shape[:2]
    start = delta0.reshape(b * m, *delta0.shape[2:])
    inputs, targets = x.repeat_interleave(m, 0), pi.repeat_interleave(m, 0)
    mean0 = start.mean(dim=(1, 2, 3), keepdim=True)
    rms0 = start.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    delta = start.clone()
    for _ in range(steps):
        point = delta.detach().requires_grad_(True)
        loss = kl_rows(targets, F.log_softmax(model(inputs + point), 1)).sum() / m
        (grad,) = torch.autograd.grad(loss, point)
        delta = delta + 2 * eps / steps * grad / (per_example_norm(grad) + 1e-8)
        moved = delta - start
        delta = start + moved * torch.clamp(eps / per_example_norm(moved), max=1.0)
        mean = delta.mean(dim=(1, 2, 3), keepdim=True)
        rms = delta.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        delta = (delta - mean) / rms * rms0 + mean0
    return delta.detach().view_as(delta0)


def catrs_reference(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, uniform: Tensor, pi: Tensor, eps: float,
                    steps: int, lbd: float, confidence_mask: bool) -> tuple[Tensor, Tensor]:
    b, m = delta.shape[:2]
    logits0 = model((x[:, None] + delta).reshape(b * m, *x.shape[1:])).view(b, m, -1)
    ce = F.cross_entropy(logits0.flatten(0, 1), y.repeat_interleave(m), reduction="none").view(b, m)
    if confidence_mask:
        accuracy = pi[torch.arange(b), y]
    else:
        accuracy = (logits0.argmax(2) == y[:, None]).float().mean(1)
    kept = torch.clamp((uniform < accuracy[:, None]).sum(1), min=1)
    low = torch.stack([ce[i].sort().values[: int(kept[i])].sum() for i in range(b)]) / m
    attacked = kl_pgd(model, x, delta, pi, eps, steps) if eps > 0 else delta
    logits = model((x[:, None] + attacked).reshape(b * m, *x.shape[1:]))
    kl = kl_rows(pi.repeat_interleave(m, 0), F.log_softmax(logits, 1)).view(b, m)
    high = kl.max(1).values
    return (low + lbd * (kept == m).float() * high).mean(), kept


@pytest.mark.parametrize("confidence_mask", [False, True])
@pytest.mark.parametrize("eps", [0.5, 0.0])
def test_catrs_gradient(confidence_mask: bool, eps: float) -> None:
    """L = mean_i [ (1/m) sum of the K_i smallest CE_ij + lbd 1[K_i = m] max_j KL(pi_i || q(x_i + delta*_ij)) ],
    K_i = max(1, #{j: u_ij < a_i}); the batch has images with K_i = m and with K_i < m."""
    model, (x, y) = make_model(4), make_batch(10, seed=14)
    m, sigma, steps, lbd = 3, 0.25, 2, 1.5
    y[:5] = model(x[:5]).argmax(1)
    pi_gen = torch.Generator().manual_seed(15)
    pi = torch.softmax(3 * torch.randn(20, CLASSES, generator=pi_gen), 1)
    index = torch.arange(3, 13)
    pi[index[:5], y[:5]] += 3.0  # confident, correct smoothed predictions for half the images
    pi = pi / pi.sum(1, keepdim=True)
    objective = CATRS(sigma, m=m, eps=eps, steps=steps, lbd=lbd, confidence_mask=confidence_mask, pi=pi)
    noise = RecordingNoise(16)
    out = objective(model, x, y, noise, index=index)
    z, u = noise.draws
    assert z.shape == (10, m, *SHAPE) and u.shape == (10, m)
    reference, kept = catrs_reference(model, x, y, sigma * z, torch.special.ndtr(u), pi[index], eps, steps, lbd,
                                      confidence_mask)
    assert bool((kept == m).any()) and bool((kept < m).any()) and bool((kept > 1).any())
    assert_same(model, out.loss, reference)


def test_catrs_attack_moves_the_noise_toward_a_larger_kl() -> None:
    """The attacked copies raise the KL term: the high loss with the attack exceeds the one on the plain noise."""
    model, (x, _) = make_model(4), make_batch(6, seed=17)
    pi = torch.full((6, CLASSES), 1.0 / CLASSES)
    noise = torch.randn((6, 3, *SHAPE), generator=torch.Generator().manual_seed(18)) * 0.25
    attacked = kl_pgd(model, x, noise, pi, 0.5, 3)
    before = kl_rows(pi.repeat_interleave(3, 0), F.log_softmax(model((x[:, None] + noise).flatten(0, 1)), 1))
    after = kl_rows(pi.repeat_interleave(3, 0), F.log_softmax(model((x[:, None] + attacked).flatten(0, 1)), 1))
    assert float(after.sum().detach()) > float(before.sum().detach())
    assert math.isfinite(float(after.sum().detach()))


# ------------------------------------------------------------------ the loop contract and the published defaults


def test_steps_per_batch_uses_index_and_split_follow_each_authors_loop() -> None:
    """One step per loader batch for Gaussian, stability, MACER and plain SmoothAdv; m steps (the batch cut in m
    chunks) for SmoothAdv with multi-noise, Consistency, SmoothMix and CAT-RS; only CAT-RS needs the index."""
    pi = torch.full((4, CLASSES), 0.25)
    one = [GaussianAugmentation(0.25), StabilityTraining(0.25), MACER(0.25, m=3),
           SmoothAdv(0.25, PGDL2(eps=0.5, steps=2), m=3)]
    many = [SmoothAdv(0.25, PGDL2(eps=0.5, steps=2), m=3, multi_noise=True), Consistency(0.25, m=3),
            SmoothMix(0.25, m=3), CATRS(0.25, m=3, pi=pi)]
    for objective in one:
        assert objective.steps_per_batch == 1 and not objective.uses_index
    for objective in many:
        assert objective.steps_per_batch == 3
        assert objective.uses_index == isinstance(objective, CATRS)
    x, y = make_batch(6)
    chunks = Consistency(0.25, m=3).split(x, y)
    assert len(chunks) == 3 and all(len(c[0]) == 2 for c in chunks)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert len(GaussianAugmentation(0.25).split(x, y)) == 1


def test_the_defaults_are_the_published_settings() -> None:
    """The defaults the docstrings cite from each paper or its code: a changed default is another method."""
    pgd = PGDL2(eps=0.5, steps=2)
    smoothadv = SmoothAdv(0.25, pgd)
    assert (smoothadv.m, smoothadv.multi_noise, smoothadv.warmup, smoothadv.consistency, smoothadv.lbd,
            smoothadv.eta) == (1, False, 1, False, 1.0, 0.5)
    assert StabilityTraining(0.25).lbd == 2.0
    consistency = Consistency(0.25)
    assert (consistency.m, consistency.lbd, consistency.eta) == (2, 10.0, 0.5)
    macer = MACER(0.25)
    assert (macer.m, macer.lbd, macer.beta, macer.gamma, macer.deferred) == (16, 12.0, 16.0, 8.0, 0)
    smoothmix = SmoothMix(0.25)
    assert (smoothmix.m, smoothmix.steps, smoothmix.step_size, smoothmix.eta, smoothmix.mix_step,
            smoothmix.warmup, smoothmix.ramp) == (2, 4, 1.0, 5.0, 0, 10, 1.0)
    catrs = CATRS(0.25, pi=torch.full((2, CLASSES), 0.25))
    assert (catrs.m, catrs.eps, catrs.steps, catrs.lbd, catrs.confidence_mask) == (4, 1.0, 4, 1.0, False)


def test_schedules_are_recorded_but_are_not_hyperparameters() -> None:
    from smoothadv.objectives import describe_value, hyperparameters, same_description

    for name in ("smoothadv", "smoothmix", "macer"):
        keys = set(hyperparameters(name))
        assert "epoch" not in keys and "ramp" not in keys and "sigma" not in keys
    described = SmoothMix(0.25, warmup=4).at_epoch(1).describe()
    assert described["ramp"] == 0.5 and "epoch" not in described
    plain = SmoothAdv(0.25, PGDL2(eps=0.5, steps=2)).describe()
    assert not {"consistency", "lbd", "eta"} & set(plain)
    assert plain["attack"]["name"] == "PGDL2" and plain["attack"]["eps"] == 0.5
    assert describe_value(PGDL2) is PGDL2  # a class is a value, not a dataclass instance to describe
    current = describe_value(PGDL2(eps=0.5, steps=10))
    fields = ", ".join(f"{k}={v!r}" for k, v in current.items() if k != "name")
    assert same_description(f"PGDL2({fields})", current)  # the repr() recorded before 0.2
    assert not same_description(f"PGDL2({fields}, x=1)", current)
    assert not same_description(f"DDN({fields})", current)
    assert same_description(current, dict(current)) and not same_description(current, {**current, "eps": 0.25})
    assert same_description(2.0, 2.0) and not same_description("2.0", 2.0)
    with pytest.raises(Exception, match="sigma"):
        GaussianAugmentation(-1.0)
    with pytest.raises(Exception, match="sigma"):
        StabilityTraining(float("nan"))


def test_a_scheduled_objective_refuses_a_call_without_its_epoch_and_smoothadv_needs_a_dataclass_attack() -> None:
    """Warm-up of 2 epochs (the smallest schedule) and a deferral of 1: calling without `at_epoch` is an error;
    warm-up 1 and no deferral have no schedule. SmoothAdv's warm-up replaces its attack's eps, so the attack
    must be a dataclass instance with an eps field."""
    from dataclasses import dataclass

    from smoothadv.errors import SmoothAdvError

    model, (x, y) = make_model(), make_batch(4)
    scheduled = [SmoothAdv(0.25, PGDL2(eps=0.5, steps=1), warmup=2), SmoothMix(0.25, warmup=2, steps=1),
                 MACER(0.25, m=2, deferred=1)]
    for objective in scheduled:
        with pytest.raises(SmoothAdvError, match="at_epoch"):
            objective(model, x, y, torch.Generator().manual_seed(0))
        objective.at_epoch(0)(model, x, y, torch.Generator().manual_seed(0))
    for objective in (SmoothAdv(0.25, PGDL2(eps=0.5, steps=1)), SmoothMix(0.25, warmup=1, steps=1), MACER(0.25, m=2)):
        objective(model, x, y, torch.Generator().manual_seed(0))

    @dataclass(frozen=True)
    class NoEps:
        steps: int = 1

    from types import SimpleNamespace

    for attack in (PGDL2, NoEps(), lambda model, x, y, g=None: x, SimpleNamespace(eps=0.5)):
        with pytest.raises(SmoothAdvError, match="dataclass"):
            SmoothAdv(0.25, attack)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [
    lambda: Consistency(-0.25), lambda: Consistency(0.25, m=0), lambda: MACER(-0.25), lambda: MACER(0.25, beta=-1.0),
    lambda: SmoothMix(-0.25), lambda: SmoothMix(0.25, step_size=0.0), lambda: StabilityTraining(0.25, lbd=-1.0),
    lambda: SmoothAdv(-0.25, PGDL2(eps=0.5, steps=1)), lambda: SmoothAdv(0.25, PGDL2(eps=0.5, steps=1), m=0),
    lambda: CATRS(-0.25, pi=torch.full((2, CLASSES), 0.25)),
    lambda: CATRS(0.25, m=0, pi=torch.full((2, CLASSES), 0.25)),
])
def test_every_objective_checks_its_hyperparameters(make) -> None:
    from smoothadv.errors import SmoothAdvError

    with pytest.raises(SmoothAdvError):
        make()


def test_macer_with_a_small_weight_and_a_label_of_probability_zero() -> None:
    """lbd = 0.5 (< 1) still adds the robustness term; an image whose label gets probability 0 on every copy
    (softmax underflow) contributes -log(1e-10) = 23.03 to C, not inf or NaN."""
    model, (x, y) = make_model(2), make_batch(12, seed=9)
    y[:6] = model(x[:6]).argmax(1)
    noise = RecordingNoise(21)
    out = MACER(0.25, m=4, lbd=0.5, beta=2.0, gamma=0.6)(model, x, y, noise)
    (z,) = noise.draws
    reference, kept = macer_reference(model, x, y, 0.25 * z, 0.25, 0.5, 2.0, 0.6)
    assert 0 < int(kept.sum())
    assert_same(model, out.loss, reference)
    huge = make_model(2)
    with torch.no_grad():
        huge[3].weight.mul_(1e4)
    labels = huge(x).argmin(1)  # the least likely class: probability 0 in float32
    noise = RecordingNoise(22)
    out = MACER(0.25, m=2, lbd=0.0)(huge, x, labels, noise)
    (z,) = noise.draws
    with torch.no_grad():
        p = softmax_mean(huge, x, 0.25 * z)
        assert float(p.gather(1, labels[:, None]).min()) == 0.0
        expected = -torch.log(p.gather(1, labels[:, None]).squeeze(1) + 1e-10).sum() / len(x)
    loss = float(out.loss.detach())
    assert math.isfinite(loss) and loss == pytest.approx(float(expected), rel=1e-6)


def test_smoothmix_attack_returns_detached_points_and_leaves_the_input_alone() -> None:
    from smoothadv.objectives import smoothmix_attack

    model, (x, y) = make_model(3), make_batch(4)
    noise = torch.randn((4, 2, *SHAPE), generator=torch.Generator().manual_seed(0)) * 0.25
    for mix_step in (0, 1, 5):
        start, adv = smoothmix_attack(model, x, y, noise, step_size=0.3, steps=3, mix_step=mix_step)
        assert not x.requires_grad and not start.requires_grad and not adv.requires_grad
        assert start.grad_fn is None and adv.grad_fn is None
        expected_start, expected_adv = smoothmix_pgd(model, x, y, noise, 0.3, 3, mix_step)
        assert torch.allclose(start, expected_start, atol=1e-6) and torch.allclose(adv, expected_adv, atol=1e-6)
    assert torch.equal(smoothmix_attack(model, x, y, noise, step_size=0.3, steps=3, mix_step=5)[0], x)


def test_catrs_attack_with_steps_shorter_than_eps_and_its_own_checks(tmp_path) -> None:
    """T = 4 steps of 2 eps / T = eps / 2: the first moves stay inside the eps-ball (the projection must not
    scale them up); a smoothed-prediction file is loaded as pi; an index past pi's rows is a one-line error;
    pi stays out of the objective's repr and equality (a tensor: N x K)."""
    from smoothadv.errors import SmoothAdvError

    model, (x, y) = make_model(4), make_batch(6, seed=19)
    pi = torch.softmax(torch.randn(8, CLASSES, generator=torch.Generator().manual_seed(20)), 1)
    index = torch.arange(6)
    objective = CATRS(0.25, m=2, eps=0.5, steps=4, lbd=1.0, pi=pi)
    noise = RecordingNoise(23)
    out = objective(model, x, y, noise, index=index)
    z, u = noise.draws
    reference, _ = catrs_reference(model, x, y, 0.25 * z, torch.special.ndtr(u), pi[index], 0.5, 4, 1.0, False)
    assert_same(model, out.loss, reference)
    for bad in (torch.tensor([0, 8]), torch.tensor([8, 0]), torch.tensor([9, 1])):
        with pytest.raises(SmoothAdvError, match="rows"):
            objective(model, x[:2], y[:2], torch.Generator().manual_seed(0), index=bad)
    with pytest.raises(SmoothAdvError, match="index"):
        objective(model, x, y, torch.Generator().manual_seed(0))
    assert "pi=" not in repr(objective) and "tensor" not in repr(objective)
    assert objective == CATRS(0.25, m=2, eps=0.5, steps=4, lbd=1.0, pi=pi.clone())
    path = tmp_path / "pi.tsv"
    path.write_text("idx\tcounts\n0\t1,2,3,4\n1\t0,0,10,0\n")
    loaded = CATRS(0.25, smoothed_prediction=str(path))
    assert loaded.pi is not None and loaded.pi.shape == (2, CLASSES)
    assert torch.allclose(loaded.pi[1], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    with pytest.raises(SmoothAdvError, match="smoothed-prediction"):
        CATRS(0.25)


def test_only_smoothadv_has_an_attack_and_unknown_names_have_none() -> None:
    from smoothadv.objectives import OBJECTIVES, has_attack

    assert [name for name in OBJECTIVES if has_attack(name)] == ["smoothadv"]
    assert has_attack("no-such-objective") is False


def test_catrs_records_its_table_by_the_digest_of_its_float32_values_whatever_their_graph() -> None:
    import hashlib

    pi = torch.tensor([[0.5, 0.5] + [0.0] * (CLASSES - 2), [1.0 / CLASSES] * CLASSES])
    described = CATRS(0.25, pi=pi).describe()
    assert "pi" not in described
    assert described["pi_sha256"] == hashlib.sha256(pi.numpy().tobytes()).hexdigest()
    learned = pi.double().requires_grad_(True)  # a table handed over from a computation that kept its graph
    assert CATRS(0.25, pi=learned).describe()["pi_sha256"] == described["pi_sha256"]
